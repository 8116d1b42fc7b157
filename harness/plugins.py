"""Loading plugins from the ``codefend`` entry-point group into typed registries.

Plugins come from three places, loaded the same way:

- the ``codefend`` entry points of installed distributions (the built-ins first);
- *plugin specs*: a module name (``my_defense.plugin``) or the path of a ``.py`` file, given with
  ``codefend run|validate|plugins --plugin SPEC`` (repeatable) or in ``CODEFEND_PLUGINS``
  (specs separated by ``os.pathsep``, ``:`` on Linux), for a plugin not packaged (yet);
- ``extra`` (name, module) pairs handed to :func:`load_plugins` in-process (tests).

Loading is fault tolerant: each plugin is imported and each hook implementation is called on
its own, and a failure becomes a :class:`PluginLoadWarning` naming the plugin while the others
load normally. A plugin that registers nothing (no ``@hookimpl`` ``register_*`` function) is a
warning too: it is almost always a missing decorator.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pluggy

from harness import hookspecs
from harness.registry import Entry, Registry, RegistryError

ENTRY_POINT_GROUP = "codefend"
BUILTIN_DISTRIBUTION = "codefend-bench"
PLUGINS_ENV = "CODEFEND_PLUGINS"
SPEC_SOURCE = "(--plugin)"

#: hook name -> registry kind, in the order ``codefend plugins`` lists them.
HOOK_KINDS: dict[str, str] = {
    "register_victims": "victim",
    "register_tasks": "task",
    "register_attacks": "attack",
    "register_defenses": "defense",
    "register_reporters": "reporter",
    "register_executors": "executor",
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported or failed while registering; the others still load."""


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Plugins:
    """Everything loaded: one registry per kind, and what each plugin contributed."""

    registries: dict[str, Registry[Any]]
    plugins: dict[str, PluginInfo]
    extra_modules: tuple[tuple[str, str], ...] = ()
    """(name, module) of the in-process plugins, so a worker process can load the same set."""
    use_entry_points: bool = True
    specs: tuple[str, ...] = ()
    """The plugin specs (modules or ``.py`` files) loaded beside the entry points."""

    def recipe(self) -> tuple[tuple[tuple[str, str], ...], bool, tuple[str, ...]]:
        """How another process rebuilds this plugin set (:func:`load_plugins` arguments)."""
        return self.extra_modules, self.use_entry_points, self.specs

    def registry(self, kind: str) -> Registry[Any]:
        return self.registries[kind]

    @property
    def victims(self) -> Registry[Any]:
        return self.registries["victim"]

    @property
    def tasks(self) -> Registry[Any]:
        return self.registries["task"]

    @property
    def attacks(self) -> Registry[Any]:
        return self.registries["attack"]

    @property
    def defenses(self) -> Registry[Any]:
        return self.registries["defense"]

    @property
    def reporters(self) -> Registry[Any]:
        return self.registries["reporter"]

    @property
    def executors(self) -> Registry[Any]:
        return self.registries["executor"]


