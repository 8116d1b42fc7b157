"""Auto-PGD (Croce & Hein, ICML 2020) on the victim's teacher-forced loss, with RobustVLM's settings.

APGD is PGD with a step-size schedule that needs no tuning: it starts with a large step (ε by
default, no random start), adds momentum (α = 0.75) and, at checkpoints (after 22% of the
iterations, then at intervals that shrink by 3% of the iterations to at least 6%), halves a
sample's step size and restarts it from its best point when

1. the objective increased in at most ρ = 75% of the steps since the last checkpoint, or
2. the step size was not halved at the last checkpoint and the best objective has not improved
   since then.

The state (step size, best point, best objective) is per sample, so a batch is B independent runs.
The returned pixels are each sample's best iterate. This follows the RobustVLM evaluation code
(chs20/RobustVLM ``vlm_eval/attacks/apgd.py``, from fra31/robust-finetuning) batched over samples,
with one deliberate difference: the first checkpoint's oscillation count compares the first step
with the starting point, where the reference reads an unfilled row of its loss buffer (zeros),
which counts the first step as an increase for any positive loss and never for a negative one.

Untargeted, APGD maximises the loss of ``batch.targets``; targeted (``target``), it minimises the
loss of the target text for every sample: internally it maximises ``-loss``, with the same
algorithm. :attr:`AttackResult.losses` holds the mean *victim loss* per step of the first run
(``steps + 1`` values: the start and every iterate), i.e. for a targeted attack the target's loss
that falls.

Restarts (AutoAttack's ``n_restarts``; its "rand" version keeps, per sample, the worst case over
several runs): after the first run, each of ``restarts`` further runs attacks only the samples not
yet broken, i.e. those whose output on the best example so far still scores above zero by
``batch.scorer`` (every sample when the batch has no scorer). A sample keeps a restart's example
when it scores lower, or scores the same with a higher objective (the first run's objective,
evaluated at the restart's example when the restart raised another). One run's optimum depends on
its start; on the offline world a random restart breaks questions the zero-start run leaves
standing, for JPEG and for the CoDefend pipeline (docs/results/attack-strength.md).

Objectives (``objectives``, :mod:`harness.objectives`): run ``r`` raises
``objectives[r % len(objectives)]``, cross-entropy (``ce``) or the DLR margin of the answer's
tokens (``dlr``), as AutoAttack follows APGD-CE with APGD-DLR on what the first left standing.
An objective's first run starts where the first run does; its later runs, and every restart of a
single objective, from a uniform random point of the ball. Cross-entropy stalls on answers the
victim is sure of; on the offline world's undefended victim a DLR run breaks questions that
cross-entropy runs from any start leave standing (docs/results/attack-strength.md).

Through a stochastic defense both judgements take the mean score over ``batch.judging_draws``
purification draws (:meth:`~harness.contracts.AttackBatch.judge`; the runner sets the protocol's
N). Judged on one draw, a sample that draw happened to break is never restarted, though the board
counts it robust when most of its N draws answer right; and a restart's example is kept or
dropped on one draw's luck. Judged on N, the restart goes to every sample some draw still
answers, and each sample keeps the example that fails more of its draws (on the offline world,
one question more of 40 against the purifier and DiffPure-DDIM: docs/results/attack-strength.md).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from attacks.pgd import ascent_step, keep_best, project_pixels, random_start
from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, Norm, ThreatModel
from harness.objectives import OBJECTIVES, LossFunction, Objective, objective_function

FIRST_CHECKPOINT = 0.22
"""The first checkpoint, as a fraction of the iterations (``n_iter_2`` in the reference)."""
MIN_CHECKPOINT_INTERVAL = 0.06
"""Checkpoint intervals never get shorter than this fraction of the iterations."""
CHECKPOINT_DECREMENT = 0.03
"""Each checkpoint interval is this fraction of the iterations shorter than the one before."""


class APGD(Attack):
    """``apgd``: Auto-PGD, L∞ or L2, on the teacher-forced loss (untargeted or targeted).

    ``steps`` iterations (RobustVLM: 100); the first step is ``step_size_factor``·ε (RobustVLM: 1;
    AutoAttack's classifier default is 2); ``alpha`` is the momentum weight of the gradient step;
    ``rho`` the share of steps that must increase the objective between checkpoints for the step
    size to stay. ``random_start`` draws the first run's start uniformly from the ball (per-sample
    seeds when the batch has them). ``restarts``: further runs from random starts on the samples
    not yet broken (module docstring). ``target``: make every sample say this text (minimise its
    loss). ``objectives``: what each run raises, in turn (run ``r`` raises
    ``objectives[r % len(objectives)]``; :mod:`harness.objectives`): ``ce``, the teacher-forced
    cross-entropy, or ``dlr``, the Difference of Logits Ratio of the answer's tokens (AutoAttack's
    APGD-CE then APGD-DLR). An objective's first run starts where the first run does (the clean
    image, or a random point with ``random_start``); its later runs start from random points.
    Costs ``steps + 1`` forward and ``steps`` backward passes per sample and run, one more forward
    pass per restart whose objective is not the first run's (its example is compared with the
    best so far on the first run's objective), and ``batch.judging_draws`` generations per sample
    and run when it restarts.
    """

    requires = "gradients"
    defining_params = ("target",)

    def __init__(
        self,
        *,
        steps: int = 100,
        step_size_factor: float = 1.0,
        alpha: float = 0.75,
        rho: float = 0.75,
        random_start: bool = False,
        restarts: int = 0,
        target: str | None = None,
        objectives: Sequence[Objective] = ("ce",),
    ):
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if step_size_factor <= 0:
            raise ValueError("step_size_factor must be positive")
        if not 0 < alpha <= 1:
            raise ValueError("alpha (momentum) must be in (0, 1]")
        if not 0 < rho <= 1:
            raise ValueError("rho must be in (0, 1]")
        if restarts < 0:
            raise ValueError("restarts must be 0 or more (further runs from random starts)")
        if target is not None and not target.strip():
            raise ValueError("target must be a non-empty text (or omitted for an untargeted attack)")
        if isinstance(objectives, str):
            objectives = (objectives,)
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if not objectives or unknown:
            raise ValueError(f"objectives must list one or more of {', '.join(OBJECTIVES)}; got {list(objectives)!r}")
        self.steps = steps
        self.step_size_factor = step_size_factor
        self.alpha = alpha
        self.rho = rho
        self.random_start = random_start
        self.restarts = restarts
        self.target_text = target
        self.objectives: tuple[str, ...] = tuple(objectives)

    def _run_objective(self, run: int) -> str:
        return self.objectives[run % len(self.objectives)]

    @property
    def _sign(self) -> float:
        """The objective is sign·loss: a targeted attack lowers its target's loss."""
        return -1.0 if self.target_text is not None else 1.0

    def passes_per_sample(self) -> tuple[int, int]:
        # the last iterate's gradient is never used: one backward pass is saved
        runs = 1 + self.restarts
        comparisons = sum(self._run_objective(r) != self.objectives[0] for r in range(1, runs))
        return (runs * (self.steps + 1) + comparisons, runs * self.steps)

    def judgements_per_sample(self) -> int:
        # with restarts, every run ends in a judgement of which samples are broken (at most every
        # sample restarts)
        return 1 + self.restarts if self.restarts else 0

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        raised = {o: objective_function(target, o) for o in map(self._run_objective, range(1 + self.restarts))}
        unavailable = [o for o, function in raised.items() if function is None]
        if unavailable:
            warnings.warn(f"apgd: the attack target {type(target).__name__} cannot give the {', '.join(map(repr, unavailable))} "
                          "objective (its victim does not expose its logits: harness.contracts.TargetLogitsVictim); "
                          "those runs raise cross-entropy instead, a weaker attack (the board flags it)", stacklevel=2)
        functions: dict[str, LossFunction] = {o: function or target.loss for o, function in raised.items()}
        first = self.objectives[0]
        best, best_objective, losses = self._run(functions[first], batch, threat, generator, progress,
                                                 self.random_start, batch.seeds)
        result = AttackResult(pixels=best, forward_passes=self.steps + 1, backward_passes=self.steps, losses=losses,
                              objectives_unavailable=unavailable)
        if not self.restarts:
            return result
        n = best.shape[0]
        scores = batch.judge(target, best, list(range(n)))
        result.forward_passes += batch.judging_draws
        result.queries += n * batch.judging_draws
        for restart in range(1, self.restarts + 1):
            active = [i for i in range(n) if scores is None or scores[i] > 0]
            if not active:
                break
            sub = _sub_batch(batch, active, restart)
            objective_name = self._run_objective(restart)
            # an objective's first run starts where the first run did; its repeats from random points
            repeat = self.objectives.index(objective_name) != restart
            pixels, objective, _ = self._run(functions[objective_name], sub, threat, generator, progress,
                                             self.random_start or repeat, sub.seeds)
            if objective_name != first:
                # examples are compared on the first run's objective
                with torch.no_grad():
                    objective = self._sign * functions[first](pixels, sub.prompts, self._texts(sub), sub.kind)
                result.forward_passes += 1
            new_scores = batch.judge(target, pixels, active)
            for j, i in enumerate(active):
                # the task score decides; the objective breaks ties (and decides without a scorer)
                old = (-scores[i] if scores is not None else 0.0, float(best_objective[i]))
                new = (-new_scores[j] if new_scores is not None else 0.0, float(objective[j]))
                if new > old:
                    best[i], best_objective[i] = pixels[j], objective[j]
                    if scores is not None and new_scores is not None:
                        scores[i] = new_scores[j]
            result.forward_passes += self.steps + 1 + batch.judging_draws
            result.backward_passes += self.steps
            result.queries += len(active) * batch.judging_draws
        result.pixels = best
        return result

    def _texts(self, batch: AttackBatch) -> list[str]:
        return [self.target_text] * len(batch.prompts) if self.target_text is not None else list(batch.targets)

    def _run(self, loss_function: LossFunction, batch: AttackBatch, threat: ThreatModel,
             generator: torch.Generator, progress: Any, random: bool, seeds: list[int] | None
             ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """One APGD run: each sample's best iterate, its objective, and the mean loss per step."""
        clean = batch.pixels.detach()
        # No shortcut at eps = 0: the step size (factor·eps) is 0 and every iterate is projected onto
        # the clean pixels, so the real algorithm runs and returns them exactly.
        norm, eps, n = threat.norm, threat.eps, clean.shape[0]
        texts, sign = self._texts(batch), self._sign

        def evaluate(x: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Victim loss [B] at ``x`` and, if asked, the gradient of the objective sign·loss."""
            if not with_grad:
                with torch.no_grad():
                    return loss_function(x, batch.prompts, texts, batch.kind).detach(), None
            x = x.detach().requires_grad_(True)
            loss = loss_function(x, batch.prompts, texts, batch.kind)
            (grad,) = torch.autograd.grad((sign * loss).sum(), x)
            return loss.detach(), grad.detach()

        steps = self.steps
        interval = max(int(FIRST_CHECKPOINT * steps), 1)
        min_interval = max(int(MIN_CHECKPOINT_INTERVAL * steps), 1)
        decrement = max(int(CHECKPOINT_DECREMENT * steps), 1)
        step_size = torch.full((n, 1, 1, 1), self.step_size_factor * eps, dtype=clean.dtype, device=clean.device)

        delta = random_start(clean, norm, eps, generator, seeds) if random else torch.zeros_like(clean)
        x_adv = project_pixels(clean + delta, clean, norm, eps)
        loss, grad = evaluate(x_adv, with_grad=True)
        assert grad is not None
        objective = sign * loss
        losses = [loss.mean().item()]
        best, best_objective = x_adv.clone(), objective.clone()
        grad_best = grad.clone()
        # objective_steps[j] is the objective of iterate j (0: the start)
        objective_steps = torch.empty((steps + 1, n), dtype=objective.dtype, device=objective.device)
        objective_steps[0] = objective
        best_at_last_check = best_objective.clone()
        reduced_at_last_check = torch.ones(n, dtype=torch.bool, device=clean.device)
        since_check = 0
        x_previous = x_adv.clone()

        for i in range(steps):
            with torch.no_grad():
                momentum = x_adv - x_previous
                x_previous = x_adv
                a = self.alpha if i > 0 else 1.0
                z = project_pixels(x_adv + ascent_step(grad, norm, step_size), clean, norm, eps)
                x_adv = project_pixels(x_adv + (z - x_adv) * a + momentum * (1 - a), clean, norm, eps)

            loss, new_grad = evaluate(x_adv, with_grad=i < steps - 1)
            if new_grad is not None:
                grad = new_grad
            with torch.no_grad():
                objective = sign * loss
                losses.append(loss.mean().item())
                objective_steps[i + 1] = objective
                improved = objective > best_objective
                grad_best = torch.where(improved.view(-1, 1, 1, 1), grad, grad_best)
                best, best_objective = keep_best(best, best_objective, x_adv, objective)

                since_check += 1
                if since_check == interval:
                    window = objective_steps[i + 1 - interval : i + 2]  # interval comparisons
                    increases = (window[1:] > window[:-1]).sum(dim=0)
                    oscillating = increases <= interval * self.rho
                    stalled = ~reduced_at_last_check & (best_at_last_check >= best_objective)
                    halve = oscillating | stalled
                    reduced_at_last_check = halve
                    best_at_last_check = best_objective.clone()
                    if halve.any():
                        step_size = torch.where(halve.view(-1, 1, 1, 1), step_size / 2, step_size)
                        x_adv = torch.where(halve.view(-1, 1, 1, 1), best, x_adv)
                        grad = torch.where(halve.view(-1, 1, 1, 1), grad_best, grad)
                    since_check = 0
                    interval = max(interval - decrement, min_interval)
            if progress is not None:
                progress.update(1)

        return best.detach(), best_objective, losses


def _sub_batch(batch: AttackBatch, active: list[int], restart: int) -> AttackBatch:
    """The samples ``active`` of ``batch``, with seeds of their own for restart ``restart``."""
    return AttackBatch(
        batch.pixels[active], [batch.prompts[i] for i in active], [batch.targets[i] for i in active], batch.kind,
        seeds=[batch.seeds[i] + restart for i in active] if batch.seeds else None,
        references=[batch.references[i] for i in active] if batch.references else None,
        scorer=None, judging_draws=batch.judging_draws,
    )
