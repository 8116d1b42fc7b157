"""CoDefend's prefix generator (``codefend-prompt``, ``mode: generator``): a LoRA-tuned copy of the
victim's own text model that reads each query (and the image the victim sees) and emits that
query's defensive soft prefix.

What is known and what is reconstruction:

- Known (secondary summaries of arXiv 2510.11096; its full text and code are not available): the
  text side is "a LoRA-based prefix generator" that adds a defensive prefix to each user query,
  while the MLLM stays frozen.
- Reconstruction (this project's choices):
  - the generator's frozen base is a copy of the victim's text model
    (:class:`~harness.contracts.QueryEncoderVictim`), so it starts from weights that already read
    the victim's queries and, through cross-attention, its image tokens; peft's LoRA adapters
    (``rank``, ``alpha``) on its attention and MLP projections are what trains;
  - ``T`` learned slot embeddings follow the query; the base's hidden states at the slots go
    through a linear head (zero at initialisation) and are added to a learned prefix, so that
    at initialisation every query gets the same prefix (as ``mode: soft`` starts) and the
    dependence on the query and image grows only as far as the objective pays for it;
  - the prefix is continuous (soft tokens through the victim's ``soft_prompt`` input): it needs
    a white-box victim. A discrete-text generator for black-box victims is not built: such a
    victim gets ``mode: search`` instead, and ``mode: generator`` is an error that says so;
  - the objective, the selection rule and the adversarial pairs are those of
    :mod:`defenses.prompt`.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from harness.contracts import QueryEncoder


class PrefixGenerator(torch.nn.Module):
    """``forward(prompts, image_features)`` -> [B, tokens, dim] soft prefixes (module docstring)."""

    def __init__(self, base: QueryEncoder, *, tokens: int, dim: int, rank: int, alpha: float, seed: int):
        from peft import LoraConfig, inject_adapter_in_model

        super().__init__()
        with torch.random.fork_rng(devices=[]):  # peft draws LoRA's A from the global generator
            torch.manual_seed(seed)
            with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself, and says so
                warnings.simplefilter("ignore")
                config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(base.lora_targets))
                self.base = inject_adapter_in_model(config, base)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(seed)
        self.slots = torch.nn.Parameter(0.02 * torch.randn(tokens, dim, generator=generator))
        self.prefix = torch.nn.Parameter(base.neutral_prefix(tokens).clone())
        self.head = torch.nn.Linear(dim, dim)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.trainable_names = tuple(name for name, p in self.named_parameters() if p.requires_grad)
        """What training changes (the adapters, slots, prefix and head), fixed here: serving turns
        every gradient off."""

    def forward(self, prompts: Sequence[str], image_features: torch.Tensor | None) -> torch.Tensor:
        states = self.base(prompts, self.slots, image_features)
        return self.prefix.unsqueeze(0) + self.head(states)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters' values: what the cache keeps."""
        parameters = dict(self.named_parameters())
        return {name: parameters[name].detach().clone() for name in self.trainable_names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_names)
        if set(state) != expected:
            raise ValueError(f"a cached prefix generator does not fit this victim's base: missing "
                             f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        with torch.no_grad():
            parameters = dict(self.named_parameters())
            for name, value in state.items():
                parameters[name].copy_(value)

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The base's own weights (never trained)."""
        return {name: p for name, p in self.named_parameters() if name not in self.trainable_names}
