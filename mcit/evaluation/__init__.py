"""Evaluation: generation, likelihood ranking, scorers (normalise / extract / score), format checks, metrics.

`get_scorer(name, **options)` is the scorer registry a data card's `scorer:` key names.

Modules holding scorers register them when imported, so they are imported here: any import of mcit.evaluation or
of one of its modules (``from mcit.evaluation.scorers import get_scorer`` runs this file first) sees every scorer.
"""

from mcit.evaluation import general, published  # noqa: F401  (register mme/pope/mmbench/seed_bench, mllm_dcl)
from mcit.evaluation.scorers import get_scorer

__all__ = ["get_scorer"]
