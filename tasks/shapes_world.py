"""A deterministic procedural "shapes" world, written in the official VQAv2 and COCO-caption formats.

No machine in this project can download COCO, so the harness builds its own small, real data set:
1-3 coloured shapes on a textured background, with captions and questions whose answers follow from
what was drawn. It is written in exactly the on-disk formats of the real data sets, so the same
task readers (:mod:`tasks.vqav2`, :mod:`tasks.coco_captions`) and the same official metrics serve
both. The vocabulary is small and closed (:data:`SHAPES`, :data:`COLOURS`) so a small victim can
learn it.

Layout under the world's root::

    world.json                                         config, vocabulary, counts (written last:
                                                       its presence marks a complete build)
    images/{split}/shapes_{split}_{image_id:012d}.png  lossless RGB images
    annotations/captions_{split}.json                  COCO captions, 5 per image; each image
                                                       record also lists its "objects" (shape,
                                                       colour, COCO-style [x, y, w, h] bbox)
    questions/v2_OpenEnded_mscoco_{split}_questions.json
    annotations/v2_mscoco_{split}_annotations.json     VQAv2, 10 answers per question

Every split draws from its own generator seeded by (seed, split), so a split is reproducible on
its own and changing one split's size leaves the others' content unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from harness.paths import codefend_home

__all__ = [
    "COLOURS",
    "DEFAULT_SIZES",
    "IMAGE_FILE_PATTERN",
    "SHAPES",
    "SPLITS",
    "ShapeSpec",
    "build_shapes_world",
    "world_config",
]

#: Shape names, also the canonical order in which captions list shapes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Colour names and their RGB values: saturated or bright, so they stay far apart from each other
#: and from the dark, low-contrast backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (50, 100, 255),
    "yellow": (245, 225, 30),
    "purple": (175, 55, 230),
    "white": (245, 245, 245),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 6000, "val": 300, "test": 300}

#: File name of an image inside ``images/{split}/``; recorded in world.json for the readers.
IMAGE_FILE_PATTERN = "shapes_{split}_{image_id:012d}.png"

#: Bump when the generator's output changes, so cached worlds are rebuilt rather than reused.
GENERATOR_VERSION = 1

# Image ids are unique across splits (as in COCO): split k uses ids k*_ID_STRIDE + 1 ...
_ID_STRIDE = 1_000_000
_NUMBER_WORDS = ("zero", "one", "two", "three")
# Share of questions where 1-2 of the 10 annotators give a plausible wrong answer, so the metric's
# partial credit (0.3/0.6/0.9) is exercised while the majority answer stays correct.
_DISAGREEMENT_RATE = 0.2
_MIN_EXTENT, _MAX_EXTENT = 9, 15  # shape extents in pixels at 32 x 32, scaled with image_size
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: its type, colour name and bounding box (x0, y0, extent in pixels)."""

    shape: str
    colour: str
    x: int
    y: int
    size: int


