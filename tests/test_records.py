"""The typed row record: what the runner writes is what the store returns and the docs describe."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from harness.records import ResultRow, RowRecord, record_fields_markdown
from harness.store import Store

REPO = Path(__file__).resolve().parents[1]


def test_the_schema_document_shows_the_record_fields_of_the_code() -> None:
    text = (REPO / "docs" / "results-schema.md").read_text()
    block = text.split("<!-- record-fields: begin -->\n", 1)[1].split("\n<!-- record-fields: end -->", 1)[0]
    assert block == record_fields_markdown(), "docs/results-schema.md is stale: paste `python -m harness.records` in"


def _row(**record) -> ResultRow:
    return ResultRow(fingerprint="fp", run_id="r", suite="s", victim="v", task="vqav2:test", metric="vqa_accuracy",
                     attack="adaptive@linf-8", threat="linf-8", norm="linf", eps=8 / 255, defense="diffpure",
                     sample_id="1", output="yes", adversarial_key="k", record=RowRecord.model_validate(record))


def test_a_row_reads_back_as_it_was_written(tmp_path: Path) -> None:
    row = _row(attack={"name": "apgd", "mode": "adaptive", "gradient": "exact", "eot": 20, "role": "standard",
                       "surrogate_process": "ddpm, 2 steps at the same t*"},
               defense={"name": "diffpure", "stochastic": True, "psnr": None, "ssim": 0.5},
               draw_outputs=["yes", "no"], images={"clean": "a", "defended": "b"})
    store = Store(tmp_path / "store.sqlite")
    try:
        store.commit_chunk([row], {})
        store.set_scores({"fp": ({"vqa_accuracy": 0.0, "draw_scores": [1.0, 0.0]}, 0.0)})
        (back,) = store.results()
    finally:
        store.close()
    assert back.record == row.record
    assert back.record.attack.surrogate_process == "ddpm, 2 steps at the same t*" and back.record.defense.psnr is None
    assert back.scores == {"vqa_accuracy": 0.0, "draw_scores": [1.0, 0.0]}


def test_a_row_of_an_older_version_reads_with_its_route_label_kept(tmp_path: Path) -> None:
    """Before the typed record an adaptive route's surrogate process sat under `surrogate`, the
    key of a transfer attack's surrogate victim; unknown keys are ignored, missing ones default."""
    store = Store(tmp_path / "store.sqlite")
    try:
        store.commit_chunk([_row()], {})
        store.set_scores({"fp": ({"vqa_accuracy": 1.0}, 1.0)})
    finally:
        store.close()
    old = {"attack": {"name": "apgd", "mode": "adaptive", "gradient": "exact", "eot": 2, "surrogate": "ddim, 2 steps"},
           "a_key_of_long_ago": 1}
    db = sqlite3.connect(tmp_path / "store.sqlite")
    with db:
        db.execute("UPDATE results SET record = ?", (json.dumps(old),))
    db.close()
    store = Store(tmp_path / "store.sqlite")
    try:
        (back,) = store.results()
    finally:
        store.close()
    assert back.record.attack.surrogate_process == "ddim, 2 steps" and back.record.attack.surrogate is None
    assert back.record.attack.draws == 1 and back.record.threat.bounded


def test_a_record_field_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ValueError, match="training_label"):
        RowRecord.model_validate({"attack": {"training_label": "maybe"}})
