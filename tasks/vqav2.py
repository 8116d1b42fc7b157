"""The VQAv2 task: questions about images, scored with the official VQA accuracy.

Reads the official files (``v2_OpenEnded_mscoco_{split}_questions.json`` and
``v2_mscoco_{split}_annotations.json``) from the built-in shapes world or a real VQAv2 folder,
flat (as the official zips unpack) or under ``questions/`` and ``annotations/``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from harness.contracts import DataError, OnBadSample, Sample, SkippedSample, TaskKind
from tasks._common import (
    SHAPES_DATA,
    BadSamples,
    find_image,
    first_existing,
    json_list,
    load_rgb,
    not_found,
    read_json,
    require_keys,
    resolve_root,
    seeded_subset,
    split_image_dirs,
    unique_ids,
)
from tasks.vqa_eval import vqa_accuracy

__all__ = ["VQAv2Task"]

#: COCO's image naming; the shapes world records its own pattern in world.json.
COCO_IMAGE_FILE = "COCO_{split}_{image_id:012d}.jpg"

#: Every VQAv2 question has ten annotator answers; the official accuracy, min(#matches / 3, 1)
#: averaged over the ten leave-one-out subsets, means something else with any other count.
ANSWERS_PER_QUESTION = 10


@dataclass(frozen=True)
class _VQASplit:
    split: str  # the on-disk split name ("val2014", "val")
    questions: dict[int, dict[str, Any]]
    annotations: dict[int, dict[str, Any]]
    image_dirs: list[Path]
    image_file: str
    bad: BadSamples


class VQAv2Task:
    """VQAv2 open-ended questions; the headline metric is the official VQA accuracy.

    ``data``: ``"shapes"`` for the built-in offline world, or the path of a VQAv2 folder.
    ``images``: the folder of the split's images, when they are not at ``<data>/<split>/`` (real
    COCO, e.g. ``<coco>/val2014``) or ``<data>/images/<split>/`` (shapes).
    Split names are the data set's own: ``train``/``val``/``test`` for shapes, ``val2014`` for
    VQAv2; ``train`` and ``val`` fall back to ``train2014``/``val2014`` when only those exist.
    ``on_bad_sample``: a question without exactly 10 answers, a repeated question id, a question
    whose annotation names another image, or an image that cannot be decoded is an error naming
    the file and the id (``fail``), or is left out and counted on the board (``skip``).
    """

    name: str = "vqav2"
    kind: TaskKind = "vqa"
    metric: str = "vqa_accuracy"

    def __init__(self, *, data: str = SHAPES_DATA, images: str | None = None,
                 on_bad_sample: OnBadSample = "fail") -> None:
        self.data = data
        self.images = images
        self.on_bad_sample = BadSamples(on_bad_sample, self.name).policy
        self._root: Path | None = None
        self._splits: dict[str, _VQASplit] = {}

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = resolve_root(self.data)
        return self._root

    def samples(self, split: str, n: int | None, seed: int) -> list[Sample]:
        index = self._split(split)
        cache: dict[int, np.ndarray | None] = {}
        out = []
        for question_id in seeded_subset(list(index.questions), n, seed):
            question = index.questions[question_id]
            annotation = index.annotations[question_id]
            image_id = int(question["image_id"])
            if image_id not in cache:
                file_name = index.image_file.format(split=index.split, image_id=image_id)
                path = find_image(index.image_dirs, file_name)
                try:
                    cache[image_id] = load_rgb(path)
                except DataError as exc:
                    index.bad.report(question_id, path, str(exc))
                    cache[image_id] = None
            if cache[image_id] is None:
                continue
            out.append(
                Sample(
                    id=str(question_id),
                    image=cache[image_id],
                    prompt=question["question"],
                    references=tuple(answer["answer"] for answer in annotation["answers"]),
                    meta={
                        "image_id": image_id,
                        "file_name": index.image_file.format(split=index.split, image_id=image_id),
                        "question_type": annotation.get("question_type"),
                        "answer_type": annotation.get("answer_type"),
                        "multiple_choice_answer": annotation.get("multiple_choice_answer"),
                    },
                )
            )
        return out

    def attack_targets(self, sample: Sample) -> list[str]:
        """Distinct answers, most frequent first; ties keep the annotators' order."""
        counts = Counter(sample.references)  # keys in first-seen order; sorted() is stable
        return sorted(counts, key=lambda answer: -counts[answer])

    def score(self, outputs: Sequence[str], samples: Sequence[Sample]) -> list[dict[str, float]]:
        if len(outputs) != len(samples):
            raise ValueError(f"got {len(outputs)} outputs for {len(samples)} samples")
        return [{"vqa_accuracy": vqa_accuracy(o, s.references)} for o, s in zip(outputs, samples)]

    def skipped_samples(self, split: str) -> list[SkippedSample]:
        return list(self._split(split).bad.skipped)

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "root": str(self.root), "images": self.images, "on_bad_sample": self.on_bad_sample}

    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits results are reported on, where present: VQAv2's val (val2014 on disk) and
        test; the shapes world's test (its val is a held-out selection split)."""
        candidates = ("test",) if self.data == SHAPES_DATA else ("val", "test")
        return tuple(split for split in candidates if _split_present(self.root, split))

    def image_names(self, split: str) -> frozenset[str]:
        index = self._split(split)
        return frozenset(index.image_file.format(split=index.split, image_id=int(q["image_id"]))
                         for q in index.questions.values())

    def _split(self, split: str) -> _VQASplit:
        if split not in self._splits:
            self._splits[split] = self._load(split)
        return self._splits[split]

    def _load(self, split: str) -> _VQASplit:
        name, question_file, annotation_file = _find_files(self.root, split)
        bad = BadSamples(self.on_bad_sample, self.name)
        annotations = _by_question_id(json_list(read_json(annotation_file), "annotations", annotation_file),
                                      annotation_file, ("question_id", "image_id", "answers"), bad)
        questions = _by_question_id(json_list(read_json(question_file), "questions", question_file),
                                    question_file, ("question_id", "image_id", "question"), bad)
        for question_id in list(annotations):
            answers = annotations[question_id]["answers"]
            problem = _answers_problem(answers)
            if problem is None and question_id in questions and \
                    int(questions[question_id]["image_id"]) != int(annotations[question_id]["image_id"]):
                problem = (f"the question is about image {questions[question_id]['image_id']}, its annotation "
                           f"about image {annotations[question_id]['image_id']}")
            if problem is not None:
                bad.report(question_id, annotation_file, problem,
                           "Use the official annotation file (ten answers per question, matching image ids)")
                del annotations[question_id]
        for question_id, question in list(questions.items()):
            if not isinstance(question["question"], str) or not question["question"].strip():
                bad.report(question_id, question_file, "the question text is empty", "Use the official questions file")
                del questions[question_id]
        # Only annotated questions can be scored (VQAv2's test questions have no public answers).
        questions = {question_id: q for question_id, q in questions.items() if question_id in annotations}
        return _VQASplit(
            split=name,
            questions=questions,
            annotations=annotations,
            image_dirs=split_image_dirs(self.root, name, self.images),
            image_file=_image_file_pattern(self.root),
            bad=bad,
        )