def world_config(*, seed: int = 0, image_size: int = 32, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The full, validated build configuration; its hash names the cache directory."""
    merged = dict(DEFAULT_SIZES)
    for split, n in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; the splits are {', '.join(SPLITS)}")
        if not 0 <= int(n) < _ID_STRIDE:
            raise ValueError(f"split size for {split!r} must be in [0, {_ID_STRIDE}), got {n}")
        merged[split] = int(n)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for shapes to be recognisable, got {image_size}")
    return {"version": GENERATOR_VERSION, "seed": int(seed), "image_size": int(image_size), "sizes": merged}


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _is_complete(root: Path, config: dict[str, Any]) -> bool:
    try:
        return json.loads((root / "world.json").read_text())["config"] == config
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_shapes_world(
    root: Path | None = None, *, seed: int = 0, image_size: int = 32, sizes: dict[str, int] | None = None
) -> Path:
    """Write the shapes world (once) and return its root.

    Without ``root`` it goes to ``codefend_home()/data/shapes-<config hash>/``. A build whose
    world.json records the same config is reused as is. Builds of one root are serialised by a
    lock file (parallel test workers share the cache), and the world is generated in a temporary
    sibling directory and moved into place with world.json last, so an interrupted build never
    leaves a root that looks complete but is not.
    """
    config = world_config(seed=seed, image_size=image_size, sizes=sizes)
    if root is None:
        root = codefend_home() / "data" / f"shapes-{_config_hash(config)}"
    root = Path(root)
    if _is_complete(root, config):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if _is_complete(root, config):  # another process built it while we waited
            return root
        _build_into(root, config)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(root: Path, config: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        _write_world(tmp, config)
        root.mkdir(exist_ok=True)
        (root / "world.json").unlink(missing_ok=True)
        for entry in ("images", "annotations", "questions"):
            if (root / entry).exists():
                shutil.rmtree(root / entry)
            os.replace(tmp / entry, root / entry)
        os.replace(tmp / "world.json", root / "world.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_world(root: Path, config: dict[str, Any]) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "questions").mkdir()
    counts: dict[str, dict[str, int]] = {}
    for split, n in config["sizes"].items():
        counts[split] = _write_split(root, split, n, seed=config["seed"], image_size=config["image_size"])
    world = {
        "description": "codefend-bench procedural shapes world (VQAv2 + COCO captions formats)",
        "config": config,
        "shapes": list(SHAPES),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "image_file": IMAGE_FILE_PATTERN,
        "splits": counts,
    }
    (root / "world.json").write_text(json.dumps(world, indent=2) + "\n")


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _write_split(root: Path, split: str, n: int, *, seed: int, image_size: int) -> dict[str, int]:
    rng = _split_rng(seed, split)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    info = {"description": f"codefend-bench shapes world, split {split}", "version": str(GENERATOR_VERSION)}
    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    questions: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    yes_no = _YesNoBalancer()
    first_id = SPLITS.index(split) * _ID_STRIDE + 1
    for image_id in range(first_id, first_id + n):
        specs = _sample_layout(rng, image_size)
        file_name = IMAGE_FILE_PATTERN.format(split=split, image_id=image_id)
        _render(rng, specs, image_size).save(image_dir / file_name, format="PNG")
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": image_size,
                "width": image_size,
                "objects": [
                    {"shape": s.shape, "colour": s.colour, "bbox": [s.x, s.y, s.size, s.size]} for s in specs
                ],
            }
        )
        for j, caption in enumerate(_captions(specs)):
            captions.append({"id": image_id * 10 + j, "image_id": image_id, "caption": caption})
        for k, (question, question_type, answer_type, answer) in enumerate(_questions(rng, specs, yes_no)):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            answers.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": question_type,
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": _annotator_answers(rng, answer, answer_type),
                }
            )
    _dump(
        root / "annotations" / f"captions_{split}.json",
        {"info": info, "images": images, "annotations": captions, "licenses": [], "type": "captions"},
    )
    _dump(
        root / "questions" / f"v2_OpenEnded_mscoco_{split}_questions.json",
        {
            "info": info,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": split,
            "questions": questions,
            "license": {},
        },
    )
    _dump(
        root / "annotations" / f"v2_mscoco_{split}_annotations.json",
        {"info": info, "license": {}, "data_subtype": split, "annotations": answers},
    )
    return {"images": n, "questions": len(questions), "captions": len(captions)}


def _dump(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------
# Images


def _sample_layout(rng: np.random.Generator, image_size: int) -> list[ShapeSpec]:
    """1-3 shapes of distinct types and colours, with bounding boxes at least 1 px apart."""
    count = int(rng.integers(1, len(SHAPES) + 1))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=count, replace=False)]
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=count, replace=False)]
    lo = max(5, round(_MIN_EXTENT * image_size / 32))
    hi = max(lo, round(_MAX_EXTENT * image_size / 32))
    placed: list[ShapeSpec] = []
    for shape, colour in zip(shapes, colours):
        size = int(rng.integers(lo, hi + 1))
        for attempt in range(_PLACEMENT_TRIES):
            if attempt and attempt % 20 == 0 and size > lo:
                size -= 1  # crowded: shrink until it fits
            x = int(rng.integers(0, image_size - size + 1))
            y = int(rng.integers(0, image_size - size + 1))
            if all(_apart(x, y, size, other) for other in placed):
                placed.append(ShapeSpec(shape, colour, x, y, size))
                break
        # A shape that finds no room is left out; the metadata then describes what was drawn.
    return placed


def _apart(x: int, y: int, size: int, other: ShapeSpec) -> bool:
    return x + size < other.x or other.x + other.size < x or y + size < other.y or other.y + other.size < y


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A dark, low-contrast texture (noise, stripes or gradient) so shapes stand out clearly."""
    grey = rng.uniform(25, 70)
    base = grey + rng.uniform(-10, 10, size=3)
    other = grey + rng.uniform(10, 25) * rng.choice([-1.0, 1.0]) + rng.uniform(-10, 10, size=3)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64) / image_size
    kind = int(rng.integers(3))
    if kind == 0:  # plain noise
        mix = np.zeros((image_size, image_size))
    elif kind == 1:  # stripes in a random direction
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 9) / image_size
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        mix = (np.floor(phase) % 2).astype(np.float64)
    else:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xx * np.cos(angle) + yy * np.sin(angle)
        mix = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-9)
    img = base + mix[..., None] * (other - base)
    img = img + rng.normal(0, 6, size=img.shape)
    return np.clip(np.rint(img), 0, 110).astype(np.uint8)


