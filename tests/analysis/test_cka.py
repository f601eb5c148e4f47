"""CKA maths, feature collection on a tiny LLaVA (bare and PEFT-wrapped), layer choice, JSON and plots."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mcit.analysis.cka import (
    CKAResult,
    choose_expand_layers,
    collect_layer_features,
    find_down_proj_modules,
    layerwise_cka,
    linear_cka,
    median_sigma,
    plot_cka,
    rbf_cka,
)
from mcit.errors import EvalError, ModelError

# ----------------------------------------------------------------------------------------------------------------
# A literal numpy transcription of the definition, to check the torch implementation against.
# ----------------------------------------------------------------------------------------------------------------


def np_centre(k):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def np_rbf(x, sigma=None):
    g = x @ x.T
    sq = np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g
    if sigma is None:
        sigma = math.sqrt(np.median(sq[~np.eye(len(x), dtype=bool)]))
    return np.exp(-sq / (2 * sigma * sigma))


def np_cka(k, m):
    kc, lc = np_centre(k), np_centre(m)
    return np.sum(kc * lc) / math.sqrt(np.sum(kc * kc) * np.sum(lc * lc))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# CKA on matrices
# ----------------------------------------------------------------------------------------------------------------


def test_hand_computed_linear_example():
    # For 1-D features linear CKA is the squared Pearson correlation: x=(0,1,2), y=(0,1,4) -> r^2 = 12/13.
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[0.0], [1.0], [4.0]])
    assert linear_cka(x, y) == pytest.approx(12 / 13, abs=1e-12)


def test_matches_numpy_definition():
    x, y = rand(12, 5, seed=1), rand(12, 7, seed=2) + 0.3 * rand(12, 7, seed=3)
    xn, yn = x.numpy(), y.numpy()
    assert linear_cka(x, y) == pytest.approx(np_cka(xn @ xn.T, yn @ yn.T), abs=1e-10)
    assert rbf_cka(x, y) == pytest.approx(np_cka(np_rbf(xn), np_rbf(yn)), abs=1e-10)
    assert rbf_cka(x, y, sigma=2.5) == pytest.approx(np_cka(np_rbf(xn, 2.5), np_rbf(yn, 2.5)), abs=1e-10)


def test_median_sigma_is_sqrt_of_median_squared_distance():
    # squared distances 1, 4, 1 (pairs); median 1 -> sigma 1.  Duplicate rows (distance 0) are skipped.
    x = torch.tensor([[0.0], [1.0], [2.0]])
    assert median_sigma(x) == pytest.approx(1.0)
    x = torch.tensor([[0.0], [0.0], [3.0]])  # squared distances 0, 9, 9 -> median of non-zero = 9
    assert median_sigma(x) == pytest.approx(3.0)
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # 1,9,49,4,36,16 -> sorted 1,4,9,16,36,49 -> median 12.5
    assert median_sigma(x) == pytest.approx(math.sqrt(12.5))


def test_median_sigma_matches_explicit_differences_with_duplicate_rows():
    x = rand(6, 5, seed=11) * 0.1 + 1e3  # duplicates must count as distance 0 and be skipped, whatever the offset
    x = torch.cat([x, x[:2]])
    diffs = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    upper = diffs[torch.triu_indices(8, 8, offset=1).unbind(0)]
    expected = math.sqrt(float(np.median(upper[upper > 0].numpy())))
    assert median_sigma(x) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_self_similarity_is_one(cka):
    x = rand(20, 8)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(cka):
    # rbf too: with a per-matrix median bandwidth, sigma scales with the data. A bandwidth shared between X and Y
    # would break cka(x, 7 * x) == 1.
    x, y = rand(16, 6, seed=4), rand(16, 6, seed=5)
    q, _ = torch.linalg.qr(rand(6, 6, seed=6))
    baseline = cka(x, y)
    assert baseline < 0.95
    assert cka(x, 7.0 * x @ q) == pytest.approx(1.0, abs=1e-10)
    assert cka(7.0 * x @ q + 3.0, y) == pytest.approx(baseline, abs=1e-10)


def test_linear_cka_not_invariant_to_anisotropic_scaling():
    x = rand(16, 4, seed=7)
    stretched = x * torch.tensor([10.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    assert linear_cka(x, stretched) < 0.99


def test_unrelated_features_score_lower_than_related():
    x = rand(40, 10, seed=8)
    related = x + 0.1 * rand(40, 10, seed=9)
    unrelated = rand(40, 10, seed=10)
    for cka in (linear_cka, rbf_cka):
        assert cka(x, related) > 0.9 > cka(x, unrelated)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), d1=st.integers(1, 6), d2=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.floats(1e-3, 1e3))
def test_rbf_in_unit_interval(n, d1, d2, seed, scale):
    x = rand(n, d1, seed=seed) * scale
    y = rand(n, d2, seed=seed + 1)
    value = rbf_cka(x, y)
    assert 0.0 <= value <= 1.0 and not math.isnan(value)


def test_constant_features_give_zero_not_nan():
    # Constant up to one ulp of rounding noise: the centred kernel is ~1e-32, not 0, and would give an arbitrary score.
    const = torch.full((7, 4), 0.7, dtype=torch.float64)
    const[3, 1] = torch.nextafter(const[3, 1], torch.tensor(1.0, dtype=torch.float64))
    x = rand(7, 4)
    for cka in (linear_cka, rbf_cka):
        assert cka(const, x) == 0.0
        assert cka(x, const) == 0.0
        assert cka(const, const) == 0.0
    assert median_sigma(torch.full((5, 3), 2.0)) == 1.0  # all rows identical: no non-zero distance


def test_low_precision_input_is_handled_in_float64():
    x = rand(20, 8).to(torch.bfloat16)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_mismatched_rows_and_bad_input_raise():
    with pytest.raises(EvalError, match="rows"):
        linear_cka(rand(5, 3), rand(6, 3))
    with pytest.raises(EvalError, match="2-D"):
        rbf_cka(rand(5), rand(5))
    with pytest.raises(EvalError, match="NaN"):
        linear_cka(torch.full((3, 2), float("nan")), rand(3, 2))
    with pytest.raises(EvalError, match="sigma"):
        rbf_cka(rand(5, 3), rand(5, 3), sigma=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise comparison and layer choice
# ----------------------------------------------------------------------------------------------------------------


def planted_features(n=30, d=8, layers=4, low_layer=2, tasks=("a", "b", "c")):
    """Every task shares the same features except at `low_layer`, where each task's are independent."""
    shared = {layer: rand(n, d, seed=100 + layer) for layer in range(layers)}
    out = {}
    for t, task in enumerate(tasks):
        out[task] = {}
        for layer in range(layers):
            noise = rand(n, d, seed=1000 * (t + 1) + layer)
            out[task][layer] = noise if layer == low_layer else shared[layer] + 0.05 * noise
    return out


