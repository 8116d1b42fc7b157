"""Code versions: editable and in-process plugins are keyed by a hash of their source, so editing
a plugin changes its code version; a normally installed distribution is keyed by its version."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import sys
import textwrap
from pathlib import Path

import pytest

from harness.code_version import clear_code_version_cache, code_version
from harness.plugins import load_plugins

PACKAGE = "cv_local_blur"

PLUGIN_SOURCE = textwrap.dedent(
    """
    from harness.contracts import Defense
    from harness.hookspecs import hookimpl

    from .helpers import SIGMA


    class Blur(Defense):
        def __init__(self, sigma: float = SIGMA):
            self.sigma = sigma


    @hookimpl
    def register_defenses(register):
        register("blur", Blur, description="a local test plugin")
    """
)


@pytest.fixture
def on_path(tmp_path: Path):
    """Put ``tmp_path`` first on sys.path; afterwards remove it and the modules imported from it."""
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    clear_code_version_cache()
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "") or "").startswith(str(tmp_path))]:
        del sys.modules[name]
    importlib.invalidate_caches()
    clear_code_version_cache()


@pytest.fixture
def local_plugin(on_path: Path) -> Path:
    package = on_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("SIGMA = 1.0\n")
    (package / "plugin.py").write_text(PLUGIN_SOURCE)
    return package


def _blur_version() -> str:
    module = importlib.import_module(f"{PACKAGE}.plugin")
    plugins = load_plugins(extra=[("blur", module)], use_entry_points=False)
    entry = plugins.defenses.get("blur")
    assert entry.distribution == "(in-process)"
    return entry.code_version()


def test_local_plugin_is_versioned_by_its_source(local_plugin: Path) -> None:
    first = _blur_version()
    assert first.startswith("src:") and len(first) == len("src:") + 16

    clear_code_version_cache()
    assert _blur_version() == first, "unchanged source must give the same version"

    with open(local_plugin / "plugin.py", "a") as f:
        f.write("# tuned the blur\n")
    clear_code_version_cache()
    edited = _blur_version()
    assert edited.startswith("src:") and edited != first

    (local_plugin / "helpers.py").write_text("SIGMA = 2.0\n")  # a sibling the plugin imports
    clear_code_version_cache()
    sibling_edited = _blur_version()
    assert sibling_edited.startswith("src:") and sibling_edited not in (first, edited)

    # Bytecode caches are not source.
    (local_plugin / "__pycache__").mkdir(exist_ok=True)
    (local_plugin / "__pycache__" / "stray.py").write_text("x = 1\n")
    clear_code_version_cache()
    assert _blur_version() == sibling_edited


def test_cache_holds_until_cleared(local_plugin: Path) -> None:
    first = _blur_version()
    (local_plugin / "helpers.py").write_text("SIGMA = 3.0\n")
    assert _blur_version() == first, "cached within the process until cleared"
    clear_code_version_cache()
    assert _blur_version() != first


def test_top_level_module_is_hashed_alone(on_path: Path) -> None:
    (on_path / "cv_single_module.py").write_text("def make():\n    return 1\n")
    (on_path / "cv_unrelated.py").write_text("X = 1\n")
    module = importlib.import_module("cv_single_module")
    first = code_version(module.make, "(in-process)", "-")
    assert first.startswith("src:")

    (on_path / "cv_unrelated.py").write_text("X = 2\n")
    clear_code_version_cache()
    assert code_version(module.make, "(in-process)", "-") == first

    (on_path / "cv_single_module.py").write_text("def make():\n    return 2\n")
    clear_code_version_cache()
    assert code_version(module.make, "(in-process)", "-") != first


def test_module_without_source_is_unknown() -> None:
    import types

    module = types.ModuleType("cv_in_memory")
    exec("def make():\n    return 1\n", module.__dict__)
    sys.modules["cv_in_memory"] = module
    try:
        assert code_version(module.make, "(in-process)", "-") == "unknown"
    finally:
        del sys.modules["cv_in_memory"]


def _codefend_bench_is_editable() -> bool:
    """PEP 610 says so for some codefend-bench metadata on sys.path (site-packages' dist-info;
    a stale egg-info in the checkout, found first from the repo root, carries no marker)."""
    for dist in importlib.metadata.distributions(name="codefend-bench"):
        text = dist.read_text("direct_url.json")
        if text and json.loads(text).get("dir_info", {}).get("editable"):
            return True
    return False


def test_builtin_attack_follows_how_the_project_is_installed() -> None:
    clear_code_version_cache()
    entry = load_plugins().attacks.get("apgd")
    assert entry.distribution == "codefend-bench"
    version = entry.code_version()
    if _codefend_bench_is_editable():
        assert version.startswith("src:"), version
    else:
        assert version == f"codefend-bench=={entry.version}"
    assert entry.code_version() == version, "stable without edits"
    clear_code_version_cache()
    assert entry.code_version() == version, "stable across cache clears without edits"


def test_normally_installed_distribution_uses_its_version(on_path: Path) -> None:
    """A wheel-style install (dist-info with a RECORD listing the module) -> name==version; the
    same module shadowed by a file the RECORD does not list -> its source hash."""
    package = on_path / "cv_wheel_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text("class Thing:\n    pass\n")
    info = on_path / "cv_wheel_dist-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cv-wheel-dist\nVersion: 1.2.3\n")
    (info / "RECORD").write_text(
        "cv_wheel_plugin/__init__.py,,\ncv_wheel_plugin/plugin.py,,\ncv_wheel_dist-1.2.3.dist-info/RECORD,,\n"
    )
    importlib.invalidate_caches()
    module = importlib.import_module("cv_wheel_plugin.plugin")
    assert code_version(module.Thing, "cv-wheel-dist", "1.2.3") == "cv-wheel-dist==1.2.3"

    # Marked editable (PEP 610) -> the source is hashed even though the RECORD lists the file.
    (info / "direct_url.json").write_text(json.dumps({"url": "file:///x", "dir_info": {"editable": True}}))
    clear_code_version_cache()
    assert code_version(module.Thing, "cv-wheel-dist", "1.2.3").startswith("src:")

    # Not editable, but the module is not one the distribution installed -> the source is hashed.
    (info / "direct_url.json").unlink()
    (info / "RECORD").write_text("cv_wheel_plugin/other.py,,\n")
    clear_code_version_cache()
    assert code_version(module.Thing, "cv-wheel-dist", "1.2.3").startswith("src:")


def test_a_code_edit_changes_a_rows_keys_but_not_its_random_draws() -> None:
    """Rows are keyed by code version (an edit recomputes them), but the attack's start and the
    defense's noise derive from the sample's identity alone: a re-run after an unrelated edit
    draws the same noise, so its numbers differ only where the code's behaviour did."""
    import numpy as np

    from harness.contracts import Sample, ThreatModel
    from harness.runner import adversarial_key, result_fingerprint, seed_key
    from harness.suite import AttackSpec, Cell, DefenseSpec, TaskSpec, VictimSpec

    threat = ThreatModel(name="linf-8", norm="linf", eps=8 / 255)
    cell = Cell(victim=VictimSpec(name="shapes-vlm"), task=TaskSpec(name="vqav2", data="shapes", split="test", n=4),
                attack=AttackSpec(name="pgd", threats=["linf-8"]), threat=threat, defense=DefenseSpec(name="diffpure"),
                seed=0)
    sample = Sample(id="1", image=np.zeros((8, 8, 3), np.uint8), prompt="what?", references=["yes"])
    old = {"kernel": "src:a", "victim": "src:a", "task": "src:a", "attack": "src:a", "defense": "src:a"}
    new = {**old, "defense": "src:b"}
    assert adversarial_key(cell, "fp", sample, old) == adversarial_key(cell, "fp", sample, new)  # oblivious
    assert result_fingerprint(cell, "fp", sample, old) != result_fingerprint(cell, "fp", sample, new)
    # the kernel makes every row (and every adversarial example): its edits re-run them all
    kernel = {**old, "kernel": "src:b"}
    assert adversarial_key(cell, "fp", sample, old) != adversarial_key(cell, "fp", sample, kernel)
    assert result_fingerprint(cell, "fp", sample, old) != result_fingerprint(cell, "fp", sample, kernel)
    # seed_key takes no code versions: what the draws derive from is the same before and after
    assert seed_key(cell, "fp", sample) == adversarial_key(cell, "fp", sample, dict.fromkeys(old, ""))
    adaptive = dataclasses.replace(cell, attack=AttackSpec(name="pgd", threats=["linf-8"], adaptive=True))
    assert adversarial_key(adaptive, "fp", sample, old) != adversarial_key(adaptive, "fp", sample, new)
    assert seed_key(adaptive, "fp", sample) != seed_key(cell, "fp", sample)  # another attack: other draws


