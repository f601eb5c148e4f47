"""SynthCIT: a procedurally generated, CPU-sized benchmark for multimodal continual instruction tuning.

Every image is a 48x48 scene on a 3x3 grid: up to six objects (shape, colour, size, cell) and optionally a rendered
three-letter word. Ground truth is known exactly, so every task, every answer style (for ASD) and every format check
is exact. The tasks mirror UCIT and CoIN by answer form:

=================  =========  ============================  ===========================
task               style      modelled on                   scorer
=================  =========  ============================  ===========================
shape              word       ImageNet-R (classification)   exact_match
mc-color           letter     ArxivQA (multiple choice)     mc_letter
caption            caption    VizWiz-caption                caption (CIDEr)
mc-shape           letter     IconQA (multiple choice)      mc_letter
count              number     CLEVR-Math                    numeric
caption-detail     caption    Flickr30k                     caption (CIDEr)
ocr                ocr        TextVQA / OCR-VQA             exact_match
grounding          box        CoIN Grounding (RefCOCO)      iou
yesno              yesno      VQAv2 / GQA yes-no            yesno
=================  =========  ============================  ===========================

Several tasks share an answer form with different content (two multiple-choice tasks, two caption tasks), as in UCIT:
with only distinct forms a new task's style overwrites every old one and all forgetting looks superficial.

Multiple-choice options are listed in a fixed order: on this scale shuffled options stayed at chance (see the
calibration notes in docs/SYNTHCIT.md). The pretraining mixture ("scene") teaches the base model to see: a dense scene
description in a form no continual task uses, so the zero-shot model knows the content but not the task formats.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mcit.data.synthcit_scenes import (
    CELL,
    COLORS,
    GRID,
    IMAGE_SIZE,
    LETTERS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    SceneObject,
    brief_caption,
    detailed_caption,
    scene_description,
)
from mcit.runtime.files import write_text_atomic

VERSION = 2
"""Generator version, stored in BUILD.json: a build made by another version is rebuilt. 2: the scene description
states the object count; multiple-choice tasks show one object; count asks only for the number of objects."""
PRETRAIN_TASK = "scene"
TASKS = ("shape", "mc-color", "caption", "mc-shape", "count", "caption-detail", "ocr", "grounding", "yesno")


_FONT: ImageFont.ImageFont | None = None


def _font() -> ImageFont.ImageFont:
    global _FONT
    if _FONT is None:
        # Pillow's bundled bitmap font: identical glyphs on every machine, no font files needed.
        _FONT = ImageFont.load_default_imagefont()
    return _FONT


def render(scene: Scene) -> Image.Image:
    """Draw a scene. Background tone and pixel noise vary per image (the 'renditions' of ImageNet-R, in miniature)."""
    rng = np.random.default_rng(scene.noise_seed)
    base = np.ones((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32) * np.array(scene.background, dtype=np.float32)
    base += rng.normal(0.0, 6.0, size=base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy = obj.centre()
        h = SIZES[obj.size]
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
        elif obj.shape == "cross":
            t = max(1, h // 2)
            draw.rectangle((cx - h, cy - t + 1, cx + h, cy + t - 1), fill=fill)
            draw.rectangle((cx - t + 1, cy - h, cx + t - 1, cy + h), fill=fill)
    if scene.word is not None and scene.word_row is not None:
        y = scene.word_row * CELL + 2
        draw.text((IMAGE_SIZE // 2 - 9, y), scene.word, fill=(10, 10, 10), font=_font())
    return img


# --------------------------------------------------------------------------------------------------------------------
# Scene sampling


def _sample_scene(rng: random.Random, n_objects: int, *, word: bool = False, unique: str | None = None) -> Scene:
    """Sample a scene. `unique` ("shape" or "color") makes that attribute distinct across objects, so a question that
    names it refers to exactly one object."""
    cells = list(range(GRID * GRID))
    word_row = None
    if word:
        word_row = rng.randrange(GRID)
        cells = [c for c in cells if c // GRID != word_row]
    chosen = rng.sample(cells, n_objects)
    shapes = rng.sample(SHAPES, n_objects) if unique == "shape" else [rng.choice(SHAPES) for _ in chosen]
    colors = rng.sample(list(COLORS), n_objects) if unique == "color" else [rng.choice(list(COLORS)) for _ in chosen]
    objects = []
    for s, c, cell in zip(shapes, colors, chosen):
        size = rng.choice(list(SIZES))
        slack = (CELL // 2 - 1) - SIZES[size]  # keep the object inside its cell
        objects.append(SceneObject(s, c, size, cell, rng.randint(-slack, slack), rng.randint(-slack, slack)))
    tone = rng.randint(200, 250)
    background = (tone + rng.randint(-8, 5), tone + rng.randint(-8, 5), tone + rng.randint(-8, 5))
    return Scene(objects, rng.choice(WORDS) if word else None, word_row, background, rng.randrange(2**31))


# --------------------------------------------------------------------------------------------------------------------
# Task builders: each returns (scene, question, answer, meta)

Example = tuple[Scene, str, str, dict]


def _mc_block(options: tuple[str, ...]) -> str:
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


def _shape(rng: random.Random) -> Example:
    scene = _sample_scene(rng, 1)
    obj = scene.objects[0]
    return scene, "What is the shape of the object? Answer with one word.", obj.shape, {"candidates": list(SHAPES)}


def _mc_color(rng: random.Random) -> Example:
    scene = _sample_scene(rng, 1)
    target = rng.choice(scene.objects)
    options = tuple(COLORS)
    q = f"What color is the {target.shape}?\n{_mc_block(options)}\nAnswer with the option's letter from the given choices directly."
    return scene, q, LETTERS[options.index(target.color)], {"choices": list(options), "candidates": list(LETTERS)}


def _mc_shape(rng: random.Random) -> Example:
    scene = _sample_scene(rng, 1)
    target = rng.choice(scene.objects)
    options = SHAPES
    q = f"Which shape is {target.color}?\n{_mc_block(options)}\nAnswer with the option's letter from the given choices directly."
    return scene, q, LETTERS[options.index(target.shape)], {"choices": list(options), "candidates": list(LETTERS)}


def _caption(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 3))
    return scene, "Describe the image briefly.", brief_caption(scene), {}


def _caption_detail(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 3))
    return scene, "Describe the image in detail.", detailed_caption(scene), {}


def _count(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 6))
    cands = [str(i) for i in range(7)]
    return scene, "How many objects are there? Answer with a number.", str(len(scene.objects)), {"candidates": cands}


def _ocr(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(0, 2), word=True)
    return scene, "What word is written in the image?", scene.word or "", {"candidates": list(WORDS)}


def _grounding(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 3), unique="shape")
    target = rng.choice(scene.objects)
    q = f"Give the bounding box of the {target.color} {target.shape} as [x1, y1, x2, y2]."
    box = "[" + ", ".join(f"{v:.2f}" for v in target.box()) + "]"
    return scene, q, box, {}


def _yesno(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 3))
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if rng.random() < 0.5:  # balance the answers: half the questions name an object that is present
        o = rng.choice(scene.objects)
        color, shape = o.color, o.shape
    present = any(o.color == color and o.shape == shape for o in scene.objects)
    return scene, f"Is there a {color} {shape} in the image? Answer yes or no.", "yes" if present else "no", {
        "candidates": ["yes", "no"]}


def _scene(rng: random.Random) -> Example:
    scene = _sample_scene(rng, rng.randint(1, 6) if rng.random() < 0.7 else rng.randint(0, 2), word=rng.random() < 0.3)
    if not scene.objects and not scene.word:
        scene = _sample_scene(rng, 1)
    return scene, "Report the scene.", scene_description(scene), {}


BUILDERS: dict[str, tuple[Callable[[random.Random], Example], str, str]] = {
    # name: (builder, answer style, scorer)
    "shape": (_shape, "word", "exact_match"),
    "mc-color": (_mc_color, "letter", "mc_letter"),
    "caption": (_caption, "caption", "caption"),
    "mc-shape": (_mc_shape, "letter", "mc_letter"),
    "count": (_count, "number", "numeric"),
    "caption-detail": (_caption_detail, "caption", "caption"),
    "ocr": (_ocr, "ocr", "exact_match"),
    "grounding": (_grounding, "box", "iou"),
    "yesno": (_yesno, "yesno", "yesno"),
    PRETRAIN_TASK: (_scene, "free", "exact_match"),
}


def scene_truth(scene: Scene) -> dict:
    return {
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell, "dx": o.dx, "dy": o.dy}
                    for o in scene.objects],
        "word": scene.word,
        "word_row": scene.word_row,
        "background": list(scene.background),
    }


# --------------------------------------------------------------------------------------------------------------------
# Building the benchmark on disk


@dataclass
class BuildConfig:
    """Sizes of SynthCIT. Defaults: a few thousand train and a few hundred test samples per task."""

    seed: int = 0
    n_train: int = 2000
    n_test: int = 200
    n_pretrain: int = 30000
    n_pretrain_test: int = 300
    tasks: tuple[str, ...] = TASKS


def _task_seed(seed: int, task: str, split: str) -> int:
    # A stable per-(task, split) seed, independent of build order and Python's hash randomisation.
    return (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(f"{task}/{split}"))) % (2**31)


def _build_split(args: tuple[Path, str, str, int, int, frozenset[str]]) -> tuple[str, str, list[dict], set[str]]:
    root, task, split, n, seed, forbidden = args
    builder = BUILDERS[task][0]
    rng = random.Random(_task_seed(seed, task, split))
    img_dir = root / "images" / task / split
    img_dir.mkdir(parents=True, exist_ok=True)
    records, keys = [], set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError(f"SynthCIT: could not draw {n} distinct {task}/{split} samples")
        scene, question, answer, meta = builder(rng)
        key = json.dumps([scene_truth(scene), question], sort_keys=True)
        # train/test never share a (scene layout, question) pair; noise differs anyway
        if key in forbidden or key in keys:
            continue
        keys.add(key)
        idx = len(records)
        rel = f"images/{task}/{split}/{idx:05d}.png"
        render(scene).save(root / rel, compress_level=1)
        meta = dict(meta)
        meta.update(style=BUILDERS[task][1], brief=brief_caption(scene) if scene.objects else None,
                    detailed=detailed_caption(scene) if scene.objects else None, truth=scene_truth(scene))
        records.append({
            "id": f"{task}-{split}-{idx:05d}",
            "image": rel,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            "meta": meta,
        })
    return task, split, records, keys


def build(root: str | Path, config: BuildConfig | None = None, workers: int | None = None,
          progress: bool = True) -> Path:
    """Write SynthCIT to `root` as LLaVA-format JSON + PNG images. Deterministic from `config.seed`.

    Layout: root/<task>/{train,test}.json, root/images/<task>/<split>/NNNNN.png, root/BUILD.json (config + counts).
    Re-running with the same config on a complete build is a no-op.
    """
    from tqdm import tqdm

    cfg = config or BuildConfig()
    root = Path(root)
    stamp = root / "BUILD.json"
    cfg_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    cfg_dict["version"] = VERSION
    if stamp.exists() and json.loads(stamp.read_text()).get("config") == cfg_dict:
        return root
    root.mkdir(parents=True, exist_ok=True)
    tasks = list(cfg.tasks) + [PRETRAIN_TASK]
    sizes = {t: (cfg.n_pretrain, cfg.n_pretrain_test) if t == PRETRAIN_TASK else (cfg.n_train, cfg.n_test) for t in tasks}
    # test first, so train can exclude anything that landed in test
    test_jobs = [(root, t, "test", sizes[t][1], cfg.seed, frozenset()) for t in tasks]
    workers = workers or min(4, os.cpu_count() or 1)
    counts: dict[str, dict[str, int]] = {}
    with ProcessPoolExecutor(workers) as pool:
        test_keys = {}
        for task, split, records, keys in tqdm(pool.map(_build_split, test_jobs), total=len(test_jobs),
                                               desc="SynthCIT test splits", disable=not progress):
            _write_json(root / task / f"{split}.json", records)
            test_keys[task] = frozenset(keys)
            counts.setdefault(task, {})[split] = len(records)
        train_jobs = [(root, t, "train", sizes[t][0], cfg.seed, test_keys[t]) for t in tasks]
        for task, split, records, _ in tqdm(pool.map(_build_split, train_jobs), total=len(train_jobs),
                                            desc="SynthCIT train splits", disable=not progress):
            _write_json(root / task / f"{split}.json", records)
            counts.setdefault(task, {})[split] = len(records)
    write_text_atomic(stamp, json.dumps({"config": cfg_dict, "counts": counts}, indent=1))
    return root


def _built_version(root: Path) -> int | None:
    stamp = root / "BUILD.json"
    try:
        return json.loads(stamp.read_text()).get("config", {}).get("version", 1)
    except (OSError, ValueError, AttributeError):
        return None


def _write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records))


def default_root() -> Path:
    """Where SynthCIT lives unless a card or MCIT_SYNTHCIT_ROOT says otherwise."""
    env = os.environ.get("MCIT_SYNTHCIT_ROOT")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("MCIT_CACHE", "~/.cache/mcit")).expanduser() / "synthcit"


def ensure_built(root: str | Path | None = None, config: BuildConfig | None = None) -> Path:
    """Build SynthCIT on first use (the data card's root); cheap when already built.

    Serialised with a file lock: every rank of a distributed job (or parallel tests) may call it at once."""
    import fcntl

    root = Path(root or default_root()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if config is None and _built_version(root) == VERSION:
                return root  # any complete build of this version will do (tests build small ones)
            return build(root, config)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def corpus() -> list[str]:
    """Text that the tiny model's tokenizer is trained on: every question/answer form SynthCIT can produce, plus the
    generic instruction words that ASD adds."""
    rng = random.Random(1234)
    lines = []
    for task in BUILDERS:
        for _ in range(400):
            scene, q, a, meta = BUILDERS[task][0](rng)
            lines += [q, a, brief_caption(scene) if scene.objects else "", detailed_caption(scene) if scene.objects else ""]
    lines += [
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Answer yes or no. Is the answer correct? Please answer in about twenty words. Please answer in detail.",
        "USER: ASSISTANT: The answer is 0 1 2 3 4 5 6 7 8 9 , . ; : ? ! ( ) [ ]",
    ]
    # the chat wrapper and the rendered words recur in every sample: give them whole tokens
    lines += ["USER: ASSISTANT:"] * 500 + [" ".join(f"text {w}" for w in WORDS)] * 100
    return [line for line in lines if line]
