"""Adaptive attacks: attack the defended model as a whole (defense then victim).

How the gradient gets through the defense is the defense's own declaration:

- ``differentiable = True``: exact gradients through ``purify``.
- ``differentiable = False`` and ``bpda = "identity"``: BPDA (Athalye et al. 2018) — the forward
  pass runs the real defense, the backward pass treats it as the identity.
- ``bpda = "approximate"``: BPDA through the defense's ``approximate(pixels)``, a differentiable
  stand-in with the same forward behaviour.
- a prompt made per sample (:class:`~harness.contracts.ConditionalPromptDefense`: CoDefend's prefix
  generator) is made from each draw's purified pixels inside the graph: the attacker knows the
  generator, and the gradient reaches the pixels through the purifier, the victim's image encoder
  and the prompt alike.
- ``stochastic = True``: EOT — the loss is averaged over ``eot`` independent draws of the defense.
  The draws run as one batch (the images tiled ``eot`` times): one purification and one victim
  pass per step instead of ``eot``, with independent noise per copy, so the average is exact.
- gradient grafting (DiffHammer, NeurIPS 2024), when the suite asks for it: every EOT draw's
  gradient with respect to its purified image is averaged and sent back through *one* draw's
  purification. The exact EOT gradient is the mean over draws of J_i^T g_i (J_i the purifier's
  Jacobian at draw i, g_i the victim's gradient at draw i's output); grafting uses
  J_0^T mean(g_i). The other draws run forward without a graph, so the costly backward pass
  through a long sampler runs once per step instead of once per draw. It is exact when the
  Jacobian does not depend on the noise, an approximation otherwise, and the board labels it.
- a surrogate process (:class:`~harness.contracts.SurrogateProcessDefense`, Lee & Kim 2023), when
  the suite asks for one: the attack differentiates a cheaper process with the same noise level;
  ``generate`` (and the runner's evaluation) still run the real defense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from harness.contracts import BPDAApproximation, ConditionalPromptDefense, Defense, SurrogateProcessDefense, TaskKind, Victim, check_defense_declarations
from harness.objectives import victim_objective, victim_objectives


@dataclass
class GradientRoute:
    """How an adaptive attack differentiates through a defense (recorded with every row)."""

    method: str  # "exact" | "bpda-identity" | "bpda-approximate"
    eot: int
    surrogate: str | None = None
    """Set when the gradient goes through a surrogate process: what it is (e.g. ``ddpm, 2 steps
    at the same t*``); the board labels such columns."""
    grafted: bool = False
    """The EOT draws' gradients are grafted onto one draw's backward pass (DiffHammer); only
    with more than one draw."""

    def describe(self) -> str:
        """The route in words, as ``codefend validate`` and the board show it."""
        return (self.method + (f", EOT {self.eot}" if self.eot > 1 else "")
                + (" grafted onto one draw's backward pass" if self.grafted else "")
                + (f", {self.surrogate}" if self.surrogate else ""))


def gradient_route(defense: Defense, eot: int | None, surrogate_steps: int | None = None,
                   grafting: bool = False) -> GradientRoute:
    """The route an adaptive attack takes through ``defense``. ``eot`` overrides the defense's
    own draw count for stochastic defenses; a deterministic one always gets a single draw.
    ``surrogate_steps``: attack through the defense's surrogate process when it has more network
    evaluations than this. ``grafting``: graft the EOT draws' gradients onto one backward pass
    through the defense (a deterministic defense has one draw, so nothing to graft)."""
    check_defense_declarations(type(defense).__name__, defense)
    if defense.differentiable:
        method = "exact"
    elif defense.bpda == "approximate":
        method = "bpda-approximate"
    else:
        method = "bpda-identity"
    if not defense.stochastic:
        draws = 1
    else:
        draws = eot if eot is not None else defense.eot_samples
    surrogate = None
    if (surrogate_steps is not None and method == "exact" and isinstance(defense, SurrogateProcessDefense)
            and defense.passes_per_sample() > surrogate_steps):
        surrogate = f"surrogate process: {surrogate_steps} of {defense.passes_per_sample()} network evaluations at the same noise level"
    draws = max(1, draws)
    return GradientRoute(method=method, eot=draws, surrogate=surrogate, grafted=grafting and draws > 1)


def soft_prompt_kwargs(defense: Defense, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """``{"soft_prompt": ...}`` for a defense with a soft prompt, else nothing (victims without
    soft-prompt support never see the keyword). ``pixels`` are what the victim reads with
    ``prompts`` (the purified images, the rewritten prompts): a
    :class:`~harness.contracts.ConditionalPromptDefense` makes one prompt per sample from them,
    differentiably, so an adaptive attack's gradient also flows through the prompt."""
    if isinstance(defense, ConditionalPromptDefense):
        per_sample = defense.soft_prompts(pixels, prompts)
        if per_sample is not None:
            return {"soft_prompt": per_sample}
    soft = defense.soft_prompt()
    return {} if soft is None else {"soft_prompt": soft}


