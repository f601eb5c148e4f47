"""`mcit report`: turn one or several run folders into report.md + report.html with PNG figures.

Everything numeric comes from results.json as the runner wrote it (metrics are never recomputed here, so the report
cannot disagree with the run). The only derived numbers are views the schema does not store: the mean
superficial/essential percentages over *earlier* tasks (tasks first trained before a stage), which is what shows how
old tasks are forgotten, and the last non-null router accuracy.

Output: report.md references the PNGs by relative file name (they sit next to it); report.html embeds the same PNGs
as base64 so it is a single self-contained file that can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mcit.errors import EvalError
from mcit.report import plots

METRICS = ("MFT", "MFN", "MAA", "BWT", "forgetting", "FWT")
REQUIRED_KEYS = ("tasks", "stages", "stage_tasks", "matrix")
OPTIONAL_GRIDS = ("format_matrix", "superficial", "essential", "constrained_matrix")
EXAMPLE_CHARS = 80


# --------------------------------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One run folder as the report sees it."""

    path: Path
    results: dict
    label: str = ""
    loss: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    skipped_log_lines: int = 0

    @property
    def tasks(self) -> list[str]:
        return list(self.results["tasks"])

    @property
    def stages(self) -> list[str]:
        return list(self.results["stages"])

    @property
    def last(self) -> int:
        return len(self.results["stages"]) - 1


def load_results(run_dir: Path) -> dict:
    """Read and shape-check <run_dir>/results.json; a report built on a ragged matrix would silently mislabel cells."""
    file = Path(run_dir) / "results.json"
    if not file.is_file():
        raise EvalError(f"{run_dir}: no results.json in this folder; is it a run output_dir (see docs/DESIGN.md)?")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise EvalError(f"{file}: not valid JSON ({err})") from err
    for key in REQUIRED_KEYS:
        if key not in results:
            raise EvalError(f"{file}: missing key '{key}' (required to build a report)")
    n_stages, n_tasks = len(results["stages"]), len(results["tasks"])
    if len(results["stage_tasks"]) != n_stages:
        raise EvalError(f"{file}: 'stage_tasks' has {len(results['stage_tasks'])} entries, 'stages' has {n_stages}")
    for s, trained in enumerate(results["stage_tasks"]):
        bad = [i for i in trained if not isinstance(i, int) or not 0 <= i < n_tasks]
        if bad:
            raise EvalError(f"{file}: 'stage_tasks'[{s}] has task indices {bad} outside 0..{n_tasks - 1}")
    for key in ("matrix", *OPTIONAL_GRIDS):
        grid = results.get(key)
        if grid is None:
            continue
        if len(grid) != n_stages:
            raise EvalError(f"{file}: '{key}' has {len(grid)} rows, expected one per stage ({n_stages})")
        for r, row in enumerate(grid):
            if row is None:  # a row not evaluated (the zero-shot row when eval.zero_shot is false)
                grid[r] = [None] * n_tasks
                continue
            if not isinstance(row, list) or len(row) != n_tasks:
                raise EvalError(f"{file}: '{key}'[{r}] has {len(row)} values, expected one per task ({n_tasks})")
    return results


def read_loss_log(log_file: Path) -> tuple[dict[str, tuple[list[float], list[float]]], int]:
    """Loss curves from log.jsonl keyed by task (task + stage when a task is trained at several stages).

    Lines without a numeric loss (eval events) are not curves; unparsable lines (a crash mid-write leaves a
    truncated last line) are counted and reported rather than failing the whole report.
    """
    points: dict[tuple[str, object], tuple[list[float], list[float]]] = {}
    skipped = 0
    for line in log_file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("loss"), (int, float)):
            continue
        steps, losses = points.setdefault((str(entry.get("task", "?")), entry.get("stage")), ([], []))
        steps.append(float(entry.get("step", len(steps))))
        losses.append(float(entry["loss"]))
    stages_per_task: dict[str, int] = {}
    for task, _ in points:
        stages_per_task[task] = stages_per_task.get(task, 0) + 1
    curves = {
        (task if stages_per_task[task] == 1 else f"{task} (stage {stage})"): xy for (task, stage), xy in points.items()
    }
    return curves, skipped


