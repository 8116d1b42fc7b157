"""The typed contracts between the runner and its plugins.

Everything a plugin receives or returns is declared here, once. The hook specifications
(:mod:`harness.hookspecs`) say *how* a plugin registers; this module says *what* it registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # annotations only: the CLI reads suites and reports errors without loading torch
    import numpy as np
    import torch

Norm = Literal["linf", "l2"]
TaskKind = Literal["vqa", "caption"]


@dataclass(frozen=True)
class Sample:
    """One evaluation item, as a task hands it to the runner.

    ``id`` is unique within (task, data, split): the VQA question id, the COCO image id.
    ``image`` is uint8, H x W x 3, RGB, at the data set's own resolution (the victim resizes).
    ``prompt`` is the task-level text (the question; for captioning a fixed instruction); the
    victim wraps it in its own template. ``references`` are the ground-truth texts (10 annotator
    answers for VQA, 5 captions for COCO). ``meta`` carries the rest (image_id, answer_type, ...).
    """

    id: str
    image: np.ndarray
    prompt: str
    references: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ThreatModel:
    """Where an attack may move an image: a norm ball of radius ``eps`` around the clean pixels.

    The ball lives at the victim's input resolution, on [0,1] pixels (after ``Victim.prepare``).
    ``name`` is the suite's name for it (``linf-8``; sweeps add ``@eps``).
    """

    name: str
    norm: Norm
    eps: float

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "norm": self.norm, "eps": self.eps}


CLEAN_THREAT = ThreatModel(name="clean", norm="linf", eps=0.0)


class DataError(ValueError):
    """A data set breaks its official format (an unreadable file, a VQA question without its 10
    answers, a repeated id, an empty reference caption). Task readers raise it with a message
    naming the file, the sample and the fix; the CLI shows that message, never a traceback."""


#: What a task reader does with a sample that breaks its format: stop with a :class:`DataError`
#: (the default), or leave the sample out and report it (:class:`SkippingTask`).
OnBadSample = Literal["fail", "skip"]


@dataclass(frozen=True)
class SkippedSample:
    """A sample a task left out under ``on_bad_sample: skip``: its id, its file, and why."""

    id: str
    file: str
    problem: str


@runtime_checkable
class Victim(Protocol):
    """A multimodal model under evaluation.

    Contract:
    - ``load()`` makes it ready (downloads nothing; a missing checkpoint is a clear error or, for
      built-ins, trained on demand). Constructors stay cheap: suites instantiate plugins to
      validate their parameters.
    - ``prepare(images)`` is the non-differentiable step: resize/crop uint8 HxWx3 images to the
      model's input size and return float [B,3,H,W] in [0,1]. The epsilon ball lives here.
    - ``generate(pixels, prompts, kind)`` decodes greedily and deterministically.
    - ``loss(pixels, prompts, targets, kind)`` is the per-sample teacher-forced cross-entropy of
      ``targets`` given the same template as ``generate``, over target tokens only, differentiable
      w.r.t. ``pixels`` in [0,1] (normalisation inside the graph). Shape [B].
    - ``fingerprint`` identifies the weights (for result keys).
    """

    name: str
    input_size: tuple[int, int]

    def load(self) -> None: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def device(self) -> torch.device: ...

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor: ...

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]: ...

    def loss(
        self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind
    ) -> torch.Tensor: ...


@runtime_checkable
class CheapFingerprintVictim(Protocol):
    """A victim that can name its weights' fingerprint without loading them (a cached checkpoint's
    file hash), so that a rerun whose rows are all stored starts no worker and loads no model."""

    def fingerprint_without_loading(self) -> str | None:
        """Exactly what ``fingerprint`` will return, or None when that needs a load or a training
        first. Must be cheap: the driver calls it in its own process."""
        ...


@runtime_checkable
class TargetLogitsVictim(Protocol):
    """A white-box victim that exposes the logits its ``loss`` is computed from, so attacks can
    use losses other than cross-entropy (:mod:`harness.objectives`: the DLR margin, which keeps a
    usable gradient where the target token's probability has saturated and cross-entropy stalls;
    AutoAttack's APGD-DLR). A victim that takes ``soft_prompt`` in ``loss`` takes it here too."""

    def target_logits(
        self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, T, V], labels [B, T])``, teacher-forced exactly as ``loss``: ``labels``
        holds the target token that position's logits predict, -100 where a position predicts
        none, and each row's last labelled token is the end-of-text token that ``generate`` stops
        at. ``loss`` equals the mean cross-entropy over the labelled positions."""
        ...


@runtime_checkable
class TemplatedVictim(Protocol):
    """A victim that can say what text it sends its model for a task prompt (its template):
    recorded in every row, so that a number can be traced to the exact question asked."""

    def prompt_text(self, prompt: str, kind: TaskKind = "vqa") -> str:
        """The text ``loss`` and ``generate`` put around ``prompt`` (chat template included)."""
        ...


@runtime_checkable
class EmbeddingVictim(Protocol):
    """A victim that also exposes image features (for feature-space and transfer attacks)."""

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] pixels in [0,1] -> [B,D] features, differentiable w.r.t. pixels."""
        ...