def test_editing_a_row_making_kernel_module_changes_the_kernel_version(tmp_path: Path) -> None:
    """The runner and the adaptive route make rows: an edit there must not return old rows. The
    board only renders them: an edit there re-runs nothing."""
    import shutil

    import harness
    from harness.code_version import ROW_MAKING_MODULES, kernel_code_version

    copy = tmp_path / "harness"
    shutil.copytree(Path(harness.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    clear_code_version_cache()
    before = kernel_code_version(copy)
    assert before.startswith("src:") and kernel_code_version(copy) == before
    assert "adaptive" in ROW_MAKING_MODULES and "runner" in ROW_MAKING_MODULES
    (copy / "board.py").write_text((copy / "board.py").read_text() + "\n# a rendering tweak\n")
    clear_code_version_cache()
    assert kernel_code_version(copy) == before
    adaptive = copy / "adaptive.py"
    adaptive.write_text(adaptive.read_text().replace("return total / draws", "return total / draws * 1.0"))
    clear_code_version_cache()
    assert kernel_code_version(copy) != before
    clear_code_version_cache()


def test_every_kernel_module_a_row_making_module_imports_is_versioned_or_declared_row_neutral() -> None:
    """A kernel module that row-making code calls makes rows too (harness/objectives.py: the DLR
    loss the standard attack raises): unless it is reviewed here as planning, storing or naming
    only, it must be in ROW_MAKING_MODULES, or editing it would return stale rows."""
    import re

    import harness
    from harness.code_version import ROW_MAKING_MODULES

    row_neutral = {"code_version", "graph", "plugins", "store", "suite"}
    root = Path(harness.__file__).parent
    imported = set()
    for name in ROW_MAKING_MODULES:
        imported |= set(re.findall(r"(?:from|import) harness\.([a-z_]+)", (root / f"{name}.py").read_text()))
    assert imported - set(ROW_MAKING_MODULES) - row_neutral == set()
    assert "objectives" in ROW_MAKING_MODULES


def _pgd_cell_and_sample():
    import numpy as np

    from harness.contracts import Sample, ThreatModel
    from harness.suite import AttackSpec, Cell, DefenseSpec, TaskSpec, VictimSpec

    cell = Cell(victim=VictimSpec(name="shapes-vlm"), task=TaskSpec(name="vqav2", data="shapes", split="test", n=4),
                attack=AttackSpec(name="pgd", threats=["linf-8"]), threat=ThreatModel(name="linf-8", norm="linf", eps=8 / 255),
                defense=DefenseSpec(name="diffpure"), seed=0)
    return cell, Sample(id="1", image=np.zeros((8, 8, 3), np.uint8), prompt="what?", references=["yes"])


def test_upgrading_a_library_that_makes_rows_changes_their_keys_and_a_plotting_library_does_not(monkeypatch) -> None:
    """A new transformers can change a victim's generation defaults, a new diffusers a scheduler:
    rows computed under the old ones must not come back. A new matplotlib draws the same rows."""
    from harness import code_version as cv
    from harness.runner import adversarial_key, code_versions, result_fingerprint, seed_key

    cell, sample = _pgd_cell_and_sample()
    plugins = load_plugins()
    real = cv._installed_version

    def keys(upgraded: str) -> tuple[str | None, str]:
        monkeypatch.setattr(cv, "_installed_version", lambda name: "999.0" if name == upgraded else real(name))
        clear_code_version_cache()
        code = code_versions(plugins, cell)
        return adversarial_key(cell, "fp", sample, code), result_fingerprint(cell, "fp", sample, code)

    try:
        before = keys("")
        assert keys("") == before, "the same libraries give the same keys"
        for library in ("torch", "transformers", "diffusers", "adversarial-robustness-toolbox"):
            attacked, row = keys(library)
            assert attacked != before[0] and row != before[1], library
        assert keys("matplotlib") == before
        # the draws do not move with the libraries: a re-run after an upgrade draws the same noise
        assert seed_key(cell, "fp", sample) == adversarial_key(cell, "fp", sample, dict.fromkeys(code_versions(plugins, cell), ""))
    finally:
        monkeypatch.undo()
        clear_code_version_cache()


def test_a_third_party_distribution_versions_the_libraries_it_requires(on_path: Path) -> None:
    """Its runtime requirements, extras left out, at their installed versions; an in-process
    plugin declares none. The run's provenance lists them too."""
    from harness.code_version import NOT_INSTALLED, ROW_MAKING_LIBRARIES, library_versions

    info = on_path / "cv_req_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: cv-req-dist\nVersion: 1.0\nRequires-Dist: pluggy>=1\n"
        "Requires-Dist: cv-absent-lib\nRequires-Dist: hypothesis; extra == \"dev\"\n"
    )
    importlib.invalidate_caches()
    clear_code_version_cache()
    theirs = library_versions(["cv-req-dist"])
    assert theirs == {"pluggy": importlib.metadata.version("pluggy"), "cv-absent-lib": NOT_INSTALLED}
    assert library_versions(["(in-process)"]) == {}
    ours = library_versions(["codefend-bench"])
    assert set(ours) == set(ROW_MAKING_LIBRARIES) and "matplotlib" not in ours
    assert library_versions(["codefend-bench", "cv-req-dist"]) == {**ours, **theirs}


def test_a_defense_s_libraries_key_its_rows_but_not_the_oblivious_examples_every_defense_shares(on_path: Path,
                                                                                               monkeypatch) -> None:
    from harness import code_version as cv
    from harness.runner import adversarial_key, code_versions, result_fingerprint

    info = on_path / "cv_def_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cv-def-dist\nVersion: 1.0\nRequires-Dist: pluggy\n")
    importlib.invalidate_caches()
    cell, sample = _pgd_cell_and_sample()  # oblivious PGD through diffpure
    plugins = load_plugins()
    entries = plugins.defenses.entries
    entries["diffpure"] = dataclasses.replace(entries["diffpure"], distribution="cv-def-dist")  # as if installed from it
    real = cv._installed_version

    def keys(pluggy: str) -> tuple[str | None, str]:
        monkeypatch.setattr(cv, "_installed_version", lambda name: pluggy if name == "pluggy" else real(name))
        clear_code_version_cache()
        code = code_versions(plugins, cell)
        return adversarial_key(cell, "fp", sample, code), result_fingerprint(cell, "fp", sample, code)

    try:
        before, after = keys("1.0"), keys("2.0")
        assert after[1] != before[1], "the defense's library moved: its rows re-run"
        assert after[0] == before[0], "the undefended victim's examples stay shared"
    finally:
        monkeypatch.undo()
        clear_code_version_cache()


