"""A conformance kit for plugin authors: the harness's contracts as checks to call from your own
tests, plus :class:`FakeVictim`, a model that needs no training.

    from harness.testing import FakeVictim, check_attack, check_defense

    def test_my_defense_keeps_the_contract():
        check_defense(MyDefense(sigma=1.0))          # against a FakeVictim's input size

    def test_my_attack_stays_in_its_ball():
        check_attack(MyAttack(steps=5))

Each check raises :class:`ContractError` (an ``AssertionError``, so pytest shows it as a failed
assertion) whose message names the plugin, what broke and what to change. The checks are the ones
the runner applies at run time (:func:`harness.runner.check_defense_output`,
:func:`harness.runner.check_threat_model`, :func:`harness.contracts.check_defense_declarations`)
plus the ones only a test can afford: determinism under the given generator, global randomness,
declared stochasticity, gradients when ``differentiable`` is declared, a victim whose loss depends
on its pixels. The harness's own tests run the kit on every built-in plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from harness.contracts import (
    AttackBatch,
    ConditionalPromptDefense,
    Defense,
    Sample,
    TaskKind,
    TargetLogitsVictim,
    TemplatedVictim,
    ThreatModel,
    check_defense_declarations,
)
from harness.objectives import cross_entropy
from harness.runner import CellError, check_defense_output, check_threat_model

__all__ = ["ContractError", "FakeVictim", "check_attack", "check_defense", "check_task", "check_victim"]


class ContractError(AssertionError):
    """A plugin breaks the harness's contract; the message says what to fix."""


def _named(plugin: Any) -> str:
    return getattr(plugin, "name", None) or type(plugin).__name__


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FakeVictim:
    """A tiny, deterministic, differentiable image-to-text model with fixed random weights, for
    contract tests of defenses and attacks. It is untrained: its answers mean nothing, so never
    put a number it produces on a board.

    ``loss`` is a per-sample cross-entropy of the target's words (hashed into a small vocabulary)
    given the pixels and the prompt, with normalisation inside the graph; ``generate`` greedily
    decodes one word. Both depend on every pixel.
    """

    name = "fake-victim"
    VOCABULARY = ("red", "blue", "green", "circle", "square", "one", "two", "yes", "no", "a", "shape", "image")

    def __init__(self, *, input_size: tuple[int, int] = (16, 16), seed: int = 0):
        self.input_size = input_size
        self.seed = seed
        generator = _generator(seed)
        height, width = input_size
        self._features = torch.randn(3 * height * width, 32, generator=generator) / math.sqrt(3 * height * width)
        self._prompt = torch.randn(len(self.VOCABULARY), 32, generator=generator) * 0.1
        self._head = torch.randn(32, len(self.VOCABULARY), generator=generator)

    def load(self) -> None:
        """Nothing to load."""

    @property
    def fingerprint(self) -> str:
        return f"fake-victim:{self.seed}:{self.input_size[0]}x{self.input_size[1]}"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) for image in images])
        return F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False).clamp(0, 1)

    def _word_ids(self, text: str) -> list[int]:
        words = text.lower().split() or [""]
        return [int(hashlib.sha256(w.encode()).hexdigest(), 16) % len(self.VOCABULARY) for w in words]

    def _logits(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        normalised = (pixels - 0.5) / 0.5
        hidden = torch.tanh(normalised.flatten(1) @ self._features
                            + torch.stack([self._prompt[self._word_ids(p)].sum(0) for p in prompts]))
        return hidden @ self._head

    def loss(self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind = "vqa") -> torch.Tensor:
        log_probs = F.log_softmax(self._logits(pixels, prompts), dim=-1)
        return torch.stack([-log_probs[i, self._word_ids(t)].mean() for i, t in enumerate(targets)])

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind = "vqa") -> list[str]:
        return [self.VOCABULARY[i] for i in self._logits(pixels, prompts).argmax(dim=-1).tolist()]


def _pixels(victim: Any, batch: int, seed: int) -> torch.Tensor:
    height, width = victim.input_size
    return torch.rand(batch, 3, height, width, generator=_generator(seed))


@contextlib.contextmanager
def _global_seeds(seed: int) -> Iterator[None]:
    """Set torch's and NumPy's global seeds to ``seed`` inside, and give the caller's global
    random state back after: a plugin that draws from them shows up as output that moves with
    ``seed``, and the author's own test keeps its randomness."""
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def _purify(defense: Defense, pixels: torch.Tensor, seed: int, torch_seed: int) -> torch.Tensor:
    with _global_seeds(torch_seed), torch.no_grad():
        return check_defense_output(_named(defense), pixels, defense.purify(pixels.clone(), _generator(seed)))


