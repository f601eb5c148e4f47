"""`python -m bench`: run the benchmarks and write docs/BENCHMARKS.md.

    python -m bench                         # everything, quality at `small` size (39 minutes measured on 2 free cores)
    python -m bench quality --quality full  # the quality table at full size (9 methods x 3 seeds; hours)
    python -m bench train router            # selected parts
    python -m bench report                  # rewrite docs/BENCHMARKS.md from the stored results

Parts: train (throughput against transformers Trainer + PEFT), mfu, eval (batched against one-at-a-time
generation), matrix (every checkpoint of a run on every task, mcit's suite path against an MCITlib-style evaluation,
for the quickstart and for lora_ft on the 6-task card; trains them first when missing), router (routed against merged inference), memory (per-method memory, storage and time per task, read
from the quality runs' seed 0 or run at `small` size), quality (every method x seeds), image_cache (host memory of
40,000 distinct 336-px images through the bounded image cache, against the unbounded one), ranking (peak memory of
likelihood ranking against the number of candidates, chunked against all at once), memory_estimate (estimated GPU
memory and wall time of the UCIT recipes on LLaVA-1.5-7B, also written to bench/results/ and docs/DISTRIBUTED.md).
Each part stores its numbers in `<results>/<part>.json` (default bench/results/, committed: `python -m bench report`
rewrites docs/BENCHMARKS.md from them byte for byte); run folders, child outputs and logs go to `<workdir>` (default
runs/bench/, git-ignored). Finished quality runs are reused, so an interrupted `quality` resumes where it stopped.
`--smoke` writes its results under `<workdir>/smoke` unless `--results` is given, so it never replaces measured ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import runs
from bench.common import (
    DEFAULT_WORKDIR,
    REPO,
    RESULTS,
    TIMED_THREADS,
    child_env,
    machine,
    other_load,
    read_json,
    run_child,
    synthcit_samples,
    write_json,
)

PARTS = ("train", "mfu", "eval", "matrix", "router", "quality", "memory", "image_cache", "ranking", "memory_estimate")


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def part_train(cfg) -> dict[str, Any]:
    """A B C D A B C D ...: mcit, mcit with packed dropout masks, Trainer defaults, Trainer tuned, alternating in one
    session; with the recipes' LoRA dropout, then without it."""
    rounds = []
    for dropout in ("0.05", "0"):  # the recipes' LoRA dropout (headline), then the diagnostic pair without masks
        # mcit with packed dropout masks (method.lora.dropout_masks) beside the default ones; no masks at dropout 0
        sides = [("mcit", "bernoulli"), ("mcit", "packed"), ("trainer", None), ("trainer-tuned", None)]
        if dropout == "0":
            sides = [s for s in sides if s[1] != "packed"]
        for r in range(cfg.rounds):
            for side, masks in sides:
                label = side + (f" ({masks} masks)" if masks == "packed" else "")
                _say(f"train: dropout {dropout}, round {r + 1}/{cfg.rounds}, {label}")
                args = [side, "--task", cfg.train_task, "--steps", str(cfg.train_steps), "--batch", str(cfg.batch),
                        "--warmup", str(cfg.warmup), "--threads", str(cfg.threads), "--dropout", dropout]
                if masks:
                    args += ["--dropout-masks", masks]
                if side == "mcit" and r == cfg.rounds - 1:
                    args.append("--breakdown")  # after the timed steps: does not touch the timing
                out = cfg.workdir / "children" / f"train-{side}{'-packed' if masks == 'packed' else ''}-d{dropout}-{r}.json"
                rounds.append({"round": r, **run_child("bench.train_speed", args, out, cfg.threads, log=cfg.log)})
    return {"task": cfg.train_task, "steps": cfg.train_steps, "batch": cfg.batch, "warmup": cfg.warmup,
            "runs": rounds}


