"""The prototype router: running means, per-sample weights reaching the right batch rows, oracle mode, persistence
(saved and reloaded router state gives identical outputs), option checks, and the CLIP feature source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcit.config import recipe_from_dict
from mcit.errors import RecipeError
from mcit.evaluation.generate import candidate_logprobs
from mcit.methods.base import build_method
from mcit.models.loading import resolve_path
from mcit.routing.features import FeatureExtractor
from mcit.routing.prototypes import RouterOptions, SampleFeatures, TaskPrototypes, routing_weights
from tests.methods.harness import TASKS, batch_of, build, train_stage


def _features(n: int, seed: int, dim: int = 6, images: bool = True) -> SampleFeatures:
    g = torch.Generator().manual_seed(seed)
    return SampleFeatures(image=torch.randn(n, dim, generator=g) if images else None,
                          has_image=torch.ones(n, dtype=torch.bool) if images else torch.zeros(n, dtype=torch.bool),
                          text=torch.randn(n, dim + 1, generator=g))


def test_running_means_with_counts():
    whole, parts = TaskPrototypes(), TaskPrototypes()
    f = _features(10, 0)
    whole.update("a", f)
    parts.update("a", SampleFeatures(f.image[:3], f.has_image[:3], f.text[:3]))
    parts.update("a", SampleFeatures(f.image[3:], f.has_image[3:], f.text[3:]))
    torch.testing.assert_close(parts.text_mean, whole.text_mean)
    torch.testing.assert_close(parts.image_mean, f.image.double().mean(0, keepdim=True))
    assert parts.text_count.tolist() == [10.0]
    # merging two keys weights them by their counts
    merged = TaskPrototypes()
    small, big = _features(2, 1), _features(6, 2)
    both = TaskPrototypes()
    both.update("s", small)
    both.update("b", big)
    merged.update_from("slot", both, "s")
    merged.update_from("slot", both, "b")
    expected = torch.cat([small.text, big.text]).double().mean(0)
    torch.testing.assert_close(merged.text_mean[0], expected)


def test_text_only_samples_are_scored_on_text_alone():
    protos = TaskPrototypes()
    protos.update("a", _features(4, 0))
    protos.update("b", _features(4, 1))
    f = _features(3, 2)
    no_image = SampleFeatures(image=f.image, has_image=torch.tensor([True, False, False]), text=f.text)
    both = protos.similarity(no_image, ["a", "b"], use="both")
    text = protos.similarity(no_image, ["a", "b"], use="text")
    torch.testing.assert_close(both[1:], text[1:])
    assert not torch.allclose(both[0], text[0])
    w = routing_weights(both, 0.05)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))


@pytest.fixture(scope="module")
def soft_hide(synthcit_root):
    """Three trained HiDe experts with a soft router (tau = 1), so every sample mixes all experts."""
    model, method, ctx = build(synthcit_root, "hide", router={"tau": 1.0}, expand_layers=[0, 1, 2, 3])
    for stage in range(3):
        train_stage(model, method, ctx, stage)
    return model, method, ctx


def test_weights_are_per_sample(soft_hide):
    model, method, ctx = soft_hide
    samples = [s for t in TASKS for s in ctx.data.test[t][:4]]
    w = method.route(model, samples, method.trained_experts())
    assert w.shape == (12, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(12, dtype=torch.float64))
    assert w.argmax(1).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # same task, same question template, different images: different weights
    assert not torch.allclose(w[0], w[1], atol=1e-9)
    # a sharper temperature concentrates the same scores
    method.options.router.tau = 0.05
    try:
        sharp = method.route(model, samples, method.trained_experts())
    finally:
        method.options.router.tau = 1.0
    assert bool((sharp.max(1).values > w.max(1).values).all())


def test_rows_get_their_own_weights_in_any_batch(soft_hide):
    """Candidate scoring in one batch (sorted, padded, cache expanded per candidate) equals one sample at a time."""
    model, method, ctx = soft_hide
    from mcit.data.collate import Encoder, PixelCache

    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    samples = [s for t in TASKS[:2] for s in ctx.data.test[t][:3]]
    cands = [["circle", "square", "cross"] if s.task == "shape" else ["A", "B", "C", "D"] for s in samples]

    def score(batch_size: int) -> list[list[float]]:
        out: list = [None] * len(samples)
        for context, indices in method.eval_groups(model, samples):
            with context:
                lp = candidate_logprobs(model, encoder, [samples[i] for i in indices], [cands[i] for i in indices],
                                        pixels, batch_size=batch_size)
            for i, v in zip(indices, lp):
                out[i] = v
        return out

    def flat(scores):
        return torch.tensor([v for row in scores for v in row])

    together, alone = flat(score(64)), flat(score(1))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # and routing matters: plain PEFT (the last expert only) scores differently
    plain = flat(candidate_logprobs(model, encoder, samples, cands, pixels, batch_size=64))
    assert not torch.allclose(plain, together, atol=1e-3)


def test_oracle_routes_seen_tasks_to_their_expert(synthcit_root):
    model, method, ctx = build(synthcit_root, "hide", tasks=TASKS, router={"mode": "oracle", "tau": 1.0})
    for stage in range(2):
        train_stage(model, method, ctx, stage)
    samples = [s for t in TASKS for s in ctx.data.test[t][:2]]
    w = method.route(model, samples, method.trained_experts())
    assert w[:4].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    assert bool((w[4:] < 1.0).all())  # caption has no expert yet: the prototypes decide, softly


def test_saved_router_state_gives_identical_outputs(soft_hide, synthcit_root, tmp_path):
    model, method, ctx = soft_hide
    save_file(method.method_tensors(), tmp_path / "method.safetensors")
    (tmp_path / "method.json").write_text(json.dumps(method.state()))
    save_file({k: v.contiguous() for k, v in method.state_tensors(model).items()}, tmp_path / "model.safetensors")

    fresh_model, fresh, _ = build(synthcit_root, "hide", router={"tau": 1.0}, expand_layers=[0, 1, 2, 3])
    for stage in range(3):
        fresh.prepare(fresh_model, stage, [stage])  # structure only, as on resume / standalone evaluation
    fresh.load_state(json.loads((tmp_path / "method.json").read_text()), load_file(tmp_path / "method.safetensors"))
    fresh_model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)

    samples = [s for t in TASKS for s in ctx.data.test[t][:2]]
    experts = method.trained_experts()
    torch.testing.assert_close(fresh.route(fresh_model, samples, experts), method.route(model, samples, experts))

    def logits(m, meth):
        out = {}
        for context, indices in meth.eval_groups(m, samples):
            with context, torch.no_grad():
                out.update(zip(indices, m(**batch_of(ctx, [samples[i] for i in indices])).logits))
        return out

    a, b = logits(model, method), logits(fresh_model, fresh)
    for i in range(len(samples)):
        torch.testing.assert_close(a[i], b[i])
    assert fresh.routing_report()["accuracy"] == method.routing_report()["accuracy"] == 100.0


def test_router_option_checks():
    def recipe(**router):
        return recipe_from_dict({"output_dir": "x", "method": {"name": "disco", "router": router}})

    with pytest.raises(RecipeError, match="tau"):
        build_method(recipe(tau=0))
    with pytest.raises(RecipeError, match="text_encoder"):
        build_method(recipe(source="clip"))
    with pytest.raises(RecipeError, match="train_vision"):
        build_method(recipe_from_dict({"output_dir": "x", "model": {"train_vision": True},
                                       "method": {"name": "hide"}}))
    with pytest.raises(RecipeError, match="mode"):
        build_method(recipe(mode="learned"))


def test_clip_feature_source(synthcit_root, tmp_path):
    """External CLIP encoders by path: a tiny random CLIP saved locally stands in for openai/clip-*."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    vision_dir, text_dir = tmp_path / "clip-vision", tmp_path / "clip-text"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vision_dir)
    CLIPTextModel(CLIPTextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, eos_token_id=2,
                                 projection_dim=16)).save_pretrained(text_dir)
    tiny = resolve_path("builtin:tiny-llava")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny}/{name}", text_dir / name)
    options = RouterOptions(source="clip", image_encoder=str(vision_dir), text_encoder=str(text_dir))
    model, _, ctx = build(synthcit_root, "hide", router={"source": "clip", "image_encoder": str(vision_dir),
                                                         "text_encoder": str(text_dir)})
    samples = ctx.data.train["shape"][:3] + ctx.data.train["mc-color"][:2]
    feats = FeatureExtractor(options, model, ctx.processor)(samples)
    assert feats.image.shape == (5, 16) and feats.text.shape == (5, 32)
    assert torch.allclose(feats.text[0], feats.text[1])  # same question, same text feature
    assert not torch.allclose(feats.text[0], feats.text[3])
    assert not torch.allclose(feats.image[0], feats.image[1])
