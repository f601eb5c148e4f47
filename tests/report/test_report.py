"""The run report: files, figures, numbers copied faithfully from results.json, optional parts skipped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mcit.errors import EvalError
from mcit.report.render import write_report

TASKS = ["shape", "mc-color", "count"]
STAGES = ["zero-shot", "shape", "mc-color", "count"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Scores after each stage: each task peaks at its own stage, then the next task's answer style takes over.
MATRIX = [
    [12.5, 30.0, 8.0],
    [91.0, 28.0, 10.0],
    [40.5, 88.0, 6.5],
    [22.0, 51.25, 79.0],
]
# Of the wrong predictions: wrong format (superficial) vs right format, wrong content (essential).
SUPERFICIAL = [[70.0, 40.0, 80.0], [2.0, 60.0, 85.0], [50.0, 4.0, 90.0], [68.0, 30.0, 5.0]]


def _metrics(a: list[list[float]]) -> dict[str, float | None]:
    """The DESIGN.md formulas for a sequential run (task i first trained at stage i+1), for realistic numbers only."""
    t, last = len(TASKS), len(a) - 1
    first = [i + 1 for i in range(t)]
    return {
        "MFT": round(sum(a[first[i]][i] for i in range(t)) / t, 4),
        "MFN": round(sum(a[last]) / t, 4),
        "MAA": round(sum(sum(a[s][:s]) / s for s in range(1, last + 1)) / last, 4),
        "BWT": round(sum(a[last][i] - a[first[i]][i] for i in range(t - 1)) / (t - 1), 4),
        "forgetting": round(
            sum(max(a[s][i] for s in range(first[i], last)) - a[last][i] for i in range(t - 1)) / (t - 1), 4
        ),
        "FWT": None,
    }


def make_run(
    root: Path,
    name: str = "run",
    method: str = "lora_ft",
    *,
    router: bool = True,
    constrained: bool = True,
    forgetting_kinds: bool = True,
    log: bool = True,
    predictions: bool = True,
    matrix: list[list[float]] | None = None,
) -> Path:
    """Fabricate a run folder the way the runner leaves it (results.json, log.jsonl, predictions/stage-XX)."""
    run = root / name
    run.mkdir(parents=True)
    a = matrix or MATRIX
    results: dict = {
        "recipe": f"synthcit-{method}",
        "method": method,
        "benchmark": "synthcit",
        "seed": 0,
        "tasks": TASKS,
        "stages": STAGES,
        "stage_tasks": [[], [0], [1], [2]],
        "matrix": a,
        "format_matrix": [[100.0 - s for s in row] for row in SUPERFICIAL],
        "metrics": _metrics(a),
        "timing": {"total_s": 321.0},
        "memory": {"peak_mb": 900},
    }
    if forgetting_kinds:
        results["superficial"] = SUPERFICIAL
        results["essential"] = [[max(0.0, 100.0 - a[s][i] - SUPERFICIAL[s][i]) for i in range(3)] for s in range(4)]
    if constrained:
        results["constrained_matrix"] = [[None, 35.0, 20.0], [None, 33.0, 22.0], [None, 90.0, 18.0], [None, 74.5, 81.0]]
        results["metrics_constrained"] = {"MFT": 85.5, "MFN": 77.75, "MAA": 60.0, "BWT": -15.5, "forgetting": 15.5}
    if router:
        results["router"] = {
            "accuracy": [None, 100.0, 97.5, 93.25],
            "confusion": [None, [[40]], [[39, 1], [1, 39]], [[38, 1, 1], [0, 37, 3], [2, 1, 37]]],
        }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    if log:
        lines = [
            json.dumps({"stage": s + 1, "task": task, "step": step, "loss": 3.0 / (1 + step / 10) + s, "lr": 2e-4})
            for s, task in enumerate(TASKS)
            for step in range(0, 60, 10)
        ]
        lines.append(json.dumps({"stage": 3, "task": "count", "event": "eval", "score": 79.0}))
        (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    if predictions:
        folder = run / "predictions" / "stage-03"
        folder.mkdir(parents=True)
        recs = {
            "shape": [
                ("circle", "circle", "correct"),
                ("4", "square", "wrong_format"),
                ("star", "square", "wrong_content"),
            ],
            "mc-color": [("B", "B", "correct"), ("two | three", "C", "wrong_format")],
            "count": [("3", "3", "correct")],
        }
        for task, rows in recs.items():
            (folder / f"{task}.jsonl").write_text(
                "".join(
                    json.dumps(
                        {
                            "id": f"{task}-{k}",
                            "prompt": "<image>\nQ?",
                            "prediction": p,
                            "reference": r,
                            "score": float(lab == "correct"),
                            "label": lab,
                            "constrained_correct": None,
                        }
                    )
                    + "\n"
                    for k, (p, r, lab) in enumerate(rows)
                )
            )
    return run


def md_tables(md: str) -> dict[str, list[list[str]]]:
    """Tables keyed by the nearest heading above them (first table under a heading wins); cells unbolded."""
    tables: dict[str, list[list[str]]] = {}
    heading = ""
    for block in md.split("\n\n"):
        if block.startswith("#"):
            heading = block.lstrip("#").strip()
        elif block.startswith("|") and heading not in tables:
            rows = [
                re.split(r"(?<!\\)\|", line.strip())[1:-1] for line in block.splitlines() if not line.startswith("|---")
            ]
            tables[heading] = [[c.strip().strip("*") for c in row] for row in rows]
    return tables


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def image_refs(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_single_run_writes_md_html_and_valid_pngs(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    md_path = write_report([run])
    assert md_path == run / "report" / "report.md"
    md = md_path.read_text()
    refs = image_refs(md)
    assert {
        "accuracy_matrix.png",
        "scores_over_stages.png",
        "forgetting_kinds.png",
        "constrained_vs_generated.png",
        "router_confusion.png",
        "loss_curves.png",
    } == set(refs)
    for ref in refs:
        png = md_path.parent / ref
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as im:
            im.verify()
            assert im.size[0] > 200 and im.size[1] > 200
    page = (md_path.parent / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(refs)
    assert '.png"' not in page  # self-contained: no file references
    assert "two \\| three" in md and "two | three" in page  # pipes escaped in Markdown, raw in HTML


def test_report_numbers_equal_results_json(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    tables = md_tables(write_report([run]).read_text())

    header, generated, constrained = tables["Metrics"]
    names = header[1:]
    assert names == ["MFT", "MFN", "MAA", "BWT", "forgetting", "FWT"]
    assert generated[1:] == [fmt(results["metrics"][m]) for m in names]
    assert constrained[1:] == [fmt(results["metrics_constrained"].get(m)) for m in names]

    matrix_rows = tables["Accuracy matrix"]
    assert matrix_rows[0] == ["stage", *TASKS]
    for s, row in enumerate(matrix_rows[1:]):
        assert row == [STAGES[s], *(fmt(v) for v in results["matrix"][s])]
    con_rows = tables["Constrained vs generated scoring"]
    assert con_rows[1] == ["zero-shot", "—", "35.00", "20.00"]

    # Router accuracy per stage is copied, nulls shown as a dash rather than 0.
    assert tables["Router"][1:] == [["zero-shot", "—"], ["shape", "100.00"], ["mc-color", "97.50"], ["count", "93.25"]]


def test_metrics_are_read_not_recomputed(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["metrics"]["MFT"] = 12.34  # deliberately inconsistent with the matrix
    (run / "results.json").write_text(json.dumps(results))
    md = write_report([run]).read_text()
    assert md_tables(md)["Metrics"][1][1] == "12.34"


def test_forgetting_breakdown_and_summary_line(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    md = write_report([run]).read_text()
    sup, ess = results["superficial"], results["essential"]
    rows = md_tables(md)["How earlier tasks were forgotten"][1:]
    # Stage "mc-color" has one earlier task (shape); stage "count" averages shape and mc-color.
    assert rows == [
        ["mc-color", fmt(sup[2][0]), fmt(ess[2][0])],
        ["count", fmt((sup[3][0] + sup[3][1]) / 2), fmt((ess[3][0] + ess[3][1]) / 2)],
    ]
    share = 100 * (sup[3][0] + sup[3][1]) / (sup[3][0] + sup[3][1] + ess[3][0] + ess[3][1])
    assert f"forgot {results['metrics']['forgetting']:.1f} points on average" in md
    assert f"{share:.0f} % of wrong answers on earlier tasks were in the wrong format (superficial)" in md


def test_multi_run_comparison_lists_both_methods(tmp_path: Path) -> None:
    a = make_run(tmp_path, "a", "lora_ft")
    worse = [[v - 5.0 if s == 3 else v for v in row] for s, row in enumerate(MATRIX)]
    b = make_run(tmp_path, "b", "ewc", router=False, matrix=worse)
    with pytest.raises(EvalError, match="out_dir"):
        write_report([a, b])
    md_path = write_report([a, b], tmp_path / "cmp")
    md = md_path.read_text()
    table = md_tables(md)["Comparison"]
    assert table[0][:4] == ["method", "seed", "MFT", "MFN"] and table[0][-1] == "router accuracy"
    by_method = {row[0]: row for row in table[1:]}
    assert set(by_method) == {"lora_ft", "ewc"}
    for name, run in (("lora_ft", a), ("ewc", b)):
        metrics = json.loads((run / "results.json").read_text())["metrics"]
        assert by_method[name][2:5] == [fmt(metrics["MFT"]), fmt(metrics["MFN"]), fmt(metrics["MAA"])]
    assert by_method["lora_ft"][-1] == "93.25" and by_method["ewc"][-1] == "—"
    c_mfn, c_bwt = table[0].index("constrained MFN"), table[0].index("constrained BWT")
    # tasks 0, 1 (first trained at stages 1, 2) before the last stage 3: wrong-format rise since their own stage
    rise = ((SUPERFICIAL[3][0] - SUPERFICIAL[1][0]) + (SUPERFICIAL[3][1] - SUPERFICIAL[2][1])) / 2
    assert by_method["lora_ft"][table[0].index("Δ superficial")] == fmt(rise)
    assert by_method["lora_ft"][c_mfn] == fmt(77.75) and by_method["lora_ft"][c_bwt] == fmt(-15.5)
    refs = image_refs(md)
    assert "comparison.png" in refs and "run1-accuracy_matrix.png" in refs and "run2-accuracy_matrix.png" in refs
    assert "run2-router_confusion.png" not in refs
    assert all((md_path.parent / r).read_bytes()[:8] == PNG_MAGIC for r in refs)


def test_same_method_twice_is_disambiguated_by_folder(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "seed0"), make_run(tmp_path, "seed1")]
    table = md_tables(write_report(runs, tmp_path / "cmp").read_text())["Comparison"]
    assert [row[0] for row in table[1:]] == ["lora_ft (seed0)", "lora_ft (seed1)"]


def _recipe(run: Path, seed: int, **extra) -> None:
    import yaml

    data = {"name": "synthcit-lora_ft", "seed": seed, "output_dir": str(run), "method": {"name": "lora_ft"},
            "train": {"lr": 0.003, **extra}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(data))
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "seed": seed}))


def test_seeds_of_one_setting_are_averaged_and_other_settings_kept_apart(tmp_path: Path) -> None:
    worse = [[v - 6.0 if s == 3 else v for v in row] for s, row in enumerate(MATRIX)]
    runs = [make_run(tmp_path, "s0"), make_run(tmp_path, "s1", matrix=worse), make_run(tmp_path, "s2"),
            make_run(tmp_path, "lr")]
    for k, run in enumerate(runs[:3]):
        _recipe(run, k)
    _recipe(runs[3], 0, epochs=9)  # another setting of the same method: never averaged with the seeds
    tables = md_tables(write_report(runs, tmp_path / "cmp").read_text())
    assert [row[1] for row in tables["Comparison"][1:]] == ["0", "1", "2", "0"]
    over = tables["Over seeds"]
    assert len(over) == 2 and over[1][:2] == ["lora_ft", "0, 1, 2"]
    mfn = [json.loads((r / "results.json").read_text())["metrics"]["MFN"] for r in runs[:3]]
    mean = sum(mfn) / 3
    sd = (sum((v - mean) ** 2 for v in mfn) / 2) ** 0.5
    assert over[1][over[0].index("MFN")] == f"{fmt(mean)} ± {fmt(sd)}" and sd > 0


def test_missing_optional_parts_are_skipped(tmp_path: Path) -> None:
    run = make_run(tmp_path, router=False, constrained=False, forgetting_kinds=False, log=False, predictions=False)
    md_path = write_report([run])
    md = md_path.read_text()
    for absent in ("Router", "Constrained", "Training loss", "How earlier tasks", "Example errors", "superficial"):
        assert absent not in md
    assert set(image_refs(md)) == {"accuracy_matrix.png", "scores_over_stages.png"}
    assert sorted(p.name for p in md_path.parent.glob("*.png")) == ["accuracy_matrix.png", "scores_over_stages.png"]


def test_joint_run_has_no_earlier_tasks_section(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results.update(
        stages=["zero-shot", "joint"],
        stage_tasks=[[], [0, 1, 2]],
        **{
            k: results[k][:1] + results[k][-1:]
            for k in ("matrix", "format_matrix", "superficial", "essential", "constrained_matrix")
        },
    )
    results["router"]["accuracy"] = 95.0  # a scalar is accepted too
    (run / "results.json").write_text(json.dumps(results))
    md = write_report([run]).read_text()
    assert "How earlier tasks" not in md and "Router accuracy: 95.00" in md


def test_missing_results_json_names_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(EvalError, match="not-a-run.*results.json"):
        write_report([empty])
    assert not (empty / "report").exists()


def test_ragged_matrix_is_reported_with_key_and_row(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["superficial"][2] = [1.0, 2.0]
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(EvalError, match=r"'superficial'\[2\] has 2 values"):
        write_report([run])


def test_truncated_log_line_is_skipped_and_mentioned(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with (run / "log.jsonl").open("a") as f:
        f.write('{"stage": 3, "task": "count", "st')
    md = write_report([run]).read_text()
    assert "1 unparsable line(s) in log.jsonl were skipped" in md
    assert "loss_curves.png" in image_refs(md)


def test_stage_task_index_out_of_range_is_reported(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["stage_tasks"][3] = [3]
    (run / "results.json").write_text(json.dumps(results))
    with pytest.raises(EvalError, match=r"'stage_tasks'\[3\] has task indices \[3\]"):
        write_report([run])


def test_run_without_a_zero_shot_row_still_reports(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    for key in ("matrix", "superficial", "essential", "format_matrix", "constrained_matrix"):
        if results.get(key) is not None:
            results[key][0] = None  # eval.zero_shot: false
    (run / "results.json").write_text(json.dumps(results))
    md = write_report([run]).read_text()
    zero_shot = next(line for line in md.splitlines() if line.startswith("| zero-shot"))
    assert [cell.strip() for cell in zero_shot.strip("|").split("|")[1:]] == ["—"] * len(results["tasks"])
