"""Turn stored per-sample rows into boards: one table per (victim, task), one row per defense.

Nothing here runs a model: a board is a pure function of the store's scored rows.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness.store import ResultRow, Store
from leaderboard.stats import Interval, PairedComparison, bootstrap_ci, paired_comparison

CLEAN = "clean"


@dataclass(frozen=True)
class Score:
    mean: float
    n: int
    ci: Interval | None = None
    """95% bootstrap interval of the mean (see :mod:`leaderboard.stats`)."""


def score_of(values: list[float]) -> Score:
    return Score(sum(values) / len(values), len(values), bootstrap_ci(values))


@dataclass(frozen=True)
class Flag:
    """A sanity check (Carlini et al. 2019's checklist) that failed on the stored rows."""

    code: str
    """``eps0-not-clean`` | ``score-rises-with-eps`` | ``large-eps-not-broken`` |
    ``gradient-masking`` | ``loss-did-not-rise``"""
    message: str
    defense: str | None = None
    """The defense row it concerns (None: the whole condition)."""
    condition: str | None = None


@dataclass
class BoardRow:
    defense: str
    scores: dict[str, Score]
    worst_case: Score | None
    """Per-sample minimum over every condition (clean included), averaged over the samples that
    were evaluated under all of them — not a minimum of averages."""
    seconds_per_image: float | None = None
    """Mean wall time of the defense's ``purify`` per image (over every stored row)."""
    passes_per_image: float | None = None
    """Network evaluations ``purify`` costs per image, as the defense declares it."""
    psnr: dict[str, float] = field(default_factory=dict)
    """condition -> mean PSNR (dB) of the defense's output against the clean image (finite
    values only: an untouched clean image has none)."""
    ssim: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    """Conditions whose attack this defense saw in training (its numbers there are not held out)."""
    samples: dict[str, dict[str, float]] = field(default_factory=dict)
    """condition -> sample id -> headline score (what paired statistics and flags use)."""
    worst_samples: dict[str, float] = field(default_factory=dict)
    """sample id -> the per-sample worst case."""
    shared_worst_case: Score | None = None
    """The per-sample worst case over the conditions *every* row of the table was evaluated
    under: the fair ranking key when some defenses also faced extra (adaptive) attacks."""
    shared_worst_samples: dict[str, float] = field(default_factory=dict)
    versus_next: PairedComparison | None = None
    """This row against the next one down, on their per-sample worst cases."""
    provenance: dict = field(default_factory=dict)
    """run ids, seeds, victim fingerprints, defense params and a digest of the rows behind it."""


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
    """Conditions every row was evaluated under (the ranking's worst case is over these)."""

    def flags_for(self, defense: str, condition: str | None = None) -> list[Flag]:
        return [f for f in self.flags if f.defense in (defense, None) and (condition is None or f.condition == condition)]


@dataclass
class Board:
    tables: list[Table]
    runs: list[dict]


def condition_of(row: ResultRow) -> str:
    """A column: ``clean`` for the no-attack rows; attacks without an ε ball (typographic) by
    their own name; bounded attacks as ``attack@threat``."""
    if row.threat != CLEAN:
        return f"{row.attack}@{row.threat}"
    return CLEAN if row.record.get("attack", {}).get("name", "none") == "none" else row.attack


def _condition_order(condition: str, eps: dict[str, float]) -> tuple:
    return (condition != CLEAN, condition.split("@")[0], eps.get(condition, 0.0), condition)


def build_board(store: Store) -> Board:
    grouped: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for row in store.results(scored_only=True):
        grouped[(row.victim, row.task)].append(row)
    tables = []
    for (victim, task), rows in sorted(grouped.items()):
        eps = {condition_of(r): r.eps for r in rows}
        conditions = sorted(eps, key=lambda c: _condition_order(c, eps))
        per_defense: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        costs: dict[str, _DefenseFacts] = defaultdict(_DefenseFacts)
        for r in rows:
            assert r.headline is not None
            per_defense[r.defense][condition_of(r)][r.sample_id] = r.headline
            costs[r.defense].add_row(r)
        table = Table(victim=victim, task=task, metric=rows[0].metric, conditions=conditions,
                      details={c: _condition(c, [r for r in rows if condition_of(r) == c]) for c in conditions})
        for defense, by_condition in per_defense.items():
            scores = {c: score_of(list(v.values())) for c, v in by_condition.items()}
            common = sorted(set.intersection(*(set(v) for v in by_condition.values())))
            worst_samples = {s: min(by_condition[c][s] for c in by_condition) for s in common}
            worst = score_of(list(worst_samples.values())) if worst_samples else None
            table.rows.append(BoardRow(defense=defense, scores=scores, worst_case=worst, **costs[defense].summary(),
                                       samples={c: dict(v) for c, v in by_condition.items()}, worst_samples=worst_samples))
        shared = [c for c in table.conditions if all(c in row.samples for row in table.rows)]
        table.shared_conditions = shared
        for row in table.rows:
            common_samples = sorted(set.intersection(*(set(row.samples[c]) for c in shared))) if shared else []
            row.shared_worst_samples = {s: min(row.samples[c][s] for c in shared) for s in common_samples}
            row.shared_worst_case = score_of(list(row.shared_worst_samples.values())) if common_samples else None
        # rank on what every defense faced; a defense is not demoted for having been tested harder
        table.rows.sort(key=lambda r: (-(r.shared_worst_case.mean if r.shared_worst_case else float("-inf")), r.defense))
        for upper, lower in zip(table.rows, table.rows[1:]):
            upper.versus_next = paired_comparison(upper.shared_worst_samples, lower.shared_worst_samples)
        table.flags = sanity_flags(table, rows)
        table.examples = _examples(store, table, rows)
        tables.append(table)
    return Board(tables=tables, runs=store.runs())


def _examples(store: Store, table: Table, rows: list[ResultRow], limit: int = 3) -> list[Example]:
    """The image grid: stored example samples under the strongest oblivious bounded attack."""
    with_images = [r for r in rows if "images" in r.record]
    if not with_images:
        return []
    none_row = next((row for row in table.rows if row.defense == "none"), table.rows[0])
    candidates = [c for c in table.conditions if c != CLEAN and table.details[c].bounded
                  and table.details[c].mode == "oblivious" and c in none_row.scores]
    condition = min(candidates, key=lambda c: none_row.scores[c].mean) if candidates else CLEAN
    by_key = {(condition_of(r), r.defense, r.sample_id): r for r in with_images}
    sample_ids = sorted({r.sample_id for r in with_images if condition_of(r) == condition})[:limit]
    examples = []
    for sample_id in sample_ids:
        attacked_rows = [by_key.get((condition, row.defense, sample_id)) for row in table.rows]
        clean_rows = [by_key.get((CLEAN, row.defense, sample_id)) for row in table.rows]
        anchor = next(r for r in attacked_rows if r is not None)
        adversarial = None
        if anchor.adversarial_key:
            stored = store.adversarial([anchor.adversarial_key])
            adversarial = stored[anchor.adversarial_key][0] if stored else None
        example = Example(sample_id, condition, store.artifact(anchor.record["images"]["clean"]), adversarial)
        for row, attacked, clean_row in zip(table.rows, attacked_rows, clean_rows):
            example.defenses.append(DefendedExample(
                defense=row.defense,
                defended=store.artifact(attacked.record["images"]["defended"]) if attacked else None,
                clean_output=clean_row.output if clean_row else None,
                attacked_output=attacked.output if attacked else None,
                attacked_score=attacked.headline if attacked else None,
            ))
        examples.append(example)
    return examples


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class _DefenseFacts:
    seconds: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    psnr: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ssim: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seen: set[str] = field(default_factory=set)

    run_ids: set[str] = field(default_factory=set)
    fingerprints: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    victim_fingerprints: set[str] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)

    def add_row(self, row: ResultRow) -> None:
        condition, record = condition_of(row), row.record
        defense = record.get("defense", {})
        if defense.get("seconds_per_image") is not None:
            self.seconds.append(float(defense["seconds_per_image"]))
        if defense.get("passes_per_image") is not None:
            self.passes.append(float(defense["passes_per_image"]))
        if defense.get("psnr") is not None:
            self.psnr[condition].append(float(defense["psnr"]))
        if defense.get("ssim") is not None:
            self.ssim[condition].append(float(defense["ssim"]))
        if record.get("attack", {}).get("seen_in_training"):
            self.seen.add(condition)
        self.run_ids.add(row.run_id)
        self.fingerprints.append(row.fingerprint)
        self.params = row.record.get("defense", {}).get("params", self.params)
        if row.record.get("victim_fingerprint"):
            self.victim_fingerprints.add(row.record["victim_fingerprint"])
        if row.record.get("seed") is not None:
            self.seeds.add(int(row.record["seed"]))

    def summary(self) -> dict:
        return {
            "seconds_per_image": _mean(self.seconds),
            "passes_per_image": _mean(self.passes),
            "psnr": {c: v for c, values in sorted(self.psnr.items()) if (v := _mean(values)) is not None},
            "ssim": {c: v for c, values in sorted(self.ssim.items()) if (v := _mean(values)) is not None},
            "seen": set(self.seen),
            "provenance": {
                "run_ids": sorted(self.run_ids),
                "seeds": sorted(self.seeds),
                "victim_fingerprints": sorted(self.victim_fingerprints),
                "defense_params": self.params,
                # one digest over every stored row behind this defense's numbers
                "results_digest": hashlib.sha256("".join(sorted(self.fingerprints)).encode()).hexdigest()[:16],
                "rows": len(self.fingerprints),
            },
        }


