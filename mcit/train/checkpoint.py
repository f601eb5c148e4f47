"""Checkpoints that survive `kill -9`: written to a temporary folder, fsynced, then renamed into place.

A checkpoint folder holds `model.safetensors` (the method's model tensors), `method.safetensors` + `method.json` (the
method's own state), optionally `optimizer.safetensors` + `trainer.json` (mid-task step checkpoints) and, last,
`MANIFEST.json` with the size and SHA-256 of every file. A folder without a valid manifest is half-written and never
loaded. Nothing is pickled: optimizer state is flattened into safetensors with its structure in JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mcit.errors import CheckpointError

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


class CheckpointWriter:
    """Collect files in a temporary sibling folder; `commit()` writes the manifest and renames it into place."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(tensors, self.tmp / name)

    def json(self, name: str, data: Any) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2), encoding="utf-8")

    def commit(self) -> Path:
        files = {}
        for path in sorted(self.tmp.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[str(path.relative_to(self.tmp))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        write_json_atomic(self.tmp / MANIFEST, {"files": files})
        _fsync_dir(self.tmp)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if old.exists():
            shutil.rmtree(old)
        return self.final


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    for name, info in files.items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        if verify_hashes and _sha256(path) != info["sha256"]:
            return False
    return True


def open_checkpoint(folder: Path) -> Path:
    folder = Path(folder)
    if not is_complete(folder, verify_hashes=True):
        raise CheckpointError(f"{folder} is not a complete checkpoint (missing or damaged {MANIFEST}); it was "
                              "probably interrupted while being written and cannot be loaded")
    return folder


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.is_file() else {}


def clean_stale(folder: Path) -> None:
    """Remove temporary folders left by a killed writer."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# --- optimizer state without pickle ---------------------------------------------------------------------------------

def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for index, entries in state["state"].items():
        layout[str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
                layout[str(index)][key] = "tensor"
            else:
                layout[str(index)][key] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"state": layout, "param_groups": groups}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state = {}
    for index, entries in meta["state"].items():
        state[int(index)] = {key: tensors[f"{index}.{key}"] if value == "tensor" else value
                             for key, value in entries.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch_rng": torch.get_rng_state()}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "torch_rng" in tensors:
        torch.set_rng_state(tensors["torch_rng"])
