"""The markdown leaderboard: one table per victim and task, defenses sorted by worst case."""

from __future__ import annotations

import re
from typing import Callable

from harness.board import MIN_SAMPLES, Board, BoardRow, Condition, Score, Table

# Papers report CIDEr x100 (already scaled by the task) with one decimal; accuracies with three.
_DECIMALS = {"cider": 1, "bleu4": 3, "rouge_l": 3, "meteor": 3}


_MARKUP = re.compile(r"[\\`*\[\]|$~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _md(text: object) -> str:
    """``text`` as literal markdown: markup characters escaped (an id is any YAML string), HTML
    as entities, line breaks as a visible ``\\n``, so a table row stays one row."""
    escaped = _MARKUP.sub(lambda m: "\\" + m.group(0), str(text))
    escaped = re.sub(r"[&<>]", lambda m: _ENTITIES[m.group(0)], escaped)
    return re.sub(r"\r\n|\r|\n", r"\\n", escaped)


def _code(text: object) -> str:
    """``text`` as a code span when it can be one (no backtick, no line break), else escaped."""
    text = str(text)
    return f"`{text}`" if not re.search(r"[`\r\n|]", text) else _md(text)


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


ROLE_NOTES = {
    "standard": "the standard adaptive attack (harness.protocol), through every defense",
    "n-draw": "the standard adaptive attack's examples, each judged over independent purification draws: "
              "a sample counts only if every draw survives (deterministic defenses: one draw)",
    "clean-n-draw": "clean images over independent purification draws: how often randomness alone flips an answer",
    "convergence": "the standard attack re-run with more steps, restarts and EOT on a subset, judged over as many "
                   "draws as its N-draw evaluation: the convergence check; a sample it breaks counts as broken in "
                   "the ranking",
    "probe": "a sanity probe on the undefended victim (Carlini et al. 2019)",
}


def _describe(c: Condition, literal: Callable[[object], str] | None = None) -> str:
    """One condition in words; ids go through ``literal`` (markdown escaping unless given: the
    HTML report passes ``str`` and escapes the whole text)."""
    name = _code if literal is None else literal
    literal = literal or _md
    how = c.mode
    if c.role == "clean-n-draw":
        how = "no attack"  # clean images: neither oblivious nor adaptive
    elif c.role == "probe":
        how = "on the undefended victim only"  # where oblivious and adaptive are the same attack
    elif c.mode == "oblivious" and c.access == "white-box" and c.role == "suite":
        how = "oblivious: transfer from the undefended victim for every defense but none"
    if c.routes:
        how += " (" + "; ".join(f"{literal(defense)}: {route}" for defense, route in c.routes.items()) + ")"
    ball = f"ε={c.eps * 255:.3g}/255, max measured L∞ {c.max_linf * 255:.3g}/255" if c.bounded else "unbounded"
    access = c.access + (" (a transfer attack whose surrogate is the victim itself)" if c.surrogate_is_victim else "")
    text = f"{name(c.name)}: {access}, {how}, {ball}"
    if c.draws > 1:
        text += f", {c.draws} draws"
    if c.role in ROLE_NOTES:
        text += f"; {ROLE_NOTES[c.role]}"
    if c.target_text:
        rates = ", ".join(f"{literal(d)} {rate:.0%}" for d, rate in c.target_success.items())
        text += f"; targeted '{literal(c.target_text)}', output contains it: {rates}"
    return text


def _ranked_threats(table: Table) -> set[str]:
    """The bounded threat models of a table's ranked columns."""
    return {d.threat for c, d in table.details.items() if c != "clean" and d.ranked and d.bounded}


def _threats_without_adaptive(table: Table) -> list[str]:
    """The ranked threat models no standard adaptive attack covered."""
    return sorted(_ranked_threats(table) - {d.threat for d in table.details.values() if d.role == "standard"})


def _converged(row: BoardRow, table: Table) -> str:
    """The 'converged' cell: yes / NO / – (not checked), naming the threat models the re-run
    covered when it did not cover all the table ranks on (a threat it skipped was never checked)."""
    text = {True: "yes", False: "NO", None: "–"}[row.converged]
    if row.convergence and set(row.convergence) != _ranked_threats(table):
        text += f" ({', '.join(sorted(row.convergence))} only)"
    return text


CONVERGENCE_NOTE = ("Convergence check (the re-run against the number it checks, paired on the re-run's samples; it "
                    "fails when the score falls by more than the half-width of that number's interval): ")


def _convergence_checks(table: Table, literal: Callable[[object], str] | None = None) -> list[str]:
    """What each convergence check compared: the re-run against its reference on the re-run's
    samples (the two columns differ in their samples, so they cannot be read off the table).
    Names go through ``literal`` (markdown escaping unless given)."""
    literal = literal or _md
    return [f"{literal(row.defense)}: {literal(check.rerun)} − {literal(check.reference)} = "
            f"{check.comparison.mean_difference:+.3f} on its {check.comparison.n} samples "
            f"(limit −{check.half_width:.3f}): {'held' if check.converged else 'NOT converged'}"
            for row in table.rows for check in row.convergence.values()]


def _cost_table(table) -> list[str]:
    """Clean cost, compute cost and purification quality of each defense."""
    base = next((row.scores.get("clean") for row in table.rows if row.defense == "none"), None)
    attacked = [c for c in table.conditions if c != "clean" and table.details[c].bounded and table.details[c].mode == "oblivious"
                and table.details[c].role == "suite"]
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
            _md(row.defense),
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


_CORPUS_NAMES = {"bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}


def _corpus_table(table) -> list[str]:
    """The cells' set-level metrics, as the task's reference scorer reports them."""
    if not table.corpus:
        return []
    metrics = [m for m in _CORPUS_NAMES if any(m in v for by in table.corpus.values() for v in by.values())]
    lines = [
        "Corpus metrics, as pycocoevalcap reports them over each cell's samples (first purification draw). "
        "BLEU-4 and METEOR are corpus statistics: the per-sample values behind the intervals above average to "
        "other numbers, and no paper reports those.",
        "",
        "| defense | condition | " + " | ".join(_CORPUS_NAMES[m] for m in metrics) + " |",
        "|---|---|" + "---:|" * len(metrics),
    ]
    for row in table.rows:
        for condition in table.conditions:
            values = table.corpus.get(row.defense, {}).get(condition)
            if values:
                cells = ["–" if m not in values else f"{values[m]:.{_DECIMALS.get(m, 3)}f}" for m in metrics]
                lines.append(f"| {_md(row.defense)} | {_md(condition)} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(board: Board) -> str:
    if not board.tables:
        return "# Leaderboard\n\nNo scored results in this store yet: run a suite first (`codefend run SUITE`).\n"
    lines = ["# Leaderboard", ""]
    if (note := board.run_note()) is not None:
        lines += [f"**{_md(note)}**", ""]
    if board.failures:
        lines += [f"**{len(board.failures)} cell(s) of the latest run failed** and are not on this board:", ""]
        lines += [f"- {_code(f['cell'])}: {_md(f['error'])}" for f in board.failures] + [""]
    for table in board.tables:
        n = max((s.n for row in table.rows for s in row.scores.values()), default=0)
        lines += [f"## {_md(table.victim)} · {_md(table.task)} — {_md(table.metric)} (n={n})", ""]
        if (note := table.skipped_note()) is not None:
            lines += [f"**{_md(note)}**", ""]
        headline = "robust (adaptive)" if table.adaptive else "robust (oblivious only)"
        converged = any(row.converged is not None for row in table.rows)
        header = ["defense", *map(_md, table.conditions), headline, "worst case", *(["converged"] if converged else []), "vs next row"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in table.rows:
            cells = [
                _fmt(row.scores.get(c), table.metric) + (" °" if c in row.seen else "")
                + (" ◦" if c in row.seen_other_eps else "")
                + (" ⚑" if table.flags_for(row.defense, c) else "")
                for c in table.conditions
            ]
            check = [_converged(row, table) + (" ⚑" if row.converged is False else "")] if converged else []
            lines.append("| " + " | ".join([_md(row.defense), *cells, "**" + _fmt(row.robust, table.metric) + "**",
                                            _fmt(row.worst_case, table.metric), *check,
                                            _versus(row.versus_next, table.metric)]) + " |")
        lines.append("")
        if table.adaptive:
            lines += [
                f"**{headline}** ranks the board: per sample, the worst over the standard adaptive attack "
                f"({_md(table.adaptive)}), its N-draw evaluation for stochastic defenses, and every other attack all rows "
                f"faced ({', '.join(map(_md, table.shared_conditions))}), lowered where the convergence re-run broke more on the "
                "samples it re-attacked, then averaged. Oblivious columns are transfer from the "
                "undefended victim, never the headline. 'worst case' adds the attacks only some rows faced.",
                "",
            ]
            if unattacked := _threats_without_adaptive(table):
                lines += [f"**No adaptive evaluation at {', '.join(map(_md, unattacked))}**: the standard adaptive attack "
                          "did not run under that threat model (the suite's `adaptive.threats`), so its columns are "
                          "oblivious only and are no robustness claim there.", ""]
        else:
            lines += [
                f"**No adaptive evaluation** on this table ({_md(table.no_adaptive_reason)}): '{headline}' is the worst case "
                "over attacks that never saw the defenses, which overstates robustness. It is not a robustness claim.",
                "",
            ]
        lines += [
            "± is the half-width of a 95% bootstrap interval of the mean (adaptive columns on their own, smaller "
            "subset); 'vs next row' is the paired difference in the ranking score with the row below (paired "
            "bootstrap, or McNemar's exact test for 0/1 scores).",
            "",
        ]
        if checks := _convergence_checks(table):
            lines += [CONVERGENCE_NOTE + "; ".join(checks) + ".", ""]
        if any(row.seen for row in table.rows):
            lines += ["° the defense was trained on this attack (same plugin, defining parameters, norm and ε), or on a "
                      "member of this ensemble: not held out.", ""]
        if any(row.seen_other_eps for row in table.rows):
            lines += ["◦ seen attack, unseen ε: trained on this attack at another radius.", ""]
        if table.flags:
            lines += ["Sanity flags (⚑):", ""]
            lines += [f"- ⚑ `{f.code}`" + (f" ({_md(f.defense)})" if f.defense else "") + f": {_md(f.message)}" for f in table.flags]
            lines.append("")
        lines += _cost_table(table)
        lines += _corpus_table(table)
        notes = [_describe(table.details[c]) for c in table.conditions if c != "clean"]
        if notes:
            lines += [f"- {note}" for note in notes] + [""]
    lines.append(
        "Oblivious attacks are computed against the undefended victim and reused for every defense: for a defense "
        "they are transfer attacks. Adaptive ones attack defense∘victim. Worst case: per sample, the lowest score "
        "over the ranked conditions (clean included; probes and the clean N-draw diagnostic excluded; the convergence "
        "re-run lowers the samples it re-attacked, without narrowing the set), then averaged."
    )
    return "\n".join(lines) + "\n"


class MarkdownReporter:
    extension = "md"

    def __call__(self, board: Board) -> str:
        return render_markdown(board)
