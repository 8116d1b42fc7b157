"""Wall time of one suite's work graph under three executors, and its critical path.

    python benchmarks/executor_speed.py [suites/quickstart.yaml] [--out /tmp/executor-bench]

Runs the suite three times, each into a fresh store, after the suite's training nodes have run
untimed (or found their models cached), so the three compare evaluation, not training:

- ``local-1``: ``local`` in this process with 1 torch thread;
- ``local-2``: ``local`` in this process with 2 torch threads;
- ``ray-2``: a local Ray of 2 CPUs, i.e. 2 workers of 1 thread each (Ray's start-up included).

Then it prints the speed-ups and, from the ``ray-2`` run's measured node times, the graph's
critical path (the costliest chain of dependent nodes) against the sum of all work: the most any
number of workers could gain. The goal (issue 11) is ray-2 >= 1.7x local-1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from harness import runner
from harness.graph import plan
from harness.plugins import get_plugins
from harness.runner import NodeCall, execute_node, run_suite, task_sizes
from harness.store import Store
from harness.suite import load_suite


def timed_run(suite, plugins, executor, out: Path, threads: int) -> tuple[float, dict[str, float]]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runner._components.clear()  # each run loads its own models, as a fresh process would
    torch.set_num_threads(threads)
    store = Store(out / "store.sqlite")
    started = time.perf_counter()
    try:
        summary = run_suite(suite, store, plugins=plugins, progress=False, executor=executor)
    finally:
        store.close()
    seconds = time.perf_counter() - started
    if summary.failures:
        sys.exit(f"{out.name}: {len(summary.failures)} cells failed: {summary.failures[0]}")
    return seconds, summary.node_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="suites/quickstart.yaml")
    parser.add_argument("--out", default="/tmp/executor-bench")
    args = parser.parse_args()
    plugins = get_plugins()
    suite = load_suite(args.suite, plugins)
    out = Path(args.out)
    started = time.perf_counter()
    for node in plan(suite, plugins, task_sizes(suite, plugins)).nodes.values():
        if node.stage in ("train", "victim"):
            payload = (node.preparation, node.victim) if node.stage == "train" else node.victim
            result = execute_node(NodeCall(node.stage, payload), plugins)
            if result.error:
                sys.exit(f"{node.label}: {result.error}")
    print(f"trainings (or cache): {time.perf_counter() - started:.1f} s", flush=True)

    results: dict[str, tuple[float, dict[str, float]]] = {}
    results["local-1"] = timed_run(suite, plugins, plugins.executors.create("local", {}), out / "local-1", 1)
    print(f"local-1: {results['local-1'][0]:.1f} s", flush=True)
    results["local-2"] = timed_run(suite, plugins, plugins.executors.create("local", {}), out / "local-2", 2)
    print(f"local-2: {results['local-2'][0]:.1f} s", flush=True)
    ray = plugins.executors.create("ray", {"num_cpus": 2})
    results["ray-2"] = timed_run(suite, plugins, ray, out / "ray-2", 1)
    print(f"ray-2:   {results['ray-2'][0]:.1f} s (2 workers x 1 thread, Ray start-up included)", flush=True)

    base = results["local-1"][0]
    print("\n| executor | wall s | speed-up vs local-1 |\n|---|---|---|")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.1f} | {base / seconds:.2f}x |")

    graph = plan(suite, plugins, task_sizes(suite, plugins))
    node_seconds = results["local-1"][1]  # one thread per node, as in a ray-2 worker, without contention
    length, path = graph.critical_path(node_seconds)
    total = sum(node_seconds.values())
    estimate, _ = graph.critical_path()
    print(f"\nwork graph: {len(graph.nodes)} nodes; measured (local-1 node times): sum of all work {total:.1f} s, "
          f"critical path {length:.1f} s ({length / total:.0%}; at most {total / length:.1f}x from any number of workers)")
    print(f"estimated from passes: critical path {estimate / graph.total_cost:.0%} of the work")
    for node_id in path:
        print(f"  {graph.nodes[node_id].stage:6s} {node_seconds.get(node_id, 0.0):7.2f} s  {graph.nodes[node_id].label}")


if __name__ == "__main__":
    main()
