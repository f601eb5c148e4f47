"""Export one stage of a run: find the stage, check the output folder, write the export, optionally push it.

The folder is assembled in a hidden sibling and renamed into place at the end (`atomic_folder`), so a failed export
leaves nothing half-written behind (and never a folder that a later push would upload). What the folder holds is
described in mcit.export.build.
"""

from __future__ import annotations

from pathlib import Path

from mcit.errors import McitError
from mcit.export.build import export_experts, export_stage, make_shareable
from mcit.export.hub import push_folder
from mcit.export.stage import Stage, find_stage
from mcit.runs.folder import RunFolder
from mcit.runtime.files import atomic_folder


def export_run(source: str | Path, out: str | Path, *, stage: str | int = "last", merge: str | None = None,
               weights: list[float] | None = None, density: float | None = None, adapters: list[str] | None = None,
               full: bool = False, experts: bool = False, dtype: str | None = None, base_model: str | None = None,
               license: str | None = None, force: bool = False, push: str | None = None, private: bool = False,
               token: str | None = None, endpoint: str | None = None) -> Path:
    """Export `stage` ("last" or a 1-based number) of the run or stage folder `source` into `out`; print where it
    went and, with `push` (a Hub repo id), upload it. Returns `out`. Errors are McitError subclasses.

    `out` must be new or empty unless `force`. `experts` copies the stage unchanged (every expert, router and method
    state); otherwise one adapter is written (several merged with `merge`), or with `full` the merged full model.
    """
    if experts and (full or merge or weights or adapters):
        raise McitError("--experts exports the stage unchanged; it cannot be combined with --full, --merge, "
                        "--weights or --adapters")
    found = find_stage(source, stage)
    out = Path(out).expanduser().resolve()
    _check_out(out, force, found)
    with atomic_folder(out) as tmp:
        if experts:
            provenance = export_experts(found, tmp, base_model=base_model, license=license, repo_id=push)
        else:
            provenance = export_stage(found, tmp, merge=merge, weights=weights, density=density, adapters=adapters,
                                      full=full, dtype=dtype, base_model=base_model, license=license, repo_id=push)
        make_shareable(tmp)
    what = "expert set" if experts else "full model" if full else "adapter"
    merged = f", merged with {provenance['merge']['method']}" if provenance.get("merge") else ""
    print(f"exported the {what} of stage {found.number} ({found.label}){merged}: {out}")
    if push:
        url = push_folder(out, push, private=private, token=token, endpoint=endpoint)
        print(f"pushed: {url}")
    return out


def _check_out(out: Path, force: bool, stage: Stage) -> None:
    if out.exists() and not out.is_dir():
        raise McitError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise McitError(f"--out {out} already exists and is not empty; choose a new folder or add --force to replace")
    # replacing the run (or a folder holding it) would delete the checkpoint being exported
    checkpoints = RunFolder(stage.run_dir).checkpoints
    if out == stage.run_dir or out in stage.run_dir.parents or out == checkpoints or checkpoints in out.parents:
        raise McitError(f"--out {out} would overwrite or sit inside the run's checkpoints; choose another folder")
