"""Plugins: third-party registration through a real entry point, fault tolerance, name checks."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest

from harness.contracts import Defense
from harness.hookspecs import hookimpl
from harness.plugins import PluginLoadWarning, load_plugins
from harness.registry import ParamError, RegistryError, UnknownNameError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BUILTINS = {"attack": ["none", "pgd"], "defense": ["none", "jpeg"], "victim": ["shapes-vlm"],
            "task": ["vqav2", "coco_captions"], "reporter": ["md", "html", "json", "csv"], "executor": ["local"]}


def _install(site: Path, dist: str, version: str, modules: list[str], entry_points: dict[str, str]) -> Path:
    """Make ``site`` look like site-packages holding distribution ``dist``: modules + dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copy(FIXTURES / "plugins" / f"{module}.py", site / f"{module}.py")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "[codefend]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    return site


@pytest.fixture(scope="module")
def blur_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("blur-site"), "thirdparty-blur", "0.3.0",
                    ["thirdparty_blur"], {"blur": "thirdparty_blur"})


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    return _install(tmp_path_factory.mktemp("broken-site"), "broken-plugins", "0.1.0",
                    ["broken_import", "broken_register"],
                    {"broken_import": "broken_import", "broken_register": "broken_register"})


def _component_lines(stdout: str) -> dict[str, set[str]]:
    """kind -> names, from the indented component lines of `codefend plugins`."""
    found: dict[str, set[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("    "):
            kind, name = line.split()[:2]
            found.setdefault(kind, set()).add(name)
    return found


def _assert_builtins_listed(stdout: str) -> None:
    listed = _component_lines(stdout)
    for kind, names in BUILTINS.items():
        assert set(names) <= listed.get(kind, set()), f"built-in {kind}s {names} missing from:\n{stdout}"


# -- a third-party plugin through a real entry point ---------------------------------------------


def test_entry_point_plugin_is_listed_with_its_distribution(run_cli, blur_site: Path) -> None:
    result = run_cli("plugins", env={"PYTHONPATH": str(blur_site)})
    assert result.returncode == 0, result.stderr
    assert "blur  (thirdparty-blur 0.3.0, thirdparty_blur)" in result.stdout
    listed = _component_lines(result.stdout)
    assert "blur" in listed["defense"] and "uniform-noise" in listed["attack"]
    _assert_builtins_listed(result.stdout)
    assert "warning" not in result.stderr

    as_json = run_cli("plugins", "--json", env={"PYTHONPATH": str(blur_site)})
    assert as_json.returncode == 0, as_json.stderr
    plugins = {p["plugin"]: p for p in json.loads(as_json.stdout)}
    blur = plugins["blur"]
    assert blur["distribution"] == "thirdparty-blur"
    assert blur["version"] == "0.3.0"
    assert blur["module"] == "thirdparty_blur"
    assert blur["registered"] == {"defense": ["blur"], "attack": ["uniform-noise"]}
    assert blur["error"] is None
    # the built-ins come from this project's own distribution, through the same group
    assert plugins["defenses"]["distribution"] == "codefend-bench"
    assert "jpeg" in plugins["defenses"]["registered"]["defense"]


def test_without_the_entry_point_the_plugin_is_absent(run_cli) -> None:
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    assert "blur" not in {p["plugin"] for p in json.loads(result.stdout)}


def test_entry_point_plugin_runs_from_a_suite(run_cli, blur_site: Path, trained_home: Path, tmp_path: Path) -> None:
    suite = FIXTURES / "suites" / "thirdparty.yaml"
    env = {"PYTHONPATH": str(blur_site)}
    validated = run_cli("validate", suite, env=env)
    assert validated.returncode == 0, validated.stderr
    assert "shapes-vlm | vqav2:test | uniform-noise@linf-8 | blur" in validated.stdout
    assert "6 cells" in validated.stdout

    out = tmp_path / "out"
    result = run_cli("run", suite, "--out", out, "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    board = (out / "leaderboard.md").read_text()
    assert board in result.stdout
    rows = [line for line in board.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[:4] == ["| defense", "clean", "pgd@linf-8", "uniform-noise@linf-8"]
    assert any(line.startswith("| blur | ") for line in rows), board
    assert any(line.startswith("| none | ") for line in rows), board
    assert "6 cells, 24 rows computed, 0 reused" in result.stderr

    # provenance records which distribution and version provided the plugin
    with sqlite3.connect(out / "store.sqlite") as db:
        (provenance,) = db.execute("SELECT provenance FROM runs").fetchone()
        defenses = {row[0] for row in db.execute("SELECT DISTINCT defense FROM results")}
    recorded = json.loads(provenance)["plugins"]["blur"]
    assert (recorded["distribution"], recorded["version"]) == ("thirdparty-blur", "0.3.0")
    assert defenses == {"none", "blur"}


def test_entry_point_plugin_parameters_are_validated(run_cli, blur_site: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((FIXTURES / "suites" / "thirdparty.yaml").read_text().replace("sigma: 1/2", "sigmaa: 2"))
    result = run_cli("validate", bad, env={"PYTHONPATH": str(blur_site)})
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}: defenses[1].params.sigmaa: ")
    assert "allowed parameters: sigma" in result.stderr


@pytest.mark.usefixtures("fresh_plugins")
def test_third_party_float_parameters_accept_fractions(blur_site: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(blur_site))
    monkeypatch.delitem(sys.modules, "thirdparty_blur", raising=False)
    plugins = load_plugins()
    monkeypatch.delitem(sys.modules, "thirdparty_blur", raising=False)
    entry = plugins.defenses.get("blur")
    assert (entry.plugin, entry.distribution, entry.version) == ("blur", "thirdparty-blur", "0.3.0")
    blur = plugins.defenses.create("blur", {"sigma": "1/2"})
    assert blur.sigma == 0.5
    with pytest.raises(ParamError, match="sigma"):
        plugins.defenses.create("blur", {"sigma": "wide"})


# -- broken plugins --------------------------------------------------------------------------------


def test_broken_plugins_warn_and_the_others_still_load(run_cli, broken_site: Path) -> None:
    env = {"PYTHONPATH": str(broken_site)}
    result = run_cli("plugins", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("'broken_import'" in w and "ImportError: boom" in w for w in warnings), result.stderr
    assert any("'broken_register'" in w and "register_defenses" in w and "registration exploded" in w
               for w in warnings), result.stderr
    assert "Traceback" not in result.stderr
    _assert_builtins_listed(result.stdout)
    assert "broken_import  (broken-plugins 0.1.0, broken_import)  [failed: ImportError: boom]" in result.stdout

    as_json = run_cli("plugins", "--json", env=env)
    assert as_json.returncode == 0
    plugins = {p["plugin"]: p for p in json.loads(as_json.stdout)}
    assert plugins["broken_import"]["error"] == "ImportError: boom"
    assert plugins["broken_import"]["registered"] == {}
    assert plugins["broken_register"]["error"] == "RuntimeError: registration exploded"
    # what it registered before failing stays registered (the warning says "only part")
    assert plugins["broken_register"]["registered"] == {"defense": ["halfway"]}
    assert plugins["attacks"]["error"] is None and "pgd" in plugins["attacks"]["registered"]["attack"]


def test_broken_plugins_do_not_stop_a_suite(run_cli, broken_site: Path) -> None:
    result = run_cli("validate", FIXTURES / "suites" / "base.yaml", env={"PYTHONPATH": str(broken_site)})
    assert result.returncode == 0, result.stderr
    assert "4 cells" in result.stdout
    assert "warning: plugin 'broken_import'" in result.stderr


def test_entry_point_name_clash_does_not_knock_out_the_builtins(run_cli, tmp_path: Path) -> None:
    """Entry-point names are only unique within a distribution. A third-party package that exposes
    its plugin as ``defenses = ...`` (mirroring the built-ins' own entry-point names) must not
    unregister the built-in defenses, and every component must be attributed to its real
    distribution."""
    site = _install(tmp_path / "site", "shadow-dist", "2.0.0", ["thirdparty_blur"], {"defenses": "thirdparty_blur"})
    env = {"PYTHONPATH": str(site)}
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    registered: dict[str, str] = {}  # defense -> distribution that registered it
    for plugin in json.loads(result.stdout):
        for name in plugin["registered"].get("defense", []):
            registered[name] = plugin["distribution"]
    assert registered.get("none") == "codefend-bench" and registered.get("jpeg") == "codefend-bench", registered
    assert registered.get("blur", "shadow-dist") == "shadow-dist", registered
    validated = run_cli("validate", FIXTURES / "suites" / "base.yaml", env=env)
    assert validated.returncode == 0, validated.stderr


def _failing_plugin() -> types.ModuleType:
    module = types.ModuleType("inproc_failing")

    @hookimpl
    def register_defenses(register):
        raise KeyError("no such thing")

    module.register_defenses = register_defenses
    return module


@pytest.mark.usefixtures("fresh_plugins")
def test_in_process_load_warns_for_each_broken_plugin(broken_site: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(broken_site))
    for name in ("broken_import", "broken_register"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(PluginLoadWarning) as record:
        plugins = load_plugins(extra=[("inproc_failing", _failing_plugin())], use_entry_points=True)
    for name in ("broken_import", "broken_register"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    messages = [str(w.message) for w in record]
    assert any("'broken_import'" in m and "boom" in m for m in messages), messages
    assert any("'broken_register'" in m and "registration exploded" in m for m in messages), messages
    assert any("'inproc_failing'" in m and "KeyError" in m for m in messages), messages
    assert all(issubclass(w.category, PluginLoadWarning) for w in record)

    assert plugins.plugins["broken_import"].error == "ImportError: boom"
    assert plugins.plugins["broken_import"].distribution == "broken-plugins"
    assert plugins.plugins["inproc_failing"].distribution == "(in-process)"
    # the other plugins still work
    for kind, names in BUILTINS.items():
        assert set(names) <= set(plugins.registry(kind).names())
    pgd = plugins.attacks.create("pgd", {"steps": 3, "step_size": "1/255"})
    assert (pgd.steps, pgd.step_size) == (3, pytest.approx(1 / 255))
    assert "halfway" in plugins.defenses


def test_a_duplicate_name_warns_and_keeps_the_first(monkeypatch) -> None:
    module = types.ModuleType("impostor")

    class Impostor(Defense):
        pass

    @hookimpl
    def register_defenses(register):
        register("jpeg", Impostor, description="not really jpeg")
        register("impostor-ok", Impostor)

    module.register_defenses = register_defenses
    with pytest.warns(PluginLoadWarning, match="'jpeg' is registered by both plugin 'defenses' and plugin 'impostor'"):
        plugins = load_plugins(extra=[("impostor", module)])
    assert plugins.defenses.get("jpeg").plugin == "defenses"
    assert plugins.plugins["impostor"].registered == {"defense": ["impostor-ok"]}


def test_in_process_plugins_only(monkeypatch) -> None:
    module = types.ModuleType("only")

    @hookimpl
    def register_defenses(register):
        register("solo", Defense, description="the base class as a no-op defense")

    module.register_defenses = register_defenses
    plugins = load_plugins(extra=[("only", module)], use_entry_points=False)
    assert plugins.defenses.names() == ["solo"]
    assert plugins.attacks.names() == []


# -- names and parameters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtins():
    return load_plugins()


def test_unknown_name_suggests_the_closest(builtins) -> None:
    with pytest.raises(UnknownNameError) as info:
        builtins.defenses.create("jepg")
    assert "unknown defense 'jepg' — did you mean 'jpeg'?" in str(info.value)
    assert "registered defenses: " in str(info.value) and "jpeg" in str(info.value)
    with pytest.raises(UnknownNameError, match="unknown attack 'pdg' — did you mean 'pgd'?"):
        builtins.attacks.create("pdg")
    with pytest.raises(UnknownNameError) as info:
        builtins.victims.get("qwerty-model-9000")
    assert "did you mean" not in str(info.value)
    assert "shapes-vlm" in str(info.value)


def test_bad_parameters_list_the_allowed_ones(builtins) -> None:
    with pytest.raises(ParamError) as info:
        builtins.attacks.create("pgd", {"stepz": 3})
    message = str(info.value)
    assert "bad parameters for attack 'pgd'" in message
    assert "'stepz': is not a parameter of this attack" in message
    assert "(allowed parameters: random_start, step_size, steps)" in message
    assert info.value.problems[0][0] == "stepz"

    with pytest.raises(ParamError) as info:
        builtins.attacks.create("pgd", {"steps": "many"})
    assert info.value.problems[0][0] == "steps" and "'many'" in str(info.value)

    with pytest.raises(ParamError, match="allowed parameters: quality"):
        builtins.defenses.create("jpeg", {"qualty": 50})
    with pytest.raises(ParamError, match="allowed parameters: none"):
        builtins.defenses.create("none", {"strength": 1})


def test_parameters_are_coerced(builtins) -> None:
    pgd = builtins.attacks.create("pgd", {"step_size": "2/255", "steps": "7"})
    assert pgd.step_size == pytest.approx(2 / 255) and pgd.steps == 7
    with pytest.raises(ParamError, match="fraction like 8/255"):
        builtins.attacks.create("pgd", {"step_size": "two/255"})


# -- plugins loaded without packaging: --plugin and CODEFEND_PLUGINS ---------------------------------


def test_a_plugin_file_loads_with_the_flag_or_the_environment(run_cli, tmp_path: Path, monkeypatch, fresh_plugins) -> None:
    plugin = tmp_path / "my_blur.py"
    shutil.copy(FIXTURES / "plugins" / "thirdparty_blur.py", plugin)
    result = run_cli("plugins", "--json", "--plugin", plugin)  # the console script, end to end
    assert result.returncode == 0, result.stderr
    listed = {p["plugin"]: p for p in json.loads(result.stdout)}
    assert listed["my_blur"]["registered"] == {"defense": ["blur"], "attack": ["uniform-noise"]}
    assert listed["my_blur"]["distribution"] == "(--plugin)" and listed["my_blur"]["error"] is None
    assert "jpeg" in listed["defenses"]["registered"]["defense"]  # the built-ins still load

    from harness.plugins import get_plugins

    monkeypatch.setenv("CODEFEND_PLUGINS", f"{plugin}{os.pathsep}")
    assert "blur" in get_plugins().defenses.names()  # the environment feeds the process-wide set
    # a module name resolves from the working directory, as `python -m` would
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_blur", raising=False)
    by_name = load_plugins(specs=["my_blur"])
    assert by_name.plugins["my_blur"].registered["defense"] == ["blur"]


def test_a_worker_rebuilds_the_plugin_set_from_the_specs(tmp_path: Path, fresh_plugins) -> None:
    """What crosses to a worker process (or a Ray worker) is the spec, not the module: the worker's
    plugin set, rebuilt from the node call, has the plugin's components."""
    from harness.runner import NodeCall, _plugins_for, _worker_plugins

    plugin = tmp_path / "my_blur.py"
    shutil.copy(FIXTURES / "plugins" / "thirdparty_blur.py", plugin)
    plugins = load_plugins(specs=[str(plugin)])
    extra, use_entry_points, specs = plugins.recipe()
    assert specs == (str(plugin),)
    _worker_plugins.clear()
    try:
        rebuilt = _plugins_for(NodeCall("rows", None, extra, use_entry_points, specs))
        assert "blur" in rebuilt.defenses.names() and "uniform-noise" in rebuilt.attacks.names()
        assert "jpeg" in rebuilt.defenses.names()
    finally:
        _worker_plugins.clear()


def test_a_bad_plugin_spec_or_an_empty_module_is_a_warning_naming_it(run_cli, tmp_path: Path) -> None:
    (tmp_path / "forgot_hookimpl.py").write_text(
        "def register_defenses(register):\n    raise AssertionError('never called without @hookimpl')\n")
    result = run_cli("plugins", "--plugin", tmp_path / "forgot_hookimpl.py", "--plugin", tmp_path / "nowhere.py",
                     "--plugin", "no_such_module_anywhere")
    assert result.returncode == 0, result.stderr
    assert "plugin 'forgot_hookimpl'" in result.stderr and "registered nothing" in result.stderr
    assert "@hookimpl" in result.stderr
    assert "no such plugin file" in result.stderr and "nowhere.py" in result.stderr
    assert "no module named 'no_such_module_anywhere'" in result.stderr
    _assert_builtins_listed(result.stdout)


def test_a_builtin_attack_module_that_fails_to_import_takes_only_its_own_attacks(monkeypatch) -> None:
    """ART missing: its three attacks go, with a warning naming the module; pgd, apgd and the
    rest stay."""
    monkeypatch.setitem(sys.modules, "art", None)  # as if ART were not installed
    with pytest.warns(PluginLoadWarning, match=r"attacks\.art_attacks cannot be imported \(no module named 'art'\), "
                                               r"so art-pgd, art-fgsm, art-square are not registered"):
        plugins = load_plugins()
    names = set(plugins.attacks.names())
    assert {"none", "pgd", "apgd", "ensemble", "mf-ii", "typographic"} <= names
    assert not names & {"art-pgd", "art-fgsm", "art-square"}
    assert plugins.plugins["attacks"].registered["attack"][:2] == ["none", "pgd"]


def test_listing_plugins_and_checking_names_import_no_model_library(tmp_path: Path) -> None:
    """Components register by import path: `codefend plugins` and a suite's unknown name answer
    without torch (item 6 of the bad-input issue: a CLI that answers in a second)."""
    suite = tmp_path / "typo.yaml"
    suite.write_text("name: typo\nvictims: [{name: shapes-vlm}]\ntasks: [{name: vqav2, data: shapes, n: 2}]\n"
                     "threat_models: {linf-4: {norm: linf, eps: 4/255}}\n"
                     "attacks: [{name: pgd, threats: [linf-4]}]\ndefenses: [{name: jpg}]\n")
    probe = ("import sys\nfrom codefend import cli\ncode = cli.main(sys.argv[1:])\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'art', 'scipy') if m in sys.modules)\n"
             "print('heavy:', heavy, 'code:', code)\n")
    for argv in (["plugins"], ["validate", str(suite)]):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert "heavy: [] code:" in result.stdout, (argv, result.stdout[-500:], result.stderr[-2000:])
    assert "defenses[0].name: unknown defense 'jpg' — did you mean 'jpeg'?" in result.stderr


def test_a_component_whose_module_breaks_fails_when_used_naming_itself(monkeypatch) -> None:
    plugins = load_plugins()
    monkeypatch.setitem(sys.modules, "attacks.typographic", None)  # found at registration, broken on import
    with pytest.raises(RegistryError, match=r"attack 'typographic' \(plugin 'attacks', codefend-bench .*\) cannot be "
                                            r"loaded from attacks\.typographic:Typographic: .*Install what it needs"):
        plugins.attacks.create("typographic", {})


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from codefend import cli

    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_plugins_params_lists_each_parameter_with_its_default(capsys, fresh_plugins) -> None:
    code, out = _main(["plugins", "--params"], capsys)
    assert code == 0
    lines = out.splitlines()
    diffpure = lines.index(next(line for line in lines if line.split()[:2] == ["defense", "diffpure"]))
    block = lines[diffpure + 1 : diffpure + 9]
    assert any(line.strip().startswith("t_star:") and line.endswith("= 0.1") for line in block), block
    assert any(line.strip() == "model_id: str | None = None" for line in block), block
    code, out = _main(["plugins", "--params", "--json"], capsys)
    pgd = next(p for p in json.loads(out) if p["plugin"] == "attacks")["params"]["attack"]["pgd"]
    assert {"name": "steps", "type": "int", "default": "20"} in pgd


def test_components_that_create_components_use_the_set_they_were_created_from() -> None:
    """An ensemble's members and a purifier's training attacks come from the run's plugin set (an
    in-process or --plugin module included), not from a process-wide one."""
    from attacks.pgd import PGD

    module = types.ModuleType("pgd_copy_plugin")

    @hookimpl
    def register_attacks(register):
        register("pgd-copy", PGD, description="PGD under another name")

    module.register_attacks = register_attacks
    plugins = load_plugins(extra=[("pgd-copy", module)])
    ensemble = plugins.attacks.create("ensemble", {"members": [{"name": "pgd-copy", "params": {"steps": 2}}]})
    assert [name for name, _, _ in ensemble.member_attacks()] == ["pgd-copy"]
    purifier = plugins.defenses.create("codefend-purifier", {"train_attacks": [{"attack": "pgd-copy", "eps": "8/255"}]})
    assert purifier.plugins is plugins
    without = load_plugins()
    with pytest.raises(ValueError, match="members\\[0\\]: unknown attack 'pgd-copy'"):
        without.attacks.create("ensemble", {"members": [{"name": "pgd-copy"}]})
    with pytest.raises(ValueError, match="train_attacks\\[0\\].*unknown attack 'pgd-copy'"):
        without.defenses.create("codefend-purifier", {"train_attacks": [{"attack": "pgd-copy", "eps": "8/255"}]})
