"""``codefend``: run, validate, train, list plugins, render leaderboards.

User mistakes (a bad suite, an unknown plugin, missing data) end in one ``error:`` paragraph and
exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from harness.contracts import DataError
from harness.plugins import HOOK_KINDS, Plugins, get_plugins, load_plugins, plugin_specs_from_env, use_plugins
from harness.registry import RegistryError
from harness.store import StoreError
from harness.suite import SuiteError

USER_ERRORS = (SuiteError, RegistryError, FileNotFoundError, DataError, StoreError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _store_path(location: str) -> Path:
    path = Path(location)
    return path / "store.sqlite" if path.is_dir() or path.suffix != ".sqlite" else path


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RegistryError(f"--set expects KEY=VALUE, got '{pair}'")
        params[key] = yaml.safe_load(value)
    return params


def _parameter_table(entry: Any) -> list[dict[str, str]]:
    """An entry's parameters as ``codefend plugins --params`` shows them: name, type, default."""
    import inspect

    rows = []
    for key, p in entry.parameters().items():
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        rows.append({"name": key, "type": "" if p.annotation is inspect.Parameter.empty else annotation,
                     "default": "(required)" if p.default is inspect.Parameter.empty else repr(p.default)})
    return rows


def cmd_plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    if args.json:
        payload = []
        for p in plugins.plugins.values():
            item = {"plugin": p.name, "distribution": p.distribution, "version": p.version, "module": p.module,
                    "registered": p.registered, "error": p.error}
            if args.params:
                item["params"] = {kind: {name: _parameter_table(plugins.registry(kind).get(name)) for name in names}
                                  for kind, names in p.registered.items()}
            payload.append(item)
        print(json.dumps(payload, indent=2))
        return 0
    for p in plugins.plugins.values():
        status = f"  [failed: {p.error}]" if p.error else ""
        print(f"{p.name}  ({p.distribution} {p.version}, {p.module}){status}")
        for kind in HOOK_KINDS.values():
            for name in p.registered.get(kind, []):
                entry = plugins.registry(kind).get(name)
                print(f"    {kind:9s} {name:16s} {entry.description}")
                if args.params:
                    for row in _parameter_table(entry):
                        typed = f": {row['type']}" if row["type"] else ""
                        print(f"        {row['name']}{typed} = {row['default']}")
    return 0


def cmd_validate(args: argparse.Namespace, plugins: Plugins) -> int:
    from harness.suite import estimate_passes, expand, load_suite

    notes: list[str] = []
    suite = load_suite(args.suite, plugins, device_notes=notes, parsed=_parsed_with_executor(args, plugins))
    cells = expand(suite)
    counts: dict[int, int] = {}
    for i, task in enumerate(suite.tasks):
        instance = plugins.tasks.create(task.name, task.factory_params())
        try:
            # what a run gets: n, or fewer where the split has no more (or malformed samples are skipped)
            counts[i] = len(instance.samples(task.split, task.n, suite.seed))
            if task.n is not None and counts[i] < task.n:
                notes.append(f"tasks[{i}]: n = {task.n}, but {task.label} gives {counts[i]} samples: "
                             f"a run evaluates those {counts[i]}")
        except FileNotFoundError as exc:
            if task.data_is_present():  # the data is here, so the split (or a file of it) is what is missing
                raise SuiteError(args.suite, f"tasks[{i}].split", f"{' '.join(str(exc).split())[:600]}") from None
            counts[i] = 0
            notes.append(f"tasks[{i}]: sample count unknown until its data is present ({exc})")
        except DataError as exc:  # the data is here and breaks its format
            raise SuiteError(args.suite, f"tasks[{i}].data", str(exc)[:1500]) from None
    print(f"suite '{suite.name}' ({args.suite}) is valid")
    print(f"matrix: {len(suite.victims)} victim(s) x {len(suite.tasks)} task(s) x "
          f"{sum(len(suite.threats_of(a)) for a in suite.attacks)} attack condition(s) x {len(suite.defenses)} defense(s)")
    for cell in cells:
        print(f"  {cell.label}")
    estimate = estimate_passes(suite, plugins, counts)
    index = {t.model_dump_json(exclude={"n"}): i for i, t in enumerate(suite.tasks)}
    samples = sum(min(counts[index[c.task.model_dump_json(exclude={"n"})]], c.task.n or 10**9) for c in cells)
    print(f"{len(cells)} cells, {samples} sample evaluations")
    print(f"estimated passes: {estimate.attack_forward} attack forward + {estimate.attack_backward} attack backward "
          f"+ {estimate.defense} defense + {estimate.generate} generation = {estimate.total} "
          "(oblivious attacks are computed once and shared by all defenses; adaptive ones once per defense)")
    protocol = suite.adaptive
    if protocol.enabled:
        added = [a for a in suite.protocol_attacks() if a.role != "probe"]
        print(f"standard adaptive protocol: {protocol.attack} {protocol.params}, EOT {protocol.eot} (stochastic defenses), "
              f"{protocol.draws} evaluation draws, on {protocol.samples or 'all'} samples per task, through every defense; "
              f"{len([c for c in cells if c.attack.role != 'suite' and c.attack.role != 'probe'])} of the cells "
              f"({', '.join(a.label for a in added)}); {estimate.adaptive_protocol} of the passes")
        print(f"  gradient routes: " + "; ".join(
            f"{d.label}: {_route_text(plugins, d, protocol)}" for d in suite.defenses))
    else:
        print(f"standard adaptive protocol: OFF ({protocol.reason}); the board will say 'no adaptive evaluation'")
    graph = _print_graph(suite, plugins, counts)
    training = sum(node.cost for node in graph.nodes.values() if node.stage == "train")
    seconds = (estimate.total + training) * args.seconds_per_pass
    print(f"estimated time: {estimate.total} passes + {training:.3g} of training = {seconds / 3600:.3g} GPU-hours at "
          f"{args.seconds_per_pass * 1000:.3g} ms per pass (--seconds-per-pass; the default is an assumed rate for a "
          "7B MLLM forward+backward of one image on one H100, not a measurement: docs/scale.md)")
    for note in notes:
        print(f"note: {note}")
    return 0


