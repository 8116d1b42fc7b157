"""``codefend validate`` wall time: on a malformed suite and on one that names an unknown plugin
(goal <= 1 s each), ``codefend plugins`` (goal <= 1 s), and on valid suites of 1k, 10k and 100k
defense entries (goal: linear in the suite's size).

    python benchmarks/validate_speed.py [--sizes 1000,10000,100000]

Each size is a suite of that many JPEG defenses (distinct ids and qualities) under one victim,
one task and the clean condition, so its matrix grows linearly too; the standard adaptive
protocol is off (it would multiply the cells). Runs the real console script, a fresh process
per suite, and prints seconds per 1k entries: flat means linear.

On the 2-core CPU (2026-12-02, since components register by import path): malformed suite
0.59 s, unknown plugin name 0.55 s, `codefend plugins` 0.61 s (none of them imports torch); 1k
entries 4.2 s, 10k 8.2 s, 100k (5.2 MB) 58.2 s: ~0.5 ms an entry above ~3.7 s of importing what a
valid suite's plugins need. Before: 1k 6.3-7.8 s, 100k 73.6 s, a name error 5.6 s; earlier still,
2k entries 21 s in-process, 32k 76 s, a 5 MB suite past 300 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODEFEND = Path(sys.executable).with_name("codefend")

HEAD = """\
name: validate-speed
seed: 0
victims: [{name: shapes-vlm, params: {steps: 100}}]
tasks: [{name: vqav2, data: shapes, split: test, n: 4}]
attacks: [{name: none}]
adaptive: {enabled: false, reason: a validation benchmark}
defenses:
"""


def _time(*argv: str) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run([str(CODEFEND), *argv], capture_output=True, text=True)
    return time.perf_counter() - started, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        bad = Path(folder) / "bad.yaml"
        bad.write_text("name: x\nvictims: [{name: shapes-vlm}\ntasks: []\n")
        seconds, code = _time("validate", str(bad))
        print(f"malformed suite: {seconds:.2f} s (exit {code}; goal <= 1 s)")
        typo = Path(folder) / "typo.yaml"
        typo.write_text(HEAD.replace("defenses:\n", "defenses: [{name: jepg}]\n"))
        seconds, code = _time("validate", str(typo))
        print(f"unknown plugin name: {seconds:.2f} s (exit {code}; goal <= 1 s)")
        seconds, code = _time("plugins")
        print(f"codefend plugins: {seconds:.2f} s (exit {code}; goal <= 1 s)")
        for size in sizes:
            suite = Path(folder) / f"suite-{size}.yaml"
            lines = [f"  - {{name: jpeg, id: d{i}, params: {{quality: {1 + i % 95}}}}}" for i in range(size)]
            suite.write_text(HEAD + "\n".join(lines) + "\n")
            seconds, code = _time("validate", str(suite))
            print(f"{size:>7} entries ({suite.stat().st_size / 1e6:.1f} MB): {seconds:7.2f} s, "
                  f"{1000 * seconds / size:.3f} s per 1k entries (exit {code})")


if __name__ == "__main__":
    main()
