"""The result store: one SQLite database (WAL) per output folder.

Tables (schema version :data:`SCHEMA_VERSION`):

- ``runs``: one row per ``codefend run`` — run id, suite, start/finish times, provenance JSON.
- ``results``: one row per (cell, sample), keyed by ``fingerprint`` — a hash of everything that
  produced it (victim weights, task + data + subset, sample id and input hash, attack + params +
  threat + seed, defense + params, schema version). ``output`` is written as soon as the sample is
  generated; ``scores`` (JSON) and ``headline`` once its cell is complete (set-level metrics such
  as CIDEr need every sample of the cell). ``record`` holds timings, pass counts, the perturbation
  norms actually stored, and the plugin parameters.
- ``adversarial``: oblivious adversarial examples, keyed by (victim, task, sample, attack, threat,
  seed) so every defense reuses them; pixels live in ``artifacts``.
- ``artifacts``: content-addressed float32 arrays (``.npy`` bytes), lossless by construction.
- ``failures``: cells that failed (an attack outside its threat model, say), with the error and
  its traceback; the run's other cells complete.
- ``run_rows``: the fingerprints of every row a run's matrix holds, computed or reused from the
  store (declared when the run plans them). A board is the latest such run's rows, never the
  whole table: rows of earlier code, or of samples, defenses and attacks a suite has since
  dropped, stay stored (resuming reuses them) but never reach a board. Stores written before this
  table existed have no declared rows; their boards read every row, as they always did.

Every write is one transaction: a killed process loses at most the chunk in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from harness.records import ResultRow, RowRecord

SCHEMA_VERSION = 1

_RESULT_COLUMNS = ("fingerprint", "run_id", "suite", "victim", "task", "metric", "attack", "threat", "norm", "eps",
                   "defense", "sample_id", "output", "adversarial_key", "scores", "headline", "record")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, suite TEXT NOT NULL, suite_path TEXT, started REAL NOT NULL,
    finished REAL, status TEXT NOT NULL, provenance TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    digest TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS adversarial (
    key TEXT PRIMARY KEY, digest TEXT NOT NULL REFERENCES artifacts(digest), record TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    fingerprint TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    suite TEXT NOT NULL,
    victim TEXT NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    attack TEXT NOT NULL,
    threat TEXT NOT NULL,
    norm TEXT NOT NULL,
    eps REAL NOT NULL,
    defense TEXT NOT NULL,
    sample_id TEXT NOT NULL,
    output TEXT NOT NULL,
    adversarial_key TEXT,
    scores TEXT,
    headline REAL,
    record TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_cell ON results (victim, task, attack, threat, defense);
CREATE TABLE IF NOT EXISTS corpus_scores (
    victim TEXT NOT NULL, task TEXT NOT NULL, attack TEXT NOT NULL, threat TEXT NOT NULL, defense TEXT NOT NULL,
    rows_digest TEXT NOT NULL, metrics TEXT NOT NULL,
    PRIMARY KEY (victim, task, attack, threat, defense, rows_digest)
);
CREATE TABLE IF NOT EXISTS failures (
    run_id TEXT NOT NULL, cell TEXT NOT NULL, error TEXT NOT NULL, traceback TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_rows (
    run_id TEXT NOT NULL, fingerprint TEXT NOT NULL, PRIMARY KEY (run_id, fingerprint)
);
"""


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: leave the row alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _died(provenance: dict[str, Any]) -> bool:
    """Whether a run's process (recorded in its provenance) ran on this host and is gone."""
    return provenance.get("host") == socket.gethostname() and not _process_alive(provenance.get("pid"))


def digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class StoreError(Exception):
    """A result store this harness cannot use: not SQLite, another schema, or busy (below)."""