def _print_graph(suite: Any, plugins: Plugins, counts: dict[int, int]) -> Any:
    from harness.graph import STAGES, plan

    graph = plan(suite, plugins, {task.label: counts[i] for i, task in enumerate(suite.tasks)})
    stages = graph.stage_counts()
    length, path = graph.critical_path()
    total = graph.total_cost
    print(f"work graph: {len(graph.nodes)} nodes ({', '.join(f'{stages.get(s, 0)} {s}' for s in STAGES)}), "
          f"executor {suite.executor.name} {suite.executor.params or ''}".rstrip())
    print(f"  critical path: {length:.3g} of {total:.3g} passes of work ({length / total:.0%}; the most "
          f"any number of workers can gain is {total / length:.1f}x), {len(path)} nodes:" if total else "  no work")
    for node_id in path:
        node = graph.nodes[node_id]
        print(f"    {node.stage:6s} {node.label}  ({node.cost:.3g})")
    return graph


def _route_text(plugins: Plugins, defense_spec: Any, protocol: Any) -> str:
    from harness.adaptive import gradient_route

    defense = plugins.defenses.create(defense_spec.name, defense_spec.params)
    return gradient_route(defense, protocol.eot, protocol.surrogate_steps, protocol.grafting).describe()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _executor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", help="run the work graph with this executor (local, ray), overriding the suite's")
    p.add_argument("--address", help="ray: the cluster to join (auto, ray://HOST:10001); default a local Ray")
    p.add_argument("--workers", type=int, help="local: worker processes; ray without --address: CPUs of the local Ray")


def _with_executor(suite: Any, args: argparse.Namespace, plugins: Plugins) -> Any:
    """The suite with ``--executor/--address/--workers`` applied (checked like the suite's own)."""
    from harness.suite import ExecutorSpec

    if args.executor is None and args.address is None and args.workers is None:
        return suite
    name = args.executor or suite.executor.name
    params = dict(suite.executor.params) if name == suite.executor.name else {}
    if args.workers is not None:
        if args.workers < 1:
            raise RegistryError(f"--workers must be at least 1, got {args.workers}")
        params["num_cpus" if name == "ray" else "workers"] = args.workers
    if args.address is not None:
        if name != "ray":
            raise RegistryError(f"--address is for the ray executor (got --executor {name}); add --executor ray")
        params["address"] = args.address
        params.pop("num_cpus", None)
    try:
        plugins.executors.create(name, params)
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"executor '{name}' rejected its parameters: {exc}") from None
    return suite.model_copy(update={"executor": ExecutorSpec(name=name, params=params)})


