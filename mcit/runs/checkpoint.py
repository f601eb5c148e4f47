"""Checkpoints that survive `kill -9`: written to a temporary folder, fsynced, then renamed into place.

A checkpoint folder holds `model.safetensors` (the method's model tensors), `method.safetensors` + `method.json` (the
method's own state), optionally `optimizer.safetensors` + `trainer.json` (mid-task step checkpoints) and, last,
`MANIFEST.json` with the size and SHA-256 of every file. A folder without a valid manifest is half-written and never
loaded. Nothing is pickled: optimizer state is flattened into safetensors with its structure in JSON. (One exception:
a step checkpoint under DeepSpeed holds the engine's own files, `deepspeed/`, which are torch.save pickles; the loop
loads them only from the run's own folder after `open_checkpoint` verified every file, mcit/train/loop.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mcit.errors import CheckpointError
from mcit.runtime import dist, failpoints
from mcit.runtime.files import fsync_dir, save_tensors, sha256, temporary_sibling, write_json_atomic

MANIFEST = "MANIFEST.json"


class CheckpointWriter:
    """Collect files in a temporary sibling folder; `commit()` writes the manifest and renames it into place.

    A write that fails (full disk, permissions) removes the temporary folder, leaves the previous checkpoint of the
    same name where it was, and raises one CheckpointError saying so.
    """

    def __init__(self, final: Path, *, collective: bool = False):
        """With `collective` (a collective call under DeepSpeed: every rank constructs it), all ranks write into rank
        0's temporary folder, and `commit()`, also collective, waits until every rank has written its files before
        rank 0 lists them in the manifest and publishes the folder. The ranks must share a filesystem."""
        self.final = Path(final)
        self.collective = collective and dist.is_distributed()
        self.tmp = temporary_sibling(self.final)
        if self.collective:  # the name rank 0's temporary_sibling gives, so that every rank writes into one folder
            self.tmp = self.final.with_name(f".{self.final.name}.tmp-{_main_pid()}")
        self._old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if dist.is_main() or not self.collective:
            with self.guard():
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                self.tmp.mkdir(parents=True)
        if self.collective:
            dist.barrier()

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        with self.guard():
            save_tensors(tensors, self.tmp / name)

    def json(self, name: str, data: Any) -> None:
        with self.guard():
            (self.tmp / name).write_text(json.dumps(data, indent=2), encoding="utf-8")

    def commit(self) -> Path:
        if self.collective:
            dist.barrier()  # every rank's files are written: only now may rank 0 hash them and publish
            if not dist.is_main():
                dist.barrier()
                return self.final
        self._publish()
        if self.collective:
            dist.barrier()  # no rank goes on (and may be killed) before the checkpoint is in place
        return self.final

    def _publish(self) -> None:
        with self.guard():
            files = {}
            for path in sorted(self.tmp.rglob("*")):
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
                    files[str(path.relative_to(self.tmp))] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
            write_json_atomic(self.tmp / MANIFEST, {"files": files})
            fsync_dir(self.tmp)
            failpoints.hit("checkpoint.write")
            if self.final.exists():
                os.replace(self.final, self._old)
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        shutil.rmtree(self._old, ignore_errors=True)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn an OSError while writing into a CheckpointError, after putting the previous checkpoint back."""
        try:
            yield
        except OSError as exc:
            if self._old.exists() and not self.final.exists():
                os.replace(self._old, self.final)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write checkpoint {self.final} ({exc.strerror or exc}); nothing was replaced and the "
                "previous checkpoints are intact: free disk space (or fix permissions) and run the same command "
                "again to resume") from exc


def _main_pid() -> int:
    """Rank 0's process id, on every rank (collective; sent as a tensor, not a pickled object)."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64, device=dist.collective_device())
    torch.distributed.broadcast(pid, src=0)
    return int(pid.item())


def _damaged(folder: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{folder}: damaged checkpoint: {problem}; it cannot be loaded. Restore the folder from a "
                           "backup, or delete it and run the same command again to recompute that stage")


def _manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    def damaged(problem: str) -> CheckpointError:
        return _damaged(folder, problem)

    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"{MANIFEST} is unreadable ({type(exc).__name__})") from exc
    if not isinstance(files, dict):
        raise damaged(f"{MANIFEST} 'files' is not a mapping")
    root = folder.resolve()
    for name, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise damaged(f"{MANIFEST} entry {name!r} lacks bytes/sha256")
        if root not in (folder / name).resolve().parents:
            raise damaged(f"{MANIFEST} lists {name!r}, which is outside the checkpoint folder")
    return files


def is_complete(folder: Path, verify_hashes: bool = False) -> bool:
    """False for a folder without a manifest (a write that was interrupted: never loaded, recomputed instead).

    A folder WITH a manifest was published whole, so a missing, resized (or, with `verify_hashes`, modified) file
    means damage after the fact: that raises CheckpointError naming the file rather than silently retraining.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return False
    for name, info in _manifest_files(folder).items():
        path = folder / name
        problem = None
        if not path.is_file():
            problem = f"{name} is missing"
        elif path.stat().st_size != info["bytes"]:
            problem = (f"{name} has {path.stat().st_size} bytes but {MANIFEST} records {info['bytes']} "
                       "(truncated or replaced)")
        elif verify_hashes and sha256(path) != info["sha256"]:
            problem = f"{name} does not match its SHA-256 in {MANIFEST} (modified after it was written)"
        if problem:
            raise _damaged(folder, problem)
    return True


def open_checkpoint(folder: Path) -> Path:
    """`folder` after checking every file against its manifest (sizes and SHA-256); CheckpointError otherwise."""
    folder = Path(folder)
    if not is_complete(folder, verify_hashes=True):
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST}); it was probably interrupted "
                              "while being written and cannot be loaded")
    return folder


def manifest_files(folder: Path) -> list[str]:
    """The files a verified checkpoint consists of (relative names, as its manifest lists them)."""
    return sorted(_manifest_files(open_checkpoint(folder)))


def clean_stale(folder: Path) -> None:
    """Remove temporary folders left by a killed writer; a checkpoint moved aside for its replacement goes back."""
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and ".old-" in path.name:
                final = folder / path.name[1:].rsplit(".old-", 1)[0]
                if not final.exists() and path.is_dir():  # killed between the two renames of commit()
                    os.replace(path, final)
        for path in folder.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
