"""Running a suite in this process with a test module's plugins registered beside the built-ins."""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from typing import Iterator

from harness import plugins as plugin_state
from harness import runner
from harness.plugins import load_plugins
from harness.runner import RunSummary, run_suite
from harness.store import Store
from harness.suite import load_suite


@contextlib.contextmanager
def suite_run(module: types.ModuleType, name: str, suite_text: str, folder: Path) -> Iterator[tuple[RunSummary, Store]]:
    """Run ``suite_text`` (written to ``folder``) with ``module``'s hooks registered as plugin
    ``name``, and yield the run's summary and its open store. The plugin set is process-wide for
    the run (``run_chunk`` looks plugins up there) and restored after, with the runner's cache."""
    plugins = load_plugins(extra=[(name, module)])
    previous = plugin_state._loaded
    plugin_state._loaded = plugins
    (folder / "suite.yaml").write_text(suite_text)
    store = Store(folder / "store.sqlite")
    try:
        yield run_suite(load_suite(folder / "suite.yaml", plugins), store, plugins=plugins, progress=False), store
    finally:
        store.close()
        plugin_state._loaded = previous
        runner._components.clear()
