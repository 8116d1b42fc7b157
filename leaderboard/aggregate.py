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


@dataclass
class Table:
    victim: str
    task: str
    metric: str
    conditions: list[str]
    rows: list[BoardRow] = field(default_factory=list)


@dataclass
class Board:
    tables: list[Table]
    runs: list[dict]


def condition_of(row: ResultRow) -> str:
    return CLEAN if row.threat == CLEAN else f"{row.attack}@{row.threat}"


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
        for r in rows:
            assert r.headline is not None
            per_defense[r.defense][condition_of(r)][r.sample_id] = r.headline
        table = Table(victim=victim, task=task, metric=rows[0].metric, conditions=conditions)
        for defense, by_condition in per_defense.items():
            scores = {c: Score(sum(v.values()) / len(v), len(v)) for c, v in by_condition.items()}
            common = set.intersection(*(set(v) for v in by_condition.values()))
            worst = None
            if common:
                worst_values = [min(by_condition[c][s] for c in by_condition) for s in common]
                worst = Score(sum(worst_values) / len(worst_values), len(worst_values))
            table.rows.append(BoardRow(defense=defense, scores=scores, worst_case=worst))
        table.rows.sort(key=lambda r: (-(r.worst_case.mean if r.worst_case else float("-inf")), r.defense))
        tables.append(table)
    return Board(tables=tables, runs=store.runs())
