"""APGD (Auto-PGD) against the tiny shapes-vlm, and its step-size schedule on a known objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.apgd import APGD
from attacks.pgd import PGD
from harness.contracts import AttackBatch, ThreatModel

from attack_helpers import Batch, Progress
from attack_helpers import check_in_ball as _check_in_ball
from attack_helpers import run_attack as _run
from attack_helpers import victim_loss as _loss

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)
LINF16 = ThreatModel("linf-16", "linf", 16 / 255)
L2 = ThreatModel("l2-0.5", "l2", 0.5)
STEPS = 20
TARGET = "3"  # an answer word of the shapes vocabulary ("how many shapes are there?")


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> Batch:
    return Batch(tiny_victim, vqa_task, vqa_task.samples("test", 16, 0))


@pytest.fixture(scope="module")
def linf_result(tiny_victim, batch):
    progress = Progress()
    result = _run(APGD(steps=STEPS), tiny_victim, batch.attack_batch(), LINF8, progress=progress)
    return result, progress


def test_apgd_raises_the_loss_and_returns_the_best_iterate(tiny_victim, batch, linf_result) -> None:
    result, progress = linf_result
    assert len(result.losses) == STEPS + 1
    passes = (result.forward_passes, result.backward_passes)
    assert passes == (STEPS + 1, STEPS) == APGD(steps=STEPS).passes_per_sample()
    assert progress.steps == STEPS
    assert result.losses[-1] > result.losses[0]
    before, after = _loss(tiny_victim, batch, batch.pixels), _loss(tiny_victim, batch, result.pixels)
    assert after.mean() > before.mean()
    assert result.losses[0] == pytest.approx(before.mean().item(), abs=1e-5)  # no random start: starts clean
    # the best iterate: never below the start, and at least the best mean loss any step reached
    assert (after >= before - 1e-5).all(), (before, after)
    assert (after > before).float().mean() >= 0.75
    assert after.mean().item() >= max(result.losses) - 1e-4


def test_linf_apgd_stays_in_the_ball(batch, linf_result) -> None:
    result, _ = linf_result
    _check_in_ball(result.pixels, batch.pixels, LINF8)


@pytest.mark.parametrize("threat", [L2, LINF16], ids=["l2", "linf16"])
@pytest.mark.parametrize("random_start", [False, True], ids=["zero-start", "random-start"])
def test_apgd_stays_in_the_ball_and_raises_the_loss(tiny_victim, batch, threat, random_start) -> None:
    result = _run(APGD(steps=5, random_start=random_start), tiny_victim, batch.attack_batch(8, seeds=list(range(8))),
                  threat)
    _check_in_ball(result.pixels, batch.pixels[:8], threat)
    assert _loss(tiny_victim, batch, result.pixels).mean() > _loss(tiny_victim, batch, batch.pixels[:8]).mean()


def test_apgd_keeps_saturated_pixels_in_range(tiny_victim, batch) -> None:
    pixels = batch.pixels[:4].clone()
    pixels[:, :, :8, :] = 1.0
    pixels[:, :, 8:16, :] = 0.0
    result = _run(APGD(steps=4, step_size_factor=20.0), tiny_victim,
                  AttackBatch(pixels, batch.prompts[:4], batch.targets[:4], "vqa"), LINF8)
    _check_in_ball(result.pixels, pixels, LINF8)


@pytest.mark.parametrize("threat", [LINF8, ThreatModel("linf-32", "linf", 32 / 255)], ids=["linf8", "linf32"])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_steps(tiny_victim, batch, threat) -> None:
    """Same samples, same number of gradient steps: mean loss of the returned pixels."""
    apgd = _run(APGD(steps=STEPS), tiny_victim, batch.attack_batch(), threat)
    pgd = _run(PGD(steps=STEPS), tiny_victim, batch.attack_batch(), threat)
    pgd_zero = _run(PGD(steps=STEPS, random_start=False), tiny_victim, batch.attack_batch(), threat)
    clean = _loss(tiny_victim, batch, batch.pixels).mean().item()
    a, p, p0 = (_loss(tiny_victim, batch, r.pixels).mean().item() for r in (apgd, pgd, pgd_zero))
    assert a > clean
    assert a >= max(p, p0) - 1e-3, {"clean": clean, "apgd": a, "pgd": p, "pgd-zero-start": p0}


def test_targeted_apgd_lowers_the_target_loss_and_makes_the_victim_say_it(tiny_victim, batch) -> None:
    attack = APGD(steps=STEPS, target=TARGET)
    assert attack.target_text == TARGET
    result = _run(attack, tiny_victim, batch.attack_batch(), LINF16)
    _check_in_ball(result.pixels, batch.pixels, LINF16)
    texts = [TARGET] * len(batch.prompts)
    before, after = _loss(tiny_victim, batch, batch.pixels, texts), _loss(tiny_victim, batch, result.pixels, texts)
    # losses record the target's loss, which falls; the best iterate never raises it
    assert result.losses[0] == pytest.approx(before.mean().item(), abs=1e-5)
    assert result.losses[-1] < result.losses[0]
    assert after.mean() < before.mean()
    assert (after <= before + 1e-5).all()
    assert after.mean().item() <= min(result.losses) + 1e-4
    clean_out = tiny_victim.generate(batch.pixels, batch.prompts, "vqa")
    adv_out = tiny_victim.generate(result.pixels, batch.prompts, "vqa")
    candidates = [i for i, out in enumerate(clean_out) if TARGET not in out]
    flipped = [i for i in candidates if TARGET in adv_out[i]]
    assert flipped, (clean_out, adv_out)  # measured on this victim: 3 of 13 at 16/255, 20 steps


def test_eps_zero_returns_the_clean_pixels_exactly(tiny_victim, batch) -> None:
    for norm in ("linf", "l2"):
        for attack in (APGD(steps=3), APGD(steps=3, random_start=True), APGD(steps=3, target=TARGET)):
            result = _run(attack, tiny_victim, batch.attack_batch(4), ThreatModel("zero", norm, 0.0))
            assert torch.equal(result.pixels, batch.pixels[:4])
            assert len(result.losses) == 4  # no ε = 0 shortcut: the start and 3 iterates were evaluated


def test_random_start_comes_from_the_per_sample_seeds(tiny_victim, batch) -> None:
    attack = APGD(steps=2, random_start=True)
    first = _run(attack, tiny_victim, batch.attack_batch(4, seeds=[1, 2, 3, 4]), LINF8, seed=0)
    again = _run(attack, tiny_victim, batch.attack_batch(4, seeds=[1, 2, 3, 4]), LINF8, seed=99)
    other = _run(attack, tiny_victim, batch.attack_batch(4, seeds=[5, 6, 7, 8]), LINF8, seed=0)
    assert torch.equal(first.pixels, again.pixels)  # the seeds decide, not the generator
    assert not torch.equal(first.pixels, other.pixels)
    unseeded = [_run(attack, tiny_victim, batch.attack_batch(4), LINF8, seed=s).pixels for s in (0, 0, 1)]
    assert torch.equal(unseeded[0], unseeded[1]) and not torch.equal(unseeded[0], unseeded[2])


def test_restarts_re_attack_only_unbroken_samples_and_keep_each_samples_worst_case(tiny_victim, vqa_task, batch) -> None:
    """A restart runs from a random start on the samples still answered, and a sample's example
    changes only when the restart's scores lower (or the same, with a higher loss)."""
    samples, n = batch.samples, 12
    scored: list[list[int]] = []

    def scorer(outputs, indices):
        scored.append(list(indices))
        return [s["vqa_accuracy"] for s in vqa_task.score(list(outputs), [samples[i] for i in indices])]

    def attack_batch() -> AttackBatch:
        b = batch.attack_batch(n, seeds=list(range(n)))
        b.scorer = scorer
        return b

    def scores(pixels: torch.Tensor) -> list[float]:
        outputs = tiny_victim.generate(pixels, batch.prompts[:n], "vqa")
        return [s["vqa_accuracy"] for s in vqa_task.score(outputs, samples[:n])]

    eps = ThreatModel("linf-2", "linf", 2 / 255)  # weak enough that the first run leaves survivors
    single = _run(APGD(steps=4), tiny_victim, attack_batch(), eps)
    scored.clear()
    restarted = _run(APGD(steps=4, restarts=2), tiny_victim, attack_batch(), eps)
    first, after = scores(single.pixels), scores(restarted.pixels)
    survivors = [i for i in range(n) if first[i] > 0]
    assert 0 < len(survivors) < n, first  # the test needs both kinds
    assert scored[0] == list(range(n)) and scored[1] == survivors  # the first restart: survivors only
    assert all(a <= f for a, f in zip(after, first)), (first, after)
    for i in range(n):
        if first[i] == 0:
            assert torch.equal(restarted.pixels[i], single.pixels[i])  # broken: never re-attacked
    assert restarted.losses == single.losses  # the first run's losses (the loss-rise check's like with like)
    _check_in_ball(restarted.pixels, batch.pixels[:n], eps)
    assert APGD(steps=4, restarts=2).passes_per_sample() == (3 * 5, 3 * 4)
    assert APGD(steps=4, restarts=2).judgements_per_sample() == 3 and APGD(steps=4).judgements_per_sample() == 0


