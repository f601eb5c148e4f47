"""A non-editable install carries its data: the wheel built from this tree, installed into a bare folder and imported
from a folder outside the checkout, finds the shipped data cards, the DeepSpeed templates and the tiny base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, mcit
from mcit.data.cards import available_cards, load_card
from mcit.evaluation.suites import available_suites, load_suite
from mcit.models.tiny import ASSET_DIR
from mcit.train.deepspeed import build_ds_config
from mcit.workflows.train import deepspeed_template

card = load_card("ucit")
template = deepspeed_template("zero3")
config = build_ds_config(template, micro_batch=2, grad_accum=3, lr=1e-4, weight_decay=0.0, grad_clip=1.0, bf16=False,
                         zero_stage=None)
print(json.dumps({"mcit": mcit.__file__, "card": str(card.path), "tasks": card.task_names, "cards": available_cards(),
                  "template": str(template), "stage": config["zero_optimization"]["stage"],
                  "micro_batch": config["train_micro_batch_size_per_gpu"],
                  "tiny": (ASSET_DIR / "model.safetensors").is_file(), "suites": available_suites(),
                  "suite": str(load_suite("synthcit-heldout").path)}))
"""


@pytest.mark.slow
def test_installed_wheel_ships_cards_and_deepspeed_templates(tmp_path):
    # Build from a copy of what the wheel is made of, so the build writes no build/ or egg-info into the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    # The suites live in eval/ at the root; mcit/assets/eval links there and the build must follow the link.
    shutil.copytree(ROOT / "mcit", source / "mcit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    symlinks=True)
    shutil.copytree(ROOT / "eval", source / "eval")
    assert (source / "mcit" / "assets" / "eval").is_symlink()
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    "--quiet"], cwd=source, check=True, timeout=600)
    wheel = next(dist.glob("mcit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_cards = sorted(p.name for p in (ROOT / "mcit" / "assets" / "data_cards").glob("*.yaml"))
    assert shipped_cards and {f"mcit/assets/data_cards/{n}" for n in shipped_cards} <= names
    assert {f"mcit/assets/launch/{n}.json" for n in ("zero2", "zero3", "zero3_offload")} <= names

    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("MCIT_UCIT_ROOT", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = target / "mcit"
    assert Path(found["mcit"]).is_relative_to(installed)
    assert Path(found["card"]).is_relative_to(installed) and found["tasks"][0] == "ImageNet-R"
    assert sorted(f"{n}.yaml" for n in found["cards"]) == shipped_cards
    assert Path(found["template"]).is_relative_to(installed)
    assert found["stage"] == 3 and found["micro_batch"] == 2
    assert found["tiny"]
    assert found["suites"] == sorted(p.stem for p in (ROOT / "eval").glob("*.yaml"))
    assert Path(found["suite"]).is_relative_to(installed)
