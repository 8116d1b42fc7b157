"""The plugin author's conformance kit (harness.testing): every built-in passes it, and each
broken plugin an author is likely to write fails it with a message that says what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness.contracts import Attack, AttackResult, Defense, ThreatModel
from harness.plugins import get_plugins
from harness.testing import ContractError, FakeVictim, check_attack, check_defense, check_task, check_victim

# -- the built-ins pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("none", {}), ("jpeg", {"quality": 75})])
def test_builtin_defenses_pass(name: str, params: dict) -> None:
    check_defense(get_plugins().defenses.create(name, params))


def test_diffpure_passes_on_a_tiny_latent_backbone() -> None:
    from defenses.diffpure import DiffPure
    from defenses.diffusion import build_tiny_latent_backbone

    check_defense(DiffPure.from_backbone(build_tiny_latent_backbone(), sampler="ddim", steps=2),
                  victim=FakeVictim(input_size=(32, 32)))


@pytest.mark.parametrize("name,params", [("none", {}), ("pgd", {"steps": 3}), ("apgd", {"steps": 3}),
                                         ("ensemble", {"members": [{"name": "pgd", "params": {"steps": 2}}]})])
def test_builtin_attacks_pass(name: str, params: dict) -> None:
    adversarial = check_attack(get_plugins().attacks.create(name, params))
    assert adversarial.shape == (2, 3, 16, 16)


def test_the_fake_victim_and_a_tiny_llava_pass(tmp_path: Path) -> None:
    from harness.victims.hf import HFLlava
    from harness.victims.tiny_models import build_tiny_llava

    check_victim(FakeVictim())
    check_victim(HFLlava(model_id=str(build_tiny_llava(tmp_path / "llava")), device="cpu", max_new_tokens=3))


@pytest.mark.parametrize("name,params", [("vqav2", {"data": "shapes"}), ("coco_captions", {"data": "shapes", "meteor": False})])
def test_builtin_tasks_pass(name: str, params: dict, codefend_home) -> None:
    samples = check_task(get_plugins().tasks.create(name, params), "test")
    assert len(samples) == 4


def test_the_fake_victim_is_deterministic_and_its_loss_moves_with_the_pixels() -> None:
    victim = FakeVictim()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert victim.generate(pixels, ["q", "q"]) == FakeVictim().generate(pixels, ["q", "q"])
    assert not torch.allclose(victim.loss(pixels, ["q"] * 2, ["red"] * 2), victim.loss(1 - pixels, ["q"] * 2, ["red"] * 2))


# -- each broken plugin fails with the message its author needs --------------------------------


class OutOfRange(Defense):
    def purify(self, pixels, generator):
        return pixels * 2 - 0.5


class WrongShape(Defense):
    def purify(self, pixels, generator):
        return pixels[:, :, ::2, ::2]


class GlobalNoise(Defense):
    stochastic = True

    def purify(self, pixels, generator):
        return (pixels + 0.05 * torch.randn_like(pixels)).clamp(0, 1)  # ignores the generator


class BreaksTheGraph(Defense):
    differentiable = True

    def purify(self, pixels, generator):
        return torch.from_numpy(np.clip(pixels.detach().numpy(), 0.1, 0.9))


class DetachedPrompts(Defense):
    """A per-sample prompt made from the pixels outside the graph: an adaptive attack would miss it."""

    def soft_prompts(self, pixels, prompts):
        return pixels.detach().mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, 2, 8).clone()


class OnePromptForAll(Defense):
    def soft_prompts(self, pixels, prompts):
        return pixels.mean().view(1, 1, 1).expand(1, 2, 8)


class PoorStandIn(Defense):
    """Quantises to 4 levels, and declares a stand-in that is further from that than the identity."""

    differentiable = False
    bpda = "approximate"

    def purify(self, pixels, generator):
        return (pixels * 3).round() / 3

    def approximate(self, pixels):
        return 1 - pixels


class DetachedStandIn(PoorStandIn):
    def approximate(self, pixels):
        return self.purify(pixels.detach(), None)


class LeavesItsBall(Attack):
    def perturb(self, target, batch, threat, generator, progress=None):
        return AttackResult(pixels=(batch.pixels + 2 * threat.eps).clamp(0, 1))


class IgnoresThePixels(FakeVictim):
    def loss(self, pixels, prompts, targets, kind="vqa"):
        return super().loss(pixels.detach(), prompts, targets, kind)


@pytest.mark.parametrize("defense,message", [
    (OutOfRange(), r"defense 'OutOfRange': purify returned pixels outside \[0,1\].*clamp its output"),
    (WrongShape(), r"defense 'WrongShape': purify returned shape \(2, 3, 8, 8\) for input \(2, 3, 16, 16\)"),
    (GlobalNoise(), r"defense 'GlobalNoise': the same generator seed gave different outputs.*global randomness"),
    (BreaksTheGraph(), r"defense 'BreaksTheGraph' declares differentiable = True but purify's output has no gradient path"),
    (DetachedPrompts(), r"defense 'DetachedPrompts': soft_prompts has no gradient path to the pixels"),
    (OnePromptForAll(), r"defense 'OnePromptForAll': soft_prompts must return finite \[B, tokens, dim\] prompts, one per sample, "
                        r"got shape \(1, 2, 8\) for 2 samples"),
    (PoorStandIn(), r"defense 'PoorStandIn': approximate\(pixels\) is further from purify\(pixels\).*than the pixels "
                    r"themselves are.*declare bpda = 'identity'"),
    (DetachedStandIn(), r"defense 'DetachedStandIn': approximate has no gradient path to its input"),
])
def test_check_defense_catches(defense: Defense, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        check_defense(defense)


def test_check_defense_catches_a_false_stochastic_declaration() -> None:
    class SeededNoise(Defense):  # uses its generator properly, but says it is deterministic
        def purify(self, pixels, generator):
            return (pixels + 0.05 * torch.randn(pixels.shape, generator=generator)).clamp(0, 1)

    with pytest.raises(ContractError, match="declares stochastic = False but its output changes with the generator"):
        check_defense(SeededNoise())
    SeededNoise.stochastic = True
    check_defense(SeededNoise())


def test_check_attack_catches_an_attack_that_leaves_its_ball() -> None:
    with pytest.raises(ContractError, match=r"attack 'LeavesItsBall' under threat 'linf-8'.*left its ball: measured linf norm 16/255"):
        check_attack(LeavesItsBall())
    with pytest.raises(ContractError, match="left its ball"):
        check_attack(LeavesItsBall(), threat=ThreatModel("l2-1", "l2", 0.05))


def test_check_victim_catches_a_loss_that_ignores_the_pixels() -> None:
    with pytest.raises(ContractError, match=r"victim 'fake-victim': loss does not depend on the pixels it is given"):
        check_victim(IgnoresThePixels())


def test_trainable_defenses_are_declared_by_protocol() -> None:
    from harness.contracts import TrainableDefense

    defenses = get_plugins().defenses
    for name in ("codefend-purifier", "codefend-prompt", "codefend"):
        assert isinstance(defenses.create(name, {}), TrainableDefense), name
    for name in ("none", "jpeg", "diffpure"):
        assert not isinstance(defenses.create(name, {}), TrainableDefense), name
