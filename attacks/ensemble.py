"""``ensemble``: the per-sample worst case over member attacks and over a sample's references.

RobustVLM's protocol: start from the clean image; run each member against each of the top
``references`` reference texts (the most frequent VQA answers; the captions); after every run,
keep for each sample the adversarial image with the lowest task score so far; stop attacking a
sample once its score falls below ``stop_below``. Members are any registered attacks, targeted
ones included (RobustVLM's VQA ensemble adds targeted runs to "maybe" and "word").
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from attacks.pgd import project_pixels
from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, ThreatModel
from harness.plugins import PluginsUser, get_plugins
from harness.registry import RegistryError


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Ensemble(PluginsUser, Attack):
    """Per-sample worst case over ``members`` x top-``references`` targets.

    A :class:`~harness.contracts.CompositeAttack`: :meth:`member_attacks` lists its members, so a
    row counts as seen in training when any member does.
    """

    requires = "gradients"

    def __init__(self, *, members: list[Member], references: int = 1, stop_below: float | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member attack")
        if references < 1:
            raise ValueError("references must be at least 1")
        if any(member.name == "ensemble" for member in members):
            raise ValueError("an ensemble cannot contain another ensemble")
        self.member_specs = [Member(name=m.name, params=dict(m.params)) for m in members]
        self.members: list[tuple[str, Attack]] = []
        self.member_params: list[dict[str, Any]] = []
        """Each member's parameters as the suite wrote them (same order as ``members``)."""
        self.references = references
        self.stop_below = stop_below

    def bind_plugins(self, plugins: Any) -> None:
        """Create the members from the set this ensemble was created from (its registry holds
        their factories)."""
        super().bind_plugins(plugins)
        self.members, self.member_params = [], []
        for j, member in enumerate(self.member_specs):
            try:
                attack = plugins.attacks.create(member.name, member.params)
            except RegistryError as exc:  # a suite error about the member, not the ensemble's own name
                raise ValueError(f"members[{j}]: {exc}") from None
            if not attack.uses_threat:
                raise ValueError(f"member '{member.name}' ignores the threat model; an ensemble keeps every member inside one ball")
            self.members.append((member.name, attack))
            self.member_params.append(dict(member.params))
        self.requires = "gradients"
        if any(attack.requires == "queries" for _, attack in self.members):
            self.requires = "queries"
        if all(attack.requires == "transfer" for _, attack in self.members):
            self.requires = "transfer"

    def _members(self) -> list[tuple[str, Attack]]:
        if not self.members:  # constructed directly, outside a registry: the process-wide set
            self.bind_plugins(self._plugins or get_plugins())
        return self.members

    def member_attacks(self) -> list[tuple[str, Mapping[str, Any], Attack]]:
        """``(plugin name, params as written, instance)`` of each member, in order."""
        return [(name, params, attack) for (name, attack), params in zip(self._members(), self.member_params)]

    def passes_per_sample(self) -> tuple[int, int]:
        forward = backward = 0
        for _, attack in self._members():
            f, b = attack.passes_per_sample()
            runs = 1 if attack.target_text else self.references
            forward, backward = forward + runs * f, backward + runs * b
        return forward, backward

    def judgements_per_sample(self) -> int:
        # the clean images once, then every member's run: its own judgements and the ensemble's
        judgements = 1
        for _, attack in self._members():
            runs = 1 if attack.target_text else self.references
            judgements += runs * (attack.judgements_per_sample() + 1)
        return judgements

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        if batch.scorer is None:
            raise ValueError("the ensemble needs batch.scorer to keep the per-sample worst case")
        references = batch.references or [[t] for t in batch.targets]
        clean = batch.pixels.detach()
        n = clean.shape[0]
        best = clean.clone()
        best_score = torch.tensor(batch.judge(target, clean, list(range(n))))
        result = AttackResult(pixels=best, forward_passes=batch.judging_draws, queries=n * batch.judging_draws)
        # like with like: each run's own first and last loss, weighted by the samples it attacked
        starts = ends = weight = 0.0

        for _, attack in self._members():
            # A targeted member aims at its own text: one run covers every reference.
            runs = 1 if attack.target_text else self.references
            for r in range(runs):
                active = [
                    i for i in range(n)
                    if r < len(references[i]) and (self.stop_below is None or best_score[i] >= self.stop_below)
                ]
                if not active:
                    continue
                sub = AttackBatch(
                    clean[active],
                    [batch.prompts[i] for i in active],
                    [references[i][r] for i in active],
                    batch.kind,
                    seeds=[batch.seeds[i] + r for i in active] if batch.seeds else None,
                    references=[references[i] for i in active],
                    scorer=lambda outputs, idx, active=active: batch.scorer(outputs, [active[j] for j in idx]),
                    judging_draws=batch.judging_draws,
                )
                run = attack.perturb(target, sub, threat, generator, progress)
                scores = torch.tensor(sub.judge(target, run.pixels, range(len(active))))
                for j, i in enumerate(active):
                    if scores[j] < best_score[i]:
                        best_score[i] = scores[j]
                        best[i] = run.pixels[j]
                result.forward_passes += run.forward_passes + batch.judging_draws
                result.backward_passes += run.backward_passes
                result.queries += run.queries + len(active) * batch.judging_draws
                result.losses.extend(run.losses[-1:])
                result.objectives_unavailable += [o for o in run.objectives_unavailable
                                                  if o not in result.objectives_unavailable]
                if run.losses:
                    starts, ends = starts + run.losses[0] * len(active), ends + run.losses[-1] * len(active)
                    weight += len(active)
        result.pixels = project_pixels(best, clean, threat.norm, threat.eps).detach()
        if weight:
            result.loss_rise = (starts / weight, ends / weight)
        return result
