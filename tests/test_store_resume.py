"""The result store: killed runs resume to the same board, oblivious attacks are shared, boards re-render.

All runs go through the real ``codefend`` executable on fixtures/suites/store_resume.yaml:
tiny victim, VQAv2 n=8 + COCO captions n=4, {none, PGD-3@linf-8} x {none, jpeg}, batch_size 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from harness.store import Store
from tasks.coco_captions import CocoCaptionsTask
from tasks.vqav2 import VQAv2Task

REPO = Path(__file__).resolve().parents[1]
SUITE = Path(__file__).resolve().parent / "fixtures" / "suites" / "store_resume.yaml"
CELLS = 8  # 2 tasks x (clean + pgd@linf-8) x 2 defenses
ROWS = 2 * (8 + 4) * 2  # per task: n samples x 2 attack conditions x 2 defenses
ADVERSARIAL = 8 + 4  # one PGD example per sample, shared by both defenses
EPS = 8 / 255
SUMMARY = re.compile(r"^run \S+: (\d+) cells, (\d+) rows computed, (\d+) reused from (.+), [\d.]+ s$", re.M)


@dataclass
class Run:
    out: Path
    result: subprocess.CompletedProcess
    seconds: float

    @property
    def store(self) -> Path:
        return self.out / "store.sqlite"

    @property
    def board(self) -> str:
        return (self.out / "leaderboard.md").read_text()

    def summary(self) -> tuple[int, int, int]:
        match = SUMMARY.search(self.result.stderr)
        assert match, f"no run summary on stderr:\n{self.result.stderr}"
        return int(match[1]), int(match[2]), int(match[3])


def _run(run_cli, out: Path) -> Run:
    started = time.perf_counter()
    result = run_cli("run", SUITE, "--out", out, "--quiet")
    return Run(out, result, time.perf_counter() - started)


@pytest.fixture(scope="module")
def run_a(trained_home, run_cli, tmp_path_factory) -> Run:
    run = _run(run_cli, tmp_path_factory.mktemp("store") / "A")
    assert run.result.returncode == 0, run.result.stderr
    return run


def _count(db_path: Path, where: str = "1") -> int:
    if not db_path.exists():
        return 0
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return db.execute(f"SELECT count(*) FROM results WHERE {where}").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        db.close()


def _query(db_path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_uninterrupted_run(run_a: Run) -> None:
    assert run_a.summary() == (CELLS, ROWS, 0)
    assert run_a.board + "\n" in run_a.result.stdout
    assert _count(run_a.store) == ROWS
    assert _count(run_a.store, "scores IS NULL OR headline IS NULL") == 0
    tables = [line for line in run_a.board.splitlines() if line.startswith("## ")]
    assert tables == ["## shapes-vlm · coco_captions:test — cider (n=4)", "## shapes-vlm · vqav2:test — vqa_accuracy (n=8)"]
    assert run_a.board.count("| defense | clean | pgd@linf-8 | robust (oblivious only) | worst case | vs next row |") == 2
    ((status, provenance),) = _query(run_a.store, "SELECT status, provenance FROM runs")
    assert status == "finished"
    assert json.loads(provenance)["computed_rows"] == ROWS


def _without_timings(board: str) -> str:
    """The board with the 's / image' column of its cost tables blanked."""
    lines = []
    column = None
    for line in board.splitlines():
        cells = line.split("|")
        if line.startswith("| defense | clean cost"):
            column = [c.strip() for c in cells].index("s / image")
        elif not line.startswith("|"):
            column = None
        if column is not None and len(cells) > column:
            cells[column] = " ? "
        lines.append("|".join(cells))
    return "\n".join(lines)


def test_killed_run_resumes_to_the_same_board(run_a: Run, codefend_cmd, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "B"
    db = out / "store.sqlite"
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*codefend_cmd, "run", str(SUITE), "--out", str(out), "--quiet"],
                                   cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            # kill it in the middle of the attack: once at least one PGD row is committed
            while _count(db, "attack = 'pgd'") == 0:
                assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no PGD row was committed in time"
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL

    committed = _count(db)
    assert 0 < committed < ROWS, f"{committed} rows: the kill should land mid-run"
    assert _query(db, "PRAGMA integrity_check") == [("ok",)]
    ((status,),) = _query(db, "SELECT status FROM runs")
    assert status != "finished"
    partial = run_cli("leaderboard", out)
    assert partial.returncode == 0, partial.stderr
    assert "has not finished (status: killed)" in partial.stdout  # read from its dead process; nothing written

    resumed = _run(run_cli, out)
    assert resumed.result.returncode == 0, resumed.result.stderr
    assert resumed.summary() == (CELLS, ROWS - committed, committed)
    assert _count(db) == ROWS and _count(db, "scores IS NULL") == 0
    # byte-identical, but for the measured wall-clock seconds per image (a measurement of this run)
    assert _without_timings(resumed.board) == _without_timings(run_a.board)
    assert _query(db, "SELECT count(*) FROM adversarial") == [(ADVERSARIAL,)]


def test_rerun_reuses_every_row(run_a: Run, run_cli) -> None:
    board = run_a.board
    again = _run(run_cli, run_a.out)
    assert again.result.returncode == 0, again.result.stderr
    assert again.summary() == (CELLS, 0, ROWS)
    assert again.seconds < 60
    assert again.board == board
    assert _count(run_a.store) == ROWS


def _rows_by_condition(store: Path) -> dict[tuple[str, str, str, str, str], tuple[str | None, dict]]:
    rows = _query(store, "SELECT task, attack, threat, defense, sample_id, adversarial_key, record FROM results")
    return {(t, a, th, d, s): (key, json.loads(record)) for t, a, th, d, s, key, record in rows}


def test_oblivious_adversarial_examples_are_computed_once_and_reused(run_a: Run) -> None:
    rows = _rows_by_condition(run_a.store)
    pgd_jpeg = {k: v for k, v in rows.items() if k[1] == "pgd" and k[3] == "jpeg"}
    assert len(pgd_jpeg) == ADVERSARIAL
    for (task, attack, threat, _, sample), (key, record) in pgd_jpeg.items():
        none_key, none_record = rows[(task, attack, threat, "none", sample)]
        assert key is not None and key == none_key
        assert record["attack"]["reused"] is True
        assert record["attack_cost"] == none_record["attack_cost"]  # the cost of the run it reuses
        # the examples come from the work graph's attack node, shared by every defense's rows
        assert none_record["attack"]["reused"] is True
        assert none_record["attack_cost"]["backward_passes"] == 3
        assert record["perturbation"] == pytest.approx(none_record["perturbation"])
        assert record["threat"]["space"] == "victim input 32x32, [0,1]"
    clean_rows = [v for k, v in rows.items() if k[1] == "none"]
    assert clean_rows and all(key is None and record["perturbation"]["linf"] == 0 for key, record in clean_rows)
    assert _query(run_a.store, "SELECT count(*) FROM adversarial") == [(ADVERSARIAL,)]


def test_stored_adversarial_examples_are_lossless_and_inside_the_ball(run_a: Run, tiny_victim) -> None:
    samples = {("vqav2:test", s.id): s for s in VQAv2Task(data="shapes").samples("test", 8, 0)}
    samples |= {("coco_captions:test", s.id): s for s in CocoCaptionsTask(data="shapes", meteor=False).samples("test", 4, 0)}
    rows = _rows_by_condition(run_a.store)
    digests = dict(_query(run_a.store, "SELECT key, digest FROM adversarial"))
    store = Store(run_a.store)
    try:
        checked = 0
        for (task, attack, _, defense, sample_id), (key, record) in rows.items():
            if attack != "pgd" or defense != "none":
                continue
            adversarial, _ = store.adversarial([key])[key]
            assert np.array_equal(adversarial, store.artifact(digests[key]))
            assert adversarial.dtype == np.float32
            assert adversarial.shape == (3, *tiny_victim.input_size)
            clean = tiny_victim.prepare([samples[(task, sample_id)].image])[0].numpy()
            distance = np.abs(adversarial - clean).max()
            assert 0 < distance <= EPS + 1e-6
            assert adversarial.min() >= 0 and adversarial.max() <= 1
            # lossless: the stored pixels give back exactly the perturbation measured at run time
            assert distance == pytest.approx(record["perturbation"]["linf"], abs=1e-6)
            l2 = float(np.linalg.norm((adversarial - clean).ravel()))
            assert l2 == pytest.approx(record["perturbation"]["l2"], rel=1e-5)
            checked += 1
    finally:
        store.close()
    assert checked == ADVERSARIAL


def test_leaderboard_rerenders_without_a_model(run_a: Run, run_cli, tmp_path: Path) -> None:
    empty_home = tmp_path / "empty-home"  # no trained model here: loading one would mean training
    board = run_a.board
    started = time.perf_counter()
    result = run_cli("leaderboard", run_a.out, env={"CODEFEND_HOME": str(empty_home)})
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout == board + "\n"
    assert seconds < 20
    assert not (empty_home / "models").exists() and not (empty_home / "data").exists()

    to_file = tmp_path / "board.md"
    result = run_cli("leaderboard", run_a.store, "--out", to_file, env={"CODEFEND_HOME": str(empty_home)})
    assert result.returncode == 0, result.stderr
    assert to_file.read_text() == board


def test_rows_record_what_the_defense_did_to_the_image(run_a: Run) -> None:
    """PSNR/SSIM of the defense's output against the clean image, and its cost, on every row."""
    rows = _query(run_a.store, "SELECT defense, attack, record FROM results WHERE task LIKE 'vqav2%'")
    quality: dict[tuple[str, str], list[tuple]] = {}
    for defense, attack, record in rows:
        d = json.loads(record)["defense"]
        assert d["seconds_per_image"] >= 0 and d["passes_per_image"] == 0 and d["seen_attacks"] == []
        assert json.loads(record)["attack"]["seen_in_training"] is False
        quality.setdefault((defense, attack), []).append((d["psnr"], d["ssim"]))
    # an untouched clean image has no finite PSNR (stored as null) and SSIM 1
    assert all(p is None and s == pytest.approx(1.0) for p, s in quality[("none", "none")])
    # JPEG changes the clean image a little; PGD-8 moves it by at most 8/255 (PSNR >= 30.1 dB)
    assert all(20 < p < 40 and 0.5 < s < 1 for p, s in quality[("jpeg", "none")])  # measured 24.3-30.6 dB
    assert all(p >= 30.0 for p, _ in quality[("none", "pgd")])
    board = run_a.board
    assert "| defense | clean cost | s / image | network evals / image |" in board


