"""The leaderboard's data types, owned by the kernel: what ``leaderboard.aggregate.build_board``
builds from a store and every reporter plugin (``register_reporters``) renders. Reporters depend
on these types, never on how a board is aggregated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONFIDENCE = 0.95
"""The level of every interval and test on a board."""
MIN_SAMPLES = 10
"""Fewer paired samples than this are never called significant (a bootstrap of 2 samples says
nothing, whatever its interval)."""


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class PairedComparison:
    """``a`` against ``b`` on the samples both were evaluated on."""

    n: int
    mean_difference: float
    """mean(a − b): positive when ``a`` scores higher."""
    interval: Interval
    p_value: float
    test: str
    """``mcnemar-exact`` for 0/1 scores, ``paired-bootstrap`` otherwise (the p-value is then the
    two-sided bootstrap share of differences on the other side of zero)."""

    @property
    def significant(self) -> bool:
        """The difference is significant at 1 − CONFIDENCE: its p-value (McNemar's exact test, or
        the paired bootstrap's) is below 0.05. One criterion, so that the word beside a p-value
        never contradicts it."""
        if self.n < MIN_SAMPLES:
            return False
        return self.p_value < 1 - CONFIDENCE


@dataclass(frozen=True)
class Score:
    mean: float
    n: int
    ci: Interval | None = None
    """95% bootstrap interval of the mean (see :mod:`leaderboard.stats`)."""


#: Every sanity flag's code (the JSON schema's enum must list exactly these: tests check it).
FLAG_CODES = ("eps0-not-clean", "score-rises-with-eps", "large-eps-not-broken", "gradient-masking",
              "loss-did-not-rise", "not-converged", "objective-unavailable")


@dataclass(frozen=True)
class Flag:
    """A sanity check (Carlini et al. 2019's checklist) that failed on the stored rows."""

    code: str
    """One of :data:`FLAG_CODES`."""
    message: str
    defense: str | None = None
    """The defense row it concerns (None: the whole condition)."""
    condition: str | None = None

    def __post_init__(self) -> None:
        if self.code not in FLAG_CODES:
            raise ValueError(f"unknown sanity flag code {self.code!r}: add it to FLAG_CODES and the JSON schema")


@dataclass
class BoardRow:
    defense: str
    scores: dict[str, Score]
    worst_case: Score | None
    """Per-sample minimum over every condition (clean included), averaged over the samples that
    were evaluated under all of them — not a minimum of averages."""
    seconds_per_image: float | None = None
    """Mean wall time of the defense's ``purify`` per image (over the board's rows)."""
    passes_per_image: float | None = None
    """Network evaluations ``purify`` costs per image, as the defense declares it."""
    psnr: dict[str, float] = field(default_factory=dict)
    """condition -> mean PSNR (dB) of the defense's output against the clean image (finite
    values only: an untouched clean image has none)."""
    ssim: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    """Conditions whose attack this defense saw in training (its numbers there are not held out)."""
    seen_other_eps: set[str] = field(default_factory=set)
    """Conditions whose attack (plugin, defining parameters, norm) it trained on at another ε."""
    samples: dict[str, dict[str, float]] = field(default_factory=dict)
    """condition -> sample id -> headline score (what paired statistics and flags use)."""
    worst_samples: dict[str, float] = field(default_factory=dict)
    """sample id -> the per-sample worst case."""
    shared_worst_case: Score | None = None
    """The per-sample worst case over the conditions *every* row of the table was evaluated
    under: the fair ranking key when some defenses also faced extra (adaptive) attacks."""
    shared_worst_samples: dict[str, float] = field(default_factory=dict)
    stochastic: bool = False
    """The defense draws randomness per call (its rows say so)."""
    robust: Score | None = None
    """The ranking key: per sample, the worst over every ranked condition this row faced (the
    ones all rows faced, the standard adaptive attack among them, plus its own N-draw
    evaluation), averaged. Without an adaptive evaluation it is the shared worst case."""
    robust_samples: dict[str, float] = field(default_factory=dict)
    convergence: dict[str, "ConvergenceCheck"] = field(default_factory=dict)
    """threat model -> the convergence check of the standard adaptive attack under it (a threat
    the re-run did not cover has none)."""
    versus_next: PairedComparison | None = None
    """This row against the next one down, on their robust (ranking) scores."""
    provenance: dict = field(default_factory=dict)
    """run ids, seeds, victim fingerprints, defense params and a digest of the rows behind it."""

    @property
    def converged(self) -> bool | None:
        """Whether the standard adaptive score held, under every threat model its convergence
        re-run covered, when steps, runs and EOT were multiplied (None: never checked)."""
        return all(check.converged for check in self.convergence.values()) if self.convergence else None


@dataclass(frozen=True)
class ConvergenceCheck:
    """Carlini's "run to convergence" for one defense under one threat model: the larger-budget
    re-run of the standard attack against the standard attack, on the re-run's samples."""

    threat: str
    rerun: str
    """The re-run's condition."""
    reference: str
    """The condition it is compared with: the standard attack's N-draw evaluation when the re-run
    is judged over N draws (stochastic defenses), else the standard attack."""
    comparison: PairedComparison
    """re-run minus reference, paired on the re-run's samples."""
    half_width: float
    """Half the width of the reference's interval: the largest fall that still counts as converged."""

    @property
    def converged(self) -> bool:
        return self.comparison.mean_difference >= -self.half_width


@dataclass
class Condition:
    """What a column means: how its attack reached the model, and what it achieved."""

    name: str
    access: str  # white-box | transfer | query | none
    mode: str  # oblivious | adaptive
    routes: dict[str, str]
    """Adaptive only: defense -> how the gradient went through it (exact | bpda-identity |
    bpda-approximate, with EOT draws)."""
    bounded: bool
    eps: float
    max_linf: float
    """Largest L∞ perturbation measured on the stored pixels (≤ eps for bounded attacks)."""
    target_text: str | None = None
    target_success: dict[str, float] = field(default_factory=dict)
    """defense -> share of samples whose output contains the target text (targeted attacks)."""
    norm: str = "linf"
    threat: str = "clean"
    role: str = "suite"
    """``suite`` (the suite's own attacks), or what the harness added: ``standard`` (the standard
    adaptive attack), ``n-draw``, ``clean-n-draw``, ``convergence``, ``probe``."""
    draws: int = 1
    surrogate_is_victim: bool = False
    """A transfer attack whose surrogate is the victim: labelled (and checked as) white-box."""

    @property
    def ranked(self) -> bool:
        """Whether the condition enters worst cases and the ranking (diagnostics do not)."""
        return self.role in ("suite", "standard", "n-draw")

    @property
    def strengthens(self) -> bool:
        """Whether the condition re-attacks some of the ranked samples harder (the convergence
        re-run): where it covers a sample it lowers that sample's worst case and ranking score,
        and it never narrows the samples they are averaged over (it covers only a subset)."""
        return self.role == "convergence"


@dataclass
class DefendedExample:
    defense: str
    defended: Any | None
    """[3,H,W] float array in [0,1]: what the victim saw under the attack (None if not stored)."""
    clean_output: str | None
    attacked_output: str | None
    attacked_score: float | None


@dataclass
class Example:
    """One sample of the board's image grid: clean, attacked, and each defense's output."""

    sample_id: str
    condition: str
    clean: Any
    adversarial: Any | None
    defenses: list[DefendedExample] = field(default_factory=list)


@dataclass
class Table:
    victim: str
    task: str
    metric: str
    conditions: list[str]
    rows: list[BoardRow] = field(default_factory=list)
    details: dict[str, Condition] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    shared_conditions: list[str] = field(default_factory=list)
    """Ranked conditions every row was evaluated under."""
    adaptive: str | None = None
    """The standard adaptive condition(s) every row faced, comma-separated (None: no adaptive
    evaluation on this table)."""
    no_adaptive_reason: str | None = None
    corpus: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """defense -> condition -> the cell's set-level metrics (:class:`harness.contracts.CorpusScoredTask`),
    where the store has them for exactly the cell's rows."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Samples the task's reader left out as malformed in the latest run (``on_bad_sample: skip``):
    :class:`harness.contracts.SkippedSample` records, counted beside n."""

    def skipped_note(self, shown: int = 5) -> str | None:
        """Plain text counting the skipped samples, the first ``shown`` with their problems."""
        if not self.skipped:
            return None
        listed = "; ".join(f"{s['id']}: {s['problem']}" for s in self.skipped[:shown])
        more = f"; and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return (f"{len(self.skipped)} malformed sample(s) of {self.task} left out (on_bad_sample: skip), "
                f"not in n: {listed}{more}")

    def flags_for(self, defense: str, condition: str | None = None) -> list[Flag]:
        return [f for f in self.flags if f.defense in (defense, None) and (condition is None or f.condition == condition)]


@dataclass
class Board:
    tables: list[Table]
    runs: list[dict]
    failures: list[dict] = field(default_factory=list)
    """Cells of the latest run that failed (their rows are never scored), with their errors."""
    run: dict | None = None
    """The run whose rows the board shows (:meth:`harness.store.Store.board_run`): its id, suite
    and status; None for a store from before runs declared their rows (every row is shown)."""

    def run_note(self) -> str | None:
        """Plain text for the top of the board when its rows are not one finished run's: the run
        has not finished, or the store's runs predate declared rows (None otherwise)."""
        if self.run is None:
            if len(self.runs) <= 1:
                return None
            return (f"This store's {len(self.runs)} runs predate declared rows: the board reads every row any of them "
                    "stored, the newest per sample winning, including rows of earlier code or of samples, attacks and "
                    "defenses a suite has since dropped. Run the suite again to show one run's rows.")
        if self.run["status"].startswith("finished"):
            return None
        return (f"Run {self.run['run_id']} has not finished (status: {self.run['status']}): this board shows the rows "
                "of its matrix scored so far; cells still missing are not on it.")
