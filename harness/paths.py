"""Where the harness keeps what it builds: $CODEFEND_HOME (default ~/.cache/codefend)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class CheckpointNotFound(FileNotFoundError, ValueError):
    """A ``checkpoint`` parameter names a folder without the model's files. A ValueError too, so
    that a suite's validation reports it as a bad parameter, naming the key, before any compute."""


def codefend_home() -> Path:
    """The cache root for generated data and trained checkpoints; created on first use."""
    home = Path(os.environ.get("CODEFEND_HOME", Path.home() / ".cache" / "codefend")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextmanager
def publish_checkpoint(out_dir: Path) -> Iterator[Path]:
    """Yield a scratch folder to write a checkpoint into; on success it replaces ``out_dir``.

    The rename is atomic, so a training killed half-way never leaves a half-written checkpoint
    where a later load would find it.
    """
    # one scratch folder per process: two workers training the same model never share one
    scratch = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    yield scratch
    shutil.rmtree(out_dir, ignore_errors=True)
    scratch.rename(out_dir)
