"""Safe loading: nothing mcit loads can run code. Weights and method state travel as safetensors, any torch.load is
weights_only, no pickle, YAML only through safe_load, remote code only when a recipe asks for it, and a checkpoint
whose files do not match its manifest (sizes and SHA-256) is refused with an error naming the file."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from mcit.config import ModelConfig
from mcit.errors import CheckpointError
from mcit.runs import checkpoint as ckpt
from tests.reliability.cli_runs import mcit, recipe_for

PACKAGE = Path(__file__).resolve().parents[2] / "mcit"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loading(source: str) -> list[str]:
    """Every place in `source` that could unpickle or execute data it loads."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
    for node, name, kwargs in _calls(tree):
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if name.endswith("torch.load") and not _is_true(kwargs.get("weights_only")):
            found.append(where)
        elif name.endswith(("torch.save", "yaml.unsafe_load", "yaml.full_load")) or name in ("eval", "exec"):
            found.append(where)
        elif name.endswith("yaml.load") and "SafeLoader" not in ast.unparse(kwargs.get("Loader", ast.Constant(""))):
            found.append(where)
        elif name.endswith("np.load") and _is_true(kwargs.get("allow_pickle")):
            found.append(where)
        elif _is_true(kwargs.get("trust_remote_code")):
            found.append(where)
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = ("import pickle\nfrom joblib import load\nimport torch, yaml, numpy as np\ntorch.load('x')\n"
           "torch.load('x', weights_only=False)\nyaml.load(t)\nnp.load('a', allow_pickle=True)\ntorch.save(m, 'x')\n"
           "f(trust_remote_code=True)\n")
    assert len(unsafe_loading(bad)) == 8
    good = "import torch, yaml\ntorch.load('x', weights_only=True)\nyaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\n"
    assert unsafe_loading(good) == []


def test_the_package_never_unpickles_or_executes_what_it_loads() -> None:
    found = {str(p.relative_to(PACKAGE.parent)): unsafe_loading(p.read_text(encoding="utf-8"))
             for p in sorted(PACKAGE.rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) > 50  # the scan really covered the package


def test_remote_code_is_trusted_only_when_the_recipe_says_so(monkeypatch) -> None:
    import transformers

    from mcit.models import loading

    seen: list[tuple[str, object]] = []

    def spy(owner, name):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            seen.append((f"{owner.__name__}.{name}", kwargs.get("trust_remote_code", "absent")))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)

    spy(transformers.AutoConfig, "from_pretrained")
    spy(transformers.AutoProcessor, "from_pretrained")
    spy(transformers.LlavaForConditionalGeneration, "from_pretrained")
    loading.load_base(ModelConfig(name_or_path="builtin:tiny-llava"))
    assert {name for name, _ in seen} == {"AutoConfig.from_pretrained", "AutoProcessor.from_pretrained",
                                          "LlavaForConditionalGeneration.from_pretrained"}
    assert all(value is False for _, value in seen), seen
    seen.clear()
    loading.load_base(ModelConfig(name_or_path="builtin:tiny-llava", trust_remote_code=True))
    assert seen and all(value is True for _, value in seen), seen


def test_run_folders_hold_only_safetensors_and_text(reference_run) -> None:
    suffixes = {p.suffix for p in (reference_run / "checkpoints").rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".md"}, suffixes
    assert ".safetensors" in suffixes


# --- the manifest: sizes and SHA-256 checked on load ----------------------------------------------------------------


def _stage(tmp_path) -> Path:
    writer = ckpt.CheckpointWriter(tmp_path / "stage-01-x")
    writer.tensors("model.safetensors", {"w": torch.arange(4096, dtype=torch.float32)})
    writer.json("method.json", {"stage": 1})
    return writer.commit()


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_truncated_file_is_refused_naming_it(tmp_path) -> None:
    folder = _stage(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"damaged checkpoint: model\.safetensors has \d+ bytes but "
                                              r"MANIFEST\.json records \d+ \(truncated"):
        ckpt.is_complete(folder)  # the resume check (sizes only) already refuses it
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.open_checkpoint(folder)


