"""Official VQA accuracy and the COCO caption metrics."""

from __future__ import annotations

import os
import shutil
import signal
import warnings

import pytest
from pycocoevalcap.cider.cider import Cider

from tasks import caption_metrics
from tasks.caption_metrics import score_captions
from tasks.vqa_eval import normalize_answer, vqa_accuracy

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


# --------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(("agree", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_values(agree: int, expected: float) -> None:
    answers = ["2"] * agree + ["3"] * (10 - agree)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two.", "2"),
        ("two", "2"),
        ("The dog", "dog"),
        ("a red circle", "red circle"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Yes!", "yes"),
        ("  red\tcircle\n", "red circle"),
        ("black/white", "black white"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("none", "0"),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_prediction_is_normalised_before_matching() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("The circle", ["circle"] * 10) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0


#: (prediction, the 10 annotators' answers, the score of the official pipeline): each expected
#: score was computed by running GT-Vision-Lab/VQA's vqaEval.py at a013f00 (ported from Python 2
#: by its print statements only) on the prediction after EvalAI's answer processor. Unanimous vs
#: split references, capitals, punctuation, number words, articles, contractions, "'s", commas in
#: numbers, decimals, hyphens.
OFFICIAL_CASES = [
    ('yes', ['yes'] * 10, 1.0),
    ('Yes', ['yes'] * 10, 1.0),
    ('yes.', ['yes'] * 10, 1.0),
    ('Two', ['2'] * 10, 1.0),
    ('two', ['2'] * 5 + ['two'] * 5, 1.0),
    ('ten', ['10'] * 3 + ['ten'] * 2 + ['9'] * 5, 1.0),
    ('a dog', ['dog'] * 10, 1.0),
    ('the dog', ['dog'] * 2 + ['cat'] * 8, 0.6),
    ('dont', ["don't"] * 10, 1.0),
    ('black and white', ['black and white'] * 4 + ['black/white'] * 6, 1.0),
    ('black/white', ['black and white'] * 4 + ['black/white'] * 6, 1.0),
    ('1,000', ['1000'] * 10, 1.0),
    ('yes!', ['yes'] * 10, 1.0),
    ('Yes', ['yes'] * 9 + ['no'], 1.0),
    ('3 ', ['3'] * 10, 1.0),
    ('no', ['yes'] * 10, 0.0),
    ('2', ['2'] + ['3'] * 9, 0.3),
    ('2', ['2'] * 2 + ['3'] * 8, 0.6),
    ('2', ['2'] * 3 + ['3'] * 7, 0.9),
    ('Red.', ['red'] * 3 + ['dark red'] * 7, 0.9),
    ("it's red", ["it's red"] * 10, 0.0),
    ('two dogs', ['2 dogs'] * 10, 1.0),
    ('Yes', ['Yes'] * 10, 0.0),
    ('none', ['0'] * 10, 1.0),
    ('yes\n', ['yes'] * 10, 1.0),
    ('an apple', ['apple'] * 5 + ['apples'] * 5, 1.0),
    ('ten', ['10'] * 10, 1.0),
    ('2.5', ['2.5'] * 10, 1.0),
    ('left', ['Left'] * 5 + ['left'] * 3 + ['right'] * 2, 1.0),
    ('teddy-bear', ['teddy bear'] * 10, 1.0),
    ('teddy-bear', ['teddy bear'] * 5 + ['teddy-bear'] * 2 + ['teddy bear'] + ['bear'] * 2, 1.0),
]


@pytest.mark.parametrize(("prediction", "answers", "official"), OFFICIAL_CASES)
def test_vqa_accuracy_is_the_official_pipelines(prediction: str, answers: list[str], official: float) -> None:
    assert len(answers) == 10
    assert vqa_accuracy(prediction, answers) == pytest.approx(official, abs=1e-9)


def test_vqa_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ----------------------------------------------------------------------------------- captions

REFERENCES = {
    1: ["a red circle and a blue square", "there is a red circle and a blue square", "a blue square and a red circle"],
    2: ["a green triangle", "there is a green triangle", "a picture of a green triangle"],
    3: ["a white square and a yellow circle", "there is a yellow circle and a white square", "two shapes"],
    4: ["a purple triangle and a red square", "there is a red square and a purple triangle", "a red square"],
}
OUTPUTS = {
    1: "a red circle and a blue square",  # identical to a reference
    2: "a green triangle",  # identical to a reference
    3: "a man riding a horse on the beach",  # unrelated
    4: "people eating pizza in a kitchen",  # unrelated
}


@pytest.fixture(scope="module")
def scored() -> tuple[dict, dict, list[warnings.WarningMessage]]:
    if shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus, per_sample = score_captions(OUTPUTS, REFERENCES)
    return corpus, per_sample, list(caught)


def test_identical_captions_score_far_above_unrelated_ones(scored) -> None:
    _, per, _ = scored
    for good in (1, 2):
        for bad in (3, 4):
            assert per[good]["cider"] > 100 + 10 * per[bad]["cider"]
            assert per[good]["rouge_l"] > per[bad]["rouge_l"]
    for good in (1, 2):
        assert per[good]["rouge_l"] == pytest.approx(1.0)
    assert per[1]["bleu4"] == pytest.approx(1.0, abs=1e-6)  # a 7-word exact match
    assert per[3]["bleu4"] < 1e-3


def test_cider_is_scaled_by_100(scored) -> None:
    corpus, per, _ = scored
    # The references and outputs above are already PTB-clean, so the raw scorer sees the same text.
    raw, raw_per = Cider().compute_score(REFERENCES, {k: [v] for k, v in OUTPUTS.items()})
    assert corpus["cider"] == pytest.approx(100 * raw)
    assert [per[k]["cider"] for k in OUTPUTS] == pytest.approx([100 * x for x in raw_per])
    assert corpus["cider"] == pytest.approx(sum(p["cider"] for p in per.values()) / len(per))


def test_corpus_bleu4_and_cider_are_pycocoevalcaps_own_numbers(scored) -> None:
    """The corpus numbers are the reference scorer's (the texts are already PTB-clean), and
    corpus BLEU-4 is not the mean of the per-sample values: the store's per-sample BLEU-4 must
    never be averaged into a headline."""
    from pycocoevalcap.bleu.bleu import Bleu

    corpus, per, _ = scored
    res = {k: [v] for k, v in OUTPUTS.items()}
    bleu, _ = Bleu(4).compute_score(REFERENCES, res, verbose=0)
    cider, _ = Cider().compute_score(REFERENCES, res)
    assert corpus["bleu4"] == pytest.approx(bleu[3], abs=1e-12)
    assert corpus["cider"] == pytest.approx(100 * cider, abs=1e-9)
    mean_bleu = sum(p["bleu4"] for p in per.values()) / len(per)
    assert abs(corpus["bleu4"] - mean_bleu) > 0.05


def test_meteor_runs_or_is_skipped_with_a_warning(scored) -> None:
    corpus, per, caught = scored
    skipped = [w for w in caught if "METEOR was skipped" in str(w.message)]
    if "meteor" in corpus:
        assert not skipped
        assert per[1]["meteor"] > per[3]["meteor"]
        assert 0.0 <= corpus["meteor"] <= 1.0
    else:
        assert skipped and all("meteor" not in p for p in per.values())
    assert set(corpus) >= {"bleu4", "rouge_l", "cider"}


@needs_java
def test_meteor_timeout_skips_meteor_and_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stopped JVM never answers, whatever the machine's speed: a short timeout alone raced a warm,
    # shared JVM that could answer four captions within it (CI, stop 29).
    hung = caption_metrics._Meteor()
    os.kill(hung.meteor_p.pid, signal.SIGSTOP)
    monkeypatch.setattr(caption_metrics, "_shared", hung)
    with pytest.warns(RuntimeWarning, match="METEOR was skipped: no answer"):
        corpus, per = score_captions(OUTPUTS, REFERENCES, meteor_timeout_s=1.0)
    assert hung.meteor_p.poll() is not None, "the hung JVM must be killed, not left behind"
    assert caption_metrics._shared is None
    assert "meteor" not in corpus and corpus["cider"] > 0
    assert all("meteor" not in p for p in per.values())


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_the_others() -> None:
    outputs = {**OUTPUTS, 1: "a red circle\rand a blue\u2028square", 4: ""}
    _, per = score_captions(outputs, REFERENCES, meteor=False)
    assert per[1]["rouge_l"] == pytest.approx(1.0)
    assert per[2]["rouge_l"] == pytest.approx(1.0)
    assert per[4] == {"bleu4": 0.0, "rouge_l": 0.0, "cider": 0.0}


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="need Java"):
        score_captions(OUTPUTS, REFERENCES)


def test_ids_must_match() -> None:
    with pytest.raises(ValueError, match="same ids"):
        score_captions({1: "a"}, {2: ["a"]})