class DefendedTarget:
    """``defense ∘ victim`` with the :class:`~harness.contracts.AttackTarget` interface."""

    def __init__(self, victim: Victim, defense: Defense, route: GradientRoute, generator: torch.Generator,
                 *, surrogate_steps: int | None = None, eot_batch: int | None = None):
        self.victim, self.defense, self.route, self.generator = victim, defense, route, generator
        self.differentiated: Defense = defense
        if route.surrogate is not None:
            assert isinstance(defense, SurrogateProcessDefense) and surrogate_steps is not None
            self.differentiated = defense.surrogate_process(surrogate_steps)
        self.eot_batch = eot_batch
        """Draws per batched call (None: all at once); lower it when EOT × batch does not fit."""

    def _purify(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.route.method == "exact":
            return self.differentiated.purify(pixels, self.generator)
        purified = self.defense.purify(pixels.detach(), self.generator)
        if self.route.method == "bpda-identity":
            surrogate = pixels
        else:
            assert isinstance(self.defense, BPDAApproximation)  # check_defense_declarations made sure
            surrogate = self.defense.approximate(pixels)
        # forward: the real defense; backward: the surrogate's gradient
        return surrogate + (purified - surrogate).detach()

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        return self.objective_loss("ce", pixels, prompts, targets, kind)

    def objectives(self) -> tuple[str, ...]:
        return victim_objectives(self.victim)

    def objective_loss(self, objective: str, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                       kind: TaskKind) -> torch.Tensor:
        def per_draw(purified: torch.Tensor, tiled_prompts: list[str], tiled_targets: list[str]) -> torch.Tensor:
            return victim_objective(self.victim, objective, purified, tiled_prompts, tiled_targets, kind,
                                    **soft_prompt_kwargs(self.defense, purified, tiled_prompts))

        prompts = self.defense.rewrite(prompts)
        if self.route.grafted and torch.is_grad_enabled():
            return self._grafted_loss(pixels, prompts, targets, per_draw)
        n, draws = pixels.shape[0], self.route.eot
        per_call = min(draws, self.eot_batch or draws)
        total = pixels.new_zeros(n)
        done = 0
        while done < draws:
            k = min(per_call, draws - done)
            # k copies of every image, each purified with its own noise: k EOT draws in one batch
            tiled = pixels.repeat(k, 1, 1, 1) if k > 1 else pixels
            losses = per_draw(self._purify(tiled), list(prompts) * k, list(targets) * k)
            total = total + losses.view(k, n).sum(dim=0)
            done += k
        return total / draws

    def _grafted_loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                      per_draw: Callable[[torch.Tensor, list[str], list[str]], torch.Tensor]) -> torch.Tensor:
        """The EOT mean of the loss, with the gradient J_0^T mean(g_i) (see the module docstring):
        the first draw's purification keeps its graph, the others run without one, and the victim's
        gradient at every draw's purified image is averaged onto the first draw's."""
        n, draws = pixels.shape[0], self.route.eot
        per_call = min(draws, self.eot_batch or draws)
        anchor = self._purify(pixels)
        total = pixels.new_zeros(n)
        gradient_sum = torch.zeros_like(anchor)
        done = 0
        while done < draws:
            k = min(per_call, draws - done)
            with torch.no_grad():
                rest = k - 1 if done == 0 else k
                others = self._purify(pixels.detach().repeat(rest, 1, 1, 1)) if rest else anchor.detach()[:0]
            purified = (torch.cat([anchor.detach(), others]) if done == 0 else others).requires_grad_(True)
            losses = per_draw(purified, list(prompts) * k, list(targets) * k)
            (gradient,) = torch.autograd.grad(losses.sum(), purified)
            total = total + losses.detach().view(k, n).sum(dim=0)
            gradient_sum = gradient_sum + gradient.view(k, *anchor.shape).sum(dim=0)
            done += k
        grafted = (anchor * (gradient_sum / draws)).flatten(1).sum(dim=1)
        # the value is the EOT mean; the gradient is the grafted one
        return total / draws + grafted - grafted.detach()

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        with torch.no_grad():
            purified = self.defense.purify(pixels, self.generator)
            prompts = self.defense.rewrite(prompts)
            return self.victim.generate(purified, prompts, kind, **soft_prompt_kwargs(self.defense, purified, prompts))
