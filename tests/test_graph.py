"""Planning a suite into a work graph: shared work is one node, dependencies are explicit, the
critical path is a real chain. Planning loads no model and no data."""

from __future__ import annotations

import re

import pytest

from harness.graph import plan
from harness.plugins import load_plugins
from harness.suite import load_suite

SUITE = """
name: graph
seed: 0
batch_size: 10
victims: [{name: shapes-vlm, params: {steps: 100}, resources: {gpus: 1, memory_gb: 4}}]
tasks:
  - {name: vqav2, data: shapes, split: test, n: 25}
threat_models: {linf-8: {norm: linf, eps: 8/255}}
attacks: [{name: none}, {name: pgd, threats: [linf-8], params: {steps: 3}}]
defenses:
  - {name: none}
  - {name: jpeg}
  - {name: codefend-purifier, params: {train_steps: 5}, resources: {threads: 2}}
  - {name: codefend, params: {purifier: {train_steps: 5}}}
adaptive: {params: {steps: 2}, eot: 2, draws: 3, samples: 20, convergence: {enabled: false}}
"""


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "suite.yaml"
    path.write_text(SUITE)
    plugins = load_plugins()
    suite = load_suite(path, plugins)
    return plan(suite, plugins, {"vqav2:test": 1000})


def test_shared_work_is_one_node(graph) -> None:
    trains = sorted(re.sub(r"[-:][0-9a-f]+$", "", n.preparation.key) for n in graph.nodes.values() if n.stage == "train")
    # codefend's purifier is codefend-purifier's (same parameters), diffusion backbone included: each trained once
    assert trains == ["codefend-prompt", "codefend-purifier", "shapes-ddpm", "shapes-vlm"]
    # codefend's purifier is codefend-purifier's (same parameters): trained once
    purifiers = [n for n in graph.nodes.values() if n.stage == "train" and n.preparation.key.startswith("codefend-purifier")]
    assert len(purifiers) == 1
    # the oblivious PGD is attacked once per chunk (25 samples / 10), for all four defenses
    attacks = [n for n in graph.nodes.values() if n.stage == "attack"]
    assert len(attacks) == 3 and all(len(n.cells) == 4 for n in attacks)


def test_dependencies_are_explicit(graph) -> None:
    nodes = graph.nodes
    purifier = next(n for n in nodes.values() if n.stage == "train" and n.preparation.key.startswith("codefend-purifier"))
    ddpm = next(n for n in nodes.values() if n.stage == "train" and n.preparation.key.startswith("shapes-ddpm"))
    assert ddpm.id in purifier.deps and any(d.startswith("victim:") for d in purifier.deps)
    label = {i: c for i, c in enumerate(graph.cells)}
    for node in nodes.values():
        if node.stage != "rows":
            continue
        cell = label[node.cells[0]]
        if cell.defense.name == "codefend-purifier":
            assert purifier.id in node.deps  # waits for its training
        if cell.attack.role == "n-draw":
            # the N-draw evaluation waits for the rows that attacked these very samples
            producer = [d for d in node.deps if d.startswith("rows:")]
            assert len(producer) == 1
            made_by = graph.cells[nodes[producer[0]].cells[0]]
            assert made_by.attack.role == "standard" and made_by.defense == cell.defense
        if cell.attack.name == "pgd":
            assert any(d.startswith("attack:") for d in node.deps)
    # resources: the rows of a defense needing 2 threads reserve them, beside the victim's GPU
    rows = next(n for n in nodes.values() if n.stage == "rows" and label[n.cells[0]].defense.name == "codefend-purifier")
    assert (rows.resources.threads, rows.resources.gpus, rows.resources.memory_gb) == (2, 1.0, 4.0)
    # topological: every dependency comes first
    seen: set[str] = set()
    for node_id, node in nodes.items():
        assert set(node.deps) <= seen, node_id
        seen.add(node_id)


def test_critical_path_is_a_chain_through_the_trainings(graph) -> None:
    length, path = graph.critical_path()
    assert 0 < length < graph.total_cost
    for before, after in zip(path, path[1:]):
        assert before in graph.nodes[after].deps
    stages = [graph.nodes[n].stage for n in path]
    assert stages[0] == "train" and stages[-1] == "score"
    assert graph.stage_counts()["score"] == len(graph.cells)


def test_an_adaptive_node_is_priced_like_the_suite_estimate_through_a_surrogate_process(tmp_path) -> None:
    # the 50-step DDPM DiffPure attacked through its 2-step surrogate costs what 2 steps cost: the
    # work graph once priced all 50, which put the wrong node on the critical path
    text = SUITE.replace(
        "  - {name: codefend, params: {purifier: {train_steps: 5}}}\n",
        "  - {name: diffpure, params: {t_star: 0.05, sampler: ddpm}}\n",
    )
    plugins = load_plugins()
    costs = {}
    for surrogate in ("", ", surrogate_steps: 2"):
        path = tmp_path / "suite.yaml"
        path.write_text(text.replace("convergence: {enabled: false}", "convergence: {enabled: false}" + surrogate))
        graph = plan(load_suite(path, plugins), plugins, {"vqav2:test": 1000})
        costs[surrogate] = sum(n.cost for n in graph.nodes.values()
                               if n.stage == "rows" and "adaptive@linf-8 | diffpure" in n.label)
    # per step and draw: the victim plus 50 (or 2) network evaluations forward, again backward;
    # the judgements (2 runs x 3 draws) generate through all 50 steps either way
    apgd = plugins.attacks.create("apgd", {"steps": 2, "restarts": 1, "objectives": ["ce", "dlr"]})
    forward, backward = apgd.passes_per_sample()
    exact = forward * 2 * (1 + 50) + backward * (2 + 50 * 2)
    surrogate = forward * 2 * (1 + 2) + backward * (2 + 2 * 2)
    assert costs[""] - costs[", surrogate_steps: 2"] == 20 * (exact - surrogate)
    assert costs[", surrogate_steps: 2"] < costs[""] / 3