def _condition(name: str, rows: list[ResultRow]) -> Condition:
    attack = rows[0].record.get("attack", {})
    threat = rows[0].record.get("threat", {})
    success: dict[str, list[bool]] = defaultdict(list)
    target_text = None
    routes: dict[str, str] = {}
    for r in rows:
        info = r.record.get("attack", {})
        if info.get("mode") == "adaptive":
            eot = info.get("eot") or 1
            routes[r.defense] = info.get("gradient", "?") + (f", EOT {eot}" if eot > 1 else "")
        targeted = r.record.get("attack", {}).get("targeted")
        if targeted:
            target_text = targeted["text"]
            success[r.defense].append(bool(targeted["success"]))
    return Condition(
        name=name,
        access=attack.get("access", "none"),
        mode=attack.get("mode", "oblivious"),
        routes=dict(sorted(routes.items())),
        bounded=threat.get("bounded", True),
        eps=rows[0].eps,
        norm=rows[0].norm,
        threat=rows[0].threat,
        max_linf=max(r.record.get("perturbation", {}).get("linf", 0.0) for r in rows),
        target_text=target_text,
        target_success={d: sum(v) / len(v) for d, v in sorted(success.items())},
    )


# -- sanity flags (Carlini et al. 2019, "On Evaluating Adversarial Robustness", section 5) ----------

