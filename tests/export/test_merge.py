"""Merging task LoRAs: CoPA follows its paper (mcit/export/merge.py docstring), the PEFT methods agree with PEFT, `cat` is the exact sum of dW."""

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from mcit.errors import McitError
from mcit.export.merge import (
    default_weights,
    merge_loras,
    merge_non_lora,
    merge_with_peft,
    merged_lora_config,
    split_lora_state,
)

TASKS = ["t0", "t1", "t2"]
RANK, ALPHA = 4, 8  # scaling 2.0


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 7)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def tiny_peft_model():
    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q", "v"], init_lora_weights=False)
    model = get_peft_model(TinyNet(), config, adapter_name=TASKS[0])
    for name in TASKS[1:]:
        model.add_adapter(name, config)
    return model.eval()


def task_states(model):
    return [get_peft_model_state_dict(model, adapter_name=name) for name in TASKS]


def delta(state, a_key, scaling=1.0):
    return scaling * state[a_key.replace("lora_A", "lora_B")] @ state[a_key]


def a_keys(state):
    return [k for k in state if ".lora_A." in k]


# --- CoPA -------------------------------------------------------------------------------------------------------


def test_copa_on_a_hand_computed_example():
    # density 0.5: each 2x2 matrix keeps its two largest magnitudes. Worked by hand:
    # A1 keeps 4, 3 -> row ratios 5/4, 5/3 -> 80th pct 1.5833 -> s1 = [1.5833, 1.6667]
    # A2 keeps -5, 2.5 -> row ratios 6/5, 4.5/2.5 -> 80th pct 1.68 -> s2 = [1.68, 1.8]
    # B1 keeps -3, 2 (column 1), B2 keeps 4, -1.5 (column 0); merged A = 2 * (masked A1 + masked A2)
    A1, A2 = torch.tensor([[4.0, 1.0], [-2.0, 3.0]]), torch.tensor([[1.0, -5.0], [2.0, 2.5]])
    B1, B2 = torch.tensor([[1.0, -3.0], [0.5, 2.0]]), torch.tensor([[4.0, 1.0], [-1.5, 0.2]])
    adapters = [{"m.lora_A.weight": A, "m.lora_B.weight": B} for A, B in ((A1, B1), (A2, B2))]
    out = merge_loras(adapters, "copa", density=0.5)
    assert torch.allclose(out["m.lora_A.weight"], torch.tensor([[8.0, -10.0], [0.0, 11.0]]))
    s1, s2 = torch.tensor([1.25 + 0.8 * (5 / 3 - 1.25), 5 / 3]), torch.tensor([1.68, 1.8])
    expected_B = torch.stack(
        [
            2 * (1.68 * torch.tensor([4.0, -1.5])) / (s1[0] + s2[0]),
            2 * (s1[1] * torch.tensor([-3.0, 2.0])) / (s1[1] + s2[1]),
        ],
        dim=1,
    )
    assert torch.allclose(out["m.lora_B.weight"], expected_B, atol=1e-5)


def _copa_reference(As, Bs, density=0.2, coef=2.0, q=0.8):
    """The CoPA steps of the merge docstring, one by one, with loops and sorting instead of the implementation's topk/vector ops."""

    def keep_top(M):
        values = sorted((abs(v) for v in M.reshape(-1).tolist()), reverse=True)
        threshold = values[max(1, int(density * M.numel())) - 1]
        return torch.where(M.abs() >= threshold, M, torch.zeros_like(M))

    def percentile(values, p):
        ordered = sorted(values)
        pos = p * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (pos - low) * (ordered[high] - ordered[low])

    r = As[0].shape[0]
    merged_A = torch.zeros_like(As[0])
    ratios, masked_Bs = [], []
    for A, B in zip(As, Bs):
        mA = keep_top(A)
        merged_A += coef * mA
        row = []
        for k in range(r):
            kept = float(mA[k].abs().sum())
            row.append(float(A[k].abs().sum()) / kept if kept > 0 else float("inf"))
        finite = [x for x in row if x != float("inf")]
        row = [x if x != float("inf") else max(finite, default=1.0) for x in row]
        floor = percentile(row, q)
        ratios.append([max(x, floor) for x in row])
        masked_Bs.append(keep_top(B))
    merged_B = torch.zeros_like(Bs[0])
    for k in range(r):
        total = sum(s[k] for s in ratios)
        for s, mB in zip(ratios, masked_Bs):
            merged_B[:, k] += coef * s[k] * mB[:, k] / total
    return merged_A, merged_B