def _render(rng: np.random.Generator, specs: list[ShapeSpec], image_size: int) -> Image.Image:
    """Draw aliased (hard-edged) shapes, so every shape pixel has exactly its nominal colour."""
    image = Image.fromarray(_background(rng, image_size))
    draw = ImageDraw.Draw(image)
    for s in specs:
        fill = COLOURS[s.colour]
        x1, y1 = s.x + s.size - 1, s.y + s.size - 1
        if s.shape == "circle":
            draw.ellipse((s.x, s.y, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((s.x, s.y, x1, y1), fill=fill)
        else:
            draw.polygon([((s.x + x1) / 2, s.y), (s.x, y1), (x1, y1)], fill=fill)
    return image


# ---------------------------------------------------------------------------------------------
# Text


def _phrase(specs: list[ShapeSpec]) -> str:
    items = [f"a {s.colour} {s.shape}" for s in specs]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _captions(specs: list[ShapeSpec]) -> list[str]:
    """Five phrasings of the same content; the first lists shapes in the canonical SHAPES order."""
    canonical = sorted(specs, key=lambda s: SHAPES.index(s.shape))
    left_to_right = sorted(specs, key=lambda s: (s.x, s.y))
    count = len(specs)
    noun = "shape" if count == 1 else "shapes"
    return [
        _phrase(canonical),
        f"there is {_phrase(canonical)}",
        f"a picture of {_phrase(canonical[::-1])}",
        f"{_NUMBER_WORDS[count]} {noun}: {_phrase(canonical)}",
        f"an image with {_phrase(left_to_right)}",
    ]


class _YesNoBalancer:
    """Keeps "is there a ...?" answers balanced across a split.

    With all three shapes drawn the answer can only be "yes", so a fair coin alone would skew
    towards "yes"; asking for "no" whenever "no" is behind restores the balance.
    """

    def __init__(self) -> None:
        self.yes = 0
        self.no = 0

    def want_no(self, rng: np.random.Generator) -> bool:
        coin = bool(rng.random() < 0.5)
        return self.no < self.yes or (self.no == self.yes and coin)

    def record(self, answer: str) -> None:
        if answer == "yes":
            self.yes += 1
        else:
            self.no += 1


def _questions(
    rng: np.random.Generator, specs: list[ShapeSpec], yes_no: _YesNoBalancer
) -> list[tuple[str, str, str, str]]:
    """3-4 (question, question_type, answer_type, answer) tuples about one image."""
    target = specs[int(rng.integers(len(specs)))]
    asked = [(f"what color is the {target.shape}?", "what color is the", "other", target.colour)]

    asked.append(("how many shapes are there?", "how many", "number", str(len(specs))))

    present = [s.shape for s in specs]
    absent = [shape for shape in SHAPES if shape not in present]
    if yes_no.want_no(rng) and absent:
        probe, answer = absent[int(rng.integers(len(absent)))], "no"
    else:
        probe, answer = present[int(rng.integers(len(present)))], "yes"
    yes_no.record(answer)
    asked.append((f"is there a {probe}?", "is there a", "yes/no", answer))

    target = specs[int(rng.integers(len(specs)))]
    word = "what" if rng.random() < 0.5 else "which"
    asked.append((f"{word} shape is {target.colour}?", f"{word} shape is", "other", target.shape))

    if rng.random() < 0.5:  # ask three of the four, dropping one at random
        del asked[int(rng.integers(len(asked)))]
    return asked


def _alternatives(answer: str, answer_type: str) -> list[str]:
    """Plausible wrong answers an inattentive annotator might give."""
    if answer_type == "yes/no":
        return ["no" if answer == "yes" else "yes"]
    if answer_type == "number":
        return [str(k) for k in (int(answer) - 1, int(answer) + 1) if 1 <= k <= len(SHAPES)]
    vocabulary = SHAPES if answer in SHAPES else tuple(COLOURS)
    return [word for word in vocabulary if word != answer]


def _annotator_answers(rng: np.random.Generator, answer: str, answer_type: str) -> list[dict[str, Any]]:
    """Ten answers: all correct, except that for ~20% of questions 1-2 annotators disagree."""
    given = [answer] * 10
    if rng.random() < _DISAGREEMENT_RATE:
        options = _alternatives(answer, answer_type)
        n_wrong = int(rng.integers(1, 3))
        for slot in rng.choice(10, size=n_wrong, replace=False):
            given[int(slot)] = options[int(rng.integers(len(options)))]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given)]
