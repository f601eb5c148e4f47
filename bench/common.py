"""Shared pieces of the benchmarks: the machine and versions, what else was running, result files, child processes.

Every timed measurement runs in a child process of its own (`python -m bench.<part> ...`), so model loading, thread
settings and allocator state of one measurement never leak into the next, and per-process peak memory is that of one
measurement. Children write one JSON file; the parent collects them into `<workdir>/<part>.json`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = REPO / "runs" / "bench"  # run folders, child outputs and logs (git-ignored)
RESULTS = REPO / "bench" / "results"  # the part results the docs are written from (committed)
TIMED_THREADS = 2
"""Threads for the timed runs: the machine's two cores."""


def base_model_dir() -> Path:
    from mcit.models.tiny import resolve_builtin

    return resolve_builtin("builtin:tiny-llava")


def sha256(path: Path) -> str:
    from mcit.runtime.files import sha256 as file_sha256

    return file_sha256(path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma",))
    except OSError:
        pass
    return []


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mcit", "bench", "recipes"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, library versions and the base weights the numbers used."""
    import peft
    import torch
    import transformers

    mem_kb = 0
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        pass
    weights = base_model_dir() / "model.safetensors"
    provenance = base_model_dir() / "PROVENANCE.json"
    status = None
    if provenance.is_file():
        status = json.loads(provenance.read_text()).get("status") or json.loads(provenance.read_text()).get("kind")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
        "memory_gib": round(mem_kb / 2**20, 1), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "mcit_commit": git_commit(),
        "base_sha256": sha256(weights) if weights.is_file() else None, "base_status": status,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def other_load() -> dict[str, Any]:
    """Load average and the other processes using CPU right now (anything here distorts a timing). A stopped process
    (SIGSTOP, ps state T: e.g. a long run paused while the timed parts measure) uses no CPU; it is counted apart,
    since ps's %CPU is a lifetime average and would list it as busy."""
    busy, stopped = [], []
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,stat,pcpu,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
        mine = {os.getpid(), os.getppid()}
        for line in out:
            pid, ppid, stat, pcpu, args = line.split(None, 4)
            if int(pid) in mine or int(ppid) == os.getpid() or float(pcpu) < 5.0:
                continue
            (stopped if stat.startswith("T") else busy).append(
                {"pid": int(pid), "cpu_percent": float(pcpu), "command": args[:120]})
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy[:8],
            "stopped_processes": len(stopped),
            "pretraining_running": any("pretrain-tiny" in p["command"] for p in busy)}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    env.setdefault("MCIT_CACHE", str(Path.home() / ".cache" / "mcit"))
    return env


def run_child(module: str, args: list[str], out: Path, threads: int, log: Path | None = None,
              timeout: float = 3600) -> dict[str, Any]:
    """Run `python -m <module> <args> --out <out>` with `threads` threads; return its JSON (+ peak RSS of the child)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
    load_before = other_load()
    stderr = open(log, "a") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads), stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log is not None:
            stderr.close()
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
        raise RuntimeError(f"benchmark child {' '.join(cmd)} failed with exit code {proc.returncode}:\n{tail}")
    data = json.loads(out.read_text())
    data["child_peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    data["load"] = {"before": load_before, "after": other_load()}
    return data


def set_threads(threads: int | None) -> None:
    """Inside a child: pin torch's intra-op threads (the parent already set OMP_NUM_THREADS)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def fill_block(doc: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between the `begin` and `end` marker lines of a generated doc section with `lines`."""
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def synthcit_samples(task: str, split: str, n: int | None = None, seed: int = 0):
    """Samples of one SynthCIT task through the card loader (builds SynthCIT on first use)."""
    from mcit.data import synthcit
    from mcit.data.cards import load_card

    card = load_card("synthcit-coin" if task in ("ocr", "grounding", "yesno") else "synthcit")
    synthcit.ensure_built(card.root_dir)
    samples = card.load_task(task, split, seed=seed)
    return samples[:n] if n is not None else samples


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def child_main(parser, run, argv: list[str] | None = None) -> None:
    """The entry point of a measurement child: `--threads` and `--out` are added here; `run(args)` returns the JSON."""
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import torch

    write_json(Path(args.out), {**run(args), "threads": torch.get_num_threads()})
