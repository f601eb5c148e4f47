"""Parts 5 and 6: whole continual runs of every method (`mcit train` on the SynthCIT recipes), instrumented.

A run is the runner exactly as `mcit train` runs it, in a child process (`python -m bench.runs worker`), with two
read-only probes on `StageTrainer`: before a stage trains, its trainable parameters are counted and the process's
peak-RSS mark is reset (`/proc/self/clear_refs`); after it trains, the optimizer's state tensors are summed and the
stage's peak RSS is read (`VmHWM`). The parent adds the bytes of every stage checkpoint, the runner's own wall-clock
records (`timing.json`) and the results (`results.json`).

Recipes: `recipes/synthcit/<method>.yaml`, unchanged (with `--model`, only `model.name_or_path` is overridden).
Sizes: `full` = the recipes unchanged (six tasks, 2,000 training / 200 test samples each); `small` =
`benchmark.max_train` / `benchmark.max_test` cut down (the card loader's seeded subsets), otherwise unchanged.

Two architectures (docs/MODELS.md): the same methods on several bases, into one committed result file, and the
table of docs/MODELS.md rewritten from it:

    python -m bench.runs quality --model builtin:tiny-llava --model builtin:tiny-qwen2vl \
        --methods lora_ft,disco,sefe --size small --seeds 0 --out bench/results/two-architectures.json
    python -m bench.runs table bench/results/two-architectures.json --doc docs/MODELS.md
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_WORKDIR,
    REPO,
    fill_block,
    machine,
    other_load,
    read_json,
    run_child,
    sha256,
    write_json,
)

METHODS = ("lora_ft", "joint", "replay", "hide", "disco", "moelora", "olora", "reglora", "asd_only", "sefe", "mr_lora",
           "cl_moe", "modalprompt", "keeplora", "smolora", "hide_top")
# a method's recipe is recipes/synthcit/<method>.yaml; a variant is another method's recipe with overrides
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "hide_top": ("hide", ["method.expand_layers=[-1]"]),  # HiDe-LLaVA's own layout: top layer routed, the rest fused
}
SIZES: dict[str, dict[str, Any]] = {
    "full": {"overrides": [], "seeds": [0, 1, 2]},
    "small": {"overrides": ["benchmark.max_train=128", "benchmark.max_test=24"], "seeds": [0, 1, 2]},
    "tiny": {"overrides": ["benchmark.max_train=32", "benchmark.max_test=4", "benchmark.tasks=[shape,mc-color,count]",
                           "train.batch_size=16"], "seeds": [0]},
}


def recipe_for(method: str) -> tuple[Path, list[str]]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    recipe, overrides = VARIANTS.get(method, (method, []))
    return REPO / "recipes" / "synthcit" / f"{recipe}.yaml", list(overrides)


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


def model_slug(model: str) -> str:
    """A folder name for a base model: `builtin:tiny-qwen2vl` -> `tiny-qwen2vl`, a path -> its last part."""
    return Path(model.removeprefix("builtin:").rstrip("/")).name or "model"


def run_folder(workdir: Path, size: str, method: str, seed: int, model: str | None = None) -> Path:
    """`runs-<size>/<method>-s<seed>` for the recipes' own base; `runs-<size>/<model>/<method>-s<seed>` for another."""
    parent = workdir / f"runs-{size}"
    return (parent / model_slug(model) if model else parent) / f"{method}-s{seed}"


def is_finished(folder: Path) -> bool:
    results = read_json(folder / "results.json")
    return bool(results and results.get("metrics")) and (folder / "probe.json").is_file()


