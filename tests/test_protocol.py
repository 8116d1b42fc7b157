"""The standard adaptive protocol and the labels a board can trust.

One real in-process run (tiny shapes-vlm, 12 VQA questions) with the protocol on at a test
budget, plus an attack plugin that leaves its ball and a stochastic defense. It must:

- give every defense a standard adaptive number, and rank on it;
- show single-draw, N-draw and clean N-draw numbers for the stochastic defense;
- compute the convergence check;
- fail the cell of the attack that leaves its ball, naming it, and complete every other cell.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.adaptive import DefendedTarget, gradient_route
from harness.contracts import Attack, AttackResult, Defense, Sample, ThreatModel
from harness.hookspecs import hookimpl
from harness.plugins import load_plugins
from harness.runner import ThreatModelViolation, _score_cell, check_threat_model
from harness.records import ResultRow
from harness.store import Store
from harness.suite import SuiteError, load_suite
from leaderboard.aggregate import build_board
from leaderboard.entries import board_entries
from leaderboard.markdown import render_markdown

from suite_helpers import suite_run


class SloppyNoise(Attack):
    """Adds ±2/255 noise and never projects: inside an 8/255 ball, outside a 1/255 one (and at ε=0)."""

    requires = "gradients"

    def perturb(self, target, batch, threat, generator, progress=None):
        noise = (torch.rand(batch.pixels.shape, generator=generator) * 2 - 1) * (2 / 255)
        return AttackResult(pixels=(batch.pixels + noise).clamp(0, 1))


class CoinFlip(Defense):
    """Stochastic: blanks each image with probability 0.5 per draw (a sample is robust over N
    draws only if no draw blanks it)."""

    stochastic = True
    eot_samples = 2

    def purify(self, pixels, generator):
        blank = (torch.rand(pixels.shape[0], generator=generator) < 0.5).view(-1, 1, 1, 1)
        return torch.where(blank, torch.zeros_like(pixels), pixels)


@hookimpl
def register_attacks(register):
    register("sloppy-noise", SloppyNoise, description="leaves small balls (test)")


@hookimpl
def register_defenses(register):
    register("coin-flip", CoinFlip, description="blanks the image on some draws (test)")


SUITE = """\
name: protocol
seed: 0
batch_size: 12
victims:
  - {name: shapes-vlm, params: {steps: 100}}
tasks:
  - {name: vqav2, data: shapes, split: test, n: 12}
threat_models:
  linf-8: {norm: linf, eps: 8/255}
  linf-1: {norm: linf, eps: 1/255}
attacks:
  - name: none
  - {name: pgd, threats: [linf-8], params: {steps: 3}}
  - {name: sloppy-noise, threats: [linf-8, linf-1]}
defenses:
  - name: none
  - {name: jpeg, params: {quality: 75}}
  - name: coin-flip
