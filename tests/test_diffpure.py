"""``diffpure`` and the ``shapes-ddpm`` backbone: a real (tiny) DDPM trained on the shapes world.

One small model is trained per session (conftest's ``TINY_DDPM``; ~20 s on one CPU thread, cached in
``CODEFEND_HOME``) and shared by every test here. Thresholds were measured on it with margin
(numbers in the comments).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defenses.diffpure import DiffPure
from harness.image_quality import psnr, purification_quality, ssim
from defenses.diffusion import (
    Backbone,
    LatentDiffusion,
    PixelDiffusion,
    ShapesDDPM,
    ShapesDDPMConfig,
    build_scheduler,
    build_unet,
    denoising_mse,
    shapes_heldout_images,
)
from harness.contracts import Defense
from conftest import TINY_DDPM

@pytest.fixture(scope="module")
def tiny_ddpm(codefend_home: Path, tiny_ddpm_params: dict) -> ShapesDDPM:
    model = ShapesDDPM(**tiny_ddpm_params, device="cpu")
    model.load(progress=False)
    return model


@pytest.fixture(scope="module")
def backbone(tiny_ddpm: ShapesDDPM) -> PixelDiffusion:
    return tiny_ddpm.load()


@pytest.fixture(scope="module")
def clean(codefend_home: Path) -> torch.Tensor:
    """Held-out (val split) shapes images, [8,3,32,32] in [0,1]."""
    return shapes_heldout_images(8, split="val")


def _purifier(backbone: PixelDiffusion, **params) -> DiffPure:
    return DiffPure.from_backbone(backbone, **params)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the backbone -------------------------------------------------------------------------------


def test_ddpm_training_loss_falls_and_the_model_denoises(tiny_ddpm: ShapesDDPM, backbone, clean) -> None:
    losses = tiny_ddpm.training_record()["losses"]
    assert len(losses) == TINY_DDPM["steps"]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)  # measured 0.63 -> 0.25

    config = ShapesDDPMConfig(channels=TINY_DDPM["channels"])
    torch.manual_seed(0)
    untrained = PixelDiffusion(build_unet(config), build_scheduler(config))
    trained_mse = denoising_mse(backbone, clean, 100, _gen(1))
    untrained_mse = denoising_mse(untrained, clean, 100, _gen(1))
    assert trained_mse < 0.3 * untrained_mse, (trained_mse, untrained_mse)  # measured 0.15 vs ~1.1


def test_shapes_ddpm_is_cached_in_diffusers_layout(tiny_ddpm: ShapesDDPM, backbone, clean, monkeypatch) -> None:
    folder = tiny_ddpm.cache_dir
    assert folder.name == f"shapes-ddpm-{tiny_ddpm.config.fingerprint()}"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "training.json"):
        assert (folder / name).is_file(), name
    assert not folder.with_name(folder.name + ".partial").exists()

    import defenses.diffusion as diffusion

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(diffusion, "train_shapes_ddpm", no_training)
    again = ShapesDDPM(**TINY_DDPM, device="cpu").load(progress=False)
    by_path = PixelDiffusion.from_pretrained(str(folder))
    x = backbone.to_model_space(clean[:2])
    with torch.no_grad():
        expected = backbone.predict_noise(x, 50)
        assert torch.equal(again.predict_noise(x, 50), expected)
        assert torch.equal(by_path.predict_noise(x, 50), expected)
    assert by_path.scheduler.config.beta_schedule == "linear"
    assert by_path.scheduler.config.num_train_timesteps == 1000
    # the fingerprint follows the config; other seeds/steps are other models (nothing trained here)
    assert ShapesDDPM(**{**TINY_DDPM, "seed": 1}).cache_dir != folder
    assert ShapesDDPM().config.fingerprint() != tiny_ddpm.config.fingerprint()
    assert isinstance(backbone, Backbone)


def test_missing_model_id_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-ddpm"
    with pytest.raises(FileNotFoundError, match="no-such-ddpm") as info:
        PixelDiffusion.from_pretrained(str(missing))
    message = str(info.value)
    assert "looked for a local folder" in message and "diffusion_pytorch_model.safetensors" in message
    assert "Hugging Face cache" in message

    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-ddpm"):
        DiffPure(model_id="no-such-org/no-such-ddpm").purify(torch.rand(1, 3, 32, 32), _gen())
    with pytest.raises(FileNotFoundError, match="vae/, unet/ and scheduler/"):
        DiffPure(backbone="latent", model_id=str(missing)).purify(torch.rand(1, 3, 32, 32), _gen())
    with pytest.raises(FileNotFoundError, match="shapes-ddpm checkpoint not found"):
        ShapesDDPM(checkpoint=str(missing)).load(progress=False)


# -- DiffPure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", None), ("sde", 10)])
def test_diffpure_keeps_shape_dtype_range_and_input(backbone, clean, sampler, steps) -> None:
    pixels = clean[:3].clone()
    pixels[0, :, :4, :4] = 0.0
    pixels[1, :, :4, :4] = 1.0
    before = pixels.clone()
    out = _purifier(backbone, sampler=sampler, steps=steps).purify(pixels, _gen())
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not out.requires_grad
    assert torch.equal(pixels, before), "purify must not modify its input"
    assert not torch.equal(out, pixels)
    as_double = _purifier(backbone, sampler=sampler, steps=steps).purify(pixels.double(), _gen())
    assert as_double.dtype == torch.float64 and torch.allclose(as_double, out.double(), atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sde"])
def test_same_seed_same_purification_other_seed_differs(backbone, clean, sampler) -> None:
    defense = _purifier(backbone, sampler=sampler, steps=None if sampler == "ddim" else 20)
    a = defense.purify(clean[:2], _gen(7))
    b = defense.purify(clean[:2], _gen(7))
    c = defense.purify(clean[:2], _gen(8))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 1e-3


def test_purification_keeps_clean_images_and_removes_noise(backbone, clean) -> None:
    """t* = 0.1, DiffPure's default: a clean image survives; Gaussian noise (σ = 0.15) is removed."""
    noisy = (clean + 0.15 * torch.randn(clean.shape, generator=_gen(3))).clamp(0, 1)
    noisy_mse = (noisy - clean).pow(2).mean().item()
    for sampler in ("ddpm", "sde", "ddim"):
        defense = _purifier(backbone, sampler=sampler)
        kept = purification_quality(clean, defense.purify(clean, _gen(0)))
        assert kept["psnr"] > 20.0, (sampler, kept)  # measured 22.7 dB (ddpm, sde), 24.4 dB (ddim)
        assert kept["ssim"] > 0.35, (sampler, kept)  # measured 0.50 (ddpm, sde), 0.58 (ddim)
        purified_mse = (defense.purify(noisy, _gen(0)) - clean).pow(2).mean().item()
        # measured 0.0179 -> 0.0073 (ddpm, sde), 0.0077 (ddim)
        assert purified_mse < 0.65 * noisy_mse, (sampler, purified_mse, noisy_mse)


