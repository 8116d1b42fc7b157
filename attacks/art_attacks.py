"""ART (adversarial-robustness-toolbox) attacks run against an image-to-text victim.

:class:`ImageToTextEstimator` adapts anything with the victim ``loss`` / ``generate`` interface
(:class:`harness.contracts.AttackTarget`) to ART, modelled on ART's speech-recognition estimators,
whose labels are strings rather than class indices. It is an ART ``BaseEstimator`` with
``LossGradientsMixin`` (what ``ProjectedGradientDescent`` and ``FastGradientMethod`` require) and
``NeuralNetworkMixin`` (what ``SquareAttack`` requires); it is deliberately *not* a
``ClassifierMixin``: an MLLM answers with text, and there is no fixed set of classes with logits.
See ``docs/art.md`` for which ART attacks therefore run and which cannot.

Conventions of the adapter:

- inputs ``x``: float32 numpy [B,3,H,W] (channels first) in [0,1] (``clip_values=(0, 1)``), at the
  victim's input resolution; no ART preprocessing (the victim normalises inside its graph);
- labels ``y``: a numpy object array, one label per row of ``x``: either the target *text* of each
  sample of the current batch (then ``x`` must be the whole batch), or :class:`TextLabel` items
  (sample index and text) made by :meth:`ImageToTextEstimator.labels`, which stay right when an
  ART attack passes a subset of the rows (``SquareAttack`` does);
- the prompts and task kind of the current batch are held by the adapter (:meth:`set_batch`);
- ``loss_gradient(x, y)``: d(sum of per-sample losses)/dx, so each row's gradient is its own loss's;
- ``compute_loss(x, y)``: per-sample teacher-forced losses [B];
- ``predict(x)``: the greedy generated strings (object array [B]): what ``SquareAttack``'s success
  criterion compares; PGD/FGSM only call it when no labels are given, and these plugins always
  give labels.

Every call crosses the torch/numpy boundary (pixels to the victim's device and back, gradients
back to numpy): the cost of ART's NumPy attack path that the benchmark shows next to the native
``pgd`` and ``apgd``.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from art.estimators.estimator import BaseEstimator, LossGradientsMixin, NeuralNetworkMixin

from attacks.pgd import project_pixels
from harness.contracts import Attack, AttackBatch, AttackResult, AttackTarget, TaskKind, ThreatModel
from harness.registry import FloatOrFraction

ART_NORMS = {"linf": np.inf, "l2": 2}

ART_MIN_EPS = 1e-12
"""ART rejects a zero step (PGD's and FGSM's ``eps_step`` must be positive) and a zero
``SquareAttack`` radius. At ε = 0 the plugins still run ART (no shortcut: "ε = 0 reproduces the
clean score" must test the real path), passing it this tiny positive value where ART needs one, and
project ART's output onto the *true* ball (:meth:`_ARTAttack._back`, ``project_pixels``): at ε = 0
that is the clean image exactly."""


def _art_positive(value: float) -> float:
    """``value`` as ART's float, raised to :data:`ART_MIN_EPS` where ART refuses zero (see there)."""
    return max(float(value), ART_MIN_EPS)


def _zero_ball_errstate(threat: ThreatModel) -> Any:
    """At ε = 0, ART's L2 projection computes ``eps / norm`` = 0/0 for unmoved rows and then discards
    it (``np.where``): silence that one harmless warning; at ε > 0 warnings are left alone."""
    return np.errstate(invalid="ignore") if threat.eps == 0 else contextlib.nullcontext()


@dataclass(frozen=True)
class TextLabel:
    """A label of one sample of the adapter's current batch: its index there and the text to score."""

    index: int
    text: str


class ImageToTextEstimator(NeuralNetworkMixin, LossGradientsMixin, BaseEstimator):
    """An ART estimator over an image-to-text victim's teacher-forced loss and greedy output.

    Counts what it costs: ``forward_passes`` (victim calls: loss evaluations, with or without
    gradient, and generations), ``backward_passes``, ``queries`` (victim outputs looked at: a call
    on ``m`` rows counts ``m``) and ``sample_queries`` (the same, per sample of the current batch).
    ``on_gradient`` / ``on_predict``, when set, are called after each gradient / prediction (for
    progress bars).
    """

    estimator_params = BaseEstimator.estimator_params + NeuralNetworkMixin.estimator_params + ["input_shape"]

    def __init__(
        self,
        target: AttackTarget,
        input_shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        preprocessing_defences: Any = None,
    ):
        super().__init__(
            model=target,
            clip_values=(0.0, 1.0),
            channels_first=True,
            preprocessing_defences=preprocessing_defences,
            preprocessing=None,
        )
        if len(input_shape) != 3 or input_shape[0] != 3:
            raise ValueError(f"input_shape must be (3, H, W), got {tuple(input_shape)}")
        self._input_shape = tuple(int(d) for d in input_shape)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.prompts: list[str] = []
        self.kind: TaskKind = "vqa"
        self.forward_passes = 0
        self.backward_passes = 0
        self.queries = 0
        self.sample_queries = np.zeros(0, dtype=np.int64)
        self.on_gradient: Callable[[], None] | None = None
        self.on_predict: Callable[[], None] | None = None

    # -- the batch ---------------------------------------------------------------------------
    def set_batch(self, prompts: Sequence[str], kind: TaskKind) -> None:
        """Hold the prompts and task kind of the samples that the next calls' rows belong to."""
        self.prompts = list(prompts)
        self.kind = kind
        self.sample_queries = np.zeros(len(self.prompts), dtype=np.int64)

    def labels(self, texts: Sequence[str]) -> np.ndarray:
        """Labels for ART: an object array of :class:`TextLabel`, one per sample of the current batch."""
        if len(texts) != len(self.prompts):
            raise ValueError(f"{len(texts)} texts for a batch of {len(self.prompts)} prompts")
        y = np.empty(len(texts), dtype=object)
        y[:] = [TextLabel(i, str(t)) for i, t in enumerate(texts)]
        return y

    def _resolve(self, y: Any, rows: int) -> tuple[list[int], list[str]]:
        """Sample indices (into the held prompts) and texts of the label array ``y``."""
        if y is None:
            raise ValueError("ImageToTextEstimator needs labels: the texts whose loss is computed")
        items = list(np.asarray(y, dtype=object).reshape(-1))
        if len(items) != rows:
            raise ValueError(f"{len(items)} labels for {rows} inputs")
        if all(isinstance(item, TextLabel) for item in items):
            return [item.index for item in items], [item.text for item in items]
        if any(isinstance(item, TextLabel) for item in items):
            raise ValueError("labels mix TextLabel items and plain texts")
        if rows != len(self.prompts):
            raise ValueError(
                f"plain-text labels need the whole batch ({len(self.prompts)} rows, got {rows}); "
                "use ImageToTextEstimator.labels() for subsets"
            )
        return list(range(rows)), [str(item) for item in items]

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._device)

    def _count(self, indices: Sequence[int]) -> None:
        self.forward_passes += 1
        self.queries += len(indices)
        np.add.at(self.sample_queries, np.asarray(indices, dtype=np.int64), 1)

    # -- what ART calls ----------------------------------------------------------------------
    def compute_loss(self, x: np.ndarray, y: Any, **kwargs) -> np.ndarray:
        """Per-sample teacher-forced loss of the label texts, float32 [B]."""
        indices, texts = self._resolve(y, len(x))
        x_pre, _ = self._apply_preprocessing(x, None, fit=False)
        with torch.no_grad():
            loss = self._model.loss(self._tensor(x_pre), [self.prompts[i] for i in indices], texts, self.kind)
        self._count(indices)
        return loss.detach().float().cpu().numpy()

    def loss_gradient(self, x: np.ndarray, y: Any, **kwargs) -> np.ndarray:
        """Gradient of the sum of per-sample losses w.r.t. ``x`` (each row's is its own loss's)."""
        indices, texts = self._resolve(y, len(x))
        x_pre, _ = self._apply_preprocessing(x, None, fit=False)
        pixels = self._tensor(x_pre).requires_grad_(True)
        loss = self._model.loss(pixels, [self.prompts[i] for i in indices], texts, self.kind)
        (grad,) = torch.autograd.grad(loss.sum(), pixels)
        self._count(indices)
        self.backward_passes += 1
        gradients = self._apply_preprocessing_gradient(x, grad.detach().float().cpu().numpy())
        if self.on_gradient is not None:
            self.on_gradient()
        return np.asarray(gradients, dtype=np.float32)

    def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs) -> np.ndarray:
        """The victim's greedy outputs for the whole current batch, an object array of strings."""
        if len(x) != len(self.prompts):
            raise ValueError(f"predict needs the whole batch ({len(self.prompts)} rows, got {len(x)})")
        x_pre, _ = self._apply_preprocessing(x, None, fit=False)
        outputs = self._model.generate(self._tensor(x_pre), self.prompts, self.kind)
        self._count(range(len(x)))
        if self.on_predict is not None:
            self.on_predict()
        result = np.empty(len(outputs), dtype=object)
        result[:] = list(outputs)
        return result

    def fit(self, x: np.ndarray, y: Any, batch_size: int = 128, nb_epochs: int = 20, **kwargs) -> None:
        raise NotImplementedError("ImageToTextEstimator wraps a fixed victim: it cannot be trained through ART")

    def get_activations(self, x: np.ndarray, layer: int | str, batch_size: int, framework: bool = False) -> np.ndarray:
        raise NotImplementedError("ImageToTextEstimator exposes no layer activations")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def device(self) -> torch.device:
        return self._device


