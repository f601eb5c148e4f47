"""`mcit`: the command line. Each subcommand mirrors one step of the pipeline.

    mcit train RECIPE [key=value ...]        run a recipe's task sequence (resumes a killed run)
    mcit eval --checkpoint PATH --benchmark CARD [--tasks a,b]
    mcit eval SUITE --checkpoints A B ...    every checkpoint (a run: its base and stages) on every suite task
    mcit export RUN_OR_CHECKPOINT --out DIR [--push REPO]
    mcit analyze cka --checkpoints A B ... --benchmark CARD   layer-wise CKA between task models
    mcit report RUN [RUN ...]                report.md / report.html with plots
    mcit data build synthcit | validate CARD | list
    mcit launch RECIPE [--nproc N] [--hostfile F | --no-ssh --node-rank R --nnodes N --master-addr A]
                                             the same recipe under the deepspeed launcher
    mcit launch [launch flags] eval SUITE --checkpoints A B ...   a suite evaluation split over the ranks
    mcit lmms-tasks SUITE --out DIR          a suite's tasks as lmms-eval tasks (docs/EXPORT.md)
    mcit lmms-eval ARGS                      lmms-eval's command line, `--model mcit` loading any mcit checkpoint
"""

from __future__ import annotations

import argparse
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

    if args.suite is not None or args.checkpoints:
        if args.suite is None or not args.checkpoints or args.checkpoint or args.benchmark:
            raise McitError("mcit eval: give a suite and --checkpoints (mcit eval eval/synthcit-heldout.yaml "
                            "--checkpoints runs/quickstart), or --checkpoint and --benchmark, not a mix")
        from mcit.runtime import dist
        from mcit.workflows.suite import evaluate_suite

        out = args.output or f"eval-{Path(args.suite).stem}"
        path = evaluate_suite(args.suite, args.checkpoints, output_dir=out, max_test=args.max_test)
        if dist.is_main():
            print(f"results: {path}\nreport:  {path.parent / 'report.html'}")
        return 0
    if not (args.checkpoint and args.benchmark):
        raise McitError("mcit eval: --checkpoint and --benchmark are both needed (or a suite and --checkpoints)")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    path = evaluate_checkpoint(args.checkpoint, args.benchmark, tasks=tasks, output_dir=args.output,
                               recipe_path=args.recipe, max_test=args.max_test, batch_size=args.batch_size,
                               constrained=not args.no_constrained)
    print(f"results: {path}")
    return 0


def _cmd_lmms(args: argparse.Namespace) -> int:
    from mcit.cli.export import lmms_main

    return lmms_main([args.command, *args.rest])


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
    p.add_argument("suite", nargs="?", help="an evaluation suite (eval/*.yaml or a shipped suite's name); with "
                   "--checkpoints: every checkpoint on every suite task, one results.json and report")
    p.add_argument("--checkpoints", nargs="+", help="run folders (base model + every stage), stage folders, adapters, "
                   "exported expert sets, models")
    p.add_argument("--checkpoint", help="checkpoints/stage-XX-* folder, adapter folder or model")
    p.add_argument("--benchmark", help="data card name or path")
    p.add_argument("--tasks", help="comma-separated task subset")
    p.add_argument("--output", help="folder for results.json and predictions (default: RUN/eval/STAGE-CARD for a run's stage "
                   "folder, else FOLDER/eval-CARD; a suite: ./eval-SUITE)")
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
        "Run `mcit train RECIPE` (or `mcit eval SUITE --checkpoints ...`) under the deepspeed launcher: on this node (every visible GPU), on the nodes of a "
        "--hostfile from node 0 over ssh (forwarding the MCIT_* variables), or with --no-ssh on every node "
        "yourself (e.g. one task per node under SLURM). See docs/DISTRIBUTED.md."))
    from mcit.cli.launch import add_arguments as add_launch_arguments

    add_launch_arguments(p)

    for name, help_text in (("lmms-tasks", "write an evaluation suite's tasks as lmms-eval tasks (SUITE --out DIR)"),
                            ("lmms-eval", "lmms-eval's command line with the `mcit` model registered")):
        p = sub.add_parser(name, help=help_text, add_help=False, description=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER, help="the arguments (--help lists them)")
        p.set_defaults(func=_cmd_lmms)
    return parser


_LAUNCH_VALUED = ("--nproc", "--hostfile", "--node-rank", "--nnodes", "--master-addr", "--master-port")


def _launched_eval(argv: list[str]) -> int | None:
    """Where `eval` starts in `mcit launch [launch flags] eval SUITE --checkpoints ...` (the launcher runs that
    evaluation on every rank), or None for a launched recipe."""
    if not argv or argv[0] != "launch":
        return None
    k = 1
    while k < len(argv):
        token = argv[k]
        if token in _LAUNCH_VALUED:
            k += 2
        elif token.startswith("-"):
            k += 1
        else:
            return k if token == "eval" else None
    return None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `key=value` overrides may also follow the options (`mcit launch r.yaml --nproc 8 x=1`),
    which argparse alone refuses once an option has ended the positional list."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["lmms-tasks"], ["lmms-eval"]):  # their own parsers take every argument, --help included
        return argparse.Namespace(command=argv[0], rest=argv[1:], func=_cmd_lmms)
    start = _launched_eval(argv)
    if start is not None:  # the launch flags, then the eval command, checked here before anything is launched
        args = build_parser().parse_args([*argv[:start], "eval"])
        program = parse(argv[start:])
        if program.suite is None or not program.checkpoints:
            build_parser().error("mcit launch ... eval: a suite and --checkpoints (mcit launch --nproc 8 eval "
                                 "eval/general.yaml --checkpoints runs/a); one --checkpoint runs without a launcher")
        args.program = argv[start:]
        return args
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    late = [a for a in extra if "=" in a and not a.startswith("-")] if takes_overrides else []
    unknown = [a for a in extra if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    suite = getattr(args, "suite", None)
    if suite is not None and "=" in suite:  # `mcit eval ... x=1`: an override where eval takes none
        parser.error(f"unrecognized arguments: {suite} (mcit eval takes no key=value overrides)")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
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
