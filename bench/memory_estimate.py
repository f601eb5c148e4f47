"""Estimated GPU memory and wall time of the UCIT recipes on LLaVA-1.5-7B at 8 and 16 GPUs (ZeRO-2 and ZeRO-3).

Nothing here is measured on a GPU. The parameter counts are exact: LLaVA-1.5-7B's architecture is built on the meta
device (no weights, no memory) and every method of `recipes/ucit/` is attached to it through mcit's own code
(`build_method(recipe).attach`, then `prepare` for each of the six stages), so the adapters, gates and experts are
the ones a real run creates. Everything derived from the counts (optimizer state, activations, KV cache, time) is an
estimate from the formulas in this file, each stated where it is used.

    python -m bench.memory_estimate            # count, estimate, write bench/results/memory_estimate.json and the
                                               # tables of docs/DISTRIBUTED.md (under 2 minutes on 2 cores)
    python -m bench.memory_estimate --render   # only rewrite the tables from the committed result file
    python -m bench memory_estimate            # the same as the first line, as a part of `python -m bench`

The JSON is committed (bench/results/), so the numbers in docs/DISTRIBUTED.md are regenerated from it, never typed.
With `MCIT_UCIT_ROOT` set to a UCIT copy, the training-sample counts of the wall-time table are counted from the data
instead of taken from the file names (see `task_sizes`).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, read_json, write_json

RESULT = REPO / "bench" / "results" / "memory_estimate.json"
DOC = REPO / "docs" / "DISTRIBUTED.md"
BEGIN = "<!-- BEGIN memory_estimate: written by `python -m bench.memory_estimate --render`; do not edit by hand -->"
END = "<!-- END memory_estimate -->"

METHODS = ("lora_ft", "joint", "replay", "hide", "disco", "moelora", "olora", "reglora", "sefe")
WORLD_SIZES = (8, 16)
TASKS = 6

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): Vicuna-7B language model, CLIP ViT-L/14 at 336 px, 2-layer GELU projector.
TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
          "image_size": 336, "patch_size": 14, "projection_dim": 768}
LLAVA = {"projector_hidden_act": "gelu", "vision_feature_layer": -2, "image_token_index": 32000}

IMAGE_TOKENS = 576  # (336 / 14)^2 patches, the CLS token dropped (vision_feature_select_strategy "default")
TEXT_TOKENS = 200   # assumed instruction + answer length of a UCIT sample (captions are longer, letters shorter)

# Bytes per parameter (bf16 mixed precision with DeepSpeed): bf16 weights; for a trainable parameter an fp32 master
# copy and AdamW's two fp32 moments (4 + 4 + 4) plus a bf16 gradient.
WEIGHT_B, OPTIMIZER_B, GRAD_B = 2, 12, 2
# RegLoRA keeps per adapted matrix its key positions (int32) and, while training, their row and column (int64 each,
# `RegLoRA._rows_cols`): 4 + 8 + 8 bytes per key, on every rank (method tensors are not partitioned by ZeRO).
REGLORA_KEY_B = 4 + 8 + 8
REGLORA_EVAL_KEY_B = 4  # after_task drops the cached rows and columns; evaluation holds the int32 keys only

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
MFU = 0.40                # assumed model FLOPs utilisation


# --- counting on the meta device --------------------------------------------------------------------------------------

def llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=CLIPVisionConfig(**VISION), **LLAVA)


def meta_model():
    """LLaVA-1.5-7B with shapes only: parameters on the meta device take no memory and no initialisation time."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config())
    model.requires_grad_(False)  # as mcit.models.loading.load_base leaves it
    return model


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def base_counts(model) -> dict[str, int]:
    inner = model.model
    return {"total": _numel(model), "language_model": _numel(inner.language_model) + _numel(model.lm_head),
            "lm_head": _numel(model.lm_head), "vision_tower": _numel(inner.vision_tower),
            "projector": _numel(inner.multi_modal_projector)}


LAYER_NAME = re.compile(r"(?:\.layers\.\d+|embed_tokens|lm_head|multi_modal_projector)$")


