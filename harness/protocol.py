"""The standard adaptive protocol: what every defense in a suite faces by default.

A robustness number measured with attacks that never saw the defense overstates robustness
(Carlini et al. 2019; Tramèr et al. 2020). So the runner adds, for every defense and every bounded
threat model of a suite, a *standard adaptive attack* through ``defense ∘ victim``, and the board
ranks on what it achieves. Its gradient route is the defense's own declaration
(:mod:`harness.adaptive`): exact gradients through differentiable defenses, BPDA through the
others, EOT over the randomness of stochastic ones.

The protocol is declared here, once. Each default, and why:

- ``attack: apgd`` with ``steps: 100``: Auto-PGD on the victim's teacher-forced text loss, the
  attack of RobustVLM (chs20/RobustVLM: APGD-100 on the text loss) and of AutoAttack's "rand"
  version (APGD with EOT); its step-size schedule needs no tuning per defense. 100 iterations is
  both protocols' budget; Lee & Kim (ICCV 2023) use 200 PGD iterations through purification.
- ``restarts: 1``: one more APGD run on the samples the first run left
  unbroken, keeping each sample's worst case (AutoAttack runs several attacks and keeps each
  sample's worst; its APGD restarts). On the offline world a random restart breaks questions the
  zero-start run leaves standing, for JPEG and for the CoDefend pipeline
  (docs/results/attack-strength.md); it costs up to one more run on the samples that survive.
  Through a stochastic defense the attack judges a sample as the board does, over the ``draws``
  below (the mean score over N purification draws): the restart attacks every sample some draw
  still answers, and each sample keeps the run whose example fails more of its draws. Judged on
  one draw, a sample that draw happened to break was never restarted, though most of its N draws
  answered it (docs/results/attack-strength.md: one question more of 40 on the purifier and on
  DiffPure-DDIM, ~10% more time).
- ``objectives: [ce, dlr]``: the first run raises the cross-entropy of the reference answer, the
  restart the DLR margin of its tokens (:mod:`harness.objectives`), from the same start: AutoAttack
  follows APGD-CE with APGD-DLR, because cross-entropy stalls where the model is sure of its
  answer. On the offline world (40 questions, docs/results/attack-strength.md) the undefended
  victim's score falls from 0.2425 (APGD-100 on cross-entropy, with one or four random restarts)
  to 0.2000 with a DLR restart, JPEG's (APGD-20) from 0.2025 to 0.1775; through the stochastic
  purifiers it finds what a cross-entropy restart finds, within one question. The restart costs
  what it did; comparing its examples on cross-entropy costs one forward pass. The convergence re-run's doubled runs
  alternate the two. A victim that does not expose its logits
  (:class:`~harness.contracts.TargetLogitsVictim`) gets cross-entropy runs, with a warning, and
  the board flags its adaptive rows ``objective-unavailable``: weaker than the protocol declares.
  A suite that sets other ``params`` of the standard attack keeps these defaults for the keys it
  does not set (``params: {steps: 20}`` still restarts once, with DLR).
- ``eot: 20``: AutoAttack "rand" and DiffPure's own adaptive evaluation average 20 draws per
  gradient; Lee & Kim recommend EOT 20 for diffusion purification. Deterministic defenses get 1.
- ``draws: 10``: DiffHammer (NeurIPS 2024) evaluates by resubmission: a sample is robust only if
  it survives every one of N purification draws (one draw hides vulnerabilities that 32-46% of
  samples have in only some draws). The board shows the single-draw number, the N-draw number
  and the clean N-draw number (how often randomness alone flips an answer).
- ``samples: 100``: the adaptive attack costs EOT × steps passes per sample, so it may run on a
  seeded subset of each task (the first ``samples`` of the task's own seeded subset), which gets
  its own interval. DiffHammer evaluates on 100-512 images.
- ``convergence``: Carlini's checklist asks for attacks run to convergence. The standard attack
  is re-run on the first ``samples`` of that subset with ``factor`` × the steps, ``factor`` ×
  the EOT and ``factor`` × the runs (restarts + 1), and judged over ``draws`` purification draws
  like the N-draw number the board ranks on; a defense whose score then falls by more than the
  half-width of its adaptive interval (the N-draw one for stochastic defenses) is flagged
  ``not-converged``. The re-run is also an attack: on the samples it covers, the board's ranking
  score counts what it broke (a sample survives only if it survives both runs), so the harness
  never ranks on less than its own attacker achieved. On the offline world a larger EOT leaves the purifier's single-draw score
  where it was and still lowers its 10-draw score (docs/results/attack-strength.md), so a check
  on one draw would miss what the ranking sees. The runs count because on
  the offline world's undefended victim more restarts find what more steps do not
  (docs/results/attack-strength.md).
- ``surrogate_steps``: off by default (exact gradients through the whole sampler, with gradient
  checkpointing so memory does not grow with its length). When set, a defense that offers a
  cheaper surrogate process (:class:`~harness.contracts.SurrogateProcessDefense`) with more
  network calls than this is attacked through that surrogate (Lee & Kim: same noise level,
  fewer denoising steps); the evaluation still runs the real defense, and the board labels it.
- ``grafting``: off by default (the exact EOT gradient: one backward pass through the defense per
  draw). When on, the EOT draws' gradients at the purified images are averaged and sent back
  through one draw's purification (DiffHammer's gradient grafting, :mod:`harness.adaptive`): one
  backward pass through the sampler per step instead of ``eot``. It is an approximation where the
  purifier's Jacobian depends on its noise; the board labels it, and
  docs/results/attack-strength.md measures it against the exact gradient.

A suite changes any of these under ``adaptive:``, or turns the protocol off with
``adaptive: {enabled: false, reason: "..."}``; the board then says "no adaptive evaluation" and
gives the reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

STANDARD_ATTACK = "apgd"
"""Registry name of the standard adaptive attack (the kernel names it; it never imports it)."""

STANDARD_PARAMS: dict[str, Any] = {"steps": 100, "restarts": 1, "objectives": ["ce", "dlr"]}
"""The standard attack's parameters (a suite's ``params`` override them key by key)."""

STANDARD_LABEL = "adaptive"
"""The label of its column: conditions read ``adaptive@<threat>``."""


class Convergence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    samples: int = Field(default=25, gt=0)
    """Samples re-attacked with the larger budget (the first of the adaptive subset)."""
    factor: int = Field(default=2, ge=2)
    """Multiplier of the steps and of the EOT draws."""


class AdaptiveProtocol(BaseModel):
    """A suite's ``adaptive:`` section (every key optional; see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    reason: str | None = None
    """Why the protocol is off (required with ``enabled: false``; shown on the board)."""
    attack: str = STANDARD_ATTACK
    params: dict[str, Any] = Field(default_factory=lambda: dict(STANDARD_PARAMS))
    """The attack's parameters; for the standard attack, :data:`STANDARD_PARAMS` fill the keys a
    suite leaves out."""
    eot: int = Field(default=20, gt=0)
    draws: int = Field(default=10, gt=0)
    samples: int | None = Field(default=100, gt=0)
    """Seeded subset per task (None: every sample the task evaluates)."""
    threats: list[str] | None = None
    """Threat-model names to run it under (default: every bounded threat model of the suite)."""
    tasks: list[str] | None = None
    """Tasks to run it on (names or labels; default: every task). A task left out gets no
    adaptive evaluation, and its board says so."""
    surrogate_steps: int | None = Field(default=None, gt=0)
    grafting: bool = False
    convergence: Convergence = Field(default_factory=Convergence)

    @model_validator(mode="after")
    def _standard_defaults(self) -> "AdaptiveProtocol":
        if self.attack == STANDARD_ATTACK:
            self.params = {**STANDARD_PARAMS, **self.params}
        return self

    @model_validator(mode="after")
    def _reason_when_off(self) -> "AdaptiveProtocol":
        if not self.enabled and not (self.reason and self.reason.strip()):
            raise ValueError(
                "turning the standard adaptive attack off needs a reason: "
                "adaptive: {enabled: false, reason: \"...\"} (the board shows it)"
            )
        return self

    def steps_param(self) -> str | None:
        """The attack parameter that counts iterations (scaled by the convergence check)."""
        return "steps" if "steps" in self.params or self.attack in ("apgd", "pgd") else None


class SanityProbes(BaseModel):
    """``sanity_probes: true`` adds Carlini's checklist probes on the undefended victim: every
    bounded attack at ε = 0 (must reproduce the clean score through its real code path) and the
    standard attack at a large ε (must drive the victim near zero)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    large_eps: float = 64 / 255
    samples: int | None = Field(default=50, gt=0)
