"""The VQAv2 and COCO-caption task plugins: readers, seeded subsets, scoring, registration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.contracts import Sample, Task
from tasks import _common
from tasks.coco_captions import CAPTION_PROMPT, CocoCaptionsTask
from tasks.shapes_world import build_shapes_world
from tasks.vqav2 import VQAv2Task

SIZES = {"train": 8, "val": 24, "test": 6}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shapes_world(tmp_path_factory.mktemp("world") / "shapes", seed=0, sizes=SIZES)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _ids(samples: list[Sample]) -> list[str]:
    return [s.id for s in samples]


# ------------------------------------------------------------------------------------- VQAv2


def test_tasks_satisfy_the_protocol_and_construct_without_io(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CODEFEND_HOME", str(tmp_path / "home"))
    for task in (VQAv2Task(), CocoCaptionsTask(), VQAv2Task(data="/nonexistent", images="/nowhere")):
        assert isinstance(task, Task)
    assert not (tmp_path / "home" / "data").exists()
    assert (VQAv2Task.kind, VQAv2Task.metric) == ("vqa", "vqa_accuracy")
    assert (CocoCaptionsTask.kind, CocoCaptionsTask.metric) == ("caption", "cider")


def test_shapes_data_uses_the_built_in_world(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "build_shapes_world", lambda: world)
    task = VQAv2Task()
    assert task.describe() == {"data": "shapes", "root": str(world), "images": None, "on_bad_sample": "fail"}
    assert len(task.samples("val", 2, seed=0)) == 2


def test_vqa_samples_are_a_deterministic_seeded_subset(world: Path) -> None:
    task = VQAv2Task(data=str(world))
    first = task.samples("val", 7, seed=3)
    again = VQAv2Task(data=str(world)).samples("val", 7, seed=3)
    assert _ids(first) == _ids(again) and len(first) == 7
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    everything = task.samples("val", None, seed=3)
    n_questions = len(_json(world / "questions" / "v2_OpenEnded_mscoco_val_questions.json")["questions"])
    assert len(everything) == n_questions and len(set(_ids(everything))) == n_questions
    assert _ids(everything)[:7] == _ids(first)  # a larger n extends a smaller one
    assert _ids(task.samples("val", 7, seed=4)) != _ids(first)
    assert _ids(everything) != sorted(_ids(everything), key=int)  # shuffled, not file order
    assert task.samples("val", 0, seed=3) == []


def test_vqa_sample_contents(world: Path) -> None:
    annotations = _json(world / "annotations" / "v2_mscoco_val_annotations.json")["annotations"]
    answers = {a["question_id"]: a for a in annotations}
    questions = _json(world / "questions" / "v2_OpenEnded_mscoco_val_questions.json")["questions"]
    asked = {q["question_id"]: q for q in questions}
    for sample in VQAv2Task(data=str(world)).samples("val", 5, seed=0):
        qid = int(sample.id)
        assert sample.prompt == asked[qid]["question"]
        assert sample.references == tuple(a["answer"] for a in answers[qid]["answers"])
        assert sample.meta["image_id"] == asked[qid]["image_id"]
        assert sample.meta["multiple_choice_answer"] == answers[qid]["multiple_choice_answer"]
        assert {"question_type", "answer_type"} <= set(sample.meta)
        assert sample.image.dtype == np.uint8 and sample.image.shape == (32, 32, 3)
        png = world / "images" / "val" / f"shapes_val_{sample.meta['image_id']:012d}.png"
        assert np.array_equal(sample.image, np.asarray(Image.open(png)))


def test_vqa_scoring_and_attack_targets(world: Path) -> None:
    task = VQAv2Task(data=str(world))
    samples = task.samples("val", 10, seed=0)
    right = task.score([s.meta["multiple_choice_answer"].upper() + "." for s in samples], samples)
    assert right == [{"vqa_accuracy": 1.0}] * len(samples)
    assert task.score(["banana"] * len(samples), samples) == [{"vqa_accuracy": 0.0}] * len(samples)
    with pytest.raises(ValueError):
        task.score(["yes"], samples)

    probe = Sample(id="1", image=samples[0].image, prompt="?", references=("b", "a", "a", "c", "b", "a", "d"))
    assert task.attack_targets(probe) == ["a", "b", "c", "d"]  # by frequency, ties in first-seen order
    for sample in samples:
        assert task.attack_targets(sample)[0] == sample.meta["multiple_choice_answer"]


def test_vqa_missing_data_names_every_path_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        VQAv2Task(data=str(tmp_path)).samples("val2014", 1, seed=0)
    message = str(error.value)
    assert str(tmp_path / "questions" / "v2_OpenEnded_mscoco_val2014_questions.json") in message
    assert str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json") in message
    assert str(tmp_path / "annotations" / "v2_mscoco_val2014_annotations.json") in message
    assert "data: shapes" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQAv2Task(data=str(tmp_path / "absent")).samples("val", 1, seed=0)


def _fake_real_vqav2(world: Path, target: Path, image_ids: list[int]) -> None:
    """A VQAv2 folder laid out as the official downloads unpack: flat JSON, COCO-named JPEGs."""
    questions = _json(world / "questions" / "v2_OpenEnded_mscoco_val_questions.json")
    annotations = _json(world / "annotations" / "v2_mscoco_val_annotations.json")
    questions["questions"] = [q for q in questions["questions"] if q["image_id"] in image_ids]
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] in image_ids]
    target.mkdir()
    (target / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (target / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    images = target / "coco_images"
    images.mkdir()
    for image_id in image_ids:
        png = Image.open(world / "images" / "val" / f"shapes_val_{image_id:012d}.png")
        png.save(images / f"COCO_val2014_{image_id:012d}.jpg", quality=95)


def test_vqa_reads_the_official_flat_layout_with_coco_images(world: Path, tmp_path: Path) -> None:
    image_ids = [i["id"] for i in _json(world / "annotations" / "captions_val.json")["images"][:3]]
    real = tmp_path / "vqav2"
    _fake_real_vqav2(world, real, image_ids)

    with pytest.raises(FileNotFoundError) as error:  # images not where COCO keeps them
        VQAv2Task(data=str(real)).samples("val2014", 1, seed=0)
    message = str(error.value)
    assert f"{real / 'val2014'}/COCO_val2014_" in message and f"{real / 'images' / 'val2014'}/COCO_val2014_" in message
    assert "images:" in message

    task = VQAv2Task(data=str(real), images=str(real / "coco_images"))
    samples = task.samples("val", None, seed=0)  # "val" falls back to the on-disk "val2014"
    assert len(samples) == len(_json(real / "v2_OpenEnded_mscoco_val2014_questions.json")["questions"])
    assert {s.meta["image_id"] for s in samples} == set(image_ids)
    assert all(s.image.shape == (32, 32, 3) for s in samples)

    shutil.move(real / "coco_images", real / "val2014")  # COCO's own layout needs no override
    assert len(VQAv2Task(data=str(real)).samples("val2014", 2, seed=0)) == 2


# ---------------------------------------------------------------------------------- captions


def test_caption_samples(world: Path) -> None:
    task = CocoCaptionsTask(data=str(world))
    samples = task.samples("val", 6, seed=1)
    assert _ids(samples) == _ids(CocoCaptionsTask(data=str(world)).samples("val", 6, seed=1))
    assert len(samples) == 6 and len(task.samples("val", None, seed=1)) == SIZES["val"]
    assert _ids(task.samples("val", 6, seed=2)) != _ids(samples)
    coco = _json(world / "annotations" / "captions_val.json")
    captions = {}
    for a in coco["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    for sample in samples:
        assert sample.prompt == CAPTION_PROMPT
        assert sample.references == tuple(captions[int(sample.id)])
        assert task.attack_targets(sample) == list(sample.references)
        assert sample.image.shape == (32, 32, 3)


def test_caption_missing_data_names_the_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CocoCaptionsTask(data=str(tmp_path)).samples("val2014", 1, seed=0)
    assert str(tmp_path / "annotations" / "captions_val2014.json") in str(error.value)
    assert "data: shapes" in str(error.value)
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        CocoCaptionsTask(data=str(tmp_path)).samples("karpathy_test", 1, seed=0)


def test_caption_reads_coco_and_karpathy_layouts(world: Path, tmp_path: Path) -> None:
    coco = _json(world / "annotations" / "captions_val.json")
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    chosen = coco["images"][:4]
    for image in chosen:
        image["file_name"] = f"COCO_val2014_{image['id']:012d}.jpg"
        png = world / "images" / "val" / f"shapes_val_{image['id']:012d}.png"
        Image.open(png).save(root / "val2014" / image["file_name"])
    coco["images"] = chosen + [{"id": 999, "file_name": "unannotated.jpg", "height": 32, "width": 32}]
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    samples = CocoCaptionsTask(data=str(root)).samples("val2014", None, seed=0)
    assert sorted(int(s.id) for s in samples) == sorted(i["id"] for i in chosen)  # 999 has no captions

    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": image["file_name"],
                "split": split,
                "cocoid": image["id"],
                "sentences": [{"raw": f"caption {k}"} for k in range(6)],
            }
            for image, split in zip(chosen, ["test", "test", "val", "restval"])
        ]
    }
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    task = CocoCaptionsTask(data=str(root))
    test = task.samples("karpathy_test", None, seed=0)
    assert sorted(int(s.id) for s in test) == sorted(i["id"] for i in chosen[:2])
    assert test[0].references == tuple(f"caption {k}" for k in range(6))  # all six, as pycocoevalcap
    assert [int(s.id) for s in task.samples("karpathy_train", None, seed=0)] == [chosen[3]["id"]]
    # restval is val2014: the train2014-only split leaves it out (no leak into a val2014 evaluation)
    assert task.samples("karpathy_train2014", None, seed=0) == []


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_an_image_with_seven_references_is_scored_against_all_seven(world: Path, tmp_path: Path) -> None:
    coco = _json(world / "annotations" / "captions_val.json")
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    image = dict(coco["images"][0], file_name="COCO_val2014_000000000001.jpg")
    Image.open(world / "images" / "val" / f"shapes_val_{coco['images'][0]['id']:012d}.png").save(root / "val2014" / image["file_name"])
    captions = [f"an unrelated sentence number {k} about nothing" for k in range(6)] + ["a red circle beside a blue square"]
    coco = {"images": [image], "annotations": [{"id": k, "image_id": image["id"], "caption": c} for k, c in enumerate(captions)]}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco))
    task = CocoCaptionsTask(data=str(root), meteor=False)
    [sample] = task.samples("val2014", None, seed=0)
    assert sample.references == tuple(captions)
    # the output is the seventh reference word for word: a perfect BLEU-4 only if it is scored
    [scores] = task.score(["a red circle beside a blue square"], [sample])
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert task.corpus_scores(["a red circle beside a blue square"], [sample])["bleu4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_caption_scoring_over_exactly_the_given_samples(world: Path) -> None:
    # METEOR itself is covered in test_tasks_metrics; here it would only add a JVM start.
    task = CocoCaptionsTask(data=str(world), meteor=False)
    samples = task.samples("val", 6, seed=0)
    outputs = [s.references[0] if i % 2 == 0 else "a man riding a horse" for i, s in enumerate(samples)]
    scores = task.score(outputs, samples)
    assert len(scores) == len(samples)
    assert set(scores[0]) == {"cider", "bleu4", "rouge_l"}
    good = [s["cider"] for s in scores[0::2]]
    bad = [s["cider"] for s in scores[1::2]]
    assert min(good) > 50 and max(bad) < 10
    # CIDEr's document frequencies come from the scored set: a subset scores differently.
    assert task.score(outputs[:2], samples[:2])[0]["cider"] != pytest.approx(scores[0]["cider"])


# ---------------------------------------------------------------------------------- plugin


def test_plugin_registers_both_tasks_with_validated_params() -> None:
    plugins_module = pytest.importorskip("harness.plugins")
    registry_module = pytest.importorskip("harness.registry")
    from tasks import plugin

    loaded = plugins_module.load_plugins([("builtin-tasks", plugin)], use_entry_points=False)
    assert {"vqav2", "coco_captions"} <= set(loaded.tasks.names())
    task = loaded.tasks.create("vqav2", {"data": "/somewhere", "images": "/else"})
    assert isinstance(task, VQAv2Task) and (task.data, task.images) == ("/somewhere", "/else")
    assert isinstance(loaded.tasks.create("coco_captions", {}), CocoCaptionsTask)
    with pytest.raises(registry_module.ParamError, match="data"):
        loaded.tasks.create("coco_captions", {"dataset": "shapes"})


# ------------------------------------------------------------------ splits that do not leak


def test_restval_training_images_are_named_as_vqav2_val_names_them(world: Path, tmp_path: Path) -> None:
    """Karpathy's train split holds restval (val2014) images; both readers name them alike, so a
    pair set can leave out the ones VQAv2 val evaluates on."""
    image_ids = [i["id"] for i in _json(world / "annotations" / "captions_val.json")["images"][:3]]
    vqa_root = tmp_path / "vqav2"
    _fake_real_vqav2(world, vqa_root, image_ids)
    vqa = VQAv2Task(data=str(vqa_root), images=str(vqa_root / "coco_images"))
    assert vqa.evaluation_splits() == ("val",)
    coco_root = tmp_path / "coco"
    coco_root.mkdir()
    shutil.copytree(vqa_root / "coco_images", coco_root / "val2014")
    entries = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": split, "cocoid": i,
                "sentences": [{"raw": "a caption"}] * 5} for i, split in zip(image_ids, ["restval", "val", "test"])]
    (coco_root / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    coco = CocoCaptionsTask(data=str(coco_root))
    assert coco.evaluation_splits() == ("karpathy_test",)  # karpathy_val selects; the raw val2014 captions are absent here
    (restval,) = coco.samples("karpathy_train", None, seed=0)
    assert restval.meta["file_name"] in vqa.image_names("val")


class _NamedImages:
    """A task whose train split shares some images with its own or another task's test split."""

    kind, metric = "vqa", "vqa_accuracy"

    def __init__(self, name: str, train: list[str], test: list[str]) -> None:
        self.name, self.split_names = name, {"train": train, "test": test}

    def samples(self, split: str, n: int | None, seed: int) -> list[Sample]:
        names = self.split_names[split][: n]
        return [Sample(id=f"{self.name}-{i}", image=np.zeros((4, 4, 3), np.uint8), prompt="?", references=("a",),
                       meta={"file_name": name}) for i, name in enumerate(names)]

    def evaluation_splits(self) -> tuple[str, ...]:
        return ("test",)

    def image_names(self, split: str) -> frozenset[str]:
        return frozenset(self.split_names[split])