@runtime_checkable
class ImageFeatureVictim(Protocol):
    """A victim that exposes the image tokens its language model reads (unpooled)."""

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] pixels in [0,1] -> [B,T,D]: every visual token the text side attends to,
        differentiable w.r.t. pixels. CoDefend's task-aligned purifier loss matches these."""
        ...


@runtime_checkable
class SoftPromptVictim(Protocol):
    """A white-box victim whose ``generate`` and ``loss`` also take ``soft_prompt``: a
    [tokens, soft_prompt_dim] tensor of embeddings the victim inserts into its text input (where
    is the victim's choice, the same in both), or [B, tokens, soft_prompt_dim], one prompt per
    sample; differentiable in ``loss``."""

    soft_prompt_dim: int


@runtime_checkable
class QueryEncoder(Protocol):
    """A frozen copy of a victim's text model that reads each query and ``slots`` after it, and
    returns its hidden states at the slots: the base a prefix generator puts LoRA adapters on.
    It is a ``torch.nn.Module`` whose parameters start frozen; ``lora_targets`` names its
    submodules an adapter may wrap (peft ``target_modules``)."""

    lora_targets: tuple[str, ...]

    def neutral_prefix(self, tokens: int) -> torch.Tensor:
        """[tokens, D] embeddings that, as a soft prompt, change the victim's outputs least (its
        start token's, say): where a generator's prefix starts, so it costs no clean accuracy
        before it has learned anything."""
        ...

    def __call__(self, prompts: Sequence[str], slots: torch.Tensor,
                 image_features: torch.Tensor | None) -> torch.Tensor:
        """``prompts`` (B texts, read with the victim's own template), ``slots`` [T, D] and the
        victim's ``image_features`` of the images or None -> [B, T, D], differentiable w.r.t.
        ``slots``, ``image_features`` and any adapter."""
        ...


@runtime_checkable
class QueryEncoderVictim(Protocol):
    """A :class:`SoftPromptVictim` that lends its text model as a prefix generator's base."""

    soft_prompt_dim: int

    def query_encoder(self) -> QueryEncoder:
        """A new, frozen copy (the victim's own weights are never trained through it)."""
        ...


