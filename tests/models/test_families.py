"""Every model family end to end, the way a user runs it: `mcit train` of two SynthCIT tasks with lora_ft and with
disco on the family's tiny random-init checkpoint (its real architecture, processor and chat template), evaluation
after each stage, `mcit export` of the adapter and its reload with plain PEFT onto the same base (same logits as the
stage mcit left). The LLaVA-1.5 family runs through the rest of the suite; these are the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mcit.models.families import family_for_type
from mcit.models.tiny_families import FAMILY_BUILDERS, create_family_init
from tests.recipes import write_recipe

pytestmark = pytest.mark.slow
FAMILIES = tuple(FAMILY_BUILDERS)  # every family with a tiny builder


@pytest.fixture(scope="module", params=FAMILIES)
def family_base(request, tmp_path_factory):
    return request.param, create_family_init(request.param, tmp_path_factory.mktemp("base") / request.param)


def _train(tmp_path, synthcit_root, base, method: dict, name: str):
    recipe = write_recipe(tmp_path / f"{name}.yaml", synthcit_root, output_dir=tmp_path / name,
                          model={"name_or_path": str(base), "autocast": None},
                          benchmark={"max_train": 16, "max_test": 4}, method=method,
                          train={"batch_size": 8, "max_steps": 2, "save_steps": 0, "warmup_ratio": 0.0,
                                 "max_length": 256},
                          eval={"zero_shot": False, "batch_size": 8, "max_new_tokens": 4})
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "train", str(recipe)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["stages"] == ["zero-shot", "shape", "mc-color"]
    assert all(value is not None for value in results["matrix"][2])  # both tasks scored after the last stage
    return tmp_path / name, results


def test_lora_ft_trains_evaluates_exports_and_reloads_with_plain_peft(family_base, tmp_path, synthcit_root):
    model_type, base = family_base
    run, _ = _train(tmp_path, synthcit_root, base, {"name": "lora_ft", "lora": {"r": 4, "alpha": 8}}, "lora_ft")
    out = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the model card's prompt section: the family's own template, image tokens counted per image size
    assert "their number depends on the image's size" in (out / "README.md").read_text()

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mcit.data.collate import Encoder, PixelCache, collate
    from mcit.workflows.load import load_checkpoint

    stage_model, processor, _, recipe = load_checkpoint(str(run / "checkpoints" / "stage-02-mc-color"))
    weights = {k: v for k, v in stage_model.state_dict().items() if "lora_B" in k}
    assert weights and any(float(v.abs().sum()) > 0 for v in weights.values())  # the adapter did train
    family = family_for_type(model_type)
    assert all(family.contains(k.removeprefix("base_model.model."), "language_model") for k in weights), \
        "LoRA reached a module outside the language model"
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(out)).eval()

    from mcit.data.cards import load_card

    card = load_card("synthcit-mini")
    card.root = str(synthcit_root)
    sample = card.load_task("shape", "test", seed=0)[0]
    encoder = Encoder.from_recipe(processor, recipe)
    batch = collate([encoder.encode(sample)], processor.tokenizer.pad_token_id, PixelCache(processor))
    batch.pop("labels")
    with torch.no_grad():
        expected = stage_model.eval()(**batch).logits
        got = plain(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # a full model (adapter merged into the base) with its processor: loads as any checkpoint, same logits
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "export", str(run), "--out", str(tmp_path / "full"),
                           "--full"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, merged_processor, _, _ = load_checkpoint(str(tmp_path / "full"))
    assert type(merged_processor).__name__ == type(processor).__name__
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, expected, atol=1e-4, rtol=1e-4)

    # layer-wise CKA between the two task models reads this family's decoder layers
    stages = [str(run / "checkpoints" / name) for name in ("stage-01-shape", "stage-02-mc-color")]
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "analyze", "cka", "--checkpoints", *stages,
                           "--benchmark", "synthcit-mini", "--root", str(synthcit_root), "--samples", "3",
                           "--out", str(tmp_path / "cka")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cka = json.loads((tmp_path / "cka" / "cka.json").read_text())
    assert len(cka["layers"]) == stage_model.config.get_text_config().num_hidden_layers


def test_disco_routes_each_family(family_base, tmp_path, synthcit_root):
    _, base = family_base
    run, results = _train(tmp_path, synthcit_root, base,
                          {"name": "disco", "lora": {"r": 4, "alpha": 8},
                           "router": {"features": "both", "source": "model"}}, "disco")
    accuracy = results["router"]["accuracy"]
    assert accuracy[-1] is not None and 0 <= accuracy[-1] <= 100  # the router ran on the image and text features
    assert len(list((run / "checkpoints").glob("stage-*"))) == 2
