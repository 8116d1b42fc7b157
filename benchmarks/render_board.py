"""Rendering a board from an existing store (a benchmark, not a test): goal ≤ 10 s per format.

    python benchmarks/render_board.py results/codefend [results/quickstart ...]

Times building the board (aggregation, bootstrap intervals, paired comparisons, sanity flags,
example images) and each built-in reporter, in this process (no interpreter start-up), and the
whole `codefend leaderboard --format F` command end to end.

Measured 2026-11-26 on this project's 2-core CPU machine, nothing else running:

    codefend store (suites/codefend.yaml): 18600 scored rows, 2 tables; build_board 2.08 s
      md 4.52 s, csv 4.50 s, json 4.93 s, html 6.35 s end to end (html render itself 1.65 s, 531 kB)
    quickstart store: 2400 scored rows; build_board 0.18 s
      md 3.28 s, csv 3.32 s, json 3.36 s, html 4.42 s end to end
    (about 3 s of each command is interpreter and plugin start-up)
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
            subprocess.run([sys.executable, "-m", "codefend.cli", "leaderboard", folder, "--format", fmt, "--out", "/dev/null"],
                           check=True, capture_output=True)
            command = time.perf_counter() - started
            print(f"  {fmt:5s} render {render:5.2f} s ({len(text) / 1e3:.0f} kB); `codefend leaderboard --format {fmt}` {command:5.2f} s")
        store.close()


if __name__ == "__main__":
    main()
