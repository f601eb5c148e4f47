"""`mcit launch`: a recipe under the deepspeed launcher, on this node, on the nodes of a hostfile (ssh), or on every
node by itself (--no-ssh). Builds the launcher's flags, forwards the environment the other nodes need, and runs the
launcher in its own process group."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from mcit.errors import McitError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mcit launch`; `mcit.cli` builds the `launch` subparser and calls `args.func(args)`."""
    parser.add_argument("recipe", help="recipe YAML file (or `eval SUITE --checkpoints ...`: a suite evaluation, its "
                        "samples split over the ranks)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for mcit train")
    parser.add_argument("--nproc", type=int, help="processes per node (default: the GPUs visible here, honouring "
                        "CUDA_VISIBLE_DEVICES; 2 with --cpu; with --hostfile: the hostfile's slots)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU with gloo (DS_ACCELERATOR=cpu)")
    parser.add_argument("--hostfile", help="multi-node hostfile, '<host> slots=<n>' per line, node 0 first "
                        "(see launch/hostfile.example)")
    parser.add_argument("--no-ssh", action="store_true", help="start only this node's processes; run the same command "
                        "on every node with its own --node-rank")
    parser.add_argument("--node-rank", type=int, help="with --no-ssh: this node's index, 0..nnodes-1")
    parser.add_argument("--nnodes", type=int, help="number of nodes (with --no-ssh and no --hostfile: required)")
    parser.add_argument("--master-addr", help="address of node 0, reachable from every node (required with --no-ssh)")
    parser.add_argument("--master-port", type=int, default=29500, help="the same on every node (default 29500)")
    parser.set_defaults(func=run_launch)


_FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Forwarded to every node of a --hostfile launch besides the MCIT_* variables (the data card roots among them)."""


def _visible_gpus() -> list[str]:
    """The GPU indices this process may use: CUDA_VISIBLE_DEVICES when set, else 0..count-1 ([] without a GPU)."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in visible.split(",") if part.strip()][:count]
    if not all(part.isdigit() for part in ids):
        # The launcher assigns devices by index (it writes CUDA_VISIBLE_DEVICES for each rank itself).
        raise McitError(f"CUDA_VISIBLE_DEVICES={visible!r}: the deepspeed launcher needs GPU indices (e.g. 0,1), "
                        f"not UUIDs or MIG names")
    return ids


def _local_processes(args: argparse.Namespace) -> tuple[int, list[str] | None]:
    """Processes on this node and, when CUDA_VISIBLE_DEVICES narrows the GPUs, the indices they run on."""
    if args.cpu:
        return args.nproc or 2, None
    gpus = _visible_gpus()
    if not gpus:
        if args.nproc:
            return args.nproc, None  # the launcher falls back to its CPU accelerator (gloo)
        raise McitError("no GPU is visible (torch.cuda.device_count() is 0); pass --cpu to run on CPU with gloo, "
                        "or --nproc N")
    nproc = args.nproc or len(gpus)
    if nproc > len(gpus):
        raise McitError(f"--nproc {nproc}: only {len(gpus)} GPU(s) are visible on this node ({','.join(gpus)})")
    return nproc, gpus[:nproc] if "CUDA_VISIBLE_DEVICES" in os.environ else None


