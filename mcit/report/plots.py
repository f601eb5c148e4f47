"""Figures for the run report, drawn with matplotlib's object API (no pyplot).

Why no pyplot: pyplot keeps global figure state and picks a GUI backend from the environment; reports are written
on headless training nodes and from tests running in parallel. A bare `Figure` renders through Agg and is freed as
soon as it goes out of scope.

Every function takes plain lists (None = not evaluated), writes one PNG at `path` and returns it. Deciding *what* to
show (which tasks count as "earlier", which stage is last) is the report's job, not the plotter's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

Grid = Sequence[Sequence[float | None]]

DPI = 110
SUPERFICIAL_COLOR = "#e4883a"
ESSENTIAL_COLOR = "#b23a48"


def _array(grid: Grid) -> np.ndarray:
    """Rows of floats with None -> NaN, so matplotlib leaves gaps instead of drawing zeros."""
    return np.array([[math.nan if v is None else float(v) for v in row] for row in grid], dtype=float)


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _annotated_grid(ax, values: np.ndarray, cmap: str, vmin: float, vmax: float, fmt: str):
    """imshow with each finite cell labelled; text colour flips on dark cells so it stays readable."""
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    span = (vmax - vmin) or 1.0
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            dark = (v - vmin) / span > 0.6
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return im


def accuracy_heatmap(
    matrix: Grid, stages: Sequence[str], tasks: Sequence[str], trained: Sequence[tuple[int, int]], path: Path
) -> Path:
    """Stages x tasks heatmap; `trained` (stage, task) cells get a frame (the generalised diagonal)."""
    values = _array(matrix)
    fig = Figure(figsize=(max(5.0, 1.6 + 0.9 * len(tasks)), 1.4 + 0.5 * len(stages)))
    ax = fig.add_subplot()
    im = _annotated_grid(ax, values, "viridis", 0.0, 100.0, ".1f")
    for r, c in trained:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(stages)), stages)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after stage")
    ax.set_title("Accuracy matrix\n(red frame: trained at that stage)", fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    return _save(fig, path)


def scores_over_stages(matrix: Grid, stages: Sequence[str], tasks: Sequence[str], path: Path) -> Path:
    """One line per task across stages; the drop after a task's own stage is the forgetting."""
    values = _array(matrix)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.8 * len(stages)), 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(stages))
    for i, task in enumerate(tasks):
        ax.plot(x, values[:, i], marker="o", label=task)
    ax.set_xticks(x, stages, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("score")
    ax.set_title("Per-task score after each stage")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def forgetting_kinds(
    stage_labels: Sequence[str],
    stage_superficial: Sequence[float],
    stage_essential: Sequence[float],
    task_labels: Sequence[str],
    task_superficial: Sequence[float | None],
    task_essential: Sequence[float | None],
    path: Path,
) -> Path:
    """Stacked superficial/essential bars: left per stage (mean over earlier tasks), right per task at the last stage.

    Both panels share a y scale (% of predictions) so a tall orange bar reads as "the answers lost their form" and a
    tall red bar as "right form, wrong content".
    """
    fig = Figure(figsize=(9.0, 3.8))
    panels = [
        (fig.add_subplot(1, 2, 1), stage_labels, stage_superficial, stage_essential, "Earlier tasks, mean per stage"),
        (fig.add_subplot(1, 2, 2), task_labels, task_superficial, task_essential, "Earlier tasks after last stage"),
    ]
    for ax, labels, sup, ess, title in panels:
        sup_arr = np.array([math.nan if v is None else v for v in sup], dtype=float)
        ess_arr = np.array([math.nan if v is None else v for v in ess], dtype=float)
        x = np.arange(len(labels))
        ax.bar(x, sup_arr, color=SUPERFICIAL_COLOR, label="superficial (wrong format)")
        ax.bar(x, ess_arr, bottom=np.nan_to_num(sup_arr), color=ESSENTIAL_COLOR, label="essential (wrong content)")
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of predictions")
        ax.set_title(title, fontsize=10)
    panels[0][0].legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def constrained_vs_generated(
    tasks: Sequence[str],
    generated: Sequence[float | None],
    constrained: Sequence[float | None],
    stages: Sequence[str],
    mean_generated: Sequence[float | None],
    mean_constrained: Sequence[float | None],
    path: Path,
) -> Path:
    """Generated vs constrained score, per task at the last stage and as a mean over stages.

    The gap between the two is knowledge the model still has but no longer expresses in its free-form answer.
    """
    fig = Figure(figsize=(9.0, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    x = np.arange(len(tasks))
    gen = np.array([math.nan if v is None else v for v in generated], dtype=float)
    con = np.array([math.nan if v is None else v for v in constrained], dtype=float)
    ax.bar(x - 0.2, gen, width=0.4, label="generated")
    ax.bar(x + 0.2, con, width=0.4, label="constrained")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("score")
    ax.set_title("After last stage", fontsize=10)
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    xs = np.arange(len(stages))
    ax2.plot(xs, [math.nan if v is None else v for v in mean_generated], marker="o", label="generated")
    ax2.plot(xs, [math.nan if v is None else v for v in mean_constrained], marker="s", ls="--", label="constrained")
    ax2.set_xticks(xs, stages, rotation=30, ha="right")
    ax2.set_ylim(0, 100)
    ax2.set_title("Mean over tasks with constrained scores", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return _save(fig, path)


def loss_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path) -> Path:
    """Training loss against step, one line per curve label (task, or task + stage when a task recurs)."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.add_subplot()
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def router_confusion(confusion: Grid, labels: Sequence[str], path: Path, title: str = "Router confusion") -> Path:
    """True task (rows) x routed task (columns), annotated with the stored values."""
    values = _array(confusion)
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size else 1.0
    integral = finite.size > 0 and bool(np.all(finite == np.round(finite)))
    fig = Figure(figsize=(1.5 + 0.8 * len(labels), 1.2 + 0.7 * len(labels)))
    ax = fig.add_subplot()
    im = _annotated_grid(ax, values, "Blues", 0.0, vmax or 1.0, ".0f" if integral else ".2f")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def method_comparison(
    run_labels: Sequence[str], metric_names: Sequence[str], values: Sequence[Sequence[float | None]], path: Path
) -> Path:
    """Grouped bars: metrics on the x axis, one bar per run. `values[r][m]` is run r's metric m."""
    grid = _array(values)
    n_runs = len(run_labels)
    width = 0.8 / max(n_runs, 1)
    fig = Figure(figsize=(max(6.0, 1.1 * len(metric_names) + 1.5), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(metric_names))
    for r, label in enumerate(run_labels):
        ax.bar(x - 0.4 + width * (r + 0.5), grid[r], width=width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, metric_names, rotation=20, ha="right")
    ax.set_ylabel("points")
    ax.set_title("Methods compared")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