def test_every_row_making_library_is_a_requirement_of_the_built_ins() -> None:
    """A library the built-ins stop declaring must leave this list, and one renamed must follow."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from harness.code_version import ROW_MAKING_LIBRARIES

    declared = {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("codefend-bench") or []}
    assert {canonicalize_name(name) for name in ROW_MAKING_LIBRARIES} <= declared


def test_the_seed_keys_of_rows_stay_what_every_stored_board_was_drawn_with() -> None:
    """Every random draw of a row (attack starts, purification noise) derives from its seed key.
    A change to what goes into it, even a new entry in the code-version dict that seed keys blank
    out, redraws every board, and boards computed before and after no longer pair seed for seed.
    Change these values only on purpose, and say so where the boards are reported."""
    import numpy as np

    from harness.contracts import Sample, ThreatModel
    from harness.runner import seed_key
    from harness.suite import AttackSpec, Cell, DefenseSpec, TaskSpec, VictimSpec

    cell = Cell(victim=VictimSpec(name="shapes-vlm"), task=TaskSpec(name="vqav2", data="shapes", split="test", n=4),
                attack=AttackSpec(name="pgd", threats=["linf-8"]), threat=ThreatModel(name="linf-8", norm="linf", eps=8 / 255),
                defense=DefenseSpec(name="diffpure"), seed=0)
    sample = Sample(id="1", image=np.zeros((8, 8, 3), np.uint8), prompt="what?", references=["yes"])
    adaptive = dataclasses.replace(cell, attack=AttackSpec(name="apgd", threats=["linf-8"], adaptive=True, eot=8,
                                                           judging_draws=10))
    assert seed_key(cell, "fp", sample) == "05d1584910764b4e9109f7f474d4ee8aef9e115d410676651f8151fed2c643ec"
    assert seed_key(adaptive, "fp", sample) == "c67c1abd2974428ff501f1a5bc69079ed25bdf239eaa44372241124ac8bccd77"
