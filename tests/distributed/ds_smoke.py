"""Train a random tiny LLaVA with LoRA under DeepSpeed ZeRO on CPU and write what the tests check.

Run by tests/distributed/test_deepspeed_cpu.py; by hand (see docs/DISTRIBUTED.md):

    python tests/distributed/ds_smoke.py --out OUT --reference        # one process, plain torch, same global batch
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29512 --no_local_rank \
        tests/distributed/ds_smoke.py --out OUT --stages 2,3

Writes OUT/base/ (the tiny base model, built once from a seed), and per run OUT/<name>/losses.json (one global loss
per optimizer step), OUT/<name>/adapter/ (PEFT adapter from gathered weights), OUT/<name>/checks.json and
OUT/<name>/done-rank<r> markers. The global batch of 4 samples is split 2+2 over the ranks; every fifth step rank 1
gets a micro-batch without images, which exercises the ZeRO-3 guard (`ensure_vision_forward`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mcit.runtime import dist, zero
from mcit.train import deepspeed as ds

SEED = 0
IMAGE_TOKEN = 511
NUM_IMAGE_TOKENS = 36  # (48 / 8) ** 2 patches, CLS dropped by the "default" feature strategy
TEXT_LEN = 28
IMAGE_SHAPE = (3, 48, 48)


def dummy_image() -> dict:
    """The inert image of `ensure_vision_forward`: its placeholder ids and zero pixels."""
    return {"image_ids": [IMAGE_TOKEN] * NUM_IMAGE_TOKENS, "image_inputs": {"pixel_values": torch.zeros((1, *IMAGE_SHAPE))}}
MICRO_BATCH = 2
GLOBAL_BATCH = 4
WARMUP = 3
LR, PROJECTOR_LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 1e-3, 0.01, 1.0
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ROOT = Path(__file__).resolve().parents[2]


def tiny_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=3, image_size=48,
        patch_size=8, projection_dim=192,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1, tie_word_embeddings=False,
    )


def ensure_base(out: Path) -> Path:
    """Build the random base model once (rank 0) so that every run starts from identical weights."""
    from transformers import LlavaForConditionalGeneration

    base = out / "base"
    if dist.is_main() and not (base / "config.json").exists():
        torch.manual_seed(SEED)
        LlavaForConditionalGeneration(tiny_config()).save_pretrained(base)
    dist.barrier()
    return base


def sample_pool() -> list[dict]:
    gen = torch.Generator().manual_seed(SEED + 1)
    pool = []
    for _ in range(8):
        text = torch.randint(3, 500, (TEXT_LEN,), generator=gen)
        pixels = torch.randn(IMAGE_SHAPE, generator=gen)
        text_only = torch.randint(3, 500, (NUM_IMAGE_TOKENS + TEXT_LEN,), generator=gen)
        pool.append({"text": text, "pixels": pixels, "text_only": text_only})
    return pool


def micro_batch(pool: list[dict], step: int, part: int) -> dict[str, torch.Tensor]:
    """Micro-batch `part` (0 or 1) of the global batch of optimizer step `step`."""
    idx = [(GLOBAL_BATCH * step + part * MICRO_BATCH + k) % len(pool) for k in range(MICRO_BATCH)]
    if part == 1 and step % 5 == 2:
        ids = torch.stack([pool[i]["text_only"] for i in idx])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    image = torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN)
    ids = torch.stack([torch.cat([image, pool[i]["text"]]) for i in idx])
    labels = ids.clone()
    labels[:, :NUM_IMAGE_TOKENS] = -100
    pixels = torch.stack([pool[i]["pixels"] for i in idx])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def add_lora(model):
    """LoRA on the language model's linear layers plus a trainable projector; identical on every rank and run."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED + 2)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for param in peft_model.base_model.model.model.multi_modal_projector.parameters():
        param.requires_grad_(True)
    lora = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    projector = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    groups = [
        {"params": lora, "lr": LR, "weight_decay": WEIGHT_DECAY},
        {"params": projector, "lr": PROJECTOR_LR, "weight_decay": 0.0},
    ]
    return peft_model, groups


def save_adapter(peft_model, folder: Path) -> dict[str, torch.Tensor]:
    state = zero.state_dict_for_saving(peft_model, lambda name, _p: "lora_" in name)
    if dist.is_main():
        peft_model.save_pretrained(folder, state_dict=state)
    return state