def part_mfu(cfg) -> dict[str, Any]:
    _say("mfu: matmul peak")
    sizes = "256,512" if cfg.smoke else "1024,2048,4096"
    peak = run_child("bench.train_speed", ["peak", "--sizes", sizes, "--threads", str(cfg.threads)],
                     cfg.workdir / "children" / "peak.json", cfg.threads, log=cfg.log)
    steps = []
    # the shipped base, then a random-init base with a wider language model; there also bf16 with packed dropout masks
    plan = [(None, "none", "bernoulli"), (None, "bf16", "bernoulli"), (cfg.mfu_width, "none", "bernoulli"),
            (cfg.mfu_width, "bf16", "bernoulli"), (cfg.mfu_width, "bf16", "packed")]
    for width, autocast, masks in plan:
        _say(f"mfu: mcit steps with autocast {autocast}, {masks} masks, FLOPs counted"
             + (f", width {width}" if width else ""))
        steps_n = cfg.mfu_wide_steps if width else cfg.train_steps  # a wide step is ~10x longer: MFU is a rate
        args = ["mcit", "--task", cfg.train_task, "--steps", str(steps_n), "--batch", str(cfg.batch),
                "--warmup", str(cfg.warmup), "--autocast", autocast, "--dropout-masks", masks, "--flops",
                "--threads", str(cfg.threads)]
        if width:
            args += ["--width", str(width)]
        out = cfg.workdir / "children" / f"mfu-{autocast}-{masks}{f'-w{width}' if width else ''}.json"
        steps.append(run_child("bench.train_speed", args, out, cfg.threads, log=cfg.log))
    return {"peak": peak, "steps": steps}


def part_eval(cfg) -> dict[str, Any]:
    _say("eval: batched against one-at-a-time generation")
    args = ["--per-task", str(cfg.eval_per_task), "--train-steps", str(cfg.eval_train_steps),
            "--threads", str(cfg.threads)]
    return run_child("bench.eval_speed", args, cfg.workdir / "children" / "eval.json", cfg.threads, log=cfg.log)


def _finished_run(folder: Path) -> bool:
    from mcit.runs.folder import RunFolder

    run = RunFolder(folder)
    try:
        return run.recipe.is_file() and len(run.stage_dirs()) == len(run.task_names())
    except (FileNotFoundError, ValueError, KeyError):
        return False


def matrix_runs(cfg) -> list[tuple[str, Path]]:
    """The finished runs whose whole matrix part 3b evaluates, trained first (untimed) where missing: the README
    quickstart (4 tasks) and sequential LoRA on the 6-task SynthCIT card at full size (the quality part's seed-0
    lora_ft run, reused when it exists)."""
    quickstart = cfg.workdir / "matrix" / ("quickstart-smoke" if cfg.smoke else "quickstart")
    if not _finished_run(quickstart):
        _say(f"matrix: training the quickstart into {quickstart} (untimed)")
        overrides = [f"output_dir={quickstart}"] + (
            ["benchmark.max_train=16", "benchmark.max_test=2", "benchmark.tasks=[shape,count]"] if cfg.smoke else [])
        with open(cfg.log, "a") as log:
            subprocess.run([sys.executable, "-m", "mcit", "train",
                            str(REPO / "recipes" / "synthcit" / "quickstart.yaml"), *overrides],
                           cwd=REPO, env=child_env(cfg.threads), check=True, stdout=subprocess.DEVNULL, stderr=log)
    size = "tiny" if cfg.smoke else "full"
    card_run = runs.run_folder(cfg.workdir, size, "lora_ft", 0, "builtin:tiny-llava")
    if not runs.is_finished(card_run):
        _say(f"matrix: training lora_ft at size {size} into {card_run} (untimed)")
        runs.run_method(cfg.workdir, size, "lora_ft", 0, cfg.threads, cfg.log, "builtin:tiny-llava")
    return [("quickstart", quickstart), ("synthcit-6", card_run)]