@runtime_checkable
class ConditionalPromptDefense(Protocol):
    """A defense whose soft prompt depends on each sample: its query, and the image the victim
    sees (CoDefend's prefix generator). Everything that sends a defense's prompt to a victim
    (evaluation, every N-draw draw, the adaptive attack's loss) calls ``soft_prompts`` with the
    purified pixels of that very call, so an adaptive attack differentiates through it."""

    def soft_prompts(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor | None:
        """[B,3,H,W] pixels the victim will read and their B (rewritten) prompts ->
        [B, tokens, dim] soft prompts, differentiable w.r.t. ``pixels``; None: no soft prompt
        (then :meth:`Defense.soft_prompt` applies)."""
        ...


@runtime_checkable
class SurrogateProcessDefense(Protocol):
    """A defense with a cheaper stand-in process that an exact-gradient attack may differentiate
    instead (Lee & Kim, ICCV 2023: the same noise level, fewer denoising steps), when a suite asks
    for one (``adaptive.surrogate_steps``). The real defense still purifies at evaluation."""

    def surrogate_process(self, steps: int) -> "Defense":
        """A defense with at most ``steps`` network evaluations and the same randomness model."""
        ...


@runtime_checkable
class UsesPlugins(Protocol):
    """A component that creates other components: an ensemble's member attacks, a transfer
    attack's surrogate victim, the attacks that make a trained defense's pairs, the tasks a victim
    trains on. A registry hands it the plugin set it was created from (the run's: the CLI's
    ``--plugin`` modules included) right after creating it, before any other call, so it never
    reaches for a process-wide set. ``bind_plugins`` may check names against it (an unknown member
    is then a suite error). :class:`harness.plugins.PluginsUser` implements it."""

    def bind_plugins(self, plugins: Any) -> None: ...


@runtime_checkable
class TrainableDefense(Protocol):
    """A defense trained against the victim it protects (CoDefend's purifier and prompt).

    ``bind(victim)`` (``Defense.bind``) keeps the victim and trains or loads the defense, unless
    ``prepare=False`` (then it only keeps the victim); ``train(progress=...)`` trains it now, or
    finds it in its cache, and returns its training record (what ``codefend train`` prints). The
    weights are cached under ``$CODEFEND_HOME`` keyed by everything that determines them, the
    victim's fingerprint included."""

    def bind(self, victim: "Victim", *, prepare: bool = True) -> None: ...

    def train(self, *, progress: bool = True) -> dict[str, Any]: ...


@runtime_checkable
class BPDAApproximation(Protocol):
    """A non-differentiable defense (``bpda = "approximate"``) with a differentiable stand-in for
    ``purify``: BPDA (Athalye et al. 2018) runs ``purify`` forward and differentiates
    ``approximate`` backward."""

    def approximate(self, pixels: torch.Tensor) -> torch.Tensor:
        """A differentiable map close to ``purify`` on [B,3,H,W] pixels in [0,1], same shape."""
        ...


BPDA_DECLARATIONS = (None, "identity", "approximate")
"""The values ``Defense.bpda`` may take."""


def check_defense_declarations(name: str, defense: "Defense") -> None:
    """Raise ``ValueError`` naming the defense when its declarations cannot route an adaptive
    attack: an unknown ``bpda``, ``bpda = "approximate"`` without :class:`BPDAApproximation`'s
    method, or an ``eot_samples`` below 1. ``codefend validate`` and the runner call it."""
    if defense.bpda not in BPDA_DECLARATIONS:
        close = [v for v in BPDA_DECLARATIONS if v and v[:3] == str(defense.bpda)[:3]]
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"defense '{name}' declares bpda = {defense.bpda!r}{hint}; it must be None (no BPDA), "
                         "'identity' (the backward pass treats purify as the identity) or 'approximate' (through its "
                         "approximate(pixels) method)")
    if defense.bpda == "approximate" and not defense.differentiable and not isinstance(defense, BPDAApproximation):
        raise ValueError(f"defense '{name}' declares bpda = 'approximate' but has no approximate(pixels) method: add "
                         "one (a differentiable stand-in for purify, same shape, [0,1]) or declare bpda = 'identity'")
    if isinstance(defense.eot_samples, bool) or not isinstance(defense.eot_samples, int) or defense.eot_samples < 1:
        raise ValueError(f"defense '{name}' declares eot_samples = {defense.eot_samples!r}: it must be an integer >= 1")


@runtime_checkable
class TransferAttack(Protocol):
    """A transfer attack: its gradients come from a surrogate model, not from the victim. The
    runner compares ``surrogate_fingerprint()`` with the victim's: when they are equal the attack
    is white-box in fact, and is labelled (and checked) as such."""

    surrogate: str
    surrogate_params: Mapping[str, Any]

    def surrogate_fingerprint(self) -> str: ...


