"""Turn stored per-sample rows into boards: one table per (victim, task), one row per defense.

Nothing here runs a model: a board is a pure function of the store's scored rows.
"""

from __future__ import annotations

import math

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness.adaptive import GradientRoute
from harness.records import ResultRow
from harness.store import Store
from harness.board import (  # noqa: F401 - re-exported: the board's types are the kernel's
    FLAG_CODES, Board, BoardRow, Condition, ConvergenceCheck, DefendedExample, Example, Flag, Score, Table,
)
from leaderboard.stats import Interval, PairedComparison, bootstrap_ci, paired_comparison

CLEAN = "clean"


def score_of(values: list[float]) -> Score:
    return Score(math.fsum(values) / len(values), len(values), bootstrap_ci(values))


def condition_of(row: ResultRow) -> str:
    """A column: ``clean`` for the no-attack rows; attacks without an ε ball (typographic) and the
    clean N-draw evaluation by their own name; bounded attacks as ``attack@threat``."""
    if row.threat != CLEAN:
        return f"{row.attack}@{row.threat}"
    attack = row.record.attack
    return CLEAN if attack.name == "none" and attack.role == "suite" else row.attack


_ROLE_ORDER = {"clean-n-draw": 1, "suite": 2, "standard": 3, "n-draw": 4, "convergence": 5, "probe": 6}


def _condition_order(condition: str, eps: dict[str, float]) -> tuple:
    return (condition != CLEAN, condition.split("@")[0], eps.get(condition, 0.0), condition)


def build_board(store: Store) -> Board:
    """The board of the store's latest run: the rows its matrix declared, computed or reused
    (:meth:`Store.board_run`; every row in a store from before runs declared theirs)."""
    grouped: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    board_run = store.board_run()
    for row in store.results(scored_only=True, run_id=board_run):
        grouped[(row.victim, row.task)].append(row)
    tables = []
    runs = store.runs()
    skipped = runs[-1]["provenance"].get("skipped_samples", {}) if runs else {}
    for (victim, task), rows in sorted(grouped.items()):
        eps = {condition_of(r): r.eps for r in rows}
        conditions = sorted(eps, key=lambda c: _condition_order(c, eps))
        per_defense: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        costs: dict[str, _DefenseFacts] = defaultdict(_DefenseFacts)
        for r in rows:
            assert r.headline is not None
            per_defense[r.defense][condition_of(r)][r.sample_id] = r.headline
            costs[r.defense].add_row(r)
        details = {c: _condition(c, [r for r in rows if condition_of(r) == c]) for c in conditions}
        conditions.sort(key=lambda c: (c != CLEAN, _ROLE_ORDER.get(details[c].role, 9), _condition_order(c, eps)))
        table = Table(victim=victim, task=task, metric=rows[0].metric, conditions=conditions, details=details,
                      skipped=list(skipped.get(task, [])))
        ranked = {c for c in conditions if table.details[c].ranked}
        for defense, by_condition in per_defense.items():
            scores = {c: score_of(list(v.values())) for c, v in by_condition.items()}
            stronger = {c: v for c, v in by_condition.items() if table.details[c].strengthens}
            worst_samples = per_sample_worst({c: v for c, v in by_condition.items() if c in ranked}, stronger)
            worst = score_of(list(worst_samples.values())) if worst_samples else None
            table.rows.append(BoardRow(defense=defense, scores=scores, worst_case=worst, **costs[defense].summary(),
                                       samples={c: dict(v) for c, v in by_condition.items()}, worst_samples=worst_samples))
        shared = [c for c in table.conditions if c in ranked and all(c in row.samples for row in table.rows)]
        table.shared_conditions = shared
        standard = [c for c in shared if table.details[c].role == "standard"]
        table.adaptive = ", ".join(standard) or None
        if not standard:
            table.no_adaptive_reason = _no_adaptive_reason(store, table)
        reruns = shared_reruns(table)
        for row in table.rows:
            stronger = {c: row.samples[c] for c in reruns}
            row.shared_worst_samples = per_sample_worst({c: row.samples[c] for c in shared}, stronger)
            row.shared_worst_case = score_of(list(row.shared_worst_samples.values())) if row.shared_worst_samples else None
            # rank on what every defense faced plus the defense's own N-draw evaluation, lowered
            # where the convergence re-run (a stronger run of the same attack) broke more: the
            # adaptive attacker's result, and a defense is not demoted for extra attacks
            own = [c for c in row.samples if table.details[c].role == "n-draw"]
            row.robust_samples = per_sample_worst({c: row.samples[c] for c in [*shared, *own]}, stronger)
            row.robust = score_of(list(row.robust_samples.values())) if row.robust_samples else None
            _check_convergence(table, row)
        table.rows.sort(key=lambda r: (-(r.robust.mean if r.robust else float("-inf")), r.defense))
        for upper, lower in zip(table.rows, table.rows[1:]):
            upper.versus_next = paired_comparison(upper.robust_samples, lower.robust_samples)
        table.corpus = _corpus_metrics(store, victim, task, rows)
        table.flags = sanity_flags(table, rows)
        table.examples = _examples(store, table, rows)
        tables.append(table)
    failures = store.failures(runs[-1]["run_id"]) if runs else []
    shown = next((r for r in runs if r["run_id"] == board_run), None)
    return Board(tables=tables, runs=runs, failures=failures, run=shown)


