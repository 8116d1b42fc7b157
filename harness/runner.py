"""The matrix runner: plans chunks of cells, runs them through an executor, commits rows.

A *chunk* is a batch of one cell's samples. :func:`run_chunk` is a pure function of a
:class:`Chunk` that returns result rows and any new adversarial examples; only this process
writes the store, so an executor may run chunks anywhere. Oblivious adversarial examples are
keyed without the defense, so the first defense of an (attack, threat) computes them and every
other defense reuses them from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.adaptive import DefendedTarget, gradient_route, soft_prompt_kwargs
from harness.contracts import AttackBatch, Sample, Task, ThreatModel, TransferAttack, Victim
from harness.image_quality import psnr, ssim
from harness.labels import training_label
from harness.plugins import Plugins, get_plugins
from harness.store import SCHEMA_VERSION, Store, digest_json
from harness.suite import Cell, Suite, expand


@dataclass
class Chunk:
    cell: Cell
    run_id: str
    suite: str
    victim_fingerprint: str
    samples: list[Sample]
    fingerprints: list[str]
    adversarial_keys: list[str | None]
    cached_adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    progress: bool = False
    keep_images: frozenset[str] = frozenset()
    """Sample ids whose clean and defended images are stored (the board's example grid)."""


class CellError(Exception):
    """A cell that cannot produce trustworthy rows; the run records it and goes on with the others."""


class ThreatModelViolation(CellError):
    """An attack returned pixels outside its threat model (its ε ball, or [0,1])."""


BALL_TOLERANCE = 1e-6
"""Float slack of the ball check: ``clean + δ`` in float32 rounds by ~6e-8 near 1."""


def check_threat_model(attack: str, threat: ThreatModel, bounded: bool, clean: torch.Tensor,
                       adversarial: torch.Tensor) -> None:
    """Raise :class:`ThreatModelViolation` unless every adversarial image has the clean shape, is
    finite and in [0,1], and (bounded attacks) lies in the ball at the victim's resolution.
    Nothing is clipped: an attack that leaves its ball is a bug to see, not to hide."""
    where = f"attack '{attack}' under threat '{threat.name}' ({threat.norm}, ε={threat.eps:.6g})"
    if adversarial.shape != clean.shape:
        raise ThreatModelViolation(f"{where} returned pixels of shape {tuple(adversarial.shape)}, "
                                   f"expected the victim's {tuple(clean.shape)}")
    if not torch.isfinite(adversarial).all():
        raise ThreatModelViolation(f"{where} returned non-finite pixels")
    low, high = float(adversarial.min()), float(adversarial.max())
    if low < -BALL_TOLERANCE or high > 1 + BALL_TOLERANCE:
        raise ThreatModelViolation(f"{where} returned pixels outside [0,1] (measured range [{low:.6g}, {high:.6g}])")
    if not bounded:
        return
    delta = (adversarial.double() - clean.double()).flatten(1)
    size = delta.abs().max(dim=1).values if threat.norm == "linf" else delta.norm(dim=1)
    tolerance = BALL_TOLERANCE if threat.norm == "linf" else BALL_TOLERANCE * max(1.0, float(delta.shape[1]) ** 0.5)
    worst = int(size.argmax())
    if float(size[worst]) > threat.eps + tolerance:
        shown = f"{float(size[worst]) * 255:.4g}/255" if threat.norm == "linf" else f"{float(size[worst]):.6g}"
        raise ThreatModelViolation(
            f"{where} left its ball: measured {threat.norm} norm {shown} (= {float(size[worst]):.6g}) "
            f"on batch item {worst}, above ε={threat.eps:.6g}; {int((size > threat.eps + tolerance).sum())} of "
            f"{len(size)} images are outside. Fix the attack's projection (nothing is clipped for it)."
        )


@dataclass
class ChunkOutcome:
    rows: list[dict[str, Any]]
    adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]]
    artifacts: list[np.ndarray] = field(default_factory=list)


IMAGE_EXAMPLES = 3
"""The first samples of each cell whose clean and defended images are stored for the board."""


# Components are loaded once per process (a victim load can mean training it).
_components: dict[str, Any] = {}


def component(plugins: Plugins, kind: str, name: str, params: dict[str, Any]) -> Any:
    key = json.dumps([kind, name, params], sort_keys=True, default=str)
    if key not in _components:
        _components[key] = plugins.registry(kind).create(name, params)
    return _components[key]