def _split_present(root: Path, split: str) -> bool:
    try:
        _find_files(root, split)
    except FileNotFoundError:
        return False
    return True


def _by_question_id(records: list[Any], path: Path, keys: Sequence[str], bad: BadSamples) -> dict[int, dict[str, Any]]:
    """Records keyed by question id; a repeated id is a bad sample."""
    def keyed() -> Iterator[tuple[int, dict[str, Any]]]:
        for record in records:
            require_keys(record, keys, path, "an entry")
            try:
                question_id, _ = int(record["question_id"]), int(record["image_id"])
            except (TypeError, ValueError):
                raise DataError(f"{path}: question_id and image_id must be integers: {json.dumps(record)[:200]}") from None
            yield question_id, record

    return unique_ids(keyed(), path, bad, "question id", "Each question id must be unique: remove the repeated entries")


def _answers_problem(answers: Any) -> str | None:
    if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        return "'answers' must be a list of {\"answer\": text} records"
    if len(answers) != ANSWERS_PER_QUESTION:
        return (f"it has {len(answers)} annotator answers, not {ANSWERS_PER_QUESTION} (the VQA accuracy "
                f"averages over ten leave-one-out subsets of ten answers)")
    return None


def _find_files(root: Path, split: str) -> tuple[str, Path, Path]:
    """(on-disk split name, questions file, annotations file), or an error listing every path tried."""
    names = [split] + ([f"{split}2014"] if split in ("train", "val") else [])
    looked: list[Path] = []
    for name in names:
        question_files = [
            root / folder / f"v2_OpenEnded_mscoco_{name}_questions.json" for folder in ("questions", "Questions", ".")
        ]
        annotation_files = [
            root / folder / f"v2_mscoco_{name}_annotations.json" for folder in ("annotations", "Annotations", ".")
        ]
        looked += question_files + annotation_files
        question_file, annotation_file = first_existing(question_files), first_existing(annotation_files)
        if question_file is not None and annotation_file is not None:
            return name, question_file, annotation_file
    raise not_found(
        f"VQAv2 questions and annotations for split {split!r}",
        looked,
        "Point `data:` at your VQAv2 folder (holding v2_OpenEnded_mscoco_<split>_questions.json and "
        "v2_mscoco_<split>_annotations.json, flat or under questions/ and annotations/), "
        f"or use `data: {SHAPES_DATA}` for the built-in offline world.",
    )


def _image_file_pattern(root: Path) -> str:
    """The world's own image naming when it declares one (shapes), else COCO's."""
    world = root / "world.json"
    if world.is_file():
        return str(read_json(world).get("image_file", COCO_IMAGE_FILE))
    return COCO_IMAGE_FILE
