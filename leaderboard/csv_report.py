"""The board as CSV: one line per victim × task × defense × condition (plus a worst-case line)."""

from __future__ import annotations

import csv
import io

from harness.board import Board

COLUMNS = ["victim", "task", "metric", "defense", "condition", "threat", "mode", "access", "seen_in_training",
           "mean", "ci95_low", "ci95_high", "n", "flags"]


class CSVReporter:
    extension = "csv"

    def __call__(self, board: Board) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for table in board.tables:
            for row in table.rows:
                lines = [(c, row.scores[c]) for c in table.conditions if c in row.scores]
                if row.robust is not None:
                    lines.append(("robust (adaptive)" if table.adaptive else "robust (oblivious only)", row.robust))
                if row.worst_case is not None:
                    lines.append(("worst case", row.worst_case))
                if row.shared_worst_case is not None:
                    lines.append(("worst case, shared conditions", row.shared_worst_case))
                for condition, score in lines:
                    detail = table.details.get(condition)
                    flags = ";".join(f.code for f in table.flags_for(row.defense, condition))
                    writer.writerow([
                        table.victim, table.task, table.metric, row.defense, condition,
                        detail.threat if detail else "", detail.mode if detail else "", detail.access if detail else "",
                        condition in row.seen, f"{score.mean:.6g}",
                        f"{score.ci.low:.6g}" if score.ci else "", f"{score.ci.high:.6g}" if score.ci else "",
                        score.n, flags,
                    ])
        return out.getvalue()
