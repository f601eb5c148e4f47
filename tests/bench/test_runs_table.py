"""`python -m bench.runs table`: the generated method tables name the seeds each row ran, give mean ± sd over them,
and check the papers' orderings per seed (what docs/METHODS-MORE.md and docs/MODELS.md are written from)."""

from __future__ import annotations

from bench.runs import table


def _run(method: str, seed: int, mfn: float) -> dict:
    return {"method": method, "seed": seed, "size": "full", "model": "builtin:tiny-llava", "tasks": ["a", "b"],
            "matrix": [[0.0, 0.0], [mfn, 0.0], [mfn, mfn]],
            "metrics": {"MFT": mfn, "MFN": mfn, "MAA": mfn, "BWT": 0.0}, "metrics_constrained": {"MFN": mfn},
            "final_superficial": [1.0, 3.0], "final_essential": [0.0, 0.0], "router_accuracy": None}


def test_rows_name_their_seeds_and_average_over_them():
    data = {"runs": [_run("lora_ft", 0, 10.0), _run("lora_ft", 1, 20.0), _run("keeplora", 0, 40.0),
                     {"method": "keeplora", "seed": 1, "size": "full", "model": "builtin:tiny-llava",
                      "error": "killed"}]}
    lines = table(data)
    summary = lines[:next(i for i, line in enumerate(lines) if line.startswith("Final row"))]
    rows = {line.split("|")[2].strip(): line for line in summary if line.startswith("| tiny-llava |")}
    assert "| lora_ft | 0, 1 | 15.0 ± 7.1 | 15.0 ± 7.1 |" in rows["lora_ft"]
    assert "| keeplora | 0 | 40.0 | 40.0 |" in rows["keeplora"]  # the failed seed is neither listed nor averaged
    assert any("KeepLoRA beats sequential LoRA" in line and "reproduces" in line for line in lines)


def test_a_constrained_claim_reads_the_likelihood_ranked_metrics():
    runs = []
    for seed, (lora_bwt, reg_bwt) in enumerate([(-60.0, -50.0), (-55.0, -57.0)]):
        for method, bwt in (("lora_ft", lora_bwt), ("reglora", reg_bwt)):
            run = _run(method, seed, 20.0)
            run["metrics_constrained"]["BWT"] = bwt
            runs.append(run)
    rows = [line for line in table({"runs": runs}) if "vs lora_ft | constrained BWT" in line]
    assert len(rows) == 1 and "RegLoRA cuts essential forgetting" in rows[0]
    assert "| +4.0 (+10.0 / -2.0) | tendency (not every seed) |" in rows[0]  # higher (less negative) BWT is better


def test_collect_keeps_the_last_in_run_layer_cka(tmp_path):
    import json

    import torch

    from bench import runs
    from mcit.analysis.cka import layerwise_cka

    folder = tmp_path / "hide-s0"
    (folder / "analysis").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"tasks": ["a", "b"], "stages": ["a", "b"],
                                                     "matrix": [[0.0, 0.0], [50.0, 0.0], [40.0, 60.0]],
                                                     "metrics": {"MFN": 50.0}}))
    assert runs.collect(folder, "lora_ft", 0, "tiny", [])["layer_cka"] is None  # a method that writes none
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(12, 8, generator=gen)
    for stage, noise in ((2, 1.0), (3, 0.1)):  # the same file names and contents hide writes after each stage
        features = {task: {layer: shared + noise * (layer + 1) * torch.randn(12, 8, generator=gen) for layer in (0, 1)}
                    for task in ("a", "b")}
        result = layerwise_cka(features, kind="linear")
        (folder / "analysis" / f"hide-cka-stage-{stage:02d}.json").write_text(result.to_json())
        (folder / "analysis" / f"hide-cka-stage-{stage:02d}.expand.json").write_text(
            json.dumps({"expand_layers": [1] if stage == 3 else [0, 1], "probe_per_task": 12}))
    record = runs.collect(folder, "hide", 0, "tiny", [])["layer_cka"]
    assert record["stage"] == 3 and record["kind"] == "linear" and record["expand_layers"] == [1]
    assert record["mean_cross_task"] == {str(k): round(v, 4) for k, v in result.mean_cross_task.items()}
    assert record["mean_cross_task"]["0"] > record["mean_cross_task"]["1"]  # less noise, more similar


def test_collect_only_adds_finished_runs_and_starts_none(tmp_path, monkeypatch):
    import json

    from bench import runs

    def never(*args, **kwargs):
        raise AssertionError("collect_only started a run")

    monkeypatch.setattr(runs, "run_child", never)
    monkeypatch.setattr(runs, "base_weights", lambda model: {"folder": model})
    done = runs.run_folder(tmp_path, "tiny", "lora_ft", 0, "builtin:tiny-llava")
    done.mkdir(parents=True)
    result = {"tasks": ["a"], "stages": ["a"], "matrix": [[0.0], [50.0]], "metrics": {"MFN": 50.0}}
    (done / "results.json").write_text(json.dumps(result))
    (done / "probe.json").write_text("{}")
    half = runs.run_folder(tmp_path, "tiny", "disco", 0, "builtin:tiny-llava")
    half.mkdir(parents=True)  # started, never finished: no results, no probe
    out = tmp_path / "collected.json"
    data = runs.quality(["builtin:tiny-llava"], ["lora_ft", "disco"], [0], "tiny", out, workdir=tmp_path,
                        collect_only=True)
    assert [(r["method"], r["metrics"]["MFN"]) for r in data["runs"]] == [("lora_ft", 50.0)]
    assert half.is_dir()  # a half-finished run is neither collected nor moved aside


