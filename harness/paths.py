"""Where the harness keeps what it builds: $CODEFEND_HOME (default ~/.cache/codefend)."""

from __future__ import annotations

import os
from pathlib import Path


def codefend_home() -> Path:
    """The cache root for generated data and trained checkpoints; created on first use."""
    home = Path(os.environ.get("CODEFEND_HOME", Path.home() / ".cache" / "codefend")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
