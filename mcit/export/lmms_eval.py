"""lmms-eval interoperability: an mcit checkpoint evaluated by lmms-eval, and an mcit suite's tasks as lmms-eval tasks.

lmms-eval (the field's common evaluation harness) is optional: nothing here imports it at module level, so mcit
works without it; what needs it raises McitError with the install line. Three pieces:

- A merged full model (`mcit export RUN --full`) is a plain `LlavaForConditionalGeneration` folder with its processor
  and chat template; lmms-eval's own `llava_hf` model loads it (`--model llava_hf --model_args pretrained=DIR`) and
  needs nothing from mcit.
- `McitModel`, an lmms-eval model named `mcit`, answers with any checkpoint `mcit.load` accepts (a stage folder, an
  `--experts` export, an adapter, a full model) through mcit's own generation: the model's prompt format as training
  rendered it, batched greedy decoding, and routing by the method's `eval_groups`. A routed expert set cannot be
  merged into one model without losing what it learned (docs/EXPORT.md), so this is how HiDe or DISCO runs reach
  lmms-eval. lmms-eval only knows the models in its registry, so `mcit lmms-eval ARGS` registers
  `mcit` (with `mcit.load` as its loader: this layer may not import the workflows that load checkpoints) and then
  runs lmms-eval's own command line with ARGS, the arguments `lmms-eval` takes.
- `write_lmms_tasks` writes one lmms-eval task per task of an mcit evaluation suite (eval/*.yaml): a JSONL file of the
  exact test samples `mcit eval` scores and a YAML that lmms-eval reads with `--include_path DIR`
  (`mcit lmms-tasks SUITE --out DIR`). The task scores
  with the card's own scorer (the `mcit_score` metric), so an lmms-eval score and an `mcit eval` score of the same
  answers are the same number.

Deviations from `mcit eval` that remain: lmms-eval has no constrained (likelihood-ranked) scores or format labels; the
`mcit` model does not implement lmms-eval's loglikelihood requests (multiple-choice-by-likelihood tasks); box answers
of grounding tasks are written in the release's frame (`mcit eval` rewrites them into the frame the model's
preprocessing shows); the sample subset of a task with `max_test` is the one of `seed` (default 0), while `mcit eval`
uses the evaluated run's seed.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mcit.data import synthcit
from mcit.data.collate import Encoder, PixelCache
from mcit.data.images import decode_image
from mcit.data.records import IMAGE_PREFIX, IMAGE_TOKEN, Sample
from mcit.data.validate import validate_card
from mcit.errors import DataError, EvalError, McitError
from mcit.evaluation.generate import generate
from mcit.evaluation.scorers import get_scorer
from mcit.evaluation.suites import EvalSuite, load_suite

MODEL_NAME = "mcit"
"""The name `--model` takes in lmms-eval for `McitModel`."""
MODULE = "mcit.export.lmms_eval"
"""This module's import name (not `__name__`, which is `__main__` under `python -m`): lmms-eval imports it by name."""
MODEL_CLASS_PATH = f"{MODULE}.McitModel"
METRIC = "mcit_score"
"""The metric of the written tasks: the card's scorer over the whole task, on [0, 100] (captions clipped at 100, as in
the accuracy matrix)."""
INSTALL_HINT = ('install lmms-eval next to mcit: pip install "lmms-eval>=0.7" torch==<your torch version> (or '
                'pip install -e ".[lmms]"); pinning torch in the same command keeps pip from replacing it')
_LMMS_CLASS: type | None = None
_LOADER: Callable[[str], tuple] | None = None
"""`mcit.load`, handed over by `register`: the checkpoint loader lives in the workflows layer, above this one."""


# --- lmms-eval, imported only when asked for ---------------------------------------------------------------------


def require_lmms_eval():
    """The lmms_eval package, or McitError saying how to install it."""
    try:
        import lmms_eval
    except ImportError as exc:
        raise McitError(f"lmms-eval is not importable ({exc}); {INSTALL_HINT}") from None
    return lmms_eval


