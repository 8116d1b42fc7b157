"""The DLR objective (harness/objectives.py), victims' logits, and APGD runs that raise it."""

from __future__ import annotations

import pytest
import torch

from attacks.apgd import APGD
from harness.adaptive import DefendedTarget, gradient_route
from harness.contracts import AttackBatch, ThreatModel
from harness.plugins import get_plugins
from harness.objectives import cross_entropy, dlr, from_logits, objective_function
from harness.protocol import AdaptiveProtocol

from attack_helpers import Batch
from attack_helpers import run_attack as _run

LINF2 = ThreatModel("linf-2", "linf", 2 / 255)
LINF8 = ThreatModel("linf-8", "linf", 8 / 255)


def _logits(*rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_dlr_is_positive_exactly_where_another_token_beats_the_answer_and_ignores_the_end_token() -> None:
    # vocabulary of 4; position 0 predicts the answer (token 1), position 1 the end token (3)
    logits = _logits(
        [[0.0, 5.0, 1.0, 0.0], [9.0, 0.0, 0.0, 1.0]],  # answer wins; the end token loses badly
        [[0.0, 1.0, 5.0, 0.0], [0.0, 0.0, 0.0, 9.0]],  # another token beats the answer
    )
    labels = torch.tensor([[1, 3], [1, 3]])
    value = dlr(logits, labels)
    assert value[0] < 0 < value[1]
    # (max other − answer) / (top1 − top3): the end token's position is left out
    assert value[0].item() == pytest.approx((1.0 - 5.0) / (5.0 - 0.0))
    assert value[1].item() == pytest.approx((5.0 - 1.0) / (5.0 - 0.0))
    # invariant to the logits' scale and shift, unlike cross-entropy
    assert torch.allclose(dlr(logits * 7 + 3, labels), value)
    assert not torch.allclose(cross_entropy(logits * 7, labels), cross_entropy(logits, labels))
    # a target of one token (the end token alone) keeps it; unlabelled positions never count
    alone = dlr(logits[:, 1:], labels[:, 1:])
    assert alone[0] > 0 > alone[1]
    padded = dlr(torch.cat([logits, logits[:, :1]], dim=1), torch.cat([labels, torch.full((2, 1), -100)], dim=1))
    assert torch.allclose(padded, value)
    with pytest.raises(ValueError, match="unknown objective 'cw'; choose from ce, dlr"):
        from_logits("cw", logits, labels)


@pytest.fixture(scope="module")
def batch(tiny_victim, vqa_task) -> Batch:
    return Batch(tiny_victim, vqa_task, vqa_task.samples("test", 16, 0))


def test_the_victims_logits_are_its_loss_s_and_dlr_reads_its_greedy_answer(tiny_victim, batch) -> None:
    """``loss`` is the cross-entropy of ``target_logits``; at the answer's first token the DLR is
    positive exactly where greedy decoding starts another answer."""
    with torch.no_grad():
        logits, labels = tiny_victim.target_logits(batch.pixels, batch.prompts, batch.targets, "vqa")
        loss = tiny_victim.loss(batch.pixels, batch.prompts, batch.targets, "vqa")
        outputs = tiny_victim.generate(batch.pixels, batch.prompts, "vqa")
    assert torch.allclose(cross_entropy(logits, labels), loss)
    first = (labels != -100).float().argmax(dim=1)
    rows = torch.arange(len(first))
    answered_first = logits[rows, first].argmax(dim=1) == labels[rows, first]
    word = [tiny_victim.tokenizer.decode([int(t)]).strip() for t in labels[rows, first]]
    greedy_first = [o.split()[0] == w if o.split() else False for o, w in zip(outputs, word)]
    assert answered_first.tolist() == greedy_first
    single = dlr(logits[rows, first].unsqueeze(1), labels[rows, first].unsqueeze(1))
    assert ((single < 0) == answered_first).all()
    assert answered_first.any()


class Recording:
    """The victim as an attack target, recording which objective each gradient call raised."""

    def __init__(self, victim, logits: bool = True):
        self.victim, self.calls = victim, []
        if logits:
            self.target_logits = self._target_logits

    def loss(self, pixels, prompts, targets, kind):
        self.calls.append(("ce", pixels.shape[0]))
        return self.victim.loss(pixels, prompts, targets, kind)

    def _target_logits(self, pixels, prompts, targets, kind):
        self.calls.append(("logits", pixels.shape[0]))
        return self.victim.target_logits(pixels, prompts, targets, kind)

    def generate(self, pixels, prompts, kind):
        return self.victim.generate(pixels, prompts, kind)


def _scored(batch: Batch, vqa_task, n: int) -> AttackBatch:
    b = batch.attack_batch(n, seeds=list(range(n)))
    b.scorer = lambda outputs, idx: [s["vqa_accuracy"] for s in vqa_task.score(list(outputs), [batch.samples[i] for i in idx])]
    return b


def test_apgd_raises_dlr_on_the_samples_cross_entropy_left_standing(tiny_victim, vqa_task, batch) -> None:
    n = 12
    target = Recording(tiny_victim)
    single = _run(APGD(steps=4), tiny_victim, _scored(batch, vqa_task, n), LINF2)
    attack = APGD(steps=4, restarts=1, objectives=["ce", "dlr"])
    result = _run(attack, target, _scored(batch, vqa_task, n), LINF2)
    first = _scored(batch, vqa_task, n).judge(tiny_victim, single.pixels, list(range(n)))
    survivors = sum(f > 0 for f in first)
    assert 0 < survivors < n, first
    # the first run raises cross-entropy on every sample; the second, DLR on the survivors (through the
    # logits), and its example is then compared on cross-entropy (one forward pass)
    assert target.calls[: 5] == [("ce", n)] * 5
    assert target.calls[5:10] == [("logits", survivors)] * 5
    assert target.calls[10:] == [("ce", survivors)]
    assert (result.forward_passes, result.backward_passes) == (2 * 5 + 1 + 2, 2 * 4)
    assert attack.passes_per_sample() == (2 * 5 + 1, 2 * 4)
    after = _scored(batch, vqa_task, n).judge(tiny_victim, result.pixels, list(range(n)))
    assert all(a <= f for a, f in zip(after, first))
    assert result.losses == single.losses  # the first run's cross-entropy: the loss-rise check's like with like


def test_dlr_runs_raise_the_dlr_through_a_defense_s_route(tiny_victim, batch) -> None:
    defense = get_plugins().defenses.create("jpeg", {"quality": 75})
    defense.bind(tiny_victim)
    target = DefendedTarget(tiny_victim, defense, gradient_route(defense, 1), torch.Generator().manual_seed(0))
    assert target.objectives() == ("ce", "dlr")
    result = _run(APGD(steps=5, objectives=["dlr"]), target, batch.attack_batch(8), LINF8)
    function = objective_function(target, "dlr")
    assert function is not None
    with torch.no_grad():
        before = function(batch.pixels[:8], batch.prompts[:8], batch.targets[:8], "vqa")
        after = function(result.pixels, batch.prompts[:8], batch.targets[:8], "vqa")
    assert result.losses[0] == pytest.approx(before.mean().item(), abs=1e-5)
    assert after.mean() > before.mean()  # gradients flow: the DLR rose through JPEG's BPDA route


def test_a_target_without_logits_warns_and_raises_cross_entropy(tiny_victim, batch) -> None:
    target = Recording(tiny_victim, logits=False)
    assert objective_function(target, "dlr") is None
    with pytest.warns(UserWarning, match="cannot give the 'dlr' objective.*TargetLogitsVictim"):
        result = _run(APGD(steps=2, objectives=["dlr"]), target, batch.attack_batch(4), LINF8)
    assert {c[0] for c in target.calls} == {"ce"}
    assert result.objectives_unavailable == ["dlr"]  # recorded with the rows: the board flags it


def test_objectives_are_checked_and_the_standard_attack_adds_dlr() -> None:
    for bad in ([], ["cw"], ["ce", "margin"]):
        with pytest.raises(ValueError, match="objectives must list one or more of ce, dlr"):
            APGD(objectives=bad)
    assert APGD().objectives == ("ce",)
    assert AdaptiveProtocol().params["objectives"] == ["ce", "dlr"]
    assert AdaptiveProtocol(params={"steps": 20}).params == {"steps": 20, "restarts": 1, "objectives": ["ce", "dlr"]}
    # an objective's first run starts where the first run did; its repeats from random points
    assert APGD(restarts=3, objectives=["ce", "dlr"]).passes_per_sample() == (4 * 101 + 2, 4 * 100)


# -- through a run: a victim without logits gets a weaker attack, and the board says so ----------

import sys  # noqa: E402

from harness.hookspecs import hookimpl  # noqa: E402
from harness.testing import FakeVictim  # noqa: E402

from suite_helpers import suite_run  # noqa: E402


@hookimpl
def register_victims(register):
    register("logitless-victim", FakeVictim, description="a victim that exposes no logits (test)")


def test_the_standard_attack_through_a_victim_without_logits_is_flagged_weaker_on_the_board(tmp_path) -> None:
    from leaderboard.aggregate import build_board

    suite = """\
name: logitless
seed: 0
victims: [{name: logitless-victim}]
tasks: [{name: vqav2, data: shapes, split: test, n: 4}]
threat_models: {linf-8: {norm: linf, eps: 8/255}}
attacks: [{name: none}]
defenses: [{name: none}]
adaptive: {params: {steps: 2}, samples: 4, convergence: {enabled: false}}
"""
    with pytest.warns(UserWarning, match="cannot give the 'dlr' objective"):
        with suite_run(sys.modules[__name__], "logitless-test", suite, tmp_path) as (summary, store):
            assert not summary.failures
            rows = [r for r in store.results() if r.attack == "adaptive"]
            board = build_board(store)
    assert rows and all(r.record.attack_cost.objectives_unavailable == ["dlr"] for r in rows)
    flags = [f for f in board.tables[0].flags if f.code == "objective-unavailable"]
    (flag,) = flags
    assert (flag.defense, flag.condition) == ("none", "adaptive@linf-8")
