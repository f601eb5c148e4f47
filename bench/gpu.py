"""The GPU runs' tables in docs/DISTRIBUTED.md, generated from the files those runs left in `bench/results/gpu-*`.

A GPU is lent to some sessions only, for minutes, so each GPU run is kept as it came back: one folder per call of
the device, `<n>-smoke/summary.txt` (the PASS/FAIL lines of scripts/gpu_smoke.sh) or `<n>-bench/*.json`
(bench.train_speed results). This module only reads them:

    python -m bench.gpu bench/results/gpu-h200 --doc docs/DISTRIBUTED.md

rewrites the block between the markers of the doc. MFU = counted forward+backward FLOPs per step / seconds per step /
the bf16 matmul peak measured in the same call (`peak.json`), shown only where both were measured.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from bench.common import REPO, fill_block

BEGIN, END = "<!-- gpu-runs:begin (python -m bench.gpu) -->", "<!-- gpu-runs:end -->"
CHECK = re.compile(r"^(PASS|FAIL) (\S+) \((\d+) s\)")


def smoke_table(summary: Path) -> list[str]:
    lines = summary.read_text(encoding="utf-8").splitlines()
    env = next((ln.strip() for ln in lines if ln.startswith("     ")), "")
    out = [f"`{summary.parent.name}` — environment: {env}", "", "| check | result | seconds |", "| --- | --- | ---: |"]
    for line in lines:
        match = CHECK.match(line)
        if match:
            out.append(f"| {match[2]} | {match[1]} | {match[3]} |")
    return out


def _side(data: dict[str, Any]) -> str:
    return f"{data['side']} ({data.get('autocast') or 'fp32'})"


def bench_table(folder: Path) -> list[str]:
    peak_file = folder / "peak.json"
    peak = json.loads(peak_file.read_text())["bf16"]["peak_gflops"] * 1e9 if peak_file.is_file() else None
    rows, by_side = [], {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if "side" not in data:
            continue
        if str(data.get("device", "")).startswith("cuda"):
            by_side[(data["side"], data.get("width"), data["batch"])] = data["samples_per_s"]
        mfu = "-"
        if peak and data.get("flops_per_step") and str(data.get("device", "")).startswith("cuda"):
            mfu = f"{100 * data['flops_per_step'] / data['seconds_per_step'] / peak:.2f} %"
        rows.append(f"| {path.stem} | {_side(data)} | {data.get('device', '?')} | {data.get('width') or 'shipped'} | "
                    f"{data['batch']} | {data['samples_per_s']:,.1f} | {data['seconds_per_step']:.4f} | {mfu} |")
    head = [f"`{folder.name}`" + (f" — bf16 matmul peak measured in this call: {peak / 1e12:,.0f} TFLOP/s"
                                  if peak else ""), "",
            "| result file | side | device | LM width | batch | samples/s | s/step | MFU (bf16) |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    ratios = [f"mcit / tuned Trainer at width {width or 'shipped'}, batch {batch}, same call: "
              f"{by_side[('mcit', width, batch)] / tuned:.2f}x"
              for (side, width, batch), tuned in sorted(by_side.items(), key=str)
              if side == "trainer-tuned" and ("mcit", width, batch) in by_side]
    return head + rows + ([""] + ratios if ratios else [])


def render(results: Path) -> list[str]:
    shown = results.resolve().relative_to(REPO) if results.resolve().is_relative_to(REPO) else results
    out: list[str] = [f"Files: `{shown.as_posix()}/`. One block per call of the GPU machine, in order.", ""]
    for folder in sorted(p for p in results.iterdir() if p.is_dir()):
        if (folder / "summary.txt").is_file():
            out += smoke_table(folder / "summary.txt")
        else:
            out += bench_table(folder)
        out.append("")
    return out[:-1]


def write(results: Path, doc: Path) -> None:
    fill_block(doc, BEGIN, END, render(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "DISTRIBUTED.md")
    args = parser.parse_args(argv)
    write(args.results, args.doc)


if __name__ == "__main__":
    main()