def test_a_tampered_file_of_the_same_size_is_refused_naming_it(tmp_path) -> None:
    folder = _stage(tmp_path)
    _flip_byte(folder / "model.safetensors")
    assert ckpt.is_complete(folder)  # sizes agree ...
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its SHA-256 in MANIFEST\.json"):
        ckpt.open_checkpoint(folder)  # ... the hashes do not


@pytest.mark.parametrize("manifest", ["{not json", '{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}',
                                      '{"files": {"model.safetensors": {"bytes": "many"}}}', '{"files": []}'],
                         ids=["unreadable", "outside", "malformed-entry", "not-a-mapping"])
def test_a_forged_manifest_is_refused(tmp_path, manifest) -> None:
    folder = _stage(tmp_path)
    (folder / "MANIFEST.json").write_text(manifest)
    with pytest.raises(CheckpointError, match="damaged checkpoint: MANIFEST.json"):
        ckpt.open_checkpoint(folder)


def test_a_missing_file_is_refused(tmp_path) -> None:
    folder = _stage(tmp_path)
    (folder / "method.json").unlink()
    with pytest.raises(CheckpointError, match=r"method\.json is missing"):
        ckpt.open_checkpoint(folder)


@pytest.fixture
def run_copy(tmp_path, reference_run, synthcit_root) -> tuple[Path, Path]:
    """The reference run copied to a new output_dir, with the recipe for it."""
    recipe = recipe_for(tmp_path, synthcit_root)
    shutil.copytree(reference_run, tmp_path / "out")
    return tmp_path / "out", recipe


@pytest.mark.slow
def test_resuming_from_a_tampered_stage_checkpoint_is_refused(run_copy) -> None:
    out, recipe = run_copy
    (out / "recipe.yaml").unlink()  # it names the reference's output_dir
    stage = out / "checkpoints" / "stage-02-mc-color"
    _flip_byte(stage / "model.safetensors")
    (out / "results.json").unlink()  # so that the run must load the stage to evaluate it again
    proc = mcit("train", str(recipe))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mcit train: error: ") and str(stage) in last
    assert "model.safetensors does not match its SHA-256" in last


@pytest.mark.slow
def test_resuming_with_a_truncated_file_in_an_earlier_stage_is_refused(run_copy) -> None:
    out, recipe = run_copy
    (out / "recipe.yaml").unlink()
    path = out / "checkpoints" / "stage-01-shape" / "method.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    proc = mcit("train", str(recipe))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stage-01-shape: damaged checkpoint: method.safetensors has" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_mcit_eval_refuses_a_damaged_stage_checkpoint(run_copy, damage, capsys) -> None:
    from mcit.cli import main

    out, _ = run_copy
    stage = out / "checkpoints" / "stage-01-shape"
    path = stage / "adapter" / "adapter_model.safetensors"
    if damage == "tamper":
        _flip_byte(path)
    else:
        path.write_bytes(path.read_bytes()[:-7])
    code = main(["eval", "--checkpoint", str(stage), "--benchmark", "synthcit-mini", "--tasks", "shape"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mcit eval: error: ")
    assert "adapter/adapter_model.safetensors" in err[0]
    assert not (out / "eval").exists() and not (stage / "eval-synthcit-mini").exists()


def test_rebuilding_a_stage_hashes_each_file_once(run_copy, monkeypatch) -> None:
    import mcit.runs.checkpoint as ckpt
    from mcit.config import load_recipe
    from mcit.workflows.load import rebuild_stage

    out, _ = run_copy
    stage = out / "checkpoints" / "stage-02-mc-color"
    hashed: list[str] = []
    real = ckpt.sha256
    monkeypatch.setattr(ckpt, "sha256", lambda path: hashed.append(Path(path).name) or real(path))
    rebuild_stage(stage, load_recipe(out / "recipe.yaml"))
    files = json.loads((stage / ckpt.MANIFEST).read_text())["files"]
    assert sorted(hashed) == sorted(Path(name).name for name in files)  # each file once, none twice
