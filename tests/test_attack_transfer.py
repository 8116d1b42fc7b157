"""AttackVLM's transfer (``mf-ii``) and query (``mf-tt``) attacks against the tiny shapes-vlm.

The surrogate is a second shapes-vlm trained with another seed (``seed=1``), at the tiny
victim's 100 steps so that it trains fast and is cached in CODEFEND_HOME with the victim.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.transfer import MFii, MFtt, parse_target_scene, render_target_scene
from harness.contracts import AttackBatch, ThreatModel
from harness.plugins import load_plugins
from harness.registry import Entry, ParamError, UnknownNameError
from tasks.shapes_world import COLOURS, SHAPES

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)
L2 = ThreatModel("l2-0.5", "l2", 0.5)
SURROGATE = {"seed": 1, "steps": 100}


class Progress:
    def __init__(self) -> None:
        self.steps = 0

    def update(self, n: int = 1) -> None:
        self.steps += n


class QueryOnly:
    """The victim behind a wall: outputs only, every one counted; asking for a loss fails."""

    def __init__(self, victim) -> None:
        self.victim = victim
        self.outputs = 0

    def generate(self, pixels, prompts, kind):
        assert pixels.min() >= 0 and pixels.max() <= 1, "queries must be valid images"
        outputs = self.victim.generate(pixels, prompts, kind)
        self.outputs += len(outputs)
        return outputs

    def loss(self, *args, **kwargs):
        raise AssertionError("the attack asked the victim for a loss (white-box access)")


class NoAccess:
    """A target a transfer attack must never touch."""

    def loss(self, *args, **kwargs):
        raise AssertionError("mf-ii called the victim's loss")

    def generate(self, *args, **kwargs):
        raise AssertionError("mf-ii queried the victim")


def _entry(factory, name: str) -> Entry:
    """The registry entry the plugin will add, for checking parameter validation."""
    return Entry("attack", name, factory, "", "test", "-", "-")


@pytest.fixture(scope="module")
def colour_batch(tiny_victim, vqa_task) -> AttackBatch:
    """8 "what color is the X?" samples: the victim answers them, and 'blue' is a fitting target
    (the 100-step victim says blue, but never red: it calls red shapes green)."""
    samples = [s for s in vqa_task.samples("test", 64, 0) if s.prompt.startswith("what color")][:8]
    assert len(samples) == 8
    pixels = tiny_victim.prepare([s.image for s in samples]).to(tiny_victim.device)
    return AttackBatch(pixels, [s.prompt for s in samples], [vqa_task.attack_targets(s)[0] for s in samples], "vqa",
                       seeds=list(range(100, 108)))


@pytest.fixture(scope="module")
def mfii() -> MFii:
    return MFii(target_text="blue", surrogate_params=SURROGATE)


@pytest.fixture(scope="module")
def mfii_result(tiny_victim, mfii, colour_batch):
    progress = Progress()
    result = mfii.perturb(NoAccess(), colour_batch, LINF8, torch.Generator().manual_seed(0), progress=progress)
    return result, progress


@pytest.fixture(scope="module")
def boundary_batch(tiny_victim, vqa_task) -> tuple[AttackBatch, list[str]]:
    """Images just on one side of a decision boundary of the victim, and the answer on the other.

    For a colour question about image A, bisect the segment from A to an image B the victim
    answers differently, and keep the last point still answered like A. A query attack that
    estimates the right direction crosses over within ε; one with a wrong sign never does.
    """
    samples = [s for s in vqa_task.samples("test", 64, 0) if s.prompt.startswith("what color")]
    pixels = tiny_victim.prepare([s.image for s in samples]).to(tiny_victim.device)
    starts, ends, prompts = [], [], []
    for i, sample in enumerate(samples):
        answers = tiny_victim.generate(pixels, [sample.prompt] * len(samples), "vqa")
        j = next((j for j, a in enumerate(answers) if a != answers[i]), None)
        if j is not None:
            starts.append(pixels[i])
            ends.append(pixels[j])
            prompts.append(sample.prompt)
        if len(starts) == 6:
            break
    a, b = torch.stack(starts), torch.stack(ends)
    own = tiny_victim.generate(a, prompts, "vqa")
    lo, hi = torch.zeros(len(prompts)), torch.ones(len(prompts))
    for _ in range(14):
        mid = (lo + hi) / 2
        x = a + (b - a) * mid.view(-1, 1, 1, 1)
        same = torch.tensor([o == w for o, w in zip(tiny_victim.generate(x, prompts, "vqa"), own)])
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    near = a + (b - a) * lo.view(-1, 1, 1, 1)
    across = tiny_victim.generate(a + (b - a) * hi.view(-1, 1, 1, 1), prompts, "vqa")
    assert tiny_victim.generate(near, prompts, "vqa") == own
    return AttackBatch(near, prompts, own, "vqa", seeds=list(range(len(prompts)))), across


# -- mf-ii ------------------------------------------------------------------------------------------


def test_mfii_stays_in_the_ball_and_in_range(colour_batch, mfii_result) -> None:
    result, progress = mfii_result
    clean = colour_batch.pixels
    assert result.pixels.shape == clean.shape and result.pixels.dtype == clean.dtype
    assert result.pixels.min() >= 0 and result.pixels.max() <= 1
    delta = (result.pixels - clean).abs().flatten(1).max(dim=1).values
    assert (delta <= LINF8.eps + 1e-6).all()
    assert delta.max() >= 0.5 * LINF8.eps, "the attack should use its budget"
    assert progress.steps == 100
    assert (result.forward_passes, result.backward_passes, result.queries) == (101, 100, 0)


def test_mfii_raises_the_surrogates_similarity_to_the_target(mfii, colour_batch, mfii_result) -> None:
    result, _ = mfii_result
    wanted = mfii.target_embedding((32, 32))
    with torch.no_grad():
        before = mfii.similarity(colour_batch.pixels, wanted)
        after = mfii.similarity(result.pixels, wanted)
    print(f"\nmf-ii surrogate cosine to the 'blue' scene: before {before.mean():.4f}, after {after.mean():.4f}")
    assert (after > before).all(), (before, after)
    assert result.losses[-1] > result.losses[0]
    assert len(result.losses) == 101
    # the returned pixels are the best iterate
    assert after.mean().item() >= max(result.losses) - 1e-4


def test_mfii_l2_stays_in_the_ball(mfii, colour_batch) -> None:
    attack = MFii(target_text="a blue square", surrogate_params=SURROGATE, steps=10, step_size=0.1)
    result = attack.perturb(NoAccess(), colour_batch, L2, torch.Generator())
    norms = (result.pixels - colour_batch.pixels).flatten(1).norm(dim=1)
    assert (norms <= L2.eps + 1e-5).all() and norms.max() >= 0.25 * L2.eps
    assert result.pixels.min() >= 0 and result.pixels.max() <= 1
    assert result.losses[-1] > result.losses[0]


def test_mfii_uses_a_cached_surrogate_that_is_not_the_victim(tiny_victim, mfii, mfii_result) -> None:
    fresh = MFii(target_text="red", surrogate_params=SURROGATE)
    assert fresh._surrogate_model is None, "the surrogate is created lazily, not in the constructor"
    surrogate = mfii.surrogate_model()
    assert surrogate is mfii.surrogate_model()
    assert mfii.surrogate == "shapes-vlm" and mfii.surrogate_params == SURROGATE
    assert surrogate is not tiny_victim and surrogate.fingerprint != tiny_victim.fingerprint


def test_mfii_eps_zero_returns_the_clean_pixels(mfii, colour_batch) -> None:
    result = mfii.perturb(NoAccess(), colour_batch, ThreatModel("zero", "linf", 0.0), torch.Generator())
    assert torch.equal(result.pixels, colour_batch.pixels)
    assert result.forward_passes == mfii.steps + 1  # no ε = 0 shortcut: the surrogate loop ran


def test_target_scenes_are_parsed_and_rendered() -> None:
    assert parse_target_scene("a red circle and a blue square") == [("red", "circle"), ("blue", "square")]
    assert parse_target_scene("there is a Yellow Triangle") == [("yellow", "triangle")]
    assert parse_target_scene("red") == [("red", shape) for shape in SHAPES]
    assert parse_target_scene("triangle") == [("white", "triangle")]
    for text in ("yes", "2", "a dog", "red and blue"):
        assert parse_target_scene(text) == []
    image = render_target_scene([("red", "circle"), ("blue", "square")], (32, 32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert COLOURS["red"] in colours and COLOURS["blue"] in colours
    blue = (image == COLOURS["blue"]).all(axis=2)
    red = (image == COLOURS["red"]).all(axis=2)
    assert np.nonzero(red)[1].max() < np.nonzero(blue)[1].min(), "objects are drawn left to right"
    assert blue.sum() > red.sum() > 40  # a square covers more of its box than a circle


def test_mfii_reads_a_target_image_file(tmp_path, colour_batch) -> None:
    from PIL import Image

    path = tmp_path / "target.png"
    Image.fromarray(render_target_scene([("green", "triangle")], (64, 64))).save(path)
    attack = MFii(target_text="yes", target_image=str(path), surrogate_params=SURROGATE, steps=2)
    pixels = attack.target_pixels((32, 32))
    assert pixels.shape == (1, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    result = attack.perturb(NoAccess(), colour_batch, LINF8, torch.Generator())
    assert result.pixels.shape == colour_batch.pixels.shape


def test_mfii_parameter_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="target_image.*'yes'|'yes'.*target_image"):
        MFii(target_text="yes")
    with pytest.raises(ValueError, match="target_image"):
        MFii(target_text="red", target_image="/no/such/file.png")
    with pytest.raises(ValueError, match="target_text"):
        MFii(target_text="  ")
    with pytest.raises(ValueError, match="steps"):
        MFii(target_text="red", steps=0)
    # the surrogate is checked against the plugin set the attack is created from
    attacks = load_plugins().attacks
    with pytest.raises(UnknownNameError, match="shapes-vlm"):
        attacks.create("mf-ii", {"target_text": "red", "surrogate": "shapes-vln"})
    with pytest.raises(ParamError, match="'colour'"):
        attacks.create("mf-ii", {"target_text": "red", "surrogate_params": {"seed": 1, "colour": 3}})
    entry = _entry(MFii, "mf-ii")
    with pytest.raises(ParamError, match="'target_text': is required"):
        entry.create({})
    with pytest.raises(ParamError, match="'stepsize': is not a parameter"):
        entry.create({"target_text": "red", "stepsize": 1})
    attack = entry.create({"target_text": "red", "step_size": "2/255", "surrogate_params": SURROGATE})
    assert attack.step_size == pytest.approx(2 / 255)
    assert attack.target_text == "red" and attack.requires == "transfer" and attack.uses_threat


# -- mf-tt ------------------------------------------------------------------------------------------


def test_mftt_counts_every_query_and_stays_in_the_ball(tiny_victim, boundary_batch) -> None:
    batch, _ = boundary_batch
    n = len(batch.prompts)
    for threat in (LINF8, L2):
        target = QueryOnly(tiny_victim)
        attack = MFtt(target_text="green", steps=3, num_queries=5, start_from_transfer=False, surrogate_params=SURROGATE)
        progress = Progress()
        result = attack.perturb(target, batch, threat, torch.Generator().manual_seed(0), progress=progress)
        assert result.queries == target.outputs == n * (3 * (5 + 1) + 1) == n * attack.queries_per_sample()
        assert progress.steps == 3 and len(result.losses) == 4 and result.backward_passes == 0
        delta = (result.pixels - batch.pixels).flatten(1)
        size = delta.abs().max(dim=1).values if threat.norm == "linf" else delta.norm(dim=1)
        assert (size <= threat.eps + 1e-5).all()
        assert result.pixels.min() >= 0 and result.pixels.max() <= 1


def test_mftt_started_from_transfer_is_query_only(tiny_victim, colour_batch) -> None:
    """Default path: an mf-ii start (surrogate gradients only), then outputs only."""
    target = QueryOnly(tiny_victim)
    attack = MFtt(target_text="blue", surrogate_params=SURROGATE, transfer_steps=30)
    progress = Progress()
    result = attack.perturb(target, colour_batch, LINF8, torch.Generator().manual_seed(0), progress=progress)
    n = len(colour_batch.prompts)
    assert result.queries == target.outputs == n * (8 * 21 + 1)
    assert progress.steps == 30 + 8
    assert (result.forward_passes, result.backward_passes) == (31 + 8 * 21 + 1, 30)
    assert attack.passes_per_sample() == (31 + 8 * 21 + 1, 30)
    delta = (result.pixels - colour_batch.pixels).abs().flatten(1).max(dim=1).values
    assert (delta <= LINF8.eps + 1e-6).all() and result.pixels.min() >= 0 and result.pixels.max() <= 1
    # the objective of what it returns is no lower than at its start (the mf-ii result)
    final = attack.text_similarity(tiny_victim.generate(result.pixels, colour_batch.prompts, "vqa"))
    print(f"\nmf-tt from mf-ii, target 'blue', per-step mean similarity {[round(v, 4) for v in result.losses]}, "
          f"returned {final.mean():.4f}")
    assert final.mean().item() >= result.losses[0] - 1e-6


def test_mftt_objective_rises_near_a_decision_boundary(tiny_victim, boundary_batch) -> None:
    """Started next to the boundary, the estimated direction must carry samples over to the target."""
    batch, across = boundary_batch
    rises, crossed = [], 0
    for text in sorted(set(across)):
        idx = [i for i, a in enumerate(across) if a == text]
        sub = AttackBatch(batch.pixels[idx], [batch.prompts[i] for i in idx], [batch.targets[i] for i in idx], "vqa",
                          seeds=[batch.seeds[i] for i in idx])
        attack = MFtt(target_text=text, steps=4, num_queries=10, start_from_transfer=False, surrogate_params=SURROGATE)
        result = attack.perturb(QueryOnly(tiny_victim), sub, LINF8, torch.Generator().manual_seed(0))
        outputs = tiny_victim.generate(result.pixels, sub.prompts, "vqa")
        final = attack.text_similarity(outputs)
        rises.append((text, len(idx), [round(v, 4) for v in result.losses], round(final.mean().item(), 4)))
        crossed += sum(text in o for o in outputs)
        # never lower: the returned image is the best iterate
        assert final.mean().item() >= result.losses[0] - 1e-6
    print(f"\nmf-tt at the boundary (target, n, per-step mean similarity, returned): {rises}; crossed {crossed}/{len(across)}")
    assert crossed >= len(across) // 2, rises


def test_mftt_samples_do_not_depend_on_their_batch(tiny_victim, boundary_batch) -> None:
    batch, across = boundary_batch
    attack = MFtt(target_text=across[0], steps=2, num_queries=4, start_from_transfer=False, surrogate_params=SURROGATE)
    whole = attack.perturb(QueryOnly(tiny_victim), batch, LINF8, torch.Generator().manual_seed(0))
    part = AttackBatch(batch.pixels[:2], batch.prompts[:2], batch.targets[:2], "vqa", seeds=batch.seeds[:2])
    alone = attack.perturb(QueryOnly(tiny_victim), part, LINF8, torch.Generator().manual_seed(99))
    assert torch.equal(whole.pixels[:2], alone.pixels)
    assert not torch.equal(whole.pixels, batch.pixels), "the attack should have moved some sample"


def test_mftt_text_embedding(tiny_victim) -> None:
    attack = MFtt(target_text="red", start_from_transfer=False, surrogate_params=SURROGATE)
    sims = attack.text_similarity(["red", "the red", "yes", "", "zebra"])
    assert sims[0].item() == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < sims[0] and sims[2] < sims[0]
    assert sims[3].item() == 0.0 and sims[4].item() == 0.0  # nothing known: no similarity
    assert attack.surrogate_model() is not tiny_victim


def test_mftt_eps_zero_and_parameter_errors(tiny_victim, colour_batch) -> None:
    attack = MFtt(target_text="red", start_from_transfer=False, surrogate_params=SURROGATE, steps=1, num_queries=2)
    target = QueryOnly(tiny_victim)
    result = attack.perturb(target, colour_batch, ThreatModel("zero", "linf", 0.0), torch.Generator())
    assert torch.equal(result.pixels, colour_batch.pixels)
    # no ε = 0 shortcut: the queries ran (the iterates stay on the clean pixels)
    assert result.queries == target.outputs == len(colour_batch.prompts) * attack.queries_per_sample()
    assert attack.requires == "queries" and attack.target_text == "red"
    with pytest.raises(ValueError, match="num_queries"):
        MFtt(target_text="red", num_queries=0)
    with pytest.raises(ValueError, match="sigma"):
        MFtt(target_text="red", sigma=0)
    with pytest.raises(ValueError, match="target_image"):
        MFtt(target_text="maybe")  # the transfer start needs a target scene
    MFtt(target_text="maybe", start_from_transfer=False, surrogate_params=SURROGATE)  # a query-only run does not
    entry = _entry(MFtt, "mf-tt")
    with pytest.raises(ParamError, match="'target_text': is required"):
        entry.create({"steps": 2})
    assert entry.create({"target_text": "red", "sigma": "16/255", "surrogate_params": SURROGATE}).sigma == pytest.approx(16 / 255)


def test_registered_names() -> None:
    from harness.plugins import get_plugins

    attacks = get_plugins().attacks
    if "mf-ii" not in attacks or "mf-tt" not in attacks:
        pytest.skip("mf-ii / mf-tt are not registered in attacks/plugin.py yet")
    assert attacks.get("mf-ii").factory is MFii and attacks.get("mf-tt").factory is MFtt
