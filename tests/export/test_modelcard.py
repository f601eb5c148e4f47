"""Model cards: metadata, eval results, the accuracy table, license policy, and scrubbing of local details."""

import json
import warnings
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from transformers import AutoProcessor

from mcit.errors import McitError, ModelError
from mcit.export import modelcard
from mcit.export.modelcard import accuracy_table, build_model_card, card_info, prompt_format, scrub
from mcit.models.tiny import ASSET_DIR

RESULTS = {
    "recipe": "synthcit-lora_ft",
    "method": "lora_ft",
    "benchmark": "synthcit",
    "seed": 0,
    "tasks": ["shape", "mc-color", "count"],
    "stages": ["zero-shot", "shape", "mc-color", "count"],
    "stage_tasks": [[], [0], [1], [2]],
    "matrix": [[10.0, 25.0, 5.0], [80.0, 30.0, None], [42.5, 91.0, 6.0], [40.0, 60.0, 75.25]],
    "metrics": {"MFT": 82.08, "MFN": 58.42, "MAA": 60.1, "BWT": -35.5, "forgetting": 35.5, "FWT": None},
}


def make_info(**overrides):
    values = dict(
        base_model="llava-hf/llava-1.5-7b-hf",
        hyperparameters={"lora": {"r": 16, "alpha": 32}, "lr": 2e-4, "epochs": 1},
        license="apache-2.0",
        scorers={"shape": "exact_match"},
        repo_id="someone/synthcit-lora-ft",
    )
    values.update(overrides)
    return card_info(RESULTS, **values)


def test_metadata_and_eval_results_round_trip():
    card = build_model_card(make_info())
    data = ModelCard(str(card)).data  # parse the rendered README back
    assert data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert data.library_name == "peft"
    assert data.license == "apache-2.0"
    assert data.tags == ["mcit", "continual-learning", "llava", "lora"]
    assert data.model_name == "synthcit-lora-ft"
    by_metric = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert by_metric == {
        ("shape", "exact_match"): 40.0,
        ("mc-color", "score"): 60.0,
        ("count", "score"): 75.25,
        ("synthcit", "MFT"): 82.08,
        ("synthcit", "MFN"): 58.42,
        ("synthcit", "MAA"): 60.1,
        ("synthcit", "BWT"): -35.5,
        ("synthcit", "forgetting"): 35.5,
    }


def test_merged_model_is_a_transformers_card_and_names_the_merge():
    card = build_model_card(make_info(artifact="merged", merge="copa"))
    assert card.data.library_name == "transformers"
    assert "merged into this single adapter with **copa**" in card.text
    assert "PeftModel.from_pretrained" not in card.text  # usage snippet only for adapters


def test_body_has_accuracy_table_hyperparameters_and_sequence():
    text = build_model_card(make_info()).text
    assert accuracy_table(RESULTS["stages"], RESULTS["tasks"], RESULTS["matrix"]) in text
    assert "| shape | 80.00 | 30.00 | – |" in text
    assert "| zero-shot | 10.00 | 25.00 | 5.00 |" in text
    assert "| lora.r | 16 |" in text and "| lr | 0.0002 |" in text
    assert "shape → mc-color → count" in text
    assert "| BWT | -35.50 |" in text


def test_missing_license_becomes_other_with_a_warning():
    with pytest.warns(UserWarning, match="no license"):
        card = build_model_card(make_info(license=None))
    assert card.data.license == "other"
    assert "Not specified by the training recipe" in card.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model_card(make_info(license="mit"))


def test_local_and_builtin_base_models_are_not_claimed_as_hub_ids():
    for base in ("builtin:tiny-llava", "/home/alice/models/llava-7b"):
        card = build_model_card(make_info(base_model=base))
        assert card.data.base_model is None
        assert "/home/alice" not in str(card)


