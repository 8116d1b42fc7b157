"""The defender's randomness is secret from the attacker.

An adaptive attack gets the defended model as its target, generator included. If that were the
generator the runner then purifies with for evaluation, an attack could copy its state and know the
evaluation's noise in advance: a stochastic defense would be attacked as if it were deterministic
at the evaluation's exact draw, which no deployed attacker can do. Here an attack plugin does just
that, and the noise it predicts must not be the noise the evaluation used.
"""

from __future__ import annotations

import sys

import pytest
import torch

from harness.contracts import Attack, AttackResult, Defense
from harness.hookspecs import hookimpl

from suite_helpers import suite_run

PREDICTED: list[list[float]] = []
"""What the spying attack expects the defense's next draw to be (one list per attack call)."""
DRAWN: list[list[float]] = []
"""The noise of every purification, in call order."""


class NoiseLogger(Defense):
    """Stochastic in name: draws one number per image and logs it; the pixels pass unchanged."""

    stochastic = True
    eot_samples = 1

    def purify(self, pixels, generator):
        DRAWN.append(torch.rand(pixels.shape[0], generator=generator).tolist())
        return pixels


class NoiseSpy(Attack):
    """Copies its target's generator and predicts the defense's next draw; changes no pixel."""

    requires = "gradients"

    def perturb(self, target, batch, threat, generator, progress=None):
        copy = torch.Generator()
        copy.set_state(target.generator.get_state())
        PREDICTED.append(torch.rand(batch.pixels.shape[0], generator=copy).tolist())
        return AttackResult(pixels=batch.pixels.clone())


@hookimpl
def register_attacks(register):
    register("noise-spy", NoiseSpy, description="predicts the defense's next draw (test)")


@hookimpl
def register_defenses(register):
    register("noise-logger", NoiseLogger, description="logs its draws (test)")


SUITE = """\
name: secret-randomness
seed: 0
victims:
  - {name: shapes-vlm, params: {steps: 100}}
tasks:
  - {name: vqav2, data: shapes, split: test, n: 3}
threat_models:
  linf-8: {norm: linf, eps: 8/255}
attacks:
  - {name: noise-spy, threats: [linf-8], adaptive: true, eot: 1, draws: 3}
defenses:
  - name: noise-logger
adaptive: {enabled: false, reason: "this test runs its own adaptive attack"}
"""


@pytest.mark.usefixtures("tiny_victim")
def test_an_adaptive_attack_cannot_predict_the_evaluation_draws(tmp_path) -> None:
    PREDICTED.clear()
    DRAWN.clear()
    with suite_run(sys.modules[__name__], "secret-randomness-test", SUITE, tmp_path) as (summary, _):
        pass
    assert not summary.failures, summary.failures
    assert len(PREDICTED) == 1, "the spy attacked one batch"
    # the evaluation purified the batch 3 times (3 draws), each with its own noise
    evaluation = [draw for draw in DRAWN if len(draw) == len(PREDICTED[0])]
    assert len(evaluation) == 3 and len({tuple(d) for d in evaluation}) == 3
    assert PREDICTED[0] not in evaluation, "the attack knew the evaluation's noise in advance"