def _corpus_metrics(store: Store, victim: str, task: str, rows: list[ResultRow]) -> dict[str, dict[str, dict[str, float]]]:
    cells: dict[tuple[str, str, str], list[ResultRow]] = defaultdict(list)
    for r in rows:
        cells[(r.attack, r.threat, r.defense)].append(r)
    found: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (attack, threat, defense), members in cells.items():
        metrics = store.corpus_scores((victim, task, attack, threat, defense), [m.fingerprint for m in members])
        if metrics:
            found[defense][condition_of(members[0])] = metrics
    return dict(found)


def per_sample_worst(by_condition: dict[str, dict[str, float]],
                     stronger: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """sample -> its lowest score over the conditions, on the samples evaluated under all of them.

    ``stronger``: conditions that re-attacked some of those samples harder (the convergence
    re-run, :attr:`Condition.strengthens`). A sample they broke counts as broken: the harness's
    own attacker achieved it, and a board that ranked on the weaker run would overstate
    robustness. They lower the samples they cover and add none."""
    if not by_condition:
        return {}
    common = set.intersection(*(set(v) for v in by_condition.values()))
    return {s: min([v[s] for v in by_condition.values()] + [v[s] for v in (stronger or {}).values() if s in v])
            for s in sorted(common)}


def shared_reruns(table: Table) -> list[str]:
    """The conditions that re-attacked ranked samples harder (:attr:`Condition.strengthens`) and
    that every row faced: they lower the ranking score, which never demotes a defense for an
    attack the others did not face."""
    return [c for c in table.conditions
            if table.details[c].strengthens and all(c in row.samples for row in table.rows)]


def _no_adaptive_reason(store: Store, table: Table) -> str:
    """Why a table has no standard adaptive column, from the latest run's suite."""
    for run in reversed(store.runs()):
        suite = run.get("provenance", {}).get("suite", {})
        protocol = suite.get("adaptive") or {}
        if protocol and not protocol.get("enabled", True):
            return f"the suite turned it off: {protocol.get('reason')}"
        only = protocol.get("tasks") if protocol else None
        if only and table.task.split(":")[0] not in only and table.task not in only:
            return f"the suite ran the standard adaptive attack on {', '.join(only)} only"
        if suite:
            break
    return "no standard adaptive attack reached every defense of this table (see docs/leaderboard.md)"


def _check_convergence(table: Table, row: BoardRow) -> None:
    """Carlini's 'run to convergence', per threat model: the re-run with more steps, runs and EOT
    must not find more than the standard attack's interval half-width. A re-run judged over N
    draws is compared with the standard attack's N-draw evaluation (what the ranking uses for
    stochastic defenses), one judged on one draw with the standard attack itself."""
    for condition, detail in table.details.items():
        if detail.role != "convergence" or condition not in row.samples:
            continue
        roles = ("n-draw", "standard") if detail.draws > 1 else ("standard",)
        reference = next((c for role in roles for c, d in table.details.items()
                          if d.role == role and d.threat == detail.threat and c in row.samples), None)
        if reference is None:
            continue
        comparison = paired_comparison(row.samples[condition], row.samples[reference])
        interval = row.scores[reference].ci
        if comparison is None or interval is None:
            continue
        row.convergence[detail.threat] = ConvergenceCheck(
            threat=detail.threat, rerun=condition, reference=reference, comparison=comparison,
            half_width=(interval.high - interval.low) / 2)


def _examples(store: Store, table: Table, rows: list[ResultRow], limit: int = 3) -> list[Example]:
    """The image grid: stored example samples under the strongest oblivious bounded attack."""
    with_images = [r for r in rows if r.record.images is not None]
    if not with_images:
        return []
    none_row = next((row for row in table.rows if row.defense == "none"), table.rows[0])
    candidates = [c for c in table.conditions if c != CLEAN and table.details[c].bounded
                  and table.details[c].mode == "oblivious" and table.details[c].role == "suite" and c in none_row.scores]
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
        example = Example(sample_id, condition, store.artifact(anchor.record.images.clean), adversarial)
        for row, attacked, clean_row in zip(table.rows, attacked_rows, clean_rows):
            example.defenses.append(DefendedExample(
                defense=row.defense,
                defended=store.artifact(attacked.record.images.defended) if attacked and attacked.record.images else None,
                clean_output=clean_row.output if clean_row else None,
                attacked_output=attacked.output if attacked else None,
                attacked_score=attacked.headline if attacked else None,
            ))
        examples.append(example)
    return examples


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


@dataclass
class _DefenseFacts:
    seconds: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    psnr: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ssim: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seen: set[str] = field(default_factory=set)
    seen_other_eps: set[str] = field(default_factory=set)
    stochastic: bool = False

    run_ids: set[str] = field(default_factory=set)
    fingerprints: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    victim_fingerprints: set[str] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)

    def add_row(self, row: ResultRow) -> None:
        condition, record = condition_of(row), row.record
        defense = record.defense
        if defense.seconds_per_image is not None:
            self.seconds.append(defense.seconds_per_image)
        if defense.passes_per_image is not None:
            self.passes.append(float(defense.passes_per_image))
        if defense.psnr is not None:
            self.psnr[condition].append(defense.psnr)
        if defense.ssim is not None:
            self.ssim[condition].append(defense.ssim)
        if record.attack.seen_in_training:
            self.seen.add(condition)
        self.stochastic = self.stochastic or defense.stochastic
        if record.attack.training_label == "seen-attack-unseen-eps":
            self.seen_other_eps.add(condition)
        self.run_ids.add(row.run_id)
        self.fingerprints.append(row.fingerprint)
        self.params = defense.params
        if record.victim_fingerprint:
            self.victim_fingerprints.add(record.victim_fingerprint)
        if record.seed is not None:
            self.seeds.add(record.seed)

    def summary(self) -> dict:
        return {
            "seconds_per_image": _mean(self.seconds),
            "passes_per_image": _mean(self.passes),
            "psnr": {c: v for c, values in sorted(self.psnr.items()) if (v := _mean(values)) is not None},
            "ssim": {c: v for c, values in sorted(self.ssim.items()) if (v := _mean(values)) is not None},
            "seen": set(self.seen),
            "seen_other_eps": set(self.seen_other_eps),
            "stochastic": self.stochastic,
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
    attack, threat = rows[0].record.attack, rows[0].record.threat
    success: dict[str, list[bool]] = defaultdict(list)
    target_text = None
    routes: dict[str, str] = {}
    for r in rows:
        info = r.record.attack
        if info.mode == "adaptive":
            eot = info.eot or 1
            routes[r.defense] = GradientRoute(method=info.gradient or "?", eot=eot, surrogate=info.surrogate_process,
                                              grafted=info.eot_grafting).describe()
            if info.judging_draws > 1:
                routes[r.defense] += f", samples judged over {info.judging_draws} draws"
        if info.targeted:
            target_text = info.targeted.text
            success[r.defense].append(info.targeted.success)
    return Condition(
        name=name,
        access=attack.access,
        mode=attack.mode,
        routes=dict(sorted(routes.items())),
        bounded=threat.bounded,
        eps=rows[0].eps,
        norm=rows[0].norm,
        threat=rows[0].threat,
        max_linf=max(r.record.perturbation.linf for r in rows),
        target_text=target_text,
        target_success={d: sum(v) / len(v) for d, v in sorted(success.items())},
        role=attack.role,
        draws=max(r.record.attack.draws for r in rows),
        surrogate_is_victim=attack.surrogate_is_victim,
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

    outputs: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    # (condition, defense, or None for a shared oblivious attack) -> objectives its attack could not raise
    unavailable: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for r in rows:
        condition = condition_of(r)
        outputs[(r.defense, condition)][r.sample_id] = r.output
        # the N-draw rows judge the standard attack's own examples: its flag covers them
        if (r.record.attack_cost is not None and r.record.attack_cost.objectives_unavailable
                and condition in details and details[condition].role != "n-draw"):
            # an oblivious example is the undefended victim's, shared by every defense: one flag
            defense = r.defense if details[condition].mode == "adaptive" else None
            unavailable[(condition, defense)].update(r.record.attack_cost.objectives_unavailable)
    for defense, row in by_defense.items():
        clean = row.scores.get(CLEAN)
        # 1. an attack at eps = 0 must reproduce the clean score
        for condition, detail in details.items():
            if detail.bounded and detail.eps == 0 and condition != CLEAN and clean and condition in row.samples:
                # outputs, not scores: set-level metrics (CIDEr) score a subset differently
                attacked = outputs[(defense, condition)]
                moved = [s for s, text in attacked.items() if outputs[(defense, CLEAN)].get(s, text) != text]
                # a stochastic defense's draws differ between the two cells: only a significant drop counts
                if moved and (not row.stochastic or significantly_lower(defense, condition, CLEAN)):
                    flags.append(Flag("eps0-not-clean", f"{condition} at ε=0 changed {len(moved)} output(s) "
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
    # 6. the standard adaptive attack must have converged (more steps and EOT find no more)
    for row in table.rows:
        for check in row.convergence.values():
            if not check.converged:
                flags.append(Flag("not-converged", f"{check.rerun} lowers {check.reference} by "
                                  f"{-check.comparison.mean_difference:.3f} on {check.comparison.n} samples, more than "
                                  "its interval's half-width: the adaptive number overstates robustness; raise "
                                  "adaptive.params.steps / adaptive.params.restarts / adaptive.eot", row.defense, check.reference))
    # 7. an attack must have raised the objectives it was declared with
    for (condition, defense), missing in sorted(unavailable.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        flags.append(Flag("objective-unavailable", f"{condition}: the attack could not raise {', '.join(sorted(missing))} "
                          "(the victim does not expose its logits: TargetLogitsVictim) and raised cross-entropy "
                          "instead: a weaker attack than declared", defense, condition))
    # 5. a gradient attack's loss must rise
    for condition, detail in details.items():
        if detail.access != "white-box" or condition == CLEAN or (detail.bounded and detail.eps == 0):
            continue  # at ε = 0 nothing can move
        firsts, lasts = [], []
        for r in rows:
            if condition_of(r) == condition:
                cost = r.record.attack_cost
                if cost is not None and cost.loss_first is not None and cost.loss_last is not None:
                    firsts.append(cost.loss_first)
                    lasts.append(cost.loss_last)
        # an untargeted attack raises the loss of the reference; a targeted one lowers the target's
        direction = -1.0 if detail.target_text else 1.0
        if firsts and direction * (sum(lasts) - sum(firsts)) <= 0:
            want = "fall" if detail.target_text else "rise"
            flags.append(Flag("loss-did-not-rise", f"{condition}: the attack loss went from {sum(firsts) / len(firsts):.3f} "
                              f"to {sum(lasts) / len(lasts):.3f} (it should {want}); the attack did not optimise", None, condition))
    return flags