class StoreBusy(StoreError):
    """Another process is running a suite into this store (one writer per store at a time)."""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.executescript(_SCHEMA)
                found = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if found is None:
                    self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(found[0]) != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} was written with store schema {found[0]}, this harness reads {SCHEMA_VERSION}; "
                        "use a new --out folder or the harness version that wrote it"
                    )
        except (sqlite3.DatabaseError, StoreError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.path} is not a result store ({exc}): pass the store.sqlite of a results folder "
                             "written by `codefend run`, or a new --out folder") from None

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold this store's writer lock for a run: a second run on the same store refuses at
        once, before any compute, instead of recomputing rows the first is computing. The OS
        drops the lock when its process dies, so a killed run never leaves the store locked."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        handle = open(lock_path, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise StoreBusy(
                    f"{self.path} is being written by a run in progress ({holder}). Wait for it to finish "
                    "(rerun then: the rows it committed are reused), or give this run its own --out folder."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            yield
        finally:
            handle.close()  # closing the descriptor releases the lock

    # -- runs -------------------------------------------------------------------------------
    def begin_run(self, run_id: str, suite: str, suite_path: str, provenance: dict[str, Any]) -> None:
        self._mark_dead_runs()
        with self._db:
            self._db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, NULL, 'running', ?)",
                (run_id, suite, suite_path, time.time(), json.dumps(provenance, default=str)),
            )

    def _mark_dead_runs(self) -> None:
        """A run killed outright never finishes its row: mark those whose process is gone."""
        with self._db:
            for run_id, text in self._db.execute("SELECT run_id, provenance FROM runs WHERE status='running'").fetchall():
                if _died(json.loads(text)):
                    self._db.execute("UPDATE runs SET status='killed' WHERE run_id=?", (run_id,))

    def content_stamp(self) -> str:
        """A digest of everything a board is built from (rows, their scores, failed cells): equal
        stamps, equal boards."""
        rows = self._db.execute(
            "SELECT count(*), max(created), total(headline), sum(scores IS NOT NULL) FROM results").fetchone()
        failures = self._db.execute("SELECT count(*), max(created) FROM failures").fetchone()
        corpus = self._db.execute("SELECT count(*), group_concat(rows_digest) FROM corpus_scores").fetchone()
        return digest_json([list(rows), list(failures), list(corpus), self._board_run_stamp(), SCHEMA_VERSION])

    def _board_run_stamp(self) -> list[Any]:
        """Which rows the board shows (the board run's declared matrix, not its id: a rerun of the
        same matrix keeps its boards) and whether that run finished (an unfinished one is named)."""
        run_id = self.board_run()
        if run_id is None:
            return []
        (status,) = self._db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        digest = hashlib.sha256()
        for (fingerprint,) in self._db.execute("SELECT fingerprint FROM run_rows WHERE run_id=? ORDER BY fingerprint", (run_id,)):
            digest.update(fingerprint.encode())
        return [digest.hexdigest(), "finished" if status.startswith("finished") else f"{run_id} {status}"]

    def finish_run(self, run_id: str, status: str, extra: dict[str, Any] | None = None) -> None:
        with self._db:
            row = self._db.execute("SELECT provenance FROM runs WHERE run_id=?", (run_id,)).fetchone()
            provenance = {**json.loads(row[0]), **(extra or {})}
            self._db.execute(
                "UPDATE runs SET finished=?, status=?, provenance=? WHERE run_id=?",
                (time.time(), status, json.dumps(provenance, default=str), run_id),
            )

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first. A run still marked running whose process on this host is gone
        reads as ``killed`` (the next run writes that status; reading writes nothing)."""
        cur = self._db.execute("SELECT run_id, suite, suite_path, started, finished, status, provenance FROM runs ORDER BY started")
        runs = []
        for r in cur:
            provenance = json.loads(r[6])
            status = "killed" if r[5] == "running" and _died(provenance) else r[5]
            runs.append({"run_id": r[0], "suite": r[1], "suite_path": r[2], "started": r[3], "finished": r[4],
                         "status": status, "provenance": provenance})
        return runs

    # -- artifacts and adversarial examples ----------------------------------------------------
    @staticmethod
    def _encode(array: np.ndarray) -> tuple[str, bytes]:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
        data = buffer.getvalue()
        return hashlib.sha256(data).hexdigest(), data

    def adversarial(self, keys: Iterable[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """key -> (pixels, the record of the attack run that made them), for the keys stored."""
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for key in keys:
            row = self._db.execute(
                "SELECT a.data, v.record FROM adversarial v JOIN artifacts a ON a.digest = v.digest WHERE v.key=?", (key,)
            ).fetchone()
            if row is not None:
                out[key] = (np.load(io.BytesIO(row[0]), allow_pickle=False), json.loads(row[1]))
        return out

    def artifact(self, digest: str) -> np.ndarray:
        row = self._db.execute("SELECT data FROM artifacts WHERE digest=?", (digest,)).fetchone()
        if row is None:
            raise KeyError(digest)
        return np.load(io.BytesIO(row[0]), allow_pickle=False)

    # -- results ------------------------------------------------------------------------------
    def _by_fingerprint(self, columns: str, fingerprints: Iterable[str]) -> Iterator[tuple[Any, ...]]:
        """Rows for these fingerprints, ``fingerprint`` first, in batches of SQLite parameters."""
        wanted = list(fingerprints)
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            yield from self._db.execute(f"SELECT fingerprint, {columns} FROM results WHERE fingerprint IN ({marks})", part)

    def existing(self, fingerprints: Iterable[str]) -> dict[str, bool]:
        """fingerprint -> whether it is scored, for the fingerprints already stored."""
        return {fp: bool(scored) for fp, scored in self._by_fingerprint("scores IS NOT NULL", fingerprints)}

    @classmethod
    def artifact_digest(cls, array: np.ndarray) -> str:
        """The content address :meth:`commit_chunk` stores ``array`` under."""
        return cls._encode(array)[0]

    def commit_chunk(
        self, rows: list[ResultRow], adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]],
        artifacts: Iterable[np.ndarray] = (),
    ) -> None:
        """Write a chunk's new adversarial examples, artifacts (example images) and result rows in
        one transaction."""
        now = time.time()
        with self._db:
            for array in artifacts:
                digest, data = self._encode(array)
                self._db.execute(
                    "INSERT OR IGNORE INTO artifacts VALUES (?, 'float32', ?, ?)", (digest, json.dumps(list(array.shape)), data)
                )
            for key, (array, record) in adversarial.items():
                digest, data = self._encode(array)
                self._db.execute(
                    "INSERT OR IGNORE INTO artifacts VALUES (?, 'float32', ?, ?)", (digest, json.dumps(list(array.shape)), data)
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO adversarial VALUES (?, ?, ?, ?)", (key, digest, json.dumps(record, default=str), now)
                )
            for r in rows:
                self._db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL,?,?)",
                    (
                        r.fingerprint, r.run_id, r.suite, r.victim, r.task, r.metric, r.attack,
                        r.threat, r.norm, r.eps, r.defense, r.sample_id, r.output,
                        r.adversarial_key, json.dumps(r.record.as_json()), now,
                    ),
                )

    def set_scores(self, scored: dict[str, tuple[dict[str, float], float]]) -> None:
        with self._db:
            for fp, (scores, headline) in scored.items():
                self._db.execute(
                    "UPDATE results SET scores=?, headline=? WHERE fingerprint=?", (json.dumps(scores), headline, fp)
                )

    @staticmethod
    def rows_digest(fingerprints: Iterable[str]) -> str:
        """Names one exact set of rows: corpus scores belong to the rows they were computed on."""
        return digest_json(sorted(fingerprints))

    def set_corpus_scores(self, cell: tuple[str, str, str, str, str], fingerprints: Iterable[str],
                          metrics: dict[str, float]) -> None:
        """A cell's set-level metrics ((victim, task, attack, threat, defense) as in its rows)."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO corpus_scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (*cell, self.rows_digest(fingerprints), json.dumps(metrics)))

    def corpus_scores(self, cell: tuple[str, str, str, str, str], fingerprints: Iterable[str]) -> dict[str, float] | None:
        """The cell's corpus metrics if they were computed on exactly these rows, else None."""
        found = self._db.execute(
            "SELECT metrics FROM corpus_scores WHERE victim=? AND task=? AND attack=? AND threat=? AND defense=? "
            "AND rows_digest=?", (*cell, self.rows_digest(fingerprints))).fetchone()
        return json.loads(found[0]) if found else None

    def outputs(self, fingerprints: Iterable[str]) -> dict[str, str]:
        return dict(self._by_fingerprint("output", fingerprints))

    def draw_outputs(self, fingerprints: Iterable[str]) -> dict[str, list[str]]:
        """fingerprint -> the outputs of every purification draw, for rows evaluated over N draws."""
        out = {}
        for fp, text in self._by_fingerprint("record", fingerprints):
            draws = RowRecord.model_validate_json(text).draw_outputs
            if draws:
                out[fp] = list(draws)
        return out

    # -- failed cells -----------------------------------------------------------------------------
    def record_failure(self, run_id: str, cell: str, error: str, traceback: str) -> None:
        with self._db:
            self._db.execute("INSERT INTO failures VALUES (?, ?, ?, ?, ?)", (run_id, cell, error, traceback, time.time()))

    def failures(self, run_id: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT run_id, cell, error, traceback, created FROM failures"
        rows = self._db.execute(query + (" WHERE run_id=?" if run_id else "") + " ORDER BY created", (run_id,) if run_id else ())
        return [{"run_id": r[0], "cell": r[1], "error": r[2], "traceback": r[3], "created": r[4]} for r in rows]

    def declare_rows(self, run_id: str, fingerprints: Iterable[str]) -> None:
        """Record that ``run_id``'s matrix holds these rows (whether it computes or reuses them)."""
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO run_rows VALUES (?, ?)", ((run_id, fp) for fp in fingerprints))

    def declared(self, run_id: str) -> bool:
        """Whether ``run_id`` declared its rows (runs from before the ``run_rows`` table did not)."""
        return self._db.execute("SELECT 1 FROM run_rows WHERE run_id=? LIMIT 1", (run_id,)).fetchone() is not None

    def board_run(self) -> str | None:
        """The run a board shows: the latest one that declared its rows (None in a store written
        before runs declared them: its board reads every row)."""
        found = self._db.execute(
            "SELECT run_id FROM runs WHERE run_id IN (SELECT DISTINCT run_id FROM run_rows) "
            "ORDER BY started DESC LIMIT 1").fetchone()
        return found[0] if found else None

    def results(self, *, scored_only: bool = True, run_id: str | None = None) -> Iterator[ResultRow]:
        """Stored rows, oldest first: every row, or (``run_id``) the rows that run's matrix declared,
        including those it reused from earlier runs."""
        columns = ", ".join(f"results.{c}" for c in _RESULT_COLUMNS)
        where = ["results.scores IS NOT NULL"] if scored_only else []
        if run_id is not None:
            query = f"SELECT {columns} FROM results JOIN run_rows ON run_rows.fingerprint = results.fingerprint"
            where.append("run_rows.run_id = ?")
        else:
            query = f"SELECT {columns} FROM results"
        query += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY results.created"
        for r in self._db.execute(query, (run_id,) if run_id is not None else ()):
            yield ResultRow(
                fingerprint=r[0], run_id=r[1], suite=r[2], victim=r[3], task=r[4], metric=r[5], attack=r[6],
                threat=r[7], norm=r[8], eps=r[9], defense=r[10], sample_id=r[11], output=r[12],
                adversarial_key=r[13], scores=json.loads(r[14]) if r[14] else None, headline=r[15],
                record=RowRecord.model_validate_json(r[16]),
            )
