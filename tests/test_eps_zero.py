"""ε = 0 runs each attack's real code path and returns the clean pixels exactly.

Carlini's check "ε = 0 must reproduce the clean score" only catches an attack bug when the attack
does not special-case ε = 0: every attack here must ask its target (or its surrogate) at least once
and still return the clean pixels bit for bit (its projection onto the zero ball does that).
"""

from __future__ import annotations

import pytest
import torch

from attacks.apgd import APGD
from attacks.art_attacks import ARTFGSM, ARTPGD, ARTSquare
from attacks.pgd import PGD
from attacks.transfer import MFii, MFtt
from harness.contracts import ThreatModel

from attack_helpers import Batch, run_attack

SURROGATE = {"seed": 1, "steps": 100}  # the surrogate test_attack_transfer trains (cached per session)
NORMS = ("linf", "l2")


class Counting:
    """The victim behind a counter of every loss and generate call."""

    def __init__(self, victim) -> None:
        self.victim = victim
        self.losses = 0
        self.generations = 0

    def loss(self, pixels, prompts, targets, kind):
        self.losses += 1
        return self.victim.loss(pixels, prompts, targets, kind)

    def generate(self, pixels, prompts, kind):
        self.generations += 1
        return self.victim.generate(pixels, prompts, kind)


class CountingSurrogate:
    """A surrogate model whose ``embed_image`` calls are counted; the rest passes through."""

    def __init__(self, model) -> None:
        self.model = model
        self.embeddings = 0

    def embed_image(self, pixels):
        self.embeddings += 1
        return self.model.embed_image(pixels)

    def __getattr__(self, name):
        return getattr(self.model, name)


class NoLoss:
    """A target whose loss must never be asked for (transfer and query attacks)."""

    def __init__(self, victim) -> None:
        self.victim = victim
        self.generations = 0

    def loss(self, *args, **kwargs):
        raise AssertionError("the attack asked the victim for a loss")

    def generate(self, pixels, prompts, kind):
        self.generations += 1
        return self.victim.generate(pixels, prompts, kind)


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> Batch:
    return Batch(tiny_victim, vqa_task, vqa_task.samples("test", 3, 0))


def _zero(norm: str) -> ThreatModel:
    return ThreatModel(f"{norm}-0", norm, 0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "attack",
    [PGD(steps=2), PGD(steps=2, random_start=False), APGD(steps=3), APGD(steps=3, random_start=True),
     APGD(steps=3, target="3"), ARTPGD(steps=2), ARTPGD(steps=2, target="3"), ARTFGSM(), ARTSquare(max_iter=1)],
    ids=["pgd", "pgd-no-random-start", "apgd", "apgd-random-start", "apgd-targeted", "art-pgd", "art-pgd-targeted",
         "art-fgsm", "art-square"],
)
@pytest.mark.parametrize("norm", NORMS)
def test_white_box_and_art_attacks_run_at_eps_zero(tiny_victim, batch, attack, norm) -> None:
    target = Counting(tiny_victim)
    result = run_attack(attack, target, batch.attack_batch(seeds=[1, 2, 3]), _zero(norm))
    assert target.losses >= 1, "the attack returned without asking the target"
    assert torch.equal(result.pixels, batch.pixels), (result.pixels - batch.pixels).abs().max()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses), result.losses


@pytest.mark.parametrize("norm", NORMS)
def test_mfii_runs_its_surrogate_at_eps_zero(tiny_victim, batch, norm) -> None:
    attack = MFii(target_text="red", surrogate_params=SURROGATE, steps=2)
    counting = CountingSurrogate(attack.surrogate_model())
    attack._surrogate_model = counting
    target = NoLoss(tiny_victim)
    result = run_attack(attack, target, batch.attack_batch(), _zero(norm))
    assert counting.embeddings >= 3  # the target image, then every step
    assert target.generations == 0, "mf-ii queried the victim"
    assert torch.equal(result.pixels, batch.pixels)
    assert (result.forward_passes, result.backward_passes) == (3, 2)


@pytest.mark.parametrize("start_from_transfer", [False, True], ids=["queries", "transfer-then-queries"])
def test_mftt_queries_the_victim_at_eps_zero(tiny_victim, batch, start_from_transfer) -> None:
    attack = MFtt(target_text="red", surrogate_params=SURROGATE, steps=1, num_queries=2,
                  start_from_transfer=start_from_transfer, transfer_steps=1)
    target = NoLoss(tiny_victim)
    result = run_attack(attack, target, batch.attack_batch(seeds=[1, 2, 3]), _zero("linf"))
    assert target.generations >= 3 and result.queries == 3 * attack.queries_per_sample()
    assert torch.equal(result.pixels, batch.pixels)
