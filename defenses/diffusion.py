"""Diffusion backbones for purification defenses (DiffPure now, CoDefend's purifier later).

A *backbone* is what a purifier needs from a diffusion model, whatever space it diffuses in:

- ``to_model_space(pixels01)`` / ``from_model_space(x, size)``: the map between [0,1] pixels and
  the space the model diffuses (pixels: ``x = 2p - 1``; latents: VAE encode / decode, at the
  model's own resolution), ``from_model_space`` returning pixels of ``size`` (the victim's input
  size: the ε ball lives there, whatever resolution the model runs at);
- ``predict_noise(x_t, t)``: the model's epsilon prediction at integer timesteps ``t`` (whatever
  the checkpoint's ``prediction_type``);
- ``unet`` and ``scheduler``: the diffusers modules (the scheduler's ``alphas_cumprod`` and
  ``betas`` define the forward process).

Backbones here:

- :class:`PixelDiffusion`: a diffusers ``UNet2DModel`` + ``DDPMScheduler`` on pixels in [-1,1]:
  the built-in ``shapes-ddpm`` (:class:`ShapesDDPM`, trained on demand and cached) or any local /
  cached checkpoint in diffusers' layout (``google/ddpm-cifar10-32``) via
  :meth:`PixelDiffusion.from_pretrained`.
- :class:`LatentDiffusion`: ``AutoencoderKL`` + ``UNet2DConditionModel`` (Stable Diffusion
  img2img style, the prompt fixed to the empty one). Scoped: loading and the backbone interface
  only; nothing here trains one.

Nothing is downloaded: ``from_pretrained`` reads local folders and the Hugging Face cache only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from harness.contracts import Preparation
from harness.paths import codefend_home, publish_checkpoint
from harness import reproducible
from harness.code_version import builtin_code_version, files_code_version
from harness.reproducible import deterministic_training, training_environment

MODEL_FORMAT_VERSION = 1

#: Training steps of the default shapes-ddpm: ~0.17 s/step (batch 16, one torch thread, a 2-core
#: machine shared with another job), so ~3.5 min to train on demand. See ShapesDDPMConfig.
DEFAULT_STEPS = 1200

BACKBONES = ("shapes-ddpm", "pixel", "latent")


# -- the backbone interface --------------------------------------------------------------------


@runtime_checkable
class Backbone(Protocol):
    """What a diffusion purifier needs from a model (see the module docstring)."""

    unet: torch.nn.Module
    scheduler: Any

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def from_model_space(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor: ...

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> "Backbone": ...

    @property
    def device(self) -> torch.device: ...


def resize_pixels(pixels: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """[B,3,H,W] pixels to ``size`` (H, W) inside the autograd graph: bicubic, antialiased when
    shrinking, clamped to [0,1] (bicubic overshoots); unchanged when already that size or None."""
    if size is None or tuple(pixels.shape[-2:]) == tuple(int(v) for v in size):
        return pixels
    shrinking = size[0] < pixels.shape[-2] or size[1] < pixels.shape[-1]
    resized = F.interpolate(pixels, size=tuple(int(v) for v in size), mode="bicubic", align_corners=False,
                            antialias=shrinking)
    return resized.clamp(0.0, 1.0)


def _low_cpu_mem_usage() -> bool:
    """diffusers' low-memory loading needs ``accelerate`` (and prints advice when it is missing)."""
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


_LOW_MEM = _low_cpu_mem_usage()


@contextlib.contextmanager
def _quiet_hub():
    """Silence huggingface_hub's deprecation chatter that diffusers triggers on every lookup."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _as_epsilon(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Convert a model output to an epsilon prediction, per the scheduler's ``prediction_type``."""
    if output.shape[1] == 2 * x.shape[1]:  # learned variance (guided-diffusion style): keep epsilon
        output = output[:, : x.shape[1]]
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return output
    ac = scheduler.alphas_cumprod.to(device=x.device, dtype=x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))
    if kind == "v_prediction":
        return ac.sqrt() * output + (1 - ac).sqrt() * x
    if kind == "sample":
        return (x - ac.sqrt() * output) / (1 - ac).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r} (expected epsilon, v_prediction or sample)")


