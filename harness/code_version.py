"""The code version of a registered component, for result keys.

Result rows are cached by a fingerprint of plugin names and parameters. That is not enough: a
researcher who edits their defense and re-runs must not get the old rows back. So each component
also has a *code version*:

- ``"<distribution>==<version>"`` for a plugin installed normally from a distribution (a wheel in
  site-packages): its code changes only when its version does.
- ``"src:<16 hex>"``, a sha256 of its source, for everything whose code can change under the same
  version: an editable install (PEP 660 / PEP 610 ``dir_info.editable``; the project itself,
  ``codefend-bench``, is usually installed with ``pip install -e``), an in-process plugin
  (``load_plugins(extra=...)``), a module shadowing its distribution (a checkout on
  ``PYTHONPATH``), or a distribution we cannot identify.

What is hashed: if the factory's module belongs to a package, every ``.py`` file under the
directory holding the module file (recursively, ``__pycache__`` skipped, sorted by relative path,
hashing each relative path and its bytes); a top-level module is hashed alone. The directory
rather than the single file because a plugin module usually imports its siblings (``plugin.py``
registers classes from ``apgd.py``, both use ``_common.py``): a change there changes results too.
This over-invalidates (editing an unrelated sibling re-runs the cells) but that is safe; a stale
row is not. Other packages a plugin imports are not covered.

Libraries make rows too: a new ``transformers`` can change a victim's generation defaults, a new
``diffusers`` a scheduler's arithmetic. :func:`library_code_version` versions them (``"libs:<16
hex>"`` of their installed versions), and every row key holds it: for the built-ins and the
kernel, :data:`ROW_MAKING_LIBRARIES`; for a plugin installed from another distribution, every
runtime requirement that distribution declares (we cannot know which of its libraries compute, so
all). An in-process plugin has no declared requirements: only its source is versioned.

The kernel makes rows too: the runner attacks, defends and generates, :mod:`harness.adaptive`
routes an adaptive attack's gradient through the defense, and the records, labels and image
quality go into every row. :func:`kernel_code_version` versions those modules
(:data:`ROW_MAKING_MODULES`) the same way, and every row key holds it. Modules that only plan,
store or render (the graph, the store, the board) are left out: editing them re-runs nothing.

"Installed normally" is decided conservatively, because a wrong "yes" gives stale rows:

- some distribution of that name is found on ``sys.path`` (``importlib.metadata``);
- none of the distributions of that name on ``sys.path`` is editable per PEP 610 (a stale
  ``*.egg-info`` left in a source checkout, found first when the checkout is the working
  directory, must not hide the editable ``.dist-info`` in site-packages);
- the first one found (what ``importlib.metadata.distribution`` returns) is a ``.dist-info``
  written by an installer, not an ``.egg-info`` (``setup.py develop`` and in-tree builds);
- the module file the factory was defined in is one of the files its ``RECORD`` lists (otherwise
  the code that ran is not the code that distribution installed).

A module with no source file (built-in, extension, or a ``types.ModuleType`` built in memory)
falls back to ``"<distribution>==<version>"`` when the distribution is a real installed one, else
``"unknown"``.

Results are cached per process (source hashes by directory or file, distribution checks by
distribution and module file, library versions by distribution). Call :func:`clear_code_version_cache` after editing files in the
same process (tests do).

This module is part of the kernel: it imports no plugin package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import sys
import types
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

UNKNOWN = "unknown"
HASH_CHARS = 16

_source_hashes: dict[str, str] = {}
_normal_installs: dict[tuple[str, str | None], bool] = {}
_library_versions: dict[str, dict[str, str]] = {}


def clear_code_version_cache() -> None:
    """Forget cached source hashes, distribution checks and library versions (after editing
    files, or installing packages, mid-process)."""
    _source_hashes.clear()
    _normal_installs.clear()
    _library_versions.clear()


def code_version(factory: Any, distribution: str, version: str) -> str:
    """The code version of ``factory``, registered by ``distribution`` at ``version``.

    ``"<distribution>==<version>"`` for a normal install, ``"src:<16 hex>"`` otherwise (see the
    module docstring), ``"unknown"`` when there is neither source nor a real distribution.
    """
    module = _defining_module(factory)
    source = _source_file(module, factory)
    if _installed_normally(distribution, source):
        return f"{distribution}=={version}"
    if source is None:
        return f"{distribution}=={version}" if _is_distribution(distribution) else UNKNOWN
    if module is not None and module.__package__:
        root = os.path.dirname(source)
        return _source_version(root + os.sep, lambda: _hash_directory(Path(root)))
    return _source_version(source, lambda: _hash_files(Path(source).parent, [Path(source)]))


def _source_version(key: str, compute: Callable[[], str]) -> str:
    """``"src:<hash>"``, the hash computed once per process per ``key`` (until the cache is cleared)."""
    if key not in _source_hashes:
        _source_hashes[key] = compute()
    return "src:" + _source_hashes[key]


ROW_MAKING_MODULES = ("adaptive", "contracts", "image_quality", "labels", "objectives", "records", "reproducible", "runner")
"""The kernel modules (of :mod:`harness`) whose code makes a row's content."""

