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
