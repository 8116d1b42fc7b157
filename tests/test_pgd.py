"""PGD against the (weakly trained, but real) tiny shapes-vlm, and the victim's loss it climbs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attacks.pgd import PGD, project
from harness.contracts import AttackBatch, ThreatModel, Victim
from harness.victims.shapes_vlm import _teacher_forcing_batch

from attack_helpers import Batch, Progress
from attack_helpers import check_in_ball as _check_in_ball

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)
L2 = ThreatModel("l2-0.5", "l2", 0.5)


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> Batch:
    return Batch(tiny_victim, vqa_task, vqa_task.samples("test", 16, 0))


def _attack(victim, batch: AttackBatch, threat: ThreatModel, seed: int = 0, **params):
    return PGD(**params).perturb(victim, batch, threat, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def linf_result(tiny_victim, batch):
    progress = Progress()
    result = PGD(steps=10).perturb(tiny_victim, batch.attack_batch(), LINF8, torch.Generator().manual_seed(0),
                                   progress=progress)
    return result, progress


def test_victim_satisfies_the_protocol(tiny_victim, batch) -> None:
    assert isinstance(tiny_victim, Victim)
    assert tiny_victim.input_size == (32, 32)
    assert batch.pixels.shape == (16, 3, 32, 32)
    assert batch.pixels.dtype == torch.float32
    assert 0.0 <= batch.pixels.min() and batch.pixels.max() <= 1.0


def test_prepare_resizes_to_the_input_resolution(tiny_victim, batch) -> None:
    """The epsilon ball lives at the victim's input resolution, whatever the data's resolution."""
    image = batch.samples[0].image
    big = np.kron(image, np.ones((3, 3, 1), dtype=np.uint8))  # 96x96, nearest-neighbour upscale
    prepared = tiny_victim.prepare([big, image])
    assert prepared.shape == (2, 3, *tiny_victim.input_size)
    result = _attack(tiny_victim, AttackBatch(prepared.to(tiny_victim.device), batch.prompts[:2], batch.targets[:2], "vqa"),
                     LINF8, steps=2)
    assert result.pixels.shape == prepared.shape


def test_pgd_raises_the_victims_loss(tiny_victim, batch, linf_result) -> None:
    result, progress = linf_result
    assert result.losses[-1] > result.losses[0]
    assert len(result.losses) == 11
    assert (result.forward_passes, result.backward_passes) == (11, 10)
    assert progress.steps == 10
    with torch.no_grad():
        before = tiny_victim.loss(batch.pixels, batch.prompts, batch.targets, "vqa")
        after = tiny_victim.loss(result.pixels, batch.prompts, batch.targets, "vqa")
    assert after.mean() > before.mean()
    assert (after > before).float().mean() >= 0.75, (before, after)
    # the result is the best iterate: at least the best mean loss the attack reported
    assert after.mean().item() >= max(result.losses) - 1e-4


def test_l2_pgd_raises_the_loss(tiny_victim, batch) -> None:
    result = _attack(tiny_victim, batch.attack_batch(8), L2, steps=5)
    with torch.no_grad():
        before = tiny_victim.loss(batch.pixels[:8], batch.prompts[:8], batch.targets[:8], "vqa")
        after = tiny_victim.loss(result.pixels, batch.prompts[:8], batch.targets[:8], "vqa")
    assert result.losses[-1] > result.losses[0]
    assert after.mean() > before.mean()


def test_linf_pgd_stays_in_the_ball_and_in_range(batch, linf_result) -> None:
    result, _ = linf_result
    assert result.pixels.shape == (16, 3, 32, 32)
    _check_in_ball(result.pixels, batch.pixels, LINF8)


@pytest.mark.parametrize("threat", [L2, ThreatModel("linf-16", "linf", 16 / 255)], ids=["l2", "linf16"])
@pytest.mark.parametrize("random_start", [True, False], ids=["random-start", "zero-start"])
def test_pgd_stays_in_the_ball_and_in_range(tiny_victim, batch, threat, random_start) -> None:
    result = _attack(tiny_victim, batch.attack_batch(4), threat, steps=3, random_start=random_start)
    _check_in_ball(result.pixels, batch.pixels[:4], threat)


def test_pgd_keeps_saturated_pixels_in_range(tiny_victim, batch) -> None:
    """Pixels at 0 or 1 cannot move outside [0,1], even with a large step size."""
    pixels = batch.pixels[:4].clone()
    pixels[:, :, :8, :] = 1.0
    pixels[:, :, 8:16, :] = 0.0
    result = _attack(tiny_victim, AttackBatch(pixels, batch.prompts[:4], batch.targets[:4], "vqa"), LINF8,
                     steps=3, step_size=0.5)
    _check_in_ball(result.pixels, pixels, LINF8)


def test_projection_respects_both_constraints() -> None:
    clean = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for norm, eps in (("linf", 0.05), ("l2", 0.3)):
        projected = project(delta, clean, norm, eps)
        adv = clean + projected
        assert adv.min() >= 0 and adv.max() <= 1
        size = projected.abs().flatten(1).max(dim=1).values if norm == "linf" else projected.flatten(1).norm(dim=1)
        assert (size <= eps + 1e-6).all()
    small = torch.full_like(clean, 1e-4) * torch.sign(0.5 - clean)  # moves towards the middle: stays
    assert torch.allclose(project(small, clean, "linf", 0.05), small, atol=1e-6)


def test_eps_zero_returns_the_clean_pixels_exactly(tiny_victim, batch) -> None:
    for norm in ("linf", "l2"):
        result = _attack(tiny_victim, batch.attack_batch(4), ThreatModel("zero", norm, 0.0), steps=3)
        assert torch.equal(result.pixels, batch.pixels[:4])
        # no ε = 0 shortcut: the loop ran (tests/test_eps_zero.py covers every attack)
        assert (result.forward_passes, result.backward_passes, len(result.losses)) == (4, 3, 4)


def test_same_seed_same_output_other_seed_differs(tiny_victim, batch) -> None:
    first = _attack(tiny_victim, batch.attack_batch(4), LINF8, seed=1, steps=3)
    again = _attack(tiny_victim, batch.attack_batch(4), LINF8, seed=1, steps=3)
    other = _attack(tiny_victim, batch.attack_batch(4), LINF8, seed=2, steps=3)
    assert torch.equal(first.pixels, again.pixels)
    assert first.losses == again.losses
    assert not torch.equal(first.pixels, other.pixels)


def test_pgd_uses_only_the_generator_it_is_given(tiny_victim, batch) -> None:
    torch.manual_seed(123)
    first = _attack(tiny_victim, batch.attack_batch(2), LINF8, seed=7, steps=2)
    torch.manual_seed(456)
    second = _attack(tiny_victim, batch.attack_batch(2), LINF8, seed=7, steps=2)
    assert torch.equal(first.pixels, second.pixels)


# -- the victim's loss ----------------------------------------------------------------------------


def test_loss_gradient_wrt_pixels_is_finite_and_nonzero(tiny_victim, batch) -> None:
    pixels = batch.pixels[:8].clone().requires_grad_(True)
    loss = tiny_victim.loss(pixels, batch.prompts[:8], batch.targets[:8], "vqa")
    assert loss.shape == (8,)
    assert torch.isfinite(loss).all() and (loss > 0).all()
    (grad,) = torch.autograd.grad(loss.sum(), pixels)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(dim=1) > 0).all(), "every sample's loss must depend on its pixels"


def test_teacher_forcing_labels_mask_everything_but_the_target() -> None:
    # [BOS]=1 prompt(10 11 12) [SEP]=2 target(20 21) [EOS]=3 ; a shorter second sequence is padded
    sequences = [([1, 10, 11, 12, 2, 20, 21, 3], 5), ([1, 10, 2, 30, 3], 3)]
    input_ids, labels, attention = _teacher_forcing_batch(sequences, pad_id=0)
    assert input_ids.tolist() == [[1, 10, 11, 12, 2, 20, 21], [1, 10, 2, 30, 0, 0, 0]]
    # label j is token j+1: only positions predicting target tokens and EOS are counted
    assert labels.tolist() == [[-100, -100, -100, -100, 20, 21, 3], [-100, -100, 30, 3, -100, -100, -100]]
    assert attention.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]


def test_victim_sequences_mask_the_prompt(tiny_victim, batch) -> None:
    prompt, target = batch.prompts[0], batch.targets[0]
    sequence, start = tiny_victim._sequence_ids(prompt, target)
    tok = tiny_victim.tokenizer
    target_ids = tok.encode(target, add_special_tokens=False)
    assert sequence[0] == tok.bos_token_id and sequence[start - 1] == tok.sep_token_id
    assert sequence[start:] == [*target_ids, tok.eos_token_id]
    _, labels, _ = _teacher_forcing_batch([(sequence, start)], tok.pad_token_id)
    counted = labels[0] != -100
    assert counted.sum().item() == len(target_ids) + 1
    assert (labels[0, : start - 1] == -100).all()  # every prompt position is ignored


def test_loss_is_cross_entropy_over_target_tokens_only(tiny_victim, batch) -> None:
    """Recompute the loss by hand from the logits, counting only the target (+EOS) positions."""
    prompts, targets, pixels = batch.prompts[:4], batch.targets[:4], batch.pixels[:4]
    with torch.no_grad():
        loss = tiny_victim.loss(pixels, prompts, targets, "vqa")
        for i in range(4):
            sequence, start = tiny_victim._sequence_ids(prompts[i], targets[i])
            ids = torch.tensor([sequence[:-1]], device=pixels.device)
            logits = tiny_victim.model(pixel_values=tiny_victim._normalise(pixels[i : i + 1]), decoder_input_ids=ids).logits
            expected = F.cross_entropy(logits[0, start - 1 :], torch.tensor(sequence[start:], device=pixels.device))
            assert loss[i].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_loss_of_a_sample_does_not_depend_on_its_batch(tiny_victim, batch) -> None:
    """Padding to the longest prompt in a batch must not change any sample's loss."""
    lengths = {len(tiny_victim._prompt_ids(p)) for p in batch.prompts}
    assert len(lengths) > 1, "the batch should mix prompt lengths"
    with torch.no_grad():
        together = tiny_victim.loss(batch.pixels, batch.prompts, batch.targets, "vqa")
        alone = torch.cat([tiny_victim.loss(batch.pixels[i : i + 1], batch.prompts[i : i + 1], batch.targets[i : i + 1], "vqa")
                           for i in range(len(batch.prompts))])
    assert torch.allclose(together, alone, atol=1e-4)