def model_manifest():
    """lmms-eval's registration record for `McitModel` (its `ModelManifest`); also the payload an entry point of the
    group `lmms_eval.models` may return, which lmms-eval loads by itself when mcit declares one."""
    require_lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)


def register(loader: Callable[[str], tuple]) -> None:
    """Add the `mcit` model to lmms-eval's model registry of this process (lmms-eval >= 0.7, registry v2); `loader`
    turns its `pretrained=` argument into `(model, processor, method, recipe)` (`mcit.load`)."""
    global _LOADER
    lmms_eval = require_lmms_eval()
    try:
        from lmms_eval import models
    except ImportError as exc:
        raise McitError(f"lmms-eval {getattr(lmms_eval, '__version__', '?')}: its models package does not import "
                        f"({exc}); {INSTALL_HINT}") from None
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is None:
        raise McitError("this lmms-eval has no MODEL_REGISTRY_V2 (added in lmms-eval 0.7); " + INSTALL_HINT)
    registry.register_manifest(model_manifest(), overwrite=True)
    models.AVAILABLE_MODELS[MODEL_NAME] = "McitModel"
    _LOADER = loader


def __getattr__(name: str):
    # The lmms-eval class is built on first access: lmms-eval's registry imports this module and reads `McitModel`,
    # and mcit itself never needs lmms-eval.
    if name == "McitModel":
        return _lmms_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lmms_model_class() -> type:
    global _LMMS_CLASS
    if _LMMS_CLASS is None:
        require_lmms_eval()
        from lmms_eval.api.model import lmms

        class McitModel(McitAnswerer, lmms):
            """lmms-eval's `mcit` model: `--model mcit --model_args pretrained=CHECKPOINT[,autocast=none]
            [,max_new_tokens=N]`; `--batch_size N` is mcit's generation batch (answers do not depend on it)."""

            is_simple = True

            def __init__(self, pretrained: str, batch_size: int | str = 1, max_batch_size: int | None = None,
                         device: str | None = None, autocast: str | None = None,
                         max_new_tokens: int | str | None = None, **unknown: Any) -> None:
                lmms.__init__(self)
                if unknown:
                    raise McitError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for the mcit model; "
                                    "it takes pretrained, autocast (bf16 | fp16 | none) and max_new_tokens")
                if device is not None:
                    warnings.warn(f"the mcit model places the checkpoint itself (as mcit.load does); --device "
                                  f"{device} is not used", UserWarning, stacklevel=2)
                if _LOADER is None:
                    raise McitError("the mcit model has no checkpoint loader: start lmms-eval through "
                                    "`mcit lmms-eval ...`, which registers it")
                McitAnswerer.__init__(self, *_LOADER(pretrained), batch_size=_batch_size(batch_size),
                                      autocast=autocast,
                                      max_new_tokens=None if max_new_tokens is None else int(max_new_tokens))

            def generate_until(self, requests) -> list[str]:
                items = []
                for request in requests:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                    doc = self.task_dict[task][split][doc_id]
                    visuals = doc_to_visual(doc) if doc_to_visual is not None else []
                    items.append(Request(context, list(visuals or []), dict(gen_kwargs or {}),
                                         str(doc.get("id", doc_id)), str(doc.get("mcit_task", task))))
                answers = self.answer(items)
                for request, answer in zip(requests, answers, strict=True):
                    self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
                return answers

            def loglikelihood(self, requests):
                raise EvalError("the mcit model answers generate_until tasks only; a loglikelihood (multiple choice "
                                "by likelihood) task needs `mcit eval`, whose constrained score ranks candidates")

            def generate_until_multi_round(self, requests):
                raise EvalError("the mcit model answers single-round generate_until tasks only")

        McitModel.__module__ = MODULE
        _LMMS_CLASS = McitModel
    return _LMMS_CLASS


