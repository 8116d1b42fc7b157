"""Turn stored per-sample rows into boards: one table per (victim, task), one row per defense.

Nothing here runs a model: a board is a pure function of the store's scored rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from harness.store import ResultRow, Store

CLEAN = "clean"


@dataclass(frozen=True)
class Score:
    mean: float
    n: int


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


@dataclass
class Table:
    victim: str
    task: str
    metric: str
    conditions: list[str]
    rows: list[BoardRow] = field(default_factory=list)
    details: dict[str, Condition] = field(default_factory=dict)


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
        costs: dict[str, _Costs] = defaultdict(_Costs)
        for r in rows:
            assert r.headline is not None
            per_defense[r.defense][condition_of(r)][r.sample_id] = r.headline
            costs[r.defense].add(condition_of(r), r.record)
        table = Table(victim=victim, task=task, metric=rows[0].metric, conditions=conditions,
                      details={c: _condition(c, [r for r in rows if condition_of(r) == c]) for c in conditions})
        for defense, by_condition in per_defense.items():
            scores = {c: Score(sum(v.values()) / len(v), len(v)) for c, v in by_condition.items()}
            common = set.intersection(*(set(v) for v in by_condition.values()))
            worst = None
            if common:
                worst_values = [min(by_condition[c][s] for c in by_condition) for s in common]
                worst = Score(sum(worst_values) / len(worst_values), len(worst_values))
            table.rows.append(BoardRow(defense=defense, scores=scores, worst_case=worst, **costs[defense].summary()))
        table.rows.sort(key=lambda r: (-(r.worst_case.mean if r.worst_case else float("-inf")), r.defense))
        tables.append(table)
    return Board(tables=tables, runs=store.runs())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class _Costs:
    seconds: list[float] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    psnr: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ssim: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    seen: set[str] = field(default_factory=set)

    def add(self, condition: str, record: dict) -> None:
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

    def summary(self) -> dict:
        return {
            "seconds_per_image": _mean(self.seconds),
            "passes_per_image": _mean(self.passes),
            "psnr": {c: v for c, values in sorted(self.psnr.items()) if (v := _mean(values)) is not None},
            "ssim": {c: v for c, values in sorted(self.ssim.items()) if (v := _mean(values)) is not None},
            "seen": set(self.seen),
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
        max_linf=max(r.record.get("perturbation", {}).get("linf", 0.0) for r in rows),
        target_text=target_text,
        target_success={d: sum(v) / len(v) for d, v in sorted(success.items())},
    )
