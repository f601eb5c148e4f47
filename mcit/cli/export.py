"""`mcit export`: turn a run's stage checkpoint into something others can load, with a model card, optionally pushed.

    mcit export RUN_OR_STAGE_DIR --out DIR [--stage N|last] [--merge METHOD [--weights W ...] [--density D]]
                [--full [--dtype bf16]] [--experts] [--push REPO_ID [--private] [--token T] [--endpoint URL]]

Argument parsing only: the flow is mcit.workflows.export, what DIR receives is described in mcit.export.build.

lmms-eval (mcit.export.lmms_eval): `mcit lmms-tasks` and `mcit lmms-eval` run `lmms_main`, which lives in the cli
layer because registering the `mcit` model hands lmms-eval `mcit.load`, which only a layer above the workflows may
import:

    mcit lmms-tasks SUITE --out DIR [--max-test N]   a suite's tasks as lmms-eval tasks
    mcit lmms-eval LMMS_EVAL_ARGS                     lmms-eval's CLI, with `--model mcit`
"""

from __future__ import annotations

import argparse
import sys

from mcit.errors import McitError
from mcit.export.merge import DEFAULT_DENSITY, METHODS
from mcit.models.loading import DTYPES
from mcit.workflows.export import export_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `mcit export`'s arguments to `parser` (the `export` subparser of `mcit`)."""
    parser.description = (
        "Export a run's stage as a PEFT adapter (several task adapters merged into one with --merge) or, with "
        "--full, as a full transformers model; writes a model card and can push the folder to the Hugging Face Hub."
    )
    parser.add_argument("source", metavar="RUN_OR_STAGE_DIR", help="a run folder or one of its checkpoints/stage-*")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty, unless --force)")
    parser.add_argument("--stage", default="last", help="stage number (as in stage-XX) or 'last' (default)")
    parser.add_argument("--merge", choices=METHODS, help="how to merge several task adapters into one")
    parser.add_argument("--weights", nargs="+", help="one merge weight per adapter, in adapter order (e.g. 0.5 0.5)")
    parser.add_argument("--density", type=float, help=f"kept fraction for ties/dare/copa (default {DEFAULT_DENSITY})")
    parser.add_argument("--adapters", help="comma-separated adapter names to export (default: all in the stage)")
    parser.add_argument("--full", action="store_true", help="merge into the base weights; save a full model")
    parser.add_argument("--experts", action="store_true",
                        help="export the stage as it is (every expert, router and method state); load it with "
                             "mcit.load(DIR) or evaluate it with `mcit eval --checkpoint DIR`")
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="dtype of a --full model's weights (default: the recipe's)")
    parser.add_argument("--base-model", help="base model name for the card and adapter_config (default: recipe's)")
    parser.add_argument("--license", help="license id for the model card (default: the recipe's, else 'other')")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--push", "--push-to-hub", dest="push", metavar="REPO_ID", help="upload DIR to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (prefer HF_TOKEN or `hf auth login`: argv is visible to others)")
    parser.add_argument("--endpoint", help="Hub endpoint URL (default: HF_ENDPOINT or the public Hub)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export as `args` asks (see mcit.workflows.export.export_run). Errors are McitError subclasses."""
    export_run(args.source, args.out, stage=args.stage, merge=args.merge, weights=_parse_weights(args.weights),
               density=args.density, adapters=_names(args.adapters), full=args.full, experts=args.experts,
               dtype=args.dtype, base_model=args.base_model, license=args.license, force=args.force, push=args.push,
               private=args.private, token=args.token, endpoint=args.endpoint)
    return 0


def _parse_weights(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    parts = [part for value in values for part in value.split(",") if part.strip()]
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise McitError(f"--weights: expected numbers (e.g. --weights 0.5 0.5), got {' '.join(values)}") from None


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def lmms_main(argv: list[str]) -> int:
    """`lmms-tasks SUITE --out DIR ...` (write lmms-eval tasks) or `lmms-eval ARGS` (lmms-eval's own command line
    with the `mcit` model registered; ARGS as `lmms-eval` takes them)."""
    from mcit.export import lmms_eval

    if argv[:1] == ["lmms-eval"]:
        import mcit

        lmms_eval.register(mcit.load)
        from lmms_eval.cli.dispatch import main as lmms_eval_main

        sys.argv = ["lmms-eval", "eval", *argv[1:]]
        lmms_eval_main()
        return 0
    parser = argparse.ArgumentParser(prog="mcit lmms-tasks",
                                     description="Write an evaluation suite's tasks as lmms-eval tasks (one JSONL "
                                                 "of the test samples mcit eval scores and one YAML per task); run "
                                                 "them with lmms-eval --include_path DIR.")
    parser.add_argument("suite", help="a suite file or the name of a shipped suite (eval/*.yaml)")
    parser.add_argument("--out", required=True, help="output folder (new or empty, unless --force)")
    parser.add_argument("--max-test", type=int, help="at most this many test samples per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-test subset (default 0)")
    parser.add_argument("--prefix", default="mcit", help="prefix of the task names and the suite's tag")
    parser.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    if argv[:1] != ["lmms-tasks"]:
        parser.error("expected `lmms-tasks SUITE --out DIR` or `lmms-eval LMMS_EVAL_ARGS`")
    args = parser.parse_args(argv[1:])
    names = lmms_eval.write_lmms_tasks(args.suite, args.out, max_test=args.max_test, seed=args.seed,
                                       prefix=args.prefix, force=args.force)
    tag = lmms_eval.lmms_name(args.prefix, lmms_eval.load_suite(args.suite).name)
    print(f"wrote {len(names)} lmms-eval task(s): {', '.join(names)}; run them with --include_path {args.out} "
          f"--tasks {tag}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(lmms_main(sys.argv[1:]))
    except McitError as exc:
        print(f"mcit {' '.join(sys.argv[1:2])}: error: {exc}", file=sys.stderr)
        sys.exit(2)
