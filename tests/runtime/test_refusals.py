"""Settings that cannot run where they are asked for are refused with one line naming the setting and what is
missing: flash-attention or 4-bit without a GPU, 4-bit under ZeRO-3, RegLoRA merging into 4-bit weights."""

from __future__ import annotations

import pytest
import torch

from mcit.config import ModelConfig, recipe_from_dict
from mcit.errors import ModelError, RecipeError
from mcit.methods.base import build_method
from mcit.models import loading
from mcit.runtime import placement


def test_flash_attention_without_a_gpu_names_the_setting():
    with pytest.raises(ModelError, match=r"^model.attn_implementation: flash_attention_2 needs a CUDA GPU"):
        loading.attn_implementation("flash_attention_2", torch.device("cpu"))
    assert loading.attn_implementation("auto", torch.device("cpu")) == "sdpa"  # never flash for a CPU model


def test_four_bit_without_a_gpu_names_the_setting():
    with pytest.raises(ModelError, match=r"^model.load_in_4bit: 4-bit QLoRA runs on CUDA GPUs only"):
        loading.quantization_config(ModelConfig(load_in_4bit=True), torch.device("cpu"))


def test_four_bit_under_zero3_is_refused(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ModelError, match=r"^model.load_in_4bit: 4-bit base weights cannot be sharded by ZeRO-3"):
        loading.quantization_config(ModelConfig(load_in_4bit=True), torch.device("cuda", 0))


def test_reglora_refuses_four_bit_weights():
    recipe = recipe_from_dict({"output_dir": "unused", "model": {"load_in_4bit": True}, "method": {"name": "reglora"}})
    with pytest.raises(RecipeError, match=r"^method.name: reglora merges .* set model.load_in_4bit: false"):
        build_method(recipe)


def test_compute_device_follows_local_rank_and_ds_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for key, value in {"RANK": "11", "WORLD_SIZE": "16", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                       "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(key, value)
    assert placement.compute_device() == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "8")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=8 but this process sees only 8 GPU"):
        placement.compute_device()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a CPU run on a GPU host
    assert placement.compute_device() == torch.device("cpu")


@pytest.mark.parametrize("method", ["keeplora", "mr_lora", "olora"])
def test_methods_needing_whole_weights_refuse_every_stage3_setting(method, tmp_path):
    """The shipped stage-3 templates and a user's own stage-3 JSON are refused alike; stage 2 in either form is not."""
    import json

    def build(deepspeed):
        return build_method(recipe_from_dict({"output_dir": "unused", "method": {"name": method},
                                              "train": {"deepspeed": deepspeed}}))

    own3, own2 = tmp_path / "cluster3.json", tmp_path / "cluster2.json"
    own3.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    own2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for setting in ("zero3", "zero3_offload", str(own3)):
        with pytest.raises(RecipeError, match=r"^train.deepspeed.*zero2"):
            build(setting)
    for setting in ("zero2", str(own2), None):
        assert build(setting).recipe.train.deepspeed == setting