def part_matrix(cfg) -> dict[str, Any]:
    """Part 3b: every checkpoint of a run on every task, MCITlib-style (rebuilt per checkpoint, one `generate` per
    sample) against mcit's suite path, in one child per run; predictions are compared there and not kept here."""
    results = []
    for name, folder in matrix_runs(cfg):
        _say(f"matrix: {name}, both sides")
        args = ["--run", str(folder), "--threads", str(cfg.threads)]
        if cfg.matrix_per_task:
            args += ["--per-task", str(cfg.matrix_per_task)]
        data = run_child("bench.eval_matrix", args, cfg.workdir / "children" / f"matrix-{name}.json", cfg.threads,
                         log=cfg.log)
        for side in data.get("sides", {}).values():
            side.pop("predictions", None)
        data["run"] = str(folder.resolve().relative_to(REPO)) if folder.resolve().is_relative_to(REPO) else str(folder)
        results.append({"name": name, **data})
    return {"runs": results}


def part_router(cfg) -> dict[str, Any]:
    results = []
    plan = [("merged", 1, None), ("lora", 1, None)] + [(v, t, None) for v in ("hide", "disco")
                                                      for t in cfg.router_experts]
    top = max(cfg.router_experts)  # the same at a wider language model: the overhead is a small-model effect?
    plan += [("merged", 1, cfg.router_width), ("lora", 1, cfg.router_width), ("hide", top, cfg.router_width),
             ("disco", top, cfg.router_width)]
    for variant, experts, width in plan:
        _say(f"router: {variant} with {experts} expert(s)" + (f", width {width}" if width else ""))
        args = [variant, "--experts", str(experts), "--samples", str(cfg.router_samples), "--repeats",
                str(cfg.router_repeats), "--proto-samples", str(cfg.proto_samples), "--threads", str(cfg.threads)]
        if width:
            args += ["--width", str(width)]
        out = cfg.workdir / "children" / f"router-{variant}-{experts}{f'-w{width}' if width else ''}.json"
        results.append(run_child("bench.router_speed", args, out, cfg.threads, log=cfg.log))
    return {"runs": results}


def part_image_cache(cfg) -> dict[str, Any]:
    """The bounded cache (the recipe default) over every image, then the unbounded one over the first few thousand:
    its resident memory grows linearly, so its line is fitted and extrapolated to the full count."""
    _say(f"image_cache: {cfg.cache_images:,} images through the default budget")
    args = ["--images", str(cfg.cache_images), "--batch", "16", "--threads", str(cfg.threads)]
    bounded = run_child("bench.image_cache", args, cfg.workdir / "children" / "image-cache-bounded.json",
                        cfg.threads, log=cfg.log)
    _say(f"image_cache: {cfg.cache_unbounded_images:,} images without a bound")
    args = ["--images", str(cfg.cache_unbounded_images), "--batch", "16", "--budget-mb", "-1", "--every", "1",
            "--threads", str(cfg.threads)]
    unbounded = run_child("bench.image_cache", args, cfg.workdir / "children" / "image-cache-unbounded.json",
                          cfg.threads, log=cfg.log)
    points = [(s["images"], s["rss_mib"]) for s in unbounded["samples"] if s["images"] > 0]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    at = mean_y + slope * (cfg.cache_images - mean_x)
    return {"bounded": bounded, "unbounded": unbounded,
            "extrapolation": {"method": "least-squares line through the unbounded run's RSS samples",
                              "images": cfg.cache_images, "mib_per_image": round(slope, 4), "rss_mib": round(at)}}


def part_ranking(cfg) -> dict[str, Any]:
    """One image sample ranked against each candidate count, for each chunk size (`all`: one forward), one child
    process per setting so that each peak RSS is that setting's alone."""
    runs = []
    for chunk in cfg.ranking_chunks:
        for candidates in cfg.ranking_candidates:
            _say(f"ranking: {candidates} candidates, chunk {chunk}")
            out = cfg.workdir / "children" / f"ranking-{candidates}-{chunk}.json"
            runs.append(run_child("bench.ranking_memory", ["--candidates", str(candidates), "--chunk", chunk,
                                                           "--threads", str(cfg.threads)], out, cfg.threads,
                                  log=cfg.log))
    return {"runs": runs}


