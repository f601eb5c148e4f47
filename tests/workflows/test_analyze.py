"""`mcit analyze cka` end to end on two random-init tiny LLaVAs and a small SynthCIT build: the arguments
(mcit.cli.analyze) and the work (mcit.workflows.analyze)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mcit.analysis.cka import CKAResult
from mcit.cli import analyze as analyze_cli
from mcit.data import synthcit
from mcit.data.cards import load_card
from mcit.errors import DataError, EvalError
from mcit.models import tiny
from mcit.workflows import analyze

SMALL = synthcit.BuildConfig(seed=0, n_train=32, n_test=8, n_pretrain=8, n_pretrain_test=8)
TEXT_LAYERS = tiny.TinyLlavaSpec().text_layers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny models that differ only in their init seed, and a card over a small SynthCIT build."""
    base = tmp_path_factory.mktemp("analyze")
    root = synthcit.build(base / "synthcit", SMALL, progress=False)
    # A card without `generator:` so loading it never rebuilds SynthCIT at its default size over this small build.
    card = yaml.safe_load(load_card("synthcit-mini").path.read_text())
    card.pop("generator", None)
    card["root"] = str(root)
    card_path = base / "card.yaml"
    card_path.write_text(yaml.safe_dump(card))
    a = tiny.create_init(base / "model-a", seed=1)
    b = tiny.create_init(base / "model-b", seed=2)
    return {"card": str(card_path), "a": str(a), "b": str(b), "base": base}


def run_analyze(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcit analyze")
    analyze_cli.add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


def test_identical_models_agree_and_the_expand_layer_is_the_least_similar(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_analyze(["cka", "--checkpoints", setup["a"], setup["a"], setup["b"], "--benchmark", setup["card"],
                        "--tasks", "shape,count", "--samples", "4", "--kind", "rbf", "--out", str(out)])
    assert code == 0
    result = CKAResult.from_json((out / "cka.json").read_text())
    assert result.tasks == ["model-a", "model-a#2", "model-b"]
    assert result.layers == list(range(TEXT_LAYERS))
    assert result.n_samples == 8 and result.kind == "rbf"
    for layer in result.layers:
        matrix = result.matrices[layer]
        assert matrix[0][1] == pytest.approx(1.0, abs=1e-6)  # the same model twice on the same probe set
        assert matrix[0][2] < 0.999  # a differently initialised model is not the same representation
        assert matrix[0][2] == pytest.approx(matrix[1][2], abs=1e-6)
    lowest = min(result.layers, key=lambda layer: result.mean_cross_task[layer])
    probe = json.loads((out / "probe.json").read_text())
    assert probe["expand_layers"] == [lowest]
    assert probe["tasks"] == ["shape", "count"]
    assert [t for t, _ in probe["probe"]] == ["shape"] * 4 + ["count"] * 4
    assert (out / "cka_heatmaps.png").stat().st_size > 1000
    assert (out / "cka_mean_cross_task.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"expand layers (lowest mean CKA): [{lowest}]" in printed
    assert f"| {lowest} | {result.mean_cross_task[lowest]:.4f} | * |" in printed


def test_linear_kind_default_out_and_expand_count(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"],
                        "--tasks", "mc-color", "--samples", "5", "--kind", "linear", "--expand", "2",
                        "--labels", "color-a,color-b", "--batch-size", "2"])
    assert code == 0
    result = CKAResult.from_json((tmp_path / "analysis" / "cka.json").read_text())
    assert result.kind == "linear" and result.tasks == ["color-a", "color-b"] and result.n_samples == 5
    assert len(result.matrices) == TEXT_LAYERS
    ranked = sorted(result.layers, key=lambda layer: result.mean_cross_task[layer])
    probe = json.loads((tmp_path / "analysis" / "probe.json").read_text())
    assert probe["expand_layers"] == sorted(ranked[:2])


def test_probe_set_is_the_same_on_every_call(setup):
    _, first = analyze.load_probe_samples(setup["card"], ["shape", "count"], 3, None)
    _, again = analyze.load_probe_samples(setup["card"], ["shape", "count"], 3, None)
    assert [s.id for s in first] == [s.id for s in again]
    assert [s.task for s in first] == ["shape"] * 3 + ["count"] * 3


def test_bad_arguments_fail_before_loading_models(setup):
    with pytest.raises(EvalError, match="at least 2"):
        run_analyze(["cka", "--checkpoints", setup["a"], "--benchmark", setup["card"]])
    with pytest.raises(EvalError, match="--labels"):
        run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"],
                     "--labels", "x,x"])
    with pytest.raises(DataError, match="nope"):
        run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"],
                     "--tasks", "nope"])
    with pytest.raises(EvalError, match="--samples"):
        run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"],
                     "--samples", "0"])
    with pytest.raises(EvalError, match="--expand"):
        run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"], "--expand", "0"])
    with pytest.raises(SystemExit):  # --expand and --threshold are exclusive
        run_analyze(["cka", "--checkpoints", setup["a"], setup["b"], "--benchmark", setup["card"],
                     "--expand", "1", "--threshold", "0.5"])


def test_labels_and_default_out_for_stage_folders(tmp_path):
    stage = tmp_path / "run" / "checkpoints" / "stage-02-count"
    stage.mkdir(parents=True)
    (stage / "method.json").write_text("{}")
    assert analyze.checkpoint_label(str(stage)) == "count"
    assert analyze.default_out_dir(str(stage)) == tmp_path / "run" / "analysis"
    plain = tmp_path / "stage-01-look-alike"  # named like a stage but not one: the folder name is kept
    plain.mkdir()
    assert analyze.checkpoint_label(str(plain)) == "stage-01-look-alike"
    assert analyze.default_out_dir(str(plain)) == Path("analysis")
    assert analyze.checkpoint_label("builtin:tiny-llava-init") == "tiny-llava-init"
    assert analyze.unique_labels(["x", "y", "x", "x"]) == ["x", "y", "x#2", "x#3"]


def test_mcit_analyze_cka_subprocess(setup, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "analyze", "cka", "--checkpoints", setup["a"],
                           setup["b"], "--benchmark", setup["card"], "--tasks", "shape", "--samples", "3",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "expand layers" in proc.stdout
    assert len(CKAResult.from_json((out / "cka.json").read_text()).layers) == TEXT_LAYERS
    proc = subprocess.run([sys.executable, "-m", "mcit.cli", "analyze", "cka", "--checkpoints", setup["a"],
                           "--benchmark", setup["card"]], capture_output=True, text=True)
    assert proc.returncode == 2 and "at least 2" in proc.stderr
