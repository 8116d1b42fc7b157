"""``codefend-prompt``: CoDefend's prompt optimisation on the text side, for a frozen victim.

Two modes:

- ``search`` (any victim, black-box included): a discrete search over defensive prefixes. A seed
  pool of prefixes plus ``rounds`` of mutations (drop, swap or insert a word, splice two
  candidates) is scored by the task's own metric on a held-out split (``select_split``) of
  adversarial images made by ``train_attacks`` and of their clean originals, both through the
  purifier when one is given (``purifier``). Scores are relative to the victim without a prefix on
  the clean images, averaged over tasks, so VQA accuracy and CIDEr weigh alike. The empty prefix is
  always a candidate, so the search never picks a prefix that scores below no prefix on its
  selection set.
- ``soft`` (white-box victims with a ``soft_prompt`` argument, see
  :class:`~harness.contracts.SoftPromptVictim`): ``soft_tokens`` continuous embeddings inserted
  after the victim's start token, the same for every query.
- ``generator`` (white-box victims that lend their text model,
  :class:`~harness.contracts.QueryEncoderVictim`): CoDefend's LoRA-based prefix generator
  (:mod:`defenses.prefix_generator`), which makes each query's ``soft_tokens`` from the query and,
  with ``condition_on_image``, from the image the victim sees. A black-box victim has no soft
  input: the mode is then an error that says to use ``search``.

``soft`` and ``generator`` train by gradient descent (Adam, ``soft_steps`` steps of ``soft_lr``)
on a joint objective over the *training* pairs: ``clean_weight`` × the teacher-forced loss of the
reference answers on clean images + (1 − ``clean_weight``) × the same on adversarial images. With a
``purifier`` (inside ``codefend``) both halves are the *purified* images, which are all the victim
ever reads behind it, and the adversarial half also has ``adaptive_pairs_per_task`` pairs per task
made by the train attacks *through* the purifier (EOT ``adaptive_pairs_eot``): the purifier repairs
nearly every oblivious pair (their purified loss is within 0.01 nats of clean on shapes-vlm), so
those carry almost no signal, while adaptive ones are what the standard adaptive attack sends. The
raw adversarial images are left out there: as a training term they cost the held-out clean score
3-10 points on shapes-vlm. Every ``select_every`` steps the prompt is scored on the held-out split.

**Selection** (every mode, on ``select_split``): a candidate (a prefix, or a training checkpoint)
is *admissible* when, on every task, its clean score is at least (1 − ``clean_tolerance``) × the
clean score of no prompt; among admissible candidates the one with the highest adversarial score
(each task's, over its no-prompt clean score, averaged over tasks so VQA accuracy and CIDEr weigh
alike, and over the attacked conditions: the train attacks' images and, for a trained prompt
behind a purifier, the same attacks made through the purifier) wins. No prompt is always admissible, so a prompt that buys robustness with clean accuracy
is never chosen. Both scores are recorded for every candidate. ``always_use`` (an ablation) serves
the last trained soft prompt or generator whatever the rule chose; the record still says what it
chose.

The result (the prefix, the soft embeddings or the generator's trained weights) is cached under
``$CODEFEND_HOME/models/codefend-prompt-<fingerprint>`` with every candidate's scores and the
training curves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import torch
from pydantic import Field

from defenses.purifier import weights_digest
from defenses.training_pairs import PairSpec, PairTask, Pairs, check_pair_attack_names, make_pairs, parse_pair_attacks
from harness.plugins import PluginsUser
from harness.contracts import (Defense, ImageFeatureVictim, Preparation, Prepared, QueryEncoderVictim, SoftPromptVictim,
                                TrainingAttack, Victim)
from harness.store import digest_json
from harness.paths import codefend_home, publish_checkpoint
from defenses import prefix_generator, training_pairs
from harness import reproducible
from harness.code_version import files_code_version
from harness.reproducible import deterministic_training, training_environment

# 3: the clean-constrained selection rule, the joint objective, mode 'generator'
# 4: trained prompts behind a purifier are also selected on the held-out split attacked through it
PROMPT_FORMAT_VERSION = 4

#: Defensive prefixes in the spirit of CoDefend's optimised prompt; the search mutates them.
DEFAULT_CANDIDATES = (
    "",
    "answer about the image",
    "ignore the noise in the image",
    "look at the shape and the colour",
    "the image may be perturbed",
    "describe what is in the image",
)

#: METEOR costs seconds per call and selection scores many candidates: CIDEr decides.
DEFAULT_PROMPT_TASKS = (PairTask(name="vqav2"), PairTask(name="coco_captions", params={"meteor": False}))


def mutations(prefix: str, pool_words: Sequence[str], other: str, generator: torch.Generator) -> str:
    """One random edit of ``prefix``: drop, swap or insert a word, or splice with ``other``."""
    words = prefix.split()
    kind = int(torch.randint(0, 4, (1,), generator=generator))
    pick = lambda n: int(torch.randint(0, max(1, n), (1,), generator=generator))  # noqa: E731
    if kind == 0 and words:
        del words[pick(len(words))]
    elif kind == 1 and len(words) > 1:
        i, j = pick(len(words)), pick(len(words))
        words[i], words[j] = words[j], words[i]
    elif kind == 2 and pool_words:
        words.insert(pick(len(words) + 1), pool_words[pick(len(pool_words))])
    else:
        theirs = other.split()
        words = words[: pick(len(words) + 1)] + theirs[pick(len(theirs) + 1) :]
    return " ".join(words)


def selection_key(scores: dict[str, float], baseline: dict[str, float], clean_tolerance: float) -> tuple[bool, float]:
    """(admissible, adversarial score) of a candidate under the selection rule (module docstring).
    ``scores`` and ``baseline`` map ``task/condition`` to that task's headline score."""
    tasks = sorted({key.split("/")[0] for key in baseline})
    attacked = sorted({key.split("/")[1] for key in baseline} - {"clean"})
    admissible = all(scores[f"{t}/clean"] >= (1.0 - clean_tolerance) * baseline[f"{t}/clean"] - 1e-12 for t in tasks)
    adversarial = sum(scores[f"{t}/{c}"] / max(1e-9, baseline[f"{t}/clean"]) for t in tasks for c in attacked)
    return admissible, adversarial / (len(tasks) * len(attacked))


