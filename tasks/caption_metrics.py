"""COCO caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr) via pycocoevalcap's scorers, called directly.

``COCOEvalCap.evaluate()`` is avoided on purpose: it always runs SPICE, which downloads Stanford
CoreNLP models - impossible offline. Instead the same steps are done here: one PTB tokenisation of
references and outputs together (one JVM start), then each scorer on the tokenised text.

CIDEr (pycocoevalcap's ``Cider`` is CIDEr-D) takes its document frequencies from the references
of the images scored, so scores are only comparable across conditions on the same image set. It is
reported x100, as papers do. METEOR runs a second JVM that loads a paraphrase table (several
seconds); it is guarded by a timeout and skipped with a warning if it fails, so a METEOR problem
never loses the other metrics.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import warnings
from typing import Hashable, Mapping, Sequence, TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from harness.lifetime import die_with_parent

__all__ = ["CIDER_SCALE", "score_captions"]

K = TypeVar("K", bound=Hashable)

#: Papers report CIDEr multiplied by 100 (e.g. 115.5 rather than 1.155).
CIDER_SCALE = 100.0


def score_captions(
    outputs: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    *,
    meteor: bool = True,
    meteor_timeout_s: float = 120.0,
) -> tuple[dict[str, float], dict[K, dict[str, float]]]:
    """Score generated captions against reference captions, per corpus and per sample.

    ``outputs`` maps a sample id to one generated caption; ``references`` maps the same ids to
    their reference captions. Returns ``(corpus, per_sample)`` with keys ``bleu4``, ``rouge_l``,
    ``cider`` (x100) and, when it ran, ``meteor``. Corpus BLEU-4 and METEOR are the scorers' own
    corpus statistics (not means of the per-sample values); corpus ROUGE-L and CIDEr are means.

    ``meteor=False`` skips METEOR (it costs a JVM start and a paraphrase-table load).
    Raises RuntimeError when Java, needed by the PTB tokenizer, is not installed.
    """
    if set(outputs) != set(references):
        missing = set(references) - set(outputs)
        extra = set(outputs) - set(references)
        raise ValueError(
            f"outputs and references must have the same ids; missing outputs for {sorted(map(str, missing))[:5]}, "
            f"outputs without references {sorted(map(str, extra))[:5]}"
        )
    if not outputs:
        return {}, {}
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"every sample needs at least one reference caption; none for {empty[:5]}")
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run as Java programs, "
            "and 'java' is not on PATH. Install a JRE (e.g. `apt-get install default-jre-headless`)."
        )

    ids = list(outputs)
    gts, res = _tokenize(ids, outputs, references)

    corpus: dict[str, float] = {}
    per_sample: dict[K, dict[str, float]] = {key: {} for key in ids}

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    corpus["bleu4"] = float(bleu[3])
    for key, value in zip(ids, bleu_per[3]):
        per_sample[key]["bleu4"] = float(value)

    rouge, rouge_per = Rouge().compute_score(gts, res)
    corpus["rouge_l"] = float(rouge)
    for key, value in zip(ids, rouge_per):
        per_sample[key]["rouge_l"] = float(value)

    cider, cider_per = Cider().compute_score(gts, res)
    corpus["cider"] = float(cider) * CIDER_SCALE
    for key, value in zip(ids, cider_per):
        per_sample[key]["cider"] = float(value) * CIDER_SCALE

    if meteor:
        result = _meteor(gts, res, timeout_s=meteor_timeout_s)
        if result is not None:
            corpus["meteor"] = result[0]
            for key, value in zip(ids, result[1]):
                per_sample[key]["meteor"] = value
    return corpus, per_sample


def _tokenize(
    ids: list[K], outputs: Mapping[K, str], references: Mapping[K, Sequence[str]]
) -> tuple[dict[K, list[str]], dict[K, list[str]]]:
    """PTB-tokenise outputs and references (one JVM call for the captions not seen before); key
    order follows ``ids``.

    The tokenizer works line by line and only replaces ``\\n``, so another line break inside a
    caption (``\\r``, U+2028, ...) would shift every later caption onto the wrong sample: all
    whitespace is collapsed to single spaces first. (Empty captions are safe: they stay empty lines.)
    """

    def clean(text: str) -> str:
        return " ".join(str(text).split())

    tokens = iter(_ptb_tokens([clean(outputs[key]) for key in ids]
                              + [clean(ref) for key in ids for ref in references[key]]))
    res = {key: [next(tokens)] for key in ids}
    return {key: [next(tokens) for _ in references[key]] for key in ids}, res


_tokenized: dict[str, str] = {}
"""Caption -> its PTB tokens, per process. The tokenizer works line by line, so a caption's tokens
never depend on the others in its call: caching is exact, and a cell whose captions were all seen
(the references of every cell on the same samples, repeated outputs) starts no JVM (~1 s each)."""


def _ptb_tokens(texts: list[str]) -> list[str]:
    missing = sorted({text for text in texts if text not in _tokenized})
    if missing:
        tokens = PTBTokenizer().tokenize({i: [{"caption": text}] for i, text in enumerate(missing)})
        if len(tokens) != len(missing):
            raise RuntimeError(
                f"the PTB tokenizer returned {len(tokens)} of {len(missing)} captions; is Java working?"
            )
        if len(_tokenized) > 200_000:  # a bound, far above a suite's distinct captions
            _tokenized.clear()
        _tokenized.update((text, tokens[i][0]) for i, text in enumerate(missing))
    return [_tokenized[text] for text in texts]


class _Meteor(Meteor):
    """pycocoevalcap's METEOR wrapper with a shutdown that cannot deadlock, and a JVM that dies
    with this process.

    The original ``__del__`` takes the scorer's lock, which a scoring thread that hung (or died
    mid-call) still holds, so garbage collection would block forever; this one just kills the JVM.
    """

    def __init__(self) -> None:  # pycocoevalcap's command and folder, started with die_with_parent
        from pycocoevalcap.meteor import meteor as reference

        self.meteor_cmd = ["java", "-jar", "-Xmx2G", reference.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd, cwd=os.path.dirname(os.path.abspath(reference.__file__)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent,
        )
        self.lock = threading.Lock()

    def shutdown(self) -> str:
        """Kill the JVM (if still running), release its pipes, and return the end of its stderr."""
        proc = getattr(self, "meteor_p", None)
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        said = ""
        with contextlib.suppress(OSError, ValueError):
            said = proc.stderr.read().decode(errors="replace").strip()[-500:]
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        return said

    def __del__(self) -> None:
        self.shutdown()


_shared: _Meteor | None = None
"""One METEOR JVM per process, reused: starting one (and loading its paraphrase tables) costs ~7 s,
and a suite scores dozens of caption cells (each draw of an N-draw cell as a whole cell). METEOR's
stdio protocol is stateless between calls: each SCORE line is scored on its own."""


def _meteor(
    gts: dict[K, list[str]], res: dict[K, list[str]], *, timeout_s: float
) -> tuple[float, list[float]] | None:
    """METEOR corpus score and per-sample scores, or None (with a warning) if it cannot run."""
    global _shared
    if _shared is None or _shared.meteor_p.poll() is not None:
        try:
            _shared = _Meteor()
        except OSError as exc:
            warnings.warn(f"METEOR was skipped: its Java process did not start ({exc})", RuntimeWarning, stacklevel=3)
            return None
    scorer = _shared

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = scorer.compute_score(gts, res)
        except Exception as exc:  # reported below, with the JVM's stderr
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="meteor", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        # The scorer blocks on the JVM's stdout; killing the JVM ends the read (EOF) and the thread.
        scorer.shutdown()
        _shared = None
        worker.join(10.0)
        warnings.warn(
            f"METEOR was skipped: no answer from its Java process within {timeout_s:g} s",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if "error" in outcome:
        said = scorer.shutdown()  # a JVM that failed once is not trusted again
        _shared = None
        error = outcome["error"]
        warnings.warn(
            f"METEOR was skipped: {type(error).__name__}: {error}" + (f"; java said: {said}" if said else ""),
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    score, scores = outcome["value"]  # type: ignore[misc]
    return float(score), [float(s) for s in scores]
