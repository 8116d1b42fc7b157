"""Layers run one way: the kernel (harness/) never imports the plugin packages above it, nor the
application (codefend/). It reaches plugins through the registries only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABOVE_THE_KERNEL = {"attacks", "defenses", "tasks", "leaderboard", "executors", "codefend"}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_kernel_module_imports_a_plugin_package_or_the_cli() -> None:
    modules = sorted((ROOT / "harness").rglob("*.py"))
    assert len(modules) > 15  # the walk really sees the kernel
    upward = [f"{path.relative_to(ROOT)}:{line} imports {name}"
              for path in modules for line, name in _imports(path) if name.split(".")[0] in ABOVE_THE_KERNEL]
    assert not upward, "the kernel imports upwards:\n" + "\n".join(upward)


def test_the_walk_would_see_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from leaderboard.aggregate import build_board\n    import tasks.vqav2\n")
    assert [name for _, name in _imports(sample)] == ["leaderboard.aggregate", "tasks.vqav2"]