def test_loss_depends_on_the_prompt_and_the_target(tiny_victim, batch, vqa_task) -> None:
    pixels, prompts, targets = batch.pixels, batch.prompts, batch.targets
    other_prompts = [prompts[(i + 1) % len(prompts)] if prompts[(i + 1) % len(prompts)] != p else "is it red ?"
                     for i, p in enumerate(prompts)]
    with torch.no_grad():
        base = tiny_victim.loss(pixels, prompts, targets, "vqa")
        reprompted = tiny_victim.loss(pixels, other_prompts, targets, "vqa")
        outputs = tiny_victim.generate(pixels, prompts, "vqa")
        own = tiny_victim.loss(pixels, prompts, outputs, "vqa")
        unlikely = tiny_victim.loss(pixels, prompts, ["purple triangle seven"] * len(prompts), "vqa")
        empty = tiny_victim.loss(pixels, prompts, [""] * len(prompts), "vqa")
    assert not torch.allclose(base, reprompted)
    # the greedy answer is (near) the model's most likely target; a nonsense target is much less likely
    assert own.mean() < base.mean() + 1e-6
    assert (unlikely > own).all()
    # an empty target counts only EOS: a finite loss, different from the real target's
    assert torch.isfinite(empty).all() and not torch.allclose(empty, base)


# -- the effect on accuracy ------------------------------------------------------------------------


def test_pgd_lowers_vqa_accuracy(tiny_victim, vqa_task) -> None:
    samples = vqa_task.samples("test", 64, 0)
    batch = Batch(tiny_victim, vqa_task, samples)

    def accuracy(pixels: torch.Tensor) -> float:
        outputs = tiny_victim.generate(pixels, batch.prompts, "vqa")
        return float(np.mean([s["vqa_accuracy"] for s in vqa_task.score(outputs, samples)]))

    clean = accuracy(batch.pixels)
    result = _attack(tiny_victim, batch.attack_batch(), LINF8, steps=20)
    adversarial = accuracy(result.pixels)
    assert clean > 0.2, "the tiny victim should answer some questions"
    assert adversarial < clean, (clean, adversarial)
