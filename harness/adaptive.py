"""Adaptive attacks: attack the defended model as a whole (defense then victim).

How the gradient gets through the defense is the defense's own declaration:

- ``differentiable = True``: exact gradients through ``purify``.
- ``differentiable = False`` and ``bpda = "identity"``: BPDA (Athalye et al. 2018) — the forward
  pass runs the real defense, the backward pass treats it as the identity.
- ``bpda = "approximate"``: BPDA through the defense's ``approximate(pixels)``, a differentiable
  stand-in with the same forward behaviour.
- ``stochastic = True``: EOT — the loss is averaged over ``eot`` independent draws of the defense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from harness.contracts import Defense, TaskKind, Victim


@dataclass
class GradientRoute:
    """How an adaptive attack differentiates through a defense (recorded with every row)."""

    method: str  # "exact" | "bpda-identity" | "bpda-approximate"
    eot: int

    def as_record(self) -> dict[str, Any]:
        return {"gradient": self.method, "eot": self.eot}


def gradient_route(defense: Defense, eot: int | None) -> GradientRoute:
    if defense.differentiable:
        method = "exact"
    elif defense.bpda == "approximate" and hasattr(defense, "approximate"):
        method = "bpda-approximate"
    elif defense.bpda in ("identity", None):
        method = "bpda-identity"
    else:
        raise ValueError(f"defense declares an unknown BPDA approximation {defense.bpda!r}")
    draws = eot if eot is not None else (defense.eot_samples if defense.stochastic else 1)
    return GradientRoute(method=method, eot=max(1, draws))


def soft_prompt_kwargs(defense: Defense) -> dict[str, Any]:
    """``{"soft_prompt": ...}`` for a defense with a soft prompt, else nothing (victims without
    soft-prompt support never see the keyword)."""
    soft = defense.soft_prompt()
    return {} if soft is None else {"soft_prompt": soft}


class DefendedTarget:
    """``defense ∘ victim`` with the :class:`~harness.contracts.AttackTarget` interface."""

    def __init__(self, victim: Victim, defense: Defense, route: GradientRoute, generator: torch.Generator):
        self.victim, self.defense, self.route, self.generator = victim, defense, route, generator

    def _purify(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.route.method == "exact":
            return self.defense.purify(pixels, self.generator)
        purified = self.defense.purify(pixels.detach(), self.generator)
        surrogate = pixels if self.route.method == "bpda-identity" else self.defense.approximate(pixels)  # type: ignore[attr-defined]
        # forward: the real defense; backward: the surrogate's gradient
        return surrogate + (purified - surrogate).detach()

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        prompts = self.defense.rewrite(prompts)
        extra = soft_prompt_kwargs(self.defense)
        losses = [self.victim.loss(self._purify(pixels), prompts, targets, kind, **extra) for _ in range(self.route.eot)]
        return torch.stack(losses).mean(dim=0)

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        with torch.no_grad():
            purified = self.defense.purify(pixels, self.generator)
        return self.victim.generate(purified, self.defense.rewrite(prompts), kind, **soft_prompt_kwargs(self.defense))
