"""``none``: the clean condition, so that clean scores flow through the same runner path."""

from __future__ import annotations

from typing import Any

import torch

from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, ThreatModel


class NoAttack(Attack):
    requires = "none"
    uses_threat = False

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        return AttackResult(pixels=batch.pixels.detach().clone())