def _check_launch_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations the launcher would ignore or fail on late, naming the flag."""
    for flag, value in (("--nproc", args.nproc), ("--nnodes", args.nnodes)):
        if value is not None and value < 1:
            raise McitError(f"{flag} must be at least 1, got {value}")
    if args.no_ssh:
        if args.node_rank is None:
            raise McitError("--no-ssh needs --node-rank (this node's index: 0 on the node at --master-addr)")
        if args.master_addr is None:
            raise McitError("--no-ssh needs --master-addr (the address of node 0, reachable from every node)")
        if args.nnodes is None and not args.hostfile:
            raise McitError("--no-ssh needs --nnodes (the number of nodes) or a --hostfile")
        if args.nnodes is not None and not 0 <= args.node_rank < args.nnodes:
            raise McitError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} (--nnodes {args.nnodes})")
    elif args.node_rank is not None:
        raise McitError("--node-rank needs --no-ssh (with a --hostfile and ssh, node 0 starts every node)")
    elif not args.hostfile:
        for flag, value in (("--master-addr", args.master_addr), ("--nnodes", args.nnodes)):
            if value is not None:
                raise McitError(f"{flag} is for multi-node launches: add --hostfile F, or --no-ssh on every node")
    if args.hostfile:
        path = Path(args.hostfile)
        if not path.is_file():  # the launcher would warn and start a one-node job instead
            raise McitError(f"--hostfile {args.hostfile}: file not found (see launch/hostfile.example)")
        hosts = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        nodes = min(len(hosts), args.nnodes or len(hosts))
        if args.no_ssh and not 0 <= args.node_rank < nodes:
            raise McitError(f"--node-rank {args.node_rank} is outside 0..{nodes - 1} ({nodes} node(s) in "
                            f"{args.hostfile})")


def _launcher_args(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The deepspeed launcher's flags that place the processes (everything before the program to run).

    A --no-ssh launch without a hostfile gets one written into `workdir`: the launcher computes each process's global
    rank from the hostfile's node list, which must therefore be the same on every node (so is --nproc)."""
    if args.hostfile:
        placement = ["--hostfile", args.hostfile]
        if args.nproc:
            placement += ["--num_gpus", str(args.nproc)]
        if args.nnodes:
            placement += ["--num_nodes", str(args.nnodes)]
    elif args.no_ssh:
        nproc, ids = _local_processes(args)
        slots = max([nproc, *(int(i) + 1 for i in ids or ())])
        hosts = [f"node-{i}" for i in range(args.nnodes)]  # names only key the node list: nothing connects to them
        hostfile = workdir / "hostfile"
        hostfile.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
        placement = ["--hostfile", str(hostfile)]
        if ids is None:
            placement += ["--num_gpus", str(nproc)]
        else:  # this node's visible GPUs, the first nproc slots on the others (--include lists every node)
            placement += ["--include", "@".join(
                f"{host}:{','.join(ids if i == args.node_rank else map(str, range(nproc)))}"
                for i, host in enumerate(hosts))]
    else:
        nproc, ids = _local_processes(args)
        # Given --num_gpus the launcher ignores CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1, so name the visible ones.
        placement = ["--include", f"localhost:{','.join(ids)}"] if ids else ["--num_gpus", str(nproc)]
    if args.no_ssh:
        placement += ["--no_ssh", "--node_rank", str(args.node_rank)]
    if args.master_addr:
        placement += ["--master_addr", args.master_addr]
    return placement + ["--master_port", str(args.master_port)]


def _forward_environment(env: dict[str, str], workdir: Path, *, cpu: bool) -> Path:
    """Write the environment file the multi-node launcher exports on every node, and return its path.

    Over ssh the launcher forwards only a few variable prefixes, plus the `KEY=value` lines of `.deepspeed_env` (the
    name is DS_ENV_FILE's) in the home folder and then the current folder. The user's entries from both files are
    merged with this shell's MCIT_* variables and the _FORWARDED_ENV ones into a file of the launch's own (passed as
    an absolute DS_ENV_FILE), so the user's files are never rewritten; where a user's file sets a forwarded variable,
    the file's value is kept."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    user: dict[str, str] = {}
    for base in (os.path.expanduser("~"), "."):  # the launcher's order: a later file overrides an earlier one
        path = Path(base, name)
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if "=" in line:
                    key, value = line.split("=", 1)
                    user[key.strip()] = value.strip()
    ours = {k: v for k, v in env.items() if k.startswith("MCIT_") or k in _FORWARDED_ENV}
    if cpu:
        ours["DS_ACCELERATOR"] = env["DS_ACCELERATOR"]
    for key, value in ours.items():
        if "\n" in value:
            raise McitError(f"{key} holds a line break and cannot be forwarded in {name}")
    kept = sorted(k for k in ours if k in user and user[k] != ours[k])
    merged = {**ours, **user}
    path = workdir / name.replace(os.sep, "_")
    path.write_text("".join(f"{key}={value}\n" for key, value in merged.items()), encoding="utf-8")
    print(f"forwarding to every node: {', '.join(sorted(ours)) or '(no MCIT_* variable is set)'}", file=sys.stderr)
    if kept:
        print(f"kept the value of {name} for {', '.join(kept)} (it differs from this shell's)", file=sys.stderr)
    return path


def run_launch(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise McitError("the deepspeed launcher is not on PATH (pip install deepspeed)")
    _check_launch_flags(args)
    env = dict(os.environ)
    if args.cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="mcit-launch-") as tmp:
        program = getattr(args, "program", None) or ["train", args.recipe, *args.overrides]
        cmd = [launcher, *_launcher_args(args, Path(tmp)), "--no_local_rank", "--module", "mcit", *program]
        if args.hostfile and not args.no_ssh:
            env["DS_ENV_FILE"] = str(_forward_environment(env, Path(tmp), cpu=args.cpu))
        print(" ".join(cmd), file=sys.stderr)
        return _run_process_group(cmd, env)


def _run_process_group(cmd: list[str], env: dict[str, str]) -> int:
    import signal
    import subprocess

    # The launcher and its ranks run in their own process group, so that a SIGTERM/SIGINT sent to this wrapper (a
    # scheduler cancelling the job, Ctrl-C) reaches every rank instead of leaving them running.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
