"""Benchmark suites: YAML files validated into typed objects, and their expansion into cells.

A suite names victims, tasks, named threat models, attacks and defenses; the runner crosses
them. Every problem is reported as a :class:`SuiteError` naming the file, the key path, what was
wrong and what is allowed — users never see a traceback for a mistake in their YAML.
"""

from __future__ import annotations

import collections
import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.contracts import CLEAN_THREAT, Attack, Defense, ThreatModel, check_defense_declarations
from harness.plugins import Plugins
from harness.protocol import STANDARD_LABEL, AdaptiveProtocol, SanityProbes
from harness.registry import ParamError, PluginImportError, UnknownNameError, parse_fraction


class SuiteError(Exception):
    """A suite that cannot run, explained in one paragraph."""

    def __init__(self, file: Path | str, key: str, message: str):
        self.file, self.key, self.message = str(file), key, message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourceSpec(_Strict):
    """What one node of the work graph needs (:mod:`harness.graph`): CPU threads, GPUs (a
    fraction shares one), memory. Executors that schedule (``ray``) reserve it; ``local`` sets
    the threads."""

    threads: int = Field(default=1, gt=0)
    gpus: float = Field(default=0.0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)

    def union(self, other: "ResourceSpec") -> "ResourceSpec":
        """Enough for both (a rows node holds the victim and the defense)."""
        memory = [m for m in (self.memory_gb, other.memory_gb) if m is not None]
        return ResourceSpec(threads=max(self.threads, other.threads), gpus=max(self.gpus, other.gpus),
                            memory_gb=max(memory) if memory else None)


class ExecutorSpec(_Strict):
    """``executor: local`` or ``executor: {name: ray, params: {address: ...}}``."""

    name: str = "local"
    params: dict[str, Any] = Field(default_factory=dict)


