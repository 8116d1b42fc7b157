"""Training pairs for defenses that learn from attacks: (adversarial, clean) images of a split.

CoDefend's purifier and prompt optimisation both learn from adversarial examples made *by the
harness's own attack plugins* against the victim under evaluation, on a split the evaluation never
scores (``train`` for the purifier, ``val`` for prompt selection). Which attacks and radii make the
pairs is declared (:class:`PairAttack`); every other attack of a suite is, by construction, unseen
in training, and the defense records which ones it saw (``seen_attacks``).

Pairs are cached under ``$CODEFEND_HOME/pairs/<fingerprint>.pt``, keyed by the victim's weights,
the task data, the attacks and the sample count, so the purifier and the prompt reuse them and a
second run costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.contracts import AttackBatch, Defense, Victim
from harness.paths import codefend_home
from harness.registry import parse_fraction
from harness import adaptive, reproducible
from harness.code_version import files_code_version
from harness.reproducible import deterministic_training

PAIRS_FORMAT_VERSION = 3


class PairAttack(BaseModel):
    """One attack that makes training pairs: a registered attack at a norm and radius.

    Written in a suite as ``{attack: pgd, params: {steps: 20}, norm: linf, eps: 8/255}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attack: str = "pgd"
    params: dict[str, Any] = Field(default_factory=dict)
    norm: str = "linf"
    eps: float = 8 / 255

    @field_validator("eps", mode="before")
    @classmethod
    def _fraction(cls, value: Any) -> Any:
        return parse_fraction(value)

    @field_validator("eps")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"eps must be in (0, 1] on [0,1] pixels, got {value}")
        return value

    @field_validator("norm")
    @classmethod
    def _norm(cls, value: str) -> str:
        if value not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {value!r}")
        return value

    @property
    def label(self) -> str:
        return f"{self.attack}@{self.norm}-{self.eps:.4g}"


class PairTask(BaseModel):
    """A task whose samples (image, prompt, reference) are attacked to make pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    split: str | None = None
    """This task's split, when its data names splits differently (``train2014`` for VQAv2,
    ``karpathy_train`` for COCO); otherwise the defense's ``train_split``."""


DEFAULT_PAIR_ATTACKS = (PairAttack(attack="pgd", params={"steps": 20}, norm="linf", eps=8 / 255),)
DEFAULT_PAIR_TASKS = (PairTask(name="vqav2"), PairTask(name="coco_captions"))


def parse_pair_attacks(specs: Sequence[Any] | None) -> tuple[PairAttack, ...]:
    """Suite/CLI values (dicts, :class:`PairAttack` or ``"pgd@linf-8/255"`` strings) to PairAttacks."""
    from pydantic import ValidationError

    if not specs:
        return DEFAULT_PAIR_ATTACKS
    out = []
    for i, spec in enumerate(specs):
        try:
            if isinstance(spec, PairAttack):
                out.append(spec)
            elif isinstance(spec, str):
                out.append(_parse_attack_text(spec))
            elif isinstance(spec, dict):
                out.append(PairAttack(**spec))
            else:
                raise ValueError(f"must be a mapping like {{attack: pgd, eps: 8/255}} or a text like pgd@linf-8/255, got {spec!r}")
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            )
            raise ValueError(f"train_attacks[{i}]: {problems}") from None
        except ValueError as exc:
            raise ValueError(f"train_attacks[{i}]: {exc}") from None
    return tuple(out)


def check_pair_attack_names(attacks: Sequence[PairAttack], plugins: Any) -> None:
    """Each training attack names an attack of ``plugins`` (the set the defense was created from)."""
    from harness.registry import UnknownNameError

    names = plugins.attacks.names()
    for i, attack in enumerate(attacks):
        if attack.attack not in names:
            raise ValueError(f"train_attacks[{i}]: {UnknownNameError('attack', attack.attack, names)}")


def _parse_attack_text(text: str) -> PairAttack:
    """``pgd`` | ``pgd@linf-8/255`` | ``apgd@l2-0.5``."""
    name, _, threat = text.partition("@")
    if not threat:
        return PairAttack(attack=name.strip())
    norm, _, eps = threat.partition("-")
    if not eps:
        raise ValueError(f"training attack {text!r}: write NAME or NAME@NORM-EPS, e.g. pgd@linf-8/255")
    return PairAttack(attack=name.strip(), norm=norm.strip(), eps=eps.strip())


@dataclass
class Pairs:
    """Adversarial and clean images at victim resolution, with the texts they were attacked on."""

    clean: torch.Tensor
    adversarial: torch.Tensor
    prompts: list[str]
    targets: list[str]
    kinds: list[str]
    attack: list[str]
    sample_ids: list[str] = field(default_factory=list)
    task_index: list[int] = field(default_factory=list)
    """Which of the spec's tasks each pair's sample came from (to score outputs with it)."""
    record: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean.shape[0])