def test_parameters_are_checked() -> None:
    for bad in ({"steps": 0}, {"step_size_factor": 0.0}, {"alpha": 0.0}, {"alpha": 1.5}, {"rho": 0.0}, {"target": " "},
                {"restarts": -1}):
        with pytest.raises(ValueError):
            APGD(**bad)
    assert APGD().steps == 100 and APGD().step_size_factor == 1.0 and APGD().alpha == 0.75
    assert APGD().random_start is False and APGD().target_text is None


# -- the step-size schedule, on an objective whose maximiser is known -----------------------------


class Quadratic:
    """``loss = -||x - centre||²`` per sample: maximised at ``centre`` (inside the ball)."""

    def __init__(self, centre: torch.Tensor):
        self.centre = centre

    def loss(self, pixels, prompts, targets, kind):
        return -((pixels - self.centre) ** 2).flatten(1).sum(dim=1)

    def generate(self, pixels, prompts, kind):
        return [""] * pixels.shape[0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step_halving_lets_apgd_converge_where_a_fixed_step_cannot(norm) -> None:
    """Sign steps of a fixed size ε oscillate around the maximiser at ~ε/2 per pixel; APGD halves
    its step when the objective stops increasing and restarts from its best point, so it closes in."""
    g = torch.Generator().manual_seed(0)
    eps = 0.1
    clean = torch.full((2, 3, 8, 8), 0.5)
    direction = torch.rand(clean.shape, generator=g) * (torch.randint(0, 2, clean.shape, generator=g) * 2 - 1)
    if norm == "l2":
        direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    centre = clean + 0.9 * eps * direction
    target = Quadratic(centre)
    batch = AttackBatch(clean, ["p", "p"], ["t", "t"], "vqa")
    threat = ThreatModel("t", norm, eps)
    apgd = _run(APGD(steps=100), target, batch, threat)
    fixed = _run(PGD(steps=100, step_size=eps, random_start=False), target, batch, threat)
    rms = lambda r: ((r.pixels - centre) ** 2).mean().sqrt().item() / eps  # noqa: E731
    assert rms(apgd) < 0.25 * rms(fixed), (rms(apgd), rms(fixed))
    if norm == "linf":
        assert rms(fixed) > 0.25 and rms(apgd) < 0.02
    assert np.isclose(apgd.losses[0], target.loss(clean, [], [], "vqa").mean().item())


class _FlakyDraws:
    """A stochastic target whose every other generation breaks every sample (a purification draw
    that happens to fail), the others answering as the victim does."""

    def __init__(self, victim) -> None:
        self.victim, self.calls = victim, 0

    def loss(self, pixels, prompts, targets, kind):
        return self.victim.loss(pixels, prompts, targets, kind)

    def generate(self, pixels, prompts, kind):
        self.calls += 1
        return ["no answer"] * len(prompts) if self.calls % 2 else self.victim.generate(pixels, prompts, kind)


def test_restarts_judge_a_sample_over_the_batch_s_draws_not_the_one_draw_that_broke_it(tiny_victim, vqa_task, batch) -> None:
    """Judged on one draw, a draw that happens to fail hides every survivor from the restart;
    judged over two (the mean score), the samples the other draw still answers are re-attacked."""
    samples, n = batch.samples, 12
    scored: list[list[int]] = []

    def scorer(outputs, indices):
        scored.append(list(indices))
        return [s["vqa_accuracy"] for s in vqa_task.score(list(outputs), [samples[i] for i in indices])]

    def attack_batch(judging_draws: int) -> AttackBatch:
        b = batch.attack_batch(n, seeds=list(range(n)))
        b.scorer, b.judging_draws = scorer, judging_draws
        return b

    eps = ThreatModel("linf-2", "linf", 2 / 255)
    one = APGD(steps=4, restarts=1).perturb(_FlakyDraws(tiny_victim), attack_batch(1), eps, torch.Generator().manual_seed(0))
    assert scored == [list(range(n))]  # the failing draw judged every sample broken: no restart
    assert one.queries == n
    scored.clear()
    two = APGD(steps=4, restarts=1).perturb(_FlakyDraws(tiny_victim), attack_batch(2), eps, torch.Generator().manual_seed(0))
    # the first run does not depend on the judging: ``one`` holds its examples
    first = [s["vqa_accuracy"] for s in vqa_task.score(tiny_victim.generate(one.pixels, batch.prompts[:n], "vqa"), samples[:n])]
    survivors = [i for i in range(n) if first[i] > 0]
    assert survivors, first  # the test needs samples the first run leaves standing
    assert scored[:2] == [list(range(n))] * 2  # two draws judge every sample
    assert scored[2:4] == [survivors] * 2  # the restart re-attacks those the answering draw keeps
    assert two.queries == 2 * n + 2 * len(survivors)
    assert two.forward_passes == 5 + 2 + 5 + 2
    # what validate prices: the runs' passes, and every judgement once per judging draw
    priced = APGD(steps=4, restarts=1)
    assert two.forward_passes == priced.passes_per_sample()[0] + priced.judgements_per_sample() * 2
    _check_in_ball(two.pixels, batch.pixels[:n], eps)


def test_a_batch_judges_with_at_least_one_draw(batch) -> None:
    with pytest.raises(ValueError, match="judging_draws must be at least 1"):
        AttackBatch(batch.pixels[:2], batch.prompts[:2], batch.prompts[:2], "vqa", judging_draws=0)