def _describe_error(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _missing_module(names: Iterable[str]) -> str | None:
    """The first of ``names`` that cannot be found, without importing any of them (a dotted name
    imports its parent packages only)."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def register_from(register: Callable[..., None], module: str, components: Sequence[tuple[str, str, str]],
                  *, requires: Sequence[str] = ()) -> None:
    """Register ``components``, ``(name, attribute of module, description)`` triples, by import
    path: ``module`` is imported when one of them is first used, so listing plugins and checking a
    suite's names import no model library. When ``module``, or a top-level package it
    ``requires`` (an optional dependency), is not installed, a :class:`PluginLoadWarning` names it
    and the components lost, and the plugin's other modules still register. For plugins whose
    components live in several modules (the built-ins)."""
    missing = _missing_module((*requires, module))
    if missing is not None:
        warnings.warn(f"{module} cannot be imported (no module named '{missing}'), so "
                      f"{', '.join(name for name, _, _ in components)} "
                      f"{'is' if len(components) == 1 else 'are'} not registered",
                      PluginLoadWarning, stacklevel=2)
        return
    for name, attribute, description in components:
        register(name, f"{module}:{attribute}", description=description)


def plugin_specs_from_env() -> tuple[str, ...]:
    """The plugin specs in ``CODEFEND_PLUGINS`` (``os.pathsep``-separated; empty parts skipped)."""
    return tuple(part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if part.strip())


def import_plugin_spec(spec: str) -> types.ModuleType:
    """Import a plugin spec: the path of a ``.py`` file, or a module name importable from
    ``sys.path`` (the current directory included). Raises ``ImportError`` saying which it tried."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or os.sep in spec:
        if not path.is_file():
            raise ImportError(f"no such plugin file: {spec!r} (give the path of a .py file, or a module name such as my_defense.plugin)")
        # the same name in every process (str hashes are salted per process): what a worker
        # unpickles from this module must find it under the name the driver used
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        name = f"codefend_plugin_{path.stem}_{digest}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"{spec!r} is not a Python file that can be imported")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--plugin my_module` names a module next to the suite, as `python -m` would
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name and spec.startswith(exc.name):
            raise ImportError(f"no module named {spec!r} on sys.path (working directory {os.getcwd()}): give a "
                              "module name importable from here, or the path of its .py file") from None
        raise


def load_plugins(
    extra: Iterable[tuple[str, object]] = (), *, use_entry_points: bool = True, specs: Sequence[str] = ()
) -> Plugins:
    """Load every ``codefend`` entry point, then each plugin spec (a module name or ``.py``
    path, as ``--plugin`` takes), then the ``extra`` (name, module) pairs, into registries."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}

    extra = list(extra)
    sources: list[tuple[str, Callable[[], object], str, str, str]] = []
    if use_entry_points:
        # Built-ins first, so that they keep their plain names if a third party reuses one.
        eps = entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: (getattr(e.dist, "name", "") != BUILTIN_DISTRIBUTION, e.name)):
            dist = ep.dist
            sources.append(
                (ep.name, ep.load, dist.name if dist else "?", dist.version if dist else "?", ep.value)
            )
    specs = tuple(dict.fromkeys(specs))  # a spec given twice (flag and environment) loads once
    for spec in specs:
        sources.append((Path(spec).stem if spec.endswith(".py") else spec, (lambda s=spec: import_plugin_spec(s)),
                        SPEC_SOURCE, "-", spec))
    for name, module in extra:
        sources.append((name, (lambda m=module: m), "(in-process)", "-", getattr(module, "__name__", name)))

    for name, load, dist_name, version, module_path in sources:
        # Entry-point names are unique only within a distribution.
        if name in infos:
            name = f"{dist_name}:{name}"
        if name in infos:
            warnings.warn(f"plugin '{name}' ({module_path}) is declared twice; the second is skipped", PluginLoadWarning, stacklevel=2)
            continue
        info = PluginInfo(name=name, distribution=dist_name, version=version, module=module_path)
        infos[name] = info
        try:
            manager.register(load(), name=name)
        except Exception as exc:  # a broken third-party plugin must not stop the others
            info.error = _describe_error(exc)
            warnings.warn(
                f"plugin '{name}' ({module_path}, from {dist_name}) failed to load and is skipped: "
                f"{info.error}",
                PluginLoadWarning,
                stacklevel=2,
            )

    registries: dict[str, Registry[Any]] = {kind: Registry(kind) for kind in HOOK_KINDS.values()}
    for hook_name, kind in HOOK_KINDS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            info = infos[impl.plugin_name]

            def register(
                name: str,
                factory: Callable[..., Any] | str,
                *,
                description: str = "",
                _kind: str = kind,
                _info: PluginInfo = info,
            ) -> None:
                if isinstance(factory, str) and ":" not in factory:
                    warnings.warn(f"plugin '{_info.name}' registered {_kind} '{name}' with {factory!r}: a factory is a "
                                  "callable or its import path 'module:attribute'; it is skipped",
                                  PluginLoadWarning, stacklevel=2)
                    return
                entry = Entry(_kind, name, factory, description, _info.name, _info.distribution, _info.version)
                try:
                    registries[_kind].add(entry)
                except RegistryError as exc:
                    warnings.warn(str(exc), PluginLoadWarning, stacklevel=2)
                    return
                _info.registered.setdefault(_kind, []).append(name)

            try:
                impl.function(register=register)
            except Exception as exc:
                info.error = _describe_error(exc)
                warnings.warn(
                    f"plugin '{info.name}' failed in {hook_name} and registered only part of its "
                    f"components: {info.error}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
    for info in infos.values():
        if info.error is None and not info.registered:
            info.error = "registered nothing"
            warnings.warn(
                f"plugin '{info.name}' ({info.module}) registered nothing: it has no register_* function "
                "marked @hookimpl (from harness.hookspecs import hookimpl), or they call register() for nothing",
                PluginLoadWarning,
                stacklevel=2,
            )
    modules = tuple((name, getattr(module, "__name__", "")) for name, module in extra)
    loaded = Plugins(registries=registries, plugins=infos, extra_modules=modules, use_entry_points=use_entry_points,
                     specs=specs)
    for registry in registries.values():
        registry.owner = loaded
    return loaded


class PluginsUser:
    """For components that create other components (:class:`harness.contracts.UsesPlugins`):
    keeps the plugin set the registry hands over. A component constructed directly, outside any
    registry (in a plugin author's unit test, say), gets the process-wide set
    (:func:`get_plugins`) the first time it needs one."""

    _plugins: "Plugins | None" = None

    def bind_plugins(self, plugins: "Plugins") -> None:
        self._plugins = plugins

    @property
    def plugins(self) -> "Plugins":
        if self._plugins is None:
            self.bind_plugins(get_plugins())
        assert self._plugins is not None
        return self._plugins


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded once from the entry points and ``CODEFEND_PLUGINS``
    (the CLI's ``--plugin`` specs join it through :func:`use_plugins`)."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins(specs=plugin_specs_from_env())
    return _loaded


def use_plugins(plugins: Plugins) -> Plugins:
    """Make ``plugins`` the process-wide set (what components that call :func:`get_plugins` see)."""
    global _loaded
    _loaded = plugins
    return plugins


def reset_plugins() -> None:
    """Forget the loaded plugin set (tests install plugins mid-process)."""
    global _loaded
    _loaded = None
