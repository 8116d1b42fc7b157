"""The ensemble's per-sample worst case, and adaptive attacks through defenses (exact, BPDA, EOT)."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from attacks.ensemble import Ensemble, Member
from attacks.pgd import PGD
from defenses.basic import JpegDefense
from harness.adaptive import DefendedTarget, gradient_route
from harness.contracts import AttackBatch, Defense, ThreatModel
from tasks.vqa_eval import vqa_accuracy

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)


@pytest.fixture(scope="module")
def samples(vqa_task):
    return vqa_task.samples("test", 24, 0)


def _batch(victim, task, samples) -> AttackBatch:
    references = [task.attack_targets(s) for s in samples]

    def scorer(outputs: Sequence[str], indices: Sequence[int]) -> list[float]:
        return [vqa_accuracy(o, samples[i].references) for o, i in zip(outputs, indices)]

    return AttackBatch(
        victim.prepare([s.image for s in samples]), [s.prompt for s in samples], [r[0] for r in references], "vqa",
        seeds=list(range(len(samples))), references=references, scorer=scorer,
    )


def _scores(victim, batch: AttackBatch, pixels: torch.Tensor) -> list[float]:
    return batch.scorer(victim.generate(pixels, batch.prompts, "vqa"), list(range(len(batch.prompts))))


def test_ensemble_is_per_sample_at_least_as_strong_as_each_member(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples)
    generator = torch.Generator().manual_seed(0)
    members = [Member(name="pgd", params={"steps": 5}), Member(name="pgd", params={"steps": 5, "step_size": "4/255"})]
    ensemble = Ensemble(members=members, references=2).perturb(tiny_victim, batch, LINF8, generator)
    worst = _scores(tiny_victim, batch, ensemble.pixels)
    clean = _scores(tiny_victim, batch, batch.pixels)
    for params in ({"steps": 5}, {"steps": 5, "step_size": 4 / 255}):
        member = PGD(**params).perturb(tiny_victim, batch, LINF8, torch.Generator().manual_seed(0))
        member_scores = _scores(tiny_victim, batch, member.pixels)
        assert all(w <= m + 1e-9 for w, m in zip(worst, member_scores)), (worst, member_scores)
    assert all(w <= c + 1e-9 for w, c in zip(worst, clean))
    assert sum(worst) < sum(clean)
    assert (ensemble.pixels - batch.pixels).abs().max() <= 8 / 255 + 1e-6
    assert ensemble.forward_passes > 2 * 5 and ensemble.backward_passes == 4 * 5  # 2 members x 2 references
    priced = Ensemble(members=members, references=2)
    assert priced.judgements_per_sample() == 1 + 2 * 2  # the clean images, then each of the 4 runs
    assert ensemble.forward_passes <= priced.passes_per_sample()[0] + priced.judgements_per_sample()


def test_ensemble_early_stop_skips_broken_samples(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples)
    members = [Member(name="pgd", params={"steps": 3})]
    full = Ensemble(members=members, references=3).perturb(tiny_victim, batch, LINF8, torch.Generator())
    stopped = Ensemble(members=members, references=3, stop_below=0.5).perturb(tiny_victim, batch, LINF8, torch.Generator())
    assert stopped.backward_passes < full.backward_passes


def test_ensemble_rejects_unbounded_members() -> None:
    """Checked when its registry hands it the plugin set, so a suite with one fails validation."""
    from harness.plugins import load_plugins

    with pytest.raises(ValueError, match="ignores the threat model"):
        load_plugins().attacks.create("ensemble", {"members": [{"name": "none"}]})


class _JpegThroughIdentity(JpegDefense):
    """JPEG with the weaker BPDA route (the identity backward), to compare the two."""

    bpda = "identity"


class _Zeroing(Defense):
    """A gradient-masking toy: differentiable, but its output does not depend on the input."""

    def purify(self, pixels, generator):
        return pixels * 0 + 0.5


class _Noise(Defense):
    stochastic = True
    eot_samples = 4

    def purify(self, pixels, generator):
        noise = torch.randn(pixels.shape, generator=generator) * 0.05
        return (pixels + noise).clamp(0, 1)


def test_gradient_routes_follow_the_defense_declarations() -> None:
    assert (gradient_route(JpegDefense(), None).method, gradient_route(JpegDefense(), None).eot) == ("bpda-approximate", 1)
    assert gradient_route(_JpegThroughIdentity(), None).method == "bpda-identity"
    assert (gradient_route(_Zeroing(), None).method, gradient_route(_Zeroing(), None).eot) == ("exact", 1)
    assert gradient_route(_Noise(), None).eot == 4
    assert gradient_route(_Noise(), 7).eot == 7


def test_exact_gradient_through_a_masking_defense_is_zero_and_bpda_is_not(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples[:4])
    pixels = batch.pixels.clone().requires_grad_(True)
    exact = DefendedTarget(tiny_victim, _Zeroing(), gradient_route(_Zeroing(), None), torch.Generator())
    (grad,) = torch.autograd.grad(exact.loss(pixels, batch.prompts, batch.targets, "vqa").sum(), pixels)
    assert grad.abs().max() == 0
    jpeg = JpegDefense(quality=50)
    bpda = DefendedTarget(tiny_victim, jpeg, gradient_route(jpeg, None), torch.Generator())
    loss = bpda.loss(pixels, batch.prompts, batch.targets, "vqa")
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # the forward pass is the real JPEG
    jpeg_pixels = jpeg.purify(batch.pixels, torch.Generator())
    assert torch.allclose(loss, tiny_victim.loss(jpeg_pixels, batch.prompts, batch.targets, "vqa"), atol=1e-5)


def test_jpeg_bpda_backward_goes_through_the_differentiable_codec(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples[:4])
    jpeg, identity = JpegDefense(quality=50), _JpegThroughIdentity(quality=50)
    real = jpeg.purify(batch.pixels, torch.Generator())
    # the stand-in follows the real codec: its error is a fraction of what the codec changes
    assert (jpeg.approximate(batch.pixels) - real).abs().mean() < 0.5 * (real - batch.pixels).abs().mean()

    def gradient(defense: JpegDefense) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch.pixels.clone().requires_grad_(True)
        target = DefendedTarget(tiny_victim, defense, gradient_route(defense, None), torch.Generator())
        loss = target.loss(pixels, batch.prompts, batch.targets, "vqa")
        return loss.detach(), torch.autograd.grad(loss.sum(), pixels)[0]

    loss_approximate, through_codec = gradient(jpeg)
    loss_identity, through_identity = gradient(identity)
    # same forward (the real codec), different backward: the identity's is the victim's gradient
    # at the decoded image, the approximation's is that chained through DiffJPEG's Jacobian
    assert torch.allclose(loss_approximate, loss_identity)
    at_decoded = real.clone().requires_grad_(True)
    (victim_gradient,) = torch.autograd.grad(tiny_victim.loss(at_decoded, batch.prompts, batch.targets, "vqa").sum(), at_decoded)
    assert torch.allclose(through_identity, victim_gradient, atol=1e-6)
    assert not torch.allclose(through_codec, through_identity, atol=1e-4)


def test_adaptive_bpda_pgd_beats_oblivious_pgd_against_jpeg(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples)
    jpeg = JpegDefense(quality=75)
    target = DefendedTarget(tiny_victim, jpeg, gradient_route(jpeg, None), torch.Generator())
    attack = PGD(steps=10)
    oblivious = attack.perturb(tiny_victim, batch, LINF8, torch.Generator().manual_seed(0))
    adaptive = attack.perturb(target, batch, LINF8, torch.Generator().manual_seed(0))
    through_jpeg = lambda px: target.loss(px, batch.prompts, batch.targets, "vqa").mean().item()  # noqa: E731
    assert through_jpeg(adaptive.pixels) > through_jpeg(oblivious.pixels)
    assert adaptive.losses[-1] > adaptive.losses[0]


def test_eot_averages_draws_of_a_stochastic_defense(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples[:4])
    calls = []

    class Counting(_Noise):
        def purify(self, pixels, generator):
            calls.append(pixels.shape[0])
            return super().purify(pixels, generator)

    defense = Counting()
    target = DefendedTarget(tiny_victim, defense, gradient_route(defense, None), torch.Generator().manual_seed(0))
    target.loss(batch.pixels, batch.prompts, batch.targets, "vqa")
    assert calls == [4 * 4]  # the 4 draws of 4 images run as one batch
    calls.clear()
    DefendedTarget(tiny_victim, defense, gradient_route(defense, None), torch.Generator(), eot_batch=3).loss(
        batch.pixels, batch.prompts, batch.targets, "vqa")
    assert calls == [3 * 4, 1 * 4]


def test_the_ensembles_loss_rise_compares_each_run_with_its_own_start(tiny_victim, vqa_task, samples) -> None:
    batch = _batch(tiny_victim, vqa_task, samples[:8])
    runs = []

    class Recording(PGD):
        def perturb(self, *args, **kwargs):
            result = super().perturb(*args, **kwargs)
            runs.append((result.losses[0], result.losses[-1], args[1].pixels.shape[0]))
            return result

    ensemble = Ensemble(members=[Member(name="pgd", params={"steps": 3})], references=2)
    ensemble.members = [("pgd", Recording(steps=3))]
    result = ensemble.perturb(tiny_victim, batch, LINF8, torch.Generator().manual_seed(0))
    weight = sum(n for _, _, n in runs)
    assert result.loss_rise == pytest.approx((sum(a * n for a, _, n in runs) / weight, sum(b * n for _, b, n in runs) / weight))
    # not the first run's end against the last run's end (another reference text)
    assert result.loss_rise[1] > result.loss_rise[0]
