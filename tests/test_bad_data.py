"""Corrupted data sets: each one is a named error (file, sample id, fix) or, under
``on_bad_sample: skip``, a recorded skip the board counts. Never a silent change of a score."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from harness.contracts import DataError, SkippingTask
from harness.registry import ParamError
from tasks.coco_captions import CocoCaptionsTask
from tasks.vqav2 import VQAv2Task

SPLIT = "val"
IMAGE_FILE = "img_{image_id}.png"


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)


def _write_vqa(root: Path, *, questions: list[dict] | None = None, annotations: list[dict] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "world.json").write_text(json.dumps({"image_file": IMAGE_FILE}))
    (root / SPLIT).mkdir(exist_ok=True)
    for image_id in (1, 2, 3):
        Image.fromarray(_image(image_id)).save(root / SPLIT / IMAGE_FILE.format(image_id=image_id))
    if questions is None:
        questions = [{"question_id": 10 * i, "image_id": i, "question": f"what is in image {i}?"} for i in (1, 2, 3)]
    if annotations is None:
        annotations = [{"question_id": 10 * i, "image_id": i, "answers": [{"answer": "red"}] * 10} for i in (1, 2, 3)]
    (root / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"v2_mscoco_{SPLIT}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return root


def _write_coco(root: Path, *, captions: dict[int, list[str]] | None = None, images: list[dict] | None = None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / SPLIT).mkdir(exist_ok=True)
    for image_id in (1, 2, 3):
        Image.fromarray(_image(image_id)).save(root / SPLIT / f"{image_id}.png")
    if captions is None:
        captions = {i: [f"a red square number {i}", "a square"] for i in (1, 2, 3)}
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    annotations = [{"image_id": i, "id": 100 * i + k, "caption": c} for i, cs in captions.items() for k, c in enumerate(cs)]
    (root / "annotations" / f"captions_{SPLIT}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def _vqa_file(root: Path, kind: str) -> Path:
    return root / (f"v2_OpenEnded_mscoco_{SPLIT}_questions.json" if kind == "questions" else f"v2_mscoco_{SPLIT}_annotations.json")


def _three_answers(root: Path) -> tuple[str, str]:
    _write_vqa(root)
    data = json.loads(_vqa_file(root, "annotations").read_text())
    data["annotations"][1]["answers"] = [{"answer": "red"}] * 3
    _vqa_file(root, "annotations").write_text(json.dumps(data))
    return "20", "3 annotator answers, not 10"


def _repeated_question(root: Path) -> tuple[str, str]:
    questions = [{"question_id": 10, "image_id": 1, "question": "what colour?"},
                 {"question_id": 20, "image_id": 2, "question": "what shape?"},
                 {"question_id": 20, "image_id": 3, "question": "how many?"}]
    _write_vqa(root, questions=questions)
    return "20", "more than once"


def _repeated_annotation(root: Path) -> tuple[str, str]:
    annotations = [{"question_id": 10 * i, "image_id": i, "answers": [{"answer": "red"}] * 10} for i in (1, 2, 3)]
    annotations.append({"question_id": 30, "image_id": 3, "answers": [{"answer": "blue"}] * 10})
    _write_vqa(root, annotations=annotations)
    return "30", "more than once"


def _mismatched_image(root: Path) -> tuple[str, str]:
    annotations = [{"question_id": 10 * i, "image_id": i, "answers": [{"answer": "red"}] * 10} for i in (1, 2, 3)]
    annotations[2]["image_id"] = 1
    _write_vqa(root, annotations=annotations)
    return "30", "about image 3, its annotation about image 1"


def _empty_question(root: Path) -> tuple[str, str]:
    questions = [{"question_id": 10 * i, "image_id": i, "question": "what?" if i != 2 else "  "} for i in (1, 2, 3)]
    _write_vqa(root, questions=questions)
    return "20", "question text is empty"


def _truncated_png(root: Path) -> tuple[str, str]:
    _write_vqa(root)
    path = root / SPLIT / IMAGE_FILE.format(image_id=2)
    path.write_bytes(path.read_bytes()[:60])
    return "20", IMAGE_FILE.format(image_id=2)


def _not_an_image(root: Path) -> tuple[str, str]:
    _write_vqa(root)
    (root / SPLIT / IMAGE_FILE.format(image_id=3)).write_text("not a picture")
    return "30", IMAGE_FILE.format(image_id=3)


def _float_image(root: Path) -> tuple[str, str]:
    _write_vqa(root)
    path = root / SPLIT / IMAGE_FILE.format(image_id=1)
    Image.fromarray(np.zeros((16, 16), dtype=np.float32), mode="F").save(path.with_suffix(".tiff"))
    path.write_bytes(path.with_suffix(".tiff").read_bytes())
    return "10", "floating-point"


def _empty_caption(root: Path) -> tuple[str, str]:
    _write_coco(root, captions={1: ["a square", "a red square"], 2: ["a circle", ""], 3: ["a star", "stars"]})
    return "2", "1 of its 2 reference captions are empty"


def _repeated_image(root: Path) -> tuple[str, str]:
    images = [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}, {"id": 2, "file_name": "3.png"}]
    _write_coco(root, images=images)
    return "2", "image id appears more than once"


def _truncated_caption_image(root: Path) -> tuple[str, str]:
    _write_coco(root)
    path = root / SPLIT / "3.png"
    path.write_bytes(path.read_bytes()[:-40])
    return "3", "3.png"


# corruptions that make a file unreadable as a whole: always an error naming the file
def _truncated_annotations(root: Path) -> str:
    _write_vqa(root)
    path = _vqa_file(root, "annotations")
    path.write_text(path.read_text()[:150])
    return "is not valid JSON"


def _latin1_captions(root: Path) -> str:
    _write_coco(root)
    path = root / "annotations" / f"captions_{SPLIT}.json"
    path.write_bytes(path.read_bytes().replace(b"a square", "a caf\u00e9 square".encode("latin-1")))
    return "is not UTF-8"


def _answers_missing(root: Path) -> str:
    _write_vqa(root, annotations=[{"question_id": 10, "image_id": 1}])
    return "lacks 'answers'"


def _annotations_not_object(root: Path) -> str:
    _write_vqa(root)
    _vqa_file(root, "annotations").write_text("[1, 2, 3]")
    return "with a list under 'annotations'"


def _string_question_id(root: Path) -> str:
    _write_vqa(root, questions=[{"question_id": "ten", "image_id": 1, "question": "what?"}])
    return "must be integers"


SAMPLE_CORRUPTIONS: dict[str, tuple[type, Callable[[Path], tuple[str, str]]]] = {
    "vqa-three-answers": (VQAv2Task, _three_answers),
    "vqa-repeated-question-id": (VQAv2Task, _repeated_question),
    "vqa-repeated-annotation-id": (VQAv2Task, _repeated_annotation),
    "vqa-annotation-of-another-image": (VQAv2Task, _mismatched_image),
    "vqa-empty-question": (VQAv2Task, _empty_question),
    "vqa-truncated-png": (VQAv2Task, _truncated_png),
    "vqa-text-file-as-image": (VQAv2Task, _not_an_image),
    "vqa-float-image": (VQAv2Task, _float_image),
    "caption-empty-reference": (CocoCaptionsTask, _empty_caption),
    "caption-repeated-image-id": (CocoCaptionsTask, _repeated_image),
    "caption-truncated-png": (CocoCaptionsTask, _truncated_caption_image),
}

FILE_CORRUPTIONS: dict[str, tuple[type, Callable[[Path], str]]] = {
    "vqa-truncated-annotations": (VQAv2Task, _truncated_annotations),
    "caption-latin1-file": (CocoCaptionsTask, _latin1_captions),
    "vqa-answers-missing": (VQAv2Task, _answers_missing),
    "vqa-annotations-not-an-object": (VQAv2Task, _annotations_not_object),
    "vqa-string-question-id": (VQAv2Task, _string_question_id),
}


def _task(cls: type, root: Path, **params: Any):
    return cls(data=str(root), meteor=False, **params) if cls is CocoCaptionsTask else cls(data=str(root), **params)


@pytest.mark.parametrize("name", sorted(SAMPLE_CORRUPTIONS))
def test_a_bad_sample_is_an_error_naming_file_and_id_or_a_counted_skip(tmp_path: Path, name: str) -> None:
    cls, corrupt = SAMPLE_CORRUPTIONS[name]
    bad_id, problem = corrupt(tmp_path)
    with pytest.raises(DataError) as raised:
        _task(cls, tmp_path).samples(SPLIT, None, seed=0)
    message = str(raised.value)
    assert f"sample {bad_id}" in message and problem in message and str(tmp_path) in message
    assert "on_bad_sample: skip" in message  # the way out is in the message

    task = _task(cls, tmp_path, on_bad_sample="skip")
    assert isinstance(task, SkippingTask)
    kept = task.samples(SPLIT, None, seed=0)
    skipped = task.skipped_samples(SPLIT)
    assert [s.id for s in skipped] == [bad_id] and problem in skipped[0].problem
    assert bad_id not in {s.id for s in kept} and len(kept) >= 1


@pytest.mark.parametrize("name", sorted(FILE_CORRUPTIONS))
def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path, name: str) -> None:
    cls, corrupt = FILE_CORRUPTIONS[name]
    problem = corrupt(tmp_path)
    for policy in ("fail", "skip"):  # a file that cannot be read is never a skip
        with pytest.raises(DataError) as raised:
            _task(cls, tmp_path, on_bad_sample=policy).samples(SPLIT, None, seed=0)
        assert problem in str(raised.value) and str(tmp_path) in str(raised.value)


def test_sixteen_bit_and_grey_images_convert_to_their_8_bit_rgb(tmp_path: Path) -> None:
    _write_vqa(tmp_path)
    grey8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey8, mode="L").save(tmp_path / SPLIT / IMAGE_FILE.format(image_id=1))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / SPLIT / IMAGE_FILE.format(image_id=2))
    assert Image.open(tmp_path / SPLIT / IMAGE_FILE.format(image_id=2)).mode.startswith("I")
    by_image = {s.meta["image_id"]: s.image for s in VQAv2Task(data=str(tmp_path)).samples(SPLIT, None, seed=0)}
    expected = np.repeat(grey8[..., None], 3, axis=2)
    np.testing.assert_array_equal(by_image[1], expected)
    np.testing.assert_array_equal(by_image[2], expected)  # not all white (Pillow's convert clips at 255)


def test_a_valid_data_set_loads_unchanged(tmp_path: Path) -> None:
    _write_vqa(tmp_path / "vqa")
    _write_coco(tmp_path / "coco")
    vqa = VQAv2Task(data=str(tmp_path / "vqa"))
    captions = CocoCaptionsTask(data=str(tmp_path / "coco"), meteor=False)
    assert sorted(s.id for s in vqa.samples(SPLIT, None, 0)) == ["10", "20", "30"]
    assert sorted(s.id for s in captions.samples(SPLIT, None, 0)) == ["1", "2", "3"]
    assert vqa.skipped_samples(SPLIT) == [] and captions.skipped_samples(SPLIT) == []
    np.testing.assert_array_equal(vqa.samples(SPLIT, None, 0)[0].image.shape, (16, 16, 3))


def test_on_bad_sample_takes_fail_or_skip_only() -> None:
    from harness.plugins import get_plugins

    with pytest.raises(ParamError, match="on_bad_sample"):
        get_plugins().tasks.create("vqav2", {"on_bad_sample": "ignore"})


# -- through a run: the skip is on the board, and labels of any text render --------------------

import sys  # noqa: E402

from harness.hookspecs import hookimpl  # noqa: E402
from harness.testing import FakeVictim  # noqa: E402


@hookimpl
def register_victims(register):
    register("fake-victim", FakeVictim, description="untrained test victim (test)")


def _run(tmp_path: Path, suite_text: str):
    from harness import plugins as plugin_state
    from harness import runner
    from harness.plugins import load_plugins
    from harness.runner import run_suite
    from harness.store import Store
    from harness.suite import load_suite
    from leaderboard.aggregate import build_board

    plugins = load_plugins(extra=[("bad-data-test", sys.modules[__name__])])
    previous, plugin_state._loaded = plugin_state._loaded, plugins
    (tmp_path / "suite.yaml").write_text(suite_text)
    store = Store(tmp_path / "out" / "store.sqlite")
    try:
        run_suite(load_suite(tmp_path / "suite.yaml", plugins), store, plugins=plugins, progress=False)
        return build_board(store), store
    finally:
        plugin_state._loaded = previous
        runner._components.clear()


def test_a_skipped_sample_is_counted_on_every_board(tmp_path: Path) -> None:
    from leaderboard.html import render_html
    from leaderboard.markdown import render_markdown

    root = _write_vqa(tmp_path / "vqa")
    _three_answers(root)
    board, store = _run(tmp_path, f"""\