def _load_run(run_dir: Path) -> Run:
    run = Run(path=Path(run_dir), results=load_results(run_dir))
    log_file = run.path / "log.jsonl"
    if log_file.is_file():
        run.loss, run.skipped_log_lines = read_loss_log(log_file)
    return run


def _label_runs(runs: list[Run]) -> None:
    """Label = method name; runs sharing a method (seeds, ablations) get their folder name appended."""
    methods = [str(r.results.get("method") or r.path.name) for r in runs]
    for run, method in zip(runs, methods):
        run.label = method if methods.count(method) == 1 else f"{method} ({run.path.name})"


# --------------------------------------------------------------------------------------------------- views


def first_stages(results: dict) -> list[int | None]:
    """first(i): the first stage that trained task i (None if no stage did, e.g. an eval-only results.json)."""
    first: list[int | None] = [None] * len(results["tasks"])
    for s, trained in enumerate(results["stage_tasks"]):
        for i in trained:
            if first[i] is None:
                first[i] = s
    return first


def earlier_tasks(results: dict, stage: int) -> list[int]:
    """Tasks first trained strictly before `stage`: the ones that can have been forgotten by then."""
    return [i for i, f in enumerate(first_stages(results)) if f is not None and f < stage]


def _mean(values: list) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


@dataclass
class ForgettingKinds:
    """Superficial/essential percentages over earlier tasks: per stage (mean) and per task after the last stage."""

    stages: list[int]
    stage_superficial: list[float | None]
    stage_essential: list[float | None]
    last_tasks: list[int]
    last_superficial: list[float | None]
    last_essential: list[float | None]

    @property
    def superficial_share(self) -> float | None:
        """% of wrong answers on earlier tasks (last stage) that were in the wrong format."""
        sup = sum(v for v in self.last_superficial if v is not None)
        ess = sum(v for v in self.last_essential if v is not None)
        return 100.0 * sup / (sup + ess) if sup + ess > 0 else None


def forgetting_kinds(results: dict) -> ForgettingKinds | None:
    """None when the run stores no superficial/essential matrices or no stage follows another task's training."""
    sup, ess = results.get("superficial"), results.get("essential")
    if sup is None or ess is None:
        return None
    stages = [s for s in range(1, len(results["stages"])) if earlier_tasks(results, s)]
    if not stages:
        return None
    last = len(results["stages"]) - 1
    last_tasks = earlier_tasks(results, last)
    return ForgettingKinds(
        stages=stages,
        stage_superficial=[_mean([sup[s][i] for i in earlier_tasks(results, s)]) for s in stages],
        stage_essential=[_mean([ess[s][i] for i in earlier_tasks(results, s)]) for s in stages],
        last_tasks=last_tasks,
        last_superficial=[sup[last][i] for i in last_tasks],
        last_essential=[ess[last][i] for i in last_tasks],
    )


def superficial_rise(results: dict) -> float | None:
    """Mean over the tasks trained before the last stage of (wrong-format % after the last stage - the same right
    after the task's own stage): superficial forgetting as a change, not a level."""
    sup = results.get("superficial")
    if not sup:
        return None
    last = len(results["stages"]) - 1
    firsts = first_stages(results)
    rises = [sup[last][i] - sup[firsts[i]][i] for i in earlier_tasks(results, last)
             if sup[last][i] is not None and sup[firsts[i]][i] is not None]
    return _mean(rises)


def router_accuracy(results: dict) -> float | None:
    """The last non-null router accuracy as stored (a scalar or one value per stage)."""
    acc = (results.get("router") or {}).get("accuracy")
    if isinstance(acc, (int, float)):
        return float(acc)
    values = [v for v in (acc or []) if v is not None]
    return float(values[-1]) if values else None