def _executor(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class VictimSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    """What each of its work-graph nodes needs (load, attacks, rows)."""
    train_resources: ResourceSpec | None = None
    """What its training needs, if not ``resources`` (GPUs, memory: a training runs on one CPU
    thread whatever ``threads`` says, :func:`harness.reproducible.deterministic`)."""


class TaskSpec(_Strict):
    name: str
    data: str | None = None
    split: str = "test"
    n: int | None = Field(default=None, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("data")
    @classmethod
    def _data_given(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("data is empty: give the task's data folder, or 'shapes' for the built-in offline world "
                             "(or leave the key out for the task's default)")
        return value

    def factory_params(self) -> dict[str, Any]:
        return {**self.params, **({"data": self.data} if self.data is not None else {})}

    def data_is_present(self) -> bool:
        """Whether this task's data can be checked here: the built-in world, or a folder that
        exists (a suite for another machine's data validates here with a note instead)."""
        return self.data == "shapes" or (bool(self.data) and Path(str(self.data)).expanduser().is_dir())

    @property
    def label(self) -> str:
        data = f"[{self.data}]" if self.data and self.data != "shapes" else ""
        return f"{self.name}{data}:{self.split}"


def _fraction_list(value: Any) -> Any:
    if isinstance(value, list):
        return [parse_fraction(v) for v in value]
    return parse_fraction(value)


class ThreatSpec(_Strict):
    norm: Literal["linf", "l2"]
    eps: float | list[float]

    _parse = field_validator("eps", mode="before")(_fraction_list)

    @field_validator("eps")
    @classmethod
    def _eps_range(cls, value: float | list[float], info: pydantic.ValidationInfo) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not values:
            raise ValueError("an eps sweep needs at least one value")
        for eps in values:
            if not math.isfinite(eps):
                raise ValueError(f"eps must be a finite number, got {eps}")
            if eps < 0:
                raise ValueError(f"eps must be >= 0, got {eps}")
            if info.data.get("norm") == "linf" and eps > 1:
                # pixels are [0,1]: an L∞ radius above 1 is no constraint at all
                raise ValueError(f"eps {eps:g} is above 1, and pixels are in [0,1]: write the L∞ radius as a fraction "
                                 f"of the pixel range, e.g. {eps:g}/255")
        return value


def _nonempty_id(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("id is empty: leave it out (the label is then the plugin's name) or give a name")
    return value


AttackRole = Literal["suite", "standard", "n-draw", "clean-n-draw", "convergence", "probe"]
"""suite: declared in the suite; the standard adaptive protocol's cells: standard (the attack),
n-draw (its examples judged over N purification draws), clean-n-draw, convergence (its re-run
at a larger budget); probe: the sanity checklist's probes."""


class AttackSpec(_Strict):
    name: str
    id: str | None = None
    _id_given = field_validator("id")(_nonempty_id)
    params: dict[str, Any] = Field(default_factory=dict)
    threats: list[str] = Field(default_factory=list)
    adaptive: bool = False
    eot: int | None = Field(default=None, gt=0)
    defenses: list[str] | None = None
    """Cross this attack with these defenses only (their labels: ``id`` or name); default all.
    For attacks too costly to run through every defense (adaptive ones through long purifiers)."""
    tasks: list[str] | None = None
    """Cross this attack with these tasks only (names, or labels like ``vqav2:test``); default all."""
    victims: list[str] | None = None
    """Cross this attack with these victims only (names); default all. A transfer attack whose
    surrogate is one victim runs on the others only, to be transfer."""
    samples: int | None = Field(default=None, gt=0)
    """Run on the first ``samples`` of each task's seeded subset only (costly attacks)."""
    draws: int = Field(default=1, gt=0)
    """Purification draws per sample at evaluation (stochastic defenses; deterministic ones get
    one). The row's score is the per-sample worst over the draws (DiffHammer's resubmission)."""
    surrogate_steps: int | None = Field(default=None, gt=0)
    """Adaptive only: attack through a defense's surrogate process with at most this many network
    evaluations, where it offers one (see :mod:`harness.protocol`)."""
    grafting: bool = False
    """Adaptive only: graft the EOT draws' gradients onto one backward pass through the defense
    (DiffHammer; see :mod:`harness.protocol`)."""
    judging_draws: int = Field(default=1, gt=0)
    """Adaptive only: an attack that judges samples by the task score (APGD's restarts, the
    ensemble's worst case) averages it over this many draws of a stochastic defense
    (:attr:`~harness.contracts.AttackBatch.judging_draws`); the standard protocol sets its N
    ``draws``. It decides which example a sample keeps, not its random starts, so it does not
    reseed the attack."""
    role: AttackRole = "suite"
    """Set by the harness for the attacks it adds (:mod:`harness.protocol`); suites leave it."""

    def crosses(self, task: "TaskSpec") -> bool:
        return self.tasks is None or task.name in self.tasks or task.label in self.tasks

    def attacks_victim(self, victim: "VictimSpec") -> bool:
        return self.victims is None or victim.name in self.victims

    @field_validator("threats", "defenses", "tasks", "victims", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def label(self) -> str:
        return self.id or (f"{self.name}-adaptive" if self.adaptive else self.name)


class DefenseSpec(_Strict):
    name: str
    id: str | None = None
    _id_given = field_validator("id")(_nonempty_id)
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    train_resources: ResourceSpec | None = None
    """What its trainings (against the victim, or of a backbone) need, if not ``resources``
    (GPUs, memory: a training runs on one CPU thread whatever ``threads`` says,
    :func:`harness.reproducible.deterministic`)."""

    @property
    def label(self) -> str:
        return self.id or self.name


RESERVED_THREAT_NAMES = ("clean", "probe-eps0", "probe-large")


PROBE_EPS0 = "probe-eps0"
PROBE_LARGE = "probe-large"


def _probes(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


class Suite(_Strict):
    name: str
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=32, gt=0)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    """Where the work graph runs (:mod:`harness.executors`); ``codefend run --executor`` overrides it."""
    victims: list[VictimSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    threat_models: dict[str, ThreatSpec] = Field(default_factory=dict)
    attacks: list[AttackSpec] = Field(min_length=1)
    defenses: list[DefenseSpec] = Field(min_length=1)
    adaptive: AdaptiveProtocol = Field(default_factory=AdaptiveProtocol)
    """The standard adaptive protocol every defense faces (:mod:`harness.protocol`)."""
    sanity_probes: SanityProbes = Field(default_factory=SanityProbes)
    """``true`` adds Carlini's ε = 0 and large-ε probes on the undefended victim."""

    _probe_switch = field_validator("sanity_probes", mode="before")(_probes)
    _executor_name = field_validator("executor", mode="before")(_executor)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # the results folder is results/<name>: a name is one path component, nothing more
        if not SAFE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a safe suite name: use letters, digits, '.', '_' and '-' (starting with a "
                             "letter or digit, at most 100), e.g. 'my-suite'; it names the results folder")
        return value

    def threats(self) -> dict[str, ThreatModel]:
        """Named threat models with sweeps expanded (``linf@2/255``-style names for sweeps),
        plus the sanity probes' radii when they are on."""
        out: dict[str, ThreatModel] = {}
        for name, spec in self.threat_models.items():
            if isinstance(spec.eps, list):
                for eps in spec.eps:
                    out[f"{name}@{_eps_text(eps)}"] = ThreatModel(f"{name}@{_eps_text(eps)}", spec.norm, eps)
            else:
                out[name] = ThreatModel(name, spec.norm, spec.eps)
        if self.sanity_probes.enabled:
            out[PROBE_EPS0] = ThreatModel(PROBE_EPS0, "linf", 0.0)
            out[PROBE_LARGE] = ThreatModel(PROBE_LARGE, "linf", float(self.sanity_probes.large_eps))
        return out

    def protocol_attacks(self) -> list[AttackSpec]:
        """The attacks the harness adds: the standard adaptive attack through every defense, its
        N-draw evaluation, the clean N-draw evaluation, the convergence re-run, and the probes."""
        added: list[AttackSpec] = []
        protocol = self.adaptive
        threats = protocol.threats if protocol.threats is not None else list(self.threat_models)
        if protocol.enabled and threats:
            base = dict(name=protocol.attack, params=dict(protocol.params), threats=threats, adaptive=True,
                        eot=protocol.eot, samples=protocol.samples, surrogate_steps=protocol.surrogate_steps,
                        grafting=protocol.grafting, tasks=protocol.tasks, judging_draws=protocol.draws)
            added.append(AttackSpec(id=STANDARD_LABEL, role="standard", **base))
            if protocol.draws > 1:
                added.append(AttackSpec(id=f"{STANDARD_LABEL}-N{protocol.draws}", role="n-draw", draws=protocol.draws, **base))
                added.append(AttackSpec(name="none", id=f"clean-N{protocol.draws}", role="clean-n-draw",
                                        draws=protocol.draws, samples=protocol.samples, tasks=protocol.tasks))
            check = protocol.convergence
            if check.enabled:
                params = dict(protocol.params)
                steps_key = protocol.steps_param()
                if steps_key:
                    params[steps_key] = int(params[steps_key]) * check.factor
                if "restarts" in params:  # factor x the runs, too: a restart finds what one run misses
                    params["restarts"] = (int(params["restarts"]) + 1) * check.factor - 1
                samples = min(check.samples, protocol.samples) if protocol.samples else check.samples
                # judged over as many draws as the ranking's N-draw number, so the check watches
                # the number the board ranks on (a larger budget can leave one draw's score
                # where it was and still break more samples in some draw)
                added.append(AttackSpec(
                    **{**base, "params": params, "eot": protocol.eot * check.factor, "samples": samples},
                    id=f"{STANDARD_LABEL}-{check.factor}x", role="convergence", draws=protocol.draws,
                ))
        if self.sanity_probes.enabled:
            probes = self.sanity_probes
            undefended = ["none"] if any(d.label == "none" for d in self.defenses) else [self.defenses[0].label]
            for attack in self.attacks:
                if attack.threats and attack.role == "suite":
                    added.append(attack.model_copy(update={
                        "threats": [PROBE_EPS0], "defenses": undefended, "adaptive": False, "eot": None,
                        "samples": probes.samples, "role": "probe", "tasks": attack.tasks,
                    }))
            added.append(AttackSpec(name=protocol.attack, id=STANDARD_LABEL, params=dict(protocol.params),
                                    threats=[PROBE_LARGE], defenses=undefended, samples=probes.samples, role="probe"))
        return added

    def all_attacks(self) -> list[AttackSpec]:
        """The suite's own attacks, then the ones the harness adds."""
        return [*self.attacks, *self.protocol_attacks()]

    def defenses_of(self, attack: AttackSpec) -> list[DefenseSpec]:
        return [d for d in self.defenses if attack.defenses is None or d.label in attack.defenses]

    def threats_of(self, attack: AttackSpec) -> list[ThreatModel]:
        expanded = self.threats()
        result: list[ThreatModel] = []
        for ref in attack.threats:
            sweep = [t for key, t in expanded.items() if key == ref or key.startswith(ref + "@")]
            result.extend(sweep)
        return result or [CLEAN_THREAT]


def _eps_text(eps: float) -> str:
    scaled = eps * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{eps:g}"


# -- loading ----------------------------------------------------------------------------------


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser: ~10x faster on big suites
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last one
    silently: `attacks:` twice would drop the first list)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base loader reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is written twice in one mapping (first on line "
                    f"{seen[key].start_mark.line + 1}); YAML would keep only the last: merge them", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, included_from: tuple[Path, ...]) -> dict[str, Any]:
    if path in included_from:
        chain = " -> ".join(str(p) for p in (*included_from, path))
        raise SuiteError(path, "include", f"include cycle: {chain}; remove one of the includes")
    if not path.is_file():
        if included_from:
            raise SuiteError(
                included_from[-1], "include", f"included file '{path}' does not exist (paths are relative to the including file)"
            )
        raise SuiteError(path, "", "suite file does not exist; pass the path of a YAML suite (see suites/)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(path, "", f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}): a suite "
                                   "is a YAML file saved as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SuiteError(path, "", f"not valid YAML: {where}{problem}") from None
    if data is None:
        if not included_from:
            raise SuiteError(path, "", "the suite file is empty: a suite names its victims, tasks, attacks and "
                             "defenses (see suites/quickstart.yaml)")
        data = {}
    if not isinstance(data, dict):
        raise SuiteError(path, "", f"the top level must be a mapping of keys (name, victims, tasks, ...), got {type(data).__name__}")
    includes = data.pop("include", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise SuiteError(path, "include", "must be a file path or a list of file paths")
    merged: dict[str, Any] = {}
    for include in includes:
        base = _read_yaml((path.parent / include).resolve(), (*included_from, path))
        merged = _merge(merged, base)
    return _merge(merged, data)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Later files win; mappings (``threat_models``) merge key by key, lists are replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _key_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that the error location points into."""
    current: Any = model
    mapping_key_next = False
    for part in loc[:-1]:
        if isinstance(part, int) or mapping_key_next:
            mapping_key_next = False
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
            mapping_key_next = typing.get_origin(annotation) is dict
            args = typing.get_args(annotation)
            current = args[-1] if args else annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _pydantic_error(path: Path, exc: pydantic.ValidationError) -> SuiteError:
    # A misspelt key shows up twice: as an unknown key and as a missing one. Name the typo.
    rank = {"extra_forbidden": 0, "missing": 2}
    errors = sorted(exc.errors(), key=lambda e: rank.get(e["type"], 1))
    err = errors[0]
    loc = tuple(err["loc"])
    key = _key_path(loc)
    kind = err["type"]
    if kind == "missing":
        message = "is required but missing"
    elif kind == "extra_forbidden":
        allowed = _allowed_keys(Suite, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        message = f"is not a known key{hint} (allowed keys here: {', '.join(allowed)})"
    elif kind == "literal_error":
        message = f"got {err.get('input')!r}; {err['msg'].lower()}"
    else:
        message = f"{err['msg']} (got {err.get('input')!r})"
    more = len(exc.errors()) - 1
    if more:
        message += f". {more} more problem(s) follow once this one is fixed"
    return SuiteError(path, key, message)


def load_suite(path: str | Path, plugins: Plugins, *, device_notes: list[str] | None = None,
               parsed: Suite | None = None) -> Suite:
    """Read, merge includes, validate the schema and check every name and parameter.

    A ``device`` this machine lacks is an error; with ``device_notes`` (``codefend validate``),
    a CUDA device on a machine with none is noted there instead: a suite for a GPU machine
    validates on a laptop, as a suite for another machine's data does. ``parsed`` is
    :func:`parse_suite`'s result for ``path`` when the caller has it (the file is not read again)."""
    path = Path(path).resolve()
    suite = parsed if parsed is not None else parse_suite(path)
    _check_plugins(path, suite, plugins, device_notes)
    return suite


def parse_suite(path: str | Path) -> Suite:
    """Read the file and its includes and validate the schema, without any plugin: what the CLI
    checks before it loads the plugins (torch and the model libraries), so that a malformed
    file gets its error at once. :func:`load_suite` then checks names and parameters."""
    path = Path(path).resolve()
    data = _read_yaml(path, ())
    data.setdefault("name", path.stem)
    try:
        return Suite.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _pydantic_error(path, exc) from None


def _device_problem(value: Any) -> tuple[str, bool] | None:
    """Why ``value`` names no device of this machine, and whether the suite is simply for a GPU
    machine (a bare ``cuda`` where there is none); None when the device is here, or not one."""
    if not isinstance(value, str):
        return None
    import torch

    try:
        device = torch.device(value)
    except RuntimeError as exc:
        return f"'{value}' is not a torch device ({exc}); use 'cpu', 'cuda' or 'cuda:N'", False
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            have = f"{count} CUDA device(s): cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            return (f"device '{value}' does not exist on this machine ({have}); use one it has, 'cpu', "
                    "or leave 'device' out for the default (cuda when present, else cpu)",
                    count == 0 and device.index is None)
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"device '{value}' does not exist on this machine (no MPS); use 'cpu' or leave 'device' out", False
    return None


def _check_plugins(path: Path, suite: Suite, plugins: Plugins, device_notes: list[str] | None = None) -> None:
    # a Ray cluster's devices are its workers', not this machine's
    local_devices = suite.executor.name != "ray"

    def create(kind: str, name: str, params: dict[str, Any], key: str) -> Any:
        if local_devices and (found := _device_problem(params.get("device"))) is not None:
            problem, for_a_gpu_machine = found
            if device_notes is None or not for_a_gpu_machine:
                raise SuiteError(path, f"{key}.params.device", problem)
            device_notes.append(f"{key}.params.device: {problem}; `codefend run` refuses it here")
        registry = plugins.registry(kind)
        try:
            return registry.create(name, params)
        except UnknownNameError as exc:
            raise SuiteError(path, f"{key}.name", str(exc)) from None
        except PluginImportError as exc:
            raise SuiteError(path, f"{key}.name", str(exc)) from None
        except ParamError as exc:
            first_key = exc.problems[0][0] if exc.problems else ""
            raise SuiteError(path, f"{key}.params" + (f".{first_key}" if first_key else ""), str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise SuiteError(path, f"{key}.params", f"{kind} '{name}' rejected its parameters: {exc}") from None

    # every name first: a misspelt plugin is reported before any plugin module (torch, the model
    # libraries) is imported to check parameters
    named = [("victim", v.name, f"victims[{i}]") for i, v in enumerate(suite.victims)]
    named += [("task", t.name, f"tasks[{i}]") for i, t in enumerate(suite.tasks)]
    named += [("defense", d.name, f"defenses[{i}]") for i, d in enumerate(suite.defenses)]
    named += [("executor", suite.executor.name, "executor")]
    named += [("attack", a.name, f"attacks[{i}]") for i, a in enumerate(suite.attacks)]
    if suite.adaptive.enabled:
        named.append(("attack", suite.adaptive.attack, "adaptive"))
    for kind, name, key in named:
        try:
            plugins.registry(kind).get(name)
        except UnknownNameError as exc:
            raise SuiteError(path, f"{key}.name" if key != "adaptive" else "adaptive.attack", str(exc)) from None

    for name in suite.threat_models:
        if name in RESERVED_THREAT_NAMES or "@" in name:
            raise SuiteError(
                path, f"threat_models.{name}",
                f"the name '{name}' is reserved ('clean' is the unattacked condition, '@' marks sweep members); "
                "rename it, e.g. 'linf-8'",
            )
    for i, victim in enumerate(suite.victims):
        create("victim", victim.name, victim.params, f"victims[{i}]")
    for i, task in enumerate(suite.tasks):
        create("task", task.name, task.factory_params(), f"tasks[{i}]")
    for i, defense in enumerate(suite.defenses):
        instance = create("defense", defense.name, defense.params, f"defenses[{i}]")
        try:
            check_defense_declarations(defense.name, instance)
        except ValueError as exc:
            raise SuiteError(path, f"defenses[{i}]", str(exc)) from None
    create("executor", suite.executor.name, suite.executor.params, "executor")

    for i, attack in enumerate(suite.attacks):
        key = f"attacks[{i}]"
        instance = create("attack", attack.name, attack.params, key)
        for j, ref in enumerate(attack.threats):
            if ref not in suite.threat_models:
                close = difflib.get_close_matches(ref, list(suite.threat_models), n=1)
                hint = f" — did you mean '{close[0]}'?" if close else ""
                declared = ", ".join(suite.threat_models) or "none declared"
                raise SuiteError(path, f"{key}.threats[{j}]", f"unknown threat model '{ref}'{hint} (declared under threat_models: {declared})")
        if instance.uses_threat and not attack.threats:
            raise SuiteError(path, f"{key}.threats", f"attack '{attack.name}' needs at least one threat model (names from threat_models)")
        if not instance.uses_threat and attack.threats:
            raise SuiteError(path, f"{key}.threats", f"attack '{attack.name}' does not use a threat model; remove 'threats'")
        if attack.adaptive and instance.requires not in ("gradients", "queries"):
            raise SuiteError(
                path, f"{key}.adaptive",
                f"attack '{attack.name}' needs {instance.requires!r} access, so it cannot adapt to a defense; "
                "adaptive mode applies to gradient and query attacks",
            )
        # keys that only mean something when the attack goes through the defense
        adaptive_only = (
            ("eot", attack.eot is not None, "eot (expectation over transformation)"),
            ("surrogate_steps", attack.surrogate_steps is not None, "a surrogate process"),
            ("grafting", attack.grafting, "gradient grafting (over EOT draws)"),
            ("judging_draws", attack.judging_draws != 1, "judging over several purification draws"),
        )
        for field_name, given, what in adaptive_only:
            if given and not attack.adaptive:
                raise SuiteError(path, f"{key}.{field_name}", f"{what} only applies with adaptive: true "
                                 "(an oblivious attack runs on the undefended victim)")
        for field_name, declared in (("defenses", [d.label for d in suite.defenses]),
                                     ("tasks", sorted({t.name for t in suite.tasks} | {t.label for t in suite.tasks})),
                                     ("victims", sorted({v.name for v in suite.victims}))):
            for j, ref in enumerate(getattr(attack, field_name) or []):
                if ref not in declared:
                    close = difflib.get_close_matches(ref, declared, n=1)
                    hint = f" — did you mean '{close[0]}'?" if close else ""
                    raise SuiteError(
                        path, f"{key}.{field_name}[{j}]",
                        f"unknown {field_name[:-1]} '{ref}'{hint} (the suite's {field_name}: {', '.join(declared)})",
                    )
    for i, attack in enumerate(suite.attacks):
        if attack.role != "suite":
            raise SuiteError(path, f"attacks[{i}].role", "is set by the harness for the attacks it adds; remove it")
    _check_protocol(path, suite, create)
    reserved = {a.label for a in suite.protocol_attacks() if a.role != "probe"}
    for i, attack in enumerate(suite.attacks):
        if attack.label in reserved:
            raise SuiteError(path, f"attacks[{i}]", f"the label '{attack.label}' is the standard adaptive protocol's "
                             "(see `adaptive:`); give this attack another 'id'")
    for label, items in (("attacks", [a.label for a in suite.attacks]), ("defenses", [d.label for d in suite.defenses])):
        dupes = {x for x, count in collections.Counter(items).items() if count > 1}
        if dupes:
            raise SuiteError(path, label, f"duplicate entries {sorted(dupes)}; give repeated plugins distinct 'id's")


def _check_protocol(path: Path, suite: Suite, create: Any) -> None:
    protocol = suite.adaptive
    if not protocol.enabled:
        return
    instance = create("attack", protocol.attack, protocol.params, "adaptive")
    if instance.requires not in ("gradients", "queries"):
        raise SuiteError(path, "adaptive.attack", f"attack '{protocol.attack}' needs {instance.requires!r} access; "
                         "the standard adaptive attack must be a gradient or query attack (e.g. apgd)")
    declared_tasks = sorted({t.name for t in suite.tasks} | {t.label for t in suite.tasks})
    for j, ref in enumerate(protocol.tasks or []):
        if ref not in declared_tasks:
            raise SuiteError(path, f"adaptive.tasks[{j}]", f"unknown task '{ref}' (the suite's tasks: {', '.join(declared_tasks)})")
    for j, ref in enumerate(protocol.threats or []):
        if ref not in suite.threat_models:
            declared = ", ".join(suite.threat_models) or "none declared"
            raise SuiteError(path, f"adaptive.threats[{j}]", f"unknown threat model '{ref}' (declared under threat_models: {declared})")
    if protocol.convergence.enabled and protocol.steps_param() is None:
        raise SuiteError(path, "adaptive.convergence", f"attack '{protocol.attack}' has no 'steps' parameter to double; "
                         "set adaptive.params.steps or turn the convergence check off")


# -- the matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One point of the matrix: victim x task x attack@threat x defense."""

    victim: VictimSpec
    task: TaskSpec
    attack: AttackSpec
    threat: ThreatModel
    defense: DefenseSpec
    seed: int

    @property
    def label(self) -> str:
        threat = "" if self.threat is CLEAN_THREAT or self.threat.name == "clean" else f"@{self.threat.name}"
        return f"{self.victim.name} | {self.task.label} | {self.attack.label}{threat} | {self.defense.label}"


def subset(task: TaskSpec, attack: AttackSpec) -> TaskSpec:
    """The task an attack runs on: capped at the attack's ``samples`` (the first of the task's
    seeded subset, so they pair with the task's other cells)."""
    if attack.samples is None or (task.n is not None and task.n <= attack.samples):
        return task
    return task.model_copy(update={"n": attack.samples})


def expand(suite: Suite) -> list[Cell]:
    cells = []
    for victim in suite.victims:
        for task in suite.tasks:
            for attack in suite.all_attacks():
                if not attack.crosses(task) or not attack.attacks_victim(victim):
                    continue
                for threat in suite.threats_of(attack):
                    for defense in suite.defenses_of(attack):
                        cells.append(Cell(victim, subset(task, attack), attack, threat, defense, suite.seed))
    return cells


@dataclass(frozen=True)
class PassEstimate:
    attack_forward: int
    attack_backward: int
    defense: int
    generate: int
    adaptive_protocol: int = 0
    """Of the total, what the standard adaptive protocol (its attack, N-draw, convergence) costs."""

    @property
    def total(self) -> int:
        return self.attack_forward + self.attack_backward + self.defense + self.generate


def attack_passes(attack: AttackSpec, instance: Attack, defense: Defense | None) -> tuple[int, int]:
    """(forward, backward) network passes per sample of ``instance``, the attack ``attack``
    declares: oblivious (``defense`` None) on the victim alone, or adaptive through ``defense``.
    The one place the suite's estimate and the work graph's node costs price an attack.

    Adaptive: every pass of the attack's own (:meth:`~harness.contracts.Attack.passes_per_sample`)
    runs ``eot`` draws of the defense's network evaluations (only the surrogate process's when the
    route goes through one) and of the victim; backward passes go through the defense only on an
    exact route, once per draw, or once per step when grafted (every draw's backward pass through
    the victim, one through the defense). Every judgement of a sample
    (:meth:`~harness.contracts.Attack.judgements_per_sample`) generates through the *real*
    defense, once per judging draw of a stochastic one: behind a surrogate process of 2 of 50
    steps, a judgement over 10 draws costs 510 evaluations, not 3."""
    from harness.adaptive import gradient_route

    forward, backward = instance.passes_per_sample()
    judgements = instance.judgements_per_sample()
    if defense is None:
        return forward + judgements, backward
    route = gradient_route(defense, attack.eot, attack.surrogate_steps, attack.grafting)
    real_calls = calls = defense.passes_per_sample()
    if route.surrogate is not None and attack.surrogate_steps is not None:
        calls = min(calls, attack.surrogate_steps)
    through_defense = calls if route.method == "exact" else 0
    judging_draws = attack.judging_draws if defense.stochastic else 1
    return (forward * route.eot * (1 + calls) + judgements * judging_draws * (1 + real_calls),
            backward * (route.eot + through_defense * (1 if route.grafted else route.eot)))


def estimate_passes(suite: Suite, plugins: Plugins, sample_counts: dict[int, int]) -> PassEstimate:
    """Forward/backward passes the suite will cost, counting shared oblivious attacks once.

    ``sample_counts`` maps a task's index to its sample count (``n`` or the split size). An
    adaptive attack costs, per step and EOT draw, the victim's pass and the defense's network
    evaluations (forward, and again backward when the route is exact), and its judgements
    (:func:`attack_passes`); N-draw evaluation costs ``draws`` purifications and generations of
    stochastic defenses.
    """
    fwd = bwd = purify = gen = protocol = 0
    instances = {d.label: plugins.defenses.create(d.name, d.params) for d in suite.defenses}
    for victim in suite.victims:
        for t_index, task in enumerate(suite.tasks):
            for attack in suite.all_attacks():
                if not attack.crosses(task) or not attack.attacks_victim(victim):
                    continue
                n = sample_counts[t_index] if attack.samples is None else min(sample_counts[t_index], attack.samples)
                defenses = [instances[d.label] for d in suite.defenses_of(attack)]
                instance = plugins.attacks.create(attack.name, attack.params)
                # a cell that only re-evaluates stored adversarial examples (N-draw) attacks nothing
                attacks_itself = attack.role != "n-draw"
                before = fwd + bwd + purify + gen
                for _threat in suite.threats_of(attack):
                    if attacks_itself and not attack.adaptive:
                        forward, backward = attack_passes(attack, instance, None)
                        fwd, bwd = fwd + forward * n, bwd + backward * n
                    for defense in defenses:
                        draws = attack.draws if defense.stochastic else 1
                        if attacks_itself and attack.adaptive:
                            forward, backward = attack_passes(attack, instance, defense)
                            fwd, bwd = fwd + forward * n, bwd + backward * n
                        purify += defense.passes_per_sample() * n * draws
                        gen += n * draws
                if attack.role != "suite":
                    protocol += fwd + bwd + purify + gen - before
    return PassEstimate(fwd, bwd, purify, gen, protocol)