def _parsed_with_executor(args: argparse.Namespace, plugins: Plugins) -> Any:
    """The parsed suite with the command line's executor options, before its plugins are checked:
    the device check depends on the executor (a Ray cluster's devices are its workers')."""
    from harness.suite import parse_suite

    parsed = getattr(args, "parsed_suite", None)
    return _with_executor(parsed if parsed is not None else parse_suite(args.suite), args, plugins)


def cmd_run(args: argparse.Namespace, plugins: Plugins) -> int:
    from harness.runner import default_store_path, run_suite
    from harness.store import Store
    from harness.suite import load_suite

    suite = load_suite(args.suite, plugins, parsed=_parsed_with_executor(args, plugins))
    store_path = default_store_path(suite, args.out)
    store = Store(store_path)
    try:
        summary = run_suite(suite, store, plugins=plugins, progress=not args.quiet, suite_path=str(args.suite))
        print(f"run {summary.run_id}: {summary.cells} cells, {summary.computed_rows} rows computed, "
              f"{summary.reused_rows} reused from {store_path}, {summary.seconds:.1f} s", file=sys.stderr)
        formats = ("md", "html", "json")
        written = [store_path.parent / f"leaderboard.{fmt}" for fmt in formats]
        # a board is a function of the store and the reporters' code: a rerun that added nothing
        # keeps the boards it would render again (rendering the HTML plots costs seconds)
        stamp_file = store_path.parent / "leaderboard.stamp"
        stamp = json.dumps({"store": store.content_stamp(),
                            "reporters": {f: plugins.reporters.get(f).code_version() for f in formats}}, sort_keys=True)
        if not (summary.computed_rows == 0 and all(p.exists() for p in written)
                and stamp_file.exists() and stamp_file.read_text() == stamp):
            board = _board(store)
            for fmt, out_file in zip(formats, written):
                out_file.write_text(plugins.reporters.create(fmt)(board))
            stamp_file.write_text(stamp)
        text = written[0].read_text()
    finally:
        store.close()
    print(text)
    print(f"leaderboard written to {', '.join(str(p) for p in written)}", file=sys.stderr)
    for failure in summary.failures:
        print(f"error: cell failed: {failure}", file=sys.stderr)
    return 1 if summary.failures else 0


def _board(store):
    from leaderboard.aggregate import build_board

    return build_board(store)


def _render(store, fmt: str, plugins: Plugins) -> str:
    reporter = plugins.reporters.create(fmt)
    return reporter(_board(store))


def _rows_by_key(path: Path, run_id: str | None) -> dict[tuple[str, ...], dict[str, float]]:
    """(victim, task, defense, condition) -> sample -> headline, for one store (its board's run) or
    one run in it: the rows the run's matrix declared, reused ones included (a run from before runs
    declared their rows: the rows it computed itself; a store without declarations: every row)."""
    from harness.store import Store
    from leaderboard.aggregate import condition_of

    if not path.exists():
        raise FileNotFoundError(f"no result store at {path}: pass a results folder written by `codefend run`")
    store = Store(path)
    try:
        runs = {r["run_id"] for r in store.runs()}
        if run_id is not None and run_id not in runs:
            raise FileNotFoundError(f"run '{run_id}' is not in {path} (its runs: {', '.join(sorted(runs)) or 'none'})")
        if run_id is None or store.declared(run_id):
            rows = store.results(scored_only=True, run_id=run_id or store.board_run())
        else:  # a run from before runs declared their rows
            rows = (row for row in store.results(scored_only=True) if row.run_id == run_id)
        out: dict[tuple[str, ...], dict[str, float]] = {}
        for row in rows:
            out.setdefault((row.victim, row.task, row.defense, condition_of(row)), {})[row.sample_id] = float(row.headline)
        return out
    finally:
        store.close()


def _run_reference(text: str, store: str | None) -> tuple[Path, str | None]:
    """A results folder / store file, or (with --store) a run id inside that store."""
    if store is not None:
        return _store_path(store), text
    return _store_path(text), None


def _print_paired(labels: Sequence[str], a: dict[str, float], b: dict[str, float]) -> bool:
    """One markdown row: the labels, n, both means on the shared samples, the paired difference
    with its interval (* when significant), the test and its p-value. False when nothing is shared."""
    from leaderboard.stats import paired_comparison

    comparison = paired_comparison(a, b)
    if comparison is None:
        return False
    common = sorted(set(a) & set(b))
    mean_a = sum(a[s] for s in common) / len(common)
    mean_b = sum(b[s] for s in common) / len(common)
    ci, mark = comparison.interval, " *" if comparison.significant else ""
    print(f"| {' | '.join(labels)} | {comparison.n} | {mean_a:.4g} | {mean_b:.4g} | "
          f"{comparison.mean_difference:+.4g} [{ci.low:+.4g}, {ci.high:+.4g}]{mark} | {comparison.test} | {comparison.p_value:.2g} |")
    return True