def _router_confusion(results: dict) -> tuple[list[list[float]], str] | None:
    """The confusion matrix to draw and its title: the stored one, or the last non-null of a per-stage list."""
    confusion = (results.get("router") or {}).get("confusion")
    if not confusion:
        return None
    non_null = [m for m in confusion if m is not None]
    if non_null and isinstance(non_null[0], list) and non_null[0] and isinstance(non_null[0][0], list):
        stage = max(s for s, m in enumerate(confusion) if m is not None)
        name = results["stages"][stage] if len(confusion) == len(results["stages"]) else str(stage)
        return non_null[-1], f"Router confusion after {name}"
    return confusion, "Router confusion"


def _prediction_examples(run: Run) -> list[list[str]]:
    """One wrong-format and one wrong-content prediction per earlier task at the newest predictions stage."""
    stage_dirs = sorted(
        (int(m.group(1)), d)
        for d in (run.path / "predictions").glob("stage-*")
        if (m := re.fullmatch(r"stage-(\d+)", d.name)) and d.is_dir()
    )
    if not stage_dirs:
        return []
    stage, folder = stage_dirs[-1]
    rows = []
    for i in earlier_tasks(run.results, min(stage, run.last)):
        file = folder / f"{run.tasks[i]}.jsonl"
        if not file.is_file():
            continue
        wanted = {"wrong_format", "wrong_content"}
        for line in file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("label") in wanted:
                wanted.discard(rec["label"])
                rows.append([run.tasks[i], rec["label"], _clip(rec.get("prediction")), _clip(rec.get("reference"))])
            if not wanted:
                break
    return rows


def _clip(text: object) -> str:
    text = " ".join(str(text if text is not None else "").split())
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def summary_line(run: Run) -> str:
    """One plain-language sentence about what the run forgot and how."""
    metrics = run.results.get("metrics") or {}
    parts = []
    if metrics.get("forgetting") is not None:
        parts.append(f"forgot {metrics['forgetting']:.1f} points on average")
    if metrics.get("BWT") is not None:
        parts.append(f"backward transfer {metrics['BWT']:+.1f}")
    if metrics.get("MFN") is not None:
        parts.append(f"final mean score {metrics['MFN']:.1f}")
    kinds = forgetting_kinds(run.results)
    if kinds is not None:
        share = kinds.superficial_share
        if share is None:
            parts.append("no wrong answers on earlier tasks after the last stage")
        else:
            parts.append(
                f"{share:.0f} % of wrong answers on earlier tasks were in the wrong format (superficial), "
                f"{100 - share:.0f} % had the right format but wrong content (essential)"
            )
    acc = router_accuracy(run.results)
    if acc is not None:
        parts.append(f"router accuracy {acc:.2f}")
    return f"{run.label}: " + ("; ".join(parts) if parts else "no metrics stored") + "."


# --------------------------------------------------------------------------------------------------- document


@dataclass
class Strong:
    """A table cell rendered bold (the trained cells of the accuracy matrix)."""

    text: str


Cell = str | Strong


def fmt(value: object) -> str:
    """Numbers with two decimals, missing values as an em dash (never as 0, which would read as a score)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, float)):
        return f"{value:.2f}"
    return str(value)


class Document:
    """Ordered blocks rendered both to Markdown and HTML, so the two files can never drift apart."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Cell]]) -> None:
        self.blocks.append(("table", header, rows))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path.name, alt))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "img":
                out.append(f"![{block[2]}]({block[1]})")
            else:
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "img":
                data = base64.b64encode((self.out_dir / block[1]).read_bytes()).decode("ascii")
                body.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}"></p>')
            else:
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}"
            "th{background:#eee}img{max-width:100%}"
        )
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


def _md_cell(cell: Cell) -> str:
    text = cell.text if isinstance(cell, Strong) else cell
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"**{text}**" if isinstance(cell, Strong) else text


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Strong):
        return f"<td><b>{html.escape(cell.text)}</b></td>"
    return f"<td>{html.escape(cell)}</td>"


# --------------------------------------------------------------------------------------------------- sections


def _grid_rows(results: dict, key: str, bold: set[tuple[int, int]]) -> list[list[Cell]]:
    return [
        [stage] + [Strong(fmt(v)) if (s, i) in bold else fmt(v) for i, v in enumerate(results[key][s])]
        for s, stage in enumerate(results["stages"])
    ]