name: skips
seed: 0
victims: [{{name: fake-victim}}]
tasks: [{{name: vqav2, data: {root}, split: {SPLIT}, params: {{on_bad_sample: skip}}}}]
attacks: [{{name: none}}]
defenses: [{{name: none}}]
adaptive: {{enabled: false, reason: a test of data handling}}
""")
    store.close()
    (table,) = board.tables
    assert [s["id"] for s in table.skipped] == ["20"]
    assert sorted(table.rows[0].samples["clean"]) == ["10", "30"]
    assert "1 malformed sample(s)" in render_markdown(board) and "20: it has 3 annotator answers" in render_markdown(board)
    assert "1 malformed sample(s)" in render_html(board)
    from leaderboard.entries import JSONReporter

    assert {entry["skipped_samples"] for entry in json.loads(JSONReporter()(board))} in ({1}, set())


def test_skipped_samples_and_an_n_beyond_the_split_run_on_what_the_task_gave(tmp_path: Path) -> None:
    """n = 5 of a 3-question split, one of them malformed and skipped, and the standard attack on
    a subset of 4: the run once crashed with an IndexError on the chunk positions it planned for n.
    Every cell runs on the 2 samples the task gives, with a warning, and the board's n is 2."""
    root = _write_vqa(tmp_path / "vqa")
    _three_answers(root)
    with pytest.warns(UserWarning, match="5 samples asked \\(n\\), the task gave 2"):
        board, store = _run(tmp_path, f"""\
name: short
seed: 0
victims: [{{name: fake-victim}}]
tasks: [{{name: vqav2, data: {root}, split: {SPLIT}, n: 5, params: {{on_bad_sample: skip}}}}]
threat_models: {{linf-8: {{norm: linf, eps: 8/255}}}}
attacks: [{{name: none}}]
defenses: [{{name: none}}]
adaptive: {{params: {{steps: 2, restarts: 0}}, samples: 4, convergence: {{enabled: false}}}}
""")
    store.close()
    (table,) = board.tables
    (row,) = table.rows
    assert {c: s.n for c, s in row.scores.items()} == {"clean": 2, "clean-N10": 2, "adaptive@linf-8": 2, "adaptive-N10@linf-8": 2}
    assert sorted(row.samples["adaptive@linf-8"]) == ["10", "30"]