def largest_layer(model) -> int:
    """Parameters of the biggest unit ZeRO-3 gathers at once: a decoder or vision layer (with its adapters), the
    embedding, the LM head or the projector."""
    return max(_numel(m) for name, m in model.named_modules() if LAYER_NAME.search(name))


def adapter_params(model) -> int:
    """Parameters the method added: LoRA factors of every adapter and mcit's own modules (MoELoRA gates)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "mcit_" in n)


def attach(method_name: str) -> dict[str, Any]:
    """Attach `recipes/ucit/<method>.yaml`'s method to the meta model as a run does and count every stage."""
    from mcit.config import load_recipe
    from mcit.methods.base import RunContext, TaskData, build_method

    recipe = load_recipe(REPO / "recipes" / "ucit" / f"{method_name}.yaml")
    method = build_method(recipe)
    names = [f"task{t}" for t in range(TASKS)]
    model = method.attach(meta_model(), RunContext(processor=None, recipe=recipe,
                                                   data=TaskData(names=names, train={}, test={})))
    stages = []
    for stage, task_ids in enumerate(method.schedule(TASKS)):
        if method_name == "disco":
            # DISCO picks a slot from the task's CLIP text prototype (before_task, data-dependent). Here each task
            # opens a slot of its own, as it does when no two tasks' prototypes reach the 0.9 cosine: an upper
            # bound on the slots held (6 tasks < max_slots 8).
            slot = method.expert_name(stage)
            method._ensure_expert(model, slot)
            method._activate(model, slot)
        else:
            method.prepare(model, stage, task_ids)
        stages.append({"stage": stage + 1, "tasks": len(task_ids),
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "total": _numel(model), "adapters": adapter_params(model),
                       "largest_layer": largest_layer(model)})
    lora = recipe.method.lora
    out = {"method": method_name, "recipe": f"recipes/ucit/{method_name}.yaml", "r": lora.r, "alpha": lora.alpha,
           "target_modules": list(lora.target_modules), "options": dict(recipe.method.options),
           "deepspeed": recipe.train.deepspeed, "batch_size": recipe.train.batch_size,
           "grad_accum": recipe.train.grad_accum, "gradient_checkpointing": recipe.model.gradient_checkpointing,
           "train_projector": recipe.model.train_projector, "eval_batch_size": recipe.eval.batch_size,
           "max_new_tokens": recipe.eval.max_new_tokens, "stages": stages}
    out["zero_stages"] = supported_zero_stages(method_name)
    if method_name in ("reglora", "sefe"):
        out["reglora_keys"] = reglora_keys(model, recipe.method.options.get("key_fraction", 0.02))
    if method_name == "replay":
        out["replay_per_task"] = int(recipe.method.options.get("per_task", 100))
    return out


def supported_zero_stages(method_name: str) -> list[int]:
    """The ZeRO stages the method accepts: its recipe with `train.deepspeed` overridden, through the method's own
    checks (O-LoRA refuses ZeRO-3)."""
    from mcit.config import load_recipe
    from mcit.errors import RecipeError
    from mcit.methods.base import build_method

    stages = []
    for stage in (2, 3):
        try:
            build_method(load_recipe(REPO / "recipes" / "ucit" / f"{method_name}.yaml",
                                     [f"train.deepspeed=zero{stage}"]))
        except RecipeError:
            continue
        stages.append(stage)
    return stages


def reglora_keys(model, fraction: float) -> dict[str, Any]:
    """Key positions held while training task t: the union of t-1 tasks' top `fraction` of each adapted matrix, at
    most (t-1)·fraction of its entries (equal when no two tasks pick the same position). Computed from the shapes:
    on meta there is no delta to rank."""
    import math

    from peft.tuners.lora import LoraLayer

    entries, per_task = 0, 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            entries += base.numel()
            per_task += max(1, math.ceil(fraction * base.numel()))
    return {"adapted_entries": entries, "keys_per_task": per_task, "bytes_per_key": REGLORA_KEY_B,
            "bytes_per_key_eval": REGLORA_EVAL_KEY_B,
            "training_by_stage": [min(entries, (t - 1) * per_task) for t in range(1, TASKS + 1)],
            "eval_by_stage": [min(entries, t * per_task) for t in range(1, TASKS + 1)]}


