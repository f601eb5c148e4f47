"""bench.gpu renders the GPU runs kept under bench/results/gpu-*: PASS/FAIL lines, MFU only where FLOPs and a peak of
the same call exist and the side ran on a GPU, and side ratios only within one call."""

from __future__ import annotations

import json

from bench.gpu import BEGIN, END, render, write


def _side(path, side, width, samples_per_s, device="cuda:0", flops=None):
    path.write_text(json.dumps({"side": side, "autocast": "bf16", "device": device, "width": width, "batch": 32,
                                "samples_per_s": samples_per_s, "seconds_per_step": 32 / samples_per_s,
                                **({"flops_per_step": flops} if flops else {})}))


def test_render_computes_mfu_and_same_call_ratios_only(tmp_path):
    smoke, one, two = tmp_path / "1-smoke", tmp_path / "2-bench", tmp_path / "3-bench"
    for folder in (smoke, one, two):
        folder.mkdir()
    (smoke / "summary.txt").write_text("PASS environment (3 s)\n     torch 9 GPU-X\nFAIL eval (7 s): tail\n")
    (one / "peak.json").write_text(json.dumps({"bf16": {"peak_gflops": 1000.0}}))
    _side(one / "mcit.json", "mcit", 1024, 100.0, flops=2e12)        # 2e12 FLOP / 0.32 s / 1e12 = 625 %
    _side(one / "tuned.json", "trainer-tuned", 1024, 50.0, device="cpu")
    _side(two / "mcit.json", "mcit", 1024, 300.0)
    _side(two / "tuned.json", "trainer-tuned", 1024, 200.0)
    text = "\n".join(render(tmp_path))
    assert "| environment | PASS | 3 |" in text and "| eval | FAIL | 7 |" in text and "torch 9 GPU-X" in text
    assert "| 625.00 % |" in text
    assert text.count("same call") == 1 and "1.50x" in text  # 2-bench's Trainer ran on the CPU: no ratio there


def test_write_fills_only_the_marked_block(tmp_path):
    (tmp_path / "r" / "1-smoke").mkdir(parents=True)
    (tmp_path / "r" / "1-smoke" / "summary.txt").write_text("PASS lora_ft (5 s)\n")
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write(tmp_path / "r", doc)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "| lora_ft | PASS | 5 |" in text
