"""DiffPure's gradient checkpointing and its surrogate process, on the tiny shapes-ddpm of
``tests/test_diffpure.py`` (conftest's ``TINY_DDPM``, trained once per session).

Checkpointing must change memory only: the same seed gives the same purification and the same
gradient with it on or off, and nothing at all changes without gradients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defenses.diffpure import DiffPure
from defenses.diffusion import PixelDiffusion, ShapesDDPM, shapes_heldout_images

CASES = [("ddpm", 5), ("ddim", None), ("sde", 5)]  # 5 UNet calls each (ddim's default is 5 steps)


@pytest.fixture(scope="module")
def backbone(codefend_home: Path, tiny_ddpm_params: dict) -> PixelDiffusion:
    return ShapesDDPM(**tiny_ddpm_params, device="cpu").load(progress=False)


@pytest.fixture(scope="module")
def clean(codefend_home: Path) -> torch.Tensor:
    return shapes_heldout_images(2, split="val")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Calls:
    """Counts forward calls of a module (a checkpointed step runs again on the backward pass).
    A pre-hook: recomputation stops early, once the last saved tensor is rebuilt, so a module's
    recomputed forward may never return (and a plain forward hook never fire)."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1

    def remove(self) -> None:
        self._handle.remove()


def _attack_step(defense: DiffPure, pixels: torch.Tensor, weights: torch.Tensor, seed: int = 3):
    x = pixels.clone().requires_grad_(True)
    out = defense.purify(x, _gen(seed))
    (out * weights).mean().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("sampler,steps", CASES)
def test_gradient_is_the_same_with_and_without_checkpointing(backbone, clean, sampler, steps) -> None:
    weights = torch.randn(clean.shape, generator=_gen(11))
    calls = _Calls(backbone.unet)
    try:
        results = {}
        for flag in (True, False):
            calls.n = 0
            defense = DiffPure.from_backbone(backbone, sampler=sampler, steps=steps, gradient_checkpointing=flag)
            results[flag] = (*_attack_step(defense, clean, weights), calls.n)
    finally:
        calls.remove()
    (out_on, grad_on, calls_on), (out_off, grad_off, calls_off) = results[True], results[False]
    assert torch.equal(out_on, out_off)
    assert grad_on.abs().sum() > 0 and torch.isfinite(grad_on).all()
    assert torch.allclose(grad_on, grad_off, atol=1e-5, rtol=0), (grad_on - grad_off).abs().max()
    # checkpointed: each of the 5 steps is recomputed once on the backward pass
    assert (calls_off, calls_on) == (5, 10)


@pytest.mark.parametrize("sampler,steps", CASES)
def test_no_grad_outputs_do_not_depend_on_the_flag(backbone, clean, sampler, steps) -> None:
    outs = []
    with torch.no_grad():
        for flag in (True, False):
            outs.append(DiffPure.from_backbone(backbone, sampler=sampler, steps=steps,
                                               gradient_checkpointing=flag).purify(clean, _gen(5)))
    assert torch.equal(outs[0], outs[1])
    tracked = DiffPure.from_backbone(backbone, sampler=sampler, steps=steps).purify(
        clean.clone().requires_grad_(True), _gen(5))
    assert torch.allclose(tracked.detach(), outs[0], atol=1e-6, rtol=0)


def test_latent_backbone_encode_and_decode_are_checkpointed() -> None:
    from defenses.diffusion import build_tiny_latent_backbone

    model = build_tiny_latent_backbone()
    pixels = torch.rand(2, 3, 32, 32, generator=_gen(0))
    weights = torch.randn(pixels.shape, generator=_gen(1))
    encoder, decoder = _Calls(model.vae.encoder), _Calls(model.vae.decoder)
    try:
        results = {}
        for flag in (True, False):
            encoder.n = decoder.n = 0
            defense = DiffPure.from_backbone(model, sampler="ddpm", steps=2, gradient_checkpointing=flag)
            results[flag] = (*_attack_step(defense, pixels, weights), encoder.n, decoder.n)
    finally:
        encoder.remove()
        decoder.remove()
    assert results[True][2:] == (2, 2) and results[False][2:] == (1, 1)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.allclose(results[True][1], results[False][1], atol=1e-5, rtol=0)


def test_surrogate_process_shares_the_backbone(backbone, clean, tiny_ddpm_params) -> None:
    for sampler in ("ddpm", "sde", "ddim"):
        defense = DiffPure.from_backbone(backbone, t_star=0.1, sampler=sampler, gradient_checkpointing=False)
        surrogate = defense.surrogate_process(2)
        assert surrogate is not defense and isinstance(surrogate, DiffPure)
        assert surrogate.passes_per_sample() == 2
        assert (surrogate.t_star, surrogate.sampler, surrogate.gradient_checkpointing) == (0.1, sampler, False)
        assert surrogate.load() is backbone
    calls = _Calls(backbone.unet)
    try:
        with torch.no_grad():
            DiffPure.from_backbone(backbone, sampler="ddpm").surrogate_process(2).purify(clean, _gen())
    finally:
        calls.remove()
    assert calls.n == 2

    # already cheap: the defense itself
    cheap = DiffPure.from_backbone(backbone, sampler="ddim", steps=2)
    assert cheap.surrogate_process(2) is cheap and cheap.surrogate_process(5) is cheap
    default_ddim = DiffPure.from_backbone(backbone, sampler="ddim")
    assert default_ddim.surrogate_process(5) is default_ddim

    # lazy: a surrogate of an unloaded defense loads nothing itself, then shares its parent's model
    lazy = DiffPure(sampler="ddpm", backbone_params={**tiny_ddpm_params, "device": "cpu"})
    surrogate = lazy.surrogate_process(2)
    assert lazy._model is None and surrogate._model is None
    assert surrogate.load() is lazy.load()
    with pytest.raises(ValueError, match="steps must be an integer"):
        lazy.surrogate_process(0)