def _check_bpda_approximation(name: str, defense: Any, pixels: torch.Tensor, purified: torch.Tensor) -> None:
    """``approximate`` is the backward pass of an adaptive attack: it must have a gradient path to
    the pixels and follow the real defense more closely than the identity does (else declaring it
    gives the attacker a worse gradient than ``bpda = 'identity'``)."""
    x = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        stand_in = defense.approximate(x)
        if stand_in.shape != pixels.shape or not torch.isfinite(stand_in).all():
            raise ContractError(f"defense '{name}': approximate must return finite pixels of the input's shape "
                                f"{tuple(pixels.shape)}, got {tuple(stand_in.shape)}")
        if not stand_in.requires_grad:
            raise ContractError(f"defense '{name}': approximate has no gradient path to its input; it is the backward "
                                "pass of BPDA (keep it in torch, without no_grad or .detach())")
        (grad,) = torch.autograd.grad(stand_in.float().sum(), x)
    if not torch.isfinite(grad).all() or float(grad.abs().sum()) == 0.0:
        raise ContractError(f"defense '{name}': the gradient of approximate is zero or not finite")
    off = float((stand_in.detach() - purified).abs().mean())
    identity_off = float((pixels - purified).abs().mean())
    if off > identity_off:
        raise ContractError(
            f"defense '{name}': approximate(pixels) is further from purify(pixels) (mean |difference| {off:.4f}) than "
            f"the pixels themselves are ({identity_off:.4f}): it is a worse stand-in than the identity. Make it follow "
            "the defense's forward pass, or declare bpda = 'identity'")