# -- attack plugins ----------------------------------------------------------------------------


class _ARTAttack(Attack):
    """What the ART plugins share: the targeted switch, the adapter, and projecting what ART returns."""

    requires = "gradients"
    defining_params = ("target",)

    def __init__(self, target: str | None):
        if target is not None and not target.strip():
            raise ValueError("target must be a non-empty text (or omitted for an untargeted attack)")
        self.target_text = target

    @property
    def targeted(self) -> bool:
        return self.target_text is not None

    def _texts(self, batch: AttackBatch) -> list[str]:
        return [self.target_text] * len(batch.prompts) if self.target_text is not None else list(batch.targets)

    @staticmethod
    def _estimator(target: AttackTarget, batch: AttackBatch) -> ImageToTextEstimator:
        estimator = ImageToTextEstimator(target, tuple(batch.pixels.shape[1:]), device=batch.pixels.device)
        estimator.set_batch(batch.prompts, batch.kind)
        return estimator

    @staticmethod
    def _numpy(pixels: torch.Tensor) -> np.ndarray:
        return pixels.detach().float().cpu().numpy().astype(np.float32)

    @staticmethod
    def _back(adv: np.ndarray, clean: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        """ART's output as pixels of ``clean``'s dtype/device, projected into the ball and [0,1].

        A non-finite value (none is expected) falls back to the clean pixel rather than spreading.
        """
        pixels = torch.from_numpy(np.asarray(adv, dtype=np.float32)).to(device=clean.device, dtype=clean.dtype)
        pixels = torch.where(torch.isfinite(pixels), pixels, clean)
        return project_pixels(pixels, clean, threat.norm, threat.eps).detach()


class ARTPGD(_ARTAttack):
    """``art-pgd``: ART's ``ProjectedGradientDescent`` (NumPy path), L∞ or L2, through the adapter.

    Untargeted: maximises the loss of the reference; with ``target``: minimises the target's loss
    (ART's ``targeted=True``). ``step_size`` defaults to 2.5·ε/steps like the native ``pgd``. No
    random start: ART refuses random initialisation for a non-classifier, so compare it with
    ``pgd`` at ``random_start: false``. ART returns the last iterate (not the best one).
    ``losses`` is [mean loss before, mean loss after] (of the target text when targeted).
    """

    def __init__(self, *, steps: int = 20, step_size: FloatOrFraction | None = None, target: str | None = None):
        super().__init__(target)
        if steps < 1:
            raise ValueError("steps must be at least 1")
        if step_size is not None and step_size <= 0:
            raise ValueError("step_size must be positive")
        self.steps = steps
        self.step_size = step_size

    def passes_per_sample(self) -> tuple[int, int]:
        return (self.steps + 2, self.steps)  # + the losses before and after

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        from art.attacks.evasion import ProjectedGradientDescent

        clean = batch.pixels.detach()
        estimator = self._estimator(target, batch)
        if progress is not None:
            estimator.on_gradient = lambda: progress.update(1)
        x, y = self._numpy(clean), estimator.labels(self._texts(batch))
        before = estimator.compute_loss(x, y)
        step_size = self.step_size if self.step_size is not None else 2.5 * threat.eps / self.steps
        attack = ProjectedGradientDescent(
            estimator,
            norm=ART_NORMS[threat.norm],
            eps=float(threat.eps),  # ART accepts 0
            eps_step=_art_positive(step_size),  # 2.5·ε/steps is 0 at ε = 0, which ART rejects
            max_iter=self.steps,
            targeted=self.targeted,
            num_random_init=0,
            batch_size=len(x),
            verbose=False,
        )
        with _zero_ball_errstate(threat):
            adv = attack.generate(x, y)
        pixels = self._back(adv, clean, threat)
        after = estimator.compute_loss(self._numpy(pixels), y)
        return AttackResult(
            pixels=pixels,
            forward_passes=estimator.forward_passes,
            backward_passes=estimator.backward_passes,
            losses=[float(before.mean()), float(after.mean())],
        )


class ARTFGSM(_ARTAttack):
    """``art-fgsm``: ART's ``FastGradientMethod``: one gradient step of size ε (sign step for L∞).

    Untargeted, or towards ``target``. ``losses`` is [mean loss before, mean loss after].
    """

    def __init__(self, *, target: str | None = None):
        super().__init__(target)

    def passes_per_sample(self) -> tuple[int, int]:
        return (3, 1)

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        from art.attacks.evasion import FastGradientMethod

        clean = batch.pixels.detach()
        estimator = self._estimator(target, batch)
        if progress is not None:
            estimator.on_gradient = lambda: progress.update(1)
        x, y = self._numpy(clean), estimator.labels(self._texts(batch))
        before = estimator.compute_loss(x, y)
        attack = FastGradientMethod(
            estimator,
            norm=ART_NORMS[threat.norm],
            eps=float(threat.eps),  # ART accepts 0
            eps_step=_art_positive(threat.eps),  # only used by minimal=True; ART rejects 0
            targeted=self.targeted,
            num_random_init=0,
            batch_size=len(x),
        )
        with _zero_ball_errstate(threat):
            adv = attack.generate(x, y)
        pixels = self._back(adv, clean, threat)
        after = estimator.compute_loss(self._numpy(pixels), y)
        return AttackResult(
            pixels=pixels,
            forward_passes=estimator.forward_passes,
            backward_passes=estimator.backward_passes,
            losses=[float(before.mean()), float(after.mean())],
        )


class ARTSquare(_ARTAttack):
    """``art-square``: ART's ``SquareAttack`` (random search, outputs only), L∞ or L2.

    ART minimises a user ``loss`` on a non-classifier: here the *negative* teacher-forced loss of
    the reference (untargeted) or the target's loss (``target``). Its success check
    (``adv_criterion``) generates greedily: untargeted, the output no longer equals the reference
    (case and surrounding space ignored); targeted, the output contains the target text (the
    runner's rule). ART stops optimising a sample once it succeeds, and does not attack a sample
    whose clean output already counts as a success.

    ``max_iter`` iterations per restart, ``p_init`` the initial share of pixels a square covers
    (ART's default 0.8; ART shrinks it on a fixed schedule over ``max_iter``; the paper's 0.05 is
    for 10k-query budgets on ImageNet-size inputs, and is much weaker at ~100 iterations on the
    32x32 shapes victim), ``nb_restarts`` restarts (each from the clean image, for the samples not
    yet successful).
    Randomness: ART draws from NumPy's and Python's global generators; they are seeded from
    ``batch.seeds`` (one ART run per sample, so an example does not depend on its batch) or else
    from ``generator`` (one run for the batch), and restored afterwards.

    Cost: ``queries`` is the number of victim outputs (losses and generations) the attack looked
    at, summed over the batch's samples; at most ``B · nb_restarts · (3 + 3·max_iter)`` (ART
    evaluates the current loss again at every iteration). ``forward_passes`` is the largest
    number of victim calls one sample cost, plus the two loss evaluations of ``losses``
    ([mean loss before, mean loss after], bookkeeping that is not counted as queries).
    """

    requires = "queries"

    def __init__(
        self,
        *,
        max_iter: int = 100,
        p_init: float = 0.8,
        nb_restarts: int = 1,
        target: str | None = None,
    ):
        super().__init__(target)
        if max_iter < 1:
            raise ValueError("max_iter must be at least 1")
        if not 0 < p_init < 1:
            raise ValueError("p_init must be in (0, 1)")
        if nb_restarts < 1:
            raise ValueError("nb_restarts must be at least 1")
        self.max_iter = max_iter
        self.p_init = p_init
        self.nb_restarts = nb_restarts

    def query_budget(self, n_samples: int = 1) -> int:
        """The most victim outputs the attack can look at for ``n_samples`` samples."""
        return n_samples * self.nb_restarts * (3 + 3 * self.max_iter)

    def passes_per_sample(self) -> tuple[int, int]:
        return (self.query_budget(1) + 2, 0)

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        from art.attacks.evasion import SquareAttack

        clean = batch.pixels.detach()
        texts = self._texts(batch)
        estimator = ImageToTextEstimator(target, tuple(clean.shape[1:]), device=clean.device)
        if progress is not None:
            estimator.on_predict = lambda: progress.update(1)
        sign = 1.0 if self.targeted else -1.0  # ART minimises

        def loss(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return sign * estimator.compute_loss(x, y)

        def adv_criterion(y_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
            return np.array([self._success(str(out), label.text) for out, label in zip(y_pred, y)], dtype=bool)

        x_all = self._numpy(clean)
        adv = x_all.copy()
        if batch.seeds is not None:
            runs = [([i], int(seed)) for i, seed in enumerate(batch.seeds)]
        else:
            runs = [(list(range(len(x_all))), int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))]
        queries = most_calls = 0
        for indices, seed in runs:
            estimator.set_batch([batch.prompts[i] for i in indices], batch.kind)
            x, y = x_all[indices], estimator.labels([texts[i] for i in indices])
            attack = SquareAttack(
                estimator,
                norm=ART_NORMS[threat.norm],
                adv_criterion=adv_criterion,
                loss=loss,
                max_iter=self.max_iter,
                eps=_art_positive(threat.eps),  # ART rejects 0; _back projects onto the true ball
                p_init=self.p_init,
                nb_restarts=self.nb_restarts,
                batch_size=len(x),
                verbose=False,
            )
            # ART's L2 update divides by the remaining budget where the paper multiplies by it; a
            # zero budget gives inf/NaN candidates, which it then rejects (NaN never improves).
            with _seeded(seed), np.errstate(divide="ignore", invalid="ignore"):
                adv[indices] = attack.generate(x, y)
            queries += int(estimator.sample_queries.sum())
            most_calls = max(most_calls, int(estimator.sample_queries.max()))
        pixels = self._back(adv, clean, threat)
        with torch.no_grad():
            before = target.loss(clean, batch.prompts, texts, batch.kind)
            after = target.loss(pixels, batch.prompts, texts, batch.kind)
        return AttackResult(
            pixels=pixels,
            forward_passes=most_calls + 2,
            queries=queries,
            losses=[before.mean().item(), after.mean().item()],
        )

    def _success(self, output: str, text: str) -> bool:
        if self.targeted:
            return text.lower() in output.lower()
        return output.strip().lower() != text.strip().lower()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed NumPy's and Python's global generators (what ART draws from); restore them afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