def run_method(workdir: Path, size: str, method: str, seed: int, threads: int, log: Path,
               model: str | None = None, resume: bool = False) -> dict[str, Any]:
    """One instrumented run (skipped when the folder already holds a finished one); returns its record. `model`:
    the base (`model.name_or_path`) instead of the recipe's. `resume`: continue a half-finished run in its folder
    (`mcit train` resumes from its last finished step; the results equal an uninterrupted run's) instead of moving it
    aside and starting again; its probe then times only the resumed part and says so (`"resumed": true`)."""
    folder = run_folder(workdir, size, method, seed, model)
    recipe, extra = recipe_for(method)
    if model:
        extra = [*extra, f"model.name_or_path={model}"]
    overrides = [*extra, *SIZES[size]["overrides"], f"seed={seed}", f"output_dir={folder}"]
    resumed = resume and folder.is_dir() and not is_finished(folder)
    if not is_finished(folder):
        if folder.exists() and not resumed:  # a half-finished run of an earlier invocation: start clean (timings stay honest), but
            # keep it aside rather than delete it: a run whose probe was lost (its parent killed) still holds results
            folder.rename(folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
        folder.parent.mkdir(parents=True, exist_ok=True)
        run_child("bench.runs", ["worker", str(recipe), *overrides], folder / "probe.json", threads, log=log,
                  timeout=6 * 3600)
        if resumed:
            write_json(folder / "probe.json", {**(read_json(folder / "probe.json") or {}), "resumed": True})
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
    return {"method": method, "seed": seed, "size": size, "model": (recipe.get("model") or {}).get("name_or_path"),
            "folder": str(folder), "command": command, "train": train,
            "tasks": results["tasks"], "stages": results["stages"], "matrix": results["matrix"],
            "metrics": results["metrics"], "metrics_constrained": results.get("metrics_constrained", {}),
            "final_superficial": results.get("final_superficial"), "final_essential": results.get("final_essential"),
            "router_accuracy": results.get("router", {}).get("accuracy"), "threads": probe.get("threads"),
            "probe": probe, "checkpoint_bytes": ckpt_bytes, "eval_seconds": eval_seconds,
            "runner_timing": timing.get("train", {}), "layer_cka": layer_cka(folder)}


def layer_cka(folder: Path) -> dict[str, Any] | None:
    """The last in-run layer CKA a run wrote (HiDe: `analysis/hide-cka-stage-NN.json`, after each stage from the
    second on): its stage, kernel, mean cross-task CKA per layer and the layers it expanded. None when there is none."""
    files = sorted((folder / "analysis").glob("*-cka-stage-[0-9][0-9].json"))
    if not files:
        return None
    from mcit.analysis.cka import CKAResult

    result = CKAResult.from_json(files[-1].read_text())
    chosen = read_json(files[-1].with_suffix(".expand.json")) or {}
    return {"stage": int(files[-1].stem.rsplit("-", 1)[1]), "kind": result.kind,
            "mean_cross_task": {str(k): round(v, 4) for k, v in result.mean_cross_task.items()},
            "expand_layers": chosen.get("expand_layers")}


# --- several bases: `python -m bench.runs quality --model ...` ------------------------------------------------------

def _key(record: dict[str, Any]) -> tuple:
    return record.get("model"), record["size"], record["method"], record["seed"]


def _say(text: str) -> None:
    print(f"[bench.runs {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def base_weights(model: str) -> dict[str, Any]:
    """The base's folder and the sha256 of its weights (what a row of the result file was computed from)."""
    from mcit.models.loading import resolve_path

    folder = Path(resolve_path(model))
    weights = folder / "model.safetensors"
    provenance = read_json(folder / "PROVENANCE.json") or {}
    return {"folder": str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder),
            "model_safetensors_sha256": sha256(weights) if weights.is_file() else None,
            "provenance_sha256": provenance.get("model_safetensors_sha256"), "kind": provenance.get("kind")}


def quality(models: list[str], methods: list[str], seeds: list[int], size: str, out: Path, *,
            workdir: Path = DEFAULT_WORKDIR, threads: int = 1, jobs: int = 1,
            collect_only: bool = False, resume: bool = False,
            stop_after: float | None = None) -> dict[str, Any]:
    """Every model x method x seed at `size` (finished runs in `workdir` are reused), merged into the result file
    `out`: rows of other models, sizes or methods already there are kept, so the file collects several invocations
    (e.g. the `small` table of two bases and `full` runs of one). The file is rewritten after each run.

    `threads` per run, `jobs` runs side by side: on a shared 2-core machine one thread per run is faster than two
    (two threads wait on each other whenever another process holds a core).

    `collect_only`: add the finished runs of the plan to `out` and start none (e.g. runs finished by another
    invocation that wrote elsewhere, or by one that was stopped). `resume`: continue half-finished runs in place
    (see `run_method`). `stop_after`: minutes after which no further run starts (runs already going finish), so a long
    table runs in parts of bounded length; the next invocation of the same command carries on."""
    data = read_json(out) or {"runs": []}
    records = {_key(r): r for r in data.get("runs", [])}
    bases = dict(data.get("bases", {}))
    log = workdir / "children.log"
    lock = threading.Lock()
    started = time.time()

    def save() -> None:
        order = {m: i for i, m in enumerate(METHODS)}
        rows = sorted(records.values(), key=lambda r: (r["size"], str(r.get("model")), order.get(r["method"], 99),
                                                       r["seed"]))
        write_json(out, {"description": "SynthCIT recipes, unchanged but for model.name_or_path, on several bases "
                                        "(bench/runs.py quality)", "runs": rows, "bases": bases,
                         "machine": data.get("machine"), "load": data.get("load"),
                         "seconds": round(time.time() - started, 1),
                         "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})

    def one(model: str, method: str, seed: int) -> None:
        finished = is_finished(run_folder(workdir, size, method, seed, model))
        if stop_after is not None and not finished and time.time() - started > 60 * stop_after:
            _say(f"{size}: {method} on {model}, seed {seed} not started (--stop-after {stop_after:g} min)")
            return
        _say(f"{size}: {method} on {model}, seed {seed}")
        t0 = time.time()
        try:
            record = run_method(workdir, size, method, seed, threads, log, model, resume)
        except RuntimeError as exc:  # one failed run must not lose the others
            record = {"method": method, "seed": seed, "size": size, "model": model,
                      "error": str(exc).splitlines()[-1]}
        record["model"] = model
        with lock:
            records[_key(record)] = record
            save()
        _say(f"{size}: {method} on {model}, seed {seed} done in {time.time() - t0:.0f} s")

    for model in models:
        bases[model] = base_weights(model)
    # method-major: a part cut short by --stop-after leaves whole methods done rather than one seed of each
    plan = [(model, method, seed) for model in models for method in methods for seed in seeds]
    if collect_only:
        plan = [job for job in plan if is_finished(run_folder(workdir, size, job[1], job[2], job[0]))]
    runs = any(not is_finished(run_folder(workdir, size, method, seed, model)) for model, method, seed in plan)
    if runs:  # an invocation that only collects finished runs keeps the record of the one that ran them
        data["machine"] = {**machine(), "threads_per_run": threads, "jobs": jobs}
        data["load"] = {"before": other_load()}
    if jobs > 1:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda job: one(*job), plan))
    else:
        for job in plan:
            one(*job)
    if runs:
        data["load"]["after"] = other_load()
    save()
    return read_json(out)


def table(data: dict[str, Any], methods: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Markdown tables of a result file: per size, one row per base x method (the seeds it ran; mean ± sd over them),
    then the final row of the accuracy matrix per task and the papers' orderings among the methods shown. `methods`:
    only these (in this order); default every method of the file."""
    from bench.report import _claim_rows, _pm, _value

    runs = data["runs"]
    if methods is not None:
        order = {m: i for i, m in enumerate(methods)}
        runs = sorted((r for r in runs if r["method"] in order), key=lambda r: order[r["method"]])
    lines: list[str] = []
    for size in sorted({r["size"] for r in runs}, key=lambda s: list(SIZES).index(s)):
        rows = [r for r in runs if r["size"] == size]
        groups: dict[tuple[str, str], list[dict]] = {}
        for run in rows:
            groups.setdefault((run.get("model") or "?", run["method"]), []).append(run)
        done = [r for r in rows if not r.get("error")]
        tasks = done[0]["tasks"] if done else []
        seeds = sorted({r["seed"] for r in rows})
        lines += [f"Size `{size}` ({', '.join(SIZES[size]['overrides']) or 'the recipes unchanged'}); seed"
                  f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; tasks {' → '.join(tasks)}.", "",
                  "| base | method | seeds | MFT | MFN | MAA | BWT | superficial % | essential % | router acc. % | "
                  "constrained MFN |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (model, method), items in groups.items():
            ok = [r for r in items if not r.get("error")]
            if not ok:
                lines.append(f"| {model_slug(model)} | {method} | - | failed: {items[0]['error']} |" + " |" * 7)
                continue
            router = [r["router_accuracy"][-1] if r.get("router_accuracy") else None for r in ok]
            metric = [[r["metrics"].get(k) for r in ok] for k in ("MFT", "MFN", "MAA", "BWT")]
            ran = ", ".join(str(r["seed"]) for r in sorted(ok, key=lambda r: r["seed"]))
            lines.append(f"| {model_slug(model)} | {method} | {ran} | {' | '.join(_pm(m) for m in metric)} | "
                         f"{_pm([_value(r, 'superficial') for r in ok])} | {_pm([_value(r, 'essential') for r in ok])} | "
                         f"{_pm(router)} | {_pm([r['metrics_constrained'].get('MFN') for r in ok])} |")
        lines += ["", f"Final row per task (size `{size}`{', mean over seeds' if len(seeds) > 1 else ''}):", "",
                  f"| base | method | {' | '.join(tasks)} |", "|---|---|" + "---:|" * len(tasks)]
        for (model, method), items in groups.items():
            ok = [r for r in items if not r.get("error")]
            if ok:
                cols = [statistics.fmean(r["matrix"][-1][i] for r in ok) for i in range(len(tasks))]
                lines.append(f"| {model_slug(model)} | {method} | {' | '.join(f'{c:.1f}' for c in cols)} |")
        for model in dict.fromkeys(model for model, _ in groups):
            claims = _claim_rows({method: [r for r in items if not r.get("error")]
                                  for (m, method), items in groups.items() if m == model})
            if claims:
                lines += ["", f"Orderings the papers claim, on {model_slug(model)} (size `{size}`): advantage = how "
                          "much better the first method is; *reproduces* = positive in every seed.", "",
                          "| claim | pair | metric | advantage of the first, mean (per seed) | verdict |",
                          "|---|---|---|---|---|", *claims]
        lines.append("")
    return lines


def markers(block: str) -> tuple[str, str]:
    """The begin/end lines of a generated block named `block` in a doc."""
    return f"<!-- {block}:begin (python -m bench.runs table) -->", f"<!-- {block}:end -->"


def write_table(data: dict[str, Any], doc: Path, block: str = "two-architectures",
                methods: list[str] | None = None) -> None:
    """Replace the lines between the block's markers in `doc` with `table(data, methods)`."""
    fill_block(doc, *markers(block), table(data, methods))


# The generated tables of the docs: block name -> (doc, result file, the methods it shows or None for all).
# `python -m bench report` rewrites every one of them; tests/bench/test_report_regenerates.py checks them.
DOC_TABLES: dict[str, tuple[str, str, tuple[str, ...] | None]] = {
    "methods-experts": ("docs/METHODS-EXPERTS.md", "quality-methods.json",
                        ("lora_ft", "joint", "replay", "moelora", "hide", "hide_top", "disco")),
    "methods-regularization": ("docs/METHODS-REGULARIZATION.md", "quality-methods.json",
                               ("lora_ft", "olora", "reglora", "asd_only", "sefe")),
    "methods-more": ("docs/METHODS-MORE.md", "quality-methods.json",
                     ("lora_ft", "moelora", "olora", "hide", "disco", "mr_lora", "cl_moe", "modalprompt", "keeplora",
                      "smolora")),
    "synthcit-methods": ("docs/SYNTHCIT.md", "quality-methods.json", ("joint", "disco", "hide", "hide_top", "lora_ft")),
    "two-architectures": ("docs/MODELS.md", "two-architectures.json", None),
}


def doc_tables(results: Path, repo: Path = REPO) -> list[tuple[Path, str, list[str]]]:
    """(doc, block, lines) of every generated doc table, from the result files in `results`."""
    out = []
    for block, (doc, result, methods) in DOC_TABLES.items():
        data = read_json(results / result)
        if data is None:
            raise SystemExit(f"{results / result}: missing; the {block} table of {doc} is generated from it")
        out.append((repo / doc, block, table(data, methods)))
    return out


def write_doc_tables(results: Path, repo: Path = REPO) -> None:
    for path, block, lines in doc_tables(results, repo):
        fill_block(path, *markers(block), lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.runs",
                                     description="instrumented continual runs (child of `python -m bench`), and the "
                                                 "same runs on several bases (docs/MODELS.md)")
    modes = parser.add_subparsers(dest="mode", required=True)
    child = modes.add_parser("worker", help="one instrumented run (what `python -m bench quality` starts)")
    child.add_argument("recipe")
    child.add_argument("overrides", nargs="*")
    child.add_argument("--out", required=True)
    several = modes.add_parser("quality", help="methods x seeds on each --model, into one result file")
    several.add_argument("--model", action="append", required=True,
                         help="a base model (builtin:tiny-qwen2vl, a folder); repeat for several")
    several.add_argument("--methods", default="lora_ft,disco,sefe", help="comma-separated, or `all`")
    several.add_argument("--seeds", default="0")
    several.add_argument("--size", default="small", choices=list(SIZES))
    several.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "two-architectures.json")
    several.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    several.add_argument("--threads", type=int, default=1, help="threads per run")
    several.add_argument("--jobs", type=int, default=1, help="runs side by side")
    several.add_argument("--collect-only", action="store_true",
                         help="add the plan's finished runs to --out and start none")
    several.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                         help="start no further run after this many minutes (runs going on finish; run the same "
                              "command again to carry on)")
    several.add_argument("--resume", action="store_true",
                         help="continue half-finished runs in place instead of starting them again (their probe "
                              "times only the resumed part)")
    render = modes.add_parser("table", help="print a result file's tables, or write them into --doc")
    render.add_argument("result", type=Path)
    render.add_argument("--doc", type=Path, default=None)
    render.add_argument("--block", default="two-architectures", help="the name in the doc's <!-- NAME:begin ... --> "
                                                                       "and <!-- NAME:end --> markers")
    render.add_argument("--methods", default=None, help="comma-separated: only these methods (default: every one, "
                                                        "or the block's own list in DOC_TABLES)")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        worker(args.recipe, args.overrides, Path(args.out))
    elif args.mode == "quality":
        if args.methods == "all":
            args.methods = ",".join(METHODS)
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        quality(args.model, args.methods.split(","), [int(s) for s in args.seeds.split(",")], args.size, args.out,
                workdir=args.workdir, threads=args.threads, jobs=args.jobs, collect_only=args.collect_only, resume=args.resume, stop_after=args.stop_after)
        print("\n".join(table(read_json(args.out))))
    else:
        data = read_json(args.result)
        if data is None:
            parser.error(f"{args.result}: no such result file")
        methods = args.methods.split(",") if args.methods else None
        if methods is None and args.block in DOC_TABLES:
            methods = DOC_TABLES[args.block][2]
        if args.doc:
            write_table(data, args.doc, args.block, methods)
        else:
            print("\n".join(table(data, methods)))


if __name__ == "__main__":
    main()
