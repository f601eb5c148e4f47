"""A SynthCIT scene as data and as text: its vocabulary, objects and layout, the descriptions and captions written
from it, and `parse_scene`, which reads a description back.

Kept apart from the generator (mcit.data.synthcit, which needs numpy and PIL to draw) so that the `scene_attributes`
scorer can parse descriptions without importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SIZES = {"small": 4, "large": 7}  # half-extent in pixels inside a 16 px cell
CELL_NAMES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
WORDS = ("cat", "dog", "sun", "map", "key", "cup", "hat", "pen", "bus", "fox", "jam", "owl")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "ABCD"

@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cell: int
    dx: int = 0  # jitter inside the cell, so layouts rarely repeat
    dy: int = 0

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    def box(self) -> tuple[float, float, float, float]:
        """Normalised [x1, y1, x2, y2] of the object's extent (centre of its cell +- half-extent)."""
        cx, cy = self.centre()
        h = SIZES[self.size]
        return tuple(round(v / IMAGE_SIZE, 2) for v in (cx - h, cy - h, cx + h, cy + h))  # type: ignore[return-value]

    def centre(self) -> tuple[int, int]:
        cx, cy = _cell_centre(self.cell)
        return cx + self.dx, cy + self.dy


@dataclass
class Scene:
    objects: list[SceneObject]
    word: str | None = None
    word_row: int | None = None
    background: tuple[int, int, int] = (235, 235, 235)
    noise_seed: int = 0
    extra: dict = field(default_factory=dict)

    def ordered(self) -> list[SceneObject]:
        return sorted(self.objects, key=lambda o: o.cell)


def _cell_centre(cell: int) -> tuple[int, int]:
    row, col = divmod(cell, GRID)
    return col * CELL + CELL // 2, row * CELL + CELL // 2




def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _article(phrase: str) -> str:
    return f"a {phrase}"


def scene_description(scene: Scene) -> str:
    """The pretraining target: every object's attributes and cell, and the word. Deliberately unlike any task form."""
    n = len(scene.objects)
    parts = [f"{NUMBER_WORDS[n]} object{'' if n == 1 else 's'}"]
    parts += [f"{o.phrase} at {CELL_NAMES[o.cell]}" for o in scene.ordered()]
    text = "scene: " + "; ".join(parts)
    if scene.word:
        text += f"; text {scene.word}"
    return text


def brief_caption(scene: Scene) -> str:
    return _join([_article(f"{o.color} {o.shape}") for o in scene.ordered()]) + "."


def detailed_caption(scene: Scene) -> str:
    n = len(scene.objects)
    head = f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'s' if n > 1 else ''}."
    body = " ".join(f"{_article(o.phrase)} is at the {CELL_NAMES[o.cell]}." for o in scene.ordered())
    return f"{head} {body}"


_SCENE_OBJECT = re.compile(r"^(small|large) (\w+) (\w+) at ([\w ]+)$")
_SCENE_COUNT = re.compile(r"^(\w+) objects?$")


def parse_scene(text: str) -> tuple[dict[str, tuple[str, str, str]], str | None, str | None]:
    """Parse a SynthCIT scene description ("scene: two objects; small red circle at top left; ...; text pen") into
    {position: (size, colour, shape)}, the rendered word and the stated object count. Unparseable parts are ignored."""
    body = text.strip()
    body = body[len("scene:"):] if body.startswith("scene:") else body
    objects, word, count = {}, None, None
    for part in body.split(";"):
        part = part.strip()
        if part.startswith("text "):
            word = part[5:].strip()
            continue
        match = _SCENE_OBJECT.match(part)
        if match:
            size, color, shape, where = match.groups()
            objects.setdefault(where.strip(), (size, color, shape))
            continue
        match = _SCENE_COUNT.match(part)
        if match and count is None:
            count = match.group(1)
    return objects, word, count
