"""The runner enforces the plugin contracts at run time: a defense whose output breaks
``Defense.purify``'s contract fails its own cells with an error naming it and what to fix; it
never becomes a number on the board."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import torch

from harness.plugins import load_plugins
from harness.runner import DefenseContractViolation, check_defense_output, run_suite
from harness.store import Store
from harness.suite import load_suite

PLUGINS = Path(__file__).resolve().parent / "fixtures" / "plugins"

SUITE = """
name: contract-breakers
seed: 0
batch_size: 4
victims: [{name: shapes-vlm, params: {steps: 100}}]
tasks: [{name: vqav2, data: shapes, split: test, n: 4}]
attacks: [{name: none}]
defenses: [{name: none}, {name: out-of-range}, {name: wrong-shape}]
adaptive: {enabled: false, reason: "a fixture for another test"}
"""


def test_defenses_that_break_the_contract_fail_their_cells_by_name(trained_home, tmp_path: Path, monkeypatch,
                                                                     fresh_plugins) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    import contract_breakers

    plugins = load_plugins(extra=[("breakers", contract_breakers)])
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    store = Store(tmp_path / "store.sqlite")
    try:
        summary = run_suite(load_suite(path, plugins), store, plugins=plugins, progress=False)
        stored = store.failures()
    finally:
        store.close()
    failures = {line.split(": ")[0].rsplit(" | ", 1)[-1]: line for line in summary.failures}
    assert set(failures) == {"out-of-range", "wrong-shape"}, summary.failures
    assert "defense 'out-of-range': purify returned pixels outside [0,1] (measured range [0, 2" in failures["out-of-range"]
    assert "clamp its output to [0,1]" in failures["out-of-range"]
    assert "defense 'wrong-shape': purify returned shape (4, 3, 16, 16) for input (4, 3, 32, 32)" in failures["wrong-shape"]
    assert summary.computed_rows == 4  # only the undefended cell has rows
    assert all("DefenseContractViolation" in f["traceback"] for f in stored)
    db = sqlite3.connect(tmp_path / "store.sqlite")
    try:
        assert {d for (d,) in db.execute("SELECT DISTINCT defense FROM results")} == {"none"}
    finally:
        db.close()


@pytest.mark.parametrize("output,message", [
    ("list", "returned list, not a torch.Tensor"),
    ("int", "returned dtype torch.uint8: return float pixels in"),
    ("nan", "non-finite pixels"),
    ("negative", r"outside \[0,1\] \(measured range \[-0.99"),
])
def test_each_broken_output_gets_its_own_message(output: str, message: str) -> None:
    pixels = torch.rand(2, 3, 8, 8)
    broken = {"list": [pixels], "int": (pixels * 255).to(torch.uint8), "nan": pixels.clone().fill_(float("nan")),
              "negative": pixels * 2 - 1}[output]
    with pytest.raises(DefenseContractViolation, match=message):
        check_defense_output("mine", pixels, broken)
    assert check_defense_output("mine", pixels, pixels.clamp(0, 1)) is not None


@pytest.mark.parametrize("defense,message", [
    ("misspelled-bpda", r"defense 'misspelled-bpda' declares bpda = 'identiy' — did you mean 'identity'\?"),
    ("approximate-without-method", r"defense 'approximate-without-method' declares bpda = 'approximate' but has no "
                                   r"approximate\(pixels\) method"),
])
def test_validate_rejects_declarations_no_attack_can_route(defense: str, message: str, tmp_path: Path, capsys,
                                                            fresh_plugins) -> None:
    from codefend import cli

    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.replace("{name: out-of-range}, {name: wrong-shape}", f"{{name: {defense}}}"))
    code = cli.main(["validate", str(suite), "--plugin", str(PLUGINS / "contract_breakers.py")])
    err = capsys.readouterr().err
    assert code == 2
    assert "defenses[1]" in err
    assert re.search(message, err), err
    assert "Traceback" not in err