@pytest.mark.parametrize("kind", ["linear", "rbf"])
def test_layerwise_cka_finds_planted_layer(kind):
    result = layerwise_cka(planted_features(low_layer=2), kind=kind)
    assert result.tasks == ["a", "b", "c"] and result.layers == [0, 1, 2, 3] and result.n_samples == 30
    m = torch.tensor(result.matrices[2])
    assert torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype))
    off = [result.matrices[2][a][b] for a in range(3) for b in range(3) if a != b]
    assert result.mean_cross_task[2] == pytest.approx(sum(off) / 6)
    pairwise = linear_cka if kind == "linear" else rbf_cka
    feats = planted_features(low_layer=2)
    assert result.matrices[1][0][2] == pytest.approx(pairwise(feats["a"][1], feats["c"][1]), abs=1e-12)
    assert result.mean_cross_task[2] < 0.7 < min(result.mean_cross_task[i] for i in (0, 1, 3))
    assert choose_expand_layers(result) == [2]
    assert choose_expand_layers(result, threshold=0.7) == [2]


def test_choose_expand_layers_count_threshold_and_ties():
    result = CKAResult(tasks=["a", "b"], layers=[0, 1, 2, 3], kind="linear", n_samples=4,
                       matrices={i: [[1.0, v], [v, 1.0]] for i, v in enumerate([0.9, 0.5, 0.7, 0.5])},
                       mean_cross_task={0: 0.9, 1: 0.5, 2: 0.7, 3: 0.5})
    assert choose_expand_layers(result) == [3]  # tie between 1 and 3 goes to the higher layer
    assert choose_expand_layers(result, count=3) == [1, 2, 3]
    assert choose_expand_layers(result, threshold=0.8) == [1, 2, 3]
    assert choose_expand_layers(result, threshold=0.1) == []
    with pytest.raises(EvalError):
        choose_expand_layers(result, count=1, threshold=0.5)
    with pytest.raises(EvalError, match="count"):
        choose_expand_layers(result, count=5)


def test_layerwise_cka_rejects_misaligned_inputs():
    feats = planted_features()
    with pytest.raises(EvalError, match="at least 2 tasks"):
        layerwise_cka({"a": feats["a"]})
    with pytest.raises(EvalError, match="unknown CKA kind"):
        layerwise_cka(feats, kind="cosine")
    bad = dict(feats, b={k: v for k, v in feats["b"].items() if k != 3})
    with pytest.raises(EvalError, match="task 'b' has layers"):
        layerwise_cka(bad)
    bad = dict(feats, c={k: v[:-1] for k, v in feats["c"].items()})
    with pytest.raises(EvalError, match="task 'c' layer 0 has 29 probe samples"):
        layerwise_cka(bad)