LARGE_EPS = {"linf": 64 / 255, "l2": 8.0}
"""Radii at which an unbounded-enough white-box attack must drive an undefended victim near zero."""
NEAR_ZERO = 0.1
"""'Near zero': at most this share of the clean score."""


def sanity_flags(table: Table, rows: list[ResultRow]) -> list[Flag]:
    """Every check the stored rows allow; a check whose inputs the suite did not run is skipped."""
    flags: list[Flag] = []
    details = table.details
    by_defense = {row.defense: row for row in table.rows}

    def significantly_lower(defense: str, low: str, high: str) -> PairedComparison | None:
        row = by_defense[defense]
        if low not in row.samples or high not in row.samples:
            return None
        comparison = paired_comparison(row.samples[low], row.samples[high])
        return comparison if comparison and comparison.mean_difference < 0 and comparison.significant else None

    for defense, row in by_defense.items():
        clean = row.scores.get(CLEAN)
        # 1. an attack at eps = 0 must reproduce the clean score
        for condition, detail in details.items():
            if detail.bounded and detail.eps == 0 and condition != CLEAN and clean and condition in row.samples:
                moved = [s for s, v in row.samples[condition].items() if row.samples[CLEAN].get(s, v) != v]
                if moved:
                    flags.append(Flag("eps0-not-clean", f"{condition} at ε=0 changed {len(moved)} sample score(s) "
                                      "from clean: the attack or the pipeline is not deterministic", defense, condition))
        # 2. scores must not rise with eps (same attack, same norm)
        sweeps: dict[tuple[str, str, str], list[tuple[float, str]]] = defaultdict(list)
        for condition, detail in details.items():
            if condition in row.samples and detail.bounded and condition != CLEAN:
                sweeps[(condition.split("@")[0], detail.norm, detail.mode)].append((detail.eps, condition))
        for (attack, _norm, _mode), points in sweeps.items():
            points.sort()
            for (eps_small, small), (eps_large, large) in zip(points, points[1:]):
                if eps_large > eps_small and significantly_lower(defense, small, large):
                    flags.append(Flag("score-rises-with-eps", f"{attack}: the score at ε={eps_large * 255:.3g}/255 is "
                                      f"significantly higher than at ε={eps_small * 255:.3g}/255", defense, large))
        # 3. a large white-box eps must break the undefended victim
        if defense == "none" and clean:
            for condition, detail in details.items():
                if (detail.bounded and detail.access == "white-box" and condition in row.scores
                        and detail.eps >= LARGE_EPS.get(detail.norm, float("inf"))
                        and row.scores[condition].mean > NEAR_ZERO * clean.mean):
                    flags.append(Flag("large-eps-not-broken", f"{condition}: the undefended victim keeps "
                                      f"{row.scores[condition].mean:.3f} at ε={detail.eps * 255:.3g}/255; a working "
                                      "attack drives it near zero", defense, condition))
        # 4. weaker access must not beat white-box access (else: possible gradient masking). For a
        # defense, an oblivious attack made on the bare victim is a transfer attack.
        strong = [c for c, d in details.items() if d.access == "white-box" and d.bounded and c in row.samples
                  and (d.mode == "adaptive" or defense == "none")]
        weak = [c for c, d in details.items() if d.bounded and c in row.samples and c != CLEAN
                and (d.access in ("query", "transfer") or (d.mode == "oblivious" and defense != "none"))]
        for w_condition in weak:
            for s_condition in strong:
                if w_condition == s_condition:
                    continue
                wd, sd = details[w_condition], details[s_condition]
                if wd.norm != sd.norm or wd.eps > sd.eps + 1e-12:
                    continue
                comparison = significantly_lower(defense, w_condition, s_condition)
                if comparison:
                    kind = wd.access if wd.access != "white-box" else "transfer from the undefended victim"
                    flags.append(Flag("gradient-masking", f"{w_condition} ({kind}) beats the white-box {s_condition} "
                                      f"by {-comparison.mean_difference:.3f} ({comparison.test}, p={comparison.p_value:.2g}): "
                                      "possible gradient masking", defense, s_condition))
    # 5. a gradient attack's loss must rise
    for condition, detail in details.items():
        if detail.access != "white-box" or condition == CLEAN:
            continue
        firsts, lasts = [], []
        for r in rows:
            if condition_of(r) == condition:
                cost = r.record.get("attack_cost", {})
                if cost.get("loss_first") is not None and cost.get("loss_last") is not None:
                    firsts.append(float(cost["loss_first"]))
                    lasts.append(float(cost["loss_last"]))
        # an untargeted attack raises the loss of the reference; a targeted one lowers the target's
        direction = -1.0 if detail.target_text else 1.0
        if firsts and direction * (sum(lasts) - sum(firsts)) <= 0:
            want = "fall" if detail.target_text else "rise"
            flags.append(Flag("loss-did-not-rise", f"{condition}: the attack loss went from {sum(firsts) / len(firsts):.3f} "
                              f"to {sum(lasts) / len(lasts):.3f} (it should {want}); the attack did not optimise", None, condition))
    return flags
