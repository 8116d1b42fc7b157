"""The work graph under each executor: the same rows and board under ``local`` and ``ray``, a Ray
worker killed mid-task is retried without lost or duplicated rows, and a failing node fails
its own cells only. Ray runs locally with 2 CPUs (``--executor ray --workers 2``).

The driver killed mid-run (and resumed) is tests/test_store_resume.py, which runs the same graph.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.plugins import load_plugins
from harness.runner import run_suite
from harness.store import Store
from harness.suite import load_suite

REPO = Path(__file__).resolve().parents[1]
SUITE = Path(__file__).resolve().parent / "fixtures" / "suites" / "store_resume.yaml"
PLUGINS = Path(__file__).resolve().parent / "fixtures" / "plugins"
ROWS = 2 * (8 + 4) * 2
ADVERSARIAL = 8 + 4
RAY = ("--executor", "ray", "--workers", "2")


def _rows(store: Path) -> dict[str, tuple]:
    db = sqlite3.connect(store)
    try:
        return {fp: (output, scores, headline) for fp, output, scores, headline in
                db.execute("SELECT fingerprint, output, scores, headline FROM results")}
    finally:
        db.close()


def _count(store: Path, table: str = "results") -> int:
    if not store.exists():
        return 0
    db = sqlite3.connect(store, timeout=10)
    try:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _comparable(board: dict) -> dict:
    """The JSON board without what is a measurement of one run (its ids, wall-clock seconds)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("run_ids", "seconds_per_image")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return strip(board)