def cmd_compare_defenses(args: argparse.Namespace, plugins: Plugins) -> int:
    """Two defenses of one store, paired sample by sample on every condition both faced and on the
    board's ranking score (robust)."""
    from harness.store import Store
    from leaderboard.aggregate import build_board

    path = _store_path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no result store at {path}: pass a results folder written by `codefend run`")
    store = Store(path)
    try:
        board = build_board(store)
    finally:
        store.close()
    first, second = args.defenses
    for table in board.tables:
        known = sorted(row.defense for row in table.rows)
        for name in (first, second):
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" — did you mean '{close[0]}'?" if close else ""
                raise FileNotFoundError(f"defense '{name}' is not on the {table.task} board{hint} (its defenses: {', '.join(known)})")
    print(f"| victim | task | condition | n | {first} | {second} | difference (95% CI) | test | p |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|")
    found = False
    for table in board.tables:
        rows = {row.defense: row for row in table.rows}
        a, b = rows[first], rows[second]
        pairs = [(c, a.samples[c], b.samples[c]) for c in table.conditions if c in a.samples and c in b.samples]
        pairs.append(("robust (ranking)", a.robust_samples, b.robust_samples))
        for condition, left, right in pairs:
            found = _print_paired((table.victim, table.task, condition), left, right) or found
    if not found:
        raise FileNotFoundError(f"{first} and {second} share no evaluated samples in {path}")
    print(f"\nPaired on the samples both defenses were scored on; * significant at 95% (never below 10 samples).")
    return 0


def cmd_compare(args: argparse.Namespace, plugins: Plugins) -> int:
    if args.defenses:
        if args.run_b is not None or args.store is not None:
            raise FileNotFoundError("--defenses A B compares two defenses of one results folder: pass only that folder")
        args.results = args.run_a
        return cmd_compare_defenses(args, plugins)
    if args.run_b is None:
        raise FileNotFoundError("compare needs two runs (A B), or one results folder with --defenses A B")
    a = _rows_by_key(*_run_reference(args.run_a, args.store))
    b = _rows_by_key(*_run_reference(args.run_b, args.store))
    common = sorted(set(a) & set(b))
    if not common:
        raise FileNotFoundError("the two runs share no (victim, task, defense, condition): nothing to compare")
    print(f"| victim | task | defense | condition | n | A | B | A − B (95% CI) | test | p |")
    print("|---|---|---|---|---:|---:|---:|---:|---|---:|")
    for key in common:
        _print_paired(key, a[key], b[key])
    print("\nPaired on the samples both runs scored; * significant at 95% (never below 10 samples).")
    return 0