adaptive: {params: {steps: 4}, eot: 2, draws: 4, samples: 10, threats: [linf-8], convergence: {samples: 6}}
"""


@pytest.fixture(scope="module")
def protocol_run(trained_home, tmp_path_factory):
    with suite_run(sys.modules[__name__], "protocol-test", SUITE, tmp_path_factory.mktemp("protocol")) as (summary, store):
        yield summary, store, build_board(store)


def test_an_attack_outside_its_ball_fails_its_cell_by_name_and_the_rest_completes(protocol_run) -> None:
    summary, store, board = protocol_run
    failed = [f for f in summary.failures if "sloppy-noise@linf-1" in f]
    assert len(failed) == 3, summary.failures  # one per defense
    assert "attack 'sloppy-noise' under threat 'linf-1'" in failed[0] and "left its ball" in failed[0]
    assert "measured linf norm" in failed[0]
    assert {f["cell"] for f in store.failures()} == {f.split(": ", 1)[0] for f in failed}
    (table,) = board.tables
    assert "sloppy-noise@linf-1" not in table.conditions and "sloppy-noise@linf-8" in table.conditions
    assert "failed" in render_markdown(board).split("##")[0]


def test_every_defense_faces_the_standard_adaptive_attack_and_the_board_ranks_on_it(protocol_run) -> None:
    _, _, board = protocol_run
    (table,) = board.tables
    assert table.adaptive == "adaptive@linf-8"
    for row in table.rows:
        adaptive = row.samples["adaptive@linf-8"]
        assert len(adaptive) == 10  # the declared subset, with its own interval
        assert row.scores["adaptive@linf-8"].ci is not None
        # the ranking key is the per-sample worst over the adaptive attack and the shared ones
        for sample, value in row.robust_samples.items():
            assert value <= adaptive[sample] + 1e-12
            assert value <= row.samples["pgd@linf-8"][sample] + 1e-12
        assert row.converged is not None
    keys = [row.robust.mean for row in table.rows]
    assert keys == sorted(keys, reverse=True)
    routes = table.details["adaptive@linf-8"].routes
    assert routes["jpeg"] == "bpda-approximate" and routes["none"] == "exact" and routes["coin-flip"] == "exact, EOT 2, samples judged over 4 draws"
    (entry,) = [e for e in board_entries(board) if e["defense"] == "none" and e["threat_model"]["name"] == "linf-8"]
    assert entry["robust_basis"] == "adaptive"
    assert entry["robust"]["mean"] == pytest.approx(next(r for r in table.rows if r.defense == "none").robust.mean)


def test_stochastic_defenses_show_single_n_draw_and_clean_n_draw_numbers(protocol_run) -> None:
    _, store, board = protocol_run
    (table,) = board.tables
    coin = next(r for r in table.rows if r.defense == "coin-flip")
    single, many, clean_many = coin.samples["adaptive@linf-8"], coin.samples["adaptive-N4@linf-8"], coin.samples["clean-N4"]
    assert table.details["adaptive-N4@linf-8"].draws == 4 and table.details["clean-N4"].role == "clean-n-draw"
    assert set(many) == set(single)
    # over 4 draws, some blanked: never better than the row's own first draw, and worse on clean images
    n_draw_rows = [r for r in store.results() if r.defense == "coin-flip" and r.attack == "adaptive-N4"]
    assert all(r.headline <= r.scores["single_draw"] and len(r.scores["draw_scores"]) == 4 for r in n_draw_rows)
    assert sum(clean_many.values()) < sum(coin.samples["clean"][s] for s in clean_many)
    # the N-draw number enters the stochastic defense's ranking key
    assert all(coin.robust_samples[s] <= many[s] + 1e-12 for s in coin.robust_samples)
    # a deterministic defense is evaluated once
    jpeg_rows = [r for r in store.results() if r.defense == "jpeg" and r.attack == "adaptive-N4"]
    assert jpeg_rows and all(r.record.attack.draws == 1 for r in jpeg_rows)
    # the attack judged its restarts as the board judges: over the N draws, once for jpeg
    adaptive = [r for r in store.results() if r.attack in ("adaptive", "adaptive-N4", "adaptive-2x")]
    assert {r.record.attack.judging_draws for r in adaptive if r.defense == "coin-flip"} == {4}
    assert {r.record.attack.judging_draws for r in adaptive if r.defense != "coin-flip"} == {1}


def test_the_convergence_check_judges_the_number_the_board_ranks_on(protocol_run) -> None:
    _, store, board = protocol_run
    (table,) = board.tables
    rerun = [r for r in store.results() if r.attack == "adaptive-2x"]
    # judged over the N draws of the ranking for the stochastic defense, once for the others
    assert {r.record.attack.draws for r in rerun if r.defense == "coin-flip"} == {4}
    assert {r.record.attack.draws for r in rerun if r.defense != "coin-flip"} == {1}
    coin = next(r for r in table.rows if r.defense == "coin-flip")
    check = coin.convergence["linf-8"]
    assert check.reference == "adaptive-N4@linf-8" and check.rerun == "adaptive-2x@linf-8"
    assert check.comparison.n == 6
    # coin-flip blanks ~half its draws: over 4 draws nearly every re-run sample falls, as in its N-draw number
    assert sum(coin.samples["adaptive-2x@linf-8"].values()) <= sum(coin.samples["adaptive@linf-8"][s]
                                                                   for s in coin.samples["adaptive-2x@linf-8"])


def test_n_evaluation_counts_a_sample_as_broken_when_one_draw_of_n_fails(tmp_path, vqa_task) -> None:
    samples = vqa_task.samples("test", 2, 0)
    store = Store(tmp_path / "store.sqlite")
    right = [s.references[0] for s in samples]
    rows = []
    for i, sample in enumerate(samples):
        draws = [right[i]] * 10
        if i == 0:
            draws[7] = "definitely not the answer"  # one failing draw of ten
        rows.append({"fingerprint": f"fp{i}", "run_id": "r", "suite": "s", "victim": "v", "task": "vqav2:test",
                     "metric": "vqa_accuracy", "attack": "adaptive-N10", "threat": "linf-8", "norm": "linf",
                     "eps": 8 / 255, "defense": "d", "sample_id": sample.id, "output": draws[0], "adversarial_key": None,
                     "record": {"draw_outputs": draws}})
    store.commit_chunk([ResultRow.model_validate(r) for r in rows], {})
    _score_cell(store, vqa_task, samples, ["fp0", "fp1"])
    scored = {r.fingerprint: r for r in store.results()}
    assert scored["fp0"].scores["single_draw"] == 1.0 and scored["fp0"].headline == 0.0
    assert scored["fp1"].headline == 1.0
    assert scored["fp0"].scores["draw_scores"].count(0.0) == 1


def test_the_ball_check_measures_at_victim_resolution_and_catches_eps_zero_moves() -> None:
    clean = torch.full((2, 3, 8, 8), 0.5)
    check_threat_model("fine", ThreatModel("t", "linf", 8 / 255), True, clean, clean + 8 / 255)
    with pytest.raises(ThreatModelViolation, match=r"attack 'mover' under threat 'eps0'.*left its ball: measured linf norm 1/255"):
        check_threat_model("mover", ThreatModel("eps0", "linf", 0.0), True, clean, clean + 1 / 255)
    with pytest.raises(ThreatModelViolation, match=r"outside \[0,1\]"):
        check_threat_model("bright", ThreatModel("t", "linf", 1.0), True, clean, clean + 0.6)
    with pytest.raises(ThreatModelViolation, match="measured l2 norm"):
        check_threat_model("l2", ThreatModel("t", "l2", 0.5), True, clean, clean + 0.1)
    with pytest.raises(ThreatModelViolation, match="shape"):
        check_threat_model("resized", ThreatModel("t", "linf", 1.0), False, clean, clean[:, :, :4])


def test_eot_draws_run_as_one_batch_and_deterministic_defenses_get_one_draw(tiny_victim, vqa_task) -> None:
    samples = vqa_task.samples("test", 3, 0)
    pixels = tiny_victim.prepare([s.image for s in samples])
    prompts, targets = [s.prompt for s in samples], [vqa_task.attack_targets(s)[0] for s in samples]
    calls = []

    class Counting(CoinFlip):
        def purify(self, pixels, generator):
            calls.append(pixels.shape[0])
            return pixels + 0 * torch.rand(pixels.shape, generator=generator)

    defense = Counting()
    route = gradient_route(defense, 5)
    target = DefendedTarget(tiny_victim, defense, route, torch.Generator().manual_seed(0))
    loss = target.loss(pixels, prompts, targets, "vqa")
    assert calls == [15]  # 5 draws x 3 images, one call
    assert torch.allclose(loss, tiny_victim.loss(pixels, prompts, targets, "vqa"), atol=1e-5)
    assert gradient_route(Defense(), 20).eot == 1


def test_turning_the_protocol_off_needs_a_reason_and_the_board_says_so(tmp_path, trained_home) -> None:
    base = textwrap.dedent(SUITE).replace("adaptive: {params", "# adaptive: {params")
    (tmp_path / "off.yaml").write_text(base + "adaptive: {enabled: false}\n")
    plugins = load_plugins(extra=[("protocol-test", sys.modules[__name__])])
    with pytest.raises(SuiteError, match="needs a reason"):
        load_suite(tmp_path / "off.yaml", plugins)
    clash = base.replace("  - name: none\n  - {name: pgd", "  - name: none\n  - {name: pgd, id: adaptive")
    (tmp_path / "clash.yaml").write_text(clash)
    with pytest.raises(SuiteError, match="standard adaptive protocol's"):
        load_suite(tmp_path / "clash.yaml", plugins)


def test_the_suite_rejects_the_role_key_it_reserves(tmp_path) -> None:
    text = textwrap.dedent(SUITE).replace("{name: pgd, threats: [linf-8], params: {steps: 3}}",
                                          "{name: pgd, threats: [linf-8], params: {steps: 3}, role: standard}")
    (tmp_path / "role.yaml").write_text(text)
    plugins = load_plugins(extra=[("protocol-test", sys.modules[__name__])])
    with pytest.raises(SuiteError, match="set by the harness"):
        load_suite(tmp_path / "role.yaml", plugins)


class _FakeTransfer(Attack):
    requires = "transfer"

    def __init__(self, surrogate, surrogate_params, fingerprint):
        self.surrogate, self.surrogate_params, self._fingerprint = surrogate, surrogate_params, fingerprint

    def surrogate_fingerprint(self) -> str:
        return self._fingerprint


def test_a_transfer_attack_whose_surrogate_is_the_victim_is_white_box(tiny_victim) -> None:
    from harness.contracts import TransferAttack
    from harness.runner import _surrogate_is_victim
    from harness.suite import AttackSpec, Cell, DefenseSpec, TaskSpec, VictimSpec

    cell = Cell(VictimSpec(name="shapes-vlm", params={"steps": 100}), TaskSpec(name="vqav2"), AttackSpec(name="mf-ii"),
                ThreatModel("t", "linf", 8 / 255), DefenseSpec(name="none"), 0)
    same_spec = _FakeTransfer("shapes-vlm", {"steps": 100}, "not loaded")
    same_weights = _FakeTransfer("hf-other-name", {}, tiny_victim.fingerprint)
    other = _FakeTransfer("shapes-vlm", {"seed": 1}, "shapes-vlm:another")
    assert all(isinstance(a, TransferAttack) for a in (same_spec, same_weights, other))
    assert _surrogate_is_victim(same_spec, cell, tiny_victim)
    assert _surrogate_is_victim(same_weights, cell, tiny_victim)
    assert not _surrogate_is_victim(other, cell, tiny_victim)


def test_editing_a_local_defense_plugin_changes_the_fingerprints_of_its_rows(tmp_path, vqa_task) -> None:
    import importlib

    from harness.code_version import clear_code_version_cache
    from harness.runner import code_versions, result_fingerprint
    from harness.suite import AttackSpec, Cell, DefenseSpec, TaskSpec, VictimSpec

    package = tmp_path / "local_blur"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = textwrap.dedent('''
        from harness.contracts import Defense
        from harness.hookspecs import hookimpl

        class Blur(Defense):
            SIGMA = 1.0

        @hookimpl
        def register_defenses(register):
            register("local-blur", Blur)
    ''')
    (package / "plugin.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("local_blur.plugin")
        plugins = load_plugins(extra=[("local-blur", module)])
        sample = vqa_task.samples("test", 1, 0)[0]
        cell = Cell(VictimSpec(name="shapes-vlm"), TaskSpec(name="vqav2", data="shapes", n=1), AttackSpec(name="none"),
                    ThreatModel("clean", "linf", 0.0), DefenseSpec(name="local-blur"), 0)
        before = result_fingerprint(cell, "victim-fp", sample, code_versions(plugins, cell))
        assert before == result_fingerprint(cell, "victim-fp", sample, code_versions(plugins, cell))
        (package / "plugin.py").write_text(source.replace("SIGMA = 1.0", "SIGMA = 2.0"))
        clear_code_version_cache()
        after = result_fingerprint(cell, "victim-fp", sample, code_versions(plugins, cell))
        assert after != before
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("local_blur")]:
            del sys.modules[name]
        clear_code_version_cache()


def test_the_protocol_expands_into_its_cells_on_a_seeded_subset_and_adds_the_probes(tmp_path, vqa_task) -> None:
    import dataclasses

    from harness.runner import adversarial_key, seed_key
    from harness.suite import expand

    text = textwrap.dedent(SUITE) + "sanity_probes: {enabled: true, samples: 5}\n"
    (tmp_path / "probes.yaml").write_text(text)
    suite = load_suite(tmp_path / "probes.yaml", load_plugins(extra=[("protocol-test", sys.modules[__name__])]))
    cells = expand(suite)
    by_role: dict[str, list] = {}
    for cell in cells:
        by_role.setdefault(cell.attack.role, []).append(cell)
    defenses = {"none", "jpeg", "coin-flip"}
    for role in ("standard", "n-draw", "convergence"):
        assert {c.defense.label for c in by_role[role]} == defenses
        assert {c.threat.name for c in by_role[role]} == {"linf-8"}
    assert {c.task.n for c in by_role["standard"]} == {10} and {c.task.n for c in by_role["convergence"]} == {6}
    (convergence,) = {(c.attack.params["steps"], c.attack.params["restarts"], c.attack.eot) for c in by_role["convergence"]}
    assert convergence == (8, 3, 4)  # steps, runs (restarts + 1) and EOT doubled
    assert {c.attack.draws for c in by_role["convergence"]} == {4}  # judged like the N-draw number
    for role in ("standard", "n-draw", "convergence"):
        assert {c.attack.judging_draws for c in by_role[role]} == {4}  # the attack judges over N draws too
    # judging draws pick among the attack's runs: they change its examples' keys, not its seeds
    cell, sample = by_role["standard"][0], vqa_task.samples("test", 1, 0)[0]
    one_draw = dataclasses.replace(cell, attack=cell.attack.model_copy(update={"judging_draws": 1}))
    code = {"kernel": "k", "victim": "v", "task": "t", "attack": "a", "defense": "d"}
    assert adversarial_key(cell, "fp", sample, code) != adversarial_key(one_draw, "fp", sample, code)
    assert seed_key(cell, "fp", sample) == seed_key(one_draw, "fp", sample)
    probes = {(c.attack.label, c.threat.name, c.threat.eps, c.defense.label, c.task.n) for c in by_role["probe"]}
    assert probes == {("pgd", "probe-eps0", 0.0, "none", 5), ("sloppy-noise", "probe-eps0", 0.0, "none", 5),
                      ("adaptive", "probe-large", 64 / 255, "none", 5)}
    # the suite's own cells keep the task's full subset
    assert {c.task.n for c in by_role["suite"]} == {12}


def test_compare_pairs_two_defenses_of_one_store_on_every_condition_and_the_ranking(protocol_run, capsys) -> None:
    from codefend.cli import main

    _, store, _ = protocol_run
    assert main(["compare", str(store.path), "--defenses", "coin-flip", "none"]) == 0
    out = capsys.readouterr().out
    assert "| shapes-vlm | vqav2:test | adaptive@linf-8 | 10 |" in out
    assert "| shapes-vlm | vqav2:test | robust (ranking) | 10 |" in out
    assert main(["compare", str(store.path), "--defenses", "coin-flop", "none"]) == 2
    assert "did you mean 'coin-flip'?" in capsys.readouterr().err