def _image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def _seed_for(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:15], 16)


def said(text: str, output: str) -> bool:
    """Whether ``output`` contains ``text`` as whole words ("3" is not in "13"), ignoring case."""
    return re.search(rf"(?<!\w){re.escape(text.strip().lower())}(?!\w)", output.lower()) is not None


def _attack_cost(key: str, new: dict[str, tuple[np.ndarray, dict[str, Any]]],
                 cached: dict[str, tuple[np.ndarray, dict[str, Any]]]) -> dict[str, Any]:
    """What producing this row's adversarial example cost (its batch's totals), computed or reused."""
    record = (new.get(key) or cached[key])[1]
    return {k: v for k, v in record.items() if k != "sample"}


_ACCESS = {"gradients": "white-box", "queries": "query", "transfer": "transfer", "none": "none"}


CodeVersions = dict[str, str]
"""kind -> the code version of the plugin component a cell uses (``Entry.code_version``)."""


def code_versions(plugins: Plugins, cell: Cell) -> CodeVersions:
    """The code behind a cell's components: a row never outlives the code that produced it."""
    return {
        "victim": plugins.victims.get(cell.victim.name).code_version(),
        "task": plugins.tasks.get(cell.task.name).code_version(),
        "attack": plugins.attacks.get(cell.attack.name).code_version(),
        "defense": plugins.defenses.get(cell.defense.name).code_version(),
    }


def _attacked_input(cell: Cell, victim_fp: str, sample: Sample, code: CodeVersions) -> dict[str, Any]:
    """Everything that determines a sample's attacked image (the defense only when adaptive)."""
    adaptive = (
        {"defense": cell.defense.name, "defense_params": cell.defense.params, "eot": cell.attack.eot,
         "surrogate_steps": cell.attack.surrogate_steps, "defense_code": code["defense"]}
        if cell.attack.adaptive
        else {}
    )
    return {
        **adaptive,
        "code": {k: code[k] for k in ("victim", "task", "attack")},
        "schema": SCHEMA_VERSION,
        "victim": victim_fp,
        # not n: an adversarial example depends on its sample, not on the subset around it
        "task": cell.task.model_dump(exclude={"n"}),
        "sample": sample.id,
        "input": _image_hash(sample.image),
        "attack": cell.attack.name,
        "attack_params": cell.attack.params,
        "adaptive": cell.attack.adaptive,
        "threat": cell.threat.as_record(),
        "seed": cell.seed,
    }


def adversarial_key(cell: Cell, victim_fp: str, sample: Sample, code: CodeVersions) -> str | None:
    """Key of a sample's adversarial example (shared by every defense when oblivious, and by the
    single- and N-draw evaluations when adaptive); None for attacks that change nothing."""
    if cell.attack.name == "none":
        return None
    return digest_json(_attacked_input(cell, victim_fp, sample, code))


def result_fingerprint(cell: Cell, victim_fp: str, sample: Sample, code: CodeVersions) -> str:
    return digest_json(
        {
            **_attacked_input(cell, victim_fp, sample, code),
            # with n: set-level metrics (CIDEr) score a sample against the whole subset
            "task": cell.task.model_dump(),
            "victim_params": cell.victim.params,
            "defense": cell.defense.name,
            "defense_params": cell.defense.params,
            "defense_code": code["defense"],
            "draws": cell.attack.draws,
        }
    )


