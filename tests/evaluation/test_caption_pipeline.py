"""The `caption` scorer computes what pycocoevalcap's COCOEvalCap computes, on real human captions (Flickr8k, see
tests/fixtures/captions/README.md): same tokenizer, same metrics, same numbers to 1e-9; and without java it stops
with an EvalError that says how to get java, instead of falling back to other numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pycocoevalcap.eval as coco_eval
import pytest
from pycocotools.coco import COCO

from mcit.errors import EvalError
from mcit.evaluation.scorers import CAPTION_METRICS, get_scorer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "captions"
pytestmark = pytest.mark.slow  # java processes: the tokenizer and METEOR


class _NoSpice:
    """COCOEvalCap also runs SPICE, which downloads Stanford CoreNLP models on first use; the scorer leaves it out."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def coco_reference():
    """COCOEvalCap.evaluate on the fixture (its prints are fine), and the same data as aligned scorer inputs."""
    coco = COCO(str(FIXTURES / "coco_style_refs.json"))
    results = coco.loadRes(json.loads((FIXTURES / "predictions.json").read_text()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_eval, "Spice", _NoSpice)
        evaluation = coco_eval.COCOEvalCap(coco, results)
        evaluation.evaluate()
    ids = coco.getImgIds()
    refs = [[ann["caption"] for ann in coco.imgToAnns[i]] for i in ids]
    preds = [results.imgToAnns[i][0]["caption"] for i in ids]
    return evaluation, ids, preds, refs


def _score(preds, refs, **options):
    metas = [{"references": captions} for captions in refs]
    return get_scorer("caption", **options)(preds, [captions[0] for captions in refs], metas)


def test_fixture_has_several_real_captions_per_image(coco_reference):
    _, ids, preds, refs = coco_reference
    assert len(ids) >= 10 and all(len(captions) == 5 for captions in refs)
    for pred, captions in zip(preds, refs):  # each prediction was written for another image
        assert pred not in captions


def test_caption_details_equal_coco_eval_cap(coco_reference):
    evaluation, ids, preds, refs = coco_reference
    result = _score(preds, refs)
    assert set(evaluation.eval) == {*CAPTION_METRICS, "SPICE"}
    for metric in CAPTION_METRICS:  # METEOR included: on by default
        assert result.details[metric] == pytest.approx(100 * evaluation.eval[metric], rel=0, abs=1e-9), metric
    expected_mean = sum(100 * evaluation.eval[m] for m in CAPTION_METRICS) / 7
    assert result.details["mean"] == pytest.approx(expected_mean, rel=0, abs=1e-9)
    assert result.score == result.details["CIDEr"]
    per_image = [evaluation.imgToEval[i]["CIDEr"] for i in ids]
    assert result.per_sample == pytest.approx([min(1.0, max(0.0, c)) for c in per_image], rel=0, abs=1e-9)
    assert max(per_image) > 1 and 1.0 in result.per_sample  # the clip is exercised
    assert result.details["n"] == len(ids) and "meteor" not in result.details


def test_meteor_off_leaves_the_other_metrics_as_coco_eval_cap_has_them(coco_reference):
    evaluation, _, preds, refs = coco_reference
    result = get_scorer("caption_mean", meteor=False)(preds, [c[0] for c in refs], [{"references": c} for c in refs])
    six = [m for m in CAPTION_METRICS if m != "METEOR"]
    assert "METEOR" not in result.details and result.details["meteor"] == "off"
    for metric in six:
        assert result.details[metric] == pytest.approx(100 * evaluation.eval[metric], rel=0, abs=1e-9), metric
    assert result.score == result.details["mean"] == pytest.approx(sum(result.details[m] for m in six) / 6)


def test_missing_java_is_an_eval_error_naming_the_remedy(monkeypatch, tmp_path):
    preds, refs = ["A black dog leaps over a log ."], [["A large black dog leaps a fallen log ."]]
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java on PATH
    assert shutil.which("java") is None
    for meteor in (True, False):
        with pytest.raises(EvalError, match=r"^caption: `java` is not on PATH.*install a Java runtime, e.g. Debian's "
                                            r"default-jre-headless; scripts/setup.sh does it$"):
            _score(preds, refs, meteor=meteor)
