"""The project's exception types. Every user-facing failure is one of these, with an actionable message."""


class McitError(Exception):
    """Base class of every error mcit raises on purpose."""


class RecipeError(McitError):
    """A recipe (YAML) is malformed: unknown key, wrong type, missing file."""


class DataError(McitError):
    """A data card, annotation file or image is missing or malformed."""


class ModelError(McitError):
    """A base model cannot be loaded or a requested backend (flash-attn, bitsandbytes) cannot run."""


class CheckpointError(McitError):
    """A checkpoint is missing, truncated, tampered with, or does not match the model."""


class EvalError(McitError):
    """Evaluation inputs do not line up (ids, tasks) or a scorer got unusable input."""
