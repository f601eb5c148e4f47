"""The canonical sample record every loader produces and every later stage consumes.

One record type for all sources (LLaVA JSON, JSONL, sharegpt, SynthCIT) keeps the collator, the evaluator and the
methods ignorant of where a sample came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANSWER_STYLES = ("word", "number", "letter", "yesno", "caption", "ocr", "box", "free")
"""The forms an answer can take (`meta["style"]`, a card's `answer_style`); `mcit.evaluation.formats` checks each."""

IMAGE_TOKEN = "<image>"
# Loaders normalise the placeholder to exactly this prefix of the first user turn, so the collator has one case.
IMAGE_PREFIX = IMAGE_TOKEN + "\n"


@dataclass
class Sample:
    """One instruction-tuning example.

    `image` is an absolute path (or None for text-only samples); `turns` holds (user, assistant) pairs and the
    first user text starts with "<image>\\n" when the sample has an image. `meta` is free-form: `style`, `choices`,
    `candidates`, `origin` (file/index/line the loader read it from), ...
    """

    id: str
    task: str
    image: str | None
    turns: list[tuple[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """First user text without the image placeholder (what a router or a prompt template wants)."""
        if not self.turns:
            return ""
        text = self.turns[0][0]
        if text.startswith(IMAGE_PREFIX):
            return text[len(IMAGE_PREFIX):]
        return text.replace(IMAGE_TOKEN, "").strip()

    @property
    def answer(self) -> str:
        """Last assistant text: the reference the evaluator scores against."""
        return self.turns[-1][1] if self.turns else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (turns as lists), the inverse of `from_dict`."""
        return {
            "id": self.id,
            "task": self.task,
            "image": self.image,
            "turns": [[user, assistant] for user, assistant in self.turns],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """Rebuild a Sample written by `to_dict` (JSON turns come back as lists; we restore tuples)."""
        return cls(
            id=str(data["id"]),
            task=str(data.get("task", "")),
            image=data.get("image"),
            turns=[(str(user), str(assistant)) for user, assistant in data.get("turns", [])],
            meta=dict(data.get("meta") or {}),
        )