@runtime_checkable
class Task(Protocol):
    """A benchmark task over a data set in its official on-disk format.

    Contract:
    - ``kind`` is ``"vqa"`` or ``"caption"``; ``metric`` names the headline per-sample score.
    - ``samples(split, n, seed)`` returns the first ``n`` samples of a fixed, seeded subset of the
      split (all of it when ``n`` is None) - the same list for the same arguments, every time.
    - ``attack_targets(sample)`` lists reference texts an untargeted attack pushes away from,
      most important first (the most frequent VQA answer; the first caption).
    - ``score(outputs, samples)`` returns one dict of named scores per sample. Set-level
      statistics (CIDEr's document frequencies) come from ``samples`` as a whole, so conditions
      are only comparable on the same sample set. The headline metric is the mean over samples
      of ``scores[metric]``.
    - ``describe()`` returns a short JSON-able record of the data (path, split sizes) for provenance.
    """

    name: str
    kind: TaskKind
    metric: str

    def samples(self, split: str, n: int | None, seed: int) -> list[Sample]: ...

    def attack_targets(self, sample: Sample) -> list[str]: ...

    def score(self, outputs: Sequence[str], samples: Sequence[Sample]) -> list[dict[str, float]]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class SkippingTask(Protocol):
    """A task that can leave malformed samples out (``on_bad_sample: skip``) and says which.

    ``skipped_samples(split)`` lists every sample of ``split`` left out so far, in file order;
    the runner stores them and the board counts them beside each cell's n, so a skip is never
    a silent change of the sample set."""

    def skipped_samples(self, split: str) -> list[SkippedSample]: ...


