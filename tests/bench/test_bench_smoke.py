"""The benchmark functions at minimal sizes: they run, count what they claim to count, and the report renders.

No timing is asserted; only structure and the invariants the benchmark numbers rely on (steady-state accounting, the
FLOP count of a LoRA step below 6·params·tokens, batched answers equal one-at-a-time answers, routed runs route).
"""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from bench import eval_speed, image_cache, report, router_speed, train_speed

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def small_synthcit(synthcit_root, monkeypatch):
    monkeypatch.setenv("MCIT_SYNTHCIT_ROOT", str(synthcit_root))


def _train_args(tmp_path, side: str, **kw) -> Namespace:
    base = {"side": side, "task": "shape", "steps": 3, "batch": 2, "warmup": 1, "autocast": "bf16", "flops": False,
            "breakdown": False, "dropout": 0.05, "out": str(tmp_path / f"{side}.json")}
    return Namespace(**{**base, **kw})


def test_training_sides_count_the_same_steady_state_work(tmp_path):
    mcit = train_speed.run_mcit(_train_args(tmp_path, "mcit", flops=True, breakdown=True))
    plain = train_speed.run_trainer(_train_args(tmp_path, "trainer"))
    for result in (mcit, plain):
        assert result["steps"] == 3 and result["timed_steps"] == 2
        assert result["samples"] == 4  # steps 2..3 of batch 2: the warm-up step is not counted
        assert result["tokens"] > 36 * result["samples"]  # every sample carries 36 image tokens plus text
        assert result["samples_per_s"] > 0 and 0 <= result["padding_fraction"] < 1
    # a frozen base computes no weight gradients: a LoRA step costs less than 6 * params * tokens
    assert 0 < mcit["flops_counted"] < mcit["flops_6nt"]
    assert set(mcit["breakdown"]["seconds_per_step"]) == {"batch", "forward", "backward", "optimizer"}
    assert mcit["breakdown"]["top_ops"] and all(0 <= op["share"] <= 1 for op in mcit["breakdown"]["top_ops"])


def test_matmul_peak_reports_both_dtypes():
    peak = train_speed.matmul_peak(sizes=(128,), repeats=2)
    assert peak["fp32"]["peak_gflops"] > 0 and peak["bf16"]["peak_gflops"] > 0
    assert set(peak["fp32"]["by_size_gflops"]) == {"128"}


def test_batched_generation_matches_one_at_a_time(tmp_path):
    args = Namespace(tasks="shape,count", per_task=2, train_steps=1, batch=100, max_new_tokens=4, autocast=None,
                     out=str(tmp_path / "eval.json"))
    result = eval_speed.run(args)
    assert result["samples"] == 4
    assert result["identical_inputs"] == 4  # the one-at-a-time path feeds the same token ids as the batched one
    assert result["identical"] == 4, result["differences"]
    assert result["speedup"] > 0


def _router(tmp_path, variant: str, width: int | None = None) -> dict:
    args = Namespace(variant=variant, experts=2, samples=4, new_tokens=2, batch=100, repeats=1, proto_samples=4,
                     width=width, out=str(tmp_path / f"{variant}-{width}.json"))
    return router_speed.run(args)


@pytest.mark.parametrize("variant", ["merged", "lora", "hide", "disco"])
def test_router_variants_run_with_the_requested_experts(tmp_path, variant):
    result = _router(tmp_path, variant)
    assert result["samples"] == 4 and result["seconds"] > 0 and result["width"] == 256
    assert result["flops"] > 0
    if variant in ("merged", "lora"):
        assert result["groups"] == 1 and result["router_accuracy"] is None and result["fused_layers"] == []
    else:
        assert result["groups"] >= 1 and result["router_accuracy"] is not None
        # hide in the paper's layout: every layer but the top one fused; disco routes every layer
        assert result["fused_layers"] == ([0, 1, 2] if variant == "hide" else [])


def test_router_width_swaps_in_a_wider_language_model(tmp_path):
    narrow, wide = _router(tmp_path, "merged"), _router(tmp_path, "merged", width=320)
    assert wide["width"] == 320
    assert wide["flops"] > narrow["flops"]  # same samples and tokens, wider matmuls
    routed = _router(tmp_path, "disco", width=320)
    assert routed["width"] == 320 and routed["flops"] > wide["flops"]  # the experts' rank channels are extra work


def _quality_run(method: str, seed: int, mfn: float, superficial: float) -> dict:
    return {"method": method, "seed": seed, "tasks": ["a", "b"], "matrix": [[0, 0], [mfn, 0], [mfn, mfn]],
            "metrics": {"MFT": mfn, "MFN": mfn, "MAA": mfn, "BWT": 0.0}, "metrics_constrained": {},
            "final_superficial": [superficial, superficial], "final_essential": [0.0, 0.0], "router_accuracy": None}