def clip_router_params() -> dict[str, int]:
    """The router's CLIP encoders (HiDe: image + text, DISCO: text), built on meta from their published sizes."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))  # openai/clip-vit-large-patch14-336
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77,
                                            projection_dim=768))  # openai/clip-vit-large-patch14's text tower
    return {"image": _numel(image), "text": _numel(text)}


# --- the estimates ----------------------------------------------------------------------------------------------------

def activation_bytes(*, layers: int, hidden: int, heads: int, intermediate: int, vocab: int, seq: int, batch: int,
                     lora_dropout: bool) -> dict[str, float]:
    """Activation memory of one micro-batch in the language model, bf16 (Korthikanti et al., 2022, "Reducing
    Activation Recomputation in Large Transformer Models", eq. 1 without tensor parallelism):

    - without checkpointing, per layer: s·b·h·34 + 5·a·s²·b bytes (the second term is the attention score matrix,
      softmax and dropout; SDPA / flash attention never store it, so this is the eager-attention upper bound);
    - with checkpointing, per layer: the layer input, 2·s·b·h bytes, plus one layer's full activations while it is
      recomputed;
    - LoRA dropout (0.05 in every recipe): PEFT keeps dropout(x) (bf16) and its mask (1 byte) for each adapted
      linear's lora_A, 3·s·b·Σd_in bytes per layer with Σd_in = 6h + intermediate (q, k, v, o, gate, up read h,
      down reads the intermediate size);
    - logits: s·b·V elements, bf16 plus the fp32 copy and fp32 log-softmax of the loss, 10 bytes each.

    The vision tower is frozen and its input needs no gradient, so it keeps no activations for backward."""
    s, b, h, a = seq, batch, hidden, heads
    layer = 34 * s * b * h + 5 * a * s * s * b
    dropout = 3 * s * b * (6 * h + intermediate) if lora_dropout else 0
    logits = 10 * s * b * vocab
    return {"per_layer": layer, "lora_dropout_per_layer": dropout, "logits": logits,
            "no_checkpointing": layers * (layer + dropout) + logits,
            "checkpointing": layers * 2 * s * b * h + layer + dropout + logits}


def kv_cache_bytes(*, layers: int, hidden: int, kv_heads: int, heads: int, batch: int, tokens: int) -> int:
    """bf16 keys and values of every layer for `batch` sequences of `tokens` tokens."""
    return 2 * layers * batch * tokens * hidden * kv_heads // heads * 2


def zero_memory(*, total: int, trainable: int, largest: int, world: int, stage: int) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients and optimizer state under ZeRO `stage`:
    ZeRO-2 replicates the bf16 weights and partitions gradients and optimizer state over the ranks; ZeRO-3 also
    partitions the weights and gathers one layer at a time (`largest`: the biggest one, counted once; prefetching
    can hold the next layer too)."""
    weights = WEIGHT_B * total if stage == 2 else WEIGHT_B * total / world + WEIGHT_B * largest
    return {"weights": weights, "gradients": GRAD_B * trainable / world,
            "optimizer": OPTIMIZER_B * trainable / world}


def task_sizes() -> list[dict[str, Any]]:
    """Training samples per UCIT task: counted from $MCIT_UCIT_ROOT when it is set and present; otherwise the count
    in the file name (`train_4w.json`: 4 wan = 40,000, the UCIT release's naming); otherwise assumed 40,000 and
    marked as such (the card and the UCIT release notes give no count for those files)."""
    import os

    from mcit.data.cards import load_card

    card = load_card("ucit")
    root = os.environ.get("MCIT_UCIT_ROOT")
    out = []
    for task in card.tasks:
        if root and Path(root).is_dir():
            n = len(card.load_task(task.name, "train"))
            out.append({"task": task.name, "train": n, "source": "counted from MCIT_UCIT_ROOT"})
            continue
        match = re.search(r"_(\d+)w\.json$", str(task.train))
        if match:
            out.append({"task": task.name, "train": int(match.group(1)) * 10_000,
                        "source": f"file name {Path(str(task.train)).name}"})
        else:
            out.append({"task": task.name, "train": 40_000, "source": "assumed (no count in card or file name)"})
    return out


