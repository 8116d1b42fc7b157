"""The COCO captioning task, scored with the COCO caption metrics (headline: CIDEr x100).

Reads the official ``captions_{split}.json`` (from the built-in shapes world or a COCO folder) or,
for ``karpathy_train``/``karpathy_val``/``karpathy_test``, Karpathy's ``dataset_coco.json`` - the
split most captioning papers report on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
from tasks.caption_metrics import score_captions

__all__ = ["CAPTION_PROMPT", "CocoCaptionsTask"]

#: The task-level instruction (RobustVLM's LLaVA captioning prompt); victims wrap it in a template.
CAPTION_PROMPT = "Provide a short caption for this image."

#: Karpathy split name -> the "split" values of dataset_coco.json it covers ("restval" is the part
#: of val2014 that Karpathy's split adds to training).
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {
    "karpathy_train": ("train", "restval"),
    # train2014 images only: restval's 30,504 are val2014 images, which VQAv2 val evaluates on, so a
    # model trained for an evaluation on val2014 (CoDefend's purifier in suites/paper.yaml) uses this
    "karpathy_train2014": ("train",),
    "karpathy_val": ("val",),
    "karpathy_test": ("test",),
}


@dataclass(frozen=True)
class _Image:
    image_id: int
    file_name: str
    image_dirs: list[Path]
    references: tuple[str, ...]


class CocoCaptionsTask:
    """COCO captioning; per-sample CIDEr (x100), BLEU-4, ROUGE-L and, when Java allows, METEOR.

    ``data``: ``"shapes"`` for the built-in offline world, or the path of a COCO folder (with
    ``annotations/captions_<split>.json`` and, for Karpathy splits, ``dataset_coco.json``).
    ``images``: the folder of the split's images when they are not at ``<data>/<split>/`` (COCO)
    or ``<data>/images/<split>/`` (shapes).
    ``meteor``: also compute METEOR; it starts a JVM that loads a paraphrase table (~7 s per
    ``score`` call), so quick suites may turn it off. The headline CIDEr does not depend on it.
    ``on_bad_sample``: an empty reference caption, a repeated image id or an image that cannot be
    decoded is an error naming the file and the id (``fail``), or the image is left out and counted
    on the board (``skip``). Images with no captions at all (a test set) are not samples.
    """

    name: str = "coco_captions"
    kind: TaskKind = "caption"
    metric: str = "cider"

    def __init__(self, *, data: str = SHAPES_DATA, images: str | None = None, meteor: bool = True,
                 on_bad_sample: OnBadSample = "fail") -> None:
        self.data = data
        self.images = images
        self.meteor = meteor
        self.on_bad_sample = BadSamples(on_bad_sample, self.name).policy
        self._root: Path | None = None
        self._splits: dict[str, dict[int, _Image]] = {}
        self._bad: dict[str, BadSamples] = {}

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = resolve_root(self.data)
        return self._root

    def samples(self, split: str, n: int | None, seed: int) -> list[Sample]:
        index = self._split(split)
        out = []
        for image_id in seeded_subset(list(index), n, seed):
            item = index[image_id]
            path = find_image(item.image_dirs, item.file_name)
            try:
                image = load_rgb(path)
            except DataError as exc:
                self._bad[split].report(image_id, path, str(exc))
                continue
            out.append(
                Sample(
                    id=str(image_id),
                    image=image,
                    prompt=CAPTION_PROMPT,
                    references=item.references,
                    meta={"image_id": image_id, "file_name": item.file_name},
                )
            )
        return out

    def attack_targets(self, sample: Sample) -> list[str]:
        return list(sample.references)

    def score(self, outputs: Sequence[str], samples: Sequence[Sample]) -> list[dict[str, float]]:
        """Scores over exactly ``samples``: CIDEr's document frequencies come from their references."""
        return self.score_with_corpus(outputs, samples)[0]

    def corpus_scores(self, outputs: Sequence[str], samples: Sequence[Sample]) -> dict[str, float]:
        """pycocoevalcap's own numbers over ``samples``: corpus BLEU-4 and METEOR (not means of the
        per-sample values ``score`` returns), ROUGE-L and CIDEr (x100; both are means)."""
        return self.score_with_corpus(outputs, samples)[1]

    def score_with_corpus(self, outputs: Sequence[str], samples: Sequence[Sample]
                          ) -> tuple[list[dict[str, float]], dict[str, float]]:
        if len(outputs) != len(samples):
            raise ValueError(f"got {len(outputs)} outputs for {len(samples)} samples")
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError("samples must have distinct ids: CIDEr scores each image once")
        corpus, per_sample = score_captions(
            {s.id: output for s, output in zip(samples, outputs)},
            {s.id: list(s.references) for s in samples},
            meteor=self.meteor,
        )
        return [per_sample[i] for i in ids], corpus

    def skipped_samples(self, split: str) -> list[SkippedSample]:
        self._split(split)
        return list(self._bad[split].skipped)

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "root": str(self.root), "images": self.images, "meteor": self.meteor,
                "on_bad_sample": self.on_bad_sample}

    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits results are reported on, where present: Karpathy's test and the raw val and
        test annotations (val2014 holds restval, and VQAv2 val asks about the same images); the
        shapes world's test (its val is a held-out selection split)."""
        present = []
        for split in (("test",) if self.data == SHAPES_DATA else ("karpathy_test", "val", "test")):
            try:
                self._split(split)
            except FileNotFoundError:
                continue
            present.append(split)
        return tuple(present)

    def image_names(self, split: str) -> frozenset[str]:
        return frozenset(item.file_name for item in self._split(split).values())

    def _split(self, split: str) -> dict[int, _Image]:
        if split not in self._splits:
            loader = _load_karpathy if split in KARPATHY_SPLITS else _load_coco
            bad = BadSamples(self.on_bad_sample, self.name)
            self._splits[split] = _drop_bad_references(loader(self.root, split, self.images, bad), bad)
            self._bad[split] = bad
        return self._splits[split]


