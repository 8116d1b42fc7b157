"""Suites: every mistake is one ``error:`` paragraph naming the file and the key; good suites expand.

Most cases call ``codefend.cli.main`` in-process (the same code the console script runs, minus the
interpreter start-up); a few go through the real ``codefend`` executable.
"""

from __future__ import annotations

import shutil
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from codefend import cli
from harness.plugins import load_plugins
from harness.suite import SuiteError, expand, load_suite

# cli.main uses the process-wide plugin set: load it afresh for each test
pytestmark = pytest.mark.usefixtures("fresh_plugins")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bad:
    id: str
    yaml: str
    key: str  # the key path the message must name ("" when the problem is the file itself)
    says: tuple[str, ...]  # fragments the message must contain (what was wrong, what is allowed)
    extra_files: tuple[tuple[str, str], ...] = ()
    blamed: str = "suite.yaml"  # the file the message must name


CASES = [
    Bad("unknown-defense", "include: base.yaml\ndefenses: [{name: none}, {name: jepg}]",
        "defenses[1].name", ("unknown defense 'jepg'", "did you mean 'jpeg'?", "registered defenses:")),
    Bad("unknown-attack", "include: base.yaml\nattacks: [{name: none}, {name: pdg, threats: [linf-8]}]",
        "attacks[1].name", ("unknown attack 'pdg'", "did you mean 'pgd'?")),
    Bad("unknown-victim", "include: base.yaml\nvictims: [{name: shapes-vml}]",
        "victims[0].name", ("unknown victim 'shapes-vml'", "did you mean 'shapes-vlm'?")),
    Bad("eps-not-a-number", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: eight/255}",
        "threat_models.linf-8.eps", ("'eight/255'", "not a number or a fraction like 8/255")),
    Bad("eps-negative", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: -8/255}",
        "threat_models.linf-8.eps", ("eps must be >= 0",)),
    Bad("eps-sweep-bad-entry", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: [2/255, two/255]}",
        "threat_models.linf-8.eps", ("'two/255'", "fraction like 8/255")),
    Bad("missing-tasks", "name: x\nvictims: [{name: shapes-vlm}]\nattacks: [{name: none}]\ndefenses: [{name: none}]",
        "tasks", ("is required but missing",)),
    Bad("missing-victim-name", "include: base.yaml\nvictims: [{params: {steps: 100}}]",
        "victims[0].name", ("is required but missing",)),
    Bad("n-not-an-int", "include: base.yaml\ntasks: [{name: vqav2, data: shapes, n: many}]",
        "tasks[0].n", ("valid integer", "'many'")),
    Bad("n-zero", "include: base.yaml\ntasks: [{name: vqav2, data: shapes, n: 0}]",
        "tasks[0].n", ("greater than 0",)),
    Bad("batch-size-negative", "include: base.yaml\nbatch_size: -1",
        "batch_size", ("greater than 0", "-1")),
    Bad("victims-not-a-list", "include: base.yaml\nvictims: shapes-vlm",
        "victims", ("valid list", "'shapes-vlm'")),
    Bad("include-missing", "include: nowhere/base.yaml\nname: x",
        "include", ("nowhere/base.yaml", "does not exist", "relative to the including file")),
    Bad("include-not-a-path", "include: {file: base.yaml}\nname: x",
        "include", ("must be a file path or a list of file paths",)),
    Bad("include-cycle", "include: cycle.yaml\nname: x",
        "include", ("include cycle", "suite.yaml -> ", "cycle.yaml"),
        extra_files=(("cycle.yaml", "include: suite.yaml\nseed: 3\n"),)),
    Bad("top-level-typo-with-include", "include: base.yaml\ndefences: [{name: none}]",
        "defences", ("is not a known key", "did you mean 'defenses'?", "allowed keys here:")),
    Bad("attack-param-typo", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], params: {stepz: 3}}",
        "attacks[1].params.stepz", ("is not a parameter of this attack", "allowed parameters: random_start, step_size, steps")),
    Bad("attack-param-type", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], params: {steps: lots}}",
        "attacks[1].params.steps", ("valid integer", "'lots'")),
    Bad("attack-param-value", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], params: {steps: 0}}",
        "attacks[1].params", ("steps must be at least 1",)),
    Bad("task-param-typo", "include: base.yaml\ntasks: [{name: coco_captions, data: shapes, n: 4, params: {meteorr: false}}]",
        "tasks[0].params.meteorr", ("allowed parameters:", "meteor")),
    Bad("undeclared-threat", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-16]}",
        "attacks[1].threats[0]", ("unknown threat model 'linf-16'", "did you mean 'linf-8'?", "declared under threat_models: linf-8")),
    Bad("attack-without-threat", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd}",
        "attacks[1].threats", ("needs at least one threat model",)),
    Bad("clean-attack-with-threat", "include: base.yaml\nattacks:\n  - {name: none, threats: [linf-8]}",
        "attacks[0].threats", ("does not use a threat model",)),
    Bad("adaptive-clean", "include: base.yaml\nattacks:\n  - {name: none, adaptive: true}",
        "attacks[0].adaptive", ("cannot adapt to a defense",)),
    Bad("eot-without-adaptive", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], eot: 4}",
        "attacks[1].eot", ("only applies with adaptive: true",)),
    Bad("attack-limited-to-unknown-defense",
        "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], defenses: [jepg]}",
        "attacks[1].defenses[0]", ("unknown defense 'jepg'", "did you mean 'jpeg'?", "the suite's defenses: none, jpeg")),
    Bad("attack-limited-to-unknown-task",
        "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: [linf-8], tasks: [vqa]}",
        "attacks[1].tasks[0]", ("unknown task 'vqa'", "did you mean", "vqav2")),
    Bad("purifier-bad-training-attack",
        "include: base.yaml\ndefenses:\n  - {name: codefend-purifier, params: {train_attacks: [{attack: pgd, eps: 12}]}}",
        "defenses[0].params", ("eps must be in (0, 1]",)),
    Bad("duplicate-defense", "include: base.yaml\ndefenses: [{name: jpeg}, {name: jpeg, params: {quality: 50}}]",
        "defenses", ("duplicate entries ['jpeg']", "distinct 'id'")),
    Bad("ensemble-member-typo",
        "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: ensemble, threats: [linf-8], params: {members: [{name: pdg}]}}",
        "attacks[1].params", ("members[0]: unknown attack 'pdg'", "did you mean 'pgd'?")),
    Bad("unknown-executor", "include: base.yaml\nexecutor: locl",
        "executor.name", ("unknown executor 'locl'", "did you mean 'local'?")),
    Bad("bad-norm", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf2, eps: 8/255}",
        "threat_models.linf-8.norm", ("'linf2'", "'linf' or 'l2'")),
    Bad("eps-8-means-8/255", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: 8}",
        "threat_models.linf-8.eps", ("eps 8 is above 1", "pixels are in [0,1]", "e.g. 8/255")),
    Bad("eps-nan", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: .nan}",
        "threat_models.linf-8.eps", ("eps must be a finite number",)),
    Bad("eps-inf-l2", "include: base.yaml\nthreat_models:\n  l2-1: {norm: l2, eps: .inf}",
        "threat_models.l2-1.eps", ("eps must be a finite number",)),
    Bad("eps-sweep-above-1", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: [2/255, 4]}",
        "threat_models.linf-8.eps", ("eps 4 is above 1",)),
    Bad("attacks-twice", "include: base.yaml\nattacks: [{name: none}]\nattacks: [{name: pgd, threats: [linf-8]}]",
        "", ("the key 'attacks' is written twice", "first on line 2", "line 3")),
    Bad("seed-negative", "include: base.yaml\nseed: -1",
        "seed", ("greater than or equal to 0", "-1")),
    Bad("name-escapes-results", "include: base.yaml\nname: ../../escaped",
        "name", ("'../../escaped' is not a safe suite name", "results folder")),
    Bad("name-empty", "include: base.yaml\nname: ''",
        "name", ("is not a safe suite name",)),
    Bad("data-empty", "include: base.yaml\ntasks: [{name: vqav2, data: '', split: test, n: 4}]",
        "tasks[0].data", ("data is empty", "'shapes' for the built-in offline world")),
    Bad("invalid-yaml", "name: x\nvictims: [{name: shapes-vlm}\ntasks: []\n",
        "", ("not valid YAML", "line 3")),
    Bad("top-level-list", "- name: x\n- victims: []\n",
        "", ("top level must be a mapping", "got list")),
    Bad("invalid-yaml-in-include", "include: broken.yaml\nname: x",
        "", ("not valid YAML",), extra_files=(("broken.yaml", "seed: [1, 2\n"),), blamed="broken.yaml"),
    # -- numbers, names and types anywhere in the suite
    Bad("eps-zero-denominator", "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, eps: 8/0}",
        "threat_models.linf-8.eps", ("8/0",)),
    Bad("n-negative", "include: base.yaml\ntasks: [{name: vqav2, data: shapes, n: -3}]",
        "tasks[0].n", ("greater than 0",)),
    Bad("seed-not-an-int", "include: base.yaml\nseed: zero",
        "seed", ("valid integer", "'zero'")),
    Bad("batch-size-text", "include: base.yaml\nbatch_size: many",
        "batch_size", ("valid integer",)),
    Bad("threats-not-names", "include: base.yaml\nattacks:\n  - {name: none}\n  - {name: pgd, threats: {linf-8: 1}}",
        "attacks[1].threats", ("valid list",)),
    Bad("unknown-task", "include: base.yaml\ntasks: [{name: vqa2, data: shapes, n: 4}]",
        "tasks[0].name", ("unknown task 'vqa2'", "did you mean 'vqav2'?")),
    Bad("victim-param-typo", "include: base.yaml\nvictims: [{name: shapes-vlm, params: {stepz: 100}}]",
        "victims[0].params.stepz", ("is not a parameter of this victim",)),
    Bad("victim-param-value", "include: base.yaml\nvictims: [{name: shapes-vlm, params: {steps: 0}}]",
        "victims[0].params", ("steps must be an integer >= 1",)),
    Bad("victim-checkpoint-missing", "include: base.yaml\nvictims: [{name: shapes-vlm, params: {checkpoint: /nonexistent/vlm}}]",
        "victims[0].params", ("/nonexistent/vlm", "checkpoint")),
    Bad("victim-device-absent", "include: base.yaml\nvictims: [{name: shapes-vlm, params: {steps: 100, device: 'cuda:7'}}]",
        "victims[0].params.device", ("cuda:7",)),
    Bad("defense-param-typo", "include: base.yaml\ndefenses: [{name: none}, {name: jpeg, params: {qualty: 75}}]",
        "defenses[1].params.qualty", ("is not a parameter of this defense", "did you mean 'quality'?")),
    Bad("defense-param-out-of-range", "include: base.yaml\ndefenses: [{name: none}, {name: jpeg, params: {quality: 0}}]",
        "defenses[1].params.quality", ("greater than or equal to 1", "got 0")),
    Bad("defense-id-empty", "include: base.yaml\ndefenses: [{name: none}, {name: jpeg, id: ''}]",
        "defenses[1].id", ("empty",)),
    Bad("task-on-bad-sample-value", "include: base.yaml\ntasks: [{name: vqav2, data: shapes, n: 4, params: {on_bad_sample: ignore}}]",
        "tasks[0].params.on_bad_sample", ("'fail'", "'skip'")),
    Bad("reserved-threat-name", "include: base.yaml\nthreat_models:\n  probe-eps0: {norm: linf, eps: 8/255}\n"
        "attacks:\n  - {name: none}\n  - {name: pgd, threats: [probe-eps0]}",
        "threat_models.probe-eps0", ("probe-eps0",)),
    Bad("executor-workers-zero", "include: base.yaml\nexecutor: {name: local, params: {workers: 0}}",
        "executor.params.workers", ("greater than or equal to 1",)),
    Bad("adaptive-eot-zero", "include: base.yaml\nadaptive: {eot: 0}",
        "adaptive.eot", ("greater than 0",)),
    Bad("adaptive-unknown-threat", "include: base.yaml\nadaptive: {enabled: true, threats: [linf-16]}",
        "adaptive.threats[0]", ("unknown threat model 'linf-16'",)),
    Bad("adaptive-key-typo", "include: base.yaml\nadaptive: {samplez: 4}",
        "adaptive.samplez", ("is not a known key", "did you mean 'samples'?")),
    # -- files that are not what a suite is
    Bad("empty-file", "", "", ("empty",)),
    Bad("include-latin1", "include: latin.yaml\nname: x", "", ("not UTF-8",),
        extra_files=(("latin.yaml", "seed: 0 # caf\udce9\n"),), blamed="latin.yaml"),
    Bad("include-is-a-png", "include: picture.png\nname: x", "", ("not UTF-8",),
        extra_files=(("picture.png", "\udc89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),), blamed="picture.png"),
    Bad("anchor-bomb", "include: base.yaml\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]",
        "a", ("is not a known key",)),
]


def _write(tmp_path: Path, case: Bad) -> Path:
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    for name, text in case.extra_files:  # "\udcXX" in a case's text is the raw byte 0xXX
        (tmp_path / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    path = tmp_path / "suite.yaml"
    path.write_bytes(case.yaml.encode("utf-8", "surrogateescape"))
    return path


def _run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # cli.main replaces it
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_paragraph_error(stderr: str, file: Path, key: str, says: tuple[str, ...]) -> None:
    text = stderr.strip()
    assert text.startswith("error: "), stderr
    assert "Traceback" not in text, stderr
    assert all(line.strip() for line in text.splitlines()), f"not one paragraph:\n{stderr}"
    assert text.count("error:") == 1, stderr
    assert len(text) <= 2000, f"an error of {len(text)} characters is not one a user reads:\n{text[:500]}"
    where = f"error: {file}: {key}: " if key else f"error: {file}: "
    assert text.startswith(where), f"expected the message to start with {where!r}:\n{stderr}"
    for fragment in says:
        assert fragment in text, f"{fragment!r} missing from:\n{stderr}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_suite_is_one_paragraph_naming_the_key(case: Bad, tmp_path: Path, capsys, monkeypatch) -> None:
    path = _write(tmp_path, case)
    code, out, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2, (out, err)
    assert out == ""
    assert_one_paragraph_error(err, (tmp_path / case.blamed).resolve(), case.key, case.says)


TYPO_OF_REQUIRED_KEY = {
    "top-level": ("defences", "did you mean 'defenses'?", textwrap.dedent("""\
        name: typo
        victims: [{name: shapes-vlm}]
        tasks: [{name: vqav2, data: shapes, n: 4}]
        attacks: [{name: none}]
        defences: [{name: none}]
    """)),
    "nested": ("threat_models.linf-8.epsilon", "did you mean 'eps'?",
               "include: base.yaml\nthreat_models:\n  linf-8: {norm: linf, epsilon: 8/255}\n"),
}


@pytest.mark.parametrize("where", list(TYPO_OF_REQUIRED_KEY))
def test_typo_of_a_required_key_names_the_typo(where: str, tmp_path: Path, capsys, monkeypatch) -> None:
    """A user who writes ``defences:`` (or ``epsilon:``) must hear about that key, with 'did you mean'.

    The typo makes pydantic report two problems: the required key is missing, and the typed key
    is unknown. The typo is the actual mistake; the message must name it (today it names only the
    missing key, says nothing about the typo and offers no suggestion).
    """
    key, hint, text = TYPO_OF_REQUIRED_KEY[where]
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    code, _, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, path.resolve(), key, (hint,))


def test_threat_model_named_clean_is_rejected(tmp_path: Path, capsys, monkeypatch) -> None:
    """``clean`` is the name of the no-attack condition (CLEAN_THREAT): rows of an attack on a
    threat model called ``clean`` are indistinguishable from clean rows (``condition_of`` maps
    them to the clean column, overwriting the real clean scores) and the cell label drops the
    threat. The suite must be refused, naming the key."""
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "suite.yaml"
    path.write_text("include: base.yaml\nthreat_models:\n  clean: {norm: linf, eps: 8/255}\n"
                    "attacks:\n  - {name: none}\n  - {name: pgd, threats: [clean]}\n")
    code, out, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2, out
    assert_one_paragraph_error(err, path.resolve(), "threat_models.clean", ("clean",))


def test_missing_suite_file(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "nope.yaml"
    code, _, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, path.resolve(), "", ("suite file does not exist",))


def test_run_reports_suite_errors_before_any_compute(tmp_path: Path, capsys, monkeypatch) -> None:
    path = _write(tmp_path, CASES[0])
    out = tmp_path / "out"
    code, _, err = _run_main(["run", str(path), "--out", str(out), "--quiet"], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, path.resolve(), "defenses[1].name", ("did you mean 'jpeg'?",))
    assert not out.exists(), "a suite that does not validate must not create a result store"


def test_console_script_exit_status_and_stderr(tmp_path: Path, run_cli) -> None:
    """The installed executable, end to end (every other case runs ``cli.main`` in-process)."""
    case = next(c for c in CASES if c.id == "unknown-defense")
    path = _write(tmp_path, case)
    result = run_cli("validate", path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert_one_paragraph_error(result.stderr, (tmp_path / case.blamed).resolve(), case.key, case.says)


# -- suites that are valid ----------------------------------------------------------------------------


def test_quickstart_validates_with_cells_and_pass_estimate(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    code, out, err = _run_main(["validate", "suites/quickstart.yaml"], capsys, monkeypatch)
    assert code == 0, err
    assert "suite 'quickstart' (suites/quickstart.yaml) is valid" in out
    assert "matrix: 1 victim(s) x 2 task(s) x 3 attack condition(s) x 4 defense(s)" in out
    cells = [line.strip() for line in out.splitlines() if line.startswith("  shapes-vlm | ")]
    # 24 of the suite's own; 32 of the standard adaptive protocol (adaptive, its N-draw
    # evaluation, clean N-draw and the convergence re-run, x 2 tasks x 4 defenses)
    assert len(cells) == 56 and len(set(cells)) == 56
    assert "shapes-vlm | coco_captions:test | pgd@linf-8 | codefend-purifier" in cells
    assert "shapes-vlm | coco_captions:test | adaptive@linf-8 | diffpure" in cells
    assert "56 cells, 2696 sample evaluations" in out
    # oblivious: 190 samples x 2 threat models x PGD-20 (21 forward, 20 backward), shared by all
    # defenses; adaptive: 16 samples per task x APGD-20 per defense, restarted once (at most twice
    # the runs), x EOT 2 x (1 + 2 UNet calls) through diffpure and the purifier, and a judgement
    # per run (a generation per judging draw: 4 through the two stochastic defenses); the re-run
    # at 40 steps, 3 restarts and EOT 4 on 4, judged over 4 draws of the two stochastic defenses;
    # a DLR run's examples are compared on cross-entropy: one forward pass (x EOT) per DLR restart
    assert ("estimated passes: 64268 attack forward + 58800 attack backward + 3560 defense + "
            "3128 generation = 129756") in out
    assert ("standard adaptive protocol: apgd {'steps': 20, 'restarts': 1, 'objectives': ['ce', 'dlr']}, "
            "EOT 2 (stochastic defenses)") in out
    assert "work graph: 204 nodes (3 train, 1 victim, 16 attack, 128 rows, 56 score), executor local {'workers': 2}" in out
    assert "gradient routes: none: exact; jpeg: bpda-approximate; diffpure: exact, EOT 2; codefend-purifier: exact, EOT 2" in out
    assert err.strip() == ""


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def test_eps_sweep_expands_into_one_threat_model_per_value(tmp_path: Path, plugins, capsys, monkeypatch) -> None:
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""\
        include: base.yaml
        threat_models:
          linf: {norm: linf, eps: [2/255, 4/255]}
          l2-half: {norm: l2, eps: 0.5}
        attacks:
          - name: none
          - {name: pgd, threats: [linf, l2-half], params: {steps: 2}}
    """))
    suite = load_suite(path, plugins)
    threats = suite.threats()
    assert {k: (t.norm, t.eps) for k, t in threats.items() if k != "linf-8"} == {
        "linf@2/255": ("linf", pytest.approx(2 / 255)),
        "linf@4/255": ("linf", pytest.approx(4 / 255)),
        "l2-half": ("l2", 0.5),
    }
    assert [t.name for t in suite.threats_of(suite.attacks[1])] == ["linf@2/255", "linf@4/255", "l2-half"]
    cells = expand(suite)
    assert len(cells) == (1 + 3) * 2
    assert sum(c.threat.name.startswith("linf@") for c in cells) == 4

    code, out, _ = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 0
    assert "shapes-vlm | vqav2:test | pgd@linf@2/255 | jpeg" in out
    assert "shapes-vlm | vqav2:test | pgd@linf@4/255 | none" in out
    assert "x 4 attack condition(s) x" in out and "8 cells" in out


def test_attack_limited_to_some_defenses_and_tasks(tmp_path: Path, plugins) -> None:
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "limited.yaml"
    path.write_text(textwrap.dedent("""\
        include: base.yaml
        tasks:
          - {name: vqav2, data: shapes, n: 4}
          - {name: coco_captions, data: shapes, n: 4}
        attacks:
          - name: none
          - {name: pgd, threats: [linf-8], params: {steps: 2}}
          - {name: pgd, threats: [linf-8], params: {steps: 2}, adaptive: true, defenses: [jpeg], tasks: [vqav2]}
    """))
    cells = expand(load_suite(path, plugins))
    adaptive = [c for c in cells if c.attack.adaptive]
    assert [(c.task.name, c.defense.label) for c in adaptive] == [("vqav2", "jpeg")]
    assert len(cells) == 2 * 2 * 2 + 1


def test_attack_limited_to_some_victims_is_transfer_only_where_its_surrogate_is_another(
        tmp_path: Path, plugins, capsys, monkeypatch) -> None:
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "scoped.yaml"
    path.write_text(textwrap.dedent("""\
        include: base.yaml
        victims:
          - {name: shapes-vlm, params: {steps: 100}}
          - {name: hf-llava, params: {model_id: /nowhere/llava}}
        attacks:
          - name: none
          - {name: pgd, threats: [linf-8], params: {steps: 2}, victims: [shapes-vlm]}
    """))
    cells = expand(load_suite(path, plugins))
    assert {c.victim.name for c in cells if c.attack.name == "pgd" and c.attack.role == "suite"} == {"shapes-vlm"}
    assert {c.victim.name for c in cells if c.attack.name == "none"} == {"shapes-vlm", "hf-llava"}
    bad = tmp_path / "typo.yaml"
    bad.write_text("include: base.yaml\nattacks:\n  - name: none\n  - {name: pgd, threats: [linf-8], victims: [shapes-vml]}\n")
    code, _, err = _run_main(["validate", str(bad)], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, bad.resolve(), "attacks[1].victims[0]", ("unknown victim 'shapes-vml'", "did you mean 'shapes-vlm'?"))


def test_paper_suite_mf_ii_is_transfer_from_the_other_victim(plugins) -> None:
    suite = load_suite(REPO / "suites" / "paper.yaml", plugins, device_notes=[])  # a suite for a GPU machine
    cells = [c for c in expand(suite) if c.attack.name == "mf-ii"]
    assert cells and all(c.attack.params["surrogate"] != c.victim.name for c in cells)
    assert {c.victim.name for c in cells} == {"hf-blip2", "hf-llava"}


def test_include_keys_are_overridden_by_the_including_file(tmp_path: Path, plugins) -> None:
    (tmp_path / "common").mkdir()
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "common" / "base.yaml")
    # an include inside common/ is resolved relative to common/, not to the top-level suite
    (tmp_path / "common" / "more.yaml").write_text("include: base.yaml\nseed: 5\nbatch_size: 3\n")
    path = tmp_path / "child.yaml"
    path.write_text(textwrap.dedent("""\
        include: common/more.yaml
        name: child
        batch_size: 7
        threat_models:
          linf-4: {norm: linf, eps: 4/255}
        defenses:
          - name: jpeg
            params: {quality: 50}
    """))
    suite = load_suite(path, plugins)
    assert suite.name == "child"
    assert suite.batch_size == 7  # child beats more.yaml beats base.yaml
    assert suite.seed == 5  # more.yaml beats base.yaml
    assert suite.victims[0].params == {"steps": 100}  # only in base.yaml
    assert set(suite.threat_models) == {"linf-8", "linf-4"}  # mappings merge by name
    assert [(d.name, d.params) for d in suite.defenses] == [("jpeg", {"quality": 50})]  # lists are replaced


def test_suite_name_defaults_to_the_file_stem(tmp_path: Path, plugins) -> None:
    path = tmp_path / "my-suite.yaml"
    path.write_text((FIXTURES / "suites" / "base.yaml").read_text().replace("name: base\n", ""))
    assert load_suite(path, plugins).name == "my-suite"


def test_suite_error_carries_file_and_key(tmp_path: Path, plugins) -> None:
    path = _write(tmp_path, next(c for c in CASES if c.id == "attack-param-typo"))
    with pytest.raises(SuiteError) as info:
        load_suite(path, plugins)
    assert info.value.file == str(path.resolve())
    assert info.value.key == "attacks[1].params.stepz"


def test_a_suite_that_is_not_utf8_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code, _, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, path, "", ("not UTF-8 text", "byte 9", "saved as UTF-8"))


def test_a_split_the_data_does_not_have_is_an_error_before_any_compute(tmp_path: Path, capsys, monkeypatch) -> None:
    """The shapes world is here, so a misspelt split is the suite's mistake (a suite for data on
    another machine validates with a note instead: tests/test_victim_hf.py's paper suite)."""
    shutil.copy(FIXTURES / "suites" / "base.yaml", tmp_path / "base.yaml")
    path = tmp_path / "suite.yaml"
    path.write_text("include: base.yaml\ntasks: [{name: vqav2, data: shapes, split: tset, n: 4}]")
    code, _, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2
    assert_one_paragraph_error(err, path, "tasks[0].split", ("split 'tset' not found",))


def test_a_device_is_checked_against_the_executor_the_command_line_chooses(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--executor ray` makes the devices the cluster's workers' (as `executor: ray` in the file
    does), so `cuda:7` is not this machine's business; with the local executor it is an error."""
    case = next(c for c in CASES if c.id == "victim-device-absent")
    path = _write(tmp_path, case)
    code, _, err = _run_main(["validate", str(path)], capsys, monkeypatch)
    assert code == 2 and "victims[0].params.device" in err
    code, out, err = _run_main(["validate", str(path), "--executor", "ray"], capsys, monkeypatch)
    assert code == 0, err
    assert "executor ray" in out


def test_a_file_that_is_not_a_result_store_is_one_error_line_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    import sqlite3

    garbage = tmp_path / "garbage" / "store.sqlite"
    garbage.parent.mkdir()
    garbage.write_text("not a database\n")
    code, _, err = _run_main(["leaderboard", str(garbage)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and "is not a result store" in err and "codefend run" in err
    assert garbage.read_text() == "not a database\n"  # the user's file is left as it was
    # a store written by another schema version of the harness
    other = tmp_path / "other" / "store.sqlite"
    other.parent.mkdir()
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('schema_version', '999')")
    code, _, err = _run_main(["leaderboard", str(other)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "written with store schema 999" in err and "new --out folder" in err
