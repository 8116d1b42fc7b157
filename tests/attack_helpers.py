"""Helpers shared by the attack tests: a prepared batch of real samples, a progress counter, and
the checks every attack's output must pass."""

from __future__ import annotations

import torch

from harness.contracts import AttackBatch, ThreatModel


class Batch:
    """Samples prepared once for the victim, cut into :class:`AttackBatch` es of any size."""

    def __init__(self, victim, task, samples):
        self.samples = samples
        self.pixels = victim.prepare([s.image for s in samples]).to(victim.device)
        self.prompts = [s.prompt for s in samples]
        self.targets = [task.attack_targets(s)[0] for s in samples]

    def attack_batch(self, n: int | None = None, seeds: list[int] | None = None) -> AttackBatch:
        n = n or len(self.samples)
        return AttackBatch(self.pixels[:n], self.prompts[:n], self.targets[:n], "vqa", seeds=seeds)


class Progress:
    """A tqdm stand-in that counts the steps an attack reports."""

    def __init__(self):
        self.steps = 0

    def update(self, n: int = 1) -> None:
        self.steps += n


def run_attack(attack, target, batch: AttackBatch, threat: ThreatModel, seed: int = 0, progress=None):
    return attack.perturb(target, batch, threat, torch.Generator().manual_seed(seed), progress=progress)


def victim_loss(victim, batch: Batch, pixels: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
    n = pixels.shape[0]
    with torch.no_grad():
        return victim.loss(pixels, batch.prompts[:n], texts or batch.targets[:n], "vqa")


def check_in_ball(adv: torch.Tensor, clean: torch.Tensor, threat: ThreatModel, *, uses_budget: bool = True,
                  linf_tolerance: float = 1e-6) -> None:
    """In [0,1], inside the ball (per sample), and, with ``uses_budget``, not the clean image."""
    assert adv.shape == clean.shape and adv.dtype == clean.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - clean).flatten(1)
    if threat.norm == "linf":
        size, tolerance = delta.abs().max(dim=1).values, linf_tolerance
    else:
        size, tolerance = delta.norm(dim=1), 1e-5
    assert (size <= threat.eps + tolerance).all(), size
    if uses_budget:
        assert size.max() >= 0.5 * threat.eps
