"""The suite as a graph of work: what has to run, what it waits for, and what it needs.

Planning turns a suite into nodes with explicit dependencies, in five stages:

- ``train``: a :class:`~harness.contracts.Preparation` a victim or defense declares (training
  shapes-vlm, shapes-ddpm, a purifier against the victim). Equal keys are one node.
- ``victim``: loading a victim (after its training) and reporting its fingerprint, which keys
  every row; the driver plans the rest of that victim's work when it arrives.
- ``attack``: the adversarial examples of one chunk of an oblivious attack (victim, task,
  attack, threat), shared by every defense.
- ``rows``: one chunk of one cell: purify, generate (and, adaptive, attack through the defense).
  The N-draw evaluation of an adaptive attack waits for the rows that produced its examples.
- ``score``: one cell, once all its rows are in (set-level metrics see the whole cell).

A chunk is a fixed range of sample positions (``batch_size`` of them), so the graph and every
chunk's content are the same whatever ran before or where. Each node states the resources it
needs (:class:`Resources`, from the suite's ``resources:``) and a rough cost in passes, from which
:meth:`WorkGraph.critical_path` is computed. Nodes run through an executor
(:mod:`harness.executors`); only the driver writes the store.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.contracts import Preparation, Prepared
from harness.plugins import Plugins
from harness.store import digest_json
from harness.suite import Cell, ResourceSpec, Suite, VictimSpec, attack_passes, expand

Stage = Literal["train", "victim", "attack", "rows", "score"]
STAGES: tuple[Stage, ...] = ("train", "victim", "attack", "rows", "score")


@dataclass
class Node:
    id: str
    stage: Stage
    label: str
    deps: list[str]
    resources: ResourceSpec
    cost: float
    victim: VictimSpec | None = None
    preparation: Preparation | None = None
    cells: list[int] = field(default_factory=list)
    """Indices (into :attr:`WorkGraph.cells`) of the cells this node's output serves."""
    chunk: int | None = None
    """The chunk: sample positions ``[chunk * batch_size, (chunk + 1) * batch_size)``."""
    producer: int | None = None
    """Rows nodes of an adaptive cell that reuses another cell's examples (N-draw): that cell."""


@dataclass
class WorkGraph:
    cells: list[Cell]
    nodes: dict[str, Node]
    batch_size: int
    sample_counts: list[int]
    """Samples of each cell (after the attack's ``samples`` cap)."""

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {node_id: [] for node_id in self.nodes}
        for node in self.nodes.values():
            for dep in node.deps:
                out[dep].append(node.id)
        return out

    def stage_counts(self) -> Counter[str]:
        return Counter(node.stage for node in self.nodes.values())

    @property
    def total_cost(self) -> float:
        return sum(node.cost for node in self.nodes.values())

    def remaining_path(self) -> dict[str, float]:
        """Each node's cost plus the costliest chain of work that waits for it (its priority:
        the executor gets the critical path first)."""
        dependents = self.dependents()
        out: dict[str, float] = {}
        for node_id in reversed(list(self.nodes)):
            out[node_id] = self.nodes[node_id].cost + max((out[d] for d in dependents[node_id]), default=0.0)
        return out

    def critical_path(self, costs: dict[str, float] | None = None) -> tuple[float, list[str]]:
        """The costliest chain of dependent nodes (what no number of workers can shorten), by
        the planned costs or by ``costs`` (e.g. measured seconds; a missing node costs 0)."""
        best: dict[str, tuple[float, str | None]] = {}
        for node_id, node in self.nodes.items():  # insertion order is topological
            before = max(((best[d][0], d) for d in node.deps), default=(0.0, None))
            cost = node.cost if costs is None else costs.get(node_id, 0.0)
            best[node_id] = (before[0] + cost, before[1])
        if not best:
            return 0.0, []
        end = max(best, key=lambda k: best[k][0])
        path, cursor = [], end
        while cursor is not None:
            path.append(cursor)
            cursor = best[cursor][1]
        return best[end][0], path[::-1]

    def chunk_positions(self, cell_index: int, chunk: int) -> range:
        n = self.sample_counts[cell_index]
        return range(chunk * self.batch_size, min(n, (chunk + 1) * self.batch_size))


def victim_key(spec: VictimSpec) -> str:
    return f"{spec.name}:{digest_json(spec.params)[:8]}" if spec.params else spec.name


def _oblivious_identity(cell: Cell) -> str:
    """Cells whose adversarial examples are the same ones (every defense of an oblivious attack)."""
    return digest_json([victim_key(cell.victim), cell.task.model_dump(exclude={"n"}), cell.attack.name,
                        cell.attack.params, cell.threat.as_record(), cell.seed])[:16]


def _adaptive_identity(cell: Cell) -> str:
    """Adaptive cells that attack identically (the standard attack and its N-draw evaluation)."""
    return digest_json([_oblivious_identity(cell), cell.attack.eot, cell.attack.surrogate_steps, cell.attack.grafting,
                        cell.attack.judging_draws, cell.defense.name, cell.defense.params])[:16]