def test_a_second_run_on_a_busy_store_refuses_and_computes_nothing(run_a: Run, tmp_path: Path, run_cli) -> None:
    """A run in progress holds the store's writer lock (here this test holds it, so that the
    second run cannot arrive after a fast first one has finished)."""
    out = tmp_path / "C"
    store = Store(out / "store.sqlite")
    try:
        with store.writer_lock():
            second = _run(run_cli, out)
            assert second.result.returncode == 2, second.result.stderr
            assert "is being written by a run in progress (pid" in second.result.stderr, second.result.stderr
            assert "Traceback" not in second.result.stderr
            assert _query(out / "store.sqlite", "SELECT count(*) FROM runs") == [(0,)]
            assert _count(out / "store.sqlite") == 0
        after = _run(run_cli, out)  # the lock released: the run computes every row, once
    finally:
        store.close()
    assert after.result.returncode == 0, after.result.stderr
    assert after.summary() == (CELLS, ROWS, 0)


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


def test_a_killed_run_leaves_no_child_process_after_a_second(run_a: Run, codefend_cmd, tmp_path: Path) -> None:
    out = tmp_path / "D"
    db = out / "store.sqlite"
    process = subprocess.Popen([*codefend_cmd, "run", str(SUITE), "--out", str(out), "--quiet", "--workers", "2"],
                               cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _count(db, "attack = 'pgd'") == 0:  # mid-run, with both workers up
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.05)
        children = _descendants(process.pid)
        assert len(children) >= 2, "expected the pool's workers below the driver"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        time.sleep(1.0)
        assert not [pid for pid in children if _alive(pid)], "children outlived the killed run by a second"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_meteor_jvm_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    import shutil
    import sys

    if shutil.which("java") is None:
        pytest.skip("no Java here: METEOR does not start")
    script = "from tasks.caption_metrics import _Meteor\nimport time\nm = _Meteor()\nprint(m.meteor_p.pid, flush=True)\ntime.sleep(60)\n"
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        jvm = int(owner.stdout.readline())
        assert _alive(jvm)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        time.sleep(1.0)
        assert not _alive(jvm), "the METEOR JVM outlived its owner by a second"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_the_board_shows_the_latest_run_s_matrix_never_rows_it_dropped(run_a: Run, run_cli, tmp_path: Path) -> None:
    # a copy of run A's store, re-run with a smaller suite: 4 VQA questions instead of 8, jpeg dropped.
    # Every row stays stored (resuming reuses them), but the board is the new run's matrix only: before
    # runs declared their rows, the dropped defense and the 4 other questions stayed on the board
    out = tmp_path / "smaller"
    out.mkdir()
    Store(run_a.store).close()  # checkpoint the WAL so that copying the file copies every row
    (out / "store.sqlite").write_bytes(run_a.store.read_bytes())
    suite = tmp_path / "smaller.yaml"
    suite.write_text(SUITE.read_text().replace("split: test, n: 8}", "split: test, n: 4}").replace("  - name: jpeg\n", ""))
    smaller = run_cli("run", suite, "--out", out, "--quiet")
    assert smaller.returncode == 0, smaller.stderr
    board = (out / "leaderboard.md").read_text()
    tables = [line for line in board.splitlines() if line.startswith("## ")]
    assert tables == ["## shapes-vlm · coco_captions:test — cider (n=4)", "## shapes-vlm · vqav2:test — vqa_accuracy (n=4)"]
    assert "| jpeg |" not in board and "| none |" in board
    assert _count(out / "store.sqlite", "defense = 'jpeg'") > 0  # kept, not shown

    # the original suite again: every row is reused, and its board comes back
    again = run_cli("run", SUITE, "--out", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert _without_timings((out / "leaderboard.md").read_text()) == _without_timings(run_a.board)