def test_copa_equals_step_by_step_recomputation():
    # distinct magnitudes (a permutation) so "top 20 %" has no ties; r=4, 24 entries in A -> 4 kept, so some rows
    # keep nothing and exercise the documented infinite-ratio rule
    g = torch.Generator().manual_seed(3)
    adapters = []
    for _ in range(3):
        state = {}
        for layer, (d_in, d_out) in {"q": (6, 5), "v": (5, 7)}.items():
            signs = torch.randint(0, 2, (RANK * d_in,), generator=g) * 2 - 1
            A = (torch.randperm(RANK * d_in, generator=g) + 1).float() * signs / 10
            B = (torch.randperm(d_out * RANK, generator=g) + 1).float() / 7
            state[f"{layer}.lora_A.weight"] = A.reshape(RANK, d_in)
            state[f"{layer}.lora_B.weight"] = B.reshape(d_out, RANK)
        adapters.append(state)
    out = merge_loras(adapters, "copa")
    for layer in ("q", "v"):
        As = [a[f"{layer}.lora_A.weight"] for a in adapters]
        Bs = [a[f"{layer}.lora_B.weight"] for a in adapters]
        ref_A, ref_B = _copa_reference(As, Bs)
        assert torch.allclose(out[f"{layer}.lora_A.weight"], ref_A)
        assert torch.allclose(out[f"{layer}.lora_B.weight"], ref_B, atol=1e-6)
        assert torch.isfinite(out[f"{layer}.lora_B.weight"]).all()


def test_copa_folds_source_scaling_into_B():
    states = task_states(tiny_peft_model())
    plain, scaled = merge_loras(states, "copa"), merge_loras(states, "copa", scaling=2.0)
    for key in plain:
        factor = 2.0 if ".lora_B." in key else 1.0
        assert torch.allclose(scaled[key], factor * plain[key])


# --- cat / linear semantics -------------------------------------------------------------------------------------


def test_cat_reproduces_the_exact_sum_of_task_deltas():
    states = task_states(tiny_peft_model())
    merged = merge_loras(states, "cat", scaling=ALPHA / RANK)
    for key in a_keys(states[0]):
        assert merged[key].shape[0] == RANK * len(TASKS)
        expected = sum(delta(s, key, ALPHA / RANK) for s in states)
        assert torch.allclose(delta(merged, key), expected, atol=1e-6)


def test_cat_accepts_different_ranks():
    g = torch.Generator().manual_seed(0)
    states = [
        {"m.lora_A.weight": torch.randn(r, 6, generator=g), "m.lora_B.weight": torch.randn(5, r, generator=g)}
        for r in (2, 5)
    ]
    merged = merge_loras(states, "cat", weights=[0.5, -1.0])
    expected = 0.5 * delta(states[0], "m.lora_A.weight") - delta(states[1], "m.lora_A.weight")
    assert torch.allclose(delta(merged, "m.lora_A.weight"), expected, atol=1e-5)
    with pytest.raises(McitError, match="same rank"):
        merge_loras(states, "linear")


def test_linear_merges_A_and_B_separately_so_cross_terms_appear():
    states = task_states(tiny_peft_model())
    weights, scaling = [0.5, 0.3, 0.2], ALPHA / RANK
    merged = merge_loras(states, "linear", weights=weights, scaling=scaling)
    for key in a_keys(states[0]):
        b_key = key.replace("lora_A", "lora_B")
        with_cross = sum(
            (wt * wu) ** 0.5 * scaling * st[b_key] @ su[key]
            for st, wt in zip(states, weights)
            for su, wu in zip(states, weights)
        )
        assert torch.allclose(delta(merged, key), with_cross, atol=1e-5)
        average = sum(w * delta(s, key, scaling) for s, w in zip(states, weights))
        assert not torch.allclose(delta(merged, key), average, atol=1e-3)


