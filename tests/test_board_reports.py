"""Boards a researcher can trust: intervals, sanity flags, JSON entries valid against the shipped
schema, CSV, and an HTML file that really renders in headless Chromium.

One real run (tiny shapes-vlm, 40 VQA questions) with two defenses that are both the identity on
the forward pass: ``honest`` lets gradients through, ``masked`` returns a zero gradient (the
textbook gradient masking). Adaptive PGD through ``masked`` learns nothing, so the transfer of the
oblivious PGD (made on the bare victim) beats it: the board must flag ``masked``, not ``honest``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.contracts import Defense
from harness.hookspecs import hookimpl
from leaderboard.aggregate import build_board
from leaderboard.csv_report import CSVReporter
from leaderboard.entries import JSONReporter, board_entries, validate_entries
from leaderboard.html import render_html

from suite_helpers import suite_run

ARTIFACTS = Path(os.environ.get("CODEFEND_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


class HonestIdentity(Defense):
    differentiable = True

    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pixels


class MaskedIdentity(Defense):
    """The identity, with a zero gradient: it claims to be differentiable and masks."""

    differentiable = True

    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pixels * 0 + pixels.detach()


@hookimpl
def register_defenses(register):
    register("honest", HonestIdentity, description="identity (test)")
    register("masked", MaskedIdentity, description="identity with zero gradient (test)")


SUITE = """\
name: masking
seed: 0
batch_size: 40
victims:
  - {name: shapes-vlm, params: {steps: 100}}
tasks:
  - {name: vqav2, data: shapes, split: test, n: 40}
threat_models:
  linf-16: {norm: linf, eps: 16/255}
attacks:
  - name: none
  - {name: pgd, threats: [linf-16], params: {steps: 5}}
  - {name: pgd, threats: [linf-16], params: {steps: 5}, adaptive: true, defenses: [honest, masked]}
defenses:
  - name: none
  - name: honest
  - name: masked
adaptive: {enabled: false, reason: "this board tests the masking flag on its own adaptive PGD"}
"""


@pytest.fixture(scope="module")
def board_store(trained_home, tmp_path_factory):
    with suite_run(sys.modules[__name__], "masking-test", SUITE, tmp_path_factory.mktemp("masking")) as (_, store):
        yield store


@pytest.fixture(scope="module")
def board(board_store):
    return build_board(board_store)


def test_masked_defense_is_flagged_and_the_honest_one_is_not(board) -> None:
    (table,) = board.tables
    rows = {row.defense: row for row in table.rows}
    masked, honest, none = rows["masked"], rows["honest"], rows["none"]
    # the mask works as intended: adaptive PGD through it is far weaker than the transfer
    assert masked.scores["pgd-adaptive@linf-16"].mean > masked.scores["pgd@linf-16"].mean + 0.1
    masking = [f for f in table.flags if f.code == "gradient-masking"]
    assert {f.defense for f in masking} == {"masked"}, [(f.defense, f.message) for f in table.flags]
    assert "possible gradient masking" in masking[0].message
    assert not table.flags_for("honest", "pgd-adaptive@linf-16")
    # the attack did optimise on the bare victim: no loss flag for the oblivious PGD
    assert not [f for f in table.flags if f.code == "loss-did-not-rise" and f.condition == "pgd@linf-16"]
    assert none.scores["pgd@linf-16"].mean < none.scores["clean"].mean


def test_every_headline_number_has_a_confidence_interval(board) -> None:
    (table,) = board.tables
    for row in table.rows:
        for score in [*row.scores.values(), row.worst_case]:
            assert score.ci is not None and score.ci.low <= score.mean <= score.ci.high
        if row is not table.rows[-1]:
            assert row.versus_next is not None and row.versus_next.n == 40
    # ranking uses the conditions every defense faced: none never faced the adaptive attack
    assert table.shared_conditions == ["clean", "pgd@linf-16"]
    masked = next(r for r in table.rows if r.defense == "masked")
    assert masked.worst_case.mean <= masked.shared_worst_case.mean
    none = next(r for r in table.rows if r.defense == "none")
    attacked = none.scores["pgd@linf-16"]
    assert attacked.ci.high - attacked.ci.low > 0  # 40 varied answers: a real interval


def test_json_entries_validate_against_the_shipped_schema(board) -> None:
    import jsonschema

    text = JSONReporter()(board)
    entries = json.loads(text)
    assert {(e["defense"], e["threat_model"]["name"]) for e in entries} == {
        ("none", "linf-16"), ("honest", "linf-16"), ("masked", "linf-16")}
    masked = next(e for e in entries if e["defense"] == "masked")
    assert [f["code"] for f in masked["flags"]] == ["gradient-masking"]
    assert masked["robust"]["mean"] <= masked["clean"]["mean"]
    assert masked["provenance"]["run_ids"] and masked["provenance"]["packages"]["torch"]
    modes = {a["condition"]: a["mode"] for a in masked["attacks"]}
    assert modes == {"pgd@linf-16": "oblivious", "pgd-adaptive@linf-16": "adaptive"}
    broken = dict(entries[0], robust={"mean": "high"})
    with pytest.raises(jsonschema.ValidationError):
        validate_entries([broken])


def test_every_sanity_flag_a_board_can_raise_is_valid_json(board) -> None:
    """A board with a not-converged flag once made ``codefend run`` exit 1 with no JSON board: the
    schema's enum lacked the code. Every code the aggregator can raise must be in the schema."""
    import dataclasses

    from leaderboard.aggregate import FLAG_CODES, Flag
    from leaderboard.entries import entry_schema

    schema_codes = entry_schema()["properties"]["flags"]["items"]["properties"]["code"]["enum"]
    assert sorted(schema_codes) == sorted(FLAG_CODES)
    table = board.tables[0]
    flagged = dataclasses.replace(board, tables=[dataclasses.replace(
        table, flags=[Flag(code, f"a {code} flag", "masked") for code in FLAG_CODES])])
    entries = json.loads(JSONReporter()(flagged))
    masked = next(e for e in entries if e["defense"] == "masked")
    assert sorted(f["code"] for f in masked["flags"]) == sorted(FLAG_CODES)
    with pytest.raises(ValueError, match="unknown sanity flag code"):
        Flag("not-a-flag", "x")