def check_defense(defense: Defense, *, victim: Any = None, batch: int = 2, seed: int = 0) -> None:
    """Assert ``defense`` keeps the :class:`~harness.contracts.Defense` contract.

    - its declarations route an adaptive attack (``bpda``, ``approximate``, ``eot_samples``);
    - ``purify`` returns float pixels of the input's shape, finite, in [0,1], and leaves its input alone;
    - its only randomness is the generator it is given: the same generator seed gives the same
      output whatever the global torch/numpy seeds;
    - ``stochastic`` is true: two generator seeds give different outputs, or false: they do not;
    - ``differentiable`` is true: gradients reach the pixels and are finite;
    - ``bpda = "approximate"``: ``approximate`` has a gradient path to the pixels and follows
      ``purify`` more closely than the identity does;
    - ``rewrite`` returns one string per prompt;
    - a :class:`~harness.contracts.ConditionalPromptDefense` makes one finite prompt per sample,
      [B, tokens, dim], with a gradient path to the pixels (an adaptive attack goes through it).

    ``victim`` (default a :class:`FakeVictim`) is bound first and sets the input size; a defense
    trained against its victim trains (or loads) then.
    """
    name = _named(defense)
    victim = victim or FakeVictim()
    try:
        check_defense_declarations(name, defense)
    except ValueError as exc:
        raise ContractError(str(exc)) from None
    defense.bind(victim)
    pixels = _pixels(victim, batch, seed)
    original = pixels.clone()
    try:
        first = _purify(defense, pixels, seed, torch_seed=1)
        again = _purify(defense, pixels, seed, torch_seed=2)
    except CellError as exc:
        raise ContractError(str(exc)) from None
    if not torch.equal(pixels, original):
        raise ContractError(f"defense '{name}': purify changed its input in place; work on a copy")
    if not torch.allclose(first, again, atol=1e-6):
        raise ContractError(
            f"defense '{name}': the same generator seed gave different outputs when the global torch/numpy seeds "
            "changed: it draws from global randomness (torch.rand without generator=, np.random, random); draw every "
            "random number from the `generator` argument of purify, so seeded runs repeat")
    other = _purify(defense, pixels, seed + 1, torch_seed=1)
    moved = not torch.allclose(first, other, atol=1e-6)
    if defense.stochastic and not moved:
        raise ContractError(f"defense '{name}' declares stochastic = True but two generator seeds gave the same output: "
                            "declare stochastic = False (an adaptive attack then spends no EOT draws on it)")
    if not defense.stochastic and moved:
        raise ContractError(f"defense '{name}' declares stochastic = False but its output changes with the generator: "
                            "declare stochastic = True, so adaptive attacks average over draws (EOT) and the board "
                            "evaluates it over several draws")
    if defense.differentiable:
        x = pixels.clone().requires_grad_(True)
        with torch.enable_grad():
            out = defense.purify(x, _generator(seed))
            if not out.requires_grad:
                raise ContractError(
                    f"defense '{name}' declares differentiable = True but purify's output has no gradient path to its "
                    "input (a .detach(), torch.no_grad, a NumPy or PIL round trip): keep purify in torch, or declare "
                    "differentiable = False with bpda = 'identity' (or 'approximate' and an approximate() method)")
            (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
        if grad is None or not torch.isfinite(grad).all() or float(grad.abs().sum()) == 0.0:
            raise ContractError(f"defense '{name}' declares differentiable = True but the gradient reaching the pixels is "
                                f"{'missing' if grad is None else 'zero or not finite'}: fix the graph, or declare "
                                "differentiable = False with a BPDA route")
    if not defense.differentiable and defense.bpda == "approximate":
        _check_bpda_approximation(name, defense, pixels, first)
    prompts = ["what color is the shape?", "Provide a short caption for this image."]
    rewritten = defense.rewrite(prompts)
    if not isinstance(rewritten, list) or len(rewritten) != len(prompts) or not all(isinstance(p, str) for p in rewritten):
        raise ContractError(f"defense '{name}': rewrite must return a list of one string per prompt, got {rewritten!r}")
    if isinstance(defense, ConditionalPromptDefense):
        x = pixels.clone().requires_grad_(True)
        with torch.enable_grad():
            made = defense.soft_prompts(x, (rewritten * len(x))[: len(x)])
        if made is not None:
            if made.dim() != 3 or made.shape[0] != len(x) or not torch.isfinite(made).all():
                raise ContractError(f"defense '{name}': soft_prompts must return finite [B, tokens, dim] prompts, one per "
                                    f"sample, got shape {tuple(made.shape)} for {len(x)} samples")
            if not made.requires_grad:
                raise ContractError(f"defense '{name}': soft_prompts has no gradient path to the pixels it was given; an "
                                    "adaptive attack would miss the prompt's dependence on the image (keep it in torch, "
                                    "without no_grad or .detach())")


def check_attack(attack: Any, *, victim: Any = None, threat: ThreatModel | None = None, batch: int = 2,
                 seed: int = 0) -> torch.Tensor:
    """Assert ``attack`` keeps the :class:`~harness.contracts.Attack` contract against ``victim``
    (default a :class:`FakeVictim`) under ``threat`` (default L∞ 8/255): adversarial pixels of the
    clean shape, finite, in [0,1] and in the ball (nothing is clipped for it), the same for the
    same generator seed whatever the global seeds. Returns the adversarial pixels."""
    name = _named(attack)
    victim = victim or FakeVictim()
    threat = threat or ThreatModel("linf-8", "linf", 8 / 255)
    clean = _pixels(victim, batch, seed)
    prompts = ["what color is the shape?"] * batch
    targets = ["red", "blue", "green", "circle"][:batch] + ["red"] * max(0, batch - 4)

    def exact_match(outputs: Sequence[str], indices: Sequence[int]) -> list[float]:
        return [float(o.strip().lower() == targets[i]) for o, i in zip(outputs, indices)]

    def run(torch_seed: int) -> torch.Tensor:
        with _global_seeds(torch_seed):
            result = attack.perturb(victim, AttackBatch(clean.clone(), list(prompts), list(targets), "vqa",
                                                        seeds=list(range(batch)), references=[[t] for t in targets],
                                                        scorer=exact_match),
                                    threat, _generator(seed))
        return result.pixels.detach()

    first = run(1)
    try:
        check_threat_model(name, threat, getattr(attack, "uses_threat", True), clean, first)
    except CellError as exc:
        raise ContractError(str(exc)) from None
    if not torch.allclose(first, run(2), atol=1e-6):
        raise ContractError(f"attack '{name}': the same generator seed gave different adversarial images when the global "
                            "torch/numpy seeds changed: draw random starts and noise from the `generator` argument "
                            "(or from batch.seeds), so seeded runs repeat")
    return first


def check_victim(victim: Any, *, images: Sequence[np.ndarray] | None = None, kind: TaskKind = "vqa") -> None:
    """Assert ``victim`` keeps the :class:`~harness.contracts.Victim` contract: ``prepare`` gives
    float [B,3,H,W] in [0,1] at ``input_size``; ``generate`` returns one string per image, the
    same every time (greedy); ``loss`` is finite, shaped [B], depends on the target text and on
    the pixels (gradients reach them); a :class:`TemplatedVictim` puts the prompt in its template."""
    name = _named(victim)
    victim.load()
    if images is None:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(2)]
    pixels = victim.prepare(list(images))
    expected = (len(images), 3, *victim.input_size)
    if not isinstance(pixels, torch.Tensor) or tuple(pixels.shape) != expected or not pixels.is_floating_point():
        raise ContractError(f"victim '{name}': prepare must return float pixels of shape {expected} (B, 3, *input_size), "
                            f"got {getattr(pixels, 'dtype', type(pixels))} {tuple(getattr(pixels, 'shape', ()))}")
    if float(pixels.min()) < 0 or float(pixels.max()) > 1:
        raise ContractError(f"victim '{name}': prepare must return pixels in [0,1] (the ε ball lives there); normalise "
                            "inside loss and generate instead")
    pixels = pixels.to(victim.device)
    prompts = ["what color is the shape?"] * len(images)
    outputs = victim.generate(pixels, prompts, kind)
    if not isinstance(outputs, list) or len(outputs) != len(images) or not all(isinstance(o, str) for o in outputs):
        raise ContractError(f"victim '{name}': generate must return a list of one string per image, got {outputs!r}")
    if victim.generate(pixels, prompts, kind) != outputs:
        raise ContractError(f"victim '{name}': generate gave different texts for the same inputs: decode greedily "
                            "(do_sample=False, one beam)")
    x = pixels.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = victim.loss(x, prompts, ["red"] * len(images), kind)
        if tuple(loss.shape) != (len(images),) or not torch.isfinite(loss).all():
            raise ContractError(f"victim '{name}': loss must return one finite value per sample, shape ({len(images)},), "
                                f"got shape {tuple(loss.shape)}")
        grad = torch.autograd.grad(loss.sum(), x, allow_unused=True)[0] if loss.requires_grad else None
    if grad is None or float(grad.abs().sum()) == 0.0 or not torch.isfinite(grad).all():
        raise ContractError(f"victim '{name}': loss does not depend on the pixels it is given (no gradient reaches them): "
                            "compute it from those pixels, normalising inside the graph, or every white-box attack on "
                            "it is a no-op")
    with torch.no_grad():
        other = victim.loss(pixels, prompts, ["a completely different answer"] * len(images), kind)
    if torch.allclose(other, loss.detach()):
        raise ContractError(f"victim '{name}': loss is the same for different target texts: score the targets' tokens")
    if isinstance(victim, TemplatedVictim) and prompts[0] not in victim.prompt_text(prompts[0], kind):
        raise ContractError(f"victim '{name}': prompt_text must contain the task prompt it wraps")
    if isinstance(victim, TargetLogitsVictim):
        with torch.no_grad():
            logits, labels = victim.target_logits(pixels, prompts, ["red"] * len(images), kind)
        if logits.ndim != 3 or tuple(labels.shape) != tuple(logits.shape[:2]) or not (labels != -100).any(dim=1).all():
            raise ContractError(f"victim '{name}': target_logits must return logits [B, T, V] and labels [B, T] that "
                                f"label each target's tokens, got {tuple(logits.shape)} and {tuple(labels.shape)}")
        if not torch.allclose(cross_entropy(logits, labels), loss.detach(), rtol=1e-4, atol=1e-5):
            raise ContractError(f"victim '{name}': loss must be the mean cross-entropy of target_logits' labelled "
                                "positions (attacks raise other objectives of the same logits)")


