"""Model cards for exported adapters and merged models, built with huggingface_hub's ModelCard API.

`card_info(results, ...)` turns a results.json (schema in docs/DESIGN.md) plus a few recipe values into the `info`
dict that `build_model_card(info)` renders. Keys of `info`:

    model_name (str), base_model (str), method (str), benchmark (str), tasks (list[str]), stages (list[str]),
    matrix (list[list[float | None]], rows = stages, 0-100), metrics (dict: MFT, MFN, MAA, BWT, ...),
    artifact ("adapter" | "merged" | "full": a full fine-tune without LoRA | "experts": the routed expert set), merge (str | None, the merge algorithm when several task LoRAs were merged),
    hyperparameters (dict, flattened to dotted keys), license (str | None), scorers (dict task -> scorer name),
    seed (int | None), repo_id (str | None),
    prompt_format (dict | None, from `prompt_format(processor)`: the base model's prompt format, shown in the card)

License decision: a recipe without `license` gets `license: other` plus a warning and a sentence in the card. We do
not default to apache-2.0 (the project's own license) because an adapter is a derivative of its base model, whose
license (e.g. Llama's) governs it; claiming a permissive license by default could be wrong.

Everything rendered passes through `scrub`: local absolute paths and home-relative paths become `<local-path>`,
`user@host` strings and this machine's user and host names are replaced, and a token-looking string aborts.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import warnings
from collections.abc import Iterable
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mcit.data.collate import Encoder
from mcit.data.records import IMAGE_PREFIX, Sample
from mcit.errors import DataError, McitError, ModelError
from mcit.evaluation.metrics import METRIC_MEANINGS
from mcit.models.loading import load_processor

TAGS = ["mcit", "continual-learning", "llava", "lora"]
PIPELINE_TAG = "image-text-to-text"
ARTIFACTS = {
    "adapter": "LoRA adapter (PEFT)",
    "merged": "full model with the LoRA merged into the weights",
    "full": "full model (every language-model weight fine-tuned, no adapter)",
    "experts": "expert set (every task's LoRA expert with the router and method state, as trained)",
}
PATH_PLACEHOLDER = "<local-path>"
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
# An absolute POSIX path not preceded by a word character, ':' or '/' (so URLs and "a/b" survive), a home-relative
# path, or a Windows drive path.
_PATH_PATTERN = re.compile(
    r"(?<![\w:/.<>-])/(?:[\w.+@-]+/)*[\w.+@-]*[\w+@-]/?"
    r"|(?<![\w/])~[\w.-]*(?:/[\w.+@-]*[\w+@-])+/?"
    r"|\b[A-Za-z]:\\[^\s|`'\"]*"
)
_USER_AT_HOST = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\b")
# Account names too generic to identify anyone, and too common as words to replace safely.
_GENERIC_NAMES = {"root", "user", "admin", "ubuntu", "runner", "jovyan", "localhost", "mcit"}
# The conversation the card's "Prompt format" section renders.
EXAMPLE_TURN = (IMAGE_PREFIX + "What is the shape in the image?", "A red circle.")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Return `text` without local paths, user or host names; raise McitError if it contains a token.

    The error names the line, never the token. `secrets` are extra strings that must not appear (e.g. the token
    about to be used for an upload).
    """
    for secret in [s for s in secrets if s and len(s) >= 8]:  # shorter strings would match ordinary words
        if secret in text:
            raise McitError(f"the text contains a secret (line {_line_of(text, text.index(secret))}); not writing it")
    match = TOKEN_PATTERN.search(text)
    if match:
        raise McitError(
            f"the text contains a token-looking string 'hf_...' at line {_line_of(text, match.start())}; "
            "remove it from the recipe/results before exporting"
        )
    text = _PATH_PATTERN.sub(PATH_PLACEHOLDER, text)
    text = _USER_AT_HOST.sub("<user>@<host>", text)
    for name, placeholder in ((_safe(socket.gethostname), "<host>"), (_safe(getpass.getuser), "<user>")):
        if name and len(name) >= 3 and name.lower() not in _GENERIC_NAMES:
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", placeholder, text)
    return text


def prompt_format(processor) -> dict[str, Any]:
    """The base model's prompt format, as training and evaluation build it (mcit.data.collate.Encoder: the
    processor's chat template, BOS where the tokenizer adds one, every answer closed by EOS), for `card_info`."""
    encoder = Encoder(processor)
    conversation, prompt = encoder.readable(Sample("example", "example", "image", [EXAMPLE_TURN]))
    return {"prompt": prompt, "conversation": conversation, "eos": encoder.eos_token,
            "bos": encoder.prefix_text or None, "image_token": encoder.image_token,
            "image_tokens": encoder.image_tokens, "image_tokens_vary": encoder.images.fixed is None}


