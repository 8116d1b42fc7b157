"""Typed registries of named plugin components, with parameter validation and "did you mean".

A registry maps a name (``"pgd"``) to a factory: a callable, or the import path of one
(``"attacks.pgd:PGD"``), imported the first time the component is used, so that listing plugins and
checking a suite's names import no model library. The factory's signature is the component's
parameter schema: :meth:`Registry.create` validates a suite's ``params`` against it with pydantic
before calling it, so a typo or a wrong type is reported with the allowed keys rather than as a
``TypeError`` deep inside a run.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Annotated, Any, Callable, Generic, TypeVar

import pydantic
from pydantic import BeforeValidator

from harness.contracts import UsesPlugins

T = TypeVar("T")


def parse_fraction(value: Any) -> Any:
    """Accept ``"8/255"`` (and other fractions written as text) wherever a float is expected."""
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"{value!r} is not a number or a fraction like 8/255") from exc
    return value


FloatOrFraction = Annotated[float, BeforeValidator(parse_fraction)]
"""Use in plugin signatures for parameters users write as fractions (``step_size: 1/255``)."""


def _accept_fractions(annotation: Any) -> Any:
    """``float`` -> :data:`FloatOrFraction`, also inside unions such as ``float | None``."""
    if annotation is float:
        return FloatOrFraction
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Union[tuple(_accept_fractions(arg) for arg in typing.get_args(annotation))]
    return annotation


class RegistryError(Exception):
    """A name or a parameter a user wrote does not match what is registered."""


class UnknownNameError(RegistryError):
    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(sorted(known)) or "none registered"
        super().__init__(f"unknown {kind} '{name}'{hint} (registered {kind}s: {listing})")


class ParamError(RegistryError):
    def __init__(self, kind: str, name: str, problems: list[tuple[str, str]], allowed: list[str]):
        self.kind, self.name, self.problems, self.allowed = kind, name, problems, allowed
        said = "; ".join(f"'{key}': {msg}" if key else msg for key, msg in problems)
        allowed_text = ", ".join(allowed) if allowed else "none"
        super().__init__(f"bad parameters for {kind} '{name}': {said} (allowed parameters: {allowed_text})")


class PluginImportError(RegistryError):
    """A component registered by import path whose module cannot be imported."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component and where it came from. ``target`` is the factory, or its import
    path ``"module:attribute"``; :attr:`factory` is the factory, imported on first use."""

    kind: str
    name: str
    target: Callable[..., T] | str
    description: str
    plugin: str
    distribution: str
    version: str

    @functools.cached_property
    def factory(self) -> Callable[..., T]:
        if not isinstance(self.target, str):
            return self.target
        module, _, attribute = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except Exception as exc:
            raise PluginImportError(
                f"{self.kind} '{self.name}' (plugin '{self.plugin}', {self.distribution} {self.version}) cannot be "
                f"loaded from {self.target}: {' '.join(f'{type(exc).__name__}: {exc}'.split())}. Install what it "
                "needs, or leave it out of the suite") from None

    def parameters(self) -> dict[str, inspect.Parameter]:
        params = inspect.signature(self.factory).parameters
        return {
            key: p
            for key, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }

    def param_model(self) -> type[pydantic.BaseModel]:
        """A pydantic model of the factory's keyword parameters (forbids unknown keys), built once
        per factory (building one costs ~1 ms: a suite of thousands of entries would feel it)."""
        return _param_model(self.kind, self.name, self.factory)

    def _build_param_model(self) -> type[pydantic.BaseModel]:
        target = self.factory.__init__ if inspect.isclass(self.factory) else self.factory
        try:
            hints = typing.get_type_hints(target, include_extras=True)
        except Exception:  # annotations that cannot be resolved are left unchecked
            hints = {}
        fields: dict[str, Any] = {}
        for key, p in self.parameters().items():
            annotation = _accept_fractions(hints.get(key, Any))
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[key] = (annotation, default)
        config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
        return pydantic.create_model(f"{self.kind}_{self.name}_params", __config__=config, **fields)

    def validate(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Return ``params`` checked and coerced against the factory's signature."""
        params = dict(params or {})
        try:
            validated = self.param_model().model_validate(params)
        except pydantic.ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(part) for part in err["loc"])
                if err["type"] == "extra_forbidden":
                    msg = "is not a parameter of this " + self.kind
                    close = difflib.get_close_matches(key, list(self.parameters()), n=1)
                    msg += f" — did you mean '{close[0]}'?" if close else ""
                elif err["type"] == "missing":
                    msg = "is required"
                else:
                    msg = f"{err['msg']} (got {err.get('input')!r})"
                problems.append((key, msg))
            raise ParamError(self.kind, self.name, problems, sorted(self.parameters())) from None
        return {key: getattr(validated, key) for key in params}

    def create(self, params: dict[str, Any] | None = None) -> T:
        return self.factory(**self.validate(params))

    def code_version(self) -> str:
        """``"<distribution>==<version>"`` for a normal install, else ``"src:<hash>"`` of its source
        (editable installs, in-process plugins); see :mod:`harness.code_version`."""
        from harness.code_version import code_version

        return code_version(self.factory, self.distribution, self.version)


@functools.lru_cache(maxsize=None)
def _param_model(kind: str, name: str, factory: Callable[..., Any]) -> type[pydantic.BaseModel]:
    return Entry(kind, name, factory, "", "", "", "")._build_param_model()


@dataclass
class Registry(Generic[T]):
    """Components of one kind (attack, defense, task, victim, reporter, executor)."""

    kind: str
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    owner: Any = field(default=None, repr=False, compare=False)
    """The plugin set this registry belongs to: what :meth:`create` hands to a component that
    declares :class:`harness.contracts.UsesPlugins`."""

    def add(self, entry: Entry[T]) -> None:
        if entry.name in self.entries:
            first = self.entries[entry.name]
            raise RegistryError(
                f"{self.kind} '{entry.name}' is registered by both plugin '{first.plugin}' and "
                f"plugin '{entry.plugin}'; the first one is kept — rename one of them"
            )
        self.entries[entry.name] = entry

    def get(self, name: str) -> Entry[T]:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self.entries)) from None

    def create(self, name: str, params: dict[str, Any] | None = None) -> T:
        """The component ``name`` with ``params`` validated, given its plugin set when it uses one."""
        component = self.get(name).create(params)
        if self.owner is not None and isinstance(component, UsesPlugins):
            component.bind_plugins(self.owner)
        return component

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries
