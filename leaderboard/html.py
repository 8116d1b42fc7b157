"""The board as one self-contained HTML file: sortable tables, matplotlib plots and an image grid.

Everything is inline (CSS, a few lines of JavaScript for sorting, PNGs as data URIs), so the file
can be mailed, attached to a paper's artifact or opened offline. Plots: score vs ε per defense
(one line per attack), clean vs robust (worst case) per defense, and compute cost vs robustness.
The grid shows stored example samples: clean, attacked, and what each defense handed the victim,
with the victim's answers.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from leaderboard.aggregate import CLEAN, Board, Score, Table
from leaderboard.markdown import CONVERGENCE_NOTE, _CORPUS_NAMES, _DECIMALS, _converged, _convergence_checks, _describe, _versus

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
.ci { color: #888; font-size: 85%; }
.flag { color: #b00; font-weight: bold; }
.seen { color: #06c; }
.plots img { max-width: 32%; margin-right: 1%; border: 1px solid #eee; }
.grid td { text-align: center; vertical-align: top; font-size: 85%; }
.grid img { width: 96px; height: 96px; image-rendering: pixelated; display: block; margin: 0 auto; }
.note { color: #555; font-size: 90%; max-width: 70em; }
"""

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var ascending = th.dataset.order !== 'asc';
      th.dataset.order = ascending ? 'asc' : 'desc';
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
        return ascending ? cmp : -cmp;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image(array: Any) -> str:
    from PIL import Image

    pixels = (np.clip(np.asarray(array, dtype=np.float32).transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: what the victim saw
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _score_cell(score: Score | None, metric: str, marks: str = "") -> str:
    if score is None:
        return '<td data-value="">–</td>'
    digits = _DECIMALS.get(metric, 3)
    ci = f' <span class="ci">[{score.ci.low:.{digits}f}, {score.ci.high:.{digits}f}]</span>' if score.ci else ""
    return f'<td data-value="{score.mean:.6g}">{score.mean:.{digits}f}{ci}{marks}</td>'


def _plain(text: object) -> str:
    """``text`` for a matplotlib label: a ``$`` in an id would start mathtext (and fail the plot)."""
    return str(text).replace("$", r"\$")


def _plots(table: Table) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    # score vs eps: one panel, a line per (defense, attack) over the bounded oblivious/adaptive sweeps
    figure, axis = plt.subplots(figsize=(5, 3.5))
    families = sorted({c.split("@")[0] for c, d in table.details.items() if c != CLEAN and d.bounded})
    for row in table.rows:
        clean = row.scores.get(CLEAN)
        for family in families:
            points = sorted(
                (table.details[c].eps * 255, row.scores[c].mean)
                for c in row.scores if c != CLEAN and c.split("@")[0] == family and table.details[c].bounded
            )
            if not points:
                continue
            if clean is not None:
                points = [(0.0, clean.mean), *points]
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o", label=_plain(f"{row.defense} · {family}"))
    axis.set_xlabel("ε (/255)")
    axis.set_ylabel(_plain(table.metric))
    axis.set_title("score vs ε")
    axis.legend(fontsize=6, ncol=2)
    images.append(_png(figure))

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for row in table.rows:
        clean = row.scores.get(CLEAN)
        if clean is not None and row.robust is not None:
            axis.scatter(clean.mean, row.robust.mean)
            axis.annotate(_plain(row.defense), (clean.mean, row.robust.mean), fontsize=7)
    axis.set_xlabel(_plain(f"clean {table.metric}"))
    axis.set_ylabel(_plain(f"robust ({'adaptive' if table.adaptive else 'oblivious only'}) {table.metric}"))
    axis.set_title("clean vs robust")
    images.append(_png(figure))

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for row in table.rows:
        if row.robust is not None and row.seconds_per_image is not None:
            seconds = max(row.seconds_per_image, 1e-6)
            axis.scatter(seconds, row.robust.mean)
            axis.annotate(_plain(row.defense), (seconds, row.robust.mean), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel("defense seconds / image (log)")
    axis.set_ylabel(_plain(f"robust {table.metric}"))
    axis.set_title("cost vs robustness")
    images.append(_png(figure))
    return images


def _table_html(table: Table) -> list[str]:
    out = ['<table class="sortable scores"><thead><tr><th>defense</th>']
    out += [f"<th>{html.escape(c)}</th>" for c in table.conditions]
    headline = "robust (adaptive)" if table.adaptive else "robust (oblivious only)"
    out += [f"<th>{headline}</th><th>worst case</th><th>converged</th><th>vs next row</th><th>s / image</th>"
            "<th>evals / image</th><th>PSNR clean</th><th>SSIM clean</th></tr></thead><tbody>"]
    for row in table.rows:
        cells = [f'<td data-value="{html.escape(row.defense)}">{html.escape(row.defense)}</td>']
        for c in table.conditions:
            marks = (' <span class="seen" title="seen in training">°</span>' if c in row.seen else "") + (
                ' <span class="seen" title="seen attack, unseen ε">◦</span>' if c in row.seen_other_eps else "") + (
                ' <span class="flag" title="sanity flag">⚑</span>' if table.flags_for(row.defense, c) else "")
            cells.append(_score_cell(row.scores.get(c), table.metric, marks))
        cells.append(_score_cell(row.robust, table.metric))
        cells.append(_score_cell(row.worst_case, table.metric))
        converged = _converged(row, table)
        cells.append(f'<td data-value="{converged}">{converged}</td>')
        versus = row.versus_next
        cells.append(f'<td data-value="{versus.mean_difference if versus else ""}">{html.escape(_versus(versus, table.metric))}</td>')
        for value, digits in ((row.seconds_per_image, 4), (row.passes_per_image, 0), (row.psnr.get(CLEAN), 1), (row.ssim.get(CLEAN), 3)):
            cells.append(f'<td data-value="{"" if value is None else value}">{"–" if value is None else f"{value:.{digits}f}"}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _grid_html(table: Table) -> list[str]:
    if not table.examples:
        return ['<p class="note">No example images in this store (they are stored by runs of this harness version).</p>']
    condition = table.examples[0].condition
    out = [f'<h3>Examples under {html.escape(condition)}</h3><table class="grid"><thead><tr><th>sample</th><th>clean</th><th>attacked</th>']
    out += [f"<th>{html.escape(d.defense)}</th>" for d in table.examples[0].defenses]
    out.append("</tr></thead><tbody>")
    for example in table.examples:
        cells = [f"<td>{html.escape(example.sample_id)}</td>", f'<td><img alt="clean" src="{_image(example.clean)}"></td>']
        adversarial = f'<img alt="attacked" src="{_image(example.adversarial)}">' if example.adversarial is not None else "–"
        cells.append(f"<td>{adversarial}</td>")
        for d in example.defenses:
            image = f'<img alt="{html.escape(d.defense)}" src="{_image(d.defended)}">' if d.defended is not None else ""
            score = "" if d.attacked_score is None else f" ({d.attacked_score:.2f})"
            cells.append(
                f"<td>{image}clean: {html.escape(d.clean_output or '–')}<br>"
                f"attacked: {html.escape(d.attacked_output or '–')}{score}</td>"
            )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _corpus_html(table: Table) -> list[str]:
    if not table.corpus:
        return []
    metrics = [m for m in _CORPUS_NAMES if any(m in v for by in table.corpus.values() for v in by.values())]
    out = ['<h3>Corpus metrics (pycocoevalcap, first purification draw; BLEU-4 and METEOR are corpus statistics, '
           'not means of the per-sample scores)</h3><table class="sortable"><thead><tr><th>defense</th><th>condition</th>'
           + "".join(f"<th>{_CORPUS_NAMES[m]}</th>" for m in metrics) + "</tr></thead><tbody>"]
    for row in table.rows:
        for condition in table.conditions:
            values = table.corpus.get(row.defense, {}).get(condition)
            if values:
                out.append(f"<tr><td>{html.escape(row.defense)}</td><td>{html.escape(condition)}</td>" + "".join(
                    "<td>–</td>" if m not in values else f"<td>{values[m]:.{_DECIMALS.get(m, 3)}f}</td>" for m in metrics)
                           + "</tr>")
    return out + ["</tbody></table>"]


def render_html(board: Board) -> str:
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>CoDefend Bench leaderboard</title>',
             f"<style>{_STYLE}</style></head><body><h1>Leaderboard</h1>"]
    if not board.tables:
        parts.append("<p>No scored results in this store yet: run a suite first (<code>codefend run SUITE</code>).</p>")
    if (note := board.run_note()) is not None:
        parts.append(f"<p><strong>{html.escape(note)}</strong></p>")
    if board.failures:
        parts.append(f"<p><strong>{len(board.failures)} cell(s) of the latest run failed</strong> and are not on this board:</p><ul>"
                     + "".join(f"<li><code>{html.escape(f['cell'])}</code>: {html.escape(f['error'])}</li>" for f in board.failures)
                     + "</ul>")
    for table in board.tables:
        n = max((s.n for row in table.rows for s in row.scores.values()), default=0)
        parts.append(f"<h2>{html.escape(table.victim)} · {html.escape(table.task)} — {html.escape(table.metric)} (n={n})</h2>")
        if (note := table.skipped_note()) is not None:
            parts.append(f"<p><strong>{html.escape(note)}</strong></p>")
        parts += _table_html(table)
        if table.adaptive:
            basis = (f"Ranked on robust (adaptive): the per-sample worst over the standard adaptive attack "
                     f"({html.escape(table.adaptive)}), its N-draw evaluation and the attacks every defense faced, lowered where "
                     "the convergence re-run broke more on the samples it re-attacked. "
                     "Oblivious columns are transfer from the undefended victim.")
        else:
            basis = (f"<strong>No adaptive evaluation</strong> ({html.escape(table.no_adaptive_reason or '')}): the ranking "
                     "is over attacks that never saw the defenses and is not a robustness claim.")
        parts.append(f'<p class="note">{basis} [low, high]: 95% bootstrap interval of the mean. ° the defense was trained on '
                     "this attack; ◦ on this attack at another ε. ⚑ a sanity flag (listed below). Click a header to sort.</p>")
        if checks := _convergence_checks(table, literal=str):
            parts.append(f'<p class="note">{html.escape(CONVERGENCE_NOTE + "; ".join(checks))}.</p>')
        notes = [_describe(table.details[c], literal=str) for c in table.conditions if c != CLEAN]
        if notes:
            parts.append("<ul class=\"note\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
        if table.flags:
            parts.append("<ul class=\"note flags\">" + "".join(
                f'<li><span class="flag">⚑ {html.escape(f.code)}</span>'
                + (f" ({html.escape(f.defense)})" if f.defense else "") + f": {html.escape(f.message)}</li>"
                for f in table.flags) + "</ul>")
        parts += _corpus_html(table)
        parts.append('<div class="plots">' + "".join(f'<img alt="plot" src="{src}">' for src in _plots(table)) + "</div>")
        parts += _grid_html(table)
    parts.append(f"<script>{_SORT_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


class HTMLReporter:
    extension = "html"

    def __call__(self, board: Board) -> str:
        return render_html(board)
