"""``local``: the work graph on this machine, in the driver's process or a small process pool.

With ``workers: 1`` (the default) each node runs in the driver, in submission order (the
critical path first), with the driver's torch threads. With ``workers: N`` nodes run in N
spawned processes of ``threads`` torch threads each (default: this machine's cores shared out),
e.g. the victim's training beside the diffusion backbone's on a 2-core machine. A worker keeps
its models loaded between nodes. The rows are the same either way: every node's inputs and
seeds come from the graph, not from where or when it runs (thread counts can move floating
point sums, so compare runs at equal threads).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections import deque
from typing import Annotated, Any, Callable

from pydantic import Field


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    def __init__(self, *, workers: Annotated[int, Field(ge=1)] = 1, threads: Annotated[int, Field(ge=1)] | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"local executor: workers must be an integer >= 1, got {workers!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"local executor: threads must be an integer >= 1, got {threads!r}")
        self.workers = workers
        self.threads = threads if threads is not None or workers == 1 else max(1, (os.cpu_count() or 1) // workers)
        self.dashboard_url: str | None = None
        self._queue: deque[tuple[int, Callable[[Any], Any], Any]] = deque()
        self._futures: dict[concurrent.futures.Future, int] = {}
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._next = 0

    def threads_for(self, resources: Any) -> int | None:
        """Every node gets this executor's threads (None: the driver's, untouched)."""
        return self.threads

    def start(self) -> None:
        if self.workers > 1 and self._pool is None:
            # spawn, not fork: torch and its thread pools do not survive a fork
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.threads or 1,),
            )

    def submit(self, fn: Callable[[Any], Any], call: Any, resources: Any) -> int:
        self._next += 1
        if self._pool is None:
            self._queue.append((self._next, fn, call))
        else:
            self._futures[self._pool.submit(fn, call)] = self._next
        return self._next

    def wait(self) -> list[tuple[int, Any]]:
        if self._pool is None:
            handle, fn, call = self._queue.popleft()
            return [(handle, fn(call))]
        done, _ = concurrent.futures.wait(self._futures, return_when=concurrent.futures.FIRST_COMPLETED)
        # a worker that died (BrokenProcessPool) raises here: the run stops, and a rerun resumes
        return [(self._futures.pop(future), future.result()) for future in done]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._queue.clear()
