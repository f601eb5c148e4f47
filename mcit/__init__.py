"""mcit: multimodal continual instruction tuning for LLaVA-style models."""

__version__ = "0.1.0"
