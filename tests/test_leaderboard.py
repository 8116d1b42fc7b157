"""Leaderboards from hand-written store rows: per-sample worst case, sorting, formatting."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from codefend import cli
from harness.records import ResultRow
from harness.store import Store
from leaderboard.aggregate import build_board
from leaderboard.entries import board_entries
from leaderboard.markdown import render_markdown

# cli.main uses the process-wide plugin set: load it afresh for each test
pytestmark = pytest.mark.usefixtures("fresh_plugins")

VICTIM, TASK = "shapes-vlm", "vqav2:test"
EPS = 8 / 255

# defense -> condition -> sample -> headline score. For jpeg, sample s1 is broken only by attack A
# and s2 only by attack B: every condition averages >= 0.5, yet each sample has a 0.0 somewhere,
# so the per-sample worst case is 0.0. none is uniformly mediocre: min of averages 0.3 < 0.5 but a
# worst case of 0.3 > 0.0, so sorting by worst case puts none first and by min-of-averages last.
SCORES = {
    "jpeg": {"clean": {"s1": 1.0, "s2": 1.0}, "A": {"s1": 0.0, "s2": 1.0}, "B": {"s1": 1.0, "s2": 0.0}},
    "none": {"clean": {"s1": 1.0, "s2": 1.0}, "A": {"s1": 0.3, "s2": 0.3}, "B": {"s1": 0.3, "s2": 0.3}},
}


def _row(defense: str, condition: str, sample: str, *, task: str = TASK, metric: str = "vqa_accuracy",
         run_id: str = "run-1") -> dict:
    clean = condition == "clean"
    return {
        "fingerprint": f"{task}|{defense}|{condition}|{sample}",
        "run_id": run_id,
        "suite": "hand-written",
        "victim": VICTIM,
        "task": task,
        "metric": metric,
        "attack": "none" if clean else condition,
        "threat": "clean" if clean else "linf-8",
        "norm": "linf",
        "eps": 0.0 if clean else EPS,
        "defense": defense,
        "sample_id": sample,
        "output": "yes",
        "adversarial_key": None if clean else f"adv|{condition}|{sample}",
        "record": {"note": "hand-written"},
    }


def _fill(store: Store, scores: dict, *, task: str = TASK, metric: str = "vqa_accuracy") -> None:
    rows, scored = [], {}
    for defense, by_condition in scores.items():
        for condition, by_sample in by_condition.items():
            for sample, value in by_sample.items():
                row = _row(defense, condition, sample, task=task, metric=metric)
                rows.append(row)
                scored[row["fingerprint"]] = ({metric: value}, value)
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    store.set_scores(scored)


def _adaptive_store(path: Path, scores: dict, threats: dict[str, float] | None = None,
                    skip: Callable[[str, str], bool] = lambda condition, threat: False) -> Store:
    """A store of standard-attack rows (``adaptive``), convergence re-run rows (``adaptive-2x``)
    and oblivious ones (any other condition): defense -> condition -> sample -> score, under each of ``threats``
    (name -> ε; default linf-8) but the (condition, threat) pairs ``skip`` leaves out."""
    roles = {"adaptive": "standard", "adaptive-2x": "convergence"}
    store = Store(path)
    rows, scored = [], {}
    for defense, by_condition in scores.items():
        for condition, by_sample in by_condition.items():
            for threat, eps in (threats or {"linf-8": EPS}).items():
                if skip(condition, threat):
                    continue
                for sample, value in by_sample.items():
                    row = _row(defense, condition, sample)
                    row.update(fingerprint=f"{defense}|{condition}|{threat}|{sample}", threat=threat, eps=eps,
                               adversarial_key=f"adv|{condition}|{threat}|{sample}")
                    row["record"] = {"attack": {"name": "apgd", "access": "white-box", "role": roles.get(condition, "suite"),
                                                **({"mode": "adaptive", "gradient": "exact", "eot": 1}
                                                   if condition in roles else {"mode": "oblivious"})}}
                    rows.append(row)
                    scored[row["fingerprint"]] = ({"vqa_accuracy": value}, value)
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    store.set_scores(scored)
    return store


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "results" / "store.sqlite")
    store.begin_run("run-1", "hand-written", "", {"note": "test"})
    _fill(store, SCORES)
    store.finish_run("run-1", "finished")
    yield store
    store.close()


def _table_lines(markdown: str, which: int = 0) -> list[str]:
    """The lines of the ``which``-th markdown table."""
    tables: list[list[str]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    return tables[which]


def test_board_uses_the_per_sample_worst_case(store: Store) -> None:
    board = build_board(store)
    (table,) = board.tables
    assert (table.victim, table.task, table.metric) == (VICTIM, TASK, "vqa_accuracy")
    assert table.conditions == ["clean", "A@linf-8", "B@linf-8"]
    rows = {row.defense: row for row in table.rows}
    jpeg = rows["jpeg"]
    assert {c: s.mean for c, s in jpeg.scores.items()} == {"clean": 1.0, "A@linf-8": 0.5, "B@linf-8": 0.5}
    assert min(s.mean for s in jpeg.scores.values()) == 0.5  # the min of averages ...
    assert jpeg.worst_case.mean == 0.0 and jpeg.worst_case.n == 2  # ... is not the worst case
    assert rows["none"].worst_case.mean == pytest.approx(0.3)
    assert [row.defense for row in table.rows] == ["none", "jpeg"]
    assert [r["run_id"] for r in board.runs] == ["run-1"]


def test_markdown_shows_worst_case_and_sorts_by_it(store: Store) -> None:
    markdown = render_markdown(build_board(store))
    assert "## shapes-vlm · vqav2:test — vqa_accuracy (n=2)" in markdown
    assert _table_lines(markdown) == [
        "| defense | clean | A@linf-8 | B@linf-8 | robust (oblivious only) | worst case | vs next row |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| none | 1.000 ±0.000 | 0.300 ±0.000 | 0.300 ±0.000 | **0.300 ±0.000** | 0.300 ±0.000 | +0.300 (p=0.001, n=2: too few to tell) |",
        "| jpeg | 1.000 ±0.000 | 0.500 ±0.500 | 0.500 ±0.500 | **0.000 ±0.000** | 0.000 ±0.000 | – |",
    ]


def test_worst_case_counts_only_samples_seen_under_every_condition(store: Store) -> None:
    # s3 was only evaluated clean (a run killed before its attacks): it must not enter the worst case
    _fill(store, {"jpeg": {"clean": {"s3": 1.0}}})
    table = build_board(store).tables[0]
    jpeg = next(row for row in table.rows if row.defense == "jpeg")
    assert jpeg.scores["clean"].n == 3 and jpeg.scores["clean"].mean == 1.0
    assert (jpeg.worst_case.mean, jpeg.worst_case.n) == (0.0, 2)


def test_unscored_rows_are_left_out(store: Store) -> None:
    store.commit_chunk([ResultRow.model_validate(_row("pending", "clean", "s1"))], {})  # written, never scored
    markdown = render_markdown(build_board(store))
    assert "pending" not in markdown
    assert len(_table_lines(markdown)) == 4


def test_condition_order_and_one_table_per_task(store: Store) -> None:
    caption = "coco_captions:test"
    _fill(store, {"none": {"clean": {"c1": 170.54, "c2": 100.0}, "A": {"c1": 12.0, "c2": 30.0}}},
          task=caption, metric="cider")
    # a smaller eps of the same attack sorts before the larger one
    small = {**_row("none", "A", "c1", task=caption, metric="cider"), "threat": "linf-4", "eps": 4 / 255,
             "fingerprint": "small-1"}
    store.commit_chunk([ResultRow.model_validate(small)], {})
    store.set_scores({"small-1": ({"cider": 50.0}, 50.0)})
    board = build_board(store)
    assert [t.task for t in board.tables] == [caption, TASK]
    assert board.tables[0].conditions == ["clean", "A@linf-4", "A@linf-8"]
    markdown = render_markdown(board)
    assert "## shapes-vlm · coco_captions:test — cider (n=2)" in markdown
    # CIDEr with one decimal; the c1-only linf-4 condition leaves the worst case over c1: min(170.54, 12, 50)
    none_row = next(line for line in markdown.splitlines() if line.startswith("| none |"))
    means = [cell.split(" ±")[0] for cell in none_row.strip("|").split("|")[1:5]]
    assert [m.strip() for m in means] == ["135.3", "50.0", "21.0", "**12.0"]  # the last: the ranking score
    # without a standard adaptive column the board says it is no robustness claim
    assert "**No adaptive evaluation** on this table" in markdown


def test_empty_store_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    try:
        markdown = render_markdown(build_board(store))
    finally:
        store.close()
    assert "No scored results" in markdown and "|" not in markdown


def test_leaderboard_command_renders_the_store(store: Store, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    expected = render_markdown(build_board(store))
    assert cli.main(["leaderboard", str(store.path.parent)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    out_file = tmp_path / "board.md"
    assert cli.main(["leaderboard", str(store.path), "--out", str(out_file)]) == 0
    assert out_file.read_text() == expected
    assert capsys.readouterr().err == f"leaderboard written to {out_file}\n"

    assert cli.main(["leaderboard", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no result store at ") and "codefend run" in err
    assert not (tmp_path / "nothing-here").exists(), "a missing store must not be created"

    assert cli.main(["leaderboard", str(store.path.parent), "--format", "htm"]) == 2
    assert "did you mean 'html'?" in capsys.readouterr().err


def test_an_unbounded_attack_gets_its_own_column_and_leaves_clean_alone(tmp_path: Path) -> None:
    """Typographic rows carry the clean threat (no ε ball); they must not overwrite clean scores."""
    store = Store(tmp_path / "store.sqlite")
    rows, scored = [], {}
    for attack, score in (("none", 1.0), ("typographic", 0.0)):
        for sample in ("s1", "s2"):
            row = _row("none", "clean", sample)
            row.update(fingerprint=f"{attack}|{sample}", attack=attack,
                       record={"attack": {"name": attack, "access": "none"}, "threat": {"bounded": attack == "none"}})
            rows.append(row)
            scored[row["fingerprint"]] = ({"vqa_accuracy": score}, score)
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    store.set_scores(scored)
    table = build_board(store).tables[0]
    assert table.conditions == ["clean", "typographic"]
    (row,) = table.rows
    assert row.scores["clean"].mean == 1.0 and row.scores["typographic"].mean == 0.0
    assert row.worst_case is not None and row.worst_case.mean == 0.0
    assert "`typographic`: none, oblivious, unbounded" in render_markdown(build_board(store))


def test_adaptive_columns_name_the_gradient_route_per_defense(tmp_path: Path) -> None:
    store = Store(tmp_path / "store.sqlite")
    rows, scored = [], {}
    for defense, route in (("none", "exact"), ("jpeg", "bpda-identity")):
        row = _row(defense, "pgd-adaptive", "s1")
        row["record"] = {"attack": {"name": "pgd", "access": "white-box", "mode": "adaptive", "gradient": route, "eot": 1}}
        rows.append(row)
        scored[row["fingerprint"]] = ({"vqa_accuracy": 0.0}, 0.0)
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    store.set_scores(scored)
    text = render_markdown(build_board(store))
    assert "adaptive (jpeg: bpda-identity; none: exact)" in text


def test_a_bootstrap_p_value_never_claims_more_than_its_resamples_can_tell() -> None:
    """However large the difference, 2,000 resamples cannot give a p below 2/2001: a p of 0 once
    printed "p<1e-4" beside a difference whose interval reached within 0.02 of zero."""
    from leaderboard.stats import RESAMPLES, paired_comparison

    far_apart = paired_comparison({str(i): 1.0 + 0.01 * i for i in range(30)}, {str(i): 0.0 for i in range(30)})
    assert far_apart.test == "paired-bootstrap" and far_apart.interval.low > 0.9
    assert far_apart.p_value == pytest.approx(2 / (RESAMPLES + 1))
    assert far_apart.significant


def test_a_paired_comparison_s_interval_p_value_and_verdict_agree() -> None:
    """The board prints 'significant' beside a p-value; an interval and a p-value from two
    independent bootstrap draws once put 'significant' beside p = 0.051."""
    from leaderboard.stats import paired_comparison

    rng = np.random.default_rng(0)
    checked = 0
    for shift in np.linspace(0.0, 0.6, 40):
        a = rng.normal(shift, 1.0, size=24)
        b = rng.normal(0.0, 1.0, size=24)
        comparison = paired_comparison({str(i): v for i, v in enumerate(a)}, {str(i): v for i, v in enumerate(b)})
        excludes_zero = comparison.interval.low > 0 or comparison.interval.high < 0
        assert comparison.significant == (comparison.p_value < 0.05)
        if abs(comparison.p_value - 0.05) > 0.002:  # the same resamples: they can only differ on a tie at the edge
            assert excludes_zero == comparison.significant, (shift, comparison)
            checked += 1
    assert checked > 30


def test_the_convergence_re_run_lowers_the_ranking_where_it_broke_more_without_narrowing_it(tmp_path: Path) -> None:
    # "a" survives the standard attack everywhere, but the stronger re-run breaks s1 and s2: ranking
    # on the standard run alone would put it first with 1.0. The re-run covers only s1, s2 (and s9,
    # a sample outside the ranked set, which must not enter it).
    scores = {
        "a": {"adaptive": {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0}, "adaptive-2x": {"s1": 0.0, "s2": 0.0, "s9": 0.0}},
        "b": {"adaptive": {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 0.0}, "adaptive-2x": {"s1": 1.0, "s2": 1.0, "s9": 0.0}},
    }
    board = build_board(_adaptive_store(tmp_path / "store.sqlite", scores))
    (table,) = board.tables
    by_defense = {row.defense: row for row in table.rows}
    a, b = by_defense["a"], by_defense["b"]
    assert a.scores["adaptive@linf-8"].mean == 1.0  # the standard column is unchanged
    assert (a.robust.mean, a.robust.n) == (0.5, 4) and (b.robust.mean, b.robust.n) == (0.75, 4)
    assert (a.worst_case.mean, a.worst_case.n) == (0.5, 4) and (a.shared_worst_case.mean, a.shared_worst_case.n) == (0.5, 4)
    assert [row.defense for row in table.rows] == ["b", "a"]
    assert a.converged is False  # the re-run fell by 0.5 on its samples: flagged, and already counted
    entry = next(e for e in board_entries(board) if e["defense"] == "a")
    assert entry["robust"]["mean"] == 0.5 and entry["robust"]["n"] == 4
    assert {x["condition"]: x["ranked"] for x in entry["attacks"]} == {"adaptive@linf-8": True, "adaptive-2x@linf-8": True}
    assert "lowered where the convergence re-run broke more" in render_markdown(board)


def test_a_board_and_a_run_comparison_read_the_run_s_declared_rows_reused_ones_included(tmp_path: Path, capsys) -> None:
    store = Store(tmp_path / "results" / "store.sqlite")
    store.begin_run("run-1", "hand-written", "", {"note": "test"})
    _fill(store, SCORES)  # run-1 computes jpeg and none on s1, s2
    store.declare_rows("run-1", [r.fingerprint for r in store.results()])
    store.finish_run("run-1", "finished")
    # run-2's matrix: none on s1 only, every row reused from run-1 (it creates none)
    kept = [r.fingerprint for r in store.results() if r.defense == "none" and r.sample_id == "s1"]
    store.begin_run("run-2", "hand-written", "", {"note": "test"})
    store.declare_rows("run-2", kept)
    board = build_board(store)
    (table,) = board.tables
    assert [row.defense for row in table.rows] == ["none"]
    assert {c: s.n for c, s in table.rows[0].scores.items()} == {"clean": 1, "A@linf-8": 1, "B@linf-8": 1}
    assert "**Run run-2 has not finished (status: running)" in render_markdown(board)
    store.finish_run("run-2", "finished")
    assert "has not finished" not in render_markdown(build_board(store))
    assert sum(1 for _ in store.results()) == 12  # nothing deleted: a later run can reuse every row
    store.close()
    # run-2's rows were all created by run-1: comparing by run id still finds them
    assert cli.main(["compare", "run-1", "run-2", "--store", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "| shapes-vlm | vqav2:test | none | clean | 1 |" in out and "| jpeg |" not in out


def test_a_store_whose_runs_predate_declared_rows_says_its_board_mixes_them(store: Store) -> None:
    assert "predate declared rows" not in render_markdown(build_board(store))  # one run: nothing mixed
    store.begin_run("run-2", "hand-written", "", {"note": "test"})
    _fill(store, {"none": {"clean": {"s3": 1.0}}})
    store.finish_run("run-2", "finished")
    assert "This store's 2 runs predate declared rows" in render_markdown(build_board(store))


def test_convergence_is_claimed_only_for_the_threat_models_its_re_run_covered(tmp_path: Path) -> None:
    # the standard attack ran at 4/255 and 8/255, the convergence re-run only at 8/255 (as in
    # suites/codefend-cpu.yaml): the 4/255 entry must say "not checked", not "converged"
    scores = {
        "a": {"adaptive": {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0}, "adaptive-2x": {"s1": 1.0, "s2": 1.0}},
        "b": {"adaptive": {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0}, "adaptive-2x": {"s1": 0.0, "s2": 0.0}},
    }
    board = build_board(_adaptive_store(tmp_path / "store.sqlite", scores, {"linf-4": 4 / 255, "linf-8": 8 / 255},
                                        skip=lambda condition, threat: condition == "adaptive-2x" and threat == "linf-4"))
    (table,) = board.tables
    by_defense = {row.defense: row for row in table.rows}
    assert set(by_defense["a"].convergence) == {"linf-8"}
    assert by_defense["a"].converged is True and by_defense["b"].converged is False
    check = by_defense["b"].convergence["linf-8"]
    assert (check.rerun, check.reference, check.comparison.mean_difference) == ("adaptive-2x@linf-8", "adaptive@linf-8", -1.0)
    converged = {(e["defense"], e["threat_model"]["name"]): e["converged"] for e in board_entries(board)}
    assert converged == {("a", "linf-4"): None, ("a", "linf-8"): True, ("b", "linf-4"): None, ("b", "linf-8"): False}
    markdown = render_markdown(board)
    assert "yes (linf-8 only)" in markdown and "NO (linf-8 only) ⚑" in markdown
    assert "adaptive-2x@linf-8 − adaptive@linf-8 = -1.000 on its 2 samples" in markdown
    from leaderboard.html import render_html

    assert "adaptive-2x@linf-8 − adaptive@linf-8 = -1.000 on its 2 samples (limit −0.000): NOT converged" in render_html(board)
    (flag,) = [f for f in table.flags if f.code == "not-converged"]
    assert flag.defense == "b" and "adaptive-2x@linf-8 lowers adaptive@linf-8 by 1.000" in flag.message


def test_diagnostic_columns_are_described_for_what_they_are_not_as_oblivious_attacks() -> None:
    from harness.board import Condition
    from leaderboard.markdown import _describe

    probe = Condition(name="adaptive@probe-large", access="white-box", mode="oblivious", routes={}, bounded=True,
                      eps=64 / 255, max_linf=64 / 255, threat="probe-large", role="probe")
    clean_draws = Condition(name="clean-N10", access="none", mode="oblivious", routes={}, bounded=False, eps=0.0,
                            max_linf=0.0, role="clean-n-draw", draws=10)
    transfer = Condition(name="pgd@linf-8", access="white-box", mode="oblivious", routes={}, bounded=True,
                         eps=EPS, max_linf=EPS, threat="linf-8")
    assert "white-box, on the undefended victim only, ε=64/255" in _describe(probe)
    assert "none, no attack, unbounded, 10 draws" in _describe(clean_draws)
    assert "oblivious: transfer from the undefended victim for every defense but none" in _describe(transfer)
    assert "oblivious" not in _describe(probe) + _describe(clean_draws)


def test_an_attack_weaker_than_declared_is_flagged_once_per_defense_it_went_through(tmp_path: Path) -> None:
    # a third-party victim without logits: the standard attack's DLR restart raised cross-entropy
    store = Store(tmp_path / "store.sqlite")
    rows, scored = [], {}
    for defense in ("none", "jpeg"):
        for condition, mode in (("adaptive", "adaptive"), ("apgd", "oblivious")):
            for sample in ("s1", "s2"):
                row = _row(defense, condition, sample)
                row["record"] = {"attack": {"name": "apgd", "access": "white-box", "mode": mode,
                                            "role": "standard" if mode == "adaptive" else "suite"},
                                 "attack_cost": {"forward_passes": 3, "objectives_unavailable": ["dlr"]}}
                rows.append(row)
                scored[row["fingerprint"]] = ({"vqa_accuracy": 1.0}, 1.0)
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    store.set_scores(scored)
    board = build_board(store)
    flags = [(f.defense, f.condition) for f in board.tables[0].flags if f.code == "objective-unavailable"]
    assert flags == [("jpeg", "adaptive@linf-8"), ("none", "adaptive@linf-8"), (None, "apgd@linf-8")]
    assert "could not raise dlr" in render_markdown(board)
    entry = next(e for e in board_entries(board) if e["defense"] == "jpeg")
    assert {f["code"] for f in entry["flags"]} == {"objective-unavailable"}


def test_a_threat_model_the_standard_attack_skipped_is_said_to_have_no_adaptive_evaluation(tmp_path: Path) -> None:
    scores = {d: {"adaptive": {"s1": 1.0, "s2": 0.0}, "pgd": {"s1": 1.0, "s2": 1.0}} for d in ("a", "b")}
    store = _adaptive_store(tmp_path / "store.sqlite", scores, {"linf-4": 4 / 255, "linf-8": 8 / 255},
                            skip=lambda condition, threat: condition == "adaptive" and threat == "linf-4")
    markdown = render_markdown(build_board(store))
    assert "**No adaptive evaluation at linf-4**" in markdown and "linf-8**" not in markdown
