"""The matrix runner: plans chunks of cells, runs them through an executor, commits rows.

A *chunk* is a batch of one cell's samples. :func:`run_chunk` is a pure function of a
:class:`Chunk` that returns result rows and any new adversarial examples; only this process
writes the store, so an executor may run chunks anywhere. Oblivious adversarial examples are
keyed without the defense, so the first defense of an (attack, threat) computes them and every
other defense reuses them from the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import socket
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.adaptive import DefendedTarget, GradientRoute, gradient_route, soft_prompt_kwargs
from harness.code_version import kernel_code_version, library_code_version, library_versions
from harness.graph import victim_key
from harness.contracts import (AttackBatch, CheapFingerprintVictim, CorpusScoredTask, Sample, SkippingTask, Task,
                               TemplatedVictim, ThreatModel, TransferAttack, Victim)
from harness.image_quality import psnr, ssim
from harness.labels import training_label
from harness.plugins import BUILTIN_DISTRIBUTION, Plugins, get_plugins
from harness.records import (AttackCost, AttackInfo, DefenseInfo, Perturbation, ResultRow, RowImages, RowRecord,
                             TargetedInfo, ThreatInfo, VictimInfo)
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
    seed_keys: list[str] = field(default_factory=list)
    """Per sample, what its randomness is drawn from: its adversarial key (or, for clean rows,
    its fingerprint) without the plugins' code versions, so that editing code does not redraw
    the attack's start or the defense's noise (see :func:`seed_key`)."""


class CellError(Exception):
    """A cell that cannot produce trustworthy rows; the run records it and goes on with the others."""


class ThreatModelViolation(CellError):
    """An attack returned pixels outside its threat model (its ε ball, or [0,1])."""


class DefenseContractViolation(CellError):
    """A defense's ``purify`` returned something the contract rules out (shape, dtype, range)."""


BALL_TOLERANCE = 1e-6
"""Float slack of the ball check: ``clean + δ`` in float32 rounds by ~6e-8 near 1."""


def check_defense_output(defense: str, pixels: torch.Tensor, purified: Any) -> torch.Tensor:
    """``purified`` if it keeps ``Defense.purify``'s contract for input ``pixels`` (a tensor of
    the same shape, floating point, finite, in [0,1]); else :class:`DefenseContractViolation`,
    naming the defense and what to fix. Nothing is clipped or reshaped for it: a defense whose
    output the victim would silently reinterpret is a bug to see."""
    where = f"defense '{defense}': purify"
    if not isinstance(purified, torch.Tensor):
        raise DefenseContractViolation(f"{where} returned {type(purified).__name__}, not a torch.Tensor of pixels")
    if purified.shape != pixels.shape:
        raise DefenseContractViolation(
            f"{where} returned shape {tuple(purified.shape)} for input {tuple(pixels.shape)}: it must return "
            "the images it was given, same batch, channels and size (resize back inside purify if it works at another size)")
    if not purified.is_floating_point():
        raise DefenseContractViolation(f"{where} returned dtype {purified.dtype}: return float pixels in [0,1]")
    if not torch.isfinite(purified).all():
        raise DefenseContractViolation(f"{where} returned non-finite pixels (NaN or inf)")
    low, high = float(purified.min()), float(purified.max())
    if low < -BALL_TOLERANCE or high > 1 + BALL_TOLERANCE:
        raise DefenseContractViolation(
            f"{where} returned pixels outside [0,1] (measured range [{low:.6g}, {high:.6g}]): clamp its output to "
            "[0,1] (0-255 or [-1,1] pixels are the usual cause)")
    return purified


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
    rows: list[ResultRow]
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
                 cached: dict[str, tuple[np.ndarray, dict[str, Any]]]) -> AttackCost:
    """What producing this row's adversarial example cost (its batch's totals), computed or reused."""
    return AttackCost.model_validate((new.get(key) or cached[key])[1])


_ACCESS = {"gradients": "white-box", "queries": "query", "transfer": "transfer", "none": "none"}


CodeVersions = dict[str, str]
"""kind -> the code version of the plugin component a cell uses (``Entry.code_version``), and
``"kernel"``: the kernel modules that make rows (:func:`~harness.code_version.kernel_code_version`);
each followed by the version of the libraries its distribution computes with
(:func:`~harness.code_version.library_code_version`), so that an oblivious attack's examples,
shared by every defense, never depend on a defense's libraries."""


def code_versions(plugins: Plugins, cell: Cell) -> CodeVersions:
    """The code behind a cell's components, the libraries they run on included: a row never
    outlives the code that produced it."""
    entries = {
        "victim": plugins.victims.get(cell.victim.name),
        "task": plugins.tasks.get(cell.task.name),
        "attack": plugins.attacks.get(cell.attack.name),
        "defense": plugins.defenses.get(cell.defense.name),
    }
    return {
        "kernel": f"{kernel_code_version()} {library_code_version([BUILTIN_DISTRIBUTION])}",
        **{kind: f"{entry.code_version()} {library_code_version([entry.distribution])}" for kind, entry in entries.items()},
    }