WEIRD_IDS = ["dollar-$x$-sign", "angle-<img src=x onerror=alert(1)>", "pipe-a|b", "newline-a\nb"]


def test_ids_with_markup_characters_render_in_every_format(tmp_path: Path) -> None:
    import csv
    import io

    from leaderboard.csv_report import CSVReporter
    from leaderboard.entries import JSONReporter
    from leaderboard.html import render_html
    from leaderboard.markdown import render_markdown

    root = _write_vqa(tmp_path / "vqa")
    defenses = "\n".join(f"  - {{name: jpeg, id: {json.dumps(i)}, params: {{quality: {50 + k}}}}}" for k, i in enumerate(WEIRD_IDS))
    board, store = _run(tmp_path, f"""\
name: labels
seed: 0
victims: [{{name: fake-victim}}]
tasks: [{{name: vqav2, data: {root}, split: {SPLIT}}}]
threat_models: {{linf-8: {{norm: linf, eps: 8/255}}}}
attacks: [{{name: none}}, {{name: pgd, threats: [linf-8], params: {{steps: 2}}}}]
defenses:
  - name: none
{defenses}
adaptive: {{enabled: false, reason: a test of rendering}}
""")
    store.close()
    assert {row.defense for row in board.tables[0].rows} == {"none", *WEIRD_IDS}
    markdown = render_markdown(board)
    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    widths = {line.replace("\\|", "").count("|") for line in table_lines[:6]}
    assert len(widths) == 1  # no id added a column or broke a row
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert "\\$x\\$" in markdown
    page = render_html(board)  # the plots' mathtext would fail on an unescaped "$"
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    rows = list(csv.DictReader(io.StringIO(CSVReporter()(board))))
    assert set(WEIRD_IDS) <= {row["defense"] for row in rows}
    assert set(WEIRD_IDS) <= {entry["defense"] for entry in json.loads(JSONReporter()(board))}