def _drop_bad_references(index: dict[int, tuple[_Image, Path]], bad: BadSamples) -> dict[int, _Image]:
    """Images whose references are all real text: an empty reference scores every caption 0 and
    shifts every other image's CIDEr (its document frequencies come from all references)."""
    out: dict[int, _Image] = {}
    for image_id, (item, path) in index.items():
        empty = sum(1 for reference in item.references if not reference.strip())
        if empty:
            bad.report(image_id, path, f"{empty} of its {len(item.references)} reference captions are empty",
                       "Remove the empty captions from the annotation file")
            continue
        out[image_id] = item
    return out


_UNIQUE_IMAGE_IDS = "Each image id must be unique: remove the repeated entries"


def _load_coco(root: Path, split: str, images: str | None, bad: BadSamples) -> dict[int, tuple[_Image, Path]]:
    candidates = [root / "annotations" / f"captions_{split}.json", root / f"captions_{split}.json"]
    path = first_existing(candidates)
    if path is None:
        raise not_found(
            f"COCO captions for split {split!r}",
            candidates,
            "Point `data:` at your COCO folder (holding annotations/captions_<split>.json, e.g. "
            f"captions_val2014.json), or use `data: {SHAPES_DATA}` for the built-in offline world.",
        )
    coco = read_json(path)
    captions: dict[int, list[str]] = defaultdict(list)
    for annotation in json_list(coco, "annotations", path):
        require_keys(annotation, ("image_id", "caption"), path, "an annotation")
        caption = annotation["caption"]
        captions[_int_id(annotation["image_id"], path)].append(caption if isinstance(caption, str) else "")
    dirs = split_image_dirs(root, split, images)

    def keyed() -> Iterator[tuple[int, tuple[_Image, Path]]]:
        for image in json_list(coco, "images", path):
            require_keys(image, ("id", "file_name"), path, "an image entry")
            image_id = _int_id(image["id"], path)
            if captions.get(image_id):  # unannotated images (a test set) cannot be scored
                # all the references (5-7 in COCO), as pycocoevalcap uses them
                yield image_id, (_Image(image_id, str(image["file_name"]), dirs, tuple(captions[image_id])), path)

    return unique_ids(keyed(), path, bad, "image id", _UNIQUE_IMAGE_IDS)


def _int_id(value: Any, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: image ids must be integers, got {value!r}") from None


def _load_karpathy(root: Path, split: str, images: str | None, bad: BadSamples) -> dict[int, tuple[_Image, Path]]:
    candidates = [root / "dataset_coco.json", root / "annotations" / "dataset_coco.json"]
    path = first_existing(candidates)
    if path is None:
        raise not_found(
            f"Karpathy split file for {split!r}",
            candidates,
            "Put Karpathy's dataset_coco.json in your COCO folder (or its annotations/), with the "
            "images in <coco>/train2014 and <coco>/val2014, or set `images:` to one folder holding them all.",
        )
    wanted = KARPATHY_SPLITS[split]

    def keyed() -> Iterator[tuple[int, tuple[_Image, Path]]]:
        for entry in json_list(read_json(path), "images", path):
            require_keys(entry, ("split", "cocoid", "filename", "sentences"), path, "an image entry")
            if entry["split"] not in wanted:
                continue
            filepath = entry.get("filepath", "")
            dirs = [Path(images).expanduser()] if images is not None else [root / filepath, root / "images" / filepath]
            image_id = _int_id(entry["cocoid"], path)
            sentences = entry["sentences"] if isinstance(entry["sentences"], list) else []
            references = tuple(s.get("raw", "") if isinstance(s, dict) and isinstance(s.get("raw", ""), str) else ""
                               for s in sentences)
            if not references:
                bad.report(image_id, path, "it has no reference captions",
                           "Every Karpathy image has five: re-download dataset_coco.json")
                continue
            yield image_id, (_Image(image_id, str(entry["filename"]), dirs, references), path)

    return unique_ids(keyed(), path, bad, "image id", _UNIQUE_IMAGE_IDS)
