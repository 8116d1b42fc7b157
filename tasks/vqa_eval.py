"""VQA accuracy as the field computes it: EvalAI's answer processor on each prediction, then the
official ``vqaEval.py`` rules.

Two versions are named because they disagree (19 of 440 constructed cases):

- **The official rules**: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at
  commit a013f00 (2021, "Fixed processing answers bug"), the current code. Answers and prediction
  have newlines and tabs replaced by spaces and are stripped. Only when the annotators *disagree*
  do both the ground-truth answers and the prediction go through the punctuation rule and the
  digit/article rule (before a013f00, the 2017 code normalised the prediction always and the
  ground truth with the punctuation rule only). The score is the mean over the leave-one-out
  subsets of the annotators of ``min(1, matches / 3)``: with 10 annotators an answer given by 1,
  2, 3 or >= 4 of them scores 0.3, 0.6, 0.9 or 1.0.
- **The answer processor**: EvalAI's ``EvalAIAnswerProcessor`` (facebookresearch/mmf
  ``pythia/tasks/processors.py``, as LLaVA's ``convert_vqav2_for_submission.py`` and lmms-eval's
  VQAv2 task apply it to every prediction before scoring): lower-case, drop "," and "?", split
  "'s", then the same punctuation and digit/article rules. So "Yes" against ten "yes" scores 1
  (the official rules alone give 0), and "it's red" against ten "it's red" scores 0 (the
  processor splits "'s"; real VQAv2 answers are already in processed form).

Both rule sets are reimplemented rule for rule, quirks included (see the regexes below);
tests/test_tasks_metrics.py checks 31 edge cases against the scores the official code gives.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["OFFICIAL_RULES", "ANSWER_PROCESSOR", "normalize_answer", "process_punctuation", "process_digit_article",
           "vqa_accuracy"]

OFFICIAL_RULES = "GT-Vision-Lab/VQA vqaEval.py @ a013f00 (2021)"
ANSWER_PROCESSOR = "EvalAI answer processor (mmf processors.py; LLaVA, lmms-eval)"

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# Both regexes are verbatim. ``(?!<=\d)`` is a negative *lookahead* for the text "<=digit" (the
# authors meant a lookbehind), so a period is removed unless a digit follows it: "2." -> "2",
# "2.5" stays.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the
# positional ``count`` argument, so at most re.UNICODE (= 32) periods are removed. Kept as is.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official punctuation rule (``processPunctuation``).

    A punctuation mark next to a space (or any mark, when the text has a digit-comma-digit such as
    "1,000") is deleted; otherwise it is replaced by a space: "black/white" -> "black white",
    "yes !" -> "yes ". Then periods not followed by a digit are removed.
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official digit/article rule (``processDigitArticle``).

    Lower-cases, splits on whitespace, maps number words to digits, drops articles, then restores
    apostrophes in known contractions ("dont" -> "don't") and re-joins with single spaces.
    """
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(pred: str) -> str:
    """EvalAI's answer processor, applied to each prediction before scoring ("Two." -> "2")."""
    text = pred.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return process_digit_article(process_punctuation(_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (usually 10), in [0, 1]:
    the per-question value the official script averages into its headline number, for the
    prediction as the answer processor leaves it."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = _whitespace(normalize_answer(prediction))
    gts = [_whitespace(answer) for answer in answers]
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(answer)) for answer in gts]
        pred = process_digit_article(process_punctuation(pred))
    total_matches = sum(answer == pred for answer in gts)
    accs = [min(1.0, (total_matches - (answer == pred)) / 3.0) for answer in gts]
    return sum(accs) / len(accs)