@dataclass(frozen=True)
class PairSpec:
    """Everything that determines a set of pairs (and so its cache key)."""

    victim_fingerprint: str
    attacks: tuple[PairAttack, ...]
    tasks: tuple[PairTask, ...]
    split: str
    per_task: int
    seed: int
    through: str | None = None
    """Set when the attacks go through a defense (``defense ∘ victim``, :func:`make_pairs`'s
    ``through``): that defense's identity (its trained weights) and the EOT draws."""

    def code_versions(self, plugins: Any) -> dict[str, Any]:
        """The code that makes the pairs: this module's and the attack plugins' (so that cached
        pairs, and the models trained on them, never outlive it)."""
        return {
            "pairs": files_code_version([__file__, adaptive.__file__, reproducible.__file__]),
            "attacks": [plugins.attacks.get(a.attack).code_version() for a in self.attacks],
        }

    def fingerprint(self, sample_digests: Sequence[str], code: dict[str, Any] | None) -> str:
        """Keyed by what the pairs are made of: the samples' content (not the task parameters,
        some of which, like METEOR on or off, change scoring but not samples), the attacks, the
        victim's weights and ``code`` (:meth:`code_versions`). ``code=None``: the key the attacks'
        random draws derive from, so that a code edit remakes the pairs without redrawing them. It
        leaves ``through`` out: a defense's identity is its checkpoint's name, which holds its
        training code's version, so a code edit that leaves the defense's weights as they were
        would otherwise redraw every pair made through it (and the model trained on them)."""
        blob = json.dumps(
            {
                "format": PAIRS_FORMAT_VERSION,
                **({"code": code} if code is not None else {}),
                "victim": self.victim_fingerprint,
                "attacks": [a.model_dump() for a in self.attacks],
                "split": self.split,
                "seed": self.seed,
                "samples": list(sample_digests),
                **({"through": self.through} if self.through is not None and code is not None else {}),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sample_digest(task: Any, sample: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([task.name, sample.id, sample.prompt, list(task.attack_targets(sample))]).encode())
    h.update(np.ascontiguousarray(sample.image).tobytes())
    return h.hexdigest()[:16]


def _load_cached_pairs(path: Path) -> Pairs | None:
    """The pairs cached at ``path``, loaded as tensors and plain data only (``weights_only``: a
    pickle planted in the cache never runs); None, with a warning, for a file that is not that."""
    try:
        return Pairs(**torch.load(path, weights_only=True))
    except Exception as exc:  # a refused pickle, a truncated file, another layout: recompute
        warnings.warn(f"ignoring the training-pairs cache {path}: it is not a plain tensor file this version "
                      f"wrote ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); recomputing the pairs")
        return None


def training_samples(spec: PairSpec, tasks: Sequence[Any]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Each pair task's ``spec.per_task`` training samples, none of whose images is in an
    evaluation split of any pair task's data (:class:`harness.contracts.ImageIndexedTask`): the
    first ``per_task`` of the seeded order that pass. Also the record of what was left out:
    ``excluded_evaluation_images`` (task -> training samples dropped), ``evaluation_splits``, and
    ``unchecked_tasks`` (tasks that cannot name their images)."""
    from harness.contracts import ImageIndexedTask

    evaluation: dict[str, list[str]] = {}
    excluded_names: set[str] = set()
    unchecked = []
    for t, task in zip(spec.tasks, tasks):
        if not isinstance(task, ImageIndexedTask):
            unchecked.append(t.name)
            continue
        splits = list(task.evaluation_splits())
        evaluation[t.name] = splits
        if (t.split or spec.split) in splits:
            raise ValueError(f"train split {t.split or spec.split!r} of task '{t.name}' is one of its evaluation "
                             f"splits ({', '.join(splits)}): train the defense on another split")
        for split in splits:
            excluded_names |= task.image_names(split)
    out, dropped = [], {}
    for t, task in zip(spec.tasks, tasks):
        split, want = t.split or spec.split, spec.per_task
        while True:
            drawn = task.samples(split, want, spec.seed)  # the first `want` of one seeded order
            kept, left_out = [], 0
            for sample in drawn:
                if len(kept) == spec.per_task:
                    break
                if sample.meta.get("file_name") in excluded_names:
                    left_out += 1
                else:
                    kept.append(sample)
            if len(kept) == spec.per_task or len(drawn) < want:
                break
            want *= 2
        out.append(kept)
        dropped[t.name] = left_out
    return out, {"excluded_evaluation_images": dropped, "evaluation_splits": evaluation, "unchecked_tasks": unchecked}


@deterministic_training
def make_pairs(victim: Victim, spec: PairSpec, *, plugins: Any, progress: bool = True,
               batch_size: int = 64, through: Defense | None = None, eot: int = 1) -> Pairs:
    """Attack ``spec.per_task`` samples of each task's ``spec.split`` with each attack (cached).

    The attacks cycle over the samples (sample i gets attack i mod len(attacks)), so each pair is
    one image attacked once and more attacks mean more variety, not more cost. With ``through``
    (a bound defense; ``spec.through`` must name it) the attacks are adaptive: they attack
    ``through ∘ victim`` by its declared gradient route (:mod:`harness.adaptive`), with ``eot``
    draws of a stochastic defense, as the standard adaptive attack will.
    """
    if (through is None) != (spec.through is None):
        raise ValueError("make_pairs: pass the defense the attacks go through and name it in spec.through, or neither")
    from tqdm.auto import tqdm

    from harness.contracts import ThreatModel

    tasks = [plugins.tasks.create(t.name, t.params) for t in spec.tasks]
    task_samples, leakage = training_samples(spec, tasks)
    digests = [_sample_digest(task, s) for task, samples in zip(tasks, task_samples) for s in samples]
    key = spec.fingerprint(digests, spec.code_versions(plugins))
    seed_key = spec.fingerprint(digests, None)
    path = codefend_home() / "pairs" / f"pairs-{key}.pt"
    if path.exists():
        cached = _load_cached_pairs(path)
        if cached is not None:
            return cached

    started = time.perf_counter()
    attacks = [plugins.attacks.create(a.attack, a.params) for a in spec.attacks]
    clean_parts, adv_parts = [], []
    prompts: list[str] = []
    targets: list[str] = []
    kinds: list[str] = []
    labels: list[str] = []
    sample_ids: list[str] = []
    task_index: list[int] = []
    jobs = []
    for t_index, samples in enumerate(task_samples):
        for i, sample in enumerate(samples):
            jobs.append((t_index, i % len(attacks), sample))
    total = len(jobs)
    bar = tqdm(total=total, desc="make training pairs", unit="pair", disable=not progress, mininterval=1.0)
    generator = torch.Generator().manual_seed(spec.seed)
    target: Any = victim
    if through is not None:
        from harness.adaptive import DefendedTarget, gradient_route

        target = DefendedTarget(victim, through, gradient_route(through, eot), torch.Generator().manual_seed(spec.seed + 1))
    # group by (task, attack) so one attack call sees one task kind
    groups: dict[tuple[int, int], list[Any]] = {}
    for t_index, a_index, sample in jobs:
        groups.setdefault((t_index, a_index), []).append(sample)
    for (t_index, a_index), samples in sorted(groups.items(), key=lambda kv: kv[0]):
        task, attack, declared = tasks[t_index], attacks[a_index], spec.attacks[a_index]
        threat = ThreatModel(name=declared.label, norm=declared.norm, eps=declared.eps)  # type: ignore[arg-type]
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            clean = victim.prepare([s.image for s in chunk]).to(victim.device)
            chunk_prompts = [s.prompt for s in chunk]
            chunk_targets = [task.attack_targets(s)[0] for s in chunk]
            seeds = [int(hashlib.sha256(f"{seed_key}:{s.id}".encode()).hexdigest()[:15], 16) for s in chunk]
            batch = AttackBatch(clean, chunk_prompts, chunk_targets, task.kind, seeds=seeds,
                                references=[list(task.attack_targets(s)) for s in chunk])
            result = attack.perturb(target, batch, threat, generator)
            clean_parts.append(clean.detach().cpu())
            adv_parts.append(result.pixels.detach().cpu().to(clean.dtype))
            prompts += chunk_prompts
            targets += chunk_targets
            kinds += [task.kind] * len(chunk)
            labels += [declared.label] * len(chunk)
            sample_ids += [s.id for s in chunk]
            task_index += [t_index] * len(chunk)
            bar.update(len(chunk))
    bar.close()
    pairs = Pairs(
        clean=torch.cat(clean_parts),
        adversarial=torch.cat(adv_parts),
        prompts=prompts,
        targets=targets,
        kinds=kinds,
        attack=labels,
        sample_ids=sample_ids,
        task_index=task_index,
        record={
            "fingerprint": key,
            "victim": spec.victim_fingerprint,
            "attacks": [a.label for a in spec.attacks],
            "tasks": [t.name for t in spec.tasks],
            "split": spec.split,
            "through": spec.through,
            "pairs": total,
            **leakage,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".partial")
    torch.save(asdict(pairs), scratch)
    scratch.replace(path)
    return pairs