def select(candidates: dict[str, dict[str, float]], baseline_name: str, clean_tolerance: float) -> str:
    """The candidate the selection rule keeps; ``baseline_name`` (no prompt) wins ties."""
    baseline = candidates[baseline_name]
    ranked = sorted(candidates, key=lambda c: (c != baseline_name, c))
    admissible = [c for c in ranked if selection_key(candidates[c], baseline, clean_tolerance)[0]]
    return max(admissible, key=lambda c: selection_key(candidates[c], baseline, clean_tolerance)[1])


class SoftPrefix(torch.nn.Module):
    """``mode: soft``: one learned prefix for every query."""

    def __init__(self, tokens: int, dim: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.soft_prompt = torch.nn.Parameter(0.02 * torch.randn(tokens, dim, generator=generator))

    def forward(self, prompts: Sequence[str], image_features: torch.Tensor | None) -> torch.Tensor:
        return self.soft_prompt

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"soft_prompt": self.soft_prompt.detach().clone()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.soft_prompt.copy_(state["soft_prompt"])

    def frozen_state(self) -> dict[str, torch.Tensor]:
        return {}  # every parameter trains


class CoDefendPrompt(PluginsUser, Defense):
    """Text-side defense: a searched defensive prefix, a trained soft prompt, or CoDefend's prefix
    generator (module docstring)."""

    stochastic = False
    differentiable = True  # images pass through untouched
    bpda = None

    def __init__(
        self,
        *,
        mode: Literal["search", "soft", "generator"] = "search",
        candidates: list[str] | None = None,
        rounds: Annotated[int, Field(ge=0)] = 3,
        population: Annotated[int, Field(ge=1)] = 6,
        soft_tokens: Annotated[int, Field(ge=1)] | None = None,
        soft_steps: Annotated[int, Field(ge=1)] = 300,
        soft_lr: Annotated[float, Field(gt=0.0)] | None = None,
        lora_rank: Annotated[int, Field(ge=1)] = 4,
        lora_alpha: Annotated[float, Field(gt=0.0)] = 8.0,
        condition_on_image: bool = True,
        clean_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5,
        clean_tolerance: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01,
        select_every: Annotated[int, Field(ge=1)] = 100,
        batch_size: Annotated[int, Field(ge=1)] = 32,
        always_use: bool = False,
        adaptive_pairs_per_task: Annotated[int, Field(ge=0)] = 300,
        adaptive_pairs_eot: Annotated[int, Field(ge=1)] = 2,
        train_attacks: list[Any] | None = None,
        train_tasks: list[dict[str, Any]] | None = None,
        train_split: str = "train",
        train_pairs_per_task: Annotated[int, Field(ge=1)] = 600,
        select_split: str = "val",
        select_pairs_per_task: Annotated[int, Field(ge=1)] = 150,
        purifier: dict[str, Any] | None = None,
        seed: int = 0,
    ):
        self.params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.mode = mode
        self.candidates = tuple(candidates) if candidates is not None else DEFAULT_CANDIDATES
        if "" not in self.candidates:
            self.candidates = ("",) + self.candidates
        self.rounds, self.population = rounds, population
        # soft: 4 tokens at 3e-3 (as before); generator: 1 token (a neutral [BOS]-like token costs
        # shapes-vlm nothing, four cost it 0.6 points) at 3e-4 (at 1e-3 its prefix left the
        # embeddings' scale, norm 6-16 against 0.74, and cost 4-10 points held-out)
        self.soft_tokens = soft_tokens if soft_tokens is not None else (1 if mode == "generator" else 4)
        self.soft_steps = soft_steps
        self.soft_lr = soft_lr if soft_lr is not None else (3e-4 if mode == "generator" else 3e-3)
        self.adaptive_pairs_per_task, self.adaptive_pairs_eot = adaptive_pairs_per_task, adaptive_pairs_eot
        self.lora_rank, self.lora_alpha, self.condition_on_image = lora_rank, lora_alpha, condition_on_image
        self.clean_weight, self.clean_tolerance = clean_weight, clean_tolerance
        self.select_every, self.batch_size = select_every, batch_size
        self.always_use = always_use
        self.train_attacks = parse_pair_attacks(train_attacks)
        self.train_tasks = tuple(PairTask(**t) for t in train_tasks) if train_tasks else DEFAULT_PROMPT_TASKS
        self.train_split, self.train_pairs_per_task = train_split, train_pairs_per_task
        self.select_split, self.select_pairs_per_task = select_split, select_pairs_per_task
        self.purifier_params = dict(purifier) if purifier is not None else None
        self.seed = seed
        self._purifier: Defense | None = None
        if self.purifier_params is not None:
            from defenses.purifier import CoDefendPurifier

            self._purifier = CoDefendPurifier(**self.purifier_params)
        self._victim: Victim | None = None
        self._learned: dict[str, dict[str, Any]] = {}

    # -- training -------------------------------------------------------------------------------
    @property
    def training_attacks(self) -> list[TrainingAttack]:
        """The ``train_attacks`` whose pairs selected (or trained) the prompt. A ``purifier`` given
        here only filters those pairs; its own training attacks are the purifier's, not the prompt's."""
        return [TrainingAttack(a.attack, dict(a.params), a.norm, a.eps) for a in self.train_attacks]  # type: ignore[arg-type]

    def preparations(self) -> list[Preparation]:
        """The purifier it is selected behind (if any), then the prompt against the victim."""
        before = self._purifier.preparations() if isinstance(self._purifier, Prepared) else []
        pairs = (self.train_pairs_per_task + self.select_pairs_per_task) * len(self.train_tasks) * len(self.train_attacks)
        learned = Preparation(
            key=f"codefend-prompt:{digest_json(self.params)[:16]}", label=f"optimise codefend-prompt ({self.mode})",
            run=functools.partial(_prepare_prompt, dict(self.params)), needs_victim=True,
            after=tuple(p.key for p in before if p.needs_victim),
            cost=20.0 * pairs + (2.0 * pairs * self.rounds * self.population if self.mode == "search"
                                 else 12.0 * self.soft_steps * self.batch_size)
            + (60.0 * self.adaptive_pairs_eot * self.adaptive_pairs_per_task * len(self.train_tasks)
               if self.mode != "search" and self._purifier is not None else 0.0),
        )
        return [*before, learned]

    def bind_plugins(self, plugins: Any) -> None:
        check_pair_attack_names(self.train_attacks, plugins)  # the attacks that make its pairs
        if isinstance(self._purifier, PluginsUser):
            self._purifier.bind_plugins(plugins)
        super().bind_plugins(plugins)

    def bind(self, victim: Victim, *, prepare: bool = True) -> None:
        """Serve ``victim``; with ``prepare``, optimise or load the prompt now."""
        self._check_victim(victim)
        self._victim = victim
        if self._purifier is not None:
            self._purifier.bind(victim, prepare=prepare)  # type: ignore[call-arg]
        if prepare:
            self.learned()

    def _require_victim(self) -> Victim:
        if self._victim is None:
            raise RuntimeError("codefend-prompt is optimised for a victim: call bind(victim) first")
        return self._victim

    def _spec(self, victim: Victim, split: str, per_task: int, through: str | None = None) -> PairSpec:
        return PairSpec(victim_fingerprint=victim.fingerprint, attacks=self.train_attacks, tasks=self.train_tasks,
                        split=split, per_task=per_task, seed=self.seed, through=through)

    def checkpoint_dir(self, victim: Victim) -> Path:
        blob = json.dumps(
            {
                "format": PROMPT_FORMAT_VERSION,
                # the modules that optimise the prompt, and the code that makes its pairs: a
                # checkpoint never outlives them
                "code": files_code_version([__file__, prefix_generator.__file__, training_pairs.__file__,
                                            reproducible.__file__]),
                "pairs_code": self._spec(victim, self.train_split, self.train_pairs_per_task).code_versions(self.plugins),
                "victim": victim.fingerprint,
                "mode": self.mode,
                "candidates": self.candidates if self.mode == "search" else None,
                "search": [self.rounds, self.population] if self.mode == "search" else None,
                "soft": [self.soft_tokens, self.soft_steps, self.soft_lr, self.train_split, self.train_pairs_per_task,
                         self.clean_weight, self.select_every, self.batch_size]
                if self.mode != "search" else None,
                "generator": [self.lora_rank, self.lora_alpha, self.condition_on_image] if self.mode == "generator" else None,
                "adaptive_pairs": [self.adaptive_pairs_per_task, self.adaptive_pairs_eot]
                if self.mode != "search" and self._purifier is not None else None,
                "clean_tolerance": self.clean_tolerance,
                "always_use": self.always_use,
                "attacks": [a.model_dump() for a in self.train_attacks],
                "tasks": [t.model_dump() for t in self.train_tasks],
                "select": [self.select_split, self.select_pairs_per_task],
                "purifier": str(self._purifier.checkpoint_dir(victim)) if self._purifier is not None else None,  # type: ignore[attr-defined]
                "seed": self.seed,
            },
            sort_keys=True,
            default=str,
        )
        return codefend_home() / "models" / f"codefend-prompt-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def _purified(self, pixels: torch.Tensor, salt: int) -> torch.Tensor:
        if self._purifier is None:
            return pixels
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), 64):
                generator = torch.Generator().manual_seed(self.seed * 1000003 + salt + start)
                out.append(self._purifier.purify(pixels[start : start + 64], generator))
        return torch.cat(out)

    def learned(self, *, progress: bool = True) -> dict[str, Any]:
        """The optimised prompt for the bound victim (optimised now if the cache lacks it)."""
        victim = self._require_victim()
        key = victim.fingerprint
        if key not in self._learned:
            out = self.checkpoint_dir(victim)
            if not (out / "prompt.json").exists():
                with torch.enable_grad():  # first use may come from inside a no_grad block
                    self._optimise(victim, out, progress=progress)
            record = json.loads((out / "prompt.json").read_text())
            weights = out / "prompt.safetensors"
            if record.get("use_prompt", False) and weights.exists():
                from safetensors.torch import load_file

                maker = self._new_maker(victim)
                maker.load_trainable_state(load_file(str(weights)))
                maker.eval().requires_grad_(False)  # an attack differentiates the pixels, not the prompt
                record["maker"] = maker
            self._learned[key] = record
        return self._learned[key]

    def train(self, *, progress: bool = True) -> dict[str, Any]:
        """Optimise (or load) the prompt for the bound victim; returns its record."""
        return {k: v for k, v in self.learned(progress=progress).items() if k != "maker"}

    # -- the continuous prompts (soft, generator) ------------------------------------------------
    def _check_victim(self, victim: Victim) -> None:
        """The mode's needs of the victim, checked before any pair is made or any step taken."""
        name = getattr(victim, "name", type(victim).__name__)
        if self.mode == "soft" and not isinstance(victim, SoftPromptVictim):
            raise ValueError(
                f"mode 'soft' needs a white-box victim that takes a soft_prompt (SoftPromptVictim); "
                f"{name!r} does not: use mode 'search'"
            )
        if self.mode == "generator" and not isinstance(victim, QueryEncoderVictim):
            raise ValueError(
                f"mode 'generator' emits soft prefix tokens from a LoRA-tuned copy of the victim's text model, so it "
                f"needs a white-box victim that lends one (QueryEncoderVictim); {name!r} does not. A discrete-text "
                f"generator for black-box victims is not built: use mode 'search'"
            )
        if self.mode == "generator" and self.condition_on_image and not isinstance(victim, ImageFeatureVictim):
            raise ValueError(f"condition_on_image needs a victim that exposes image_features; {name!r} does not: "
                             f"set condition_on_image: false")

    def _new_maker(self, victim: Victim) -> torch.nn.Module:
        """A fresh soft prefix or prefix generator for ``victim`` (untrained), on its device."""
        self._check_victim(victim)
        if self.mode == "soft":
            return SoftPrefix(self.soft_tokens, victim.soft_prompt_dim, self.seed).to(victim.device)  # type: ignore[attr-defined]
        from defenses.prefix_generator import PrefixGenerator

        return PrefixGenerator(victim.query_encoder(), tokens=self.soft_tokens, dim=victim.soft_prompt_dim,
                               rank=self.lora_rank, alpha=self.lora_alpha, seed=self.seed).to(victim.device)

    def _prompt_of(self, maker: torch.nn.Module, victim: Victim) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
        """(pixels the victim reads, their prompts) -> the soft prompt ``maker`` makes for them."""
        def prompt(pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
            features = victim.image_features(pixels) if self.mode == "generator" and self.condition_on_image else None  # type: ignore[attr-defined]
            return maker(prompts, features)

        return prompt

    def _train_continuous(self, victim: Victim, selection: tuple[dict[str, torch.Tensor], Pairs, list[Any], list[dict[str, Any]]],
                          baseline: dict[str, float], progress: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Adam on the joint clean/adversarial objective (module docstring); every ``select_every``
        steps the checkpoint is scored on the held-out split, and the selection rule picks among
        the checkpoints and no prompt."""
        from tqdm.auto import tqdm

        maker = self._new_maker(victim)
        prompt_of = self._prompt_of(maker, victim)
        pairs = make_pairs(victim, self._spec(victim, self.train_split, self.train_pairs_per_task), plugins=self.plugins,
                           progress=progress)
        halves: dict[str, list[tuple[torch.Tensor, Pairs]]] = {"clean": [(pairs.clean, pairs)],
                                                                 "adversarial": [(pairs.adversarial, pairs)]}
        if self._purifier is not None:  # behind the purifier the victim reads only purified images
            halves = {"clean": [(self._purified(pairs.clean, 4), pairs)],
                      "adversarial": [(self._purified(pairs.adversarial, 3), pairs)]}
            if self.adaptive_pairs_per_task:
                adaptive = self._adaptive_pairs(victim, progress, self.train_split, self.adaptive_pairs_per_task)
                halves["adversarial"].append((self._purified(adaptive.adversarial, 5), adaptive))
        def objective() -> float:
            """The joint objective over every training pair (the training curve samples batches)."""
            means = {}
            with torch.no_grad():
                for half, sources in halves.items():
                    total, count = 0.0, 0
                    for source, source_pairs in sources:  # _pair_losses makes one call per task kind
                        for start in range(0, len(source_pairs), 128):
                            batch = range(start, min(start + 128, len(source_pairs)))
                            total += sum(l.sum().item() for l in _pair_losses(victim, source, source_pairs, batch, prompt_of))
                            count += len(batch)
                    means[half] = total / max(1, count)
            return round(self.clean_weight * means["clean"] + (1.0 - self.clean_weight) * means["adversarial"], 6)

        objective_before = objective()
        trainable = [p for p in maker.parameters() if p.requires_grad]
        frozen_before = weights_digest(maker.frozen_state())  # type: ignore[operator]
        optimiser = torch.optim.Adam(trainable, lr=self.soft_lr)
        generator = torch.Generator().manual_seed(self.seed)
        images, select_pairs, tasks, lookup = selection
        history: dict[str, list[float]] = {"clean": [], "adversarial": [], "objective": []}
        checkpoints: dict[str, dict[str, torch.Tensor]] = {}
        candidates: dict[str, dict[str, float]] = {"": baseline}
        # the untrained prompt is a checkpoint too (the generator's starts query-independent, at
        # the victim's neutral prefix): the record says whether training improved on it
        checkpoints["step 0"] = {k: v.cpu() for k, v in maker.trainable_state().items()}  # type: ignore[operator]
        with torch.no_grad():
            candidates["step 0"] = self._fitness(victim, images, select_pairs, tasks, lookup, prompt_of=prompt_of)
        for step in tqdm(range(1, self.soft_steps + 1), desc=f"codefend-prompt {self.mode}", unit="step",
                         disable=not progress, mininterval=1.0):
            terms = {}
            for half, sources in halves.items():
                losses = []
                for source, source_pairs in sources:
                    index = torch.randint(0, len(source_pairs), (self.batch_size,), generator=generator).tolist()
                    losses += [l.mean() for l in _pair_losses(victim, source, source_pairs, index, prompt_of)]
                terms[half] = torch.stack(losses).mean()
            loss = self.clean_weight * terms["clean"] + (1.0 - self.clean_weight) * terms["adversarial"]
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for key, value in (("clean", terms["clean"]), ("adversarial", terms["adversarial"]), ("objective", loss)):
                history[key].append(round(value.item(), 5))
            if step % self.select_every == 0 or step == self.soft_steps:
                name = f"step {step}"
                checkpoints[name] = {k: v.cpu() for k, v in maker.trainable_state().items()}  # type: ignore[operator]
                with torch.no_grad():
                    candidates[name] = self._fitness(victim, images, select_pairs, tasks, lookup, prompt_of=prompt_of)
        if weights_digest(maker.frozen_state()) != frozen_before:  # type: ignore[operator]
            raise AssertionError("codefend-prompt: the generator's frozen base changed in training")
        objective_after = objective()
        chosen = select(candidates, "", self.clean_tolerance)
        last = f"step {self.soft_steps}"
        kept = last if self.always_use else (chosen or last)
        maker.load_trainable_state(checkpoints[kept])  # type: ignore[operator]
        record: dict[str, Any] = {
            "history": history, "objective_before": objective_before, "objective_after": objective_after,
            "candidates": _with_selection_keys(candidates, baseline, self.clean_tolerance),
            "chosen": chosen or "no prompt", "use_prompt": bool(chosen) or self.always_use,
            "served": kept if (chosen or self.always_use) else "no prompt",
            "trainable_parameters": sum(p.numel() for p in trainable),
            "frozen_parameters": sum(p.numel() for p in maker.frozen_state().values()),  # type: ignore[operator]
        }
        if self.mode == "generator":
            with torch.no_grad():
                record["generated_prefix"] = _prefix_spread(prompt_of, images["clean"], select_pairs, victim)
        return maker, record

    def _adaptive_pairs(self, victim: Victim, progress: bool, split: str, per_task: int) -> Pairs:
        """The train attacks run through the purifier (EOT ``adaptive_pairs_eot``) on the first
        ``per_task`` samples of ``split``: the images an adaptive attacker sends, which are what
        the purifier leaves unrepaired (oblivious pairs are nearly all repaired by it)."""
        assert self._purifier is not None
        through = f"{self._purifier.checkpoint_dir(victim).name}, eot {self.adaptive_pairs_eot}"  # type: ignore[attr-defined]
        return make_pairs(victim, self._spec(victim, split, per_task, through), plugins=self.plugins, progress=progress, through=self._purifier,
                          eot=self.adaptive_pairs_eot)

    # -- selection --------------------------------------------------------------------------------
    def _selection_set(self, victim: Victim, progress: bool) -> tuple[dict[str, torch.Tensor], Pairs, list[Any], list[dict[str, Any]]]:
        plugins = self.plugins
        pairs = make_pairs(victim, self._spec(victim, self.select_split, self.select_pairs_per_task), plugins=plugins,
                           progress=progress)
        tasks = [plugins.tasks.create(t.name, t.params) for t in self.train_tasks]
        lookup = [{s.id: s for s in task.samples(t.split or self.select_split, self.select_pairs_per_task, self.seed)}
                  for t, task in zip(self.train_tasks, tasks)]
        images = {"adversarial": self._purified(pairs.adversarial, 1), "clean": self._purified(pairs.clean, 2)}
        if self.mode != "search" and self._purifier is not None and self.adaptive_pairs_per_task:
            # selected on what it trains for: the held-out split attacked through the purifier too
            adaptive = self._adaptive_pairs(victim, progress, self.select_split, self.select_pairs_per_task)
            assert adaptive.sample_ids == pairs.sample_ids
            images["adaptive"] = self._purified(adaptive.adversarial, 6)
        return images, pairs, tasks, lookup

    def _fitness(self, victim: Victim, images: dict[str, torch.Tensor], pairs: Pairs, tasks: list[Any],
                 lookup: list[dict[str, Any]], *, prefix: str = "",
                 prompt_of: Callable[[torch.Tensor, Sequence[str]], torch.Tensor] | None = None) -> dict[str, float]:
        """Mean headline score per ``task/condition`` with this prompt (a text prefix, or the soft
        prompt ``prompt_of`` makes for each batch)."""
        scores: dict[str, float] = {}
        for t_index, task in enumerate(tasks):
            rows = [i for i, t in enumerate(pairs.task_index) if t == t_index]
            samples = [lookup[t_index][pairs.sample_ids[i]] for i in rows]
            prompts = [_prefixed(prefix, s.prompt) for s in samples]
            for condition, pixels in images.items():
                outputs = []
                for start in range(0, len(rows), 128):
                    batch, batch_prompts = pixels[rows[start : start + 128]].to(victim.device), prompts[start : start + 128]
                    kw = {"soft_prompt": prompt_of(batch, batch_prompts)} if prompt_of is not None else {}
                    outputs += victim.generate(batch, batch_prompts, task.kind, **kw)
                per_sample = task.score(outputs, samples)
                scores[f"{task.name}/{condition}"] = sum(float(s[task.metric]) for s in per_sample) / max(1, len(samples))
        return scores

    @deterministic_training
    def _optimise(self, victim: Victim, out: Path, *, progress: bool) -> None:
        started = time.perf_counter()
        selection = self._selection_set(victim, progress)
        images, pairs, tasks, lookup = selection
        baseline = self._fitness(victim, images, pairs, tasks, lookup)
        record: dict[str, Any] = {"mode": self.mode, "baseline": baseline, "selection": pairs.record,
                                  "clean_tolerance": self.clean_tolerance, "always_use": self.always_use, "prefix": ""}
        maker = None
        if self.mode == "search":
            record.update(self._search(victim, images, pairs, tasks, lookup, baseline, progress))
        else:
            maker, trained = self._train_continuous(victim, selection, baseline, progress)
            record.update(trained)
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["environment"] = training_environment()
        with publish_checkpoint(out) as scratch:
            if maker is not None:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in maker.trainable_state().items()}  # type: ignore[operator]
                save_file(state, str(scratch / "prompt.safetensors"))
            (scratch / "prompt.json").write_text(json.dumps(record, indent=1))

    def _search(self, victim, images, pairs, tasks, lookup, baseline, progress) -> dict[str, Any]:
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(self.seed)
        pool_words = sorted({w for c in self.candidates for w in c.split()})
        scored: dict[str, dict[str, float]] = {"": baseline}
        todo = [c for c in self.candidates if c not in scored]
        total = len(todo) + self.rounds * self.population

        def rank(candidate: str) -> tuple[bool, float]:
            return selection_key(scored[candidate], baseline, self.clean_tolerance)

        with tqdm(total=total, desc="codefend-prompt search", unit="prompt", disable=not progress) as bar:
            for candidate in todo:
                scored[candidate] = self._fitness(victim, images, pairs, tasks, lookup, prefix=candidate)
                bar.update(1)
            for _ in range(self.rounds):
                ranked = sorted(scored, key=lambda c: (not rank(c)[0], -rank(c)[1], c))
                parents = ranked[: max(2, self.population // 2)]
                for _ in range(self.population):
                    parent = parents[int(torch.randint(0, len(parents), (1,), generator=generator))]
                    other = parents[int(torch.randint(0, len(parents), (1,), generator=generator))]
                    child = mutations(parent, pool_words, other, generator)
                    if child not in scored:
                        scored[child] = self._fitness(victim, images, pairs, tasks, lookup, prefix=child)
                    bar.update(1)
        best = select(scored, "", self.clean_tolerance)
        return {"prefix": best, "chosen": best or "no prompt", "use_prompt": bool(best),
                "candidates": _with_selection_keys(scored, baseline, self.clean_tolerance)}

    # -- the defense contract -----------------------------------------------------------------
    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pixels

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        prefix = self.learned().get("prefix", "")
        return [_prefixed(prefix, p) for p in prompts]

    def soft_prompt(self) -> torch.Tensor | None:
        maker = self.learned().get("maker")
        return maker.soft_prompt if isinstance(maker, SoftPrefix) else None

    def soft_prompts(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor | None:
        """The generator's prefix for each (image, query), differentiable w.r.t. ``pixels``
        (:class:`~harness.contracts.ConditionalPromptDefense`); None in the other modes."""
        maker = self.learned().get("maker")
        if self.mode != "generator" or maker is None:
            return None
        return self._prompt_of(maker, self._require_victim())(pixels, prompts)


def _pair_losses(victim: Victim, source: torch.Tensor, pairs: Pairs, rows: Sequence[int],
                 prompt_of: Callable[[torch.Tensor, Sequence[str]], torch.Tensor]) -> list[torch.Tensor]:
    """Per-sample teacher-forced losses of the references of ``rows`` on ``source`` images, with
    the prompt ``prompt_of`` makes for them: one victim call per task kind among the rows."""
    out = []
    for kind in sorted({pairs.kinds[i] for i in rows}):
        batch = [i for i in rows if pairs.kinds[i] == kind]
        pixels, prompts = source[batch].to(victim.device), [pairs.prompts[i] for i in batch]
        out.append(victim.loss(  # type: ignore[call-arg]
            pixels, prompts, [pairs.targets[i] for i in batch], kind, soft_prompt=prompt_of(pixels, prompts)))
    return out


def _with_selection_keys(candidates: dict[str, dict[str, float]], baseline: dict[str, float],
                         clean_tolerance: float) -> dict[str, dict[str, Any]]:
    """Each candidate's scores with what the selection rule read: admissible, and the adversarial
    and clean scores relative to no prompt's clean score."""
    out: dict[str, dict[str, Any]] = {}
    tasks = sorted({key.split("/")[0] for key in baseline})
    for name, scores in candidates.items():
        admissible, adversarial = selection_key(scores, baseline, clean_tolerance)
        clean = sum(scores[f"{t}/clean"] / max(1e-9, baseline[f"{t}/clean"]) for t in tasks) / len(tasks)
        out[name] = {**scores, "admissible": admissible, "adversarial_relative": round(adversarial, 6),
                     "clean_relative": round(clean, 6)}
    return out


def _prefix_spread(prompt_of: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], clean: torch.Tensor,
                   pairs: Pairs, victim: Victim) -> dict[str, float]:
    """What the generator learned: how far its prefixes differ between held-out samples (mean
    distance to their mean, over the mean's norm), and how far from its query-independent part."""
    count = min(64, len(pairs))
    made = prompt_of(clean[:count].to(victim.device), pairs.prompts[:count])
    centre = made.mean(dim=0, keepdim=True)
    return {"prefix_norm": round(float(centre.norm()), 6),
            "spread_over_norm": round(float((made - centre).flatten(1).norm(dim=1).mean() / centre.norm().clamp(min=1e-9)), 6)}

def _prefixed(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}".strip() if prefix else prompt


def _prepare_prompt(params: dict[str, Any], victim: Victim, *, plugins: Any) -> None:
    prompt = CoDefendPrompt(**params)
    prompt.bind_plugins(plugins)
    prompt.bind(victim)