def test_csv_has_one_line_per_condition_with_intervals(board) -> None:
    lines = list(csv.DictReader(io.StringIO(CSVReporter()(board))))
    masked = [line for line in lines if line["defense"] == "masked"]
    assert {line["condition"] for line in masked} == {
        "clean", "pgd@linf-16", "pgd-adaptive@linf-16", "robust (oblivious only)", "worst case", "worst case, shared conditions"}
    flagged = next(line for line in masked if line["condition"] == "pgd-adaptive@linf-16")
    assert flagged["flags"] == "gradient-masking" and flagged["mode"] == "adaptive"
    assert float(flagged["ci95_low"]) <= float(flagged["mean"]) <= float(flagged["ci95_high"])


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_html_board_renders_in_headless_chromium(board, tmp_path: Path) -> None:
    found = _chromium()
    if found is None:
        if os.environ.get("CODEFEND_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (Debian packages chromium, chromium-driver)")
        pytest.skip("no chromium/chromedriver here (install Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = tmp_path / "leaderboard.html"
    page.write_text(render_html(board))
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(page.as_uri())
        table = driver.find_element(By.CSS_SELECTOR, "table.scores")
        assert table.is_displayed()
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 3
        plots = driver.find_elements(By.CSS_SELECTOR, ".plots img")
        assert len(plots) == 3
        for plot in plots:
            assert plot.is_displayed()
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 100
        grid = driver.find_elements(By.CSS_SELECTOR, "table.grid img")
        assert grid and all(driver.execute_script("return arguments[0].naturalWidth", img) == 32 for img in grid)
        # sorting works: clicking the defense header orders the rows by name
        driver.find_element(By.CSS_SELECTOR, "table.scores th").click()
        names = [r.find_element(By.CSS_SELECTOR, "td").text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert names == sorted(names)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "leaderboard.png"))
    finally:
        driver.quit()


def test_leaderboard_and_compare_commands(board_store, capsys, monkeypatch) -> None:
    from codefend import cli

    folder = board_store.path.parent
    for fmt in ("md", "html", "json", "csv"):
        out = folder / f"board.{fmt}"
        assert cli.main(["leaderboard", str(folder), "--format", fmt, "--out", str(out)]) == 0
        assert out.stat().st_size > 100
    capsys.readouterr()
    run_id = board_store.runs()[0]["run_id"]
    assert cli.main(["compare", run_id, run_id, "--store", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "| shapes-vlm | vqav2:test | masked | pgd-adaptive@linf-16 | 40 |" in out
    assert "+0 [+0, +0]" in out  # a run against itself differs by nothing
    assert cli.main(["compare", "no-such-run", run_id, "--store", str(folder)]) == 2
    assert "run 'no-such-run' is not in" in capsys.readouterr().err
