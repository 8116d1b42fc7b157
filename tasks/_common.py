"""What the VQAv2 and COCO-caption tasks share: locating data, the seeded subset, image loading."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Sequence, TypeVar

import numpy as np
from PIL import Image

from tasks.shapes_world import build_shapes_world

K = TypeVar("K", bound=Hashable)

SHAPES_DATA = "shapes"


def resolve_root(data: str) -> Path:
    """The data set's root: the built-in shapes world (built on first use) or a user directory."""
    if data == SHAPES_DATA:
        return build_shapes_world()
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; point `data:` at the data set's folder, "
            f"or use `data: {SHAPES_DATA}` for the built-in offline world"
        )
    return root


def first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def not_found(what: str, looked: Sequence[Path], fix: str) -> FileNotFoundError:
    """A FileNotFoundError that lists every path tried and says how to fix it."""
    listing = "\n".join(f"  - {path}" for path in looked)
    return FileNotFoundError(f"{what} not found; looked for:\n{listing}\n{fix}")


def seeded_subset(ids: Sequence[K], n: int | None, seed: int) -> list[K]:
    """The first ``n`` of a seeded permutation of the sorted ids (all of them when ``n`` is None).

    Sorting first makes the subset independent of file order; a prefix of one permutation means a
    larger ``n`` extends a smaller one instead of drawing a different set.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be None or >= 0, got {n}")
    ordered = sorted(ids)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    if n is not None:
        permutation = permutation[:n]
    return [ordered[int(i)] for i in permutation]


def load_rgb(path: Path) -> np.ndarray:
    """An image file as a read-only uint8 H x W x 3 RGB array (read-only: samples share it)."""
    with Image.open(path) as image:
        array = np.array(image.convert("RGB"), dtype=np.uint8)
    array.setflags(write=False)
    return array


def split_image_dirs(root: Path, split: str, images: str | None) -> list[Path]:
    """Where a split's images may be: the ``images`` override, else the shapes or COCO layout."""
    if images is not None:
        return [Path(images).expanduser()]
    return [root / "images" / split, root / split]


def find_image(dirs: Sequence[Path], file_name: str) -> Path:
    candidates = [directory / file_name for directory in dirs]
    found = first_existing(candidates)
    if found is None:
        raise not_found(
            "image",
            candidates,
            "Set `images:` to the folder holding the split's images (for COCO e.g. <coco>/val2014).",
        )
    return found