def check_task(task: Any, split: str, *, n: int = 4, seed: int = 0) -> list[Sample]:
    """Assert ``task`` keeps the :class:`~harness.contracts.Task` contract on ``split``: the same
    seeded samples every call, unique ids, uint8 HxWx3 images, references and attack targets
    present, and one finite score per sample under ``metric`` that prefers the reference answers
    to a wrong one. Returns the samples."""
    name = _named(task)
    samples = task.samples(split, n, seed)
    if not samples:
        raise ContractError(f"task '{name}': samples({split!r}, {n}, {seed}) returned nothing")
    if [s.id for s in task.samples(split, n, seed)] != [s.id for s in samples]:
        raise ContractError(f"task '{name}': samples must return the same list for the same (split, n, seed)")
    if len({s.id for s in samples}) != len(samples):
        raise ContractError(f"task '{name}': sample ids must be unique within a split")
    for s in samples:
        image = np.asarray(s.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ContractError(f"task '{name}': sample {s.id!r} has an image of dtype {image.dtype} and shape "
                                f"{image.shape}; images are uint8 H x W x 3 (RGB)")
        if not s.references or not task.attack_targets(s):
            raise ContractError(f"task '{name}': sample {s.id!r} has no references or attack targets")
    right = task.score([s.references[0] for s in samples], samples)
    wrong = task.score(["zzz qqq"] * len(samples), samples)
    for scores in (right, wrong):
        if len(scores) != len(samples) or any(task.metric not in s or not math.isfinite(s[task.metric]) for s in scores):
            raise ContractError(f"task '{name}': score must return one dict per sample with a finite '{task.metric}'")
    if sum(s[task.metric] for s in right) <= sum(s[task.metric] for s in wrong):
        raise ContractError(f"task '{name}': the reference answers do not score above a wrong answer under "
                            f"'{task.metric}': higher must mean better")
    return samples
