"""``codefend``: the full CoDefend defense, the supervised purifier then the optimised prompt.

The prompt is optimised with the purifier in place: it is selected on purified images, and a soft
prompt or prefix generator also trains on them (what the victim actually sees behind the
purifier). An adaptive attack goes through both: the purifier, then the prompt made from the
purified pixels. Parameters are the two parts' own: ``purifier`` goes to
:class:`~defenses.purifier.CoDefendPurifier`, ``prompt`` to :class:`~defenses.prompt.CoDefendPrompt`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from defenses.prompt import CoDefendPrompt
from defenses.purifier import CoDefendPurifier
from harness.plugins import PluginsUser
from harness.contracts import Defense, Preparation, TrainingAttack, Victim


class CoDefend(PluginsUser, Defense):
    """Purifier + prompt (see the module docstring)."""

    stochastic = CoDefendPurifier.stochastic
    differentiable = CoDefendPurifier.differentiable
    bpda = None
    eot_samples = CoDefendPurifier.eot_samples

    def __init__(self, *, purifier: dict[str, Any] | None = None, prompt: dict[str, Any] | None = None):
        self.purifier = CoDefendPurifier(**dict(purifier or {}))
        prompt = dict(prompt or {})
        if "purifier" in prompt:
            raise ValueError("codefend: set the purifier once, under 'purifier' (not under 'prompt')")
        self.prompt = CoDefendPrompt(**prompt, purifier=dict(purifier or {}))

    @property
    def training_attacks(self) -> list[TrainingAttack]:
        """The purifier's training attacks and the prompt's, each once (``seen_attacks`` derives)."""
        union: list[TrainingAttack] = []
        for attack in [*self.purifier.training_attacks, *self.prompt.training_attacks]:
            if attack not in union:
                union.append(attack)
        return union

    def preparations(self) -> list[Preparation]:
        """The purifier's and the prompt's, each once (the prompt's already include the purifier)."""
        out: dict[str, Preparation] = {}
        for step in [*self.purifier.preparations(), *self.prompt.preparations()]:
            out.setdefault(step.key, step)
        return list(out.values())

    def bind_plugins(self, plugins: Any) -> None:
        self.purifier.bind_plugins(plugins)
        self.prompt.bind_plugins(plugins)
        super().bind_plugins(plugins)

    def bind(self, victim: Victim, *, prepare: bool = True) -> None:
        self.purifier.bind(victim, prepare=prepare)
        self.prompt.bind(victim, prepare=prepare)

    def train(self, *, progress: bool = True) -> dict[str, Any]:
        """Train the purifier, then optimise the prompt behind it (each cached on its own)."""
        purifier = self.purifier.train(progress=progress)
        prompt = self.prompt.train(progress=progress)
        return {"purifier_seconds": purifier["seconds"], "prompt_mode": prompt["mode"], "prefix": prompt.get("prefix", ""),
                "prompt_chosen": prompt.get("chosen"), "prompt_seconds": prompt["seconds"]}

    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.purifier.purify(pixels, generator)

    def rewrite(self, prompts: Sequence[str]) -> list[str]:
        return self.prompt.rewrite(prompts)

    def soft_prompt(self) -> torch.Tensor | None:
        return self.prompt.soft_prompt()

    def soft_prompts(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor | None:
        """The prefix generator's prompts, made from the purified pixels (``mode: generator``)."""
        return self.prompt.soft_prompts(pixels, prompts)

    def passes_per_sample(self) -> int:
        return self.purifier.passes_per_sample()
