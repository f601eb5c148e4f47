"""mcit: multimodal continual instruction tuning for LLaVA-style models."""

from mcit.version import __version__

__all__ = ["__version__", "load"]


def load(path: str):
    """Load anything `mcit eval` accepts — a run's stage folder, an `mcit export --experts` folder (every expert with
    its router, restored exactly), a PEFT adapter folder or a full model — as `(model, processor, method, recipe)`.

    Routed methods (hide, disco) route inside `method.eval_groups(model, samples)`; `mcit.evaluation.evaluate`
    and `mcit.evaluation.generate` use it, e.g.::

        model, processor, method, recipe = mcit.load("exported/hide")
    """
    from mcit.workflows.load import load_checkpoint

    return load_checkpoint(path)