def plan(suite: Suite, plugins: Plugins, task_sizes: dict[str, int]) -> WorkGraph:
    """The suite's work graph. ``task_sizes`` maps a task's label to its sample count (``n``, or
    the split's size), so planning loads no model and no data."""
    cells = expand(suite)
    batch = suite.batch_size
    nodes: dict[str, Node] = {}

    def add(node: Node) -> Node:
        return nodes.setdefault(node.id, node)

    def preparation_nodes(preparations: list[Preparation], victim: VictimSpec, resources: ResourceSpec) -> list[str]:
        ids: dict[str, str] = {}
        for step in preparations:
            node_id = f"train:{step.key}" + (f"@{victim_key(victim)}" if step.needs_victim else "")
            deps = [ids.get(key, f"train:{key}") for key in step.after]
            if step.needs_victim:
                deps.append(f"victim:{victim_key(victim)}")
            unknown = [d for d in deps if d not in nodes and not d.startswith("victim:")]
            if unknown:
                raise ValueError(f"preparation '{step.key}' comes after {unknown}, which nothing declared before it "
                                 "(list a preparation's prerequisites before it in preparations())")
            add(Node(node_id, "train", step.label + (f" for {victim.name}" if step.needs_victim else ""),
                     deps, resources, step.cost,
                     victim=victim if step.needs_victim else None, preparation=step))
            ids[step.key] = node_id
        return list(ids.values())

    victims: dict[str, Any] = {}
    for spec in suite.victims:
        instance = plugins.victims.create(spec.name, spec.params)
        trained = preparation_nodes(instance.preparations() if isinstance(instance, Prepared) else [], spec,
                                    spec.train_resources or spec.resources)
        victims[victim_key(spec)] = add(Node(f"victim:{victim_key(spec)}", "victim", f"load {spec.name}", trained,
                                             spec.resources, 1.0, victim=spec))

    defenses = {d.label: plugins.defenses.create(d.name, d.params) for d in suite.defenses}
    defense_specs = {d.label: d for d in suite.defenses}
    attacks: dict[str, Any] = {}
    ready: dict[tuple[str, str], list[str]] = {}
    producers: dict[str, int] = {}
    counts: list[int] = []
    for index, cell in enumerate(cells):
        size = task_sizes[cell.task.label]
        n = size if cell.task.n is None else min(size, cell.task.n)
        counts.append(n)
        vkey = victim_key(cell.victim)
        defense = defenses[cell.defense.label]
        defense_spec = defense_specs[cell.defense.label]
        resources = cell.victim.resources.union(defense_spec.resources)
        if (vkey, cell.defense.label) not in ready:
            steps = defense.preparations() if isinstance(defense, Prepared) else []
            training = cell.victim.resources.union(defense_spec.train_resources or defense_spec.resources)
            ready[(vkey, cell.defense.label)] = preparation_nodes(steps, cell.victim, training)
        attack = attacks.setdefault(cell.attack.label + digest_json(cell.attack.params), plugins.attacks.create(cell.attack.name, cell.attack.params))
        draws = cell.attack.draws if defense.stochastic else 1
        defend_cost = (defense.passes_per_sample() + 1) * draws
        producer: int | None = None
        attack_cost = 0.0
        if cell.attack.name != "none" and cell.attack.adaptive:
            producer = producers.setdefault(_adaptive_identity(cell), index)
            if producer == index:
                attack_cost = sum(attack_passes(cell.attack, attack, defense))
        chunks = math.ceil(n / batch)
        row_ids = []
        for k in range(chunks):
            width = len(range(k * batch, min(n, (k + 1) * batch)))
            deps = [f"victim:{vkey}", *ready[(vkey, cell.defense.label)]]
            if cell.attack.name != "none" and not cell.attack.adaptive:
                attack_id = f"attack:{_oblivious_identity(cell)}#{k}"
                node = add(Node(attack_id, "attack", f"{cell.attack.label}@{cell.threat.name} on {cell.task.label} #{k}",
                                [f"victim:{vkey}"], cell.victim.resources,
                                sum(attack_passes(cell.attack, attack, None)) * width, chunk=k))
                node.cells.append(index)
                deps.append(attack_id)
            elif producer is not None and producer != index:
                deps.append(f"rows:{producer}#{k}")
            row = add(Node(f"rows:{index}#{k}", "rows", f"{cell.label} #{k}", deps, resources,
                           (attack_cost + defend_cost) * width, cells=[index], chunk=k,
                           producer=producer if producer != index else None))
            row_ids.append(row.id)
        add(Node(f"score:{index}", "score", cell.label, row_ids, ResourceSpec(), 0.1 * n, cells=[index]))
    return WorkGraph(cells=cells, nodes=_topological(nodes), batch_size=batch, sample_counts=counts)


def _topological(nodes: dict[str, Node]) -> dict[str, Node]:
    """Nodes in an order where every dependency comes first (planning adds a victim-trained
    preparation before it has seen every node it depends on)."""
    out: dict[str, Node] = {}
    visiting: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in out:
            return
        if node_id in visiting:
            raise ValueError(f"the work graph has a cycle through {node_id}")
        visiting.add(node_id)
        for dep in nodes[node_id].deps:
            visit(dep)
        visiting.discard(node_id)
        out[node_id] = nodes[node_id]

    for node_id in nodes:
        visit(node_id)
    return out