def _run_section(doc: Document, run: Run, prefix: str, level: int) -> None:
    res, out = run.results, doc.out_dir
    meta = ", ".join(f"{k}: {res[k]}" for k in ("method", "benchmark", "recipe", "seed") if res.get(k) is not None)
    doc.heading(level, f"{run.label}")
    doc.para(f"Folder: {run.path}" + (f" ({meta})" if meta else ""))
    doc.para(summary_line(run))

    doc.heading(level + 1, "Metrics")
    header = ["scoring", *METRICS]
    rows: list[list[Cell]] = [["generated", *(fmt((res.get("metrics") or {}).get(m)) for m in METRICS)]]
    if res.get("metrics_constrained"):
        rows.append(["constrained", *(fmt(res["metrics_constrained"].get(m)) for m in METRICS)])
    doc.table(header, rows)

    trained = {(s, i) for s, tasks in enumerate(res["stage_tasks"]) for i in tasks}
    doc.heading(level + 1, "Accuracy matrix")
    doc.para("Rows: after stage; columns: evaluated task; bold: the task trained at that stage.")
    doc.table(["stage", *run.tasks], _grid_rows(res, "matrix", trained))
    doc.image(
        plots.accuracy_heatmap(
            res["matrix"], run.stages, run.tasks, sorted(trained), out / f"{prefix}accuracy_matrix.png"
        ),
        "accuracy matrix",
    )
    doc.image(
        plots.scores_over_stages(res["matrix"], run.stages, run.tasks, out / f"{prefix}scores_over_stages.png"),
        "per-task score over stages",
    )

    kinds = forgetting_kinds(res)
    if kinds is not None:
        doc.heading(level + 1, "How earlier tasks were forgotten")
        doc.para(
            "Superficial = % of predictions in the wrong format; essential = % in the right format but with wrong "
            "content; both averaged over the tasks first trained before that stage."
        )
        doc.table(
            ["stage", "superficial", "essential"],
            [
                [run.stages[s], fmt(a), fmt(b)]
                for s, a, b in zip(kinds.stages, kinds.stage_superficial, kinds.stage_essential)
            ],
        )
        doc.image(
            plots.forgetting_kinds(
                [run.stages[s] for s in kinds.stages],
                kinds.stage_superficial,
                kinds.stage_essential,
                [run.tasks[i] for i in kinds.last_tasks],
                kinds.last_superficial,
                kinds.last_essential,
                out / f"{prefix}forgetting_kinds.png",
            ),
            "superficial and essential forgetting",
        )

    if res.get("constrained_matrix"):
        con = res["constrained_matrix"]
        doc.heading(level + 1, "Constrained vs generated scoring")
        doc.para(
            "Constrained: % of samples where the reference answer has the highest likelihood among the task's "
            "valid answers (closed tasks only)."
        )
        doc.table(["stage", *run.tasks], _grid_rows(res, "constrained_matrix", trained))
        closed = [i for i in range(len(run.tasks)) if any(row[i] is not None for row in con)]
        mean_gen = [_mean([res["matrix"][s][i] for i in closed if con[s][i] is not None]) for s in range(run.last + 1)]
        mean_con = [_mean([con[s][i] for i in closed]) for s in range(run.last + 1)]
        doc.image(
            plots.constrained_vs_generated(
                [run.tasks[i] for i in closed],
                [res["matrix"][run.last][i] for i in closed],
                [con[run.last][i] for i in closed],
                run.stages,
                mean_gen,
                mean_con,
                out / f"{prefix}constrained_vs_generated.png",
            ),
            "constrained vs generated",
        )

    confusion = _router_confusion(res)
    acc = (res.get("router") or {}).get("accuracy")
    if confusion is not None or router_accuracy(res) is not None:
        doc.heading(level + 1, "Router")
        if isinstance(acc, list) and len(acc) == len(run.stages):
            doc.table(["stage", "router accuracy"], [[st, fmt(a)] for st, a in zip(run.stages, acc)])
        else:
            doc.para(f"Router accuracy: {fmt(router_accuracy(res))}")
        if confusion is not None:
            grid, title = confusion
            labels = run.tasks[: len(grid)] if len(grid) <= len(run.tasks) else [str(i) for i in range(len(grid))]
            doc.image(
                plots.router_confusion(grid, labels, out / f"{prefix}router_confusion.png", title), "router confusion"
            )

    if run.loss:
        doc.heading(level + 1, "Training loss")
        if run.skipped_log_lines:
            doc.para(f"{run.skipped_log_lines} unparsable line(s) in log.jsonl were skipped.")
        doc.image(plots.loss_curves(run.loss, out / f"{prefix}loss_curves.png"), "training loss")

    examples = _prediction_examples(run)
    if examples:
        doc.heading(level + 1, "Example errors on earlier tasks")
        doc.table(["task", "label", "prediction", "reference"], examples)


