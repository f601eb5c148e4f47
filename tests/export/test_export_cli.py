"""`mcit export` on run folders laid out as the runner leaves them (built here from the tiny random-init LLaVA).

What is protected: an exported adapter gives the in-run model's logits under plain PEFT (projector included), the
chosen stage is the one exported, several task adapters merge exactly with `cat`, `--full` loads with plain
transformers (merged LoRA, or a full fine-tune's state dict in the asked dtype), the card and recipe carry no local
path, the push uploads exactly the export folder, and every refusal is a clear McitError.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file

from mcit.cli.export import add_arguments
from mcit.config import recipe_from_dict, save_recipe
from mcit.errors import CheckpointError, McitError
from mcit.evaluation.metrics import continual_metrics
from mcit.methods.base import RunContext, TaskData, build_method
from mcit.methods.lora import add_lora
from mcit.models.loading import load_base
from mcit.runs.checkpoint import CheckpointWriter

from .fake_hub import FakeHub

TASKS = ["shape", "mc-color"]
MATRIX = [[10.0, 20.0], [80.0, 25.0], [60.0, 90.0]]
TOKEN = "hf_" + "Xp4" * 12  # made up, for the fake hub
REPO = "someone/tiny-export"
ROOT = Path(__file__).resolve().parents[2]


# --- building run folders the way the runner writes them ------------------------------------------------------------


def make_recipe(run_dir: Path, method: str = "lora_ft", **model):
    return recipe_from_dict({
        "name": "export-test", "output_dir": str(run_dir), "seed": 0,
        "model": {"name_or_path": "builtin:tiny-llava-init", **model},
        "benchmark": {"card": "synthcit-mini", "tasks": TASKS},
        "method": {"name": method, "lora": {"r": 4, "alpha": 8}},
    })


def perturb(model, keep, seed: int, scale: float = 0.05) -> None:
    """Stand-in for training: move the named parameters (LoRA B starts at zero, so the adapter does something)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep(name):
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def save_stage(run_dir: Path, model, method, stage: int, label: str) -> Path:
    writer = CheckpointWriter(run_dir / "checkpoints" / f"stage-{stage:02d}-{label}")
    writer.tensors("model.safetensors", method.state_tensors(model))
    writer.tensors("method.safetensors", {})
    writer.json("method.json", {"method": method.name, "stage": stage, "task": label, "state": {}})
    if hasattr(model, "peft_config"):
        model.save_pretrained(writer.tmp / "adapter")
    return writer.commit()


def write_results(run_dir: Path, recipe, tasks=TASKS, matrix=MATRIX) -> None:
    stage_tasks = [[], *[[i] for i in range(len(matrix) - 1)]]
    complete = all(row is not None for row in matrix)
    results = {"recipe": recipe.name, "method": recipe.method.name, "benchmark": "synthcit-mini", "seed": 0,
               "tasks": tasks, "stages": ["zero-shot", *tasks][:len(matrix)], "stage_tasks": stage_tasks,
               "matrix": matrix, "metrics": continual_metrics(matrix, stage_tasks) if complete else {}}
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "env.json").write_text(json.dumps({"python": sys.version.split()[0]}))