def test_resume_continues_a_half_finished_run_in_place(tmp_path, monkeypatch):
    import json

    from bench import runs

    started = []

    def child(module, args, probe, threads, **kwargs):  # stands in for the worker: finishes the run it was given
        folder = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        started.append(sorted(p.name for p in folder.iterdir()))
        (folder / "results.json").write_text(json.dumps({"tasks": ["a"], "stages": ["a"], "matrix": [[0.0], [7.0]],
                                                         "metrics": {"MFN": 7.0}}))
        probe.write_text(json.dumps({"stages": []}))

    monkeypatch.setattr(runs, "run_child", child)
    monkeypatch.setattr(runs, "base_weights", lambda model: {"folder": model})
    half = runs.run_folder(tmp_path, "tiny", "disco", 0, "builtin:tiny-llava")
    (half / "checkpoints" / "stage-01-a").mkdir(parents=True)
    (half / "recipe.yaml").write_text("train: {epochs: 1}\n")
    data = runs.quality(["builtin:tiny-llava"], ["disco"], [0], "tiny", tmp_path / "out.json", workdir=tmp_path,
                        resume=True)
    assert started == [["checkpoints", "recipe.yaml"]]  # the worker ran in the old folder, its stage still there
    assert not list(half.parent.glob("*.stale-*"))
    assert data["runs"][0]["probe"]["resumed"] is True and data["runs"][0]["metrics"]["MFN"] == 7.0
    other = runs.run_folder(tmp_path, "tiny", "hide", 0, "builtin:tiny-llava")
    (other / "checkpoints").mkdir(parents=True)
    runs.quality(["builtin:tiny-llava"], ["hide"], [0], "tiny", tmp_path / "out.json", workdir=tmp_path)
    assert len(list(other.parent.glob("hide-s0.stale-*"))) == 1  # without resume: moved aside, started clean


def test_stop_after_starts_no_run_once_its_minutes_are_spent(tmp_path, monkeypatch):
    import json

    from bench import runs

    clock = [1000.0]
    started = []

    def child(module, args, probe, threads, **kwargs):  # each run takes 30 minutes of the fake clock
        folder = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        started.append(folder.name)
        clock[0] += 30 * 60
        (folder / "results.json").write_text(json.dumps({"tasks": ["a"], "stages": ["a"], "matrix": [[0.0], [1.0]],
                                                         "metrics": {"MFN": 1.0}}))
        probe.write_text("{}")

    monkeypatch.setattr(runs, "run_child", child)
    monkeypatch.setattr(runs, "base_weights", lambda model: {"folder": model})
    monkeypatch.setattr(runs.time, "time", lambda: clock[0])
    out = tmp_path / "out.json"
    data = runs.quality(["builtin:tiny-llava"], ["lora_ft", "disco"], [0, 1], "tiny", out, workdir=tmp_path,
                        stop_after=45)
    assert started == ["lora_ft-s0", "lora_ft-s1"]  # method-major; the third would start at minute 60
    assert len(data["runs"]) == 2
    data = runs.quality(["builtin:tiny-llava"], ["lora_ft", "disco"], [0, 1], "tiny", out, workdir=tmp_path,
                        stop_after=45)  # the next part: finished runs reused, two more started
    assert started[2:] == ["disco-s0", "disco-s1"] and len(data["runs"]) == 4


def test_a_doc_table_shows_only_its_methods_in_its_order_and_only_their_orderings():
    data = {"runs": [_run("lora_ft", 0, 10.0), _run("keeplora", 0, 40.0), _run("disco", 0, 80.0)]}
    lines = table(data, ["disco", "lora_ft"])
    shown = [line.split("|")[2].strip() for line in lines if line.startswith("| tiny-llava |")]
    assert shown == ["disco", "lora_ft", "disco", "lora_ft"]  # summary rows, then final-row rows
    assert any("DISCO beats sequential LoRA" in line for line in lines)
    assert not any("KeepLoRA" in line for line in lines)


def test_a_variant_is_another_methods_recipe_with_overrides():
    from bench.runs import DOC_TABLES, METHODS, recipe_for
    from mcit.config import load_recipe

    path, overrides = recipe_for("hide_top")
    recipe = load_recipe(path, [*overrides, "output_dir=/tmp/unused"])
    assert path.name == "hide.yaml" and recipe.method.name == "hide"
    assert recipe.method.options["expand_layers"] == [-1]  # the paper's layout, not the recipe's `auto`
    assert load_recipe(recipe_for("hide")[0], ["output_dir=/tmp/unused"]).method.options["expand_layers"] == "auto"
    for doc, _result, methods in DOC_TABLES.values():  # every doc table names known methods only
        assert methods is None or set(methods) <= set(METHODS), doc


def test_the_readme_headline_says_the_papers_hide_layout_beside_hide_and_does_not_rank_it(tmp_path):
    import json

    from bench.report import headline

    runs = [_run("lora_ft", 0, 10.0), _run("hide", 0, 70.0), _run("hide", 1, 80.0), _run("hide_top", 0, 0.5)]
    (tmp_path / "quality-methods.json").write_text(json.dumps({"runs": runs}))
    text = " ".join(" ".join(headline(tmp_path)).split())  # the lines are wrapped at 120 columns
    assert "hide 75.0 ± 7.1 (2 seeds), lora_ft 10.0 (seed 0)." in text  # ranked by MFN, the variant left out
    assert "top-layer layout, which gives 0.5 (seed 0) here (`hide_top`)" in text
