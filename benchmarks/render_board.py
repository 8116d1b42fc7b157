"""Rendering a board from an existing store (a benchmark, not a test): goal ≤ 10 s per format.

    python benchmarks/render_board.py results/codefend [results/quickstart ...]

Times building the board (aggregation, bootstrap intervals, paired comparisons, sanity flags,
example images) and each built-in reporter, in this process (no interpreter start-up), and the
whole `codefend leaderboard --format F` command end to end.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from harness.plugins import get_plugins
from harness.store import Store
from leaderboard.aggregate import build_board


def main() -> None:
    plugins = get_plugins()
    for folder in sys.argv[1:] or ["results/quickstart"]:
        path = Path(folder) / "store.sqlite" if Path(folder).is_dir() else Path(folder)
        store = Store(path)
        started = time.perf_counter()
        board = build_board(store)
        build = time.perf_counter() - started
        rows = sum(len(s) for t in board.tables for r in t.rows for s in r.samples.values())
        print(f"{folder}: {rows} scored rows, {len(board.tables)} tables; build_board {build:.2f} s")
        for fmt in ("md", "csv", "json", "html"):
            started = time.perf_counter()
            text = plugins.reporters.create(fmt)(board)
            render = time.perf_counter() - started
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harness.cli", "leaderboard", folder, "--format", fmt, "--out", "/dev/null"],
                           check=True, capture_output=True)
            command = time.perf_counter() - started
            print(f"  {fmt:5s} render {render:5.2f} s ({len(text) / 1e3:.0f} kB); `codefend leaderboard --format {fmt}` {command:5.2f} s")
        store.close()


if __name__ == "__main__":
    main()