def test_orderings_are_judged_per_seed():
    by_method = {"joint": [_quality_run("joint", s, 50 + s, 0) for s in range(3)],
                 "lora_ft": [_quality_run("lora_ft", s, 10, 0) for s in range(3)],
                 "replay": [_quality_run("replay", s, [20, 5, 40][s], 0) for s in range(3)],
                 "olora": [_quality_run("olora", s, 5, 0) for s in range(3)]}
    rows = {row.split("|")[2].strip(): row for row in report._claim_rows(by_method)}
    assert rows["joint vs lora_ft"].rstrip(" |").endswith("reproduces")
    assert "tendency" in rows["replay vs lora_ft"]  # +10, -5, +30: better on the mean, not in every seed
    assert "does not reproduce" in rows["olora vs lora_ft"]
    assert "hide vs lora_ft" not in rows  # methods that did not run are not judged


def test_report_renders_stored_parts(tmp_path):
    train = {"task": "shape", "steps": 3, "batch": 2, "warmup": 1, "runs": [
        {"round": 0, "side": side, "autocast": None, "samples_per_s": sps, "tokens_per_s": 10.0 * sps,
         "seconds_per_step": 1 / sps, "padding_fraction": 0.1, "final_loss": 1.0}
        for side, sps in (("mcit", 30.0), ("trainer", 10.0), ("trainer-tuned", 25.0))]}
    train["runs"] += [{"round": 0, "side": side, "autocast": None, "dropout": 0.0, "samples_per_s": sps,
                       "tokens_per_s": 10.0 * sps, "seconds_per_step": 1 / sps, "padding_fraction": 0.1,
                       "final_loss": 1.0} for side, sps in (("mcit", 40.0), ("trainer", 20.0))]
    train["runs"].append({"round": 0, "side": "mcit", "dropout_masks": "packed", "autocast": None, "samples_per_s": 45.0,
                          "tokens_per_s": 450.0, "seconds_per_step": 1 / 45, "padding_fraction": 0.1,
                          "final_loss": 1.0})
    (tmp_path / "train.json").write_text(json.dumps(train))
    router = {"runs": [{"variant": v, "experts": t, "width": w, "samples": 4, "new_tokens": 2, "batch": 100,
                        "seconds": sec, "cpu_seconds": sec, "routing_seconds": 0.0, "groups": 1,
                        "ms_per_sample": 250 * sec, "flops": fl}
                       for v, t, w, sec, fl in (("merged", 1, 256, 1.0, 100.0), ("disco", 6, 256, 2.0, 140.0),
                                                ("merged", 1, 1024, 4.0, 1000.0), ("disco", 6, 1024, 4.2, 1050.0))]}
    (tmp_path / "router.json").write_text(json.dumps(router))
    doc = report.write_report(tmp_path, tmp_path / "BENCHMARKS.md")
    text = doc.read_text()
    assert "mcit / trainer: **3.00×**" in text and "(goal ≥ 1.5×: met)" in text
    assert "mcit / trainer-tuned: **1.20×**" in text and "not met" in text
    assert "| mcit, packed masks | fp32 | 45.0 [45.0]" in text
    assert "mcit, packed masks / trainer-tuned: **1.80×** samples/s (goal ≥ 1.5×: met)" in text
    assert "mcit, dropout 0 / trainer, dropout 0: **2.00×** samples/s (diagnostic)" in text
    # each width against the merged model of its own width
    assert "Width 256: worst routed / merged ratio **2.00×** (goal ≤ 1.1×: not met)" in text
    assert "Width 1024: worst routed / merged ratio **1.05×** (goal ≤ 1.1×: met)" in text
    assert "| 1024 | disco | 6 | 1050.00 | 0.000 | 1.05 |" in text and "| 1.050 |" in text
    assert "## 6. Quality" in text and "No result file (`bench/results/quality-<size>.json`)" in text


def test_image_cache_stays_in_its_budget_and_renders(tmp_path):
    one = 3 * 336 * 336 * 4  # fp32 pixels of one 336-px image
    args = Namespace(images=40, batch=16, budget_mb=3, source="64x48", every=1, out=None)
    bounded = image_cache.run(args)
    assert bounded["image_bytes"] == one and bounded["cache"]["entries"] == 3 * 2**20 // one == 2
    assert bounded["cache"]["held_bytes"] == bounded["cache"]["bytes_used"] <= 3 * 2**20
    assert bounded["cache"]["misses"] == 40 and bounded["cache"]["evictions"] == 38
    unbounded = image_cache.run(Namespace(**{**vars(args), "budget_mb": -1}))
    assert unbounded["budget_mb"] is None and unbounded["cache"]["entries"] == 40
    ext = {"method": "line", "images": 40_000, "mib_per_image": 1.3, "rss_mib": 52_000}
    (tmp_path / "image_cache.json").write_text(json.dumps({"bounded": bounded, "unbounded": unbounded,
                                                           "extrapolation": ext}))
    text = report.write_report(tmp_path, tmp_path / "BENCHMARKS.md").read_text()
    assert "## 7. Image cache" in text and "| unbounded, **extrapolated** (not measured) | 40,000 |" in text