COMPARISON = ("MFT", "MFN", "MAA", "BWT", "forgetting", "FWT", "superficial", "essential")


def comparison_values(run: Run) -> dict[str, float | None]:
    """The row of the methods x metrics table; superficial/essential are the means over earlier tasks at the end."""
    metrics = run.results.get("metrics") or {}
    row: dict[str, float | None] = {m: metrics.get(m) for m in METRICS}
    kinds = forgetting_kinds(run.results)
    row["superficial"] = _mean(kinds.last_superficial) if kinds else None
    row["Δ superficial"] = superficial_rise(run.results) if kinds else None
    row["essential"] = _mean(kinds.last_essential) if kinds else None
    row["router accuracy"] = router_accuracy(run.results)
    constrained = run.results.get("metrics_constrained") or {}
    row["constrained MFN"] = constrained.get("MFN")
    row["constrained BWT"] = constrained.get("BWT")
    return row


def _comparison_section(doc: Document, runs: list[Run]) -> None:
    rows = [comparison_values(r) for r in runs]
    doc.heading(2, "Comparison")
    for run in runs:
        doc.para(summary_line(run))
    doc.para(
        "superficial / essential: mean % of wrong-format / wrong-content predictions on the tasks trained before "
        "the last stage, after the last stage; Δ superficial: its rise since each task's own stage. Constrained MFN / BWT: the same metrics on likelihood-ranked answers "
        "(closed-answer tasks only; format-independent, so a constrained BWT near 0 means the knowledge is still "
        "there). Router accuracy and the constrained columns are not drawn in the chart."
    )
    header = ["method", *COMPARISON, "Δ superficial", "constrained MFN", "constrained BWT", "router accuracy"]
    doc.table(header, [[r.label, *(fmt(row[k]) for k in header[1:])] for r, row in zip(runs, rows)])
    doc.image(
        plots.method_comparison(
            [r.label for r in runs],
            COMPARISON,
            [[row[k] for k in COMPARISON] for row in rows],
            doc.out_dir / "comparison.png",
        ),
        "methods compared",
    )


# --------------------------------------------------------------------------------------------------- entry point


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and the PNGs for one or several runs; returns the path of report.md.

    `out_dir` defaults to <run>/report for a single run; with several runs there is no natural home, so it is
    required. All results.json files are read before anything is written, so a bad folder leaves no half report.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise EvalError("write_report: no run folders given")
    if out_dir is None:
        if len(run_dirs) > 1:
            raise EvalError(f"write_report: {len(run_dirs)} run folders given; pass out_dir for the combined report")
        out_dir = run_dirs[0] / "report"
    runs = [_load_run(d) for d in run_dirs]
    _label_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    doc = Document(out_dir)
    title = "mcit run report" if len(runs) == 1 else "mcit comparison report"
    doc.heading(1, title)
    if len(runs) == 1:
        _run_section(doc, runs[0], prefix="", level=2)
    else:
        _comparison_section(doc, runs)
        for k, run in enumerate(runs, start=1):
            _run_section(doc, run, prefix=f"run{k}-", level=2)

    md_path = out_dir / "report.md"
    md_path.write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html(title))
    return md_path