@pytest.fixture(scope="module")
def local_run(trained_home, run_cli, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("executors") / "local"
    result = run_cli("run", SUITE, "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def _assert_same_rows_and_board(out: Path, local_run: Path) -> None:
    assert _rows(out / "store.sqlite") == _rows(local_run / "store.sqlite")
    board = json.loads((out / "leaderboard.json").read_text())
    local_board = json.loads((local_run / "leaderboard.json").read_text())
    assert _comparable(board) == _comparable(local_board)
    assert _count(out / "store.sqlite", "adversarial") == ADVERSARIAL  # each example computed once


def test_the_local_pool_gives_the_same_rows_and_board(local_run: Path, run_cli, tmp_path: Path) -> None:
    """(Ray's run is the killed-worker test below: same rows and board, after a retry.)"""
    out = tmp_path / "pool"
    result = run_cli("run", SUITE, "--out", out, "--quiet", "--executor", "local", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"{ROWS} rows computed, 0 reused" in result.stderr
    _assert_same_rows_and_board(out, local_run)


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from codefend import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.usefixtures("fresh_plugins")
def test_validate_prints_the_work_graph_and_its_critical_path(capsys) -> None:
    code, out, err = _main(["validate", str(SUITE), *RAY], capsys)
    assert code == 0, err
    # 1 training (the tiny victim), its load, PGD chunks (4 VQA + 2 caption, shared by both
    # defenses), 24 rows chunks (8 cells), 8 scorings
    assert "work graph: 40 nodes (1 train, 1 victim, 6 attack, 24 rows, 8 score), executor ray {'num_cpus': 2}" in out
    lines = out.split("critical path: ", 1)[1].splitlines()
    path = [lines[0], *[line for line in lines[1:] if line.startswith("    ")]]
    assert "passes of work" in path[0]
    assert path[1].split()[:2] == ["train", "train"] and path[2].split()[:2] == ["victim", "load"]
    assert path[-1].split()[0] == "score"


@pytest.mark.usefixtures("fresh_plugins")
def test_bad_executor_options_are_one_clear_error(capsys, tmp_path: Path) -> None:
    code, _, err = _main(["run", str(SUITE), "--address", "auto", "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith("error: --address is for the ray executor") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    code, _, err = _main(["validate", str(SUITE), "--executor", "rya"], capsys)
    assert code == 2 and "did you mean 'ray'?" in err and "Traceback" not in err


def _executing_workers() -> list[psutil.Process]:
    """Ray workers in the middle of a node (Ray titles a busy worker after its task's function)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        if cmdline.startswith("ray::execute_node"):
            found.append(process)
    return found


def test_a_ray_worker_killed_mid_task_is_retried_to_the_same_rows_and_board(
        local_run: Path, codefend_cmd, tmp_path: Path) -> None:
    """Ray with 2 workers, one SIGKILLed mid-node: no lost or duplicated rows, and the rows and
    board of the local executor."""
    out = tmp_path / "killed-worker"
    log = tmp_path / "run.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*codefend_cmd, "run", str(SUITE), "--out", str(out), "--quiet", *RAY],
                                   cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr)
        killed = None
        try:
            deadline = time.monotonic() + 240
            # mid-run: some rows are in, and a worker is executing a node right now
            while killed is None:
                assert process.poll() is None, f"the run ended before a worker could be killed:\n{log.read_text()}"
                assert time.monotonic() < deadline, "no busy Ray worker was seen in time"
                if _count(out / "store.sqlite") > 0:
                    for worker in _executing_workers():
                        worker.send_signal(signal.SIGKILL)
                        killed = worker.pid
                        break
                time.sleep(0.005)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, log.read_text()
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert f"{ROWS} rows computed, 0 reused" in log.read_text()
    assert _count(out / "store.sqlite") == ROWS
    _assert_same_rows_and_board(out, local_run)


def test_a_killed_ray_run_leaves_no_process_of_its_local_ray_within_seconds(
        trained_home, codefend_cmd, tmp_path: Path) -> None:
    """The local Ray a run starts dies with it: raylet and GCS by Ray's own fate sharing, and
    the agents and idle workers (which notice their raylet's death seconds to a minute late) by
    the run's guard (harness.lifetime)."""
    out = tmp_path / "killed-driver"
    process = subprocess.Popen([*codefend_cmd, "run", str(SUITE), "--out", str(out), "--quiet", *RAY],
                               cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _count(out / "store.sqlite") == 0:  # mid-run: Ray is up and its workers are computing
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.05)
        tree = psutil.Process(process.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in tree), [p.cmdline()[:2] for p in tree]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        # the guard looks every 0.2 s; 3 s leaves room for a loaded machine (1 s failed under a
        # 2-worker suite sharing 2 cores), and is still far below Ray's own seconds-to-a-minute
        gone_by = time.monotonic() + 3.0
        alive = tree
        while alive and time.monotonic() < gone_by:
            time.sleep(0.1)
            alive = [p for p in tree if _running(p)]
        assert not alive, f"outlived the killed run by 3 s: {[' '.join(p.cmdline())[:60] for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_guard_kills_an_orphaned_grandchild_with_its_owner(tmp_path: Path) -> None:
    """A grandchild that ignores its parent's death (double-forked) dies within a second of its
    owner's SIGKILL (without the guard it lives on under init)."""
    script = ("import os, subprocess, sys, time\n"
              "from harness.lifetime import ensure_descendant_guard\n"
              "ensure_descendant_guard()\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(120)\"]); "
              "print(p.pid, flush=True)'], stdout=subprocess.PIPE, text=True)\n"
              "print(child.stdout.readline().strip(), flush=True)\n"
              "child.wait()\n"
              "time.sleep(120)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = psutil.Process(int(owner.stdout.readline()))
        time.sleep(0.6)  # the guard's next looks at the tree
        # orphaned (its parent exited), it is adopted by the owner, a subreaper while guarded
        assert grandchild.is_running() and grandchild.ppid() == owner.pid
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        time.sleep(1.0)
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


FAILING_SUITE = """
name: failing-node
seed: 0
batch_size: 4
victims: [{name: shapes-vlm, params: {steps: 100}}]
tasks:
  - {name: vqav2, data: shapes, split: test, n: 8}
  - {name: coco_captions, data: shapes, split: test, n: 4, params: {meteor: false}}
threat_models: {linf-8: {norm: linf, eps: 8/255}}
attacks: [{name: none}, {name: pgd, threats: [linf-8], params: {steps: 3}}]
defenses: [{name: none}, {name: fails-to-purify}]
adaptive: {enabled: false, reason: "a fixture for another test"}
"""


def test_a_failing_node_fails_only_its_own_cells(trained_home, tmp_path: Path, monkeypatch, fresh_plugins) -> None:
    """In the driver's walk, whatever the executor: a node's exception comes back as its
    NodeResult (under Ray too, where ``execute_node`` is the same function)."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    import failing_defense

    plugins = load_plugins(extra=[("failing", failing_defense)])
    path = tmp_path / "suite.yaml"
    path.write_text(FAILING_SUITE)
    suite = load_suite(path, plugins)
    store = Store(tmp_path / "store.sqlite")
    try:
        summary = run_suite(suite, store, plugins=plugins, progress=False)
        failures = store.failures()
    finally:
        store.close()
    failed = sorted(line.split(": ")[0].rsplit(" | ", 1)[-1] for line in summary.failures)
    assert failed == ["fails-to-purify"] * 4, summary.failures  # 2 tasks x (clean, pgd)
    assert all("this defense always fails" in f["traceback"] and "Traceback" in f["traceback"] for f in failures)
    # every cell of the other defense completed and is scored
    assert summary.computed_rows == 2 * (8 + 4)
    db = sqlite3.connect(tmp_path / "store.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM results WHERE defense = 'none' AND headline IS NOT NULL").fetchone()[0] == 24
    finally:
        db.close()


def test_the_local_pool_runs_nodes_within_its_cpu_budget(monkeypatch) -> None:
    """A 2-thread node on 2 CPUs runs alone; two 1-thread nodes after it run side by side."""
    from executors.local import LocalExecutor
    from harness.suite import ResourceSpec

    monkeypatch.syspath_prepend(str(PLUGINS))  # spawned workers inherit sys.path
    import sleepy

    executor = LocalExecutor(workers=2, cpus=2)
    executor.start()
    try:
        wide = executor.submit(sleepy.sleep_and_time, 1.0, ResourceSpec(threads=2))
        narrow = [executor.submit(sleepy.sleep_and_time, 1.0, ResourceSpec(threads=1)) for _ in range(2)]
        assert executor.threads_for(ResourceSpec(threads=2)) == 2 and executor.threads_for(ResourceSpec(threads=8)) == 2
        times: dict[int, tuple[float, float]] = {}
        while len(times) < 3:
            times.update(executor.wait())
    finally:
        executor.close()
    assert all(times[n][0] >= times[wide][1] - 0.05 for n in narrow)  # waited for the 2 CPUs
    first, second = (times[n] for n in narrow)
    assert first[0] < second[1] and second[0] < first[1]  # together, one CPU each


class _RefusesToStart:
    """An executor that fails the test if the driver asks it for a worker."""

    dashboard_url = None

    def threads_for(self, resources):
        return None

    def start(self) -> None:
        raise AssertionError("a rerun with every row stored started the executor")

    def submit(self, fn, call, resources):
        raise AssertionError(f"a rerun with every row stored submitted a {call.stage} node")

    def wait(self):
        raise AssertionError("nothing was submitted")

    def close(self) -> None:
        pass


def test_a_rerun_with_every_row_stored_starts_no_worker(local_run: Path, tmp_path: Path) -> None:
    """The victim's fingerprint comes from its cached weights file in the driver, trainings are
    found cached by their ``done`` checks, so nothing is submitted: a rerun costs no model load."""
    import shutil

    shutil.copy(local_run / "store.sqlite", tmp_path / "store.sqlite")
    plugins = load_plugins()
    store = Store(tmp_path / "store.sqlite")
    try:
        summary = run_suite(load_suite(SUITE, plugins), store, plugins=plugins, progress=False,
                            executor=_RefusesToStart())
    finally:
        store.close()
    assert (summary.computed_rows, summary.reused_rows, summary.failures) == (0, ROWS, [])
    assert _rows(tmp_path / "store.sqlite") == _rows(local_run / "store.sqlite")


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
