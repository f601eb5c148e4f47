"""Parts 5 and 6: whole continual runs of every method (`mcit train` on the SynthCIT recipes), instrumented.

A run is the runner exactly as `mcit train` runs it, in a child process (`python -m bench.runs worker`), with two
read-only probes on `StageTrainer`: before a stage trains, its trainable parameters are counted and the process's
peak-RSS mark is reset (`/proc/self/clear_refs`); after it trains, the optimizer's state tensors are summed and the
stage's peak RSS is read (`VmHWM`). The parent adds the bytes of every stage checkpoint, the runner's own wall-clock
records (`timing.json`) and the results (`results.json`).

Recipes: `recipes/synthcit/<method>.yaml`, unchanged.
Sizes: `full` = the recipes unchanged (six tasks, 2,000 training / 200 test samples each); `small` =
`benchmark.max_train` / `benchmark.max_test` cut down (the card loader's seeded subsets), otherwise unchanged.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, read_json, run_child, write_json

METHODS = ("lora_ft", "joint", "replay", "hide", "disco", "moelora", "olora", "reglora", "sefe")
SIZES: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "seeds": [0, 1, 2]},
    "small": {"overrides": ["benchmark.max_train=128", "benchmark.max_test=24"], "seeds": [0, 1, 2]},
    "tiny": {"overrides": ["benchmark.max_train=32", "benchmark.max_test=4", "benchmark.tasks=[shape,mc-color,count]",
                           "train.batch_size=16"], "seeds": [0]},
}


def recipe_for(method: str) -> tuple[Path, list[str]]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return REPO / "recipes" / "synthcit" / f"{method}.yaml", []


# --- the child ------------------------------------------------------------------------------------------------------

def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def worker(recipe_path: str, overrides: list[str], out: Path) -> None:
    import torch

    from mcit.config import load_recipe
    from mcit.train import loop
    from mcit.workflows.train import ContinualRunner

    stages: list[dict[str, Any]] = []
    build, run = loop.StageTrainer._build, loop.StageTrainer.run

    def probed_build(self):
        engine, optimizer, scheduler = build(self)
        self._bench_optimizer = optimizer
        return engine, optimizer, scheduler

    def probed_run(self):
        reset = _reset_peak()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        stats = run(self)
        seconds = time.perf_counter() - t0
        state = [t for s in self._bench_optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        stages.append({
            "stage": self.stage + 1, "label": self.label, "steps": stats["steps"], "samples": len(self.encoded),
            "train_seconds": round(seconds, 3), "trainable_params": sum(p.numel() for p in trainable),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
            "peak_rss_mib": _vm_hwm_mib() if reset else None,
            "total_params": sum(p.numel() for p in self.model.parameters()),
        })
        return stats

    loop.StageTrainer._build, loop.StageTrainer.run = probed_build, probed_run
    recipe = load_recipe(recipe_path, overrides)
    t0 = time.perf_counter()
    ContinualRunner(recipe).run()
    write_json(out, {"stages": stages, "wall_seconds": round(time.perf_counter() - t0, 2),
                     "threads": torch.get_num_threads(),
                     "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


# --- the parent -----------------------------------------------------------------------------------------------------

def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_folder(workdir: Path, size: str, method: str, seed: int) -> Path:
    return workdir / f"runs-{size}" / f"{method}-s{seed}"


def is_finished(folder: Path) -> bool:
    results = read_json(folder / "results.json")
    return bool(results and results.get("metrics")) and (folder / "probe.json").is_file()


def run_method(workdir: Path, size: str, method: str, seed: int, threads: int, log: Path) -> dict[str, Any]:
    """One instrumented run (skipped when the folder already holds a finished one); returns its record."""
    folder = run_folder(workdir, size, method, seed)
    recipe, extra = recipe_for(method)
    overrides = [*extra, *SIZES[size]["overrides"], f"seed={seed}", f"output_dir={folder}"]
    if not is_finished(folder):
        if folder.exists():
            import shutil

            shutil.rmtree(folder)  # a half-finished run of an earlier invocation: start clean (timings stay honest)
        folder.parent.mkdir(parents=True, exist_ok=True)
        run_child("bench.runs", ["worker", str(recipe), *overrides], folder / "probe.json", threads, log=log,
                  timeout=6 * 3600)
    return collect(folder, method, seed, size, [str(recipe.relative_to(REPO)), *extra, *SIZES[size]["overrides"]])


def collect(folder: Path, method: str, seed: int, size: str, command: list[str]) -> dict[str, Any]:
    results = read_json(folder / "results.json")
    timing = read_json(folder / "timing.json") or {}
    probe = read_json(folder / "probe.json") or {}
    stage_dirs = sorted((folder / "checkpoints").glob("stage-*"))
    ckpt_bytes = [_folder_bytes(d) for d in stage_dirs]
    eval_seconds = {label: round(sum(v for v in tasks.values() if isinstance(v, int | float)), 2)
                    for label, tasks in timing.get("eval", {}).items()}
    import yaml

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) if (folder / "recipe.yaml").is_file() else {}
    train = {k: recipe.get("train", {}).get(k) for k in ("epochs", "lr", "batch_size", "max_steps")}
    return {"method": method, "seed": seed, "size": size, "folder": str(folder), "command": command, "train": train,
            "tasks": results["tasks"], "stages": results["stages"], "matrix": results["matrix"],
            "metrics": results["metrics"], "metrics_constrained": results.get("metrics_constrained", {}),
            "final_superficial": results.get("final_superficial"), "final_essential": results.get("final_essential"),
            "router_accuracy": results.get("router", {}).get("accuracy"), "threads": probe.get("threads"),
            "probe": probe, "checkpoint_bytes": ckpt_bytes, "eval_seconds": eval_seconds,
            "runner_timing": timing.get("train", {})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one instrumented continual run (child of `python -m bench`)")
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    worker(args.recipe, args.overrides, Path(args.out))


if __name__ == "__main__":
    main()