def test_no_training_image_of_a_pair_set_is_an_evaluation_image() -> None:
    from defenses.training_pairs import PairSpec, PairTask, training_samples

    vqa = _NamedImages("vqa", train=["t1", "shared", "t2", "t3"], test=["e1", "e2"])
    captions = _NamedImages("captions", train=["c1", "e1", "c2", "c3"], test=["shared"])
    spec = PairSpec(victim_fingerprint="v", attacks=(), tasks=(PairTask(name="vqa"), PairTask(name="captions")),
                    split="train", per_task=3, seed=0)
    samples, record = training_samples(spec, [vqa, captions])
    names = [[s.meta["file_name"] for s in task_samples] for task_samples in samples]
    assert names == [["t1", "t2", "t3"], ["c1", "c2", "c3"]]  # refilled from the seeded order
    assert not {n for task in names for n in task} & (vqa.image_names("test") | captions.image_names("test"))
    assert record["excluded_evaluation_images"] == {"vqa": 1, "captions": 1}
    with pytest.raises(ValueError, match="train split 'test' of task 'vqa' is one of its evaluation splits"):
        training_samples(PairSpec(victim_fingerprint="v", attacks=(), tasks=(PairTask(name="vqa", split="test"),),
                                  split="train", per_task=1, seed=0), [vqa])
