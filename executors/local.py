"""``local``: the work graph on this machine, in the driver's process or a small process pool.

With ``workers: 1`` (the default) each node runs in the driver, in submission order (the
critical path first), with the driver's torch threads. With ``workers: N`` nodes run in N
spawned processes, e.g. the victim's training beside the diffusion backbone's on a 2-core
machine. Each node gets the torch threads its resources ask for (``resources.threads``, at most
``cpus``, default this machine's cores), and nodes start in submission order while their threads
fit in ``cpus``: a 2-thread training on a 2-core machine runs alone, two 1-thread nodes side by
side. A worker keeps its models loaded between nodes. The rows are the same either way: every node's inputs and
seeds come from the graph, not from where or when it runs (thread counts can move floating
point sums, so compare runs at equal threads).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
from collections import deque
from typing import Annotated, Any, Callable

from pydantic import Field


def _init_worker(threads: int) -> None:
    from harness.lifetime import die_with_parent

    die_with_parent()  # a killed run leaves no worker behind
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    def __init__(self, *, workers: Annotated[int, Field(ge=1)] = 1, threads: Annotated[int, Field(ge=1)] | None = None,
                 cpus: Annotated[int, Field(ge=1)] | None = None):
        for name, value in (("workers", workers), ("threads", threads), ("cpus", cpus)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"local executor: {name} must be an integer >= 1, got {value!r}")
        if workers > 1 and threads is not None:
            raise ValueError("local executor: 'threads' sets the driver's threads (workers: 1); with a pool, "
                             "each node's resources.threads sets its own, within 'cpus'")
        self.workers = workers
        self.threads = threads
        self.cpus = cpus or os.cpu_count() or 1
        self.dashboard_url: str | None = None
        self._queue: deque[tuple[int, Callable[[Any], Any], Any]] = deque()
        self._waiting: deque[tuple[int, Callable[[Any], Any], Any, int]] = deque()
        self._futures: dict[concurrent.futures.Future, tuple[int, int]] = {}
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._busy = 0
        self._next = 0
        # a finished node frees its threads from the pool's own thread, so that the next node
        # starts even while the driver is busy (scoring a cell)
        self._lock = threading.RLock()
        self._finished: deque[tuple[int, Any]] = deque()
        self._any_finished = threading.Condition(self._lock)

    def threads_for(self, resources: Any) -> int | None:
        """In the driver: ``threads`` (None leaves the driver's setting alone); in the pool: the
        node's own, capped at ``cpus``."""
        if self.workers == 1:
            return self.threads
        return min(int(resources.threads), self.cpus)

    def start(self) -> None:
        if self.workers > 1 and self._pool is None:
            # spawn, not fork: torch and its thread pools do not survive a fork
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(1,),
            )
            # spawn every worker now: spawned on demand, a second worker arrives seconds after
            # the nodes it should run have queued behind the first
            for future in [self._pool.submit(os.getpid) for _ in range(self.workers)]:
                future.result()

    def submit(self, fn: Callable[[Any], Any], call: Any, resources: Any) -> int:
        self._next += 1
        if self._pool is None:
            self._queue.append((self._next, fn, call))
        else:
            with self._lock:
                self._waiting.append((self._next, fn, call, min(int(resources.threads), self.cpus)))
                self._start_what_fits()
        return self._next

    def _start_what_fits(self) -> None:
        """Start waiting nodes in submission order while their threads fit in ``cpus``."""
        with self._lock:
            while (self._pool is not None and self._waiting and len(self._futures) < self.workers
                   and self._busy + self._waiting[0][3] <= self.cpus):
                handle, fn, call, threads = self._waiting.popleft()
                self._busy += threads
                future = self._pool.submit(fn, call)
                self._futures[future] = (handle, threads)
                future.add_done_callback(self._on_done)

    def _on_done(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            handle, threads = self._futures.pop(future)
            self._busy -= threads
            self._finished.append((handle, future))
            self._any_finished.notify_all()
        self._start_what_fits()

    def wait(self) -> list[tuple[int, Any]]:
        if self._pool is None:
            handle, fn, call = self._queue.popleft()
            return [(handle, fn(call))]
        with self._lock:
            while not self._finished:
                self._any_finished.wait()
            finished = list(self._finished)
            self._finished.clear()
        # a worker that died (BrokenProcessPool) raises here: the run stops, and a rerun resumes
        return [(handle, future.result()) for handle, future in finished]

    def close(self) -> None:
        if self._pool is not None:
            # not wait=True: after Ctrl-C a worker may be minutes into a training; its result would
            # be thrown away anyway (only committed nodes count), so the workers stop now
            self._pool.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()
            self._pool = None
        self._queue.clear()
        with self._lock:
            self._waiting.clear()
            self._finished.clear()
            self._busy = 0
