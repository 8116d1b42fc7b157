"""The markdown leaderboard: one table per victim and task, defenses sorted by worst case."""

from __future__ import annotations

from leaderboard.aggregate import Board, Score

# Papers report CIDEr x100 (already scaled by the task) with one decimal; accuracies with three.
_DECIMALS = {"cider": 1, "bleu4": 3, "rouge_l": 3, "meteor": 3}


def _fmt(score: Score | None, metric: str) -> str:
    if score is None:
        return "–"
    return f"{score.mean:.{_DECIMALS.get(metric, 3)}f}"


def render_markdown(board: Board) -> str:
    if not board.tables:
        return "# Leaderboard\n\nNo scored results in this store yet: run a suite first (`codefend run SUITE`).\n"
    lines = ["# Leaderboard", ""]
    for table in board.tables:
        n = max((s.n for row in table.rows for s in row.scores.values()), default=0)
        lines += [f"## {table.victim} · {table.task} — {table.metric} (n={n})", ""]
        header = ["defense", *table.conditions, "worst case"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in table.rows:
            cells = [_fmt(row.scores.get(c), table.metric) for c in table.conditions]
            lines.append("| " + " | ".join([row.defense, *cells, _fmt(row.worst_case, table.metric)]) + " |")
        lines.append("")
    lines.append(
        "Attacks are oblivious (computed against the undefended victim, reused for every defense). "
        "Worst case: per sample, the lowest score over all conditions (clean included), then averaged."
    )
    return "\n".join(lines) + "\n"


class MarkdownReporter:
    extension = "md"

    def __call__(self, board: Board) -> str:
        return render_markdown(board)
