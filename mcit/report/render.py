"""`mcit report`: turn one or several run folders into report.md + report.html with PNG figures.

The numbers and views come from mcit.report.summary (read from results.json, never recomputed); this module lays
them out. report.md references the PNGs by relative file name (they sit next to it); report.html embeds the same
PNGs as base64 so it is a single self-contained file that can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from mcit.errors import EvalError
from mcit.report import plots
from mcit.report.summary import (
    COMPARISON,
    METRICS,
    Run,
    asd_table,
    comparison_values,
    finite_mean,
    forgetting_kinds,
    label_runs,
    last_router_confusion,
    load_run,
    mean_sd,
    prediction_examples,
    router_accuracy,
    seed_groups,
    summary_line,
)
from mcit.runs.folder import RunFolder

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
        mean_gen = [finite_mean([res["matrix"][s][i] for i in closed if con[s][i] is not None]) for s in range(run.last + 1)]
        mean_con = [finite_mean([con[s][i] for i in closed]) for s in range(run.last + 1)]
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

    confusion = last_router_confusion(res)
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

    if run.asd is not None or run.asd_problem:
        _asd_section(doc, run, level + 1)

    if run.suites or run.suite_problems:
        _suites_section(doc, run, prefix, level + 1)

    if run.loss:
        doc.heading(level + 1, "Training loss")
        if run.skipped_log_lines:
            doc.para(f"{run.skipped_log_lines} unparsable line(s) in log.jsonl were skipped.")
        doc.image(plots.loss_curves(run.loss, out / f"{prefix}loss_curves.png"), "training loss")

    examples = prediction_examples(run)
    if examples:
        doc.heading(level + 1, "Example errors on earlier tasks")
        doc.table(["task", "label", "prediction", "reference"], examples)


def _suites_section(doc: Document, run: Run, prefix: str, level: int) -> None:
    """Suites evaluated on the run's stages (`mcit eval SUITE --checkpoints RUN`): scores over the stages and the
    retention, each stage's score minus the base model's (negative: general ability lost)."""
    doc.heading(level, "Evaluation suites")
    for line in run.suite_problems:
        doc.para(line)
    for name, data in run.suites.items():
        tasks, stages = data["tasks"], data["checkpoints"]
        doc.heading(level + 1, f"Suite {name}")
        doc.para(f"{data.get('suite_description') or ''} Evaluated with `mcit eval`; the whole evaluation: "
                 f"{data.get('evaluation', '?')}. Retention: each stage's score minus the base model's.".strip())
        doc.table(["checkpoint", *tasks, "mean"],
                  [[label, *map(fmt, row), fmt(finite_mean(row))] for label, row in zip(stages, data["score"])])
        ret = data["retention"]
        doc.table(["stage", *[f"Δ {t}" for t in tasks], "Δ mean"],
                  [[label.split("/", 1)[-1], *map(fmt, drops), fmt(ret["mean"][label])]
                   for label, drops in ret["per_task"].items()])
        doc.image(plots.scores_over_stages(data["score"], stages, tasks,
                                           doc.out_dir / f"{prefix}suite_{_file_part(name)}.png"),
                  f"suite {name} over the stages")


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _asd_section(doc: Document, run: Run, level: int) -> None:
    doc.heading(level, "ASD conversions")
    if run.asd is None:
        doc.para(str(run.asd_problem))
        return
    table = asd_table(run.asd)
    asked = f"{100 * table.fraction:g} % of each task's training samples" if table.fraction is not None else "a share"
    doc.para(f"Answer Style Diversification asked for {asked} in the shared answer styles; brief/detailed answers "
             f"from rewriter: {table.rewriter}. Skipped picks keep their original style.")
    doc.table(table.header, [[row[0], *(str(v) for v in row[1:-1]), fmt(row[-1])] for row in table.rows])
    if table.reasons:
        doc.para("Skipped: " + "; ".join(f"{reason} {n}" for reason, n in sorted(table.reasons.items())) + ".")


def _seed(run: Run) -> str:
    seed = run.results.get("seed")
    return str(seed) if isinstance(seed, int) else "—"


def _pm(values: list) -> str:
    mean, sd, n = mean_sd(values)
    if mean is None:
        return "—"
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


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
    header = ["method", "seed", *COMPARISON, "Δ superficial", "constrained MFN", "constrained BWT", "router accuracy"]
    doc.table(header, [[r.label, _seed(r), *(fmt(row[k]) for k in header[2:])]
                       for r, row in zip(runs, rows)])
    groups = [g for g in seed_groups(runs) if len(g) > 1]
    if groups:
        doc.heading(3, "Over seeds")
        doc.para("Runs whose recipes differ only in `seed` (and where they were written) are one setting: mean ± "
                 "sample standard deviation over its seeds, from the per-run rows above.")
        keys = [*COMPARISON, "constrained MFN", "router accuracy"]
        by_run = {id(r): row for r, row in zip(runs, rows)}
        methods = [str(g[0].results.get("method")) for g in groups]
        table = []
        for group, method in zip(groups, methods):
            label = method if methods.count(method) == 1 else f"{method} ({', '.join(r.path.name for r in group)})"
            seeds = ", ".join(_seed(r) for r in group)
            table.append([label, seeds, *(_pm([by_run[id(r)][k] for r in group]) for k in keys)])
        doc.table(["method", "seeds", *keys], table)
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
        out_dir = RunFolder(run_dirs[0]).report
    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
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
