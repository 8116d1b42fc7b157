"""Trained artefacts that are reproducible from their seed.

A cached checkpoint stands for its key (config and seed): whoever trains that key again must get
the same weights, or two researchers with the same suite get different boards. On CPU, PyTorch
with more than one thread is not reproducible run to run by default: the offline world's victim,
trained twice for 40 steps with 2 threads, came out with different weights each time (with 1
thread, the same). :func:`deterministic` turns on PyTorch's deterministic algorithms for the
duration of a training (measured cost on 2 CPU cores: none, 58.5 s vs 57.3 s for 300 victim
steps) and runs it on one CPU thread, so the same seed and machine give bit-identical weights
whoever trains: a run with two workers (one thread each) and a benchmark in one process (two
threads) once trained the same purifier key to weights 5e-4 apart, which flipped a question of
the board's 10-draw number (docs/results/codefend-cpu.md).

Machines may still round differently (the blocking of a matrix product follows the CPU's
instruction set): a checkpoint's training record says what it was trained with.

This module is part of the kernel: it imports no plugin package.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """PyTorch's deterministic algorithms, on one CPU thread, inside the block (the previous
    settings after it).

    ``warn_only``: an op with no deterministic implementation (some CUDA backward kernels) warns
    instead of failing the training.
    """
    # cuBLAS reads this when its first handle is made: set it before any CUDA work
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_on, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    # a CPU matrix product's blocking, hence its rounding, follows the thread count
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def deterministic_training(fn: F) -> F:
    """Decorator: run ``fn`` (a training or a training-data generator) under :func:`deterministic`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deterministic():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def training_environment() -> dict[str, Any]:
    """What, beyond its seed, a training's floating point depends on (for its record)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled()}