def test_json_round_trip_and_plots(tmp_path):
    result = layerwise_cka(planted_features(layers=5), kind="linear")
    again = CKAResult.from_json(result.to_json())
    assert again == result
    assert choose_expand_layers(again) == choose_expand_layers(result)
    with pytest.raises(EvalError, match="not a CKA result"):
        CKAResult.from_json('{"tasks": []}')
    paths = plot_cka(result, tmp_path / "plots")
    assert [p.name for p in paths] == ["cka_heatmaps.png", "cka_mean_cross_task.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------
# Feature collection on a tiny random LLaVA
# ----------------------------------------------------------------------------------------------------------------

IMAGE_TOKEN, PAD, IMAGE_SEQ = 127, 0, 4  # 16x16 image, 8x8 patches -> 4 patch tokens (CLS dropped)


def tiny_llava(layers=3, seed=0):
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=PAD)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=IMAGE_SEQ)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def sample(seed, length):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN, (length,), generator=g)
    ids = torch.cat([text[:1], torch.full((IMAGE_SEQ,), IMAGE_TOKEN), text[1:]])
    return ids, torch.rand(3, 16, 16, generator=g)


def batch_of(samples, pad_to=None, left=False):
    """Pad a list of (ids, pixels) into one batch (right-padded unless `left`, as generation-time processors do)."""
    width = max(pad_to or 0, *(len(ids) for ids, _ in samples))
    input_ids = torch.full((len(samples), width), PAD)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (ids, _) in enumerate(samples):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, span] = ids
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.stack([p for _, p in samples])}


@pytest.fixture(scope="module")
def probe():
    return [sample(s, length) for s, length in enumerate([6, 9, 4, 7, 5])]


def check_features(model, probe):
    batches = [batch_of(probe[:2]), batch_of(probe[2:])]
    feats = collect_layer_features(model, batches)
    assert sorted(feats) == [0, 1, 2]
    for matrix in feats.values():
        assert matrix.shape == (5, 64) and matrix.dtype == torch.float32 and torch.isfinite(matrix).all()
    # Sample 1 alone (no padding) against the same sample padded to 14 tokens next to a shorter one.
    alone = collect_layer_features(model, [batch_of([probe[1]])])
    padded = collect_layer_features(model, [batch_of([probe[2], probe[1]], pad_to=14)])
    left_padded = collect_layer_features(model, [batch_of([probe[2], probe[1]], pad_to=14, left=True)])
    for layer in feats:
        assert torch.allclose(alone[layer][0], feats[layer][1], atol=1e-5)
        assert torch.allclose(alone[layer][0], padded[layer][1], atol=1e-5)
        assert torch.allclose(alone[layer][0], left_padded[layer][1], atol=1e-5)
    return feats


def test_collect_features_bare_model_respects_padding(probe):
    model = tiny_llava()
    model.train()
    model.model.vision_tower.eval()  # a mixed state, as a runner with a frozen tower may leave it
    feats = check_features(model, probe)
    assert model.training and model.model.language_model.training  # modes restored per submodule
    assert not model.model.vision_tower.training
    assert not torch.allclose(feats[0], feats[2])  # layers really differ
    # Without the mask the pad tokens would be averaged in and sample 1's row would change.
    batch = batch_of([probe[2], probe[1]], pad_to=14)
    unmasked = collect_layer_features(model, [{k: v for k, v in batch.items() if k != "attention_mask"}])
    assert not torch.allclose(unmasked[2][1], feats[2][1], atol=1e-4)


def test_collect_features_selected_layers_and_errors(probe):
    model = tiny_llava()
    feats = collect_layer_features(model, [batch_of(probe[:2])], layers=[-1, 0])
    assert sorted(feats) == [0, 2]
    with pytest.raises(EvalError, match="layer 5 does not exist"):
        collect_layer_features(model, [batch_of(probe[:2])], layers=[5])
    with pytest.raises(EvalError, match="no batches"):
        collect_layer_features(model, [])
    with pytest.raises(ModelError, match="down_proj"):
        find_down_proj_modules(torch.nn.Linear(2, 2))


def test_collect_features_through_peft_hooks_the_lora_wrapper(probe):
    base_feats = collect_layer_features(tiny_llava(), [batch_of(probe)])
    # Non-zero LoRA B (init_lora_weights=False) so the adapter changes the down_proj output.
    peft_model = get_peft_model(tiny_llava(), LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    modules = find_down_proj_modules(peft_model)
    assert sorted(modules) == [0, 1, 2]
    assert all(type(m).__module__.startswith("peft") for m in modules.values())
    feats = check_features(peft_model, probe)
    assert not torch.allclose(feats[0], base_feats[0], atol=1e-4)
