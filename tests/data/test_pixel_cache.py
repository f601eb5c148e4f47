"""PixelCache: a byte budget with least-recently-used eviction, and pixels identical whether cached or fresh."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from mcit.config import load_recipe, recipe_from_dict
from mcit.data.collate import MIB, PixelCache
from mcit.data.images import decode_image
from mcit.errors import RecipeError
from mcit.models.tiny import resolve_builtin


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(resolve_builtin("builtin:tiny-llava"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Twelve small PNGs of different sizes and contents."""
    root = tmp_path_factory.mktemp("pixel-cache")
    paths = []
    for i in range(12):
        gen = torch.Generator().manual_seed(i)
        size = (40 + 7 * i, 30 + 5 * i)
        data = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        path = root / f"image-{i}.png"
        Image.fromarray(data).save(path)
        paths.append(str(path))
    return paths


class CountingDecode:
    """decode_image that counts the paths it decodes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str) -> Image.Image:
        self.calls.append(path)
        return decode_image(path)


def fresh(processor, paths: list[str]) -> torch.Tensor:
    """The processor's own output for `paths`, with no cache involved."""
    return processor.image_processor(images=[decode_image(p) for p in paths], return_tensors="pt")["pixel_values"]


def one_image_bytes(processor, images) -> int:
    return fresh(processor, images[:1])[0].nbytes


def test_eviction_is_least_recently_used(processor, images):
    a, b, c, d = images[:4]
    cache = PixelCache(processor, 3 * one_image_bytes(processor, images))
    cache([a, b])
    cache([c])
    assert cache.paths() == [a, b, c]
    cache([a])  # a hit makes `a` the most recent: `b` is now the oldest
    assert cache.paths() == [b, c, a]
    cache([d])
    assert b not in cache and cache.paths() == [c, a, d]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 4, 1)


def test_the_budget_is_never_exceeded_measured_from_the_tensors_held(processor, images):
    per_image = one_image_bytes(processor, images)
    budget = int(2.5 * per_image)
    cache = PixelCache(processor, budget)
    # batches larger than the budget, repeats, and hits mixed in
    for batch in ([0, 1, 2, 3], [4], [4, 5, 5], [0, 6, 7, 8, 9], [9, 10], [11, 1, 2]):
        out = cache([images[i] for i in batch])
        assert out.shape[0] == len(batch)
        assert cache.held_bytes() <= budget
        assert cache.bytes_used == cache.held_bytes() == len(cache) * per_image
    assert len(cache) == 2 and cache.evictions > 0


def test_a_kept_image_does_not_hold_its_whole_batch(processor, images):
    """A row of the processor's batch is a view of the batch's storage; the cache must not keep all of it alive."""
    cache = PixelCache(processor, one_image_bytes(processor, images))
    cache(images[:6])
    assert len(cache) == 1
    assert cache.held_bytes() == one_image_bytes(processor, images)


def test_hits_return_the_values_of_a_fresh_preprocessing(processor, images):
    paths = [images[2], images[5], images[2], images[7]]
    cache = PixelCache(processor, 64 * MIB)
    first = cache(paths)
    assert cache.misses == 3 and cache.hits == 0
    first.zero_()  # a caller writing into its batch must not change what the cache holds
    again = cache(paths)
    assert cache.hits == 3 and cache.misses == 3
    expected = fresh(processor, paths)
    assert torch.equal(again, expected)
    assert torch.equal(PixelCache(processor, 0)(paths), expected)


def test_a_path_repeated_in_one_call_is_processed_once(processor, images):
    decode = CountingDecode()
    cache = PixelCache(processor, 64 * MIB, decode=decode)
    out = cache([images[0], images[1], images[0], images[0]])
    assert decode.calls == [images[0], images[1]]
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3])
    cache([images[1], images[0]])
    assert decode.calls == [images[0], images[1]]  # both were hits


def test_budget_zero_keeps_nothing(processor, images):
    decode = CountingDecode()
    cache = PixelCache(processor, 0, decode=decode)
    cache(images[:3])
    cache(images[:3])
    assert len(cache) == 0 and cache.bytes_used == 0 and cache.held_bytes() == 0
    assert len(decode.calls) == 6 and cache.hits == 0


def test_an_image_larger_than_the_budget_is_not_kept(processor, images):
    per_image = one_image_bytes(processor, images)
    too_small = PixelCache(processor, per_image - 1)
    too_small(images[:2])
    assert len(too_small) == 0 and too_small.bytes_used == 0
    exact = PixelCache(processor, per_image)
    exact(images[:2])
    assert exact.paths() == [images[1]] and exact.bytes_used == per_image


def test_the_recipe_key_sets_the_budget(processor, tmp_path):
    recipe = recipe_from_dict({"output_dir": "x"})
    assert PixelCache.from_recipe(processor, recipe).max_bytes == recipe.benchmark.image_cache_mb * MIB > 0
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\nbenchmark: {card: synthcit-mini}\n")
    recipe = load_recipe(path, ["benchmark.image_cache_mb=3"])
    assert PixelCache.from_recipe(processor, recipe).max_bytes == 3 * MIB


@pytest.mark.parametrize(("value", "message"), [
    (-1, r"benchmark\.image_cache_mb: expected an integer >= 0"),
    ("lots", r"benchmark\.image_cache_mb: expected int"),
])
def test_the_recipe_key_is_validated(value, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"output_dir": "x", "benchmark": {"image_cache_mb": value}})


def test_a_negative_budget_is_refused(processor):
    with pytest.raises(RecipeError, match=r"image_cache_mb"):
        PixelCache(processor, -1)