def _batch_size(value: int | str) -> int:
    text = str(value)
    if text.startswith("auto"):
        return 64  # mcit's evaluation default (recipe eval.batch_size); greedy answers do not depend on it
    try:
        return max(1, int(text))
    except ValueError:
        raise McitError(f"--batch_size {value!r}: expected a number or 'auto'") from None


# --- answering requests the way `mcit eval` does ------------------------------------------------------------------


class Request:
    """One lmms-eval generation request as mcit needs it: the user text, its images, the generation settings."""

    def __init__(self, text: str, visuals: list, gen_kwargs: dict[str, Any], sample_id: str, task: str):
        self.text, self.visuals, self.gen_kwargs, self.sample_id, self.task = text, visuals, gen_kwargs, sample_id, task


class McitAnswerer:
    """Answers generation requests with a loaded checkpoint (`mcit.load`'s `(model, processor, method, recipe)`)
    exactly as `mcit eval` generates: the same Encoder prompt, `generate` (batched greedy, KV cache), the recipe's
    `autocast` unless given, and routing (`method.eval_groups`).

    Kept apart from lmms-eval's base class so that it works, and is tested, without lmms-eval. Images arrive as PIL
    images (lmms-eval's `doc_to_visual`); mcit's pixel cache and routers read image files, so each image is written
    once to a private temporary folder as PNG (lossless: the pixels mcit decodes are the ones lmms-eval gave).
    """

    def __init__(self, model, processor, method, recipe, *, batch_size: int = 64, autocast: str | None = None,
                 max_new_tokens: int | None = None):
        self.model, self.processor, self.method, self.recipe = model, processor, method, recipe
        self.encoder = Encoder(self.processor, self.recipe.train.max_length)
        self.pixels = PixelCache.from_recipe(self.processor, self.recipe)
        self.batch_size = batch_size
        self.autocast = self.recipe.model.autocast if autocast is None else _autocast(autocast)
        self.max_new_tokens = max_new_tokens or self.recipe.eval.max_new_tokens
        self._images = tempfile.TemporaryDirectory(prefix="mcit-lmms-images-")
        self._image_count = 0
        self._greedy_warned = False

    def answer(self, requests: Sequence[Request]) -> list[str]:
        """The answer to each request, in order: greedy, cut at the first of the request's `until` strings."""
        samples = [self._sample(r) for r in requests]
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._max_new_tokens(request.gen_kwargs), []).append(i)
        answers = [""] * len(requests)
        for max_new_tokens, indices in groups.items():
            group = [samples[i] for i in indices]
            for context, rows in self.method.eval_groups(self.model, group):
                with context:
                    outs = generate(self.model, self.encoder, [group[r] for r in rows], self.pixels,
                                    batch_size=self.batch_size, max_new_tokens=max_new_tokens, autocast=self.autocast)
                for r, out in zip(rows, outs, strict=True):
                    answers[indices[r]] = out
        return [_cut(answer, r.gen_kwargs.get("until")) for answer, r in zip(answers, requests, strict=True)]

    def _max_new_tokens(self, gen_kwargs: dict[str, Any]) -> int:
        sampled = float(gen_kwargs.get("temperature") or 0) > 0 or bool(gen_kwargs.get("do_sample"))
        if (sampled or int(gen_kwargs.get("num_beams") or 1) > 1) and not self._greedy_warned:
            warnings.warn("the task asks for sampling or beam search; the mcit model decodes greedily, as mcit eval "
                          "does", UserWarning, stacklevel=3)
            self._greedy_warned = True
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)

    def _sample(self, request: Request) -> Sample:
        visuals = [v for v in request.visuals if v is not None]
        if len(visuals) > 1:
            raise EvalError(f"task {request.task!r}, sample {request.sample_id!r}: {len(visuals)} images; mcit's "
                            "evaluation takes one image per sample")
        text = request.text.replace(IMAGE_TOKEN, "").strip() if IMAGE_TOKEN in request.text else request.text
        image = self._image_file(visuals[0], request) if visuals else None
        return Sample(id=request.sample_id, task=request.task, image=image,
                      turns=[((IMAGE_PREFIX if image else "") + text, "")])

    def _image_file(self, visual: Any, request: Request) -> str:
        if isinstance(visual, str | Path) and Path(visual).is_file():
            visual = decode_image(visual)
        if not hasattr(visual, "save"):
            raise EvalError(f"task {request.task!r}, sample {request.sample_id!r}: a visual of type "
                            f"{type(visual).__name__}; the mcit model takes images (PIL or an image file), not "
                            "video or audio")
        path = Path(self._images.name) / f"{self._image_count:07d}.png"
        self._image_count += 1
        visual.convert("RGB").save(path, format="PNG")
        return str(path)


