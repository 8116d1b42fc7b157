"""Leaderboard entries as JSON, in the spirit of RobustBench: one entry per victim × task ×
defense × threat model, with its clean and robust score (95% intervals), the attacks behind the
robust score, costs, sanity flags and provenance. The format is ``schemas/entry.schema.json``
(documented in docs/leaderboard.md); every rendered file is validated against it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from leaderboard.aggregate import CLEAN, Board, BoardRow, Score, Table, per_sample_worst, score_of, shared_reruns

SCHEMA_ID = "codefend-bench/leaderboard-entry/1"


@lru_cache(maxsize=1)
def entry_schema() -> dict[str, Any]:
    return json.loads(resources.files("leaderboard").joinpath("schemas/entry.schema.json").read_text())


def _score(score: Score | None) -> dict[str, Any] | None:
    if score is None:
        return None
    ci = [score.ci.low, score.ci.high] if score.ci else [score.mean, score.mean]
    return {"mean": score.mean, "ci95": ci, "n": score.n}


def _entry(board: Board, table: Table, row: BoardRow, threat: str) -> dict[str, Any]:
    conditions = [c for c in table.conditions if table.details[c].threat == threat and c in row.samples]
    ranked = [c for c in conditions if c in table.shared_conditions or table.details[c].role == "n-draw"]
    reruns = [c for c in shared_reruns(table) if c in conditions]
    worst = per_sample_worst({c: row.samples[c] for c in ranked}, {c: row.samples[c] for c in reruns})
    robust = score_of(list(worst.values())) if worst else None
    adaptive = any(table.details[c].role == "standard" for c in ranked)
    detail = table.details[conditions[0]] if conditions else None
    base = next((r for r in table.rows if r.defense == "none"), None)
    clean = row.scores.get(CLEAN)
    packages = {}
    for run in board.runs:
        if run["run_id"] in row.provenance.get("run_ids", []):
            packages = run["provenance"].get("packages", packages)
    return {
        "schema": SCHEMA_ID,
        "victim": table.victim,
        "task": table.task,
        "metric": table.metric,
        "defense": row.defense,
        "skipped_samples": len(table.skipped),
        "threat_model": {
            "name": threat,
            "norm": detail.norm if detail and detail.bounded else None,
            "eps": detail.eps if detail and detail.bounded else None,
            "bounded": bool(detail.bounded) if detail else True,
        },
        "clean": _score(clean),
        "robust": _score(robust),
        "robust_basis": "adaptive" if adaptive else "oblivious-only",
        # None where no convergence re-run covered this threat model: not checked is not converged
        "converged": row.convergence[threat].converged if threat in row.convergence else None,
        "attacks": [
            {
                "condition": c,
                "mode": table.details[c].mode,
                "access": table.details[c].access,
                "gradient_route": table.details[c].routes.get(row.defense),
                "seen_in_training": c in row.seen,
                "training_label": "seen" if c in row.seen else ("seen-attack-unseen-eps" if c in row.seen_other_eps else "unseen"),
                "role": table.details[c].role,
                "ranked": c in ranked or c in reruns,
                "score": _score(row.scores[c]),
                "corpus_metrics": table.corpus.get(row.defense, {}).get(c),
            }
            for c in conditions
        ],
        "cost": {
            "clean_cost": None if clean is None or base is None or CLEAN not in base.scores
            else clean.mean - base.scores[CLEAN].mean,
            "seconds_per_image": row.seconds_per_image,
            "network_evaluations_per_image": row.passes_per_image,
        },
        "quality": {
            "psnr_clean": row.psnr.get(CLEAN),
            "ssim_clean": row.ssim.get(CLEAN),
            "psnr_attacked": _mean([row.psnr[c] for c in conditions if c in row.psnr]),
            "ssim_attacked": _mean([row.ssim[c] for c in conditions if c in row.ssim]),
        },
        "flags": [{"code": f.code, "message": f.message} for f in table.flags_for(row.defense)
                  if f.condition is None or f.condition in conditions or f.condition == CLEAN],
        "provenance": {**row.provenance, "packages": packages},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def board_entries(board: Board) -> list[dict[str, Any]]:
    entries = []
    for table in board.tables:
        # one entry per threat model the board ranks on (diagnostics such as probes get none)
        threats = sorted({d.threat for c, d in table.details.items() if c != CLEAN and d.ranked})
        for row in table.rows:
            for threat in threats:
                if any(table.details[c].threat == threat for c in row.samples if c != CLEAN):
                    entries.append(_entry(board, table, row, threat))
    return entries


def validate_entries(entries: list[dict[str, Any]]) -> None:
    """Raise ``jsonschema.ValidationError`` if an entry does not follow the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(entry_schema())
    for entry in entries:
        validator.validate(entry)


class JSONReporter:
    extension = "json"

    def __call__(self, board: Board) -> str:
        entries = board_entries(board)
        validate_entries(entries)
        return json.dumps(entries, indent=1, allow_nan=False) + "\n"