def test_card_contains_no_local_paths_user_or_host(monkeypatch):
    monkeypatch.setattr(modelcard.socket, "gethostname", lambda: "gpu-node-17")
    monkeypatch.setattr(modelcard.getpass, "getuser", lambda: "alice")
    info = make_info(
        hyperparameters={
            "data_root": "/home/alice/data/ucit",
            "output_dir": "~/runs/exp1",
            "cache": "C:\\Users\\alice\\cache",
            "launched_on": "gpu-node-17",
            "owner": "alice@gpu-node-17.lab.example",
            "note": "by alice",
        }
    )
    text = str(build_model_card(info))
    for leak in ("/home", "alice", "gpu-node-17", "~/runs", "C:\\"):
        assert leak not in text
    assert "| data_root | <local-path> |" in text
    assert "| launched_on | <host> |" in text


def test_scrub_keeps_urls_ratios_and_hub_ids():
    text = "see https://example.org/a/b, 3/4 of llava-hf/llava-1.5-7b-hf and/or samples/s"
    assert scrub(text) == text


def test_scrub_replaces_paths():
    assert scrub("saved to /tmp/run-3/ckpt/adapter.safetensors.") == "saved to <local-path>."
    assert scrub('root: "/data/x" and ~/y/z') == 'root: "<local-path>" and <local-path>'
    assert scrub("cache D:\\hf\\hub here") == "cache <local-path> here"


def test_scrub_refuses_tokens_without_echoing_them():
    token = "hf_" + "Ab3" * 10
    with pytest.raises(McitError, match="line 2") as info:
        scrub(f"fine\nleaked {token}\n")
    assert token not in str(info.value)
    with pytest.raises(McitError, match="secret"):
        scrub("contains s3cr3t-value", secrets=["s3cr3t-value"])
    assert scrub("hf_hub_download and hf_short are fine") == "hf_hub_download and hf_short are fine"


def test_card_refuses_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "opaque-token-value-123")
    with pytest.raises(McitError, match="secret"):
        build_model_card(make_info(hyperparameters={"oops": "opaque-token-value-123"}))


def test_bad_results_are_reported():
    with pytest.raises(McitError, match="'matrix'"):
        card_info({k: v for k, v in RESULTS.items() if k != "matrix"}, base_model="x/y")
    info = make_info()
    info["matrix"] = info["matrix"][:-1]
    with pytest.raises(McitError, match="one row per stage"):
        build_model_card(info)


def test_card_saves_and_loads(tmp_path):
    card = build_model_card(make_info())
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()


TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "llava-1.5-7b-hf" / "chat_template.json"


def test_card_shows_the_base_models_prompt_format_with_bos_and_eos_spelled_out():
    """llava-1.5-7b-hf's chat template on a LLaMA-style tokenizer that adds BOS (the tiny base's, told to)."""
    processor = AutoProcessor.from_pretrained(ASSET_DIR)
    processor.chat_template = json.loads(TEMPLATE.read_text())["chat_template"]
    processor.tokenizer.add_bos_token = True
    fmt = prompt_format(processor)
    assert fmt["prompt"] == "<s>USER: <image>\nWhat is the shape in the image? ASSISTANT:"
    assert fmt["conversation"] == "<s>USER: <image>\nWhat is the shape in the image? ASSISTANT: A red circle.</s>"
    text = build_model_card(make_info(prompt_format=fmt)).text
    section = text[text.index("## Prompt format"):]
    assert "```text\n" + fmt["prompt"] + "\n```" in section
    assert "```text\n" + fmt["conversation"] + "\n```" in section
    assert "adds `<s>` itself" in section and "stops at `</s>`" in section
    assert "36 placeholder tokens" in section


def test_card_of_the_tiny_base_shows_no_bos_and_a_single_eos():
    fmt = prompt_format(AutoProcessor.from_pretrained(ASSET_DIR))
    assert fmt["bos"] is None and not fmt["prompt"].startswith("<s>")
    assert fmt["conversation"].endswith("A red circle.</s>") and fmt["conversation"].count("</s>") == 1
    assert "no BOS" in build_model_card(make_info(prompt_format=fmt)).text


def test_card_without_a_prompt_format_has_no_section():
    assert "## Prompt format" not in build_model_card(make_info()).text


def test_unloadable_processor_leaves_the_section_out_with_a_warning(monkeypatch):
    def offline(cfg):
        raise ModelError("could not find 'org/model' locally")

    monkeypatch.setattr(modelcard, "load_processor", offline)
    with pytest.warns(UserWarning, match="no 'Prompt format' section"):
        assert modelcard.model_prompt_format(object()) is None
