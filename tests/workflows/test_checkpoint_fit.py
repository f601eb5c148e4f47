"""A checkpoint that does not belong to the base it is loaded on is refused when loaded, naming the folder and what
does not fit, instead of failing (or worse, generating) in the middle of an evaluation."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from mcit.errors import CheckpointError
from mcit.models.loading import load_base
from mcit.workflows.load import load_checkpoint


@pytest.fixture(scope="module")
def tiny():
    from mcit.config import ModelConfig

    return load_base(ModelConfig(name_or_path="builtin:tiny-llava"))


def _adapter(tiny, folder):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(folder)
    peft.unload()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "builtin:tiny-llava"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_adapter_of_the_same_base_loads(tiny, tmp_path):
    model, processor, _, recipe = load_checkpoint(str(_adapter(tiny, tmp_path / "adapter")))
    assert recipe.model.name_or_path == "builtin:tiny-llava"
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_an_adapter_of_other_dimensions_is_refused_naming_both(tiny, tmp_path):
    folder = _adapter(tiny, tmp_path / "adapter")
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    rank, width = weights[key].shape
    weights[key] = weights[key].new_zeros(rank, width * 2)  # as if trained on a base twice as wide
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"the adapter does not fit the base model 'builtin:tiny-llava' "
                                              r"\(adapter_config.json names 'builtin:tiny-llava'\): size mismatch"):
        load_checkpoint(str(folder))


def test_a_model_folder_with_another_bases_tokenizer_is_refused(tmp_path):
    from mcit.config import ModelConfig

    model, processor = load_base(ModelConfig(name_or_path="builtin:tiny-llava"))  # its own copy: changed below
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])  # without resize_token_embeddings
    processor.save_pretrained(folder)
    rows = model.get_input_embeddings().num_embeddings
    with pytest.raises(CheckpointError, match=rf"the tokenizer has {rows + 8} tokens but the model's embedding "
                                              rf"table {rows} rows"):
        load_checkpoint(str(folder))