@runtime_checkable
class CorpusScoredTask(Protocol):
    """A task whose published metrics are statistics of the whole set, not means of its
    per-sample scores (COCO captions: pycocoevalcap's BLEU-4 pools n-gram counts and METEOR
    alignments over the corpus; a mean of per-sample BLEU-4 is a number no paper reports)."""

    def score_with_corpus(self, outputs: Sequence[str], samples: Sequence[Sample]
                          ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """``score``'s per-sample dicts and the set's metrics as the reference scorer reports
        them, from one scoring pass (the driver uses it for a cell's first draw)."""
        ...


@runtime_checkable
class ImageIndexedTask(Protocol):
    """A task that names the images of a split without reading them, so that a model trained on
    one split (CoDefend's purifier, on its pairs) can leave out every image that some split it
    is evaluated on also holds: COCO's Karpathy train holds 30,504 restval images, which are
    val2014 images, the ones VQAv2 val asks about. Its samples carry ``meta["file_name"]``."""

    def evaluation_splits(self) -> tuple[str, ...]:
        """The splits of this task's data that results are reported on (those present)."""
        ...

    def image_names(self, split: str) -> frozenset[str]:
        """The file names of ``split``'s images (the same image has the same name in every
        data set built on it: COCO's ``COCO_val2014_000000000042.jpg``)."""
        ...


class AttackTarget(Protocol):
    """What an attack optimises against: a victim, or (adaptive attacks) defense then victim."""

    def loss(
        self, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind
    ) -> torch.Tensor:
        """One loss per sample (the attack raises it). Its gradient with respect to ``pixels`` is
        what the attack follows: through a defense, the route the defense declares (exact, BPDA,
        the mean over EOT draws, or, when the suite asks, those draws grafted onto one backward
        pass; :mod:`harness.adaptive`)."""
        ...

    def generate(self, pixels: torch.Tensor, prompts: Sequence[str], kind: TaskKind) -> list[str]: ...


@runtime_checkable
class MultiObjectiveTarget(Protocol):
    """An attack target that raises objectives other than its ``loss`` (cross-entropy) through the
    same route: the defended model of adaptive attacks, whose DLR margin is averaged over the
    same EOT draws and differentiated through the same defense route as its loss."""

    def objectives(self) -> tuple[str, ...]:
        """The objectives it can raise (:data:`harness.objectives.OBJECTIVES` names)."""
        ...

    def objective_loss(
        self, objective: str, pixels: torch.Tensor, prompts: Sequence[str], targets: Sequence[str], kind: TaskKind
    ) -> torch.Tensor:
        """One value of ``objective`` per sample, as :meth:`AttackTarget.loss` gives cross-entropy."""
        ...


@dataclass
class AttackBatch:
    """The inputs of one attack call: clean pixels at victim resolution and the texts involved."""

    pixels: torch.Tensor
    prompts: list[str]
    targets: list[str]
    kind: TaskKind
    seeds: list[int] | None = None
    """Per-sample seeds. When given, per-sample randomness (random starts) must come from them, so
    an adversarial example does not depend on which samples shared its batch."""
    references: list[list[str]] | None = None
    """Every attack target of each sample, most important first (``Task.attack_targets``):
    ``targets`` holds the first of each. Ensembles attack several of them."""
    scorer: Callable[[Sequence[str], Sequence[int]], list[float]] | None = None
    """``scorer(outputs, indices)`` scores outputs of the batch's samples ``indices`` with the
    task's headline metric (higher is better for the victim), for attacks that keep the per-sample
    worst case or stop early. Attacks call it through :meth:`judge`."""
    judging_draws: int = 1
    """Generations per judgement (:meth:`judge`). The runner sets it to the protocol's N draws
    when the target is a stochastic defense (each ``generate`` purifies with fresh noise), so an
    attack decides which samples are broken, and which example each keeps, by the mean score over
    N draws, as the board judges a sample by its N draws, not by the one draw it happened to see."""

    def __post_init__(self) -> None:
        if self.judging_draws < 1:
            raise ValueError(f"judging_draws must be at least 1, got {self.judging_draws}")

    def judge(self, target: AttackTarget, pixels: "torch.Tensor", indices: Sequence[int]) -> list[float] | None:
        """The task score of each sample's output on ``pixels`` (the batch's samples ``indices``,
        in order), averaged over ``judging_draws`` generations through ``target``; None when the
        batch has no scorer."""
        if self.scorer is None:
            return None
        prompts = [self.prompts[i] for i in indices]
        totals = [0.0] * len(indices)
        for _ in range(self.judging_draws):
            scores = self.scorer(target.generate(pixels, prompts, self.kind), list(indices))
            totals = [t + float(s) for t, s in zip(totals, scores)]
        return [t / self.judging_draws for t in totals]


@dataclass
class AttackResult:
    """Adversarial pixels (inside the ball, in [0,1]) and what producing them cost."""

    pixels: torch.Tensor
    forward_passes: int = 0
    backward_passes: int = 0
    queries: int = 0
    """Victim outputs the attack looked at (query attacks count every one)."""
    losses: list[float] = field(default_factory=list)
    """Mean loss per step, first to last; lets tests and reports check that it rose."""
    loss_rise: tuple[float, float] | None = None
    """(mean loss at the start, mean loss at the end) of like-for-like runs, for attacks whose
    ``losses`` chain several runs against different texts (ensembles); None: ``losses[0]`` and
    ``losses[-1]`` compare like with like."""
    objectives_unavailable: list[str] = field(default_factory=list)
    """Objectives the attack was asked to raise that its target could not give (a victim that
    does not expose its logits: :class:`TargetLogitsVictim`), and which it replaced with
    cross-entropy: the attack was weaker than declared, and the board flags it."""


class Attack:
    """Base class of attack plugins.

    Subclasses take their parameters as typed keyword arguments (validated when a suite loads)
    and implement :meth:`perturb`. ``requires`` says what access the attack needs:
    ``"gradients"`` (white-box), ``"queries"`` (outputs only), ``"transfer"`` (gradients of a
    surrogate model only) or ``"none"``.
    ``uses_threat`` is False for attacks that ignore the threat model (``none``).
    """

    requires: ClassVar[Literal["gradients", "queries", "transfer", "none"]] = "gradients"
    uses_threat: ClassVar[bool] = True
    target_text: str | None = None
    """Targeted attacks set this: the text the victim should be made to say. The runner records,
    per sample, whether the output contains it."""
    defining_params: ClassVar[tuple[str, ...]] = ()
    """Names of the parameters that make this a *different attack* rather than a different budget:
    a targeted APGD and an untargeted one (``target``), transfer attacks aimed at other target
    texts. :func:`harness.labels.training_label` compares them (and the plugin name, norm and ε)
    with a defense's :class:`TrainingAttack` s to label a row seen or unseen. Budget parameters
    (steps, step sizes, restarts, random starts) never make an attack unseen, so the default is
    none: every instance of the plugin is the same attack."""

    def perturb(
        self,
        target: AttackTarget,
        batch: AttackBatch,
        threat: ThreatModel,
        generator: torch.Generator,
        progress: Any = None,
    ) -> AttackResult:
        """Return adversarial pixels for ``batch`` within ``threat`` (L_norm <= eps, in [0,1]).

        ``generator`` is the only randomness source (seeded by the runner). ``progress``, when
        given, is a tqdm-like bar advanced once per optimisation step.
        """
        raise NotImplementedError

    def passes_per_sample(self) -> tuple[int, int]:
        """(forward, backward) passes one sample costs, judgements left out
        (:meth:`judgements_per_sample`); used by ``validate`` for estimates."""
        return (0, 0)

    def judgements_per_sample(self) -> int:
        """How many times, at most, the attack judges one sample (:meth:`AttackBatch.judge`).
        Each judgement costs ``judging_draws`` generations through the target: through the real
        defense, never its surrogate process, so ``validate`` prices them apart from the attack's
        own passes (:func:`harness.suite.attack_passes`)."""
        return 0


@dataclass(frozen=True)
class TrainingAttack:
    """One attack whose adversarial examples a defense trained on: a registered attack plugin
    (``name``) with its suite parameters (``params``, as written: defaults not filled in), at a
    norm and radius. See :attr:`Defense.training_attacks` and :func:`harness.labels.training_label`."""

    name: str
    params: Mapping[str, Any]
    norm: Norm
    eps: float


@runtime_checkable
class CompositeAttack(Protocol):
    """An attack made of other attacks (``ensemble``), all run inside the composite's threat model.

    ``member_attacks()`` lists ``(plugin name, params, instance)`` per member: the name and the
    parameters as the suite wrote them (defaults not filled in) and the created attack. A row of a
    composite counts as seen in training when any member does (:func:`harness.labels.training_label`).
    """

    def member_attacks(self) -> list[tuple[str, Mapping[str, Any], "Attack"]]: ...


class Defense:
    """Base class of defense plugins: ``purify`` images and/or ``rewrite`` prompts.

    Declarations an adaptive attack relies on:
    - ``stochastic``: outputs depend on random draws (an adaptive attack needs EOT).
    - ``differentiable``: ``purify`` lets exact gradients flow; if False, an adaptive attack uses
      BPDA with ``bpda``: ``"identity"`` (purify is the identity on the backward pass) or
      ``"approximate"`` (the backward pass goes through the defense's ``approximate(pixels)``).
    See :mod:`harness.adaptive`.
    """

    stochastic: ClassVar[bool] = False
    """Draws are independent per image of a batch: EOT and N-draw evaluation tile the images and
    purify the copies in one call, so a per-call draw shared by the whole batch is a bug."""
    differentiable: ClassVar[bool] = True
    bpda: ClassVar[str | None] = None
    eot_samples: ClassVar[int] = 1
    """Draws an adaptive attack averages over when ``stochastic`` (a suite's ``eot`` overrides)."""

    def bind(self, victim: "Victim") -> None:
        """Called by the runner with each cell's (loaded) victim before ``purify``/``rewrite``.

        Defenses trained against the victim they protect (CoDefend's purifier and prompt) keep it
        here and train, or load from their cache, now: the runner times ``purify`` per image, and
        that time must not include training. May be called again with another victim; a defense
        must then serve that victim. The default does nothing.
        """

    @property
    def training_attacks(self) -> list[TrainingAttack]:
        """The attacks (plugin, parameters, norm, ε) whose adversarial examples this defense trained
        on. The runner compares each row's attack and threat model with them
        (:func:`harness.labels.training_label`) to label it ``seen``, ``seen-attack-unseen-eps``
        or ``unseen``. Empty (the default) for defenses that never saw an adversarial example."""
        return []

    @property
    def seen_attacks(self) -> list[str]:
        """Names of the attacks whose examples this defense was trained on (recorded per row, so
        a board can tell seen from unseen attacks): the plugin names of :attr:`training_attacks`,
        sorted. Empty for defenses that never saw one."""
        return sorted({attack.name for attack in self.training_attacks})

    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Map [B,3,H,W] pixels in [0,1] to purified pixels of the same shape in [0,1]."""
        return pixels

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        """Map task prompts to defended prompts (a defensive prefix, say)."""
        return list(prompts)

    def soft_prompt(self) -> torch.Tensor | None:
        """Continuous prompt embeddings [tokens, dim] to pass to a :class:`SoftPromptVictim`'s
        ``generate``/``loss`` as ``soft_prompt`` (None: none)."""
        return None

    def passes_per_sample(self) -> int:
        """Network evaluations ``purify`` costs per image (for ``validate`` estimates)."""
        return 0


@dataclass(frozen=True)
class Preparation:
    """A model a component needs trained before it serves (a victim's weights, a diffusion
    backbone, a purifier fine-tuned against the victim), declared so the work graph
    (:mod:`harness.graph`) can run it beside other work, once however many components need it.

    Contract:
    - ``key`` identifies the trained artefact: equal keys are one job (``codefend`` and
      ``codefend-purifier`` with the same purifier parameters share their purifier's job).
    - ``run`` trains the artefact into its cache, or returns at once when it is cached. It runs in a
      worker process (maybe on another machine), so it must pickle: a module-level function or a
      :func:`functools.partial` of one over plain values. It is called as ``run(victim,
      plugins=...)`` when ``needs_victim`` (a loaded victim, for models trained against it) and
      ``run(plugins=...)`` otherwise; ``plugins`` is the run's plugin set, for components it
      creates (hand it to them with ``bind_plugins``).
    - ``run`` is reproducible from ``key``: training the same key again, with the same threads on
      the same machine, gives bit-identical weights (run it under
      :func:`harness.reproducible.deterministic`; PyTorch's CPU defaults are not run-to-run
      stable with several threads).
    - ``after`` lists the keys of preparations that must finish first (a purifier's backbone).
    - ``cost`` is a rough size in victim-equivalent passes (steps x batch x 2 for training), used
      only to order the work and to print the critical path.
    - ``done``, if given, answers cheaply in the driver whether the artefact is already cached (a
      file check, no model load), so that a rerun skips the node without a worker.
    - The component must still work without the graph: its ``bind``/``load`` then finds the
      cache filled, or trains itself (``codefend train`` and tests rely on that).
    """

    key: str
    label: str
    run: Callable[..., Any]
    needs_victim: bool = False
    after: tuple[str, ...] = ()
    cost: float = 0.0
    done: Callable[[], bool] | None = None


@runtime_checkable
class Prepared(Protocol):
    """A victim or defense that declares the training it needs (:class:`Preparation`)."""

    def preparations(self) -> list[Preparation]: ...


@runtime_checkable
class Executor(Protocol):
    """Runs the nodes of a suite's work graph (:mod:`harness.graph`) for the driver
    (:func:`harness.runner.run_suite`), which alone writes the store.

    Contract:
    - The constructor is cheap and acquires nothing (``codefend validate`` builds one to check
      its parameters); :meth:`start` acquires workers (starts or joins Ray); :meth:`close`
      releases them and may be called twice.
    - ``submit(fn, call, resources)`` schedules ``fn(call)`` with at least ``resources`` (a
      :class:`harness.suite.ResourceSpec`) and returns a hashable handle at once. ``fn`` is a
      module-level function and ``call`` pickles; ``fn`` never raises (a node's exception comes
      back as its value), so an exception here means the executor itself failed.
    - :meth:`wait` blocks until at least one submitted call has finished and returns each
      finished ``(handle, value)`` exactly once.
    - A worker that dies mid-call is retried (Ray's task retries) or fails the run; it never
      returns a value twice, so the driver never commits a node twice.
    - ``threads_for(resources)``: the torch threads a call runs with (the driver puts it in the
      call), or None to leave the process's setting alone.
    - ``dashboard_url``: where to watch the run, or None.
    """

    dashboard_url: str | None

    def threads_for(self, resources: Any) -> int | None: ...

    def start(self) -> None: ...

    def submit(self, fn: Callable[[Any], Any], call: Any, resources: Any) -> Any: ...

    def wait(self) -> list[tuple[Any, Any]]: ...

    def close(self) -> None: ...