def test_gradients_flow_through_the_reverse_process(backbone, clean) -> None:
    pixels = clean[:2].clone().requires_grad_(True)
    out = _purifier(backbone, sampler="ddim", steps=2).purify(pixels, _gen())
    assert out.requires_grad
    out.mean().backward()
    grad = pixels.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # the gradient is not just the forward process's sqrt(alpha_bar) scaling: the UNet contributes
    identity_like = torch.full_like(grad, grad.mean().item())
    assert (grad - identity_like).abs().mean() > 1e-3 * grad.abs().mean()


def test_unet_calls_match_the_sampler_and_passes_per_sample(backbone, clean) -> None:
    calls = []
    handle = backbone.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        for params, expected in [
            ({"sampler": "sde"}, 100),  # DiffPure: dt = 1e-3 from t* = 0.1 to 1e-5
            ({"sampler": "ddpm"}, 100),  # t*·N ancestral steps
            ({"sampler": "ddim"}, 5),
            ({"sampler": "ddim", "steps": 2}, 2),
            ({"sampler": "sde", "t_star": 0.05}, 50),
            ({"sampler": "ddpm", "t_star": 0.3, "steps": 7}, 7),
        ]:
            calls.clear()
            defense = _purifier(backbone, **params)
            with torch.no_grad():
                defense.purify(clean[:1], _gen())
            assert len(calls) == expected, (params, len(calls))
            assert defense.passes_per_sample() == expected
    finally:
        handle.remove()
    assert DiffPure(sampler="sde").passes_per_sample() == 100  # known before anything is loaded


def test_declarations_and_laziness(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CODEFEND_HOME", str(tmp_path))
    defense = DiffPure(t_star=0.2, sampler="sde", backbone_params={"steps": 5})
    assert isinstance(defense, Defense)
    assert (DiffPure.stochastic, DiffPure.differentiable, DiffPure.eot_samples) == (True, True, 4)
    assert defense.passes_per_sample() == 200
    assert not (tmp_path / "models").exists(), "constructing a defense must not load or train a model"
    assert defense.rewrite(["what colour is the square?"]) == ["what colour is the square?"]


@pytest.mark.parametrize(
    "params,message",
    [
        ({"t_star": 0.0}, "t_star must be in"),
        ({"t_star": 1.5}, "t_star must be in"),
        ({"t_star": -0.1}, "t_star must be in"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"sampler": "euler"}, "sampler must be one of sde, ddpm, ddim"),
        ({"backbone": "vqgan"}, "backbone must be one of"),
        ({"backbone": "pixel"}, "needs model_id"),
        ({"backbone_params": {"stepz": 3}}, r"unknown shapes-ddpm parameter\(s\) \['stepz'\]"),
    ],
)
def test_invalid_parameters_are_clear_errors(params, message) -> None:
    with pytest.raises(ValueError, match=message):
        DiffPure(**params)


