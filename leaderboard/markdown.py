"""The markdown leaderboard: one table per victim and task, defenses sorted by worst case."""

from __future__ import annotations

from leaderboard.aggregate import Board, Condition, Score
from leaderboard.stats import MIN_SAMPLES

# Papers report CIDEr x100 (already scaled by the task) with one decimal; accuracies with three.
_DECIMALS = {"cider": 1, "bleu4": 3, "rouge_l": 3, "meteor": 3}


def _fmt(score: Score | None, metric: str) -> str:
    """The mean and the half-width of its 95% bootstrap interval."""
    if score is None:
        return "–"
    digits = _DECIMALS.get(metric, 3)
    text = f"{score.mean:.{digits}f}"
    if score.ci is not None:
        text += f" ±{(score.ci.high - score.ci.low) / 2:.{digits}f}"
    return text


def _versus(comparison, metric: str) -> str:
    if comparison is None:
        return "–"
    digits = _DECIMALS.get(metric, 3)
    if comparison.n < MIN_SAMPLES:
        verdict = f"n={comparison.n}: too few to tell"
    else:
        verdict = "significant" if comparison.significant else "not significant"
    p = "p<1e-4" if comparison.p_value < 1e-4 else f"p={comparison.p_value:.2g}"
    return f"{comparison.mean_difference:+.{digits}f} ({p}, {verdict})"


def _describe(c: Condition) -> str:
    how = c.mode
    if c.routes:
        how += " (" + "; ".join(f"{defense}: {route}" for defense, route in c.routes.items()) + ")"
    ball = f"ε={c.eps * 255:.3g}/255, max measured L∞ {c.max_linf * 255:.3g}/255" if c.bounded else "unbounded"
    text = f"`{c.name}`: {c.access}, {how}, {ball}"
    if c.target_text:
        rates = ", ".join(f"{d} {rate:.0%}" for d, rate in c.target_success.items())
        text += f"; targeted '{c.target_text}', output contains it: {rates}"
    return text


def _cost_table(table) -> list[str]:
    """Clean cost, compute cost and purification quality of each defense."""
    base = next((row.scores.get("clean") for row in table.rows if row.defense == "none"), None)
    attacked = [c for c in table.conditions if c != "clean" and table.details[c].bounded and table.details[c].mode == "oblivious"]
    lines = [
        "| defense | clean cost | s / image | network evals / image | PSNR clean (dB) | SSIM clean | PSNR attacked (dB) | SSIM attacked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    def attacked_mean(values: dict[str, float]) -> float | None:
        picked = [values[c] for c in attacked if c in values]
        return sum(picked) / len(picked) if picked else None

    for row in table.rows:
        clean = row.scores.get("clean")
        cost = None if clean is None or base is None else clean.mean - base.mean
        lines.append("| " + " | ".join([
            row.defense,
            "–" if cost is None else f"{cost:+.{_DECIMALS.get(table.metric, 3)}f}",
            num(row.seconds_per_image, 4),
            num(row.passes_per_image, 0),
            num(row.psnr.get("clean"), 1),
            num(row.ssim.get("clean"), 3),
            num(attacked_mean(row.psnr), 1),
            num(attacked_mean(row.ssim), 3),
        ]) + " |")
    lines += [
        "",
        "Clean cost: the defense's clean score minus the undefended one. PSNR/SSIM compare the "
        "defense's output with the clean image (data range 1); 'attacked' averages the bounded "
        "oblivious attacks.",
        "",
    ]
    return lines


def render_markdown(board: Board) -> str:
    if not board.tables:
        return "# Leaderboard\n\nNo scored results in this store yet: run a suite first (`codefend run SUITE`).\n"
    lines = ["# Leaderboard", ""]
    for table in board.tables:
        n = max((s.n for row in table.rows for s in row.scores.values()), default=0)
        lines += [f"## {table.victim} · {table.task} — {table.metric} (n={n})", ""]
        extra = any(set(row.samples) != set(table.shared_conditions) for row in table.rows)
        header = ["defense", *table.conditions, "worst case", *(["worst, shared"] if extra else []), "vs next row"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in table.rows:
            cells = [
                _fmt(row.scores.get(c), table.metric) + (" °" if c in row.seen else "")
                + (" ⚑" if table.flags_for(row.defense, c) else "")
                for c in table.conditions
            ]
            shared = [_fmt(row.shared_worst_case, table.metric)] if extra else []
            lines.append("| " + " | ".join([row.defense, *cells, _fmt(row.worst_case, table.metric), *shared,
                                            _versus(row.versus_next, table.metric)]) + " |")
        lines.append("")
        lines += [
            "± is the half-width of a 95% bootstrap interval of the mean; 'vs next row' is the paired "
            "difference in worst case with the row below (paired bootstrap, or McNemar's exact test for 0/1 scores)."
            + (" Some defenses faced extra attacks: rows are ranked, and compared, on 'worst, shared', the worst "
               f"case over the conditions all of them faced ({', '.join(table.shared_conditions)})." if extra else ""),
            "",
        ]
        if any(row.seen for row in table.rows):
            lines += ["° the defense was trained on this attack's examples (other attacks are unseen).", ""]
        if table.flags:
            lines += ["Sanity flags (⚑):", ""]
            lines += [f"- ⚑ `{f.code}`" + (f" ({f.defense})" if f.defense else "") + f": {f.message}" for f in table.flags]
            lines.append("")
        lines += _cost_table(table)
        notes = [_describe(table.details[c]) for c in table.conditions if c != "clean"]
        if notes:
            lines += [f"- {note}" for note in notes] + [""]
    lines.append(
        "Oblivious attacks are computed against the undefended victim and reused for every defense; "
        "adaptive ones attack defense∘victim. Worst case: per sample, the lowest score over all "
        "conditions (clean included), then averaged."
    )
    return "\n".join(lines) + "\n"


class MarkdownReporter:
    extension = "md"

    def __call__(self, board: Board) -> str:
        return render_markdown(board)