def _timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device, dtype=torch.long)
    return t.expand(batch) if t.dim() == 0 else t


def _not_found(what: str, model_id: str, layout: str, cause: BaseException | None) -> FileNotFoundError:
    path = Path(model_id).expanduser()
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause else ""
    return FileNotFoundError(
        f"{what} {model_id!r} not found: looked for a local folder {path.resolve()} holding {layout}, "
        f"and for a Hugging Face model id {model_id!r} in the local Hugging Face cache (nothing is "
        f"downloaded at run time). Download it once with `huggingface-cli download {model_id}` or point "
        f"model_id at a folder in that layout{why}."
    )


class PixelDiffusion:
    """A pixel-space diffusion model: ``UNet2DModel`` + ``DDPMScheduler`` on ``2p - 1``."""

    kind = "pixel"

    def __init__(self, unet: torch.nn.Module, scheduler: Any, *, name: str = "pixel"):
        self.unet = _frozen(unet)
        self.scheduler = scheduler
        self.name = name

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, *, device: str | None = None, local_files_only: bool = True
    ) -> "PixelDiffusion":
        """Load a diffusers pixel model: a folder or cached model id with ``config.json``,
        ``diffusion_pytorch_model.safetensors`` and ``scheduler_config.json`` at its root (the
        ``google/ddpm-*`` layout, and shapes-ddpm's cache folders) or in ``unet/`` and
        ``scheduler/`` subfolders (``DDPMPipeline.save_pretrained``)."""
        from diffusers import DDPMScheduler, UNet2DModel

        layout = (
            "config.json + diffusion_pytorch_model.safetensors + scheduler_config.json "
            "(or unet/ and scheduler/ subfolders)"
        )
        last: BaseException | None = None
        for unet_sub, sched_sub in ((None, None), ("unet", "scheduler")):
            try:
                with _quiet_hub():
                    unet = UNet2DModel.from_pretrained(
                        model_id_or_path, subfolder=unet_sub, local_files_only=local_files_only,
                        low_cpu_mem_usage=_LOW_MEM,
                    )
                    scheduler = DDPMScheduler.from_pretrained(
                        model_id_or_path, subfolder=sched_sub, local_files_only=local_files_only
                    )
            except (OSError, ValueError) as exc:  # diffusers raises OSError/EnvironmentError when absent
                last = exc
                continue
            model = cls(unet, scheduler, name=str(model_id_or_path))
            return model.to(device) if device else model
        raise _not_found("pixel diffusion model", str(model_id_or_path), layout, last) from last

    # -- the backbone interface -------------------------------------------------------------
    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels * 2.0 - 1.0

    def from_model_space(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        return resize_pixels((x + 1.0) / 2.0, size)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = _timesteps(t, x.shape[0], x.device)
        return _as_epsilon(self.unet(x, t).sample, x, t, self.scheduler)

    def to(self, device: torch.device | str) -> "PixelDiffusion":
        self.unet.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


class LatentDiffusion:
    """A latent diffusion model (Stable Diffusion img2img style): the purifier diffuses VAE latents.

    ``to_model_space`` encodes ``2p - 1`` with the VAE (the posterior mean: deterministic and
    differentiable) and scales by ``vae.config.scaling_factor``; ``from_model_space`` decodes.
    The UNet is conditioned on one fixed text embedding (``prompt_embeds``, [1, L, D]): the empty
    prompt's when :meth:`from_pretrained` finds a text encoder, zeros otherwise.

    It runs at ``resolution`` (default: the UNet's ``sample_size`` x the VAE's downsampling, 512 for
    SD 2.1-base): victim-resolution pixels (224 or 336) are resized up, differentiably, before the
    VAE, and the decoded image back to the victim's size. At 224 px SD's latents would be 28x28,
    far from the 64x64 it was trained on.
    """

    kind = "latent"

    def __init__(
        self,
        vae: torch.nn.Module,
        unet: torch.nn.Module,
        scheduler: Any,
        *,
        prompt_embeds: torch.Tensor | None = None,
        name: str = "latent",
        resolution: int | None = None,
    ):
        self.vae = _frozen(vae)
        self.unet = _frozen(unet)
        self.scheduler = scheduler
        self.name = name
        if prompt_embeds is None:
            dim = unet.config.cross_attention_dim
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            prompt_embeds = torch.zeros(1, 1, int(dim))
        self.prompt_embeds = prompt_embeds.detach()
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        native = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8):
            raise ValueError(f"latent backbone resolution must be an integer >= 8 (pixels), got {resolution!r}")
        self.resolution = resolution or native

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, *, device: str | None = None, local_files_only: bool = True,
        resolution: int | None = None,
    ) -> "LatentDiffusion":
        """Load ``vae/``, ``unet/`` and ``scheduler/`` (and, if present, ``text_encoder/`` +
        ``tokenizer/`` for the empty prompt's embedding) from a Stable Diffusion-layout folder or
        cached model id. The scheduler is read as a ``DDPMScheduler`` (only its betas are used)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        layout = "vae/, unet/ and scheduler/ subfolders (Stable Diffusion layout)"
        kw = {"local_files_only": local_files_only}
        try:
            with _quiet_hub():
                vae = AutoencoderKL.from_pretrained(
                    model_id_or_path, subfolder="vae", low_cpu_mem_usage=_LOW_MEM, **kw
                )
                unet = UNet2DConditionModel.from_pretrained(
                    model_id_or_path, subfolder="unet", low_cpu_mem_usage=_LOW_MEM, **kw
                )
                scheduler = DDPMScheduler.from_pretrained(model_id_or_path, subfolder="scheduler", **kw)
        except (OSError, ValueError) as exc:
            raise _not_found("latent diffusion model", str(model_id_or_path), layout, exc) from exc
        embeds = None
        try:
            from transformers import AutoTokenizer, CLIPTextModel

            with _quiet_hub():
                tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, subfolder="tokenizer", **kw)
                text_encoder = CLIPTextModel.from_pretrained(model_id_or_path, subfolder="text_encoder", **kw)
            ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
            with torch.no_grad():
                embeds = text_encoder(ids.input_ids)[0]
        except (OSError, ValueError):
            embeds = None  # no text encoder shipped: condition on zeros
        model = cls(vae, unet, scheduler, prompt_embeds=embeds, name=str(model_id_or_path), resolution=resolution)
        return model.to(device) if device else model

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        native = resize_pixels(pixels, (self.resolution, self.resolution))
        latents = self.vae.encode(native * 2.0 - 1.0).latent_dist.mean
        return (latents - self.shift_factor) * self.scaling_factor

    def from_model_space(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        decoded = self.vae.decode(x / self.scaling_factor + self.shift_factor).sample
        return resize_pixels((decoded + 1.0) / 2.0, size)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = _timesteps(t, x.shape[0], x.device)
        cond = self.prompt_embeds.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        return _as_epsilon(self.unet(x, t, encoder_hidden_states=cond).sample, x, t, self.scheduler)

    def to(self, device: torch.device | str) -> "LatentDiffusion":
        self.vae.to(device)
        self.unet.to(device)
        self.prompt_embeds = self.prompt_embeds.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


# -- shapes-ddpm: the built-in pixel backbone -------------------------------------------------


@dataclass(frozen=True)
class ShapesDDPMConfig:
    """Everything that determines the trained weights (and so the cache key)."""

    seed: int = 0
    image_size: int = 32
    # Chosen by measurement (CPU, one thread): (16, 32, 64) at batch 16 reaches a lower held-out
    # denoising loss in 4 minutes than (32, 64, 64) (3x slower per step) or batch 32; lr 4e-3 beat
    # 1e-3 and 2e-3 (eps-MSE at t=99: 0.062 vs 0.090 and 0.071 after 960 steps).
    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    mid_attention: bool = True
    """One self-attention block, in the UNet's middle (8 x 8 at 32 x 32 inputs)."""
    norm_groups: int = 8
    # DDPM (Ho et al. 2020) and DiffPure's beta schedule: linear from 1e-4 to 0.02 over 1000 steps.
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = DEFAULT_STEPS
    batch_size: int = 16
    lr: float = 4e-3
    low_t_fraction: float = 0.5
    """Share of each batch whose timesteps are drawn from ``[0, low_t_max)`` rather than uniformly
    from all ``num_train_timesteps``: purification only ever runs the model at small t (t* ~ 0.1),
    so a short CPU training spends half its samples there. Every t is still trained (the
    model remains a full DDPM that can sample from noise); only the loss weighting over t differs."""
    low_t_max: int = 250

    def fingerprint(self) -> str:
        from tasks.coco_captions import CocoCaptionsTask  # the shapes world's images (its training data)

        # the modules that define and train the backbone, and the code that makes its data: a
        # checkpoint never outlives them
        code = {"training": files_code_version([__file__, reproducible.__file__]),
                "data": builtin_code_version(CocoCaptionsTask)}
        blob = json.dumps({"format": MODEL_FORMAT_VERSION, "code": code, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_unet(config: ShapesDDPMConfig) -> torch.nn.Module:
    """The UNet of ``config``, randomly initialised from the current torch seed."""
    from diffusers import UNet2DModel

    bad = [c for c in config.channels if c % config.norm_groups]
    if bad:
        raise ValueError(f"channels {config.channels} must be multiples of norm_groups={config.norm_groups}")
    n = len(config.channels)
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        add_attention=config.mid_attention,
        attention_head_dim=min(32, config.channels[-1]),
        norm_num_groups=config.norm_groups,
    )


def build_scheduler(config: ShapesDDPMConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def shapes_training_images(seed: int = 0) -> torch.Tensor:
    """The shapes world's train split, each image once, as uint8 [N,3,H,W]."""
    from tasks.coco_captions import CocoCaptionsTask

    samples = CocoCaptionsTask(data="shapes").samples("train", None, seed)
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()


def shapes_heldout_images(n: int | None = None, split: str = "val") -> torch.Tensor:
    """Held-out shapes images (``val`` by default) as float [N,3,H,W] in [0,1]."""
    from tasks.coco_captions import CocoCaptionsTask

    samples = CocoCaptionsTask(data="shapes").samples(split, n, 0)
    return torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0


def _sample_timesteps(config: ShapesDDPMConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.randint(0, config.num_train_timesteps, (n,), generator=generator)
    low = torch.randint(0, min(config.low_t_max, config.num_train_timesteps), (n,), generator=generator)
    pick_low = torch.rand(n, generator=generator) < config.low_t_fraction
    return torch.where(pick_low, low, uniform)


@deterministic_training
def train_shapes_ddpm(
    config: ShapesDDPMConfig, out_dir: Path, *, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Train shapes-ddpm from ``config`` (deterministic for its seed) and save it to ``out_dir``.

    Standard DDPM training (Ho et al. 2020): x0 in [-1,1] (random horizontal flips), t drawn per
    sample (see ``low_t_fraction``), x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, loss ||ε̂(x_t,t) - ε||².
    AdamW, linear warm-up then cosine decay, gradient clipping at 1. The per-step losses are kept
    in ``training.json``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    data = shapes_training_images(config.seed).float() / 255.0
    if tuple(data.shape[-2:]) != (config.image_size, config.image_size):
        data = F.interpolate(data, size=(config.image_size,) * 2, mode="bilinear", antialias=True).clamp(0, 1)
    data = (data * 2.0 - 1.0).to(device)

    torch.manual_seed(config.seed)
    unet = build_unet(config).to(device)
    unet.train()
    scheduler = build_scheduler(config)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)),
    )
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc="train shapes-ddpm", unit="step", disable=not progress, mininterval=1.0)
    losses: list[float] = []
    running = None
    for step in bar:
        index = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator)
        flip = (torch.rand(config.batch_size, generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
        x0 = data[index.to(device)]
        x0 = torch.where(flip, x0.flip(-1), x0)
        t = _sample_timesteps(config, config.batch_size, generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(round(loss.item(), 6))
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")

    unet.eval().cpu()
    record = {
        "config": asdict(config),
        "images": int(data.shape[0]),
        "final_loss": running,
        "losses": losses,
        "seconds": round(time.perf_counter() - started, 1),
        **training_environment(),
        "device": device,
    }
    with publish_checkpoint(out_dir) as scratch:
        unet.save_pretrained(scratch, safe_serialization=True)
        scheduler.save_pretrained(scratch)
        (scratch / "training.json").write_text(json.dumps(record))
    return record


class ShapesDDPM:
    """The built-in pixel backbone ``shapes-ddpm``: a small DDPM of the shapes world, trained on
    demand and cached under ``$CODEFEND_HOME/models/shapes-ddpm-<fingerprint>`` (diffusers layout:
    the UNet's ``config.json`` + ``diffusion_pytorch_model.safetensors`` and the scheduler's
    ``scheduler_config.json``, so the folder also loads with :meth:`PixelDiffusion.from_pretrained`)."""

    name = "shapes-ddpm"

    def __init__(
        self,
        *,
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        batch_size: int = ShapesDDPMConfig.batch_size,
        lr: float = ShapesDDPMConfig.lr,
        channels: tuple[int, ...] = ShapesDDPMConfig.channels,
        low_t_fraction: float = ShapesDDPMConfig.low_t_fraction,
        low_t_max: int = ShapesDDPMConfig.low_t_max,
        checkpoint: str | None = None,
        device: str | None = None,
    ):
        if steps < 1 or batch_size < 1:
            raise ValueError("shapes-ddpm steps and batch_size must be at least 1")
        if not 0.0 <= low_t_fraction <= 1.0 or low_t_max < 1:
            raise ValueError("shapes-ddpm low_t_fraction must be in [0, 1] and low_t_max at least 1")
        self.config = ShapesDDPMConfig(
            seed=seed, steps=steps, batch_size=batch_size, lr=lr, channels=tuple(channels),
            low_t_fraction=low_t_fraction, low_t_max=low_t_max,
        )
        self._device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.checkpoint = Path(checkpoint).expanduser() if checkpoint else None
        self._backbone: PixelDiffusion | None = None
        self._fingerprint: str | None = None

    @property
    def cache_dir(self) -> Path:
        if self.checkpoint is not None:
            return self.checkpoint
        return codefend_home() / "models" / f"shapes-ddpm-{self.config.fingerprint()}"

    def is_trained(self) -> bool:
        d = self.cache_dir
        return all((d / f).exists() for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"))

    def load(self, *, progress: bool = True) -> PixelDiffusion:
        """The trained backbone (training it first if the cache lacks it)."""
        if self._backbone is None:
            if not self.is_trained():
                if self.checkpoint is not None:
                    raise FileNotFoundError(
                        f"shapes-ddpm checkpoint not found: looked for config.json, "
                        f"diffusion_pytorch_model.safetensors and scheduler_config.json in {self.checkpoint}. "
                        "Remove 'checkpoint' to train one."
                    )
                with torch.enable_grad():  # first use may come from inside no_grad purification
                    train_shapes_ddpm(self.config, self.cache_dir, progress=progress, device=self._device_name)
            backbone = PixelDiffusion.from_pretrained(str(self.cache_dir), local_files_only=True)
            backbone.name = f"shapes-ddpm-{self.config.fingerprint()}"
            self._backbone = backbone.to(self._device_name)
        return self._backbone

    @property
    def backbone(self) -> PixelDiffusion:
        return self.load()

    def training_record(self) -> dict[str, Any]:
        """``training.json`` of the cached checkpoint (config, per-step losses, seconds)."""
        return json.loads((self.cache_dir / "training.json").read_text())

    @property
    def fingerprint(self) -> str:
        """Hash of the weights file: results key on the exact model, not on its name."""
        if self._fingerprint is None:
            self.load()
            digest = hashlib.sha256((self.cache_dir / "diffusion_pytorch_model.safetensors").read_bytes())
            self._fingerprint = f"shapes-ddpm:{digest.hexdigest()[:16]}"
        return self._fingerprint


def _check_params(factory: Any, params: dict[str, Any], what: str) -> None:
    allowed = [k for k in inspect.signature(factory).parameters if k not in ("self", "cls", "model_id_or_path")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown} (allowed: {', '.join(allowed)})")


def check_backbone_params(backbone: str, params: dict[str, Any], model_id: str | None) -> None:
    """Validate a backbone choice without loading anything (for defenses' constructors)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown diffusion backbone {backbone!r} (choose one of: {', '.join(BACKBONES)})")
    if backbone in ("pixel", "latent") and not model_id:
        raise ValueError(f"backbone {backbone!r} needs model_id (a local folder or a cached Hugging Face model id)")
    if model_id:
        factory = LatentDiffusion.from_pretrained if backbone == "latent" else PixelDiffusion.from_pretrained
        _check_params(factory, params, f"{backbone} backbone")
    else:
        _check_params(ShapesDDPM.__init__, params, "shapes-ddpm")


def _prepare_shapes_ddpm(params: dict[str, Any], *, plugins: Any) -> None:
    ShapesDDPM(**params).load(progress=False)


def backbone_preparations(backbone: str, params: dict[str, Any], model_id: str | None) -> list[Preparation]:
    """What a backbone choice needs trained: ``shapes-ddpm`` from scratch; a pretrained model
    (``model_id``) nothing."""
    if model_id or backbone != "shapes-ddpm" or params.get("checkpoint"):
        return []
    ddpm = ShapesDDPM(**params)
    config = ddpm.config
    return [Preparation(
        key=f"shapes-ddpm-{config.fingerprint()}", label="train shapes-ddpm",
        run=functools.partial(_prepare_shapes_ddpm, dict(params)),
        # a UNet step costs ~4 victim passes per image (measured: 0.17 s vs 0.2 s for 32 victim images)
        cost=2.0 * config.steps * config.batch_size * 4, done=ddpm.is_trained,
    )]


def load_backbone(
    backbone: str = "shapes-ddpm", params: dict[str, Any] | None = None, model_id: str | None = None,
    *, progress: bool = True,
) -> Backbone:
    """Build a backbone by name. ``model_id`` (a local folder or cached HF id) loads a pretrained
    model: a latent one for ``backbone="latent"``, a pixel one otherwise; without it,
    ``shapes-ddpm`` is loaded from the cache or trained with ``params``."""
    params = dict(params or {})
    check_backbone_params(backbone, params, model_id)
    if model_id:
        cls = LatentDiffusion if backbone == "latent" else PixelDiffusion
        return cls.from_pretrained(model_id, **params)
    return ShapesDDPM(**params).load(progress=progress)


def denoising_mse(backbone: Backbone, pixels: torch.Tensor, t: int, generator: torch.Generator) -> float:
    """Mean ||ε̂(x_t, t) - ε||² over ``pixels`` ([0,1]) at integer timestep ``t`` (the training loss)."""
    with torch.no_grad():
        x0 = backbone.to_model_space(pixels)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        ac = backbone.scheduler.alphas_cumprod[t].to(x0.device)
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        return F.mse_loss(backbone.predict_noise(x_t, t), noise).item()


def build_tiny_latent_backbone():
    """A Stable Diffusion-style latent backbone: tiny ``AutoencoderKL`` + ``UNet2DConditionModel``
    (random weights) + the DDPM scheduler, for 32x32 images: the interface, for tests and
    scripts/gpu_smoke.py, never a purifier to evaluate."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel


    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    return LatentDiffusion(vae, unet, DDPMScheduler(num_train_timesteps=1000))
