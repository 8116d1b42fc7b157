"""Projected gradient descent on the victim's teacher-forced loss (Madry et al. 2018).

Untargeted: maximise the loss of the reference text. The ball lives on [0,1] pixels at the
victim's input resolution; every iterate is projected into the ball and into [0,1]. The returned
pixels are the iterate with the highest loss seen for each sample, so extra steps never weaken it.
"""

from __future__ import annotations

from typing import Any

import torch

from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, Norm, ThreatModel
from harness.registry import FloatOrFraction


def project(delta: torch.Tensor, clean: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Project a perturbation into the ``norm`` ball of radius ``eps`` and keep clean+delta in [0,1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        flat = delta.flatten(1).norm(dim=1).clamp(min=1e-12)
        delta = delta * (eps / flat).clamp(max=1.0).view(-1, 1, 1, 1)
    return (clean + delta).clamp(0.0, 1.0) - clean


def project_pixels(x: torch.Tensor, clean: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    """Pixels ``x`` projected into the ``norm`` ball around ``clean`` and into [0,1].

    :func:`attacks.pgd.project` on pixels rather than on a perturbation. The final clamp only removes
    the float round-off of ``clean + ((clean + delta).clamp(0, 1) - clean)``; it never leaves the ball
    (``clean`` is in [0,1]).
    """
    return (clean + project(x - clean, clean, norm, eps)).clamp(0.0, 1.0)


def random_start(
    clean: torch.Tensor, norm: Norm, eps: float, generator: torch.Generator, seeds: list[int] | None = None
) -> torch.Tensor:
    """A uniform draw from the ball; from per-sample ``seeds`` when given, else from ``generator``."""
    if seeds is not None:
        return torch.cat(
            [random_start(clean[i : i + 1], norm, eps, torch.Generator().manual_seed(seed)) for i, seed in enumerate(seeds)]
        )
    if norm == "linf":
        delta = (torch.rand(clean.shape, generator=generator, dtype=clean.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
        direction = direction / direction.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        radius = torch.rand(clean.shape[0], generator=generator, dtype=clean.dtype).view(-1, 1, 1, 1) * eps
        delta = direction * radius
    return project(delta.to(clean.device), clean, norm, eps)


def ascent_step(grad: torch.Tensor, norm: Norm, step_size: float) -> torch.Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return step_size * grad / flat


class PGD(Attack):
    """``pgd``: L∞ or L2 PGD with random start.

    ``step_size`` defaults to 2.5·ε/steps (Madry et al.), written as a float or a fraction.
    """

    requires = "gradients"

    def __init__(self, *, steps: int = 20, step_size: FloatOrFraction | None = None, random_start: bool = True):
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if step_size is not None and step_size <= 0:
            raise ValueError("step_size must be positive")
        self.steps = steps
        self.step_size = step_size
        self.random_start = random_start

    def passes_per_sample(self) -> tuple[int, int]:
        return (self.steps + 1, self.steps)

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        clean = batch.pixels.detach()
        # No shortcut at eps = 0: the loop runs (step size 0, projection onto the clean pixels) so
        # that "eps = 0 reproduces the clean score" tests this code path, not a special case.
        step_size = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
        delta = (
            random_start(clean, threat.norm, threat.eps, generator, batch.seeds)
            if self.random_start
            else torch.zeros_like(clean)
        )
        best = clean + delta
        best_loss = torch.full((clean.shape[0],), -float("inf"), device=clean.device)
        losses: list[float] = []

        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = target.loss(clean + delta, batch.prompts, batch.targets, batch.kind)
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                best, best_loss = keep_best(best, best_loss, clean + delta, loss)
                losses.append(loss.mean().item())
                delta = project(delta + ascent_step(grad, threat.norm, step_size), clean, threat.norm, threat.eps)
            if progress is not None:
                progress.update(1)
        with torch.no_grad():
            final_loss = target.loss(clean + delta, batch.prompts, batch.targets, batch.kind)
            best, best_loss = keep_best(best, best_loss, clean + delta, final_loss)
            losses.append(final_loss.mean().item())
        return AttackResult(
            pixels=best.detach(), forward_passes=self.steps + 1, backward_passes=self.steps, losses=losses
        )


def keep_best(
    best: torch.Tensor, best_loss: torch.Tensor, candidate: torch.Tensor, loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    better = loss.detach() > best_loss
    best = torch.where(better.view(-1, 1, 1, 1), candidate.detach(), best)
    return best, torch.where(better, loss.detach(), best_loss)