# --- PEFT agreement on a real (tiny) PeftModel ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "cat", "ties", "copa"])
def test_state_dict_merge_matches_merge_with_peft(method):
    model = tiny_peft_model()
    states = task_states(model)
    via_peft = merge_with_peft(model, TASKS, method, density=0.5, new_name="merged")
    ours = merge_loras(states, method, scaling=ALPHA / RANK, density=0.5)
    assert set(via_peft) == set(ours)
    rank = RANK * len(TASKS) if method == "cat" else RANK
    for key, tensor in ours.items():
        expected_shape = (rank, tensor.shape[1]) if ".lora_A." in key else (tensor.shape[0], rank)
        assert tuple(via_peft[key].shape) == expected_shape
        assert torch.allclose(via_peft[key], tensor, atol=1e-6), key
    assert model.peft_config["merged"].lora_alpha == rank and model.peft_config["merged"].r == rank


def _dare_outcomes(values, weights, density, ties):
    """Every value DARE can give for one entry: one outcome per keep/drop pattern of the T task values."""
    outcomes = []
    for pattern in itertools.product([0, 1], repeat=len(values)):
        pruned = [v * m / density for v, m in zip(values, pattern)]
        if not ties:
            outcomes.append(sum(w * p for w, p in zip(weights, pruned)))
            continue
        majority = 1 if sum(pruned) >= 0 else -1
        kept = [(w, p) for w, p in zip(weights, pruned) if p != 0 and (p > 0) == (majority > 0)]
        outcomes.append(sum(w * p for w, p in kept) / max(len(kept), 1))
    return outcomes


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_results_follow_peft_rule_in_both_paths(method):
    # PEFT draws its DARE masks after initialising the new adapter, so the two paths cannot share random draws;
    # instead check that every merged entry, from either path, is one of the values DARE's rule can produce.
    model = tiny_peft_model()
    states = task_states(model)
    density, weights, scaling = 0.5, default_weights(method, 3), ALPHA / RANK
    via_peft = merge_with_peft(model, TASKS, method, density=density, new_name="merged")
    ours = merge_loras(states, method, scaling=scaling, density=density, seed=0)
    side_weights = {"A": [(w * scaling) ** 0.5 for w in weights], "B": [(w * scaling) ** 0.5 for w in weights]}
    ties = method == "dare_ties"
    changed = 0
    for key in ours:
        side = "A" if ".lora_A." in key else "B"
        stacked = torch.stack([s[key] for s in states])
        for index in itertools.product(*(range(n) for n in ours[key].shape)):
            outcomes = _dare_outcomes(stacked[(slice(None), *index)].tolist(), side_weights[side], density, ties)
            for result in (ours, via_peft):
                assert min(abs(result[key][index].item() - o) for o in outcomes) < 1e-5, (key, index)
        linear = merge_loras(states, "linear", weights=weights, scaling=scaling)[key]
        changed += int(not torch.allclose(ours[key], linear))
    assert changed == len(ours)


def test_cat_adapter_reproduces_all_task_adapters_active():
    model = tiny_peft_model()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    model.base_model.set_adapter(TASKS)
    with torch.no_grad():
        summed = model(x)
    merge_with_peft(model, TASKS, "cat", weights=[1.0, 1.0, 1.0], new_name="merged")
    model.base_model.set_adapter("merged")
    with torch.no_grad():
        merged = model(x)
    assert torch.allclose(merged, summed, atol=1e-5)


def test_merge_with_peft_refuses_existing_name_and_unknown_adapters():
    model = tiny_peft_model()
    with pytest.raises(McitError, match="already exists"):
        merge_with_peft(model, TASKS, "linear", new_name="t1")
    with pytest.raises(McitError, match="not in the model"):
        merge_with_peft(model, ["t0", "nope"], "linear")