def new_run(tmp_path_factory, name: str, adapters: tuple[str, ...] = (), method: str = "lora_ft", **model):
    """A run folder with its recipe, and the model as the method sets it up (or with the named LoRA experts)."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    run_dir.mkdir()
    recipe = make_recipe(run_dir, method, **model)
    save_recipe(recipe, run_dir / "recipe.yaml")
    model, processor = load_base(recipe.model)
    method = build_method(recipe)
    if adapters:
        for adapter in adapters:
            model = add_lora(model, recipe, adapter)
    else:
        model = method.attach(model, RunContext(processor=processor, recipe=recipe, data=TaskData([], {}, {})))
    return run_dir, recipe, method, model.eval(), processor


def model_inputs(processor) -> dict:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    return dict(processor(images=image, text="USER: <image>\nWhat shape is shown? ASSISTANT:", return_tensors="pt"))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """lora_ft with the projector trained: two stages, each with different weights."""
    run_dir, recipe, method, model, processor = new_run(tmp_path_factory, "lora-run", train_projector=True)
    inputs = model_inputs(processor)
    stage_logits = {}
    for stage, label in enumerate(TASKS, start=1):
        perturb(model, lambda n: "lora_" in n or "multi_modal_projector" in n, seed=stage)
        save_stage(run_dir, model, method, stage, label)
        stage_logits[stage] = logits(model, inputs)
    write_results(run_dir, recipe)
    return SimpleNamespace(run=run_dir, inputs=inputs, logits=stage_logits, processor=processor)


@pytest.fixture(scope="module")
def experts_run(tmp_path_factory):
    """Two task experts `task_0`, `task_1` (as task-specific-expert methods save them) in the last stage."""
    run_dir, recipe, method, model, processor = new_run(tmp_path_factory, "experts-run", ("task_0", "task_1"))
    perturb(model, lambda n: "lora_" in n, seed=3)
    save_stage(run_dir, model, method, 2, "mc-color")
    write_results(run_dir, recipe)
    model.base_model.set_adapter(["task_0", "task_1"])  # both active: the forward sums the two experts
    return SimpleNamespace(run=run_dir, inputs=model_inputs(processor), summed=logits(model, model_inputs(processor)))


@pytest.fixture(scope="module")
def reglora_run(tmp_path_factory):
    """RegLoRA: each stage's LoRA is merged into the base weights, which model.safetensors then holds."""
    run_dir, recipe, method, model, processor = new_run(tmp_path_factory, "reglora-run", method="reglora")
    data = TaskData(TASKS, {}, {})
    for stage, label in enumerate(TASKS, start=1):
        perturb(model, lambda n: "lora_" in n, seed=10 + stage)
        method.after_task(model, stage - 1, [stage - 1], data)  # W <- W + dW, fresh LoRA
        if stage == len(TASKS):  # an adapter that is not zero, so that both parts of the export must add up
            perturb(model, lambda n: "lora_" in n, seed=20)
        save_stage(run_dir, model, method, stage, label)
    write_results(run_dir, recipe)
    inputs = model_inputs(processor)
    return SimpleNamespace(run=run_dir, inputs=inputs, logits=logits(model, inputs))


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A full fine-tune (the tiny base's pretraining): no adapter, model.safetensors holds the whole state dict."""
    run_dir, recipe, method, model, _ = new_run(tmp_path_factory, "pretrain-run", full_finetune=True,
                                                train_projector=True)
    perturb(model, lambda n: "language_model.layers.0." in n or "multi_modal_projector" in n, seed=4)
    save_stage(run_dir, model, method, 1, "scenes")
    write_results(run_dir, recipe, tasks=["scenes"], matrix=[None, [55.0]])  # zero_shot: false -> row 0 is null
    return SimpleNamespace(run=run_dir, state={k: v.clone() for k, v in model.state_dict().items()})


def export(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def load_adapter_plainly(folder: Path):
    """What a user does with the export: the base model from transformers, the adapter from PEFT."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from mcit.models.tiny import resolve_builtin

    config = json.loads((folder / "adapter_config.json").read_text())
    base = LlavaForConditionalGeneration.from_pretrained(resolve_builtin(config["base_model_name_or_path"]))
    return PeftModel.from_pretrained(base, str(folder)).eval()


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- adapters -------------------------------------------------------------------------------------------------------


def test_cli_export_and_push_in_a_fresh_process_matches_the_in_run_model(lora_run, tmp_path):
    out = tmp_path / "export"
    with FakeHub(token=TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "mcit.cli", "export", str(lora_run.run), "--out", str(out),
                               "--push", REPO, "--license", "apache-2.0"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pushed: {hub.url}/{REPO}/commit/" in proc.stdout
    assert set(files_under(out)) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml",
                                     "PROVENANCE.json"}
    assert hub.files(REPO) == files_under(out)  # exactly the export folder, byte for byte
    for folder in (out, lora_run.run):
        for name, data in files_under(folder).items():
            assert TOKEN.encode() not in data, name
    assert TOKEN not in proc.stdout + proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # not safetensors' 0600

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-llava-init"  # not the local cache path
    assert config["modules_to_save"] == ["multi_modal_projector"]  # the trained projector travels with it
    model = load_adapter_plainly(out)
    torch.testing.assert_close(logits(model, lora_run.inputs), lora_run.logits[2], rtol=0, atol=1e-5)
    assert not torch.allclose(lora_run.logits[1], lora_run.logits[2], atol=1e-3)  # the stages really differ

    card = (out / "README.md").read_text()
    assert "| mc-color | 60.00 | 90.00 |" in card and "license: apache-2.0" in card
    assert "library_name: peft" in card and "shape → mc-color" in card
    # the tiny base's own format (no BOS, its template closes answers with </s>), rendered from its processor
    assert "## Prompt format" in card and "ASSISTANT: A red circle.</s>\n```" in card and "<s>USER" not in card
    recipe_text = (out / "recipe.yaml").read_text()
    assert "lora_ft" in recipe_text
    for text in (card, recipe_text, (out / "PROVENANCE.json").read_text()):
        assert str(lora_run.run) not in text and str(tmp_path) not in text


def test_exported_adapter_matches_mcits_own_stage_loader(lora_run, tmp_path):
    from mcit.workflows.load import load_checkpoint
    out = tmp_path / "export"
    export(lora_run.run, "--out", out)
    model, processor, _, _ = load_checkpoint(str(lora_run.run / "checkpoints" / "stage-02-mc-color"))
    inputs = model_inputs(processor)
    torch.testing.assert_close(logits(load_adapter_plainly(out), inputs), logits(model.eval(), inputs),
                               rtol=0, atol=1e-5)


def test_an_earlier_stage_exports_its_own_weights_and_results(lora_run, tmp_path):
    out = tmp_path / "stage1"
    assert export(lora_run.run, "--out", out, "--stage", "1") == 0
    torch.testing.assert_close(logits(load_adapter_plainly(out), lora_run.inputs), lora_run.logits[1],
                               rtol=0, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "| shape | 80.00 | 25.00 |" in card and "90.00" not in card  # the card stops at stage 1
    assert json.loads((out / "PROVENANCE.json").read_text())["stage"] == 1
    # the stage folder itself is accepted too, and gives the same adapter
    again = tmp_path / "stage1-again"
    export(lora_run.run / "checkpoints" / "stage-01-shape", "--out", again)
    assert load_file(again / "adapter_model.safetensors").keys() == load_file(out / "adapter_model.safetensors").keys()
    for key, value in load_file(out / "adapter_model.safetensors").items():
        assert torch.equal(value, load_file(again / "adapter_model.safetensors")[key])


def test_task_experts_need_a_merge_and_cat_is_their_exact_sum(experts_run, tmp_path):
    with pytest.raises(McitError, match=r"holds 2 adapters \(task_0, task_1\).*--merge"):
        export(experts_run.run, "--out", tmp_path / "none")
    assert not (tmp_path / "none").exists()  # nothing half-written

    out = tmp_path / "cat"
    export(experts_run.run, "--out", out, "--merge", "cat")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # ranks concatenated, scaling folded in
    torch.testing.assert_close(logits(load_adapter_plainly(out), experts_run.inputs), experts_run.summed,
                               rtol=0, atol=1e-4)

    out = tmp_path / "copa"
    export(experts_run.run, "--out", out, "--merge", "copa")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert "merged into this single adapter with **copa**" in (out / "README.md").read_text()
    assert json.loads((out / "PROVENANCE.json").read_text())["merge"]["adapters"] == ["task_0", "task_1"]
    assert torch.isfinite(logits(load_adapter_plainly(out), experts_run.inputs)).all()

    with pytest.raises(McitError, match="3 merge weights for 2 adapters"):
        export(experts_run.run, "--out", tmp_path / "bad", "--merge", "linear", "--weights", "0.2,0.3", "0.5")
    with pytest.raises(McitError, match="--adapters: task_9 not in"):
        export(experts_run.run, "--out", tmp_path / "bad", "--adapters", "task_9")
    out = tmp_path / "one"
    export(experts_run.run, "--out", out, "--adapters", "task_1")  # one expert, as trained
    saved = load_file(experts_run.run / "checkpoints" / "stage-02-mc-color" / "adapter" / "task_1" /
                      "adapter_model.safetensors")
    exported = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def test_base_weights_merged_by_the_method_travel_in_the_adapter_and_the_full_model(reglora_run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "adapter"
    export(reglora_run.run, "--out", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12)  # two merged rank-4 updates + the current rank-4 LoRA
    torch.testing.assert_close(logits(load_adapter_plainly(out), reglora_run.inputs), reglora_run.logits,
                               rtol=0, atol=1e-4)
    fold = json.loads((out / "PROVENANCE.json").read_text())["merge"]["base_changes"]
    assert fold["rank"] == 8 and fold["residual"] < 1e-5 and fold["matrices"] == 28

    full = tmp_path / "full"
    export(reglora_run.run, "--out", full, "--full")
    model = LlavaForConditionalGeneration.from_pretrained(full).eval()
    torch.testing.assert_close(logits(model, reglora_run.inputs), reglora_run.logits, rtol=0, atol=1e-4)


def test_lowrank_factors_are_exact_at_the_rank_of_the_change():
    from mcit.export.merge import lowrank_factors

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(9, 3, generator=gen) @ torch.randn(3, 7, generator=gen)  # rank 3
    A, B, residual = lowrank_factors(delta, 5)  # more rank than needed: zero-padded
    assert A.shape == (5, 7) and B.shape == (9, 5) and residual < 1e-6
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-5)
    singular = torch.linalg.svdvals(delta)
    _, _, residual = lowrank_factors(delta, 2)
    assert residual == pytest.approx(float(singular[2] / singular.norm()), rel=1e-4)
    # a big matrix goes through the randomized range finder: still exact at its rank, and reproducible
    big = torch.randn(300, 6, generator=gen) @ torch.randn(6, 500, generator=gen)
    A, B, residual = lowrank_factors(big, 8)
    assert residual < 1e-5 and torch.equal(A, lowrank_factors(big, 8)[0])
    _, _, residual = lowrank_factors(big, 5)
    singular = torch.linalg.svdvals(big)
    assert residual == pytest.approx(float(singular[5] / singular.norm()), rel=1e-3)


# --- full models ----------------------------------------------------------------------------------------------------


def test_full_export_loads_with_transformers_and_gives_the_merged_logits(lora_run, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "full"
    export(lora_run.run, "--out", out, "--full")
    assert not (out / "adapter_config.json").exists()
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = model_inputs(processor)
    torch.testing.assert_close(logits(model, inputs), lora_run.logits[2], rtol=0, atol=1e-4)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "LoRA merged into the weights" in card


def test_full_fine_tune_becomes_a_transformers_model_in_the_asked_dtype(pretrain_run, tmp_path):
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(McitError, match="full_finetune=true.*add --full"):
        export(pretrain_run.run, "--out", tmp_path / "adapter")
    out = tmp_path / "tiny-llava"
    export(pretrain_run.run, "--out", out, "--full", "--dtype", "bf16")
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert loaded.keys() == pretrain_run.state.keys()
    for key, value in pretrain_run.state.items():
        assert loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], value.to(torch.bfloat16)), key
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())
    provenance = json.loads((out / "PROVENANCE.json").read_text())
    assert (provenance["artifact"], provenance["dtype"], provenance["recipe"]) == ("full", "bf16", "export-test")
    card = (out / "README.md").read_text()
    assert "every language-model weight fine-tuned" in card and "| zero-shot | – |" in card


# --- push and refusals ----------------------------------------------------------------------------------------------


def test_push_flags_reach_the_given_endpoint(lora_run, tmp_path, monkeypatch, capsys):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "pushed"
    with FakeHub(token=TOKEN) as hub:
        export(lora_run.run, "--out", out, "--push", REPO, "--private", "--token", TOKEN, "--endpoint", hub.url)
    assert hub.repos[REPO]["private"] is True
    assert hub.files(REPO) == files_under(out)
    assert f'PeftModel.from_pretrained(base, "{REPO}")' not in hub.files(REPO)["README.md"].decode()  # no hub base
    assert TOKEN not in "".join(capsys.readouterr())


def test_refusals_are_clear(lora_run, tmp_path):
    with pytest.raises(McitError, match="neither a run folder"):
        export(tmp_path, "--out", tmp_path / "x")
    with pytest.raises(McitError, match=r"no such stage; its stages are stage-01-shape, stage-02-mc-color"):
        export(lora_run.run, "--out", tmp_path / "x", "--stage", "7")
    with pytest.raises(McitError, match="zero-shot base model"):
        export(lora_run.run, "--out", tmp_path / "x", "--stage", "0")

    broken = tmp_path / "broken-run"
    shutil.copytree(lora_run.run, broken)
    (broken / "checkpoints" / "stage-02-mc-color" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="stage-02-mc-color has no MANIFEST.json: the checkpoint is incomplete"):
        export(broken, "--out", tmp_path / "x")
    export(broken, "--out", tmp_path / "x", "--stage", "1")  # the earlier, complete stage still exports

    with pytest.raises(McitError, match="already exists and is not empty.*--force"):
        export(lora_run.run, "--out", tmp_path / "x", "--stage", "1")
    (tmp_path / "x" / "stale.txt").write_text("from an earlier export")
    export(lora_run.run, "--out", tmp_path / "x", "--stage", "1", "--force")
    assert not (tmp_path / "x" / "stale.txt").exists()
    with pytest.raises(McitError, match="inside the run's checkpoints"):
        export(lora_run.run, "--out", lora_run.run / "checkpoints" / "export", "--force")
