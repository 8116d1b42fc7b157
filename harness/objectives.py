"""What an attack raises on a victim's teacher-forced output: cross-entropy, or the DLR margin.

Cross-entropy of the reference answer (RobustVLM's objective, :meth:`Victim.loss`) stalls where
the victim is confident: once the answer's probability is near 1 its rise is tiny, and the ascent
direction is dominated by the tokens that already moved. AutoAttack (Croce & Hein, ICML 2020)
pairs APGD on cross-entropy with APGD on the *Difference of Logits Ratio*,
``(max_{j≠y} z_j − z_y) / (z_π1 − z_π3)``: the margin by which the best other token beats the
answer's, scaled by the spread of the top logits, so it is invariant to the logits' scale and
still moves where the softmax has saturated. On the offline world's undefended victim (40
questions, APGD-100), a DLR run breaks questions the cross-entropy runs never do, restarts
included (docs/results/attack-strength.md).

Here DLR is taken per target token and averaged over the answer's tokens, its end-of-text token
left out when it has others (the end token's margin is the same kind of decision for every
answer: whether to stop, not what to say). It is positive at a position exactly when greedy
decoding, fed the reference so far, would emit another token there.

:func:`objective_function` gives an attack the loss function for an objective on any target: a
bare victim (oblivious attacks) that exposes its logits
(:class:`~harness.contracts.TargetLogitsVictim`), or a target that raises objectives itself
(:class:`~harness.contracts.MultiObjectiveTarget`: the defended model of adaptive attacks, EOT
and gradient route included). None when it cannot.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence, get_args

import torch
import torch.nn.functional as F

from harness.contracts import AttackTarget, MultiObjectiveTarget, TargetLogitsVictim, TaskKind

Objective = Literal["ce", "dlr"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)

LossFunction = Callable[[torch.Tensor, Sequence[str], Sequence[str], TaskKind], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over the labelled positions (what ``Victim.loss`` returns)."""
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    return token_loss.sum(dim=1) / (labels != -100).sum(dim=1).clamp(min=1)


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean DLR margin over the answer's tokens (the module docstring)."""
    logits = logits.float()
    labelled = labels != -100
    # leave out each row's last labelled position (end of text) when the row labels more than one
    last = labelled.cumsum(dim=1) == labelled.sum(dim=1, keepdim=True)
    answer = labelled & ~(last & (labelled.sum(dim=1, keepdim=True) > 1))
    safe = labels.clamp(min=0).unsqueeze(-1)
    true = logits.gather(2, safe).squeeze(-1)
    best_other = logits.scatter(2, safe, float("-inf")).max(dim=2).values
    top = logits.topk(min(3, logits.shape[-1]), dim=2).values
    spread = top[..., 0] - top[..., -1]
    margin = (best_other - true) / (spread + 1e-12)
    return (margin * answer).sum(dim=1) / answer.sum(dim=1).clamp(min=1)


def from_logits(objective: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The objective ``objective`` of teacher-forced ``logits`` (``TargetLogitsVictim``'s pair)."""
    if objective == "ce":
        return cross_entropy(logits, labels)
    if objective == "dlr":
        return dlr(logits, labels)
    raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def victim_objectives(victim: object) -> tuple[str, ...]:
    """The objectives an attack can raise on ``victim``: every one when it exposes its logits,
    else cross-entropy (its ``loss``) alone."""
    return OBJECTIVES if isinstance(victim, TargetLogitsVictim) else ("ce",)


def victim_objective(victim: Any, objective: str, pixels: torch.Tensor, prompts: Sequence[str],
                     targets: Sequence[str], kind: TaskKind, **kwargs: Any) -> torch.Tensor:
    """``objective`` of ``victim``'s teacher-forced output, per sample (``kwargs``, such as a
    ``soft_prompt``, go to the victim)."""
    if objective == "ce":
        return victim.loss(pixels, prompts, targets, kind, **kwargs)
    if objective not in victim_objectives(victim):
        raise ValueError(f"{type(victim).__name__} does not expose its logits (TargetLogitsVictim): "
                         f"only cross-entropy can be attacked through it, not {objective!r}")
    return from_logits(objective, *victim.target_logits(pixels, prompts, targets, kind, **kwargs))


def objective_function(target: AttackTarget, objective: str) -> LossFunction | None:
    """``target``'s loss function for ``objective`` (per sample, raised by the attack), or None
    when ``target`` cannot give it (a victim that does not expose its logits)."""
    if objective == "ce":
        return target.loss
    if isinstance(target, MultiObjectiveTarget):
        if objective not in target.objectives():
            return None
        return lambda pixels, prompts, targets, kind: target.objective_loss(objective, pixels, prompts, targets, kind)
    if objective in victim_objectives(target):
        return lambda pixels, prompts, targets, kind: victim_objective(target, objective, pixels, prompts, targets, kind)
    return None