def _attacked_input(cell: Cell, victim_fp: str, sample: Sample, code: CodeVersions) -> dict[str, Any]:
    """Everything that determines a sample's attacked image (the defense only when adaptive)."""
    adaptive = (
        {"defense": cell.defense.name, "defense_params": cell.defense.params, "eot": cell.attack.eot,
         "surrogate_steps": cell.attack.surrogate_steps, "grafting": cell.attack.grafting,
         "defense_code": code["defense"],
         # absent at 1, so keys (and seeds) of attacks judged on one draw stay what they were
         **({"judging_draws": cell.attack.judging_draws} if cell.attack.judging_draws != 1 else {})}
        if cell.attack.adaptive
        else {}
    )
    return {
        **adaptive,
        "code": {k: code[k] for k in ("kernel", "victim", "task", "attack")},
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


_NO_CODE: CodeVersions = {"kernel": "", "victim": "", "task": "", "attack": "", "defense": ""}


def seed_key(cell: Cell, victim_fp: str, sample: Sample) -> str:
    """What a sample's random draws (attack start, defense noise) derive from: its identity in
    the cell, without code versions (a code edit re-runs a row; it need not redraw its noise) and
    without the judging draws (they choose among the attack's runs, not where the runs start)."""
    if cell.attack.judging_draws != 1:
        cell = dataclasses.replace(cell, attack=cell.attack.model_copy(update={"judging_draws": 1}))
    return adversarial_key(cell, victim_fp, sample, _NO_CODE) or result_fingerprint(cell, victim_fp, sample, _NO_CODE)


def _attack_components(plugins: Plugins, cell: Cell) -> tuple[Victim, Task, Any]:
    """The loaded victim, the task and the attack of a cell (from this process's cache)."""
    victim: Victim = component(plugins, "victim", cell.victim.name, cell.victim.params)
    victim.load()
    task: Task = component(plugins, "task", cell.task.name, cell.task.factory_params())
    return victim, task, component(plugins, "attack", cell.attack.name, cell.attack.params)


def run_attack_chunk(chunk: Chunk, plugins: Plugins | None = None) -> ChunkOutcome:
    """The adversarial examples of one chunk of an oblivious attack (no defense, no rows): the
    graph's ``attack`` node, shared by every defense's rows."""
    plugins = plugins or get_plugins()
    cell = chunk.cell
    victim, task, attack = _attack_components(plugins, cell)
    clean = victim.prepare([s.image for s in chunk.samples]).to(victim.device)
    _, new_adversarial = _attack_chunk(chunk, victim, task, attack, victim, clean)
    return ChunkOutcome(rows=[], adversarial=new_adversarial)


def _attack_chunk(chunk: Chunk, victim: Victim, task: Task, attack: Any, attack_target: Any,
                  clean: torch.Tensor, judging_draws: int = 1) -> tuple[torch.Tensor, dict[str, tuple[np.ndarray, dict[str, Any]]]]:
    """The chunk's adversarial images: cached ones reused, the others attacked (and checked
    against the threat model) as one batch; returns them and the new ones by key.
    ``judging_draws``: generations per judgement of a sample (:class:`AttackBatch`)."""
    cell = chunk.cell
    prompts = [s.prompt for s in chunk.samples]
    references = [task.attack_targets(s) for s in chunk.samples]
    targets = [refs[0] for refs in references]
    adversarial = clean.clone()
    new_adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    todo = [i for i, key in enumerate(chunk.adversarial_keys) if key is not None and key not in chunk.cached_adversarial]
    for i, key in enumerate(chunk.adversarial_keys):
        if key is not None and key in chunk.cached_adversarial:
            adversarial[i] = torch.from_numpy(chunk.cached_adversarial[key][0]).to(clean.device)
    if todo:
        seeds = [_seed_for(cell.seed, chunk.seed_keys[i]) for i in todo]

        def scorer(outputs: Sequence[str], indices: Sequence[int]) -> list[float]:
            # Per-sample scores over the attacked subset only (CIDEr's document frequencies then
            # come from that subset: good enough to rank candidates, not a reported number).
            picked = [chunk.samples[todo[j]] for j in indices]
            return [float(s[task.metric]) for s in task.score(list(outputs), picked)]

        batch = AttackBatch(
            clean[todo], [prompts[i] for i in todo], [targets[i] for i in todo], task.kind,
            seeds=seeds, references=[list(references[i]) for i in todo], scorer=scorer,
            judging_draws=judging_draws,
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
            "objectives_unavailable": result.objectives_unavailable,
        }
        for i in todo:
            key = chunk.adversarial_keys[i]
            assert key is not None
            new_adversarial[key] = (adversarial[i].detach().cpu().numpy(), {**attack_record, "sample": chunk.samples[i].id})
    return adversarial, new_adversarial


def run_chunk(chunk: Chunk, plugins: Plugins | None = None) -> ChunkOutcome:
    """Attack (adaptive, or reuse), defend, generate: the rows of one chunk, unscored."""
    plugins = plugins or get_plugins()
    cell = chunk.cell
    victim, task, attack = _attack_components(plugins, cell)
    defense = component(plugins, "defense", cell.defense.name, cell.defense.params)
    defense.bind(victim)

    clean = victim.prepare([s.image for s in chunk.samples]).to(victim.device)
    route = (gradient_route(defense, cell.attack.eot, cell.attack.surrogate_steps, cell.attack.grafting)
             if cell.attack.adaptive else None)
    # The defender's randomness is secret: an adaptive attack draws the defense's noise from its
    # own generator, never from the one that purifies for evaluation (an attack that could read
    # or advance that state would know the evaluation's noise in advance).
    attack_target = (
        DefendedTarget(victim, defense, route, torch.Generator().manual_seed(_defense_seed(chunk, "attack")),
                       surrogate_steps=cell.attack.surrogate_steps)
        if route else victim
    )
    adversarial, new_adversarial = _attack_chunk(chunk, victim, task, attack, attack_target, clean,
                                                 _judging_draws(cell, route, defense))
    defended = _defend(chunk, victim, task, defense, adversarial, clean,
                       torch.Generator().manual_seed(_defense_seed(chunk)))
    rows, artifacts = _rows(chunk, victim, task, attack, defense, route, clean, adversarial, defended, new_adversarial)
    return ChunkOutcome(rows=rows, adversarial=new_adversarial, artifacts=artifacts)


def _judging_draws(cell: Cell, route: GradientRoute | None, defense: Defense) -> int:
    """Generations per judgement of a sample by the attack: the cell's judging draws through a
    stochastic defense (the attack judges a sample as the board does, over N draws), else one."""
    return cell.attack.judging_draws if route is not None and defense.stochastic else 1


def _defense_seed(chunk: Chunk, *draw: Any) -> int:
    """The seed of the defense's randomness for a chunk (and, with ``draw``, for its extra N-draw
    draws and for the adaptive attack's own draws)."""
    identity = chunk.cell.defense.model_dump(exclude={"resources", "train_resources"})
    return _seed_for(chunk.cell.seed, identity, chunk.seed_keys[0], *draw)


@dataclass
class _Defended:
    """What the defense and the victim made of a chunk's (attacked) images."""

    purified: torch.Tensor
    draw_outputs: list[list[str]]
    """The outputs of each purification draw (one draw for a deterministic defense); the first
    draw's are the row's ``output``."""
    sent: list[str]
    seconds_per_image: float
    generate_seconds_per_sample: float
    psnr: list[float | None]
    ssim: list[float]


def _defend(chunk: Chunk, victim: Victim, task: Task, defense: Any, adversarial: torch.Tensor, clean: torch.Tensor,
            generator: torch.Generator) -> _Defended:
    cell = chunk.cell
    defended_prompts = defense.rewrite([s.prompt for s in chunk.samples])

    def generated(purified: torch.Tensor) -> list[str]:
        with torch.no_grad():  # a per-sample prompt is made from the very pixels the victim reads
            return victim.generate(purified, defended_prompts, task.kind,
                                   **soft_prompt_kwargs(defense, purified, defended_prompts))

    def purified_by(generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            return check_defense_output(cell.defense.name, adversarial, defense.purify(adversarial, generator))

    _synchronise(adversarial.device)  # CUDA runs asynchronously: time the work, not its launch
    started = time.perf_counter()
    purified = purified_by(generator)
    _synchronise(adversarial.device)
    seconds_per_image = (time.perf_counter() - started) / len(chunk.samples)
    started = time.perf_counter()
    outputs = generated(purified)
    _synchronise(purified.device)
    generate_seconds = (time.perf_counter() - started) / len(chunk.samples)
    # N-draw evaluation (DiffHammer's resubmission): independent purifications of the same images
    draws = cell.attack.draws if defense.stochastic else 1
    draw_outputs = [outputs] + [
        generated(purified_by(torch.Generator().manual_seed(_defense_seed(chunk, "draw", j))))
        for j in range(1, draws)
    ]
    sent = ([victim.prompt_text(p, task.kind) for p in defended_prompts] if isinstance(victim, TemplatedVictim)
            else list(defended_prompts))
    return _Defended(
        purified=purified, draw_outputs=draw_outputs, sent=sent, seconds_per_image=seconds_per_image,
        generate_seconds_per_sample=generate_seconds,
        # inf PSNR (an untouched image) is stored as None: JSON has no infinity
        psnr=[v if np.isfinite(v) else None for v in psnr(clean, purified).tolist()],
        ssim=ssim(clean, purified).tolist(),
    )


def _attack_info(cell: Cell, victim: Victim, attack: Any, defense: Any, route: Any, draws: int) -> AttackInfo:
    access = _ACCESS[attack.requires]
    surrogate_is_victim = isinstance(attack, TransferAttack) and _surrogate_is_victim(attack, cell, victim)
    if surrogate_is_victim:
        access = "white-box"  # its gradients are the victim's own
    label = training_label(cell.attack.name, cell.attack.params, attack, cell.threat, defense.training_attacks)
    return AttackInfo(
        name=cell.attack.name, params=cell.attack.params, mode="adaptive" if route else "oblivious",
        gradient=route.method if route else None, eot=route.eot if route else None,
        surrogate_process=route.surrogate if route else None, eot_grafting=bool(route and route.grafted),
        judging_draws=_judging_draws(cell, route, defense),
        access=access, role=cell.attack.role, draws=draws, training_label=label, seen_in_training=label == "seen",
        **({"surrogate": attack.surrogate, "surrogate_is_victim": surrogate_is_victim}
           if isinstance(attack, TransferAttack) else {}),
    )


def _rows(chunk: Chunk, victim: Victim, task: Task, attack: Any, defense: Any, route: Any, clean: torch.Tensor,
          adversarial: torch.Tensor, defended: _Defended,
          new_adversarial: dict[str, tuple[np.ndarray, dict[str, Any]]]) -> tuple[list[ResultRow], list[np.ndarray]]:
    cell = chunk.cell
    delta = (adversarial - clean).flatten(1)
    linf, l2 = delta.abs().max(dim=1).values.tolist(), delta.norm(dim=1).tolist()
    draws = len(defended.draw_outputs)
    attack_info = _attack_info(cell, victim, attack, defense, route, draws)
    threat = ThreatInfo(**cell.threat.as_record(), bounded=attack.uses_threat,
                        space=f"victim input {victim.input_size[0]}x{victim.input_size[1]}, [0,1]")
    defense_info = dict(name=cell.defense.name, params=cell.defense.params, stochastic=defense.stochastic,
                        seconds_per_image=defended.seconds_per_image, passes_per_image=defense.passes_per_sample(),
                        seen_attacks=defense.seen_attacks)
    rows, artifacts = [], []
    for i, sample in enumerate(chunk.samples):
        key = chunk.adversarial_keys[i]
        output = defended.draw_outputs[0][i]
        images = None
        if sample.id in chunk.keep_images:
            digests = []
            for pixels in (clean[i], defended.purified[i]):
                array = pixels.detach().cpu().float().numpy()
                artifacts.append(array)
                digests.append(Store.artifact_digest(array))
            images = RowImages(clean=digests[0], defended=digests[1])
        targeted = (TargetedInfo(text=attack.target_text, success=said(attack.target_text, output))
                    if attack.target_text else None)
        record = RowRecord(
            victim=VictimInfo(prompt=defended.sent[i]),
            attack=attack_info.model_copy(update={"reused": key in chunk.cached_adversarial if key else False,
                                                  "targeted": targeted}),
            threat=threat,
            perturbation=Perturbation(linf=linf[i], l2=l2[i]),
            # psnr/ssim: the defense's output against the *clean* image
            defense=DefenseInfo(**defense_info, psnr=defended.psnr[i], ssim=defended.ssim[i]),
            generate_seconds_per_sample=defended.generate_seconds_per_sample,
            draw_outputs=[d[i] for d in defended.draw_outputs] if draws > 1 else None,
            reference_attacked=task.attack_targets(sample)[0],
            attack_cost=_attack_cost(key, new_adversarial, chunk.cached_adversarial) if key else None,
            victim_fingerprint=chunk.victim_fingerprint,
            seed=cell.seed,
            images=images,
        )
        rows.append(ResultRow(
            fingerprint=chunk.fingerprints[i], run_id=chunk.run_id, suite=chunk.suite, victim=cell.victim.name,
            task=cell.task.label, metric=task.metric, attack=cell.attack.label, threat=cell.threat.name,
            norm=cell.threat.norm, eps=cell.threat.eps, defense=cell.defense.label, sample_id=sample.id,
            output=output, adversarial_key=key, record=record,
        ))
    return rows, artifacts


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _surrogate_is_victim(attack: TransferAttack, cell: Cell, victim: Victim) -> bool:
    """Whether a transfer attack's surrogate is the victim itself: the same spec, or (loading the
    surrogate) the same weights."""
    if attack.surrogate == cell.victim.name and dict(attack.surrogate_params) == dict(cell.victim.params):
        return True
    return attack.surrogate_fingerprint() == victim.fingerprint


def _versions(plugins: Plugins) -> dict[str, str]:
    """The run's distributions (the built-ins', every plugin's) and the libraries that make its
    rows (:func:`~harness.code_version.library_versions`)."""
    distributions = {BUILTIN_DISTRIBUTION, *(p.distribution for p in plugins.plugins.values())}
    own = {}
    for name in sorted(distributions):
        try:
            own[name] = version(name)
        except (PackageNotFoundError, ValueError):  # an in-process plugin: no distribution
            continue
    return {**own, **library_versions(distributions)}


def provenance(suite: Suite, plugins: Plugins) -> dict[str, Any]:
    return {
        "suite": suite.model_dump(),
        "seed": suite.seed,
        "packages": _versions(plugins),
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


@dataclass(frozen=True)
class NodeCall:
    """What a worker needs to run one node of the work graph (it must pickle)."""

    stage: str
    payload: Any
    plugin_modules: tuple[tuple[str, str], ...] = ()
    """(name, module) pairs of in-process plugins beyond the entry points (tests, ``load_plugins(extra=...)``)."""
    use_entry_points: bool = True
    plugin_specs: tuple[str, ...] = ()
    """The ``--plugin`` / ``CODEFEND_PLUGINS`` specs (module names or ``.py`` paths, which a
    worker on another machine must be able to import too)."""
    threads: int | None = None


@dataclass
class NodeResult:
    value: Any = None
    seconds: float = 0.0
    error: str | None = None
    traceback: str | None = None


_worker_plugins: dict[tuple[Any, ...], Plugins] = {}


def _plugins_for(call: NodeCall) -> Plugins:
    import importlib

    from harness.plugins import load_plugins, plugin_specs_from_env, use_plugins

    key = (call.plugin_modules, call.use_entry_points, call.plugin_specs)
    if key not in _worker_plugins:
        if not call.plugin_modules and call.use_entry_points and call.plugin_specs == plugin_specs_from_env():
            _worker_plugins[key] = get_plugins()
        else:
            extra = [(name, importlib.import_module(module)) for name, module in call.plugin_modules]
            _worker_plugins[key] = use_plugins(load_plugins(extra=extra, use_entry_points=call.use_entry_points,
                                                            specs=call.plugin_specs))
    return _worker_plugins[key]


def execute_node(call: NodeCall, plugins: Plugins | None = None) -> NodeResult:
    """Run one node in this process (a worker, or the driver itself). An exception becomes a
    :class:`NodeResult` with its traceback, so that it fails its own cells only; a worker that
    dies is the executor's to retry."""
    started = time.perf_counter()
    try:
        if call.threads is not None and torch.get_num_threads() != call.threads:
            torch.set_num_threads(call.threads)
        plugins = plugins or _plugins_for(call)
        if call.stage == "train":
            preparation, victim_spec = call.payload
            if preparation.needs_victim:
                victim = component(plugins, "victim", victim_spec.name, victim_spec.params)
                victim.load()
                with torch.enable_grad():
                    preparation.run(victim, plugins=plugins)
            else:
                with torch.enable_grad():
                    preparation.run(plugins=plugins)
            value = None
        elif call.stage == "victim":
            victim = component(plugins, "victim", call.payload.name, call.payload.params)
            victim.load()
            value = victim.fingerprint
        elif call.stage == "attack":
            value = run_attack_chunk(call.payload, plugins)
        elif call.stage == "rows":
            value = run_chunk(call.payload, plugins)
        else:
            raise ValueError(f"unknown work-graph stage {call.stage!r}")
        return NodeResult(value=value, seconds=time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a failing node fails its cells, never the run
        return NodeResult(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                          seconds=time.perf_counter() - started)


@dataclass
class RunSummary:
    run_id: str
    cells: int
    computed_rows: int
    reused_rows: int
    seconds: float
    failures: list[str] = field(default_factory=list)
    """One line per failed cell: its label and what went wrong (the store keeps the traceback)."""
    node_seconds: dict[str, float] = field(default_factory=dict)
    """Measured seconds of each node that ran (by node id): the benchmark's critical path."""


def task_sizes(suite: Suite, plugins: Plugins) -> dict[str, int]:
    """Each task's sample count, by label (``n``, or its split's size, which reads the data)."""
    sizes: dict[str, int] = {}
    for spec in suite.tasks:
        if spec.n is not None:
            sizes[spec.label] = spec.n
        else:
            task = plugins.tasks.create(spec.name, spec.factory_params())
            sizes[spec.label] = len(task.samples(spec.split, None, suite.seed))
    return sizes


def run_suite(suite: Suite, store: Store, *, plugins: Plugins | None = None, progress: bool = True,
              suite_path: str = "", executor: Any = None) -> RunSummary:
    """Run the suite's work graph into ``store``, skipping rows that are already there.

    ``executor`` (an :class:`harness.executors.Executor`) defaults to the suite's. Only this
    process writes the store: workers return rows and adversarial examples, committed as they
    arrive, so a rerun after any interruption resumes from the last committed node. A second
    run on the same store meanwhile raises :class:`harness.store.StoreBusy`."""
    with store.writer_lock():
        return _run_suite_locked(suite, store, plugins=plugins, progress=progress, suite_path=suite_path,
                                 executor=executor)


def _run_suite_locked(suite: Suite, store: Store, *, plugins: Plugins | None, progress: bool, suite_path: str,
                      executor: Any) -> RunSummary:
    from harness.graph import plan

    plugins = plugins or get_plugins()
    started = time.perf_counter()
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    store.begin_run(run_id, suite.name, suite_path, provenance(suite, plugins))
    graph = plan(suite, plugins, task_sizes(suite, plugins))
    own_executor = executor is None
    if executor is None:
        executor = plugins.executors.create(suite.executor.name, suite.executor.params)
    driver = _Driver(suite, store, plugins, graph, executor, run_id, progress)
    status = "failed"
    try:
        driver.run()
        status = "finished" if not driver.failures else "finished with failed cells"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if own_executor:
            executor.close()
        driver.close_bars()
        seconds = time.perf_counter() - started
        store.finish_run(run_id, status, {"seconds": round(seconds, 2), "computed_rows": driver.computed,
                                          "reused_rows": driver.reused, "failed_cells": len(driver.failures),
                                          "skipped_samples": driver.skipped_samples})
    return RunSummary(run_id, len(graph.cells), driver.computed, driver.reused, seconds,
                      [f"{label}: {error}" for label, error in driver.failures.items()], driver.node_seconds)


class _Driver:
    """Walks the work graph: submits nodes whose dependencies are done, critical path first;
    commits what comes back; plans a victim's chunks once its fingerprint is known."""

    def __init__(self, suite: Suite, store: Store, plugins: Plugins, graph: Any, executor: Any, run_id: str,
                 progress: bool):
        from harness.graph import STAGES

        self.suite, self.store, self.plugins, self.graph, self.executor = suite, store, plugins, graph, executor
        self.run_id, self.progress = run_id, progress
        self.state = {node_id: "waiting" for node_id in graph.nodes}
        self.dependents = graph.dependents()
        self.priority = graph.remaining_path()
        self.victim_fp: dict[str, str] = {}
        self.cell_data: dict[int, dict[str, Any]] = {}
        self.samples_cache: dict[tuple[str, int | None], list[Sample]] = {}
        self.short_tasks: set[tuple[str, int]] = set()
        """(task label, n) pairs whose samples fell short of n: warned about once."""
        self.samples_lock = threading.Lock()
        self.samples_failure: Exception | None = None
        self.skipped_samples: dict[str, list[dict[str, str]]] = {}
        """task label -> the samples its reader left out as malformed (``on_bad_sample: skip``)."""
        self.failures: dict[str, str] = {}
        self.computed = self.reused = 0
        self.node_seconds: dict[str, float] = {}
        self.running: dict[Any, str] = {}
        # started on the first submission: a rerun whose rows are all stored starts no worker
        self.executor_started = False
        self.recipe = plugins.recipe()
        counts = graph.stage_counts()
        self.bars = {stage: tqdm(total=counts.get(stage, 0), desc=f"{stage:6s}", unit="node", position=i,
                                 disable=not progress, leave=True, dynamic_ncols=True)
                     for i, stage in enumerate(STAGES)}

    def close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        # The tasks' samples load (the shapes world builds on first use) while the executor spawns
        # its workers, instead of later inside the first training node, with a core idle.
        self.loader = threading.Thread(target=self._load_all_samples, name="load-samples", daemon=True)
        self.loader.start()
        ready = [n for n, node in self.graph.nodes.items() if not node.deps]
        while True:
            ready.sort(key=lambda n: -self.priority[n])
            while ready:
                self._dispatch(ready.pop(0), ready)
            if not self.running:
                break
            for handle, result in self.executor.wait():
                node_id = self.running.pop(handle)
                self.node_seconds[node_id] = result.seconds
                if result.error is not None:
                    self._fail(node_id, result.error, result.traceback or "")
                else:
                    self._complete(node_id, result.value)
                self._release(node_id, ready)
        waiting = [n for n, s in self.state.items() if s == "waiting"]
        if waiting:  # only a failed dependency can leave nodes waiting
            raise RuntimeError(f"work graph stalled with {len(waiting)} nodes waiting, first {waiting[0]}")

    def _release(self, node_id: str, ready: list[str]) -> None:
        for dependent in self.dependents[node_id]:
            if self.state[dependent] == "waiting" and all(self.state[d] == "done" for d in self.graph.nodes[dependent].deps):
                ready.append(dependent)

    def _finish(self, node_id: str, state: str = "done") -> None:
        self.state[node_id] = state
        self.bars[self.graph.nodes[node_id].stage].update(1)

    def _dispatch(self, node_id: str, ready: list[str]) -> None:
        node = self.graph.nodes[node_id]
        if self.state[node_id] != "waiting":
            return
        call = None
        if node.stage == "train":
            done = node.preparation.done
            if not self._needed(node_id) or (done is not None and done()):
                self._finish(node_id)
            else:
                call = NodeCall("train", (node.preparation, node.victim), *self.recipe)
        elif node.stage == "victim":
            victim = component(self.plugins, "victim", node.victim.name, node.victim.params)
            known = victim.fingerprint_without_loading() if isinstance(victim, CheapFingerprintVictim) else None
            if known is None:
                call = NodeCall("victim", node.victim, *self.recipe)
            else:
                self._complete(node_id, known)
        elif node.stage == "attack":
            chunk = self._attack_chunk(node)
            if chunk is None:
                self._finish(node_id)
            else:
                call = NodeCall("attack", chunk, *self.recipe)
        elif node.stage == "rows":
            chunk = self._rows_chunk(node)
            if chunk is None:
                self._finish(node_id)
            else:
                call = NodeCall("rows", chunk, *self.recipe)
        else:
            self._score(node)
            self._finish(node_id)
        if call is None:
            self._release(node_id, ready)
            return
        if not self.executor_started:
            self.executor.start()
            self.executor_started = True
            # bad data stops the run here, before any node computes (the samples loaded while
            # the workers spawned)
            self.loader.join()
            if self.samples_failure is not None:
                raise self.samples_failure
            if self.progress and self.executor.dashboard_url:
                print(f"Ray dashboard: {self.executor.dashboard_url}", file=sys.stderr)
        call = dataclasses.replace(call, threads=self.executor.threads_for(node.resources))
        self.state[node_id] = "running"
        self.running[self.executor.submit(execute_node, call, node.resources)] = node_id

    def _needed(self, node_id: str) -> bool:
        """Whether any work waiting on this node is still to do (a rerun skips cached training)."""
        stack, seen = list(self.dependents[node_id]), set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if self.graph.nodes[current].stage in ("rows", "score", "victim") and self.state[current] == "waiting":
                return True
            stack.extend(self.dependents[current])
        return False

    def _complete(self, node_id: str, value: Any) -> None:
        node = self.graph.nodes[node_id]
        if node.stage == "victim":
            self.victim_fp[node_id.removeprefix("victim:")] = value
            self._plan_victim(node_id)
        elif node.stage in ("attack", "rows"):
            outcome: ChunkOutcome = value
            self.store.commit_chunk(outcome.rows, outcome.adversarial, outcome.artifacts)
            self.computed += len(outcome.rows)
        self._finish(node_id)

    def _fail(self, node_id: str, error: str, trace: str) -> None:
        """Fail the node and everything that waits on it; record each affected cell once."""
        root = self.graph.nodes[node_id]
        stack = [node_id]
        while stack:
            current = stack.pop()
            if self.state[current] in ("failed", "done"):
                continue
            node = self.graph.nodes[current]
            self._finish(current, "failed")
            if node.stage in ("rows", "score"):
                for index in node.cells:
                    label = self.graph.cells[index].label
                    if label not in self.failures:
                        where = "" if root.stage in ("rows", "score") else f"{root.stage} node '{root.label}' failed: "
                        self.failures[label] = where + error
                        self.store.record_failure(self.run_id, label, where + error, trace)
            stack.extend(self.dependents[current])

    # -- planning a victim's chunks -----------------------------------------------------------
    def _load_all_samples(self) -> None:
        for cell in {cell.task.model_dump_json(): cell for cell in self.graph.cells}.values():
            try:
                self._samples(cell)
            except Exception as exc:  # the walk raises it at its next step: bad data stops the run early
                self.samples_failure = exc
                return

    def _samples(self, cell: Cell) -> list[Sample]:
        key = (cell.task.model_dump_json(), cell.task.n)
        with self.samples_lock:
            return self._samples_locked(cell, key)

    def _samples_locked(self, cell: Cell, key: tuple[str, int | None]) -> list[Sample]:
        if key not in self.samples_cache:
            task: Task = component(self.plugins, "task", cell.task.name, cell.task.factory_params())
            self.samples_cache[key] = task.samples(cell.task.split, cell.task.n, self.suite.seed)
            if isinstance(task, SkippingTask) and (skipped := task.skipped_samples(cell.task.split)):
                self.skipped_samples[cell.task.label] = [dataclasses.asdict(s) for s in skipped]
                warnings.warn(f"{cell.task.label}: {len(skipped)} malformed samples left out (on_bad_sample: skip), "
                              f"first {skipped[0].id}: {skipped[0].problem}; the board counts them")
        return self.samples_cache[key]

    def _plan_victim(self, victim_node: str) -> None:
        """With the victim's fingerprint known: every row's fingerprint; rows already in the
        store are skipped (and the nodes that only they needed)."""
        key = victim_node.removeprefix("victim:")
        for index, cell in enumerate(self.graph.cells):
            if victim_key(cell.victim) != key:
                continue
            samples = self._samples(cell)
            planned = self.graph.sample_counts[index]
            if len(samples) < planned and (cell.task.label, planned) not in self.short_tasks:
                self.short_tasks.add((cell.task.label, planned))
                warnings.warn(f"{cell.task.label}: {planned} samples asked (n), the task gave {len(samples)} "
                              f"(its split '{cell.task.split}' has no more, or malformed ones were left out): "
                              f"its cells run on those {len(samples)}, and the board's n says so")
            code = code_versions(self.plugins, cell)
            fingerprints = [result_fingerprint(cell, self.victim_fp[key], s, code) for s in samples]
            # the board shows exactly this run's rows, reused ones included (harness.store)
            self.store.declare_rows(self.run_id, fingerprints)
            existing = self.store.existing(fingerprints)
            self.reused += len(existing)
            self.cell_data[index] = {"samples": samples, "fingerprints": fingerprints, "existing": existing, "code": code}
        for node_id, node in self.graph.nodes.items():
            if node.stage == "rows" and node.cells[0] in self.cell_data and self.state[node_id] == "waiting":
                data = self.cell_data[node.cells[0]]
                if all(data["fingerprints"][i] in data["existing"] for i in self._positions(node.cells[0], node.chunk)):
                    self._finish(node_id)
        for node_id, node in self.graph.nodes.items():
            if node.stage == "score" and node.cells[0] in self.cell_data and self.state[node_id] == "waiting":
                data = self.cell_data[node.cells[0]]
                if len(data["existing"]) == len(data["fingerprints"]) and all(data["existing"].values()):
                    self._finish(node_id)

    def _positions(self, index: int, chunk: int) -> list[int]:
        """The positions of a chunk's samples that the task gave: fewer than planned where the
        split has fewer than ``n`` samples, or malformed ones were left out (``on_bad_sample: skip``)."""
        given = len(self.cell_data[index]["samples"])
        return [i for i in self.graph.chunk_positions(index, chunk) if i < given]

    def _chunk(self, index: int, positions: list[int]) -> Chunk:
        cell, data = self.graph.cells[index], self.cell_data[index]
        samples = [data["samples"][i] for i in positions]
        fp = self.victim_fp[victim_key(cell.victim)]
        keys = [adversarial_key(cell, fp, s, data["code"]) for s in samples]
        return Chunk(
            cell=cell, run_id=self.run_id, suite=self.suite.name, victim_fingerprint=fp, samples=samples,
            fingerprints=[data["fingerprints"][i] for i in positions], adversarial_keys=keys,
            cached_adversarial=self.store.adversarial(k for k in keys if k is not None),
            progress=False, keep_images=frozenset(s.id for s in data["samples"][:IMAGE_EXAMPLES]),
            seed_keys=[seed_key(cell, fp, s) for s in samples],
        )

    def _attack_chunk(self, node: Any) -> Chunk | None:
        """The attack chunk's missing examples; None when every one is stored or no rows need them."""
        if not any(self.state[d] == "waiting" for d in self.dependents[node.id]):
            return None
        index = max(node.cells, key=lambda i: self.graph.sample_counts[i])
        positions = self._positions(index, node.chunk)
        if not positions:
            return None
        chunk = self._chunk(index, positions)
        if all(k is None or k in chunk.cached_adversarial for k in chunk.adversarial_keys):
            return None
        return chunk

    def _rows_chunk(self, node: Any) -> Chunk | None:
        index = node.cells[0]
        data = self.cell_data[index]
        pending = [i for i in self._positions(index, node.chunk) if data["fingerprints"][i] not in data["existing"]]
        return self._chunk(index, pending) if pending else None

    def _score(self, node: Any) -> None:
        index = node.cells[0]
        cell, data = self.graph.cells[index], self.cell_data[index]
        task: Task = component(self.plugins, "task", cell.task.name, cell.task.factory_params())
        _score_cell(self.store, task, data["samples"], data["fingerprints"],
                    (cell.victim.name, cell.task.label, cell.attack.label, cell.threat.name, cell.defense.label))


def _score_cell(store: Store, task: Task, samples: list[Sample], fingerprints: list[str],
                cell_key: tuple[str, str, str, str, str] | None = None) -> None:
    """Score a complete cell at once: set-level metrics see exactly the cell's samples.

    With N purification draws per sample, each draw is scored as a whole cell and a sample's
    headline is its worst draw: robust only if it survives every draw. The first draw's scores
    stay in the row (``single_draw``), so the board shows both."""
    outputs = store.outputs(fingerprints)
    draws = store.draw_outputs(fingerprints)
    count = max((len(d) for d in draws.values()), default=1)
    draw_outputs = [[draws[fp][j] if fp in draws else outputs[fp] for fp in fingerprints] for j in range(count)]
    corpus = None
    if cell_key is not None and isinstance(task, CorpusScoredTask):
        # one scoring pass of the first draw gives its per-sample scores and the corpus metrics
        first_scores, corpus = task.score_with_corpus(draw_outputs[0], samples)
        per_draw = [first_scores, *(task.score(o, samples) for o in draw_outputs[1:])]
    else:
        per_draw = [task.score(o, samples) for o in draw_outputs]
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
    if corpus is not None:
        store.set_corpus_scores(cell_key, fingerprints, corpus)


def default_store_path(suite: Suite, out: str | Path | None) -> Path:
    return Path(out or Path("results") / suite.name) / "store.sqlite"