class _Planted:
    """A pickle that runs code when loaded: what a file planted in a cache could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_the_pairs_cache_is_refused_and_never_runs(tmp_path: Path) -> None:
    import torch

    from defenses.training_pairs import Pairs, _load_cached_pairs

    marker = tmp_path / "code-ran"
    planted = tmp_path / "pairs-planted.pt"
    torch.save({"clean": torch.zeros(1, 3, 2, 2), "adversarial": _Planted(marker)}, planted)
    with pytest.warns(UserWarning, match="ignoring the training-pairs cache .*recomputing"):
        assert _load_cached_pairs(planted) is None
    assert not marker.exists()

    honest = tmp_path / "pairs-honest.pt"
    pairs = Pairs(clean=torch.zeros(2, 3, 4, 4), adversarial=torch.ones(2, 3, 4, 4), prompts=["q", "q"],
                  targets=["a", "b"], kinds=["vqa", "vqa"], attack=["pgd", "pgd"], record={"pairs": 2})
    from dataclasses import asdict

    torch.save(asdict(pairs), honest)
    loaded = _load_cached_pairs(honest)
    assert loaded is not None and torch.equal(loaded.adversarial, pairs.adversarial) and loaded.targets == ["a", "b"]


def test_a_run_stops_on_bad_data_before_any_row_is_computed(tmp_path: Path) -> None:
    vqa = _write_vqa(tmp_path / "vqa")
    coco = tmp_path / "coco"
    _latin1_captions(coco)
    with pytest.raises(DataError, match="is not UTF-8"):
        _run(tmp_path, f"""\
name: stops
seed: 0
victims: [{{name: fake-victim}}]
tasks:
  - {{name: vqav2, data: {vqa}, split: {SPLIT}}}
  - {{name: coco_captions, data: {coco}, split: {SPLIT}, params: {{meteor: false}}}}
attacks: [{{name: none}}]
defenses: [{{name: none}}]
adaptive: {{enabled: false, reason: a test of data handling}}
""")
    import sqlite3

    with sqlite3.connect(tmp_path / "out" / "store.sqlite") as db:
        assert db.execute("SELECT count(*) FROM results").fetchone() == (0,)  # not even the good task's rows