def test_merged_lora_config_serves_at_scaling_one():
    config = merged_lora_config(LoraConfig(r=4, lora_alpha=32, use_rslora=True, rank_pattern={"q": 8}), 12)
    assert (config.r, config.lora_alpha, config.use_rslora, config.rank_pattern) == (12, 12, False, {})


def test_dare_is_reproducible_with_a_seed_and_keeps_global_rng():
    states = task_states(tiny_peft_model())
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first = merge_loras(states, "dare_ties", seed=3)
    after = torch.rand(1)
    second = merge_loras(states, "dare_ties", seed=3)
    assert torch.equal(before, after)
    assert all(torch.equal(first[k], second[k]) for k in first)


# --- inputs, dtypes, non-LoRA trainables ------------------------------------------------------------------------


def test_bad_inputs_raise_actionable_errors():
    states = task_states(tiny_peft_model())
    with pytest.raises(McitError, match="merge_non_lora"):
        merge_loras([{**s, "projector.weight": torch.zeros(2)} for s in states], "linear")
    with pytest.raises(McitError, match="no task weights"):
        merge_loras(states, "copa", weights=[1, 1, 1])
    with pytest.raises(McitError, match="one weight per task"):
        merge_loras(states, "linear", weights=[1.0])
    with pytest.raises(McitError, match="unknown merge method"):
        merge_loras(states, "svd")
    key = a_keys(states[0])[0]
    with pytest.raises(McitError, match="different LoRA weights"):
        merge_loras([states[0], {k: v for k, v in states[1].items() if k != key}], "linear")


def test_dtype_is_preserved():
    states = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in task_states(tiny_peft_model())]
    merged = merge_loras(states, "ties")
    assert all(v.dtype == torch.bfloat16 for v in merged.values())


def test_merge_non_lora_averages_projector_and_checks_keys():
    states = [{"proj.weight": torch.full((2, 2), float(i)), "proj.steps": torch.tensor([7])} for i in range(4)]
    out = merge_non_lora(states)
    assert torch.allclose(out["proj.weight"], torch.full((2, 2), 1.5))
    assert torch.equal(out["proj.steps"], torch.tensor([7]))
    weighted = merge_non_lora(states[:2], weights=[0.25, 0.75])
    assert torch.allclose(weighted["proj.weight"], torch.full((2, 2), 0.75))
    with pytest.raises(McitError, match="same keys"):
        merge_non_lora([states[0], {"proj.weight": torch.zeros(2, 2)}])
    with pytest.raises(McitError, match="differs across tasks"):
        merge_non_lora([states[0], {**states[1], "proj.steps": torch.tensor([8])}])


def test_split_lora_state_separates_projector():
    state = {"a.lora_A.default.weight": torch.zeros(1), "a.lora_B.weight": torch.zeros(1), "mm_projector.w": 1}
    lora, rest = split_lora_state(state)
    assert set(lora) == {"a.lora_A.default.weight", "a.lora_B.weight"} and set(rest) == {"mm_projector.w"}


def test_merge_with_peft_on_a_tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=63))
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False
    )
    model = get_peft_model(base.eval(), config, adapter_name="t0")
    model.add_adapter("t1", config)
    ids = torch.tensor([[1, 5, 9, 2]])
    model.base_model.set_adapter(["t0", "t1"])
    with torch.no_grad():
        summed = model(input_ids=ids).logits
    cat = merge_with_peft(model, ["t0", "t1"], "cat", weights=[1.0, 1.0], new_name="cat")
    copa = merge_with_peft(model, ["t0", "t1"], "copa", new_name="copa")
    assert len(cat) == len(copa) == 8  # 2 layers x (q, v) x (A, B)
    assert all(v.shape[0] == 2 * RANK for k, v in cat.items() if ".lora_A." in k)
    model.base_model.set_adapter("cat")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, summed, atol=1e-4)
    model.base_model.set_adapter("copa")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
