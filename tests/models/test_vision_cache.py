"""The vision feature cache (mcit/models/vision_cache.py): features served from it give the same scores and answers
as the tower computing them, each image goes through the tower once, and any change of the tower's weights, an
adapter on the tower or a tiled family turns it off or empties it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mcit.config import load_recipe
from mcit.data.collate import Encoder, PixelCache
from mcit.data.formats import load_split
from mcit.errors import RecipeError
from mcit.evaluation.generate import candidate_logprobs, generate
from mcit.models.tiny import create_init
from mcit.models.vision_cache import VisionFeatureCache
from tests.recipes import write_recipe

MIB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthcit_root):
    path = create_init(tmp_path_factory.mktemp("vision-cache") / "tiny-init", seed=0)
    processor = AutoProcessor.from_pretrained(path)
    samples = []
    for task in ("shape", "mc-color", "count"):
        samples += load_split(synthcit_root / task / "test.json", image_root=synthcit_root, task=task)[:4]
    return SimpleNamespace(model=LlavaForConditionalGeneration.from_pretrained(path).eval(), processor=processor,
                           encoder=Encoder(processor, max_length=256), samples=samples)


def tower_calls(model) -> list[int]:
    """Rows the CLIP tower computed, per call (a hook below the wrapper the cache installs)."""
    rows: list[int] = []
    model.model.vision_tower.embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    return rows


def scores(tiny, pixels, samples) -> list[list[float]]:
    candidates = [["red", "blue", "a circle", "3"]] * len(samples)
    return candidate_logprobs(tiny.model, tiny.encoder, samples, candidates, pixels, batch_size=16)


def test_served_features_give_the_scores_and_answers_of_the_tower(tiny):
    plain = PixelCache(tiny.processor)
    cached = PixelCache(tiny.processor, features=VisionFeatureCache(64 * MIB))
    rows = tower_calls(tiny.model)
    reference = scores(tiny, plain, tiny.samples)
    assert sum(rows) == len(tiny.samples)
    rows.clear()
    assert scores(tiny, cached, tiny.samples) == reference  # first pass: computed, kept
    assert sum(rows) == len(tiny.samples) and len(cached.features) == len(tiny.samples)
    rows.clear()
    shuffled = tiny.samples[::-1]  # served rows must follow their images, not the order they were kept in
    assert scores(tiny, cached, shuffled) == reference[::-1]
    assert rows == [] and cached.features.hits == len(tiny.samples)
    answers = generate(tiny.model, tiny.encoder, tiny.samples, plain, batch_size=5, max_new_tokens=6)
    assert generate(tiny.model, tiny.encoder, tiny.samples, cached, batch_size=5, max_new_tokens=6) == answers
    assert rows == [5, 5, 2]  # only the plain pass ran the tower
    assert cached.features.stats()["unused"] is None


def test_a_change_of_the_tower_weights_empties_the_cache(tiny):
    cached = PixelCache(tiny.processor, features=VisionFeatureCache(64 * MIB))
    scores(tiny, cached, tiny.samples)
    weight = tiny.model.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    before = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # in place, as loading a checkpoint or an optimizer step writes
        fresh = scores(tiny, PixelCache(tiny.processor), tiny.samples)
        assert scores(tiny, cached, tiny.samples) == fresh
        assert cached.features.invalidations == 1 and cached.features.hits == 0
    finally:
        with torch.no_grad():
            weight.copy_(before)


def test_a_model_rebuilt_from_the_same_files_keeps_the_cache(tiny):
    cached = PixelCache(tiny.processor, features=VisionFeatureCache(64 * MIB))
    reference = scores(tiny, cached, tiny.samples)
    rebuilt = LlavaForConditionalGeneration.from_pretrained(tiny.model.config._name_or_path).eval()
    rows = tower_calls(rebuilt)
    again = candidate_logprobs(rebuilt, tiny.encoder, tiny.samples, [["red", "blue", "a circle", "3"]] * 12,
                               cached, batch_size=16)
    assert again == reference and rows == [] and cached.features.invalidations == 0


def test_a_forward_wrapper_already_on_the_tower_is_kept(tiny):
    tower = tiny.model.model.vision_tower
    calls = []
    wrapped = tower.forward

    def dispatch_hook(*args, **kwargs):  # as accelerate's device-map hook sits on a module
        calls.append(1)
        return wrapped(*args, **kwargs)

    tower.forward = dispatch_hook
    try:
        cached = PixelCache(tiny.processor, features=VisionFeatureCache(64 * MIB))
        scores(tiny, cached, tiny.samples[:3])
        assert calls and tower.__dict__["forward"] is dispatch_hook  # ran through it, and it is still there after
    finally:
        del tower.forward


def test_the_digest_reads_every_kind_of_tensor_a_tower_may_hold():
    tower = torch.nn.Linear(2, 2)
    tower.register_buffer("scale", torch.tensor(1.5))  # 0-dim, as a logit scale
    tower.register_buffer("mask", torch.tensor([True, False]))
    cache = VisionFeatureCache(MIB)
    first = cache._weights_of(tower)
    with torch.no_grad():
        tower.scale.fill_(2.0)
    assert cache._weights_of(tower) != first


def test_the_budget_keeps_the_first_images_and_evicts_none(tiny):
    per_image = 37 * 128 * 4  # the selected hidden state of the tiny CLIP tower, fp32
    cached = PixelCache(tiny.processor, features=VisionFeatureCache(5 * per_image + 100))
    rows = tower_calls(tiny.model)
    reference = scores(tiny, cached, tiny.samples)
    assert len(cached.features) == 5 and cached.features.bytes_used == 5 * per_image
    kept = set(cached.features._rows)
    rows.clear()
    assert scores(tiny, cached, tiny.samples) == reference
    assert sum(rows) == len(tiny.samples) - 5 and set(cached.features._rows) == kept


def test_an_adapter_on_the_tower_turns_the_cache_off(tiny):
    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tiny.model.config._name_or_path),
                           LoraConfig(r=2, target_modules=r".*vision_tower.*\.fc1"))
    cached = PixelCache(tiny.processor, features=VisionFeatureCache(64 * MIB))
    candidate_logprobs(model, tiny.encoder, tiny.samples[:2], [["red"]] * 2, cached)
    assert len(cached.features) == 0 and "adapter" in cached.features.unused


def test_a_tiled_family_is_left_alone(synthcit_root):
    from mcit.config import ModelConfig
    from mcit.models.loading import load_base

    model, processor = load_base(ModelConfig(name_or_path="builtin:tiny-qwen2vl"))
    samples = load_split(synthcit_root / "shape" / "test.json", image_root=synthcit_root, task="shape")[:2]
    cached = PixelCache(processor, features=VisionFeatureCache(64 * MIB))
    generate(model, Encoder(processor, max_length=256), samples, cached, max_new_tokens=2)
    assert len(cached.features) == 0 and "qwen2-vl" in cached.features.unused


def test_the_recipe_key_sets_the_budget_and_refuses_a_negative_one(tmp_path, synthcit_root):
    from mcit.workflows.load import eval_pixels

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", synthcit_root), ["benchmark.vision_feature_cache_mb=3"])
    assert eval_pixels(None, recipe).features.max_bytes == 3 * MIB
    assert PixelCache.from_recipe(None, recipe).features is None  # training's batches never read features
    with pytest.raises(RecipeError, match="benchmark.vision_feature_cache_mb"):
        load_recipe(write_recipe(tmp_path / "r.yaml", synthcit_root), ["benchmark.vision_feature_cache_mb=-1"])


def test_on_a_gpu_served_and_computed_rows_meet_on_the_model_device(tiny):
    from tests.runtime.simulated_cuda import on_simulated_cuda, simulated_cuda

    per_image = 37 * 128 * 4
    with simulated_cuda() as mode:
        model = LlavaForConditionalGeneration.from_pretrained(tiny.model.config._name_or_path).eval().to("cuda")
        cached = PixelCache(tiny.processor, features=VisionFeatureCache(5 * per_image + 100))
        candidates = [["red", "blue", "a circle", "3"]] * len(tiny.samples)
        first = candidate_logprobs(model, tiny.encoder, tiny.samples, candidates, cached, batch_size=16)
        again = candidate_logprobs(model, tiny.encoder, tiny.samples, candidates, cached, batch_size=16)
        kept = next(iter(cached.features._rows.values()))
    assert mode.mixed == [] and again == first  # 5 rows served from host memory beside 7 computed on the device
    assert cached.features.hits == 5 and not on_simulated_cuda(next(iter(kept.values())))
