"""What the VQAv2 and COCO-caption tasks share: locating data, the seeded subset, image loading."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence, TypeVar

import numpy as np
from PIL import Image

from harness.contracts import DataError, OnBadSample, SkippedSample
from tasks.shapes_world import build_shapes_world

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

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


#: Pillow's modes for 16-bit (and 32-bit integer) grey levels: ``convert("RGB")`` clips them at
#: 255, which turns a 16-bit image all white, so they are scaled to 8 bits instead.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


#: Decoded images kept per process, least recently used out first: both tasks read the same
#: images (the victim's training decodes the shapes world's 6,000 twice otherwise, ~2.5 s).
_DECODED_LIMIT_BYTES = 256 * 2**20
_decoded: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_decoded_bytes = 0


def load_rgb(path: Path) -> np.ndarray:
    """An image file as a read-only uint8 H x W x 3 RGB array (read-only: samples share it).

    Grey, palette, alpha and CMYK images convert as Pillow converts them; 16-bit grey scales to 8
    bits (65535 -> 255). A file that cannot be decoded is a :class:`DataError` naming it. A file
    read before, unchanged (same size and modification time), is not decoded again."""
    stat = Path(path).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if (array := _decoded.get(key)) is not None:
        _decoded.move_to_end(key)
        return array
    global _decoded_bytes
    array = _decode_rgb(path)
    _decoded[key] = array
    _decoded_bytes += array.nbytes
    while _decoded_bytes > _DECODED_LIMIT_BYTES and len(_decoded) > 1:
        _decoded_bytes -= _decoded.popitem(last=False)[1].nbytes
    return array


def _decode_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, naming itself
            if image.mode in _WIDE_GREY_MODES:
                grey = np.asarray(image, dtype=np.int64)
                if grey.min() < 0 or grey.max() > 65535:
                    raise DataError(f"image {path}: {image.mode} grey levels outside 0..65535 are not "
                                    "an image format this task reads; save it as 8- or 16-bit PNG or JPEG")
                array = np.repeat(np.round(grey / 257.0).astype(np.uint8)[..., None], 3, axis=2)
            elif image.mode == "F":
                raise DataError(f"image {path} holds floating-point pixels (mode F); save it as 8- or "
                                "16-bit PNG or JPEG")
            else:
                array = np.array(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"image {path} cannot be decoded ({exc}); re-download or replace the file") from None
    array.setflags(write=False)
    return array


def read_json(path: Path) -> Any:
    """A JSON file, or a :class:`DataError` naming the file and where it breaks."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); the official "
                        "annotation files are UTF-8 JSON: re-download or re-encode it") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        "the file may be truncated: re-download it") from None


def require_keys(record: Any, keys: Sequence[str], path: Path, what: str) -> None:
    """``record`` is a JSON object with ``keys``, or a :class:`DataError` naming the file."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected {what} to be a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        shown = json.dumps(record)[:200]
        raise DataError(f"{path}: {what} lacks {', '.join(repr(k) for k in missing)}: {shown}")


def json_list(document: Any, key: str, path: Path) -> list[Any]:
    """``document[key]``, which the official format makes a list."""
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a list under {key!r}, as the official files have")
    return document[key]


class BadSamples:
    """One split's malformed samples under a task's ``on_bad_sample`` policy.

    ``fail`` raises a :class:`DataError` naming the file, the sample and the fix; ``skip``
    records the sample (``skipped``), and the runner counts it on the board."""

    def __init__(self, policy: OnBadSample, task: str) -> None:
        if policy not in ("fail", "skip"):
            raise ValueError(f"on_bad_sample must be 'fail' or 'skip', got {policy!r}")
        self.policy, self.task = policy, task
        self.skipped: list[SkippedSample] = []
        self._seen: set[str] = set()

    def report(self, sample_id: Any, path: Path, problem: str, fix: str = "") -> None:
        """``problem`` may name ``path`` itself (an image's own error); ``fix`` says what to do."""
        if self.policy == "fail":
            where = "" if str(path) in problem else f"{path}: "
            raise DataError(f"{where}{self.task} sample {sample_id}: {problem}. {fix + ' ' if fix else ''}"
                            f"(Or set `on_bad_sample: skip` on the task to leave such samples out, counted on the board.)")
        if str(sample_id) not in self._seen:
            self._seen.add(str(sample_id))
            self.skipped.append(SkippedSample(id=str(sample_id), file=str(path), problem=problem))


def unique_ids(pairs: Iterable[tuple[int, T]], path: Path, bad: BadSamples, what: str, fix: str) -> dict[int, T]:
    """``(id, record)`` pairs as a dict, where an id that appears more than once is a bad sample
    (which of its records is right is unknowable, so none is kept), reported once."""
    out: dict[int, T] = {}
    repeated: set[int] = set()
    for key, value in pairs:
        if key in out or key in repeated:
            repeated.add(key)
            out.pop(key, None)
            continue
        out[key] = value
    for key in sorted(repeated):
        bad.report(key, path, f"the {what} appears more than once", fix)
    return out


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
