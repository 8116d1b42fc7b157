"""Executors run chunk functions; ``local`` runs them in this process, in order.

An executor only has to call ``run_chunk`` on each chunk and yield the outcomes; the runner alone
writes the store. ``map`` must consume ``chunks`` lazily: a chunk is planned after the previous
one is committed, which is how later defenses reuse adversarial examples.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

from harness.hookspecs import hookimpl

In = TypeVar("In")
Out = TypeVar("Out")


class LocalExecutor:
    def map(self, fn: Callable[[In], Out], items: Iterable[In]) -> Iterator[Out]:
        for item in items:
            yield fn(item)


@hookimpl
def register_executors(register):
    register("local", LocalExecutor, description="run cells in this process, one chunk at a time")
