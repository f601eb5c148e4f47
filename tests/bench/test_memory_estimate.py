"""bench/memory_estimate.py: the 7B count, the ZeRO partitioning rules, the methods' structure on meta, and the doc's
tables matching the committed result file."""

from __future__ import annotations

import pytest

from bench import memory_estimate as me
from bench.common import read_json
from mcit.errors import McitError


@pytest.fixture(scope="module")
def model():
    return me.meta_model()


def test_llava_7b_counts_on_meta(model):
    counts = me.base_counts(model)
    assert abs(counts["total"] - 7.06e9) / 7.06e9 < 0.01
    assert counts["total"] == counts["language_model"] + counts["vision_tower"] + counts["projector"]
    assert counts["lm_head"] == me.TEXT["vocab_size"] * me.TEXT["hidden_size"]  # not tied to the embedding
    assert next(model.parameters()).device.type == "meta"
    # one decoder layer: 4 h x h attention projections + 3 h x intermediate MLP matrices + 2 norms
    h, i = me.TEXT["hidden_size"], me.TEXT["intermediate_size"]
    assert me.largest_layer(model) == 4 * h * h + 3 * h * i + 2 * h


def test_zero3_weights_are_an_eighth_of_zero2_plus_one_gathered_layer():
    args = {"total": 7_063_427_072, "trainable": 340_787_200, "largest": 202_383_360}
    z2 = me.zero_memory(**args, world=8, stage=2)
    z3 = me.zero_memory(**args, world=8, stage=3)
    assert z3["weights"] - me.WEIGHT_B * args["largest"] == pytest.approx(z2["weights"] / 8)
    assert z3["optimizer"] == z2["optimizer"] == me.OPTIMIZER_B * args["trainable"] / 8
    assert me.zero_memory(**args, world=16, stage=2)["gradients"] == z2["gradients"] / 2


def test_committed_result_follows_the_rules():
    data = read_json(me.RESULT)
    assert data is not None, f"{me.RESULT} is missing: run python -m bench.memory_estimate"
    assert abs(data["model"]["counts"]["total"] - 7.06e9) / 7.06e9 < 0.01
    by = {(r["method"], r["world"], r["zero"]): r for r in data["memory"]}
    stages = {m["method"]: m["stages"] for m in data["methods"]}
    for (method, world, zero), row in by.items():
        if zero == 3:
            largest = stages[method][-1]["largest_layer"]
            z2 = by[(method, world, 2)]
            assert row["weights"] - me.WEIGHT_B * largest == pytest.approx(z2["weights"] / world)
        assert row["train_checkpointing"] < row["train_no_checkpointing"]
    # a method that trains only its newest adapter holds more than it trains after six tasks
    for method in ("hide", "olora", "disco"):
        assert stages[method][-1]["adapters"] > stages[method][-1]["trainable"]
        assert len({s["trainable"] for s in stages[method]}) == 1  # flat cost per task
    assert not by[("olora", 8, 3)]["supported"] and by[("reglora", 8, 3)]["supported"]


def test_doc_tables_are_the_rendered_result_file():
    data = read_json(me.RESULT)
    text = me.DOC.read_text(encoding="utf-8")
    assert me.BEGIN in text and me.END in text
    generated = text.split(me.BEGIN, 1)[1].split(me.END, 1)[0].strip("\n")
    assert generated == "\n".join(me.render(data)), "docs/DISTRIBUTED.md is stale: python -m bench.memory_estimate --render"


def test_write_doc_without_markers_names_the_file(tmp_path):
    doc = tmp_path / "X.md"
    doc.write_text("# nothing here\n")
    with pytest.raises(McitError, match="X.md"):
        me.write_doc(read_json(me.RESULT), doc)


@pytest.mark.slow  # attaches PEFT to the 7B model on meta: a few seconds
def test_lora_ft_attached_on_meta_matches_the_lora_shapes():
    found = me.attach("lora_ft")
    h, i, layers = me.TEXT["hidden_size"], me.TEXT["intermediate_size"], me.TEXT["num_hidden_layers"]
    # q, k, v, o: h -> h; gate, up: h -> i; down: i -> h; a rank-r LoRA holds r * (d_in + d_out)
    lora = found["r"] * layers * (4 * (h + h) + 3 * (h + i))
    projector = 1024 * h + h + h * h + h  # two linears with bias, vision width 1024 -> h -> h
    assert len(found["stages"]) == me.TASKS
    for stage in found["stages"]:  # one adapter carried from task to task: the same count at every stage
        assert stage["trainable"] == lora + projector
        assert stage["adapters"] == lora
    assert found["zero_stages"] == [2, 3]


def test_activation_and_kv_formulas():
    acts = me.activation_bytes(layers=32, hidden=4096, heads=32, intermediate=11008, vocab=32064, seq=776, batch=4,
                               lora_dropout=False)
    assert acts["per_layer"] == 34 * 776 * 4 * 4096 + 5 * 32 * 776**2 * 4
    assert acts["checkpointing"] < acts["no_checkpointing"]
    with_dropout = me.activation_bytes(layers=32, hidden=4096, heads=32, intermediate=11008, vocab=32064, seq=776,
                                       batch=4, lora_dropout=True)
    assert with_dropout["no_checkpointing"] > acts["no_checkpointing"]
    # K and V, 32 layers, bf16: 0.5 MiB per token of the 7B model
    assert me.kv_cache_bytes(layers=32, hidden=4096, kv_heads=32, heads=32, batch=1, tokens=1) == 2**19
