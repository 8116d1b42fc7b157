"""Gradient grafting over EOT draws (DiffHammer): the gradient it computes, the one backward pass
through the defense it saves, and how a suite asks for it and the board labels it."""

from __future__ import annotations

import sys
import textwrap
from typing import Sequence

import pytest
import torch

from attacks.apgd import APGD
from harness.adaptive import DefendedTarget, gradient_route
from harness.contracts import AttackBatch, Defense, ThreatModel
from harness.hookspecs import hookimpl
from harness.plugins import load_plugins
from harness.suite import SuiteError, estimate_passes, expand, load_suite
from tasks.vqa_eval import vqa_accuracy


class _RecordingNoise(Defense):
    """``pixels * scale(noise) + shift(noise)``; records each call's noise and whether it kept a graph.
    ``noisy_jacobian`` makes the Jacobian depend on the draw (the case grafting approximates)."""

    stochastic = True
    eot_samples = 4

    def __init__(self, noisy_jacobian: bool = False):
        self.noisy_jacobian = noisy_jacobian
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def passes_per_sample(self) -> int:
        return 10  # priced like a 10-step sampler

    def scale(self, noise: torch.Tensor) -> torch.Tensor:
        return 1 + 2 * noise if self.noisy_jacobian else torch.full_like(noise, 0.8)

    def purify(self, pixels, generator):
        noise = torch.randn(pixels.shape, generator=generator) * 0.1
        self.calls.append((noise, torch.is_grad_enabled() and pixels.requires_grad))
        return pixels * self.scale(noise) + 0.1 + noise


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> tuple[torch.Tensor, list[str], list[str]]:
    samples = vqa_task.samples("test", 3, 0)
    pixels = tiny_victim.prepare([s.image for s in samples])
    return pixels, [s.prompt for s in samples], [vqa_task.attack_targets(s)[0] for s in samples]


def _grafted_and_by_hand(victim, defense: _RecordingNoise, batch, eot: int = 4, eot_batch: int | None = None):
    pixels, prompts, targets = batch
    route = gradient_route(defense, eot, grafting=True)
    assert route.grafted and route.eot == eot
    target = DefendedTarget(victim, defense, route, torch.Generator().manual_seed(0), eot_batch=eot_batch)
    x = pixels.clone().requires_grad_(True)
    loss = target.loss(x, prompts, targets, "vqa")
    (grafted,) = torch.autograd.grad(loss.sum(), x)
    # every draw's noise, in order: the first call is the anchor (the only one with a graph)
    noises = torch.cat([noise for noise, _ in defense.calls]).view(eot, *pixels.shape)
    jacobians, victim_gradients, losses = [], [], []
    for noise in noises:
        purified = (pixels * defense.scale(noise) + 0.1 + noise).requires_grad_(True)
        draw_loss = victim.loss(purified, prompts, targets, "vqa")
        victim_gradients.append(torch.autograd.grad(draw_loss.sum(), purified)[0])
        jacobians.append(defense.scale(noise))  # diagonal
        losses.append(draw_loss.detach())
    mean_victim_gradient = torch.stack(victim_gradients).mean(0)
    exact = torch.stack([j * g for j, g in zip(jacobians, victim_gradients)]).mean(0)
    return loss.detach(), grafted, torch.stack(losses).mean(0), jacobians[0] * mean_victim_gradient, exact


def test_grafting_equals_the_exact_eot_gradient_when_the_jacobian_does_not_depend_on_the_noise(tiny_victim, batch) -> None:
    defense = _RecordingNoise()
    loss, grafted, mean_loss, _, exact = _grafted_and_by_hand(tiny_victim, defense, batch)
    assert torch.allclose(loss, mean_loss, atol=1e-5)  # the value is the EOT mean over every draw
    assert grafted.abs().max() > 0
    assert torch.allclose(grafted, exact, atol=1e-6, rtol=1e-4)


def test_grafting_sends_the_mean_victim_gradient_back_through_one_draw_only(tiny_victim, batch) -> None:
    defense = _RecordingNoise(noisy_jacobian=True)
    loss, grafted, mean_loss, by_hand, exact = _grafted_and_by_hand(tiny_victim, defense, batch, eot_batch=2)
    assert torch.allclose(loss, mean_loss, atol=1e-5)
    assert torch.allclose(grafted, by_hand, atol=1e-6, rtol=1e-4)  # J_0^T mean(g_i)
    assert not torch.allclose(grafted, exact, atol=1e-6, rtol=1e-3)  # an approximation here
    # one purification keeps a graph (3 images); the other draws run without one, eot_batch at a time
    assert [(noise.shape[0], graph) for noise, graph in defense.calls] == [(3, True), (3, False), (6, False)]


def test_apgd_through_a_grafted_route_raises_the_loss(tiny_victim, vqa_task) -> None:
    samples = vqa_task.samples("test", 8, 0)
    pixels = tiny_victim.prepare([s.image for s in samples])
    defense = _RecordingNoise(noisy_jacobian=True)

    def scorer(outputs: Sequence[str], indices: Sequence[int]) -> list[float]:
        return [vqa_accuracy(o, samples[i].references) for o, i in zip(outputs, indices)]

    attack_batch = AttackBatch(pixels, [s.prompt for s in samples], [vqa_task.attack_targets(s)[0] for s in samples],
                               "vqa", seeds=list(range(len(samples))), scorer=scorer)
    target = DefendedTarget(tiny_victim, defense, gradient_route(defense, 4, grafting=True), torch.Generator().manual_seed(0))
    result = APGD(steps=10, restarts=0).perturb(target, attack_batch, ThreatModel("linf-8", "linf", 8 / 255),
                                                torch.Generator().manual_seed(0))
    assert result.losses[-1] > result.losses[0]
    assert (result.pixels - pixels).abs().max() > 4 / 255


