"""Is the standard adaptive attack the strongest we have? Stronger variants against one defense.

The board ranks defenses on the standard adaptive attack (harness/protocol.py). An attacker who
knows the harness could try harder; this benchmark runs the standard attack and such variants
through one defense, on the first ``--n`` test samples of the offline world (VQA questions or, with
``--task captions``, images to caption), and judges every variant's examples on the same
``--draws`` purification draws (the board's N-draw rule: a sample scores its worst draw). Variants:

- ``standard``: the protocol's attack (APGD on the text loss, EOT averaged over draws);
- ``softmax-draws``: the loss over EOT draws aggregated by log-mean-exp (temperature 0.1)
  instead of the mean: it chases the draws where the attack already works, which is what the
  N-draw rule rewards (DiffHammer's argument for selective attacks);
- ``targeted``: APGD *towards* each question's most likely wrong answer (the task's other answers,
  ranked by the victim's loss on the purified clean image), the attack of RobustVLM's targeted
  runs and AutoAttack's APGD-T;
- ``restart``: the standard attack from a random start in the ball (another seed);
- ``all-references``: the untargeted loss summed over every distinct reference answer, weighted
  by how many annotators gave it, so that the attack cannot settle on an answer that still earns
  partial VQA credit;
- ``softmin-references``: the soft minimum of the references' losses, -log Σ exp(-loss): it
  rises only when every acceptable answer becomes unlikely;
- ``bpda``: the forward pass through the real defense, the backward pass through the identity
  (for a differentiable defense: does its exact gradient mask anything BPDA would find?);
- ``step2``: APGD's first step at 2ε (AutoAttack's classifier default) instead of RobustVLM's ε;
- ``lowfreq``: APGD on a ``--lowfreq-size`` square perturbation, upsampled bilinearly to the
  image (the same L∞ ball): purification by noising and denoising washes out high frequencies
  first, so a low-frequency perturbation may survive it (DiffBreak's low-frequency attack);
- ``one-draw-judged`` (with ``--restarts``): the restarts decide which samples are still
  unbroken, and which run's example each sample keeps, by the task score of *one* purification
  draw, as the protocol did before it judged over its N draws (every other variant judges, like
  the protocol, by the mean score over ``--judging-draws`` draws, by default ``--draws``);
- ``iterate-judged``: APGD keeps each sample's iterate of highest EOT loss, a noisy estimate (the
  winner's curse); this variant also judges the ``--candidates`` iterates of highest loss of the
  first run over ``--judging-draws`` purification draws, and each sample keeps whichever of
  them and the attack's own result fails the most draws;
- ``grafted``: DiffHammer's gradient grafting (the suite option ``adaptive: {grafting: true}``):
  the EOT draws' gradients at the purified images, averaged, go back through one draw's
  purification (one backward pass through the purifier per step instead of one per draw);
- ``prompt-detached`` (a defense with a per-sample prompt: ``codefend``): the prefix generator's
  prompt follows the purified image forward, but the gradient reaches the pixels through the
  image path only (does the generator's gradient mask the image's?).

``union`` is the per-question worst over all of them (the board's robust column works the same
way over its conditions). Flags change the budget (``--steps``, ``--eot``), attack through a
surrogate process (``--surrogate-steps``), or weaken JPEG's BPDA route to the identity
(``--bpda-identity``) to compare routes. Results: docs/results/attack-strength.md.

    python benchmarks/attack_strength.py --defense codefend-purifier --params '{"t_star": 0.05, "steps": 2}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from typing import Sequence

import torch

from harness.adaptive import DefendedTarget, GradientRoute, gradient_route, soft_prompt_kwargs
from harness.contracts import AttackBatch, ConditionalPromptDefense, TaskKind, ThreatModel
from harness.plugins import get_plugins

VARIANTS = ("standard", "softmax-draws", "targeted", "restart", "all-references", "softmin-references", "bpda", "step2",
            "grafted", "lowfreq", "one-draw-judged", "iterate-judged", "prompt-detached")


class SoftmaxOverDraws(DefendedTarget):
    """EOT aggregated by log-mean-exp over draws (temperature ``tau``) instead of the mean."""

    tau = 0.1

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        prompts = self.defense.rewrite(prompts)
        k, n = self.route.eot, pixels.shape[0]
        purified = self.differentiated.purify(pixels.repeat(k, 1, 1, 1), self.generator)
        tiled = list(prompts) * k
        losses = self.victim.loss(purified, tiled, list(targets) * k, kind,
                                  **soft_prompt_kwargs(self.defense, purified, tiled)).view(k, n)
        return self.tau * (torch.logsumexp(losses / self.tau, dim=0) - math.log(k))


class TowardWrongAnswers:
    """An attack target whose loss is minus the loss of each question's chosen wrong answer: an
    untargeted attack on it is a targeted attack towards those answers."""

    def __init__(self, inner: DefendedTarget, wrong: list[str]):
        self.inner, self.wrong = inner, wrong

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        return -self.inner.loss(pixels, prompts, self.wrong, kind)

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        return self.inner.generate(pixels, prompts, kind)


class AllReferences:
    """An attack target whose loss combines the losses of every distinct reference answer: their
    annotator-weighted mean, or (``softmin``) a soft minimum, -log Σ exp(-loss), which the attack
    raises only by pushing down the acceptable answer the victim finds likeliest."""

    def __init__(self, inner: DefendedTarget, answers: list[list[str]], weights: list[list[float]], softmin: bool = False):
        self.inner, self.answers, self.weights, self.softmin = inner, answers, weights, softmin

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        width = max(len(a) for a in self.answers)
        table = pixels.new_full((width, pixels.shape[0]), float("inf") if self.softmin else 0.0)
        for r in range(width):
            rows = [i for i, a in enumerate(self.answers) if r < len(a)]
            losses = self.inner.loss(pixels[rows], [prompts[i] for i in rows], [self.answers[i][r] for i in rows], kind)
            weight = torch.tensor([1.0 if self.softmin else self.weights[i][r] for i in rows], dtype=losses.dtype)
            table = table.index_put((torch.full((len(rows),), r), torch.tensor(rows)), weight * losses)
        if self.softmin:
            return -torch.logsumexp(-table, dim=0)
        return table.sum(dim=0)

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        return self.inner.generate(pixels, prompts, kind)


class LowFrequency:
    """An attack target over a low-resolution perturbation: APGD moves ``u`` (size × size, centred
    on 0.5, so the ball around 0.5 stays inside [0,1]) and the image is the clean one plus the
    bilinear upsampling of ``u - 0.5``, clipped to [0,1]. Upsampling never exceeds the largest
    coefficient, so the image stays in the same L∞ ball. Purifiers that add noise and denoise
    wash out high frequencies first (DiffBreak's low-frequency attack)."""

    def __init__(self, inner: DefendedTarget, clean: torch.Tensor):
        self.inner, self.clean = inner, clean

    def image(self, u: torch.Tensor) -> torch.Tensor:
        if u.shape[0] != self.clean.shape[0]:
            raise SystemExit("the lowfreq variant runs without restarts (its target cannot tell a sub-batch's images)")
        delta = torch.nn.functional.interpolate(u - 0.5, size=self.clean.shape[-2:], mode="bilinear", align_corners=True)
        return (self.clean + delta).clamp(0, 1)

    def loss(self, u: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        return self.inner.loss(self.image(u), prompts, targets, kind)

    def generate(self, u: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        return self.inner.generate(self.image(u), prompts, kind)


class RecordingIterates:
    """Passes through to ``inner`` and records every full-batch point whose gradient the attack
    asks for (APGD's iterates of its first run) with its loss."""

    def __init__(self, inner: DefendedTarget, n: int):
        self.inner, self.n = inner, n
        self.iterates: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind) -> torch.Tensor:
        loss = self.inner.loss(pixels, prompts, targets, kind)
        if pixels.shape[0] == self.n and torch.is_grad_enabled():
            self.iterates.append(pixels.detach().clone())
            self.losses.append(loss.detach().clone())
        return loss

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]:
        return self.inner.generate(pixels, prompts, kind)

    def reselect(self, batch: AttackBatch, result: torch.Tensor, candidates: int) -> torch.Tensor:
        """Each sample's example among ``result`` and its ``candidates`` highest-loss iterates:
        the lowest mean score over ``batch.judging_draws`` draws (ties keep ``result``)."""
        losses, iterates = torch.stack(self.losses), torch.stack(self.iterates)  # [T, n], [T, n, ...]
        order = losses.argsort(dim=0, descending=True)[:candidates]  # [k, n]
        chosen = result.clone()
        indices = list(range(self.n))
        best = torch.tensor(batch.judge(self, result, indices))
        for rank in range(order.shape[0]):
            candidate = iterates[order[rank], torch.arange(self.n)]
            scores = torch.tensor(batch.judge(self, candidate, indices))
            better = scores < best
            chosen[better], best = candidate[better], torch.where(better, scores, best)
        return chosen


class PromptDetached(DefendedTarget):
    """The per-sample prompt follows the purified image forward, but no gradient flows through it:
    does the prefix generator's gradient mask the image path's (Athalye et al.: attack the parts
    separately when the whole is hard to optimise)?"""

    def objective_loss(self, objective: str, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str],
                       kind: TaskKind) -> torch.Tensor:
        defense = self.defense
        if not isinstance(defense, ConditionalPromptDefense):
            raise SystemExit("the prompt-detached variant needs a defense with a per-sample prompt (codefend)")
        make = type(defense).soft_prompts

        def detached(pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor | None:
            soft = make(defense, pixels, prompts)
            return None if soft is None else soft.detach()

        defense.soft_prompts = detached  # type: ignore[method-assign]
        try:
            return super().objective_loss(objective, pixels, prompts, targets, kind)
        finally:
            del defense.soft_prompts


class IdentityBackward(DefendedTarget):
    """BPDA through the identity even for a differentiable defense."""

    def _purify(self, pixels: torch.Tensor) -> torch.Tensor:
        purified = self.defense.purify(pixels.detach(), self.generator)
        return pixels + (purified - pixels).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", default="codefend-purifier")
    parser.add_argument("--params", default="{}", help="the defense's parameters (JSON)")
    parser.add_argument("--task", choices=("vqa", "captions"), default="vqa")
    parser.add_argument("--n", type=int, default=40, help="test samples (the first of the seeded subset of 100)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=0,
                        help="APGD restarts of every variant (the task score picks each sample's worst run)")
    parser.add_argument("--objectives", default="ce",
                        help="APGD's objectives, one per run in turn (comma-separated: ce, dlr; harness/objectives.py)")
    parser.add_argument("--eot", type=int, default=4)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--surrogate-steps", type=int, default=None)
    parser.add_argument("--bpda-identity", action="store_true", help="BPDA through the identity (the weaker route)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lowfreq-size", type=int, default=8, help="the lowfreq variant's perturbation resolution")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=4, help="the iterate-judged variant's iterates judged")
    parser.add_argument("--judging-draws", type=int, default=None,
                        help="draws the restarts judge a sample over (default: --draws, as the protocol does)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    plugins = get_plugins()
    victim = plugins.victims.create("shapes-vlm", {})
    victim.load()
    task = plugins.tasks.create("vqav2" if args.task == "vqa" else "coco_captions", {"data": "shapes"})
    kind: TaskKind = "vqa" if args.task == "vqa" else "caption"
    samples = task.samples("test", 100, 0)[: args.n]
    defense = plugins.defenses.create(args.defense, json.loads(args.params))
    defense.bind(victim)
    if args.bpda_identity:
        defense.bpda = "identity"
    route = gradient_route(defense, args.eot, args.surrogate_steps)
    pixels = victim.prepare([s.image for s in samples])
    prompts = [s.prompt for s in samples]
    references = [task.attack_targets(s) for s in samples]
    threat = ThreatModel(name="linf", norm="linf", eps=args.eps)

    def defended(cls: type[DefendedTarget] = DefendedTarget, through: GradientRoute = route) -> DefendedTarget:
        return cls(victim, defense, through, torch.Generator().manual_seed(0), surrogate_steps=args.surrogate_steps)

    def judged(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first draw, worst over draws) per question, on draws shared by every variant."""
        scores = []
        for j in range(args.draws if defense.stochastic else 1):
            with torch.no_grad():
                purified = defense.purify(x, torch.Generator().manual_seed(10_000 + j))
                asked = defense.rewrite(prompts)
                outputs = victim.generate(purified, asked, kind, **soft_prompt_kwargs(defense, purified, asked))
            scores.append([s[task.metric] for s in task.score(outputs, samples)])
        table = torch.tensor(scores)
        return table[0], table.min(dim=0).values

    def wrong_answers() -> list[str]:
        vocabulary = sorted({r for refs in references for r in refs})
        chosen = []
        with torch.no_grad():
            purified = defense.purify(pixels, torch.Generator().manual_seed(1))
            for i, refs in enumerate(references):
                candidates = [a for a in vocabulary if a not in refs]
                image = purified[i : i + 1].expand(len(candidates), -1, -1, -1)
                losses = victim.loss(image, [prompts[i]] * len(candidates), candidates, kind)
                chosen.append(candidates[int(losses.argmin())])
        return chosen

    clean_first, clean_all = judged(pixels)
    print(f"{args.defense} {args.params} route={route.method} eot={route.eot}"
          f"{' ' + route.surrogate if route.surrogate else ''} | {args.n} {args.task} samples ({task.metric}), "
          f"APGD-{args.steps}, {args.draws} draws")
    print(f"{'clean':>14}: single {clean_first.mean():.4f}  N-draw {clean_all.mean():.4f}")
    worst = None
    for variant in variants:
        started = time.perf_counter()
        params: dict = {"steps": args.steps, "restarts": args.restarts, "objectives": args.objectives.split(",")}
        target: object = defended()
        if variant == "softmax-draws":
            target = defended(SoftmaxOverDraws)
        elif variant == "targeted":
            target = TowardWrongAnswers(defended(), wrong_answers())
        elif variant == "restart":
            params["random_start"] = True
        elif variant == "all-references":
            counts = [Counter(s.references) if kind == "vqa" else Counter(set(s.references)) for s in samples]
            target = AllReferences(defended(), references,
                                   [[c[a] / sum(c.values()) for a in refs] for c, refs in zip(counts, references)])
        elif variant == "softmin-references":
            target = AllReferences(defended(), references, [[1.0] * len(refs) for refs in references], softmin=True)
        elif variant == "bpda":
            target = defended(IdentityBackward)
        elif variant == "step2":
            params["step_size_factor"] = 2.0
        elif variant == "lowfreq":
            target = LowFrequency(defended(), pixels)
        elif variant == "grafted":
            target = defended(through=dataclasses.replace(route, grafted=route.eot > 1))
        elif variant == "iterate-judged":
            target = RecordingIterates(defended(), len(samples))
        elif variant == "prompt-detached":
            target = defended(PromptDetached)
        attack = plugins.attacks.create("apgd", params)
        judging_draws = (1 if variant == "one-draw-judged" or not defense.stochastic
                         else args.judging_draws or args.draws)
        seeds = list(range(len(samples))) if variant != "restart" else [1000 + i for i in range(len(samples))]
        start = (torch.full((len(samples), 3, args.lowfreq_size, args.lowfreq_size), 0.5) if variant == "lowfreq"
                 else pixels)
        batch = AttackBatch(start, prompts, [r[0] for r in references], kind, seeds=seeds, references=references,
                            scorer=lambda outputs, idx: [s[task.metric] for s in task.score(list(outputs), [samples[i] for i in idx])],
                            judging_draws=judging_draws)
        result = attack.perturb(target, batch, threat, torch.Generator().manual_seed(seeds[0]))
        if variant == "lowfreq":
            assert isinstance(target, LowFrequency)
            result.pixels = target.image(result.pixels).detach()
        if variant == "iterate-judged":
            assert isinstance(target, RecordingIterates)
            result.pixels = target.reselect(batch, result.pixels, args.candidates)
        assert (result.pixels - pixels).abs().max() <= args.eps + 1e-6
        first, every = judged(result.pixels)
        worst = every if worst is None else torch.minimum(worst, every)
        print(f"{variant:>14}: single {first.mean():.4f}  N-draw {every.mean():.4f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    assert worst is not None
    print(f"{'union':>14}: N-draw {worst.mean():.4f} (per question, the worst over the variants)")


if __name__ == "__main__":
    main()