def part_memory_estimate(cfg) -> dict[str, Any]:
    """Estimated GPU memory and wall time of the UCIT recipes on LLaVA-1.5-7B (bench/memory_estimate.py): writes the
    committed bench/results/memory_estimate.json and the tables of docs/DISTRIBUTED.md."""
    from bench import memory_estimate

    return memory_estimate.run(say=_say)


def part_quality(cfg, size: str, methods: list[str], seeds: list[int], name: str | None = None) -> dict[str, Any]:
    """Every method x seed; the part file is rewritten after each run, so a cut-short part still reports.

    Seed 0 runs one at a time with all `--threads` (part 5 reads its timings); the other seeds run `--jobs` at a time
    with one thread each: a tiny model's step scales poorly past one thread, so two one-thread runs side by side finish
    the table sooner than two two-thread runs in a row."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    records: list[dict[str, Any]] = []
    started = time.time()
    lock = threading.Lock()

    def partial() -> dict[str, Any]:
        ordered = sorted(records, key=lambda r: (r["seed"], methods.index(r["method"])))
        return {"size": size, "overrides": runs.SIZES[size]["overrides"], "methods": methods, "seeds": seeds,
                "runs": ordered, "complete": False, "seconds": round(time.time() - started, 1),
                "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def one(method: str, seed: int, threads: int) -> None:
        _say(f"quality ({size}): {method}, seed {seed} ({threads} thread{'s' if threads > 1 else ''})")
        t0 = time.time()
        try:
            record = runs.run_method(cfg.workdir, size, method, seed, threads, cfg.log)
        except RuntimeError as exc:  # one failed method must not lose the others' hours
            record = {"method": method, "seed": seed, "size": size, "error": str(exc).splitlines()[-1]}
        _say(f"quality ({size}): {method}, seed {seed} done in {time.time() - t0:.0f} s")
        with lock:
            records.append(record)
            if name:
                write_json(cfg.results / f"{name}.json", partial())

    first, rest = [s for s in seeds if s == 0], [s for s in seeds if s != 0]
    for seed in first:
        for method in methods:
            one(method, seed, cfg.threads)
    jobs = [(m, s) for s in rest for m in methods]
    if cfg.jobs > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            list(pool.map(lambda job: one(*job, 1), jobs))
    else:
        for method, seed in jobs:
            one(method, seed, cfg.threads)
    return {**partial(), "complete": True}


def part_memory(cfg, size: str, methods: list[str]) -> dict[str, Any]:
    """Seed-0 runs of every method (reused from the quality part when it ran at this size)."""
    return part_quality(cfg, size, methods, [0], name="memory")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", default=["all"], help=f"all | report | {' | '.join(PARTS)}")
    parser.add_argument("--quality", default="small", choices=[*runs.SIZES, "skip"],
                        help="size of the quality runs (small fits the 30-minute budget; full = the recipes as is)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the size's seeds, 0,1,2)")
    parser.add_argument("--methods", default=",".join(runs.METHODS))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="run folders, child outputs and logs (git-ignored)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where the part results go and the report reads them (default bench/results/; "
                             "<workdir>/smoke with --smoke)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="the report to write (default docs/BENCHMARKS.md from bench/results/; "
                             "<results>/BENCHMARKS.md for any other results folder, e.g. a smoke run's)")
    parser.add_argument("--threads", type=int, default=TIMED_THREADS)
    parser.add_argument("--jobs", type=int, default=2,
                        help="quality runs of seeds other than 0 side by side, one thread each (1 = in a row)")
    parser.add_argument("--smoke", action="store_true", help="minimal sizes everywhere (checks the plumbing)")
    cfg = parser.parse_args(argv)
    parts = list(PARTS) if "all" in cfg.parts else [p for p in cfg.parts if p != "report"]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from all, report, {', '.join(PARTS)}")
    sizes = {"train_task": "caption", "train_steps": 40, "batch": 32, "warmup": 5, "rounds": 2,
             "eval_per_task": 50, "eval_train_steps": 40, "router_samples": 120, "router_repeats": 3,
             "router_experts": [2, 4, 6], "proto_samples": 64, "router_width": 1024, "mfu_width": 1024, "mfu_wide_steps": 15,
             "cache_images": 40_000, "cache_unbounded_images": 2_000, "matrix_per_task": None,
             "ranking_candidates": [10, 1000], "ranking_chunks": ["8", "64", "all"]}
    if cfg.smoke:
        sizes.update({"train_steps": 4, "batch": 4, "warmup": 1, "rounds": 1, "eval_per_task": 2,
                      "eval_train_steps": 1, "router_samples": 4, "router_repeats": 1, "router_experts": [2],
                      "proto_samples": 4, "router_width": 320, "mfu_width": 320, "mfu_wide_steps": 4, "cache_images": 64, "cache_unbounded_images": 32,
                      "matrix_per_task": 2,
                      "ranking_candidates": [3, 20], "ranking_chunks": ["8", "all"]})
        if cfg.quality != "skip":
            cfg.quality = "tiny"
    for key, value in sizes.items():
        setattr(cfg, key, value)
    if cfg.results is None:
        cfg.results = cfg.workdir / "smoke" if cfg.smoke else RESULTS
    if cfg.doc is None:  # a smoke run or another results folder never rewrites the committed report
        cfg.doc = REPO / "docs" / "BENCHMARKS.md" if cfg.results.resolve() == RESULTS.resolve() \
            else cfg.results / "BENCHMARKS.md"
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    cfg.results.mkdir(parents=True, exist_ok=True)
    cfg.log = cfg.workdir / "children.log"
    methods = cfg.methods.split(",")
    seeds = [int(s) for s in cfg.seeds.split(",")] if cfg.seeds else runs.SIZES.get(cfg.quality, {}).get("seeds")

    meta = read_json(cfg.results / "meta.json") or {}
    if parts:  # `report` alone keeps the machine record of the measured run
        _say("building SynthCIT if needed (untimed)")
        synthcit_samples("shape", "train", 1)
        meta["machine"] = machine()
        meta["smoke"] = cfg.smoke
        write_json(cfg.results / "meta.json", meta)
    for part in parts:
        if part == "quality" and cfg.quality == "skip":
            continue
        load = other_load()
        t0 = time.time()
        if part == "quality":
            name = f"quality-{cfg.quality}"
            data = part_quality(cfg, cfg.quality, methods, seeds, name=name)
        elif part == "memory":
            size = cfg.quality if cfg.quality != "skip" else "small"
            data = part_memory(cfg, size, methods)
            name = "memory"
        else:
            data = {"train": part_train, "mfu": part_mfu, "eval": part_eval, "matrix": part_matrix,
                    "router": part_router,
                    "image_cache": part_image_cache, "ranking": part_ranking,
                    "memory_estimate": part_memory_estimate}[part](cfg)
            name = part
        data.update({"load_before": load, "load_after": other_load(), "seconds": round(time.time() - t0, 1),
                     "mcit_commit": meta["machine"]["mcit_commit"],
                     "threads": cfg.threads, "base_sha256": meta["machine"]["base_sha256"],
                     "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        if part != "memory_estimate":  # that part writes bench/results/memory_estimate.json itself
            write_json(cfg.results / f"{name}.json", data)
        _say(f"{part}: done in {data['seconds']} s")
    from bench.report import write_report

    # the README's block is written from the committed results only (not from a smoke run or another folder)
    readme = REPO / "README.md" if cfg.results.resolve() == RESULTS.resolve() else None
    path = write_report(cfg.results, cfg.doc, readme=readme)
    _say(f"wrote {path}")


if __name__ == "__main__":
    main()