def kernel_code_version(package_dir: Path | None = None) -> str:
    """The code version of the kernel's :data:`ROW_MAKING_MODULES`: its distribution's version
    when the kernel is installed normally, else ``"src:<16 hex>"`` of their source.
    ``package_dir``: another copy of the ``harness`` package (tests)."""
    here = (package_dir or Path(__file__)).resolve()
    here = here if here.is_dir() else here.parent
    return files_code_version([here / f"{name}.py" for name in ROW_MAKING_MODULES])


def builtin_code_version(factory: Any) -> str:
    """:func:`code_version` of code that ships with the built-ins (a trainer that imports a task
    module directly for its data, rather than through the registry)."""
    from harness.plugins import BUILTIN_DISTRIBUTION

    try:
        version = importlib.metadata.version(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return code_version(factory, BUILTIN_DISTRIBUTION, version)


def files_code_version(files: Sequence[str | Path]) -> str:
    """The code version of some of the project's own source files (the kernel's row-making
    modules; the modules that define and train a cached model, which trainers put in their
    checkpoint keys so that a checkpoint never outlives its training code): the built-ins'
    distribution version when it is installed normally, else ``"src:<16 hex>"`` of the files,
    named relative to their common folder (so that a moved checkout keeps its versions)."""
    from harness.plugins import BUILTIN_DISTRIBUTION  # the kernel ships in the built-ins' distribution

    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise ValueError("files_code_version needs at least one file")
    if _installed_normally(BUILTIN_DISTRIBUTION, str(paths[0])):
        return f"{BUILTIN_DISTRIBUTION}=={importlib.metadata.version(BUILTIN_DISTRIBUTION)}"
    root = Path(os.path.commonpath([p.parent for p in paths]))
    key = "files:" + "\0".join(sorted(map(str, paths)))
    return _source_version(key, lambda: _hash_files(root, paths))


# -- which libraries ------------------------------------------------------------------------------

ROW_MAKING_LIBRARIES = (
    "torch",  # every forward and backward pass
    "numpy",
    "transformers",  # the real victims: their models, processors and generate()
    "tokenizers",
    "diffusers",  # the purifiers' UNets and schedulers
    "peft",  # LoRA adapters of purifiers and the prefix generator
    "kornia",  # the differentiable JPEG of the jpeg defense's BPDA route
    "pillow",  # JPEG encoding and image decoding
    "adversarial-robustness-toolbox",  # the ART attacks
    "pycocoevalcap",  # caption metrics
    "torchmetrics",  # PSNR and SSIM in every row
)
"""The libraries whose code computes the built-ins' and the kernel's rows (a subset of the
built-in distribution's requirements: plotting, schemas and progress bars make no row, and
upgrading them must not re-run one)."""

NOT_INSTALLED = "not installed"


def library_versions(distributions: Iterable[str]) -> dict[str, str]:
    """Installed version of each library that makes the rows of components from ``distributions``
    (canonical name -> version, or ``"not installed"``): :data:`ROW_MAKING_LIBRARIES` for the
    built-in distribution; every runtime requirement (extras left out) of another installed
    distribution; nothing for a name that is no installed distribution (an in-process plugin)."""
    from harness.plugins import BUILTIN_DISTRIBUTION

    out: dict[str, str] = {}
    for distribution in sorted(set(distributions)):
        if distribution not in _library_versions:
            if canonicalize_name(distribution) == canonicalize_name(BUILTIN_DISTRIBUTION):
                names: Sequence[str] = ROW_MAKING_LIBRARIES
            elif _is_distribution(distribution):
                names = _runtime_requirements(distribution)
            else:
                names = ()
            _library_versions[distribution] = {canonicalize_name(name): _installed_version(name) for name in names}
        out.update(_library_versions[distribution])
    return dict(sorted(out.items()))


def library_code_version(distributions: Iterable[str]) -> str:
    """``"libs:<16 hex>"``: a digest of :func:`library_versions`, for row keys."""
    blob = json.dumps(library_versions(distributions), sort_keys=True).encode("utf-8")
    return "libs:" + hashlib.sha256(blob).hexdigest()[:HASH_CHARS]


def _runtime_requirements(distribution: str) -> list[str]:
    names = []
    for line in importlib.metadata.requires(distribution) or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def _installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


# -- which code -----------------------------------------------------------------------------------


def _unwrap(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    try:
        factory = inspect.unwrap(factory)
    except ValueError:  # a cycle of __wrapped__
        pass
    if not (inspect.isclass(factory) or inspect.isroutine(factory) or isinstance(factory, types.ModuleType)):
        factory = type(factory)  # a callable instance: its class holds the code
    return factory


def _defining_module(factory: Any) -> types.ModuleType | None:
    factory = _unwrap(factory)
    if isinstance(factory, types.ModuleType):
        return factory
    module = inspect.getmodule(factory)
    if module is None:
        module = sys.modules.get(getattr(factory, "__module__", None) or "")
    return module


def _source_file(module: types.ModuleType | None, factory: Any) -> str | None:
    """The absolute path of the ``.py`` file defining ``factory``, or None if there is none."""
    candidates: list[Any] = [module] if module is not None else [_unwrap(factory)]
    for obj in candidates:
        try:
            path = inspect.getsourcefile(obj)
        except (TypeError, OSError):
            path = None
        if path is None and isinstance(obj, types.ModuleType):
            path = getattr(obj, "__file__", None)
        if path and path.endswith(".py") and os.path.isfile(path):
            return os.path.realpath(path)
    return None


# -- hashing --------------------------------------------------------------------------------------


def _hash_directory(root: Path) -> str:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    return _hash_files(root, files)


def _hash_files(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for rel, path in sorted((path.relative_to(root).as_posix(), path) for path in files):
        data = path.read_bytes()
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:HASH_CHARS]


# -- which distribution ---------------------------------------------------------------------------


def _is_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except Exception:  # PackageNotFoundError, or a name that is not a valid distribution name
        return False
    return True


def _is_editable(dist: importlib.metadata.Distribution) -> bool:
    """PEP 610: ``direct_url.json`` with ``dir_info.editable`` true."""
    try:
        text = dist.read_text("direct_url.json")
        return bool(text) and bool(json.loads(text).get("dir_info", {}).get("editable", False))
    except (OSError, ValueError, AttributeError):
        return False


def _installed_normally(distribution: str, source: str | None) -> bool:
    key = (distribution, source)
    if key not in _normal_installs:
        _normal_installs[key] = _check_normal_install(distribution, source)
    return _normal_installs[key]


def _check_normal_install(distribution: str, source: str | None) -> bool:
    try:
        found = list(importlib.metadata.distributions(name=distribution))
    except Exception:
        return False
    if not found or any(_is_editable(dist) for dist in found):
        return False
    dist = found[0]
    metadata_dir = getattr(dist, "_path", None)  # PathDistribution; other finders: be conservative
    if metadata_dir is None or not str(metadata_dir).endswith(".dist-info"):
        return False
    if source is None:
        return True
    files = dist.files
    if not files:
        return False
    base = os.path.realpath(str(dist.locate_file("")))
    rel = PurePosixPath(Path(os.path.relpath(source, base))).as_posix()
    return any(PurePosixPath(str(f)).as_posix() == rel for f in files)