def _autocast(value: str) -> str | None:
    choice = value.strip().lower()
    if choice in ("none", "fp32", "false", "off"):
        return None
    if choice in ("bf16", "fp16"):
        return choice
    raise McitError(f"autocast={value!r}: expected bf16, fp16 or none")


def _cut(answer: str, until: Any) -> str:
    """lmms-eval's `until`: the answer ends before the first stop string it contains."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in answer:
            answer = answer[:answer.index(stop)]
    return answer.strip()


# --- tasks -----------------------------------------------------------------------------------------------------------


def lmms_name(*parts: str) -> str:
    """An lmms-eval task or tag name from mcit names (lower case, `_` for anything but letters and digits)."""
    return "_".join(re.sub(r"[^a-z0-9]+", "_", part.lower()).strip("_") for part in parts if part)


def write_lmms_tasks(suite: str | Path | EvalSuite, out: str | Path, *, max_test: int | None = None, seed: int = 0,
                     prefix: str = "mcit", force: bool = False) -> list[str]:
    """Write every task of the evaluation suite `suite` (a path, a shipped suite's name, or an EvalSuite) as an
    lmms-eval task into `out`: `<name>.jsonl` (the test samples `mcit eval` scores, with their image paths, questions,
    references and scorer) and `<name>.yaml`. Returns the task names; every task also carries the tag
    `<prefix>_<suite>`, so `--tasks <prefix>_<suite>` runs them all.

    `out` must be new or empty unless `force` (then the files of the same names are replaced). The images are not
    copied: the JSONL names them by absolute path, so the folder works on the machine whose data it was written from.
    """
    suite = suite if isinstance(suite, EvalSuite) else load_suite(suite)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise McitError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise McitError(f"--out {out} already exists and is not empty; choose a new folder or add --force")
    tag = lmms_name(prefix, suite.name)
    written: list[tuple[str, str, str]] = []
    for card, task in suite.resolve():
        spec = card.task(task)
        if max_test is not None:
            spec.max_test = min(spec.max_test or max_test, max_test)
        if card.generator == "synthcit":
            synthcit.ensure_built(card.root_dir)
        report = validate_card(card, splits=("test",))
        if not report.ok:
            raise DataError(f"suite {suite.name!r}: card {card.name!r} has problems in its test split:\n"
                            f"{report.format()}")
        samples = card.load_task(task, "test", seed=seed)
        if not samples:
            raise DataError(f"suite {suite.name!r}, task {task!r}: no test samples")
        name = lmms_name(tag, task)
        docs = [_doc(sample, spec.scorer, spec.scorer_options) for sample in samples]
        written.append((name, task, "".join(json.dumps(doc) + "\n" for doc in docs)))
    names = [name for name, _, _ in written]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise EvalError(f"suite {suite.name!r}: two tasks both become the lmms-eval task {name!r}; rename one "
                            "with `name:` in the suite")
    out.mkdir(parents=True, exist_ok=True)
    for name, task, jsonl in written:
        (out / f"{name}.jsonl").write_text(jsonl, encoding="utf-8")
        (out / f"{name}.yaml").write_text(_task_yaml(name, tag, task, suite), encoding="utf-8")
    return names


def _doc(sample: Sample, scorer: str, scorer_options: dict[str, Any]) -> dict[str, Any]:
    if len(sample.turns) != 1:
        raise EvalError(f"task {sample.task!r}, sample {sample.id!r}: {len(sample.turns)} conversation turns; an "
                        "lmms-eval generation task asks one question per sample")
    # meta and scorer options as JSON text: their keys differ between samples, which a columnar dataset cannot hold
    return {"id": sample.id, "mcit_task": sample.task, "image": sample.image or "", "question": sample.question,
            "answer": sample.answer, "scorer": scorer, "scorer_options": json.dumps(scorer_options),
            "meta": json.dumps(sample.meta, default=str)}


def _task_yaml(name: str, tag: str, task: str, suite: EvalSuite) -> str:
    """The task's YAML, written as text: lmms-eval's `!function` tags are not plain YAML that a dumper writes."""
    q = json.dumps  # a JSON string is a YAML scalar, quoted and escaped
    generation = {"max_new_tokens": suite.generation.max_new_tokens, "temperature": 0, "do_sample": False,
                  "num_beams": 1}
    lines = [
        f"# Written by mcit (mcit.export.lmms_eval.write_lmms_tasks) for suite {suite.name!r}, task {task!r}.",
        "# The samples are those `mcit eval` scores; the metric is the card's own scorer.",
        f"task: {q(name)}",
        f"tag: [{q(tag)}]",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {q(name + '.jsonl')}}}",
        "test_split: test",
        "output_type: generate_until",
        f"doc_to_visual: !function {MODULE}.doc_to_visual",
        f"doc_to_text: !function {MODULE}.doc_to_text",
        "doc_to_target: answer",
        f"process_results: !function {MODULE}.process_results",
        "metric_list:",
        f"  - metric: {METRIC}",
        f"    aggregation: !function {MODULE}.aggregate_score",
        "    higher_is_better: true",
        f"generation_kwargs: {json.dumps(generation)}",
        "metadata:",
        "  version: 1.0",
        f"  mcit_suite: {q(suite.name)}",
        f"  mcit_task: {q(task)}",
    ]
    return "\n".join(lines) + "\n"


def doc_to_visual(doc: dict[str, Any]) -> list:
    """lmms-eval: the sample's image, decoded as mcit decodes it (RGB), or none for a text-only sample."""
    return [decode_image(doc["image"])] if doc.get("image") else []


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """lmms-eval: the user text of the sample (suffixes already applied, without the image placeholder)."""
    return doc["question"]


def process_results(doc: dict[str, Any], results: list) -> dict[str, Any]:
    """lmms-eval: keep what the card's scorer needs; it runs over the whole task in `aggregate_score` (a corpus
    metric such as CIDEr is not a mean of per-sample numbers)."""
    prediction = getattr(results[0], "text", results[0]) if results else ""
    return {METRIC: {"id": doc["id"], "prediction": str(prediction).strip(), "reference": doc["answer"],
                     "meta": doc["meta"], "scorer": doc["scorer"], "scorer_options": doc["scorer_options"]}}


def aggregate_score(items: list[dict[str, Any]]) -> float:
    """lmms-eval: the card's scorer over every answer of the task, on [0, 100] as `mcit eval` reports it."""
    if not items:
        raise EvalError(f"{METRIC}: no answers to score")
    scorer = get_scorer(items[0]["scorer"], **json.loads(items[0]["scorer_options"]))
    result = scorer([it["prediction"] for it in items], [it["reference"] for it in items],
                    [json.loads(it["meta"]) for it in items])
    return min(100.0, float(result.score))

