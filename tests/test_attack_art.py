"""ART attacks through the image-to-text adapter, against the tiny shapes-vlm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import (
    AutoProjectedGradientDescent,
    BasicIterativeMethod,
    CarliniL2Method,
    DeepFool,
    FastGradientMethod,
    HopSkipJump,
    MomentumIterativeMethod,
    ProjectedGradientDescent,
    SquareAttack,
)
from art.estimators.classification.classifier import ClassifierMixin
from art.estimators.estimator import BaseEstimator, LossGradientsMixin, NeuralNetworkMixin
from art.exceptions import EstimatorError

from attacks.art_attacks import ARTFGSM, ARTPGD, ARTSquare, ImageToTextEstimator, TextLabel
from attacks.pgd import PGD
from harness.contracts import ThreatModel

from attack_helpers import Batch, Progress, check_in_ball
from attack_helpers import run_attack as _run
from attack_helpers import victim_loss as _loss

LINF8 = ThreatModel("linf-8", "linf", 8 / 255)
L2 = ThreatModel("l2-0.5", "l2", 0.5)
STEPS = 10


def _check_in_ball(adv: torch.Tensor, clean: torch.Tensor, threat: ThreatModel, uses_budget: bool = True) -> None:
    # ART works on float32 numpy arrays: its L∞ projection can overshoot by float round-off
    check_in_ball(adv, clean, threat, uses_budget=uses_budget, linf_tolerance=1e-5)


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> Batch:
    return Batch(tiny_victim, vqa_task, vqa_task.samples("test", 16, 0))


@pytest.fixture
def estimator(tiny_victim, batch) -> ImageToTextEstimator:
    est = ImageToTextEstimator(tiny_victim, tuple(batch.pixels.shape[1:]), device=batch.pixels.device)
    est.set_batch(batch.prompts, "vqa")
    return est


# -- the adapter ----------------------------------------------------------------------------------


def test_adapter_is_the_estimator_art_attacks_need_and_not_a_classifier(estimator) -> None:
    assert isinstance(estimator, (BaseEstimator, LossGradientsMixin, NeuralNetworkMixin))
    assert not isinstance(estimator, ClassifierMixin)
    assert estimator.channels_first and estimator.input_shape == (3, 32, 32)
    assert np.allclose(estimator.clip_values, (0.0, 1.0))
    ProjectedGradientDescent(estimator, eps=0.1, eps_step=0.01, verbose=False)
    FastGradientMethod(estimator, eps=0.1)
    SquareAttack(estimator, loss=lambda x, y: np.zeros(len(x)), adv_criterion=lambda p, y: np.zeros(len(p), bool),
                 verbose=False)
    runs = (ProjectedGradientDescent, FastGradientMethod, BasicIterativeMethod, MomentumIterativeMethod, SquareAttack)
    cannot = (AutoProjectedGradientDescent, HopSkipJump, CarliniL2Method, DeepFool)  # need classes (docs/art.md)
    for attack in runs + cannot:
        assert attack.is_estimator_valid(estimator, attack._estimator_requirements) == (attack in runs), attack
    with pytest.raises(EstimatorError):
        HopSkipJump(estimator, verbose=False)


def test_adapter_loss_gradient_and_predict_are_the_victims(tiny_victim, batch, estimator) -> None:
    x = batch.pixels.cpu().numpy()
    y = estimator.labels(batch.targets)
    assert y.dtype == object and isinstance(y[0], TextLabel)
    pixels = batch.pixels.clone().requires_grad_(True)
    loss = tiny_victim.loss(pixels, batch.prompts, batch.targets, "vqa")
    (grad,) = torch.autograd.grad(loss.sum(), pixels)

    assert np.allclose(estimator.compute_loss(x, y), loss.detach().numpy(), atol=1e-5)
    art_grad = estimator.loss_gradient(x, y)
    assert art_grad.dtype == np.float32 and art_grad.shape == x.shape
    assert np.allclose(art_grad, grad.numpy(), atol=1e-6)
    # plain target strings work for the whole batch, and give the same gradient
    assert np.allclose(estimator.loss_gradient(x, np.array(batch.targets, dtype=object)), art_grad, atol=1e-6)
    # TextLabels keep each row with its own prompt when an attack passes a subset of rows
    rows = [5, 2]
    assert np.allclose(estimator.compute_loss(x[rows], y[rows]), loss.detach().numpy()[rows], atol=1e-5)
    assert np.allclose(estimator.loss_gradient(x[rows], y[rows]), art_grad[rows], atol=1e-5)
    with pytest.raises(ValueError):
        estimator.compute_loss(x[rows], np.array(batch.targets, dtype=object)[rows])
    outputs = estimator.predict(x)
    assert outputs.dtype == object and list(outputs) == tiny_victim.generate(batch.pixels, batch.prompts, "vqa")
    # what it cost: 5 loss calls (2 on a subset of 2 rows; the refused one does not count), one generation
    assert (estimator.forward_passes, estimator.backward_passes) == (6, 3)
    assert estimator.queries == 16 * 3 + 2 * 2 + 16
    assert estimator.sample_queries[5] == 6 and estimator.sample_queries[0] == 4


# -- art-pgd --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threat", [LINF8, L2], ids=["linf", "l2"])
def test_art_pgd_matches_native_pgd(tiny_victim, batch, threat) -> None:
    progress = Progress()
    art = _run(ARTPGD(steps=STEPS), tiny_victim, batch.attack_batch(), threat, progress=progress)
    _check_in_ball(art.pixels, batch.pixels, threat)
    assert (art.forward_passes, art.backward_passes) == (STEPS + 2, STEPS) == ARTPGD(steps=STEPS).passes_per_sample()
    assert progress.steps == STEPS
    clean = _loss(tiny_victim, batch, batch.pixels).mean().item()
    art_loss = _loss(tiny_victim, batch, art.pixels).mean().item()
    assert art.losses == pytest.approx([clean, art_loss], abs=1e-5)
    native = _loss(tiny_victim, batch, _run(PGD(steps=STEPS), tiny_victim, batch.attack_batch(), threat).pixels)
    native_zero = _run(PGD(steps=STEPS, random_start=False), tiny_victim, batch.attack_batch(), threat)
    native_zero_loss = _loss(tiny_victim, batch, native_zero.pixels).mean().item()
    # both raise the loss; the same algorithm from the same start lands on the same loss
    assert art_loss > clean and native.mean().item() > clean
    assert art_loss == pytest.approx(native_zero_loss, abs=1e-3)
    gain = native.mean().item() - clean
    assert abs(art_loss - native.mean().item()) <= 0.25 * gain, (clean, art_loss, native.mean().item())


def test_targeted_art_pgd_lowers_the_target_loss(tiny_victim, batch) -> None:
    attack = ARTPGD(steps=5, target="3")
    assert attack.target_text == "3"
    result = _run(attack, tiny_victim, batch.attack_batch(8), LINF8)
    _check_in_ball(result.pixels, batch.pixels[:8], LINF8)
    assert result.losses[1] < result.losses[0]
    texts = ["3"] * 8
    before, after = _loss(tiny_victim, batch, batch.pixels[:8], texts), _loss(tiny_victim, batch, result.pixels, texts)
    assert after.mean() < before.mean()


# -- art-fgsm -------------------------------------------------------------------------------------


def test_art_fgsm_moves_every_pixel_by_eps_where_not_clipped(tiny_victim, batch) -> None:
    result = _run(ARTFGSM(), tiny_victim, batch.attack_batch(), LINF8)
    _check_in_ball(result.pixels, batch.pixels, LINF8)
    assert (result.forward_passes, result.backward_passes) == (3, 1) == ARTFGSM().passes_per_sample()
    eps = LINF8.eps
    clean, delta = batch.pixels, result.pixels - batch.pixels
    free = (clean >= eps + 1e-6) & (clean <= 1 - eps - 1e-6)  # both ±eps stay in [0,1]
    assert free.float().mean() > 0.3
    assert torch.allclose(delta[free].abs(), torch.full_like(delta[free], eps), atol=1e-6)
    # the sign is the gradient's sign
    pixels = clean.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tiny_victim.loss(pixels, batch.prompts, batch.targets, "vqa").sum(), pixels)
    assert torch.equal(delta[free].sign(), grad[free].sign())
    assert result.losses[1] > result.losses[0]


def test_l2_art_fgsm_is_one_step_of_length_eps(tiny_victim, batch) -> None:
    result = _run(ARTFGSM(), tiny_victim, batch.attack_batch(8), L2)
    _check_in_ball(result.pixels, batch.pixels[:8], L2)
    assert result.losses[1] > result.losses[0]


# -- art-square -----------------------------------------------------------------------------------


@pytest.mark.parametrize("threat", [LINF8, L2], ids=["linf", "l2"])
def test_art_square_counts_queries_and_stays_in_the_ball(tiny_victim, batch, threat) -> None:
    attack = ARTSquare(max_iter=10)
    assert attack.requires == "queries"
    state = np.random.get_state()
    progress = Progress()
    result = _run(attack, tiny_victim, batch.attack_batch(), threat, progress=progress)
    assert np.array_equal(np.random.get_state()[1], state[1])  # ART's global RNG use is undone
    _check_in_ball(result.pixels, batch.pixels, threat, uses_budget=False)
    assert 0 < result.queries <= attack.query_budget(16)
    assert 0 < result.forward_passes <= attack.passes_per_sample()[0]
    assert result.backward_passes == 0
    assert progress.steps >= 1
    # random search only keeps candidates that lower its loss (raise the victim's): never worse
    before, after = _loss(tiny_victim, batch, batch.pixels), _loss(tiny_victim, batch, result.pixels)
    assert (after >= before - 1e-5).all()
    assert result.losses == pytest.approx([before.mean().item(), after.mean().item()], abs=1e-5)
    assert after.mean() > before.mean()


def test_art_square_with_seeds_does_not_depend_on_the_batch(tiny_victim, batch) -> None:
    attack = ARTSquare(max_iter=5)
    four = _run(attack, tiny_victim, batch.attack_batch(4, seeds=[11, 12, 13, 14]), LINF8, seed=0)
    one = _run(attack, tiny_victim, batch.attack_batch(1, seeds=[11]), LINF8, seed=1)
    assert torch.equal(four.pixels[:1], one.pixels)
    again = _run(attack, tiny_victim, batch.attack_batch(4, seeds=[11, 12, 13, 14]), LINF8, seed=2)
    assert torch.equal(four.pixels, again.pixels) and four.queries == again.queries
    assert 0 < four.queries <= attack.query_budget(4)


def test_targeted_art_square_lowers_the_target_loss(tiny_victim, batch) -> None:
    result = _run(ARTSquare(max_iter=10, target="3"), tiny_victim, batch.attack_batch(8), LINF8)
    _check_in_ball(result.pixels, batch.pixels[:8], LINF8, uses_budget=False)
    texts = ["3"] * 8
    before, after = _loss(tiny_victim, batch, batch.pixels[:8], texts), _loss(tiny_victim, batch, result.pixels, texts)
    assert (after <= before + 1e-5).all() and after.mean() < before.mean()


# -- all of them ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [ARTPGD(steps=2), ARTFGSM(), ARTSquare(max_iter=2), ARTPGD(steps=2, target="3")],
                         ids=["art-pgd", "art-fgsm", "art-square", "art-pgd-targeted"])
def test_eps_zero_returns_the_clean_pixels_exactly(tiny_victim, batch, attack) -> None:
    for norm in ("linf", "l2"):
        result = _run(attack, tiny_victim, batch.attack_batch(4), ThreatModel("zero", norm, 0.0))
        assert torch.equal(result.pixels, batch.pixels[:4])
        assert result.forward_passes >= 3 and len(result.losses) == 2  # no ε = 0 shortcut: ART ran


def test_parameters_are_checked() -> None:
    for factory, bad in ((ARTPGD, {"steps": 0}), (ARTPGD, {"step_size": 0.0}), (ARTSquare, {"p_init": 1.0}),
                         (ARTSquare, {"max_iter": 0}), (ARTSquare, {"nb_restarts": 0}), (ARTFGSM, {"target": ""})):
        with pytest.raises(ValueError):
            factory(**bad)
