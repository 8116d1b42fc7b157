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
  after the victim's start token, trained by gradient descent on the teacher-forced loss of the
  reference answers over adversarial and clean *training* pairs (through the purifier when one is
  given). Selected against the empty prompt on the same held-out split as the search.

The result (the prefix, or the soft embeddings) is cached under
``$CODEFEND_HOME/models/codefend-prompt-<fingerprint>`` with every candidate's score.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import Field

from defenses.training_pairs import PairSpec, PairTask, Pairs, check_pair_attack_names, make_pairs, parse_pair_attacks
from harness.plugins import PluginsUser
from harness.contracts import Defense, Preparation, Prepared, TrainingAttack, Victim
from harness.store import digest_json
from harness.paths import codefend_home, publish_checkpoint

PROMPT_FORMAT_VERSION = 2

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


class CoDefendPrompt(PluginsUser, Defense):
    """Text-side defense: a searched defensive prefix, or a trained soft prompt (module docstring)."""

    stochastic = False
    differentiable = True  # images pass through untouched
    bpda = None

    def __init__(
        self,
        *,
        mode: Literal["search", "soft"] = "search",
        candidates: list[str] | None = None,
        rounds: Annotated[int, Field(ge=0)] = 3,
        population: Annotated[int, Field(ge=1)] = 6,
        soft_tokens: Annotated[int, Field(ge=1)] = 4,
        soft_steps: Annotated[int, Field(ge=1)] = 300,
        soft_lr: Annotated[float, Field(gt=0.0)] = 0.003,
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
        self.soft_tokens, self.soft_steps, self.soft_lr = soft_tokens, soft_steps, soft_lr
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
            cost=20.0 * pairs + (6.0 * self.soft_steps * 32 if self.mode == "soft" else 2.0 * pairs * self.rounds * self.population),
        )
        return [*before, learned]

    def bind_plugins(self, plugins: Any) -> None:
        check_pair_attack_names(self.train_attacks, plugins)  # the attacks that make its pairs
        if isinstance(self._purifier, PluginsUser):
            self._purifier.bind_plugins(plugins)
        super().bind_plugins(plugins)

    def bind(self, victim: Victim, *, prepare: bool = True) -> None:
        """Serve ``victim``; with ``prepare``, optimise or load the prompt now."""
        self._victim = victim
        if self._purifier is not None:
            self._purifier.bind(victim, prepare=prepare)  # type: ignore[call-arg]
        if prepare:
            self.learned()

    def _require_victim(self) -> Victim:
        if self._victim is None:
            raise RuntimeError("codefend-prompt is optimised for a victim: call bind(victim) first")
        return self._victim

    def _spec(self, victim: Victim, split: str, per_task: int) -> PairSpec:
        return PairSpec(victim_fingerprint=victim.fingerprint, attacks=self.train_attacks, tasks=self.train_tasks,
                        split=split, per_task=per_task, seed=self.seed)

    def checkpoint_dir(self, victim: Victim) -> Path:
        blob = json.dumps(
            {
                "format": PROMPT_FORMAT_VERSION,
                "victim": victim.fingerprint,
                "mode": self.mode,
                "candidates": self.candidates if self.mode == "search" else None,
                "search": [self.rounds, self.population] if self.mode == "search" else None,
                "soft": [self.soft_tokens, self.soft_steps, self.soft_lr, self.train_split, self.train_pairs_per_task]
                if self.mode == "soft" else None,
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
            if (out / "soft_prompt.safetensors").exists() and record.get("use_soft", False):
                from safetensors.torch import load_file

                record["soft_prompt"] = load_file(str(out / "soft_prompt.safetensors"))["soft_prompt"].to(victim.device)
            self._learned[key] = record
        return self._learned[key]

    def train(self, *, progress: bool = True) -> dict[str, Any]:
        """Optimise (or load) the prompt for the bound victim; returns its record."""
        return {k: v for k, v in self.learned(progress=progress).items() if k != "soft_prompt"}

    def _selection_set(self, victim: Victim, progress: bool) -> tuple[Pairs, list[Any], list[dict[str, Any]]]:
        plugins = self.plugins
        pairs = make_pairs(victim, self._spec(victim, self.select_split, self.select_pairs_per_task), plugins=plugins,
                           progress=progress)
        tasks = [plugins.tasks.create(t.name, t.params) for t in self.train_tasks]
        lookup = [{s.id: s for s in task.samples(t.split or self.select_split, self.select_pairs_per_task, self.seed)}
                  for t, task in zip(self.train_tasks, tasks)]
        return pairs, tasks, lookup

    def _fitness(self, victim: Victim, images: dict[str, torch.Tensor], pairs: Pairs, tasks: list[Any],
                 lookup: list[dict[str, Any]], baseline: dict[str, float] | None, *, prefix: str = "",
                 soft_prompt: torch.Tensor | None = None) -> dict[str, float]:
        """Mean headline score per (task, condition) with this prompt; ``relative`` averages each
        over the baseline's clean score."""
        scores: dict[str, float] = {}
        for t_index, task in enumerate(tasks):
            rows = [i for i, t in enumerate(pairs.task_index) if t == t_index]
            samples = [lookup[t_index][pairs.sample_ids[i]] for i in rows]
            prompts = [_prefixed(prefix, s.prompt) for s in samples]
            kw = {"soft_prompt": soft_prompt} if soft_prompt is not None else {}
            for condition, pixels in images.items():
                outputs = []
                for start in range(0, len(rows), 128):
                    batch = rows[start : start + 128]
                    outputs += victim.generate(pixels[batch].to(victim.device), prompts[start : start + 128], task.kind, **kw)
                per_sample = task.score(outputs, samples)
                scores[f"{task.name}/{condition}"] = sum(float(s[task.metric]) for s in per_sample) / max(1, len(samples))
        reference = baseline or scores
        relative = [
            scores[key] / max(1e-9, reference[key.split("/")[0] + "/clean"]) for key in scores
        ]
        scores["relative"] = sum(relative) / len(relative)
        return scores

    def _optimise(self, victim: Victim, out: Path, *, progress: bool) -> None:
        started = time.perf_counter()
        pairs, tasks, lookup = self._selection_set(victim, progress)
        images = {"adversarial": self._purified(pairs.adversarial, 1), "clean": self._purified(pairs.clean, 2)}
        baseline = self._fitness(victim, images, pairs, tasks, lookup, None)
        record: dict[str, Any] = {"mode": self.mode, "baseline": baseline, "selection": pairs.record}
        if self.mode == "search":
            record.update(self._search(victim, images, pairs, tasks, lookup, baseline, progress))
        else:
            soft, soft_record = self._train_soft(victim, progress)
            scored = self._fitness(victim, images, pairs, tasks, lookup, baseline, soft_prompt=soft)
            record.update(soft_record)
            record["soft_scores"] = scored
            # selection: keep the soft prompt only if it beats no prompt on the held-out split
            record["use_soft"] = scored["relative"] > baseline["relative"]
            record["prefix"] = ""
        record["seconds"] = round(time.perf_counter() - started, 1)
        with publish_checkpoint(out) as scratch:
            if self.mode == "soft":
                from safetensors.torch import save_file

                save_file({"soft_prompt": soft.detach().cpu().contiguous()}, str(scratch / "soft_prompt.safetensors"))
            (scratch / "prompt.json").write_text(json.dumps(record, indent=1))

    def _search(self, victim, images, pairs, tasks, lookup, baseline, progress) -> dict[str, Any]:
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(self.seed)
        pool_words = sorted({w for c in self.candidates for w in c.split()})
        scored: dict[str, dict[str, float]] = {"": baseline}
        todo = [c for c in self.candidates if c not in scored]
        total = len(todo) + self.rounds * self.population
        with tqdm(total=total, desc="codefend-prompt search", unit="prompt", disable=not progress) as bar:
            for candidate in todo:
                scored[candidate] = self._fitness(victim, images, pairs, tasks, lookup, baseline, prefix=candidate)
                bar.update(1)
            for _ in range(self.rounds):
                ranked = sorted(scored, key=lambda c: (-scored[c]["relative"], c))
                parents = ranked[: max(2, self.population // 2)]
                for _ in range(self.population):
                    parent = parents[int(torch.randint(0, len(parents), (1,), generator=generator))]
                    other = parents[int(torch.randint(0, len(parents), (1,), generator=generator))]
                    child = mutations(parent, pool_words, other, generator)
                    if child not in scored:
                        scored[child] = self._fitness(victim, images, pairs, tasks, lookup, baseline, prefix=child)
                    bar.update(1)
        best = max(sorted(scored), key=lambda c: scored[c]["relative"])
        return {"prefix": best, "candidates": scored}

    def _train_soft(self, victim: Victim, progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        from tqdm.auto import tqdm

        if not hasattr(victim, "soft_prompt_dim"):
            raise ValueError(
                f"mode 'soft' needs a white-box victim that takes a soft_prompt (SoftPromptVictim); "
                f"{getattr(victim, 'name', victim)!r} does not: use mode 'search'"
            )
        pairs = make_pairs(victim, self._spec(victim, self.train_split, self.train_pairs_per_task), plugins=self.plugins,
                           progress=progress)
        adversarial, clean = self._purified(pairs.adversarial, 3), self._purified(pairs.clean, 4)
        generator = torch.Generator().manual_seed(self.seed)
        soft = (0.02 * torch.randn(self.soft_tokens, victim.soft_prompt_dim, generator=generator)).to(victim.device)  # type: ignore[attr-defined]
        initial = soft.clone()

        def pairs_loss(prompt: torch.Tensor) -> float:
            """Mean teacher-forced loss over every training pair, adversarial and clean."""
            with torch.no_grad():
                total = 0.0
                for source in (adversarial, clean):
                    for kind in sorted(set(pairs.kinds)):
                        rows = [i for i, k in enumerate(pairs.kinds) if k == kind]
                        for start in range(0, len(rows), 128):
                            batch = rows[start : start + 128]
                            total += victim.loss(  # type: ignore[call-arg]
                                source[batch].to(victim.device), [pairs.prompts[i] for i in batch],
                                [pairs.targets[i] for i in batch], kind, soft_prompt=prompt,
                            ).sum().item()
                return total / (2 * len(pairs))

        soft.requires_grad_(True)
        optimiser = torch.optim.Adam([soft], lr=self.soft_lr)
        history = []
        for _ in tqdm(range(self.soft_steps), desc="codefend-prompt soft", unit="step", disable=not progress, mininterval=1.0):
            index = torch.randint(0, len(pairs), (32,), generator=generator).tolist()
            losses = []
            for source in (adversarial, clean):
                for kind in sorted({pairs.kinds[i] for i in index}):
                    rows = [i for i in index if pairs.kinds[i] == kind]
                    losses.append(victim.loss(  # type: ignore[call-arg]
                        source[rows].to(victim.device), [pairs.prompts[i] for i in rows], [pairs.targets[i] for i in rows],
                        kind, soft_prompt=soft,
                    ).mean())
            loss = torch.stack(losses).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append(round(loss.item(), 5))
        return soft.detach(), {
            "soft_history": history,
            "soft_tokens": self.soft_tokens,
            "soft_loss_before": pairs_loss(initial),
            "soft_loss_after": pairs_loss(soft.detach()),
        }

    # -- the defense contract -----------------------------------------------------------------
    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return pixels

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        prefix = self.learned().get("prefix", "")
        return [_prefixed(prefix, p) for p in prompts]

    def soft_prompt(self) -> torch.Tensor | None:
        return self.learned().get("soft_prompt") if self.mode == "soft" else None


def _prefixed(prefix: str, prompt: str) -> str:
    return f"{prefix} {prompt}".strip() if prefix else prompt


def _prepare_prompt(params: dict[str, Any], victim: Victim, *, plugins: Any) -> None:
    prompt = CoDefendPrompt(**params)
    prompt.bind_plugins(plugins)
    prompt.bind(victim)
