"""docs/plugins.md's example plugin and its test run as written: the guide cannot drift from
the code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _python_blocks() -> dict[str, str]:
    """file name (from each block's first-line comment) -> code."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


def test_the_guides_defense_plugin_registers_and_passes_its_own_test(tmp_path: Path, run_cli) -> None:
    blocks = _python_blocks()
    assert {"blur_plugin.py", "test_blur_plugin.py"} <= set(blocks)
    for name in ("blur_plugin.py", "test_blur_plugin.py"):
        (tmp_path / name).write_text(blocks[name])
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_blur_plugin.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout
    listed = run_cli("plugins", "--json", "--plugin", tmp_path / "blur_plugin.py")
    assert listed.returncode == 0, listed.stderr
    plugin = next(p for p in json.loads(listed.stdout) if p["plugin"] == "blur_plugin")
    assert plugin["registered"] == {"defense": ["box-blur"]} and plugin["error"] is None


def test_the_guides_trained_defense_trains_binds_and_passes_its_own_test(tmp_path: Path, run_cli) -> None:
    blocks = _python_blocks()
    for name in ("fitted_blur_plugin.py", "test_fitted_blur_plugin.py"):
        (tmp_path / name).write_text(blocks[name])
    tested = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fitted_blur_plugin.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    listed = run_cli("plugins", "--json", "--plugin", tmp_path / "fitted_blur_plugin.py")
    plugin = next(p for p in json.loads(listed.stdout) if p["plugin"] == "fitted_blur_plugin")
    assert plugin["registered"] == {"defense": ["fitted-blur"]}