def cmd_leaderboard(args: argparse.Namespace, plugins: Plugins) -> int:
    from harness.store import Store

    path = _store_path(args.results)
    if not path.exists():
        raise FileNotFoundError(f"no result store at {path}: pass a results folder written by `codefend run` (default results/SUITE_NAME)")
    store = Store(path)
    try:
        text = _render(store, args.format, plugins)
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(text)
        print(f"leaderboard written to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_train(args: argparse.Namespace, plugins: Plugins) -> int:
    """Train (or find in the cache) a victim, a trainable defense, or the shapes-ddpm backbone."""
    from harness.contracts import TrainableDefense
    from harness.registry import UnknownNameError

    params = _parse_sets(args.set)
    if args.name in plugins.victims.names():
        victim = plugins.victims.create(args.name, params)
        victim.load()
        print(f"{args.name} is ready: {getattr(victim, 'cache_dir', '')}")
        return 0
    if args.name == "shapes-ddpm":
        from defenses.diffusion import ShapesDDPM

        model = ShapesDDPM(**params)
        model.load()
        record = model.training_record()
        print(f"shapes-ddpm is ready: {model.cache_dir} (trained in {record['seconds']} s, final loss {record['final_loss']:.4f})")
        return 0
    if args.name in plugins.defenses.names():
        if args.attacks:
            params["train_attacks"] = args.attacks
        try:
            defense = plugins.defenses.create(args.name, params)
        except ValueError as exc:
            raise RegistryError(f"defense '{args.name}' rejected its parameters: {exc}") from None
        if not isinstance(defense, TrainableDefense):
            raise RegistryError(f"defense '{args.name}' has nothing to train (it is not a TrainableDefense: no train() method)")
        victim = plugins.victims.create(args.victim, _parse_sets(args.victim_set))
        victim.load()
        defense.bind(victim)  # trains (with progress bars) or loads from the cache
        record = defense.train(progress=True)
        print(f"{args.name} is ready for {args.victim}: {json.dumps(_train_summary(record))}")
        return 0
    known = plugins.victims.names() + plugins.defenses.names() + ["shapes-ddpm"]
    raise UnknownNameError("trainable model", args.name, known)


def _train_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline of a training record (histories left out)."""
    return {k: v for k, v in record.items() if not isinstance(v, (list, dict)) or k in ("config", "prefix")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codefend", description="Adversarial-robustness benchmarks for multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    # every command takes --plugin, after its own name (`codefend run suite.yaml --plugin my_defense`)
    plugin_option = argparse.ArgumentParser(add_help=False)
    plugin_option.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
        help="also load the plugin in this module (my_defense.plugin) or .py file, as if it were installed "
             "(repeatable; CODEFEND_PLUGINS takes the same, separated by ':')")

    p = sub.add_parser("run", parents=[plugin_option], help="run a suite (resumes: finished rows are skipped) and print its leaderboard")
    p.add_argument("suite", help="path of a YAML suite, e.g. suites/quickstart.yaml")
    p.add_argument("--out", help="results folder (default results/SUITE_NAME)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _executor_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", parents=[plugin_option], help="check a suite; print its matrix, pass estimate and work graph")
    p.add_argument("suite")
    p.add_argument("--seconds-per-pass", type=_positive_float, default=0.0125, metavar="S",
                   help="the rate the GPU-hour estimate assumes (default 0.0125: 12.5 ms per 7B image-pass)")
    _executor_arguments(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", parents=[plugin_option], help="list loaded plugins and what they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--params", action="store_true", help="also each component's parameters, types and defaults")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("leaderboard", parents=[plugin_option], help="re-render a leaderboard from a result store (no model runs)")
    p.add_argument("results", help="results folder or store.sqlite file")
    p.add_argument("--format", default="md", help="md, html, json, csv or another registered reporter (see `codefend plugins`)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("compare", parents=[plugin_option], help="paired differences between two runs (results folders, or run ids with --store), "
                                       "or between two defenses of one results folder (--defenses A B)")
    p.add_argument("run_a", help="results folder / store.sqlite, or a run id with --store")
    p.add_argument("run_b", nargs="?")
    p.add_argument("--store", help="compare two run ids inside this results folder / store")
    p.add_argument("--defenses", nargs=2, metavar=("A", "B"), help="compare defense A with defense B inside RUN_A's store")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", parents=[plugin_option], help="train (or load from cache) a victim, a trainable defense or shapes-ddpm")
    p.add_argument("name", help="shapes-vlm, shapes-ddpm, codefend-purifier, codefend-prompt, codefend, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a parameter (repeatable)")
    p.add_argument("--victim", default="shapes-vlm", help="defenses: the victim to train against (default shapes-vlm)")
    p.add_argument("--victim-set", action="append", default=[], metavar="KEY=VALUE", help="a victim parameter (repeatable)")
    p.add_argument("--attacks", nargs="+", metavar="ATTACK[@NORM-EPS]",
                   help="defenses: attacks that make training pairs, e.g. pgd@linf-8/255 apgd@linf-4/255")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        if args.func is cmd_run:
            # The driver compiles what it imports (torch, transformers) in any case; with
            # PYTHONDONTWRITEBYTECODE set, as on these machines, each worker it spawns and each
            # later run would compile it all again (~8 s a process). Compiled files are a cache.
            sys.dont_write_bytecode = False
        if args.func in (cmd_run, cmd_validate):
            from harness.suite import parse_suite

            args.parsed_suite = parse_suite(args.suite)  # a malformed file answers before the plugins load (~5 s)
        if args.plugin:
            plugins = use_plugins(load_plugins(specs=(*plugin_specs_from_env(), *args.plugin)))
        else:
            plugins = get_plugins()
        return args.func(args, plugins)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, FileNotFoundError) and exc.args and isinstance(exc.args[0], str) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `codefend plugins | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted: everything committed so far is in the store; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
