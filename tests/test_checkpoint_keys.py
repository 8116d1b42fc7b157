"""A cached model never outlives the code that trained it.

Rows are keyed by the code that made them (tests/test_code_version.py); the models they use are
cached too. Each trainer puts the code version of the modules that define and train its model into
the checkpoint key, so an edit there trains anew instead of serving the old checkpoint. Here a file
is "edited" by changing its hash, and exactly the keys trained by it must change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

import attacks.pgd
import defenses.diffpure
import defenses.diffusion
import defenses.prompt
import defenses.purifier
import defenses.training_pairs
import harness.board
import harness.victims.shapes_vlm
import tasks.shapes_world
from harness import code_version
from harness.code_version import clear_code_version_cache, files_code_version


@pytest.fixture
def keys(tiny_victim) -> Callable[[], dict[str, str]]:
    from defenses.diffusion import ShapesDDPMConfig
    from defenses.prompt import CoDefendPrompt
    from defenses.purifier import CoDefendPurifier, PurifierTraining
    from harness.plugins import get_plugins
    from harness.victims.shapes_vlm import ShapesVLM

    plugins = get_plugins()
    spec = CoDefendPurifier().pair_spec(tiny_victim)
    prompt = CoDefendPrompt(mode="soft")

    def compute() -> dict[str, str]:
        clear_code_version_cache()
        return {
            "victim": ShapesVLM().cache_dir.name,
            "ddpm": ShapesDDPMConfig().fingerprint(),
            "purifier": PurifierTraining().fingerprint({"pairs_code": spec.code_versions(plugins)}),
            "pairs": spec.fingerprint(["a-sample"], spec.code_versions(plugins)),
            "prompt": prompt.checkpoint_dir(tiny_victim).name,
        }

    yield compute
    clear_code_version_cache()


def _edit(monkeypatch: pytest.MonkeyPatch, module) -> None:
    """Make ``module``'s file hash differently from now on, as an edit would."""
    edited = Path(module.__file__).resolve()
    real = code_version._hash_files

    def hash_files(root: Path, files: list[Path]) -> str:
        digest = real(root, files)
        return ("edited" + digest)[:16] if edited in [Path(f).resolve() for f in files] else digest

    monkeypatch.setattr(code_version, "_hash_files", hash_files)
    clear_code_version_cache()


@pytest.mark.parametrize(("module", "changed"), [
    (harness.victims.shapes_vlm, {"victim"}),
    (defenses.diffusion, {"ddpm", "purifier"}),
    (defenses.purifier, {"purifier"}),
    (defenses.training_pairs, {"purifier", "pairs", "prompt"}),
    (defenses.prompt, {"prompt"}),
    (attacks.pgd, {"purifier", "pairs", "prompt"}),  # the attack that makes the training pairs
    (defenses.diffpure, set()),  # the purifier samples with it; rows re-run, nothing retrains
    (tasks.shapes_world, {"victim", "ddpm"}),  # makes their training data (the pairs key their samples by content)
    (harness.board, set()),  # renders rows, trains nothing
], ids=lambda v: getattr(v, "__name__", None))
def test_editing_training_code_changes_exactly_the_checkpoints_it_trains(monkeypatch, keys, module, changed) -> None:
    before = keys()
    assert keys() == before  # stable without an edit
    _edit(monkeypatch, module)
    after = keys()
    assert {name for name in before if before[name] != after[name]} == changed


def test_files_code_version_follows_content_not_location(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder / "pkg").mkdir(parents=True)
        (tmp_path / folder / "pkg" / "train.py").write_text("STEPS = 10\n")
        (tmp_path / folder / "util.py").write_text("X = 1\n")
    clear_code_version_cache()

    def version(folder: str) -> str:
        return files_code_version([tmp_path / folder / "pkg" / "train.py", tmp_path / folder / "util.py"])

    assert version("a") == version("b") and version("a").startswith("src:")  # a moved checkout keeps it
    (tmp_path / "b" / "pkg" / "train.py").write_text("STEPS = 11\n")
    clear_code_version_cache()
    assert version("a") != version("b")
    with pytest.raises(ValueError, match="at least one file"):
        files_code_version([])


def test_a_code_edit_remakes_training_pairs_without_redrawing_their_random_starts(tiny_victim, monkeypatch) -> None:
    """The pairs' cache key holds the code; their attacks' random starts do not: an edit that
    changes nothing in what the attack computes must remake the same pairs."""
    from defenses.training_pairs import PairSpec, PairTask, make_pairs, parse_pair_attacks
    from harness.paths import codefend_home
    from harness.plugins import get_plugins

    spec = PairSpec(victim_fingerprint=tiny_victim.fingerprint,
                    attacks=parse_pair_attacks([{"attack": "pgd", "params": {"steps": 2}, "eps": 8 / 255}]),
                    tasks=(PairTask(name="vqav2"),), split="train", per_task=4, seed=5)
    cache = codefend_home() / "pairs"
    before = make_pairs(tiny_victim, spec, plugins=get_plugins(), progress=False)
    cached = set(cache.glob("pairs-*.pt"))
    real = PairSpec.code_versions
    monkeypatch.setattr(PairSpec, "code_versions", lambda self, plugins: {**real(self, plugins), "pairs": "src:edited"})
    after = make_pairs(tiny_victim, spec, plugins=get_plugins(), progress=False)
    assert len(set(cache.glob("pairs-*.pt")) - cached) == 1  # made again under a new key, not read back
    assert torch.equal(before.adversarial, after.adversarial)  # random starts (PGD's) drawn the same
    assert not torch.equal(before.adversarial, before.clean)


def test_the_draws_of_training_pairs_stay_what_every_cached_model_was_trained_on() -> None:
    """Pair attacks draw from ``PairSpec.fingerprint(..., None)``: no code version, and not the name
    of a defense the pairs go through (it holds that defense's training code's version). A change
    here redraws every training pair, and so retrains every purifier and prompt to other weights.
    Change the value only on purpose."""
    import dataclasses

    from defenses.training_pairs import PairSpec, PairTask, parse_pair_attacks

    attacks = parse_pair_attacks([{"attack": "pgd", "params": {"steps": 10}, "norm": "linf", "eps": "8/255"}])
    spec = PairSpec(victim_fingerprint="v", attacks=attacks, tasks=(PairTask(name="vqav2"),), split="train",
                    per_task=8, seed=3)
    assert spec.fingerprint(["d1", "d2"], None) == "c05b3812c168a56b"
    through = dataclasses.replace(spec, through="codefend-purifier-abc, eot 2")
    assert through.fingerprint(["d1", "d2"], None) == "c05b3812c168a56b"
    assert through.fingerprint(["d1", "d2"], {"pairs": "src:x"}) != spec.fingerprint(["d1", "d2"], {"pairs": "src:x"})
