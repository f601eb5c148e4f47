"""`mcit`: the command line. Each subcommand mirrors one step of the pipeline.

    mcit train RECIPE [key=value ...]        run a recipe's task sequence (resumes a killed run)
    mcit eval --checkpoint PATH --benchmark CARD [--tasks a,b]
    mcit export RUN_OR_CHECKPOINT --out DIR [--push REPO]
    mcit analyze cka --checkpoints A B ... --benchmark CARD   layer-wise CKA between task models
    mcit report RUN [RUN ...]                report.md / report.html with plots
    mcit data build synthcit | validate CARD | list
    mcit launch RECIPE [--nproc N] [--hostfile F | --no-ssh --node-rank R --nnodes N --master-addr A]
                                             the same recipe under the deepspeed launcher
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from mcit.errors import McitError


def _cmd_train(args: argparse.Namespace) -> int:
    from mcit.config import load_recipe
    from mcit.methods.base import build_method
    from mcit.workflows.train import ContinualRunner

    recipe = load_recipe(args.recipe, args.overrides)
    build_method(recipe)  # method options are checked before anything heavy starts
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        return 0
    path = ContinualRunner(recipe).run()
    print(f"results: {path}")
    report = path.parent / "report" / "report.html"
    if report.exists():
        print(f"report:  {report}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mcit.workflows.evaluate import evaluate_checkpoint

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    path = evaluate_checkpoint(args.checkpoint, args.benchmark, tasks=tasks, output_dir=args.output,
                               recipe_path=args.recipe, max_test=args.max_test, batch_size=args.batch_size,
                               constrained=not args.no_constrained)
    print(f"results: {path}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mcit.report.render import write_report

    path = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print(f"report: {path}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "build":
        if args.name != "synthcit":
            raise McitError(f"mcit data build: only 'synthcit' can be generated, got {args.name!r}")
        from mcit.data import synthcit

        root = Path(args.root).expanduser() if args.root else synthcit.default_root()
        config = synthcit.BuildConfig(seed=args.seed)
        if args.force:
            (root / "BUILD.json").unlink(missing_ok=True)
        path = synthcit.ensure_built(root, config)
        print(f"SynthCIT at {path}")
        return 0
    from mcit.data.cards import available_cards, load_card

    if args.action == "list":
        for name in available_cards():
            card = load_card(name)
            print(f"{name:20s} {len(card.tasks)} tasks: {' -> '.join(card.task_names)}")
        return 0
    from mcit.data.validate import validate_card

    card = load_card(args.name)
    if args.root:
        card.root = args.root
    if card.generator == "synthcit":
        from mcit.data import synthcit

        synthcit.ensure_built(card.root_dir)
    report = validate_card(card, check_images=args.images)
    print(report.format())
    return 0 if report.ok else 1


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


def _cmd_launch(args: argparse.Namespace) -> int:
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
        cmd = [launcher, *_launcher_args(args, Path(tmp)), "--no_local_rank", "--module", "mcit", "train",
               args.recipe, *args.overrides]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcit", description="Multimodal continual instruction tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe's task sequence", description=(
        "Train the recipe's tasks in order, evaluating every task after each one. Re-running the same command "
        "resumes a killed run."))
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4 output_dir=/tmp/x")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark", description=(
        "Evaluate a run's stage checkpoint, a PEFT adapter folder, an HF model (id or folder) or builtin:tiny-llava "
        "on a data card's tasks, including tasks the model never trained on."))
    p.add_argument("--checkpoint", required=True, help="checkpoints/stage-XX-* folder, adapter folder or model")
    p.add_argument("--benchmark", required=True, help="data card name or path")
    p.add_argument("--tasks", help="comma-separated task subset")
    p.add_argument("--output", help="folder for results.json and predictions (default: RUN/eval/STAGE-CARD for a run's stage "
                   "folder, else FOLDER/eval-CARD)")
    p.add_argument("--recipe", help="recipe for a bare model/adapter (model settings, eval settings)")
    p.add_argument("--max-test", type=int, help="evaluate at most this many samples per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-constrained", action="store_true", help="skip likelihood ranking of valid answers")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="merge adapters, write a model card, push to the Hub")
    from mcit.cli.export import add_arguments as add_export_arguments

    add_export_arguments(p)

    p = sub.add_parser("analyze", help="diagnostics: layer-wise CKA between tasks")
    from mcit.cli.analyze import add_arguments as add_analyze_arguments

    add_analyze_arguments(p)

    p = sub.add_parser("report", help="write report.md and report.html for one or more runs")
    p.add_argument("runs", nargs="+", help="run folders (several: a comparison)")
    p.add_argument("--out", help="output folder (default: RUN/report, or ./report-compare for several)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("data", help="build SynthCIT, list and validate data cards")
    p.add_argument("action", choices=["build", "validate", "list"])
    p.add_argument("name", nargs="?", default="synthcit", help="'synthcit' for build, a card name/path for validate")
    p.add_argument("--root", help="data root (default: the card's root / MCIT_SYNTHCIT_ROOT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.add_argument("--images", default="header", choices=["none", "exists", "header", "decode"],
                   help="how thoroughly to check images")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("launch", help="run a recipe under the deepspeed launcher", description=(
        "Run `mcit train RECIPE` under the deepspeed launcher: on this node (every visible GPU), on the nodes of a "
        "--hostfile from node 0 over ssh (forwarding the MCIT_* variables), or with --no-ssh on every node "
        "yourself (e.g. one task per node under SLURM). See docs/DISTRIBUTED.md."))
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for mcit train")
    p.add_argument("--nproc", type=int, help="processes per node (default: the GPUs visible here, honouring "
                   "CUDA_VISIBLE_DEVICES; 2 with --cpu; with --hostfile: the hostfile's slots)")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (DS_ACCELERATOR=cpu)")
    p.add_argument("--hostfile", help="multi-node hostfile, '<host> slots=<n>' per line, node 0 first "
                   "(see launch/hostfile.example)")
    p.add_argument("--no-ssh", action="store_true", help="start only this node's processes; run the same command "
                   "on every node with its own --node-rank")
    p.add_argument("--node-rank", type=int, help="with --no-ssh: this node's index, 0..nnodes-1")
    p.add_argument("--nnodes", type=int, help="number of nodes (with --no-ssh and no --hostfile: required)")
    p.add_argument("--master-addr", help="address of node 0, reachable from every node (required with --no-ssh)")
    p.add_argument("--master-port", type=int, default=29500, help="the same on every node (default 29500)")
    p.set_defaults(func=_cmd_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except McitError as exc:
        print(f"mcit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