def test_a_deterministic_defense_has_nothing_to_graft() -> None:
    assert not gradient_route(Defense(), 20, grafting=True).grafted


@hookimpl
def register_defenses(register):
    register("recording-noise", _RecordingNoise, description="noise with a recorded draw (test)")


SUITE = """\
name: grafting
seed: 0
victims:
  - {name: shapes-vlm, params: {steps: 100}}
tasks:
  - {name: vqav2, data: shapes, split: test, n: 6}
threat_models:
  linf-8: {norm: linf, eps: 8/255}
attacks:
  - name: none
defenses:
  - name: none
  - name: recording-noise
"""


def _plugins():
    return load_plugins(extra=[("grafting-test", sys.modules[__name__])])


def _load(tmp_path, text: str, plugins=None):
    (tmp_path / "suite.yaml").write_text(textwrap.dedent(text))
    return load_suite(tmp_path / "suite.yaml", plugins or _plugins())


def test_a_suite_asks_for_grafting_and_it_costs_fewer_backward_passes(tmp_path) -> None:
    plugins = _plugins()
    exact = _load(tmp_path, SUITE + "adaptive: {params: {steps: 10}, eot: 8, samples: 6}\n", plugins)
    grafted = _load(tmp_path, SUITE + "adaptive: {params: {steps: 10}, eot: 8, samples: 6, grafting: true}\n", plugins)
    assert {c.attack.grafting for c in expand(grafted) if c.attack.role in ("standard", "n-draw", "convergence")} == {True}
    with_graft, without = estimate_passes(grafted, plugins, {0: 6}), estimate_passes(exact, plugins, {0: 6})
    assert with_graft.attack_forward == without.attack_forward
    # through the 10-step defense: one backward pass per step instead of one per EOT draw (8; 16 in
    # the convergence re-run); the undefended rows cost the same
    assert with_graft.attack_backward < without.attack_backward / 4


def test_a_judgement_behind_a_surrogate_process_is_priced_through_the_real_defense() -> None:
    """The attack's steps run through the 2-step surrogate, but each judgement generates through
    all 10 steps once per judging draw: ``validate`` must not price it as one attack pass."""
    from harness.suite import AttackSpec, attack_passes

    defense = _SurrogateNoise()
    attack = APGD(steps=5, restarts=1)
    spec = AttackSpec(name="apgd", threats=["linf-8"], adaptive=True, eot=4, surrogate_steps=2, judging_draws=6)
    forward, backward = attack_passes(spec, attack, defense)
    steps_forward = 2 * (5 + 1) * 4 * (1 + 2)  # two runs of 6 forward passes, EOT 4, victim + 2 surrogate calls
    assert forward == steps_forward + 2 * 6 * (1 + 10)  # two judgements, 6 draws each through the 10 real steps
    assert backward == 2 * 5 * (4 + 2 * 4)
    # through a deterministic defense a judgement is one generation; without a defense, the victim's
    deterministic = _Deterministic()
    assert attack_passes(spec, attack, deterministic)[0] == 2 * 6 * (1 + 3) + 2 * (1 + 3)
    assert attack_passes(spec, attack, None) == (2 * 6 + 2, 2 * 5)
    assert attack_passes(spec, APGD(steps=5), defense)[0] == (5 + 1) * 4 * (1 + 2)  # no restart: no judgement


class _SurrogateNoise(_RecordingNoise):
    def surrogate_process(self, steps: int) -> Defense:
        return _RecordingNoise()


class _Deterministic(Defense):
    def passes_per_sample(self) -> int:
        return 3

    def purify(self, pixels, generator):
        return pixels * 0.9


def test_grafting_outside_an_adaptive_attack_is_an_error_that_says_so(tmp_path) -> None:
    text = SUITE.replace("  - name: none\ndefenses", "  - name: none\n  - {name: pgd, threats: [linf-8], grafting: true}\ndefenses")
    with pytest.raises(SuiteError, match=r"grafting.*only applies with adaptive: true"):
        _load(tmp_path, text)


def test_judging_draws_outside_an_adaptive_attack_is_an_error_that_says_so(tmp_path) -> None:
    text = SUITE.replace("  - name: none\ndefenses", "  - name: none\n  - {name: pgd, threats: [linf-8], judging_draws: 4}\ndefenses")
    with pytest.raises(SuiteError, match=r"judging_draws.*only applies with adaptive: true"):
        _load(tmp_path, text)


def test_the_board_labels_grafted_routes() -> None:
    from harness.records import ResultRow, RowRecord
    from leaderboard.aggregate import _condition

    def row(defense: str, grafted: bool) -> ResultRow:
        record = {"attack": {"name": "apgd", "mode": "adaptive", "gradient": "exact", "eot": 20, "eot_grafting": grafted}}
        return ResultRow(fingerprint=defense, run_id="r", suite="s", victim="v", task="vqav2:test", metric="vqa_accuracy",
                         attack="adaptive@linf-8", threat="linf-8", norm="linf", eps=8 / 255, defense=defense,
                         sample_id="1", output="yes", adversarial_key="k", record=RowRecord.model_validate(record))

    routes = _condition("adaptive@linf-8", [row("diffpure", True), row("purifier", False)]).routes
    assert routes == {"diffpure": "exact, EOT 20 grafted onto one draw's backward pass", "purifier": "exact, EOT 20"}
