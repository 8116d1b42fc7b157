"""The procedural shapes world: determinism, caching, official formats, and truthful annotations."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from tasks.shapes_world import COLOURS, SHAPES, build_shapes_world

SIZES = {"train": 20, "val": 80, "test": 10}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shapes_world(tmp_path_factory.mktemp("world") / "shapes", seed=0, sizes=SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_is_byte_identical_and_another_seed_differs(world: Path, tmp_path: Path) -> None:
    again = build_shapes_world(tmp_path / "again", seed=0, sizes=SIZES)
    assert _files(again) == _files(world)

    other = _files(build_shapes_world(tmp_path / "other", seed=1, sizes=SIZES))
    same = _files(world)
    assert other.keys() == same.keys()  # same layout and ids ...
    png = [name for name in same if name.endswith(".png")]
    assert sum(other[name] != same[name] for name in png) > 0.9 * len(png)  # ... different content
    assert other["annotations/captions_val.json"] != same["annotations/captions_val.json"]


def test_splits_are_seeded_independently(world: Path, tmp_path: Path) -> None:
    bigger_train = build_shapes_world(tmp_path / "w", seed=0, sizes={**SIZES, "train": 30})
    for name in ("annotations/captions_val.json", "questions/v2_OpenEnded_mscoco_val_questions.json"):
        assert (bigger_train / name).read_bytes() == (world / name).read_bytes()


def test_default_location_is_cached_per_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEFEND_HOME", str(tmp_path))
    root = build_shapes_world(sizes=SIZES)
    assert root.parent == tmp_path / "data" and root.name.startswith("shapes-")
    marker = root / "world.json"
    stamp = marker.stat().st_mtime_ns
    assert build_shapes_world(sizes=SIZES) == root
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert build_shapes_world(sizes={**SIZES, "val": 5}) != root
    assert _load(marker)["config"]["sizes"] == SIZES
    assert not [p for p in (tmp_path / "data").iterdir() if ".building-" in p.name]  # no temp dirs left


def test_concurrent_builds_of_one_root_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        roots = list(pool.map(lambda _: build_shapes_world(tmp_path / "w", seed=0, sizes=SIZES), range(3)))
    assert roots == [tmp_path / "w"] * 3
    assert len(list((tmp_path / "w" / "images" / "val").iterdir())) == SIZES["val"]


def test_stale_world_in_the_same_root_is_replaced(tmp_path: Path) -> None:
    root = build_shapes_world(tmp_path / "w", seed=0, sizes={"train": 5, "val": 5, "test": 5})
    build_shapes_world(root, seed=3, sizes={"train": 2, "val": 2, "test": 2})
    assert _load(root / "world.json")["config"]["seed"] == 3
    assert len(list((root / "images" / "val").iterdir())) == 2


def test_bad_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shapes split"):
        build_shapes_world(tmp_path, sizes={"validation": 3})


def test_captions_parse_with_pycocotools(world: Path) -> None:
    for split, n in SIZES.items():
        coco = COCO(str(world / "annotations" / f"captions_{split}.json"))
        image_ids = coco.getImgIds()
        assert len(image_ids) == n
        for image_id in image_ids:
            captions = [a["caption"] for a in coco.imgToAnns[image_id]]
            assert len(captions) == 5 and len(set(captions)) == 5
            assert all(c == c.lower() for c in captions)
            info = coco.imgs[image_id]
            assert (world / "images" / split / info["file_name"]).is_file()
            # The first phrasing lists every shape once, in the canonical SHAPES order.
            ordered = sorted(info["objects"], key=lambda o: SHAPES.index(o["shape"]))
            expected = " and ".join(", ".join(f"a {o['colour']} {o['shape']}" for o in ordered).rsplit(", ", 1))
            assert captions[0] == expected


def test_images_match_their_metadata(world: Path) -> None:
    coco = _load(world / "annotations" / "captions_val.json")
    counts = Counter()
    for info in coco["images"]:
        pixels = np.asarray(Image.open(world / "images" / "val" / info["file_name"]))
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        objects = info["objects"]
        counts[len(objects)] += 1
        assert len({o["shape"] for o in objects}) == len(objects)
        assert len({o["colour"] for o in objects}) == len(objects)
        boxes = [o["bbox"] for o in objects]
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32 and 9 <= w <= 15
        for i, (x0, y0, w0, h0) in enumerate(boxes):
            for x1, y1, w1, h1 in boxes[i + 1 :]:
                assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0
        for o in objects:
            x, y, w, h = o["bbox"]
            cx, cy = x + w // 2, y + (2 * h) // 3  # inside a circle, a square and an upward triangle
            assert tuple(pixels[cy, cx]) == COLOURS[o["colour"]]
        # The background stays dark, so no shape colour is confusable with it.
        mask = np.ones((32, 32), bool)
        for x, y, w, h in boxes:
            mask[y : y + h, x : x + w] = False
        if mask.any():
            assert pixels[mask].max() <= 110
    assert set(counts) == {1, 2, 3}


def _expected_answer(question: str, objects: list[dict]) -> str:
    by_shape = {o["shape"]: o["colour"] for o in objects}
    by_colour = {o["colour"]: o["shape"] for o in objects}
    if question.startswith("what color is the "):
        return by_shape[question.removeprefix("what color is the ").rstrip("?")]
    if question == "how many shapes are there?":
        return str(len(objects))
    if question.startswith("is there a "):
        return "yes" if question.removeprefix("is there a ").rstrip("?") in by_shape else "no"
    colour = question.split(" shape is ")[1].rstrip("?")
    return by_colour[colour]


def test_vqa_files_are_official_and_truthful(world: Path) -> None:
    objects = {i["id"]: i["objects"] for i in _load(world / "annotations" / "captions_val.json")["images"]}
    questions = _load(world / "questions" / "v2_OpenEnded_mscoco_val_questions.json")
    annotations = _load(world / "annotations" / "v2_mscoco_val_annotations.json")
    assert questions["task_type"] == "Open-Ended" and questions["data_subtype"] == "val"
    assert annotations["data_subtype"] == "val"
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    assert [q["question_id"] for q in questions["questions"]] == list(by_id)
    assert len(by_id) == len(questions["questions"])  # unique ids

    per_image = Counter(q["image_id"] for q in questions["questions"])
    assert set(per_image.values()) <= {3, 4} and set(per_image) == set(objects)
    disagreements = 0
    yes_no = Counter()
    for q in questions["questions"]:
        a = by_id[q["question_id"]]
        assert q["question_id"] // 10 == q["image_id"] == a["image_id"]
        answers = [x["answer"] for x in a["answers"]]
        assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        truth = _expected_answer(q["question"], objects[q["image_id"]])
        majority, votes = Counter(answers).most_common(1)[0]
        assert majority == a["multiple_choice_answer"] == truth and votes >= 8
        disagreements += votes < 10
        assert a["answer_type"] == {"how many": "number", "is there a": "yes/no"}.get(a["question_type"], "other")
        if a["answer_type"] == "yes/no":
            yes_no[truth] += 1
        vocabulary = {"yes", "no", "1", "2", "3", *SHAPES, *COLOURS}
        assert set(answers) <= vocabulary
    assert 0.05 < disagreements / len(by_id) < 0.4
    assert abs(yes_no["yes"] - yes_no["no"]) <= max(3, 0.1 * sum(yes_no.values()))


def test_no_training_image_of_a_pair_set_is_an_evaluation_image(codefend_home: Path) -> None:
    """The purifier's and the prompt's pairs come from the train split (both tasks); every
    evaluation split's images are other images, pixel for pixel."""
    import hashlib

    from defenses.training_pairs import PairTask
    from tasks.coco_captions import CocoCaptionsTask
    from tasks.vqav2 import VQAv2Task

    def digests(split: str) -> set[str]:
        found = set()
        for task in (VQAv2Task(data="shapes"), CocoCaptionsTask(data="shapes", meteor=False)):
            found |= {hashlib.sha256(np.ascontiguousarray(s.image).tobytes()).hexdigest()
                      for s in task.samples(split, None, seed=0)}
        return found

    assert PairTask(name="vqav2").split is None  # pair tasks default to the defense's train split
    training = digests("train")
    for evaluation in ("val", "test"):
        assert not training & digests(evaluation), f"a train image is also a {evaluation} image"
