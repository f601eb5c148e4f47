"""Evaluation: generation, likelihood ranking, scorers (normalise / extract / score), format checks, metrics.

`get_scorer(name, **options)` is the scorer registry a data card's `scorer:` key names.
"""

from mcit.evaluation.scorers import get_scorer

__all__ = ["get_scorer"]