def test_registry_validation_of_the_signature() -> None:
    from harness.registry import Entry, ParamError

    entry = Entry("defense", "diffpure", DiffPure, "", "test", "test", "0")
    made = entry.create({"t_star": 0.075, "sampler": "sde", "steps": 10})
    assert (made.t_star, made.sampler, made.steps) == (0.075, "sde", 10)
    for bad, key in [({"t_star": 2}, "t_star"), ({"sampler": "heun"}, "sampler"), ({"steps": 0}, "steps"),
                     ({"tstar": 0.1}, "tstar")]:
        with pytest.raises(ParamError, match=key):
            entry.create(bad)


# -- quality metrics ----------------------------------------------------------------------------


def test_psnr_and_ssim_known_values() -> None:
    x = torch.rand(2, 3, 32, 32, generator=_gen(0)) * 0.8
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    shifted = x + 0.1  # MSE 0.01 -> 20 dB at data_range 1
    assert torch.allclose(psnr(x, shifted), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.allclose(psnr(x * 255, shifted * 255, data_range=255.0), torch.full((2,), 20.0, dtype=torch.float64))
    # constant images: SSIM reduces to its luminance term (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.3, 0.6, 0.01**2
    value = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert value.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=_gen(1))).clamp(0, 1)
    quality = purification_quality(x, noisy)
    assert set(quality) == {"psnr", "ssim"}
    assert 0 < quality["ssim"] < 0.9 and quality["psnr"] < 20


# -- the latent backbone (tiny random modules: the interface, not quality) ----------------------


def test_latent_backbone_with_tiny_modules(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for name, module in (("vae", vae), ("unet", unet), ("scheduler", scheduler)):
        module.save_pretrained(tmp_path / name)

    model = LatentDiffusion.from_pretrained(str(tmp_path))
    assert isinstance(model, Backbone)
    pixels = torch.rand(2, 3, 32, 32, generator=_gen(0))
    latents = model.to_model_space(pixels)
    assert latents.shape == (2, 4, 16, 16)
    assert model.from_model_space(latents).shape == pixels.shape

    defense = DiffPure(backbone="latent", model_id=str(tmp_path), sampler="ddim", steps=2)
    x = pixels.clone().requires_grad_(True)
    out = defense.purify(x, _gen())
    assert out.shape == pixels.shape and 0 <= out.min() and out.max() <= 1
    out.mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="linear beta schedule"):
        DiffPure.from_backbone(model, sampler="sde", steps=2).purify(pixels, _gen())

    # a victim of another input size: the model still runs at its own resolution (32 px, latents
    # 16x16), differentiably, and the purified image comes back at the victim's size, in [0,1]
    small = torch.rand(2, 3, 24, 24, generator=_gen(1))
    assert model.resolution == 32 and model.to_model_space(small).shape == (2, 4, 16, 16)
    assert model.from_model_space(model.to_model_space(small), size=(24, 24)).shape == small.shape
    x = small.clone().requires_grad_(True)
    out = defense.purify(x, _gen())
    assert out.shape == small.shape and 0 <= out.min() and out.max() <= 1
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    bigger = LatentDiffusion.from_pretrained(str(tmp_path), resolution=64)
    assert bigger.to_model_space(small).shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="resolution must be an integer"):
        LatentDiffusion.from_pretrained(str(tmp_path), resolution=0.5)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_runs_the_networks_under_autocast_and_keeps_the_contract(precision: str) -> None:
    """The UNet and the VAE are evaluated in ``precision`` (their outputs move, a little), the
    image comes back fp32 in [0,1], and gradients still flow to the pixels."""
    from defenses.diffusion import build_tiny_latent_backbone

    model = build_tiny_latent_backbone()
    seen: list[torch.dtype] = []
    model.unet.register_forward_hook(lambda _m, _i, out: seen.append(out.sample.dtype))
    pixels = torch.rand(2, 3, 32, 32, generator=_gen(0))
    full = DiffPure.from_backbone(model, sampler="ddim", steps=2).purify(pixels, _gen(3))
    assert seen == [torch.float32] * 2
    seen.clear()
    low = DiffPure.from_backbone(model, sampler="ddim", steps=2, precision=precision)
    x = pixels.clone().requires_grad_(True)
    out = low.purify(x, _gen(3))
    assert seen == [getattr(torch, precision)] * 2
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    difference = (out - full).abs().max().item()
    assert 0 < difference < 0.1  # rounded network evaluations, the same purification
    out.mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert low.surrogate_process(1).precision == precision
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, float16"):
        DiffPure(precision="fp8")