def wall_seconds(tokens: float, params: int, world: int, checkpointing: bool) -> float:
    """6·N FLOPs per trained token (forward 2N + backward 4N), 8·N with checkpointing (one more forward), at MFU of
    an H100's dense bf16 peak on each of `world` GPUs. A frozen base needs no weight gradients, so a LoRA step does
    closer to 4·N (6·N with checkpointing): these times are an upper estimate at the assumed MFU."""
    flops = tokens * 6 * params * (4 / 3 if checkpointing else 1)
    return flops / (world * H100_BF16_FLOPS * MFU)


def estimate(methods: tuple[str, ...] = METHODS, say=print) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    model = meta_model()
    base = base_counts(model)
    text = TEXT
    seq = IMAGE_TOKENS + TEXT_TOKENS
    results = []
    for name in methods:
        t0 = time.time()
        found = attach(name)
        say(f"memory_estimate: {name} attached on meta in {time.time() - t0:.0f} s")
        results.append(found)
    clip = clip_router_params()
    sizes = task_sizes()
    rows = []
    for found in results:
        last = found["stages"][-1]  # the most adapters are held at the last stage; trainable is the same or less
        trainable = max(s["trainable"] for s in found["stages"])
        acts = activation_bytes(layers=text["num_hidden_layers"], hidden=text["hidden_size"],
                                heads=text["num_attention_heads"], intermediate=text["intermediate_size"],
                                vocab=text["vocab_size"], seq=seq, batch=found["batch_size"], lora_dropout=True)
        keys = found.get("reglora_keys")
        method_bytes = keys["training_by_stage"][-1] * keys["bytes_per_key"] if keys else 0
        method_eval_bytes = keys["eval_by_stage"][-1] * keys["bytes_per_key_eval"] if keys else 0
        router = found["options"].get("router") or {}
        router_params = 0
        if router.get("source") == "clip":
            features = router.get("features", "both")
            router_params = (clip["image"] if features != "text" else 0) + (clip["text"] if features != "image" else 0)
        kv = kv_cache_bytes(layers=text["num_hidden_layers"], hidden=text["hidden_size"],
                            kv_heads=text["num_key_value_heads"], heads=text["num_attention_heads"],
                            batch=found["eval_batch_size"], tokens=seq + found["max_new_tokens"])
        for world in WORLD_SIZES:
            for stage in (2, 3):
                mem = zero_memory(total=last["total"], trainable=trainable, largest=last["largest_layer"],
                                  world=world, stage=stage)
                # The router's CLIP encoders (fp32, their checkpoints' dtype) stay on the GPU from the first
                # prototype pass to the end of the run: PrototypeRouter keeps its FeatureExtractor.
                states = sum(mem.values()) + method_bytes + 4 * router_params
                # Evaluation: under ZeRO-3 mcit gathers the full weights for the whole evaluation (every rank then
                # evaluates every sample), so the shards stay and the full bf16 weights come on top.
                eval_weights = WEIGHT_B * last["total"] * (1 + 1 / world if stage == 3 else 1)
                rows.append({"method": found["method"], "world": world, "zero": stage,
                             "supported": stage in found["zero_stages"], **mem, "method_tensors": method_bytes,
                             "activations_checkpointing": acts["checkpointing"],
                             "activations_no_checkpointing": acts["no_checkpointing"],
                             "train_checkpointing": states + acts["checkpointing"],
                             "train_no_checkpointing": states + acts["no_checkpointing"],
                             "eval_weights": eval_weights, "eval_kv_cache": kv,
                             "router_fp32": 4 * router_params,
                             "eval_method_tensors": method_eval_bytes,
                             "eval": eval_weights + kv + 4 * router_params + method_eval_bytes})
    tokens = [{**t, "tokens": t["train"] * seq} for t in sizes]
    replay = next((r for r in results if r["method"] == "replay"), None)
    wall = []
    for world in WORLD_SIZES:
        for ckpt in (True, False):
            per_task = [wall_seconds(t["tokens"], base["total"], world, ckpt) for t in tokens]
            extra = 0.0
            if replay:  # stage t also trains replay_per_task samples of each of the t-1 finished tasks
                extra = sum(wall_seconds(replay["replay_per_task"] * t * seq, base["total"], world, ckpt)
                            for t in range(TASKS))
            wall.append({"world": world, "checkpointing": ckpt, "per_task_s": per_task, "total_s": sum(per_task),
                         "replay_extra_s": extra})
    return {
        "what": "estimates from parameter counts; nothing here ran on a GPU",
        "model": {"name": "llava-hf/llava-1.5-7b-hf (architecture only, meta device)", "text_config": TEXT,
                  "vision_config": VISION, **LLAVA, "counts": base, "largest_layer": largest_layer(model)},
        "assumptions": {"image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "sequence": seq,
                        "bytes": {"weight": WEIGHT_B, "optimizer_per_trainable": OPTIMIZER_B,
                                  "gradient": GRAD_B, "reglora_key": REGLORA_KEY_B},
                        "h100_bf16_flops": H100_BF16_FLOPS, "mfu": MFU, "tasks": TASKS,
                        "clip_router_params": clip},
        "methods": results, "memory": rows, "task_sizes": tokens, "wall_time": wall,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "written_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# --- rendering --------------------------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def _m(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _hm(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def render(data: dict[str, Any]) -> list[str]:
    """The markdown tables of docs/DISTRIBUTED.md, from the result file alone."""
    a, counts = data["assumptions"], data["model"]["counts"]
    lines = [f"Generated by `python -m bench.memory_estimate` from `{RESULT.relative_to(REPO)}` "
             f"(transformers {data['versions']['transformers']}, peft {data['versions']['peft']}, "
             f"{data['written_utc']}); regenerate the tables alone with `python -m bench.memory_estimate --render`. "
             "**Every number below is an estimate**: parameter counts are exact (the architecture built on the meta "
             "device, each method attached by mcit's own code), everything derived from them follows the formulas "
             "in `bench/memory_estimate.py`. GB = 10⁹ bytes.", "",
             f"LLaVA-1.5-7B: **{counts['total'] / 1e9:.3f} B** parameters: language model with LM head "
             f"{_m(counts['language_model'])} M, vision tower {_m(counts['vision_tower'])} M, projector "
             f"{_m(counts['projector'])} M. Largest layer ZeRO-3 gathers: {_m(data['model']['largest_layer'])} M "
             "(one decoder layer).", "",
             "### Parameters per method (six UCIT tasks)", "",
             "| method | LoRA r (α) | ZeRO in recipe | trainable per stage M | adapters held after task 6 M | "
             "model total after task 6 B |", "|---|---|---|---:|---:|---:|"]
    for m in data["methods"]:
        trainable = sorted({s["trainable"] for s in m["stages"]})
        last = m["stages"][-1]
        lines.append(f"| {m['method']} | {m['r']} ({m['alpha']}) | {m['deepspeed']} | "
                     f"{' / '.join(_m(t) for t in trainable)} | {_m(last['adapters'])} | {last['total'] / 1e9:.3f} |")
    lines += ["", "Trainable includes the projector (`train_projector: true`, "
              f"{_m(counts['projector'])} M). hide, disco and olora add one adapter per task and train only the "
              "newest (disco counted with one slot per task, the most it can hold for six tasks); moelora holds "
              "one rank-18 adapter split into 6 experts plus per-layer gates; reglora/sefe merge each task's LoRA "
              "into the base and keep key positions instead (below); replay and joint are lora_ft's structure.", "",
              "### Memory per GPU, training", "",
              f"Micro-batch {data['methods'][0]['batch_size']} (the recipes' `train.batch_size`) of "
              f"{a['sequence']} tokens ({a['image_tokens']} image + ~{a['text_tokens']} text), at the last task "
              f"(the most adapters held). Weights bf16 ({a['bytes']['weight']} B/param); trainable parameters add "
              f"an fp32 master copy and AdamW moments ({a['bytes']['optimizer_per_trainable']} B) and a bf16 "
              f"gradient ({a['bytes']['gradient']} B), partitioned over the ranks; ZeRO-3 also partitions the "
              "weights and gathers one layer at a time. Activations: Korthikanti et al. 2022 (34·s·b·h + 5·a·s²·b "
              "bytes per layer without checkpointing, 2·s·b·h per layer plus one recomputed layer with it), plus "
              "PEFT's LoRA-dropout copies and the logits (`activation_bytes`). Not included: the CUDA context and "
              "allocator slack (budget 2-4 GB), DeepSpeed's communication buckets. hide and disco include their "
              "router's CLIP encoders (fp32; the router keeps them on the GPU for the whole run). Cells: **gradient checkpointing on** (the recipes' setting) / off, GB per "
              "GPU; the recipe's own ZeRO stage is marked ✓; `refused`: the method rejects that stage.", "",
              "| method | " + " | ".join(f"{w} GPUs, ZeRO-{z}" for w in WORLD_SIZES for z in (2, 3))
              + " | weights Z2 / Z3 (8 GPUs) | grads + optimizer (8 GPUs) | router CLIP | method tensors |",
              "|---|" + "---:|" * (2 * len(WORLD_SIZES)) + "---:|---:|---:|---:|"]
    by = {(r["method"], r["world"], r["zero"]): r for r in data["memory"]}
    for m in data["methods"]:
        name, cells = m["method"], []
        for w in WORLD_SIZES:
            for z in (2, 3):
                r = by[(name, w, z)]
                mark = " ✓" if m["deepspeed"] == f"zero{z}" else ""
                cells.append("refused" if not r["supported"] else
                             f"**{_gb(r['train_checkpointing'])}** / {_gb(r['train_no_checkpointing'])}{mark}")
        z2, z3 = by[(name, WORLD_SIZES[0], 2)], by[(name, WORLD_SIZES[0], 3)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_gb(z2['weights'])} / {_gb(z3['weights'])} | "
                     f"{_gb(z2['gradients'] + z2['optimizer'])} | "
                     f"{_gb(z2['router_fp32']) if z2['router_fp32'] else '-'} | "
                     f"{_gb(z2['method_tensors']) if z2['method_tensors'] else '-'} |")
    first = data["memory"][0]
    lines += ["", f"Activations are the same for every method: {_gb(first['activations_checkpointing'])} GB with "
              f"checkpointing, {_gb(first['activations_no_checkpointing'])} GB without (eager-attention scores "
              "included; SDPA or flash attention never store them)."]
    keys = next((m["reglora_keys"] for m in data["methods"] if "reglora_keys" in m), None)
    if keys:
        lines += ["", f"Method tensors: RegLoRA/SEFE key positions while task 6 trains, the union of five tasks' "
                  f"top 2 % of the {keys['adapted_entries'] / 1e9:.2f} B adapted entries (at most "
                  f"{keys['training_by_stage'][-1] / 1e6:,.0f} M keys; fewer where tasks pick the same positions), "
                  f"{keys['bytes_per_key']} B each (the int32 key and the int64 row and column cached for the "
                  "penalty), on every rank: ZeRO does not partition a method's tensors. Task 2 holds a fifth of "
                  "it. During evaluation only the int32 keys remain."]
    ev = data["methods"][0]
    lines += ["", "### Memory per GPU, evaluation", "",
              f"Generation at `eval.batch_size` {ev['eval_batch_size']}, prompt {a['sequence']} tokens + "
              f"`max_new_tokens` {ev['max_new_tokens']}, after task 6: bf16 weights + bf16 KV cache "
              f"({_gb(first['eval_kv_cache'])} GB) + the router's CLIP encoders in fp32 (hide: image and text "
              "towers, disco: text tower) + RegLoRA's keys. Under ZeRO-3 mcit gathers the full weights for the "
              "whole evaluation (and every rank evaluates every sample), so the shards and the full copy are both "
              "resident. GB per GPU; activations of the prompt forward pass are not included.", "",
              "| method | " + " | ".join(f"{w} GPUs, ZeRO-{z}" for w in WORLD_SIZES for z in (2, 3))
              + " | router CLIP | method tensors |", "|---|" + "---:|" * (2 * len(WORLD_SIZES)) + "---:|---:|"]
    for m in data["methods"]:
        name = m["method"]
        cells = ["refused" if not by[(name, w, z)]["supported"] else _gb(by[(name, w, z)]["eval"])
                 for w in WORLD_SIZES for z in (2, 3)]
        r = by[(name, WORLD_SIZES[0], 2)]
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     f"{_gb(r['router_fp32']) if r['router_fp32'] else '-'} | "
                     f"{_gb(r['eval_method_tensors']) if r['eval_method_tensors'] else '-'} |")
    lines += ["", "### Wall time of training, estimate", "",
              f"Tokens per task = training samples × {a['sequence']}; 6·N FLOPs per token (8·N with gradient "
              f"checkpointing), N = {counts['total'] / 1e9:.2f} B, at an assumed {a['mfu']:.0%} MFU of an H100's "
              f"{a['h100_bf16_flops'] / 1e12:,.0f} TFLOP/s dense bf16 per GPU, one epoch. An upper estimate for LoRA "
              "(a frozen base computes no weight gradients: ~4·N) at an optimistic MFU; not a measurement. "
              "Evaluation, router prototype passes, checkpoint writes and RegLoRA merges come on top.", "",
              "| task | training samples | source | tokens M | "
              + " | ".join(f"{w['world']} GPUs, ckpt {'on' if w['checkpointing'] else 'off'}"
                           for w in data["wall_time"]) + " |",
              "|---|---:|---|---:|" + "---:|" * len(data["wall_time"])]
    for i, t in enumerate(data["task_sizes"]):
        lines.append(f"| {t['task']} | {t['train']:,} | {t['source']} | {_m(t['tokens'])} | "
                     + " | ".join(_hm(w["per_task_s"][i]) for w in data["wall_time"]) + " |")
    lines.append("| **six tasks** | " + f"{sum(t['train'] for t in data['task_sizes']):,} | | "
                 f"{_m(sum(t['tokens'] for t in data['task_sizes']))} | "
                 + " | ".join(f"**{_hm(w['total_s'])}**" for w in data["wall_time"]) + " |")
    replay = next((m for m in data["methods"] if m["method"] == "replay"), None)
    if replay:
        lines += ["", f"Every method trains the same samples (joint in one stage) except replay, which adds "
                  f"{replay['replay_per_task']} samples of each finished task per stage (+"
                  + ", ".join(f"{_hm(w['replay_extra_s'])} at {w['world']} GPUs ckpt "
                              f"{'on' if w['checkpointing'] else 'off'}" for w in data["wall_time"]) + ")."]
    return lines


def write_doc(data: dict[str, Any], doc: Path = DOC) -> Path:
    """Replace the text between the BEGIN and END markers of `doc` with the rendered tables."""
    from mcit.errors import McitError

    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise McitError(f"{doc}: the markers for the generated tables are missing; add the two lines\n{BEGIN}\n{END}\n"
                        "where the tables belong")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + BEGIN + "\n" + "\n".join(render(data)) + "\n" + END + tail, encoding="utf-8")
    return doc


def run(out: Path = RESULT, doc: Path | None = DOC, methods: tuple[str, ...] = METHODS, say=print) -> dict[str, Any]:
    data = estimate(methods, say=say)
    write_json(out, data)
    if doc is not None:
        write_doc(data, doc)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--render", action="store_true", help="only rewrite the doc's tables from --out")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    if args.render:
        data = read_json(args.out)
        if data is None:
            parser.error(f"{args.out} does not exist; run `python -m bench.memory_estimate` first")
        print(f"wrote {write_doc(data, args.doc)}")
        return
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    run(args.out, args.doc, methods)
    print(f"wrote {args.out} and the tables of {args.doc}")


if __name__ == "__main__":
    main()
