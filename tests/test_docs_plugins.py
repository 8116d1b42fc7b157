"""docs/plugins.md's example plugins and their tests run as written: the guide cannot drift
from the code."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from harness.plugins import load_plugins

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _python_blocks() -> dict[str, str]:
    """file name (from each block's first-line comment) -> code."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


@pytest.mark.parametrize("plugin,test,component", [
    ("blur_plugin.py", "test_blur_plugin.py", "box-blur"),
    ("fitted_blur_plugin.py", "test_fitted_blur_plugin.py", "fitted-blur"),
])
def test_the_guides_plugin_registers_and_passes_its_own_test(plugin: str, test: str, component: str, tmp_path: Path,
                                                             monkeypatch, fresh_plugins) -> None:
    blocks = _python_blocks()
    for name in (plugin, test):
        (tmp_path / name).write_text(blocks[name])
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (plugin, test):
        monkeypatch.delitem(sys.modules, name.removesuffix(".py"), raising=False)
    module = importlib.import_module(test.removesuffix(".py"))
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 1
    home = tmp_path / "home"
    home.mkdir()
    if "tmp_path" in tests[0].__code__.co_varnames[: tests[0].__code__.co_argcount]:
        tests[0](home, monkeypatch)  # the guide's test, with pytest's fixtures
    else:
        tests[0]()
    loaded = load_plugins(specs=[str(tmp_path / plugin)])
    assert loaded.plugins[plugin.removesuffix(".py")].registered == {"defense": [component]}
    assert loaded.plugins[plugin.removesuffix(".py")].error is None
