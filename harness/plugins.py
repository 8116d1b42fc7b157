"""Loading plugins from the ``codefend`` entry-point group into typed registries.

Loading is fault tolerant: each entry point is imported and each hook implementation is called
on its own, and a failure becomes a :class:`PluginLoadWarning` naming the plugin while the
others load normally.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

import pluggy

from harness import hookspecs
from harness.registry import Entry, Registry, RegistryError

ENTRY_POINT_GROUP = "codefend"
BUILTIN_DISTRIBUTION = "codefend-bench"

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

    def recipe(self) -> tuple[tuple[tuple[str, str], ...], bool]:
        """How another process rebuilds this plugin set (:func:`load_plugins` arguments)."""
        return self.extra_modules, self.use_entry_points

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


def load_plugins(
    extra: Iterable[tuple[str, object]] = (), *, use_entry_points: bool = True
) -> Plugins:
    """Load every ``codefend`` entry point (plus ``extra`` (name, module) pairs) into registries."""
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
                factory: Callable[..., Any],
                *,
                description: str = "",
                _kind: str = kind,
                _info: PluginInfo = info,
            ) -> None:
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
    modules = tuple((name, getattr(module, "__name__", "")) for name, module in extra)
    return Plugins(registries=registries, plugins=infos, extra_modules=modules, use_entry_points=use_entry_points)


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded once from entry points."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded


def reset_plugins() -> None:
    """Forget the loaded plugin set (tests install plugins mid-process)."""
    global _loaded
    _loaded = None
