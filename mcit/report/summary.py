"""What a run's results.json says, for `mcit report`: the document loaded and shape-checked, and the views the
schema does not store.

Everything numeric comes from results.json as the runner wrote it (metrics are never recomputed here, so the report
cannot disagree with the run). The only derived numbers are views: the mean superficial/essential percentages over
*earlier* tasks (tasks first trained before a stage), which is what shows how old tasks are forgotten, and the last
non-null router accuracy. mcit.report.render turns them into report.md and report.html.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mcit.data.asd import ASD_STYLES
from mcit.errors import EvalError
from mcit.evaluation.metrics import METRICS
from mcit.runs.folder import RunFolder

# the methods x metrics chart of a comparison report
COMPARISON = (*METRICS, "superficial", "essential")
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
    asd: dict | None = None
    """asd_stats.json: what Answer Style Diversification converted (None: the run used no ASD)."""
    asd_problem: str | None = None
    """Why an existing asd_stats.json could not be read (the report says so instead of failing)."""
    suites: dict[str, dict] = field(default_factory=dict)
    """Evaluation suites run on this run's stages (`<run>/suites/<suite>.json`, written by `mcit eval SUITE
    --checkpoints RUN`): the suite's scores per stage and the retention against the base model."""
    suite_problems: list[str] = field(default_factory=list)

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
    file = RunFolder(run_dir).results
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


def load_run(run_dir: Path) -> Run:
    """results.json (checked) and, when there is a log.jsonl, the loss curves of one run folder."""
    run = Run(path=Path(run_dir), results=load_results(run_dir))
    log_file = RunFolder(run.path).log
    if log_file.is_file():
        run.loss, run.skipped_log_lines = read_loss_log(log_file)
    try:
        run.asd = RunFolder(run.path).read_asd_stats()
    except (OSError, ValueError) as err:
        run.asd_problem = f"{RunFolder(run.path).asd_stats}: not readable ({err})"
    run.suites, run.suite_problems = load_suites(RunFolder(run.path).suites)
    return run


SUITE_KEYS = ("suite", "tasks", "checkpoints", "score", "retention")


def load_suites(folder: Path) -> tuple[dict[str, dict], list[str]]:
    """Every suite extract filed in a run folder, by suite name, and a line for each unreadable one (the report says
    so instead of failing: the run's own results are intact)."""
    suites: dict[str, dict] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            missing = [k for k in SUITE_KEYS if k not in data] if isinstance(data, dict) else list(SUITE_KEYS)
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (OSError, ValueError) as err:
            problems.append(f"{path}: not a suite evaluation's extract ({err})")
            continue
        suites[str(data["suite"])] = data
    return suites, problems


SETTINGS_IGNORED = ("seed", "output_dir", "name", "description", "source")
"""Recipe keys that do not make two runs different settings: runs equal in every other key are seeds of one setting."""


def settings_key(run: Run) -> str:
    """What a run was trained with, less its seed and where it was written: the run folder's recipe.yaml with every
    default filled in (a recipe saved before a key existed equals one that states its default) and without
    `SETTINGS_IGNORED`; a folder without a readable recipe falls back to its recipe name and method."""
    import dataclasses

    from mcit.config import load_recipe

    recipe_file = RunFolder(run.path).recipe
    try:
        settings = dataclasses.asdict(load_recipe(recipe_file, settings_only=True))
    except Exception:  # noqa: BLE001 - no recipe, or one this version cannot read: compare by name
        return json.dumps([run.results.get("recipe"), run.results.get("method")])
    return json.dumps({k: v for k, v in settings.items() if k not in SETTINGS_IGNORED}, sort_keys=True, default=str)


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by `settings_key`, in order of first appearance (a group of several = seeds of one setting)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(settings_key(run), []).append(run)
    return list(groups.values())


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the finite values, and how many there were (sd None below 2)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None, 0
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None), len(finite)


def label_runs(runs: list[Run]) -> None:
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


def finite_mean(values: list) -> float | None:
    """Mean of the finite values; None when there is none (a missing score is not a 0)."""
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
        stage_superficial=[finite_mean([sup[s][i] for i in earlier_tasks(results, s)]) for s in stages],
        stage_essential=[finite_mean([ess[s][i] for i in earlier_tasks(results, s)]) for s in stages],
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
    return finite_mean(rises)


def router_accuracy(results: dict) -> float | None:
    """The last non-null router accuracy as stored (a scalar or one value per stage)."""
    acc = (results.get("router") or {}).get("accuracy")
    if isinstance(acc, (int, float)):
        return float(acc)
    values = [v for v in (acc or []) if v is not None]
    return float(values[-1]) if values else None


def last_router_confusion(results: dict) -> tuple[list[list[float]], str] | None:
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


def prediction_examples(run: Run) -> list[list[str]]:
    """One wrong-format and one wrong-content prediction per earlier task at the newest predictions stage."""
    stage_dirs = sorted(RunFolder(run.path).prediction_dirs().items())
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


@dataclass
class ASDTable:
    """The "ASD conversions" table: per task the training samples, the picks asked for (converted + skipped), the
    conversions per style and the skips; `reasons` are the skip reasons over all tasks."""

    header: list[str]
    rows: list[list[object]]
    rewriter: str
    fraction: float | None
    reasons: dict[str, int]


def asd_table(asd: dict) -> ASDTable:
    """The table view of asd_stats.json (as mcit.data.asd.ASDStats writes it, with the recipe's settings)."""
    styles = [s for s in ASD_STYLES if s in (asd.get("converted") or {})] or list(ASD_STYLES)
    header = ["task", "samples", "asked", *styles, "skipped", "converted %"]
    rows: list[list[object]] = []
    totals = [0, 0, *(0 for _ in styles), 0]
    per_task = asd.get("per_task") or {}
    for task, converted in per_task.items():
        done = [int(converted.get(s, 0)) for s in styles]
        skipped = sum(int(n) for n in ((asd.get("per_task_skipped") or {}).get(task) or {}).values())
        samples = int((asd.get("samples") or {}).get(task, 0))
        row = [samples, sum(done) + skipped, *done, skipped]
        totals = [a + b for a, b in zip(totals, row)]
        rows.append([task, *row, 100.0 * sum(done) / samples if samples else None])
    if len(per_task) > 1:
        rows.append(["all", *totals, 100.0 * sum(totals[2:-1]) / totals[0] if totals[0] else None])
    reasons: dict[str, int] = {}
    for by_reason in (asd.get("skip_reasons") or {}).values():
        for reason, n in by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    return ASDTable(header, rows, str(asd.get("rewriter", "meta")), asd.get("fraction"), reasons)


# --------------------------------------------------------------------------------------------------- comparison


def comparison_values(run: Run) -> dict[str, float | None]:
    """The row of the methods x metrics table; superficial/essential are the means over earlier tasks at the end."""
    metrics = run.results.get("metrics") or {}
    row: dict[str, float | None] = {m: metrics.get(m) for m in METRICS}
    kinds = forgetting_kinds(run.results)
    row["superficial"] = finite_mean(kinds.last_superficial) if kinds else None
    row["Δ superficial"] = superficial_rise(run.results) if kinds else None
    row["essential"] = finite_mean(kinds.last_essential) if kinds else None
    row["router accuracy"] = router_accuracy(run.results)
    constrained = run.results.get("metrics_constrained") or {}
    row["constrained MFN"] = constrained.get("MFN")
    row["constrained BWT"] = constrained.get("BWT")
    return row