def model_prompt_format(model_config) -> dict[str, Any] | None:
    """`prompt_format` of the processor of a recipe's `model` section; None (with a warning) where that processor
    cannot be loaded here (a Hub base never downloaded on this machine): the card then goes without the section."""
    try:
        return prompt_format(load_processor(model_config))
    except (ModelError, DataError) as exc:
        warnings.warn(f"the model card has no 'Prompt format' section: {exc}", UserWarning, stacklevel=2)
        return None


def card_info(
    results: dict[str, Any],
    *,
    base_model: str,
    artifact: str = "adapter",
    merge: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    license: str | None = None,
    scorers: dict[str, str] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    prompt_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the `info` dict for `build_model_card` from a results.json dict and recipe values."""
    for key in ("method", "tasks", "stages", "matrix"):
        if key not in results:
            raise McitError(f"results.json has no {key!r}; re-run `mcit eval` to regenerate it")
    benchmark = results.get("benchmark", "custom")
    return {
        "model_name": model_name or (repo_id.split("/")[-1] if repo_id else f"mcit-{results['method']}-{benchmark}"),
        "base_model": base_model,
        "method": results["method"],
        "benchmark": benchmark,
        "tasks": list(results["tasks"]),
        "stages": list(results["stages"]),
        "matrix": results["matrix"],
        "metrics": dict(results.get("metrics") or {}),
        "artifact": artifact,
        "merge": merge,
        "hyperparameters": dict(hyperparameters or {}),
        "license": license,
        "scorers": dict(scorers or {}),
        "seed": results.get("seed"),
        "repo_id": repo_id,
        "prompt_format": prompt_format,
    }


def build_model_card(info: dict[str, Any]) -> ModelCard:
    """Render `info` (see the module docstring) as a ModelCard with model-index eval results; scrubbed."""
    tasks, stages, matrix = info["tasks"], info["stages"], info["matrix"]
    if len(matrix) != len(stages) or any(len(row) != len(tasks) for row in matrix):
        raise McitError(
            f"accuracy matrix is {len(matrix)}x{len(matrix[0]) if matrix else 0} but there are {len(stages)} stages "
            f"and {len(tasks)} tasks; results.json 'matrix' must have one row per stage and one column per task"
        )
    artifact = info.get("artifact", "adapter")
    if artifact not in ARTIFACTS:
        raise McitError(f"artifact must be one of {', '.join(ARTIFACTS)}, got {artifact!r}")
    license_id = info.get("license")
    if not license_id:
        warnings.warn(
            "the recipe sets no license: the model card says `license: other`; set `license:` in the recipe to the "
            "license that the base model allows",
            UserWarning,
            stacklevel=2,
        )
    base_model = info["base_model"]
    card_data = ModelCardData(
        base_model=base_model if _is_hub_id(base_model) else None,
        library_name="peft" if artifact in ("adapter", "experts") else "transformers",
        license=license_id or "other",
        pipeline_tag=PIPELINE_TAG,
        tags=[tag for tag in TAGS if artifact != "full" or tag != "lora"],
        model_name=info["model_name"],
        eval_results=_eval_results(info) or None,
    )
    body = _body(info, license_id)
    content = f"---\n{card_data.to_yaml()}\n---\n\n{body}"
    return ModelCard(scrub(content, secrets=[os.environ.get("HF_TOKEN", "")]))


def accuracy_table(stages: list[str], tasks: list[str], matrix: list[list[float | None]]) -> str:
    """The accuracy matrix as a Markdown table: one row per stage ('after <task>'), one column per task."""
    header = "| after stage | " + " | ".join(_cell(t) for t in tasks) + " |"
    rule = "|---|" + "---:|" * len(tasks)
    rows = [f"| {_cell(stage)} | " + " | ".join(_number(v) for v in row) + " |" for stage, row in zip(stages, matrix)]
    return "\n".join([header, rule, *rows])


def _eval_results(info: dict[str, Any]) -> list[EvalResult]:
    final = info["matrix"][-1]
    benchmark = info["benchmark"]
    results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            dataset_type=task,
            dataset_name=task,
            metric_type=info.get("scorers", {}).get(task, "score"),
            metric_name=f"{task} score after the last stage (0-100)",
            metric_value=round(float(value), 2),
        )
        for task, value in zip(info["tasks"], final)
        if value is not None
    ]
    for name, value in info.get("metrics", {}).items():
        if value is None:
            continue
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                dataset_type=benchmark,
                dataset_name=f"{benchmark} ({len(info['tasks'])} tasks, in sequence)",
                metric_type=name,
                metric_name=f"{name}: {METRIC_MEANINGS.get(name, 'continual-learning metric')}",
                metric_value=round(float(value), 2),
            )
        )
    return results


def _body(info: dict[str, Any], license_id: str | None) -> str:
    artifact, base, method = info.get("artifact", "adapter"), info["base_model"], info["method"]
    what = ARTIFACTS[artifact]
    sequence = " → ".join(info["tasks"])
    lines = [
        f"# {info['model_name']}",
        "",
        f"A {what} for `{base}`, trained with mcit by continual instruction tuning on **{info['benchmark']}** "
        f"with the **{method}** method, one task after another: {sequence}.",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`" + ("" if _is_hub_id(base) else " (not a Hub model; provide it yourself)"),
        f"- Method: `{method}`",
        f"- Task sequence: {sequence}",
    ]
    if info.get("seed") is not None:
        lines.append(f"- Seed: {info['seed']}")
    hyper = _flatten(info.get("hyperparameters", {}))
    if hyper:
        lines += ["", "| hyper-parameter | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_format_value(v))} |" for k, v in sorted(hyper.items())]
    merge = info.get("merge")
    lines += ["", "## Merging", ""]
    if merge:
        lines.append(f"The per-task LoRAs were merged into this single adapter with **{merge}** (`mcit.export.merge`). "
                     "The scores below were measured on the run's own model, before merging; evaluate this export "
                     "with `mcit eval` to measure what the merge kept.")
    elif artifact == "full":
        lines.append("No merging: every weight of the language model was trained; this is the model as trained.")
    elif artifact == "experts":
        lines.append("No merging: every expert is kept with the router's prototypes and the method's state, so "
                     "routed inference is exactly that of the run; load it with `mcit.load(folder)` or evaluate it "
                     "with `mcit eval --checkpoint folder`.")
    else:
        lines.append("No merging: this is the adapter as trained, after its last training stage.")
    lines += [
        "",
        "## Results",
        "",
        "Scores (0-100) on each task's test split after each training stage (rows); `–` = not evaluated.",
        "",
        accuracy_table(info["stages"], info["tasks"], info["matrix"]),
    ]
    metrics = {k: v for k, v in info.get("metrics", {}).items() if v is not None}
    if metrics:
        lines += ["", "| metric | value | meaning |", "|---|---:|---|"]
        lines += [f"| {k} | {_number(v)} | {METRIC_MEANINGS.get(k, '')} |" for k, v in metrics.items()]
    if info.get("prompt_format"):
        lines += ["", *_prompt_section(info["prompt_format"])]
    if artifact == "adapter" and _is_hub_id(base):
        repo = info.get("repo_id") or "<this-repo>"
        lines += [
            "",
            "## Usage",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'processor = AutoProcessor.from_pretrained("{base}")',
            "```",
        ]
    elif artifact not in ("adapter", "experts") and info.get("repo_id"):
        lines += [
            "",
            "## Usage",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'model = AutoModelForImageTextToText.from_pretrained("{info["repo_id"]}")',
            f'processor = AutoProcessor.from_pretrained("{info["repo_id"]}")',
            "```",
        ]
    lines += ["", "## License", ""]
    if license_id:
        lines.append(f"`{license_id}`, subject to the license of the base model `{base}`.")
    else:
        lines.append(
            f"Not specified by the training recipe. This {'adapter' if artifact == 'adapter' else 'model'} derives from `{base}`; its use is governed by "
            "the base model's license."
        )
    return "\n".join(lines) + "\n"


def _image_tokens(fmt: dict[str, Any]) -> str:
    if fmt.get("image_tokens_vary"):
        return (f"the tokens (their number depends on the image's size: {fmt['image_tokens']} for a 1024 x 1024 "
                "image)")
    return f"the {fmt['image_tokens']} placeholder tokens"


def _prompt_section(fmt: dict[str, Any]) -> list[str]:
    eos, bos = fmt["eos"], fmt.get("bos")
    added = (f" The tokenizer adds `{bos}` itself when the processor tokenizes the text "
             "(`processor(text=..., images=...)`)." if bos else " Nothing comes before the text (no BOS).")
    return [
        "## Prompt format",
        "",
        "Training and evaluation used the base model's own prompt format: its processor's chat template "
        "(`processor.apply_chat_template(messages, add_generation_prompt=True)`), special tokens as the model reads "
        f"them.{added} `{fmt['image_token']}` stands for {_image_tokens(fmt)} the processor expands one image "
        "into. The prompt for an answer:",
        "",
        "```text",
        fmt["prompt"],
        "```",
        "",
        f"A trained example: the loss covers the answer and the `{eos}` that ends it, so generation stops at "
        f"`{eos}`; in a conversation every answer ends with `{eos}`.",
        "",
        "```text",
        fmt["conversation"],
        "```",
    ]


def _is_hub_id(name: str) -> bool:
    """A Hub repo id ("org/name" or "name"), not a local path nor a builtin model."""
    if ":" in name or name.startswith(("/", "~", ".")) or "\\" in name:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _safe(get) -> str:
    try:
        return get()
    except Exception:  # no user/host name available (e.g. an anonymous container uid)
        return ""