def run_chunk(chunk: Chunk, plugins: Plugins | None = None) -> ChunkOutcome:
    """Attack (or reuse), defend, generate: the rows of one chunk, unscored."""
    plugins = plugins or get_plugins()
    cell = chunk.cell
    victim: Victim = component(plugins, "victim", cell.victim.name, cell.victim.params)
    victim.load()
    task: Task = component(plugins, "task", cell.task.name, cell.task.factory_params())
    attack = component(plugins, "attack", cell.attack.name, cell.attack.params)
    defense = component(plugins, "defense", cell.defense.name, cell.defense.params)
    defense.bind(victim)

    clean = victim.prepare([s.image for s in chunk.samples]).to(victim.device)
    prompts = [s.prompt for s in chunk.samples]
    references = [task.attack_targets(s) for s in chunk.samples]
    targets = [refs[0] for refs in references]
    adversarial = clean.clone()
    new_adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    attack_record: dict[str, Any] = {}
    defense_generator = torch.Generator().manual_seed(_seed_for(cell.seed, cell.defense.model_dump(), chunk.fingerprints[0]))
    route = gradient_route(defense, cell.attack.eot, cell.attack.surrogate_steps) if cell.attack.adaptive else None
    attack_target = (
        DefendedTarget(victim, defense, route, defense_generator, surrogate_steps=cell.attack.surrogate_steps)
        if route else victim
    )

    todo = [i for i, key in enumerate(chunk.adversarial_keys) if key is not None and key not in chunk.cached_adversarial]
    for i, key in enumerate(chunk.adversarial_keys):
        if key is not None and key in chunk.cached_adversarial:
            adversarial[i] = torch.from_numpy(chunk.cached_adversarial[key][0]).to(clean.device)
    if todo:
        seeds = [_seed_for(cell.seed, chunk.adversarial_keys[i]) for i in todo]

        def scorer(outputs: Sequence[str], indices: Sequence[int]) -> list[float]:
            # Per-sample scores over the attacked subset only (CIDEr's document frequencies then
            # come from that subset: good enough to rank candidates, not a reported number).
            picked = [chunk.samples[todo[j]] for j in indices]
            return [float(s[task.metric]) for s in task.score(list(outputs), picked)]

        batch = AttackBatch(
            clean[todo], [prompts[i] for i in todo], [targets[i] for i in todo], task.kind,
            seeds=seeds, references=[list(references[i]) for i in todo], scorer=scorer,
        )
        steps = sum(attack.passes_per_sample()[1:]) or None
        started = time.perf_counter()
        with tqdm(total=steps, desc="  attack steps", unit="step", leave=False, disable=not chunk.progress) as bar:
            result = attack.perturb(attack_target, batch, cell.threat, torch.Generator().manual_seed(seeds[0]), progress=bar)
        seconds = (time.perf_counter() - started) / len(todo)
        check_threat_model(cell.attack.name, cell.threat, attack.uses_threat, clean[todo], result.pixels.to(clean.dtype))
        adversarial[todo] = result.pixels.to(clean.dtype)
        first, last = result.loss_rise or ((result.losses[0], result.losses[-1]) if result.losses else (None, None))
        attack_record = {
            "seconds_per_sample": seconds,
            "forward_passes": result.forward_passes,
            "backward_passes": result.backward_passes,
            "queries": result.queries,
            "loss_first": first,
            "loss_last": last,
        }
        for i in todo:
            key = chunk.adversarial_keys[i]
            assert key is not None
            new_adversarial[key] = (adversarial[i].detach().cpu().numpy(), {**attack_record, "sample": chunk.samples[i].id})

    delta = (adversarial - clean).flatten(1)
    linf = delta.abs().max(dim=1).values.tolist()
    l2 = delta.norm(dim=1).tolist()

    defended_prompts = defense.rewrite(prompts)
    soft_prompt = soft_prompt_kwargs(defense)

    def purified_by(generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            return defense.purify(adversarial, generator)

    started = time.perf_counter()
    purified = purified_by(defense_generator)
    defense_seconds = (time.perf_counter() - started) / len(chunk.samples)
    # inf PSNR (an untouched image) is stored as None: JSON has no infinity
    quality_psnr = [v if np.isfinite(v) else None for v in psnr(clean, purified).tolist()]
    quality_ssim = ssim(clean, purified).tolist()
    started = time.perf_counter()
    outputs = victim.generate(purified, defended_prompts, task.kind, **soft_prompt)
    generate_seconds = (time.perf_counter() - started) / len(chunk.samples)
    # N-draw evaluation (DiffHammer's resubmission): independent purifications of the same images
    draws = cell.attack.draws if defense.stochastic else 1
    draw_outputs = [outputs] + [
        victim.generate(purified_by(torch.Generator().manual_seed(
            _seed_for(cell.seed, cell.defense.model_dump(), chunk.fingerprints[0], "draw", j))),
            defended_prompts, task.kind, **soft_prompt)
        for j in range(1, draws)
    ]

    access = _ACCESS[attack.requires]
    surrogate_is_victim = isinstance(attack, TransferAttack) and _surrogate_is_victim(attack, cell, victim)
    if surrogate_is_victim:
        access = "white-box"  # its gradients are the victim's own
    label = training_label(cell.attack.name, cell.attack.params, attack, cell.threat, defense.training_attacks)
    attack_info = {
        "name": cell.attack.name,
        "params": cell.attack.params,
        "mode": "adaptive" if route else "oblivious",
        **(route.as_record() if route else {}),
        "access": access,
        "role": cell.attack.role,
        "draws": draws,
        "training_label": label,
        "seen_in_training": label == "seen",
        **({"surrogate": attack.surrogate, "surrogate_is_victim": surrogate_is_victim}
           if isinstance(attack, TransferAttack) else {}),
    }
    rows = []
    artifacts: list[np.ndarray] = []
    for i, sample in enumerate(chunk.samples):
        key = chunk.adversarial_keys[i]
        images: dict[str, str] = {}
        if sample.id in chunk.keep_images:
            for name, pixels in (("clean", clean[i]), ("defended", purified[i])):
                array = pixels.detach().cpu().float().numpy()
                artifacts.append(array)
                images[name] = Store.artifact_digest(array)
        targeted = (
            {"targeted": {"text": attack.target_text, "success": said(attack.target_text, outputs[i])}}
            if attack.target_text
            else {}
        )
        rows.append(
            {
                "fingerprint": chunk.fingerprints[i],
                "run_id": chunk.run_id,
                "suite": chunk.suite,
                "victim": cell.victim.name,
                "task": cell.task.label,
                "metric": task.metric,
                "attack": cell.attack.label,
                "threat": cell.threat.name,
                "norm": cell.threat.norm,
                "eps": cell.threat.eps,
                "defense": cell.defense.label,
                "sample_id": sample.id,
                "output": outputs[i],
                "adversarial_key": key,
                "record": {
                    "attack": {**attack_info, "reused": key in chunk.cached_adversarial if key else False, **targeted},
                    "threat": {
                        **cell.threat.as_record(),
                        "bounded": attack.uses_threat,
                        "space": f"victim input {victim.input_size[0]}x{victim.input_size[1]}, [0,1]",
                    },
                    "perturbation": {"linf": linf[i], "l2": l2[i]},
                    "defense": {"name": cell.defense.name, "params": cell.defense.params, "stochastic": defense.stochastic,
                                "seconds_per_image": defense_seconds, "passes_per_image": defense.passes_per_sample(),
                                "seen_attacks": defense.seen_attacks,
                                # the defense's output against the *clean* image
                                "psnr": quality_psnr[i], "ssim": quality_ssim[i]},
                    "generate_seconds_per_sample": generate_seconds,
                    **({"draw_outputs": [d[i] for d in draw_outputs]} if draws > 1 else {}),
                    "reference_attacked": targets[i],
                    **({"attack_cost": _attack_cost(key, new_adversarial, chunk.cached_adversarial)} if key else {}),
                    "victim_fingerprint": chunk.victim_fingerprint,
                    "seed": cell.seed,
                    **({"images": images} if images else {}),
                },
            }
        )
    return ChunkOutcome(rows=rows, adversarial=new_adversarial, artifacts=artifacts)


def _surrogate_is_victim(attack: TransferAttack, cell: Cell, victim: Victim) -> bool:
    """Whether a transfer attack's surrogate is the victim itself: the same spec, or (loading the
    surrogate) the same weights."""
    if attack.surrogate == cell.victim.name and dict(attack.surrogate_params) == dict(cell.victim.params):
        return True
    return attack.surrogate_fingerprint() == victim.fingerprint


def _versions() -> dict[str, str]:
    out = {}
    for package in ("codefend-bench", "torch", "transformers", "diffusers", "adversarial-robustness-toolbox",
                    "pycocoevalcap", "pluggy", "pydantic", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def provenance(suite: Suite, plugins: Plugins) -> dict[str, Any]:
    return {
        "suite": suite.model_dump(),
        "seed": suite.seed,
        "packages": _versions(),
        "plugins": {p.name: {"distribution": p.distribution, "version": p.version, "registered": p.registered}
                    for p in plugins.plugins.values()},
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "store_schema": SCHEMA_VERSION,
    }


@dataclass
class RunSummary:
    run_id: str
    cells: int
    computed_rows: int
    reused_rows: int
    seconds: float
    failures: list[str] = field(default_factory=list)
    """One line per failed cell: its label and what went wrong (the store keeps the traceback)."""


def run_suite(suite: Suite, store: Store, *, plugins: Plugins | None = None, progress: bool = True,
              suite_path: str = "") -> RunSummary:
    """Run every cell of ``suite`` into ``store``, skipping rows that are already there."""
    plugins = plugins or get_plugins()
    started = time.perf_counter()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    store.begin_run(run_id, suite.name, suite_path, provenance(suite, plugins))
    executor = plugins.executors.create(suite.executor)
    cells = expand(suite)
    computed = reused = 0
    failures: list[str] = []
    status = "failed"
    try:
        with tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress) as cell_bar:
            for cell in cells:
                cell_bar.set_postfix_str(cell.label, refresh=False)
                victim: Victim = component(plugins, "victim", cell.victim.name, cell.victim.params)
                victim.load()
                task: Task = component(plugins, "task", cell.task.name, cell.task.factory_params())
                samples = task.samples(cell.task.split, cell.task.n, suite.seed)
                code = code_versions(plugins, cell)
                fingerprints = [result_fingerprint(cell, victim.fingerprint, s, code) for s in samples]
                existing = store.existing(fingerprints)
                pending = [i for i, fp in enumerate(fingerprints) if fp not in existing]
                reused += len(samples) - len(pending)
                chunks = _chunks(cell, run_id, suite, victim.fingerprint, samples, fingerprints, pending, store, progress, code)
                try:
                    with tqdm(total=len(pending), desc="  samples", unit="sample", leave=False, disable=not progress or not pending) as bar:
                        for outcome in executor.map(run_chunk, chunks):
                            store.commit_chunk(outcome.rows, outcome.adversarial, outcome.artifacts)
                            computed += len(outcome.rows)
                            bar.update(len(outcome.rows))
                except CellError as exc:
                    # this cell's rows stay unscored (never on a board); every other cell goes on
                    failures.append(f"{cell.label}: {exc}")
                    store.record_failure(run_id, cell.label, str(exc), traceback.format_exc())
                    cell_bar.update(1)
                    continue
                if not all(existing.get(fp, False) for fp in fingerprints):
                    _score_cell(store, task, samples, fingerprints)
                cell_bar.update(1)
        status = "finished" if not failures else "finished with failed cells"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        seconds = time.perf_counter() - started
        store.finish_run(run_id, status, {"seconds": round(seconds, 2), "computed_rows": computed, "reused_rows": reused,
                                          "failed_cells": len(failures)})
    return RunSummary(run_id, len(cells), computed, reused, seconds, failures)


def _chunks(cell: Cell, run_id: str, suite: Suite, victim_fp: str, samples: list[Sample], fingerprints: list[str],
            pending: list[int], store: Store, progress: bool, code: CodeVersions) -> Iterator[Chunk]:
    """Chunks are built lazily so each one sees adversarial examples committed before it."""
    for start in range(0, len(pending), suite.batch_size):
        indices = pending[start : start + suite.batch_size]
        keys = [adversarial_key(cell, victim_fp, samples[i], code) for i in indices]
        yield Chunk(
            cell=cell,
            run_id=run_id,
            suite=suite.name,
            victim_fingerprint=victim_fp,
            samples=[samples[i] for i in indices],
            fingerprints=[fingerprints[i] for i in indices],
            adversarial_keys=keys,
            cached_adversarial=store.adversarial(k for k in keys if k is not None),
            progress=progress,
            keep_images=frozenset(s.id for s in samples[:IMAGE_EXAMPLES]),
        )


def _score_cell(store: Store, task: Task, samples: list[Sample], fingerprints: list[str]) -> None:
    """Score a complete cell at once: set-level metrics see exactly the cell's samples.

    With N purification draws per sample, each draw is scored as a whole cell and a sample's
    headline is its worst draw: robust only if it survives every draw. The first draw's scores
    stay in the row (``single_draw``), so the board shows both."""
    outputs = store.outputs(fingerprints)
    draws = store.draw_outputs(fingerprints)
    count = max((len(d) for d in draws.values()), default=1)
    per_draw = [
        task.score([draws[fp][j] if fp in draws else outputs[fp] for fp in fingerprints], samples)
        for j in range(count)
    ]
    scored: dict[str, tuple[dict[str, float], float]] = {}
    for i, fp in enumerate(fingerprints):
        first = dict(per_draw[0][i])
        if count == 1:
            scored[fp] = (first, float(first[task.metric]))
            continue
        values = [float(d[i][task.metric]) for d in per_draw]
        first.update({"single_draw": values[0], "draw_scores": values, "draws": count})
        scored[fp] = (first, min(values))
    store.set_scores(scored)


def default_store_path(suite: Suite, out: str | Path | None) -> Path:
    return Path(out or Path("results") / suite.name) / "store.sqlite"