def run_reference(out: Path, steps: int) -> None:
    """One process, plain torch: both micro-batches of each step accumulated, no guard, same optimizer/schedule."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ensure_base(out), dtype=torch.float32)
    model, groups = add_lora(model)
    optimizer = torch.optim.AdamW(groups)
    schedule = ds.cosine_schedule(optimizer, WARMUP, steps)
    trainable = [p for g in groups for p in g["params"]]
    pool, losses = sample_pool(), []
    for step in range(steps):
        total = 0.0
        for part in (0, 1):
            loss = model(**micro_batch(pool, step, part)).loss
            (loss / 2).backward()
            total += loss.item() / 2
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(total)
    folder = out / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(model, folder / "adapter")
    (folder / "losses.json").write_text(json.dumps(losses))


def check_from_config(ds_config: dict) -> dict:
    """Under ZeRO-3, `_from_config` must build the weights sharded and still initialised (not zeros)."""
    from transformers import LlavaForConditionalGeneration

    with ds.hf_deepspeed_context(ds_config):
        model = LlavaForConditionalGeneration._from_config(tiny_config())
    weight = model.model.language_model.layers[0].mlp.up_proj.weight
    sharded = zero.is_sharded(weight) and weight.numel() < zero.full_shape(weight).numel()
    with zero.gathered_parameters(weight):
        std = weight.std().item()
    return {"from_config_sharded": sharded, "from_config_std": std}


def run_zero(
    out: Path, name: str, steps: int, crash_rank: int | None, crash_step: int, guard: bool, bf16: bool
) -> None:
    from transformers import LlavaForConditionalGeneration

    base = ensure_base(out)
    stage = int(name[0])
    # The global batch holds GLOBAL_BATCH // MICRO_BATCH micro-batches: one per rank, or accumulated on fewer ranks.
    parts = GLOBAL_BATCH // MICRO_BATCH
    accum = parts // dist.world_size()
    ds_config = ds.build_ds_config(
        ROOT / "mcit" / "assets" / "launch" / f"zero{name}.json", micro_batch=MICRO_BATCH, grad_accum=accum, lr=LR,
        weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, bf16=bf16, zero_stage=stage, hidden_size=256,
    )
    folder = out / f"zero{name}{'-bf16' if bf16 else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    checks: dict = {"world_size": dist.world_size()}
    started = time.time()
    with ds.hf_deepspeed_context(ds_config):
        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        up = model.model.language_model.layers[0].mlp.up_proj.weight
        checks["base_sharded"] = zero.is_sharded(up)
        model, groups = add_lora(model)
        engine = ds.initialize(model, groups, ds_config, num_training_steps=steps, warmup_steps=WARMUP)
        pool, losses = sample_pool(), []
        for step in range(steps):
            if dist.rank() == crash_rank and step == crash_step:
                (folder / "crash_time").write_text(str(time.time()))
                raise RuntimeError(f"injected failure on rank {crash_rank} at step {step}")
            total = torch.zeros(())
            for part in range(dist.rank() * accum, (dist.rank() + 1) * accum):
                batch = micro_batch(pool, step, part)
                if guard:
                    batch = ds.ensure_vision_forward(
                        batch, **dummy_image()
                    )
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()  # steps the optimizer only at the accumulation boundary
                total += loss.detach().float() / parts
            torch.distributed.all_reduce(total)
            losses.append(total.item())
        checks["train_seconds"] = time.time() - started
        saved = save_adapter(engine.module, folder / "adapter")
        if stage == 3:
            checks.update(roundtrip(engine.module, saved))
            checks.update(second_task(ds.release(engine), saved, ds_config, pool, guard))
            checks.update(check_from_config(ds_config))
    if dist.is_main():
        (folder / "losses.json").write_text(json.dumps(losses))
        (folder / "checks.json").write_text(json.dumps(checks))
    (folder / f"done-rank{dist.rank()}").write_text("ok")
    dist.barrier()


def roundtrip(model, saved: dict[str, torch.Tensor]) -> dict:
    """Zero the LoRA B weights of the sharded model, load the saved adapter back, and compare after gathering."""
    names = [n for n in saved if "lora_B" in n]
    params = dict(model.named_parameters())
    with zero.gathered_parameters([params[n] for n in names], modifier_rank=0), torch.no_grad():
        for name in names:
            params[name].zero_()
    zeroed = zero.state_dict_for_saving(model, lambda n, _p: n in names)
    zero.load_parameters(model, saved)
    again = zero.state_dict_for_saving(model, lambda n, _p: n in saved)
    return {
        "zeroed_ok": all(bool((zeroed[n] == 0).all()) for n in names),
        "roundtrip_ok": all(torch.equal(again[n], saved[n]) for n in saved),
    }


def second_task(peft_model, first: dict[str, torch.Tensor], ds_config: dict, pool: list[dict], guard: bool) -> dict:
    """Like the continual runner's next task: a new adapter on the same sharded module, trained by a new engine."""
    from peft import LoraConfig

    torch.manual_seed(SEED + 3)
    peft_model.add_adapter("task2", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    peft_model.set_adapter("task2")
    for name, param in peft_model.named_parameters():
        param.requires_grad_("task2" in name)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    engine = ds.initialize(peft_model, [{"params": params, "lr": LR, "weight_decay": 0.0}], ds_config, 4, 1)
    for step in range(4):
        batch = micro_batch(pool, step, dist.rank())
        if guard:
            batch = ds.ensure_vision_forward(
                batch, **dummy_image()
            )
        engine.backward(engine(**batch).loss)
        engine.step()
    after = zero.state_dict_for_saving(engine.module, lambda n, _p: n in first or "task2" in n)
    return {
        "task2_trained": all(after[n].abs().sum() > 0 for n in after if "task2" in n and "lora_B" in n),
        "task1_unchanged": all(torch.equal(after[n], first[n]) for n in first),
        "task2_shapes_ok": all(after[n].shape[0] == 4 for n in after if "task2" in n and "lora_A" in n),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stages", default="2,3", help="mcit/assets/launch/zero<NAME>.json templates: 2, 3, 3_offload")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--crash-step", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (compare with --reference loosely)")
    parser.add_argument("--no-guard", action="store_true", help="skip ensure_vision_forward (shows the deadlock)")
    args = parser.parse_args()
    if args.reference:
        run_reference(args.out, args.steps)
        return
    dist.init_distributed()
    for name in args.stages.split(","):
        run_zero(args.out, name, args.steps, args.crash_rank, args.crash_step, not args.no_guard, args.bf16)


if __name__ == "__main__":
    with dist.exit_on_error():
        main()
