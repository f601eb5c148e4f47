"""Arguments of `mcit analyze` (the work is in mcit.workflows.analyze)."""

from __future__ import annotations

import argparse

from mcit.analysis.cka import KINDS
from mcit.errors import EvalError
from mcit.workflows.analyze import run_cka


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mcit analyze`; `mcit.cli` builds the `analyze` subparser and calls `args.func(args)`."""
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    p = sub.add_parser("cka", help="layer-wise CKA between task models on a shared probe set", description=(
        "Run every checkpoint on the same probe samples, average each language-model layer's MLP down_proj output "
        "over tokens, and compare the models layer by layer with CKA. The least similar layers are the ones "
        "worth making task-specific (HiDe-LLaVA's expand layers)."))
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="two or more task models: stage folders, PEFT adapter folders, model dirs or ids")
    p.add_argument("--benchmark", required=True, help="data card name or path (the probe samples come from it)")
    p.add_argument("--tasks", help="comma-separated tasks of the card to draw probe samples from (default: all)")
    p.add_argument("--root", help="override the card's data root")
    p.add_argument("--samples", type=int, default=50, help="test samples per task in the probe set (default 50)")
    p.add_argument("--kind", choices=KINDS, default="rbf", help="CKA kernel (default rbf, median bandwidth)")
    p.add_argument("--labels", help="comma-separated names for the checkpoints (default: stage task or folder name)")
    p.add_argument("--out", help="output folder (default: <run>/analysis for a stage checkpoint, else ./analysis)")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--expand", type=int, default=None, metavar="N",
                        help="report the N least similar layers as expand layers (default 1)")
    choice.add_argument("--threshold", type=float, default=None,
                        help="report every layer whose mean cross-task CKA is below this value instead")
    p.add_argument("--recipe", help="recipe for adapters/bare models (model settings); stage folders use their run's")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None,
                   help="token limit of a probe sample (default: the model's image tokens + 512)")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="compute dtype of the forward passes (default none: fp32, the most exact)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:i]")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "analysis", None) != "cka":
        raise EvalError(f"mcit analyze: unknown analysis {getattr(args, 'analysis', None)!r}; available: cka")
    return run_cka(args)
