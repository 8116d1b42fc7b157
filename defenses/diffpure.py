"""``diffpure``: diffusion purification (Nie et al., "Diffusion Models for Adversarial
Purification", ICML 2022; code: NVlabs/DiffPure).

The input is diffused to a noise level t* in closed form, which drowns a small adversarial
perturbation in Gaussian noise, and the diffusion model's reverse process maps it back to a clean
image. Everything is written in torch, so gradients flow through every reverse step (exact-gradient
adaptive attacks, Lee & Kim ICCV 2023, Chen et al. ICML 2024), and every random draw comes from the
``torch.Generator`` that ``purify`` is given (the same seed gives the same purification).

"""

from __future__ import annotations

import functools

import math
from typing import Annotated, Any, Callable, Literal

import torch
import torch.utils.checkpoint
from pydantic import Field

from harness.contracts import Defense, Preparation

from defenses.diffusion import BACKBONES, Backbone, backbone_preparations, check_backbone_params, load_backbone

Sampler = Literal["sde", "ddpm", "ddim"]
SAMPLERS = ("sde", "ddpm", "ddim")
Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SDE_DT = 1e-3
"""DiffPure's Euler–Maruyama step in SDE time t ∈ [0,1]."""
SDE_T_END = 1e-5
"""DiffPure integrates the reverse SDE down to t = 1e-5, not to 0 (where the score blows up)."""
DDIM_DEFAULT_STEPS = 5
CHECKPOINT_ABOVE = 2
"""Samplers with more network evaluations than this checkpoint each step by default: a 2-step
purifier's activations fit anyway, and recomputing them costs ~30% of an attack step."""


class DiffPure(Defense):
    r"""Diffuse to t*, then run the reverse process back to t = 0 with ``sampler``.

    Notation: N = ``num_train_timesteps`` (1000), ᾱ_k = ∏_{j≤k}(1 − β_j) the scheduler's
    ``alphas_cumprod``, K = round(t*·N) the number of discrete steps t* covers. In model space
    (pixels: x = 2p − 1):

    **Forward** (closed form, as DiffPure): x_{t*} = √ᾱ_{K−1}·x_0 + √(1 − ᾱ_{K−1})·ε, ε ~ N(0, I).

    **sampler="sde"** — DiffPure's own reverse VP-SDE (Song et al. 2021), as in
    ``NVlabs/DiffPure`` ``runners/diffpure_sde.py`` (``RevVPSDE``): with β(t) = β_0 + t(β_1 − β_0),
    β_0 = N·β_start = 0.1, β_1 = N·β_end = 20 (the continuous limit of the linear DDPM betas) and
    ᾱ(t) = exp(−½(β_1 − β_0)t² − β_0 t), the forward SDE is dx = −½β(t)x dt + √β(t) dw and its
    reverse

        dx = [−½β(t)x − β(t)·∇ₓlog p_t(x)] dt + √β(t) dw̄,   ∇ₓlog p_t(x) ≈ −ε̂(x, t)/√(1 − ᾱ(t)),

    integrated from t* down to 1e-5 by Euler–Maruyama with step h = 1e-3 (the last step shorter):

        x ← x + [½β(t)x − β(t)ε̂(x,t)/√(1 − ᾱ(t))]·h + √(β(t)h)·z,   z ~ N(0, I),

    so t* = 0.1 costs 100 UNet calls. The UNet is evaluated at the discrete index
    k(t) = round(t·N) − 1, whose ᾱ_k matches ᾱ(t) (DiffPure's code passes ⌊t·N⌋, one index later; the
    difference is far below the model's resolution). Needs a linear β schedule. ``steps`` replaces
    h by a uniform grid of ``steps`` steps (a cheaper surrogate, as Lee & Kim use for memory).

    **sampler="ddpm"** — ancestral DDPM steps k = K−1, …, 0 (K UNet calls), exactly DiffPure's
    guided-diffusion variant (``image_editing_denoising_step_flexible_mask``): with the
    "fixed-large" variance σ²_k = β_k,

        x_{k−1} = (x_k − β_k/√(1 − ᾱ_k)·ε̂(x_k, k))/√(1 − β_k) + σ_k z   (no noise on the last step).

    ``steps`` = S < K strides the chain over k_i = round(K(S−i)/S) − 1 with the same formula for
    the jump k → k' (β_{k|k'} = 1 − ᾱ_k/ᾱ_{k'}).

    **sampler="ddim"** — deterministic DDIM (η = 0, Song et al. 2021) over the same stride with
    S = ``steps`` (default 5): x̂_0 = (x_k − √(1 − ᾱ_k)ε̂)/√ᾱ_k, x_{k'} = √ᾱ_{k'}x̂_0 + √(1 − ᾱ_{k'})ε̂,
    ending with ᾱ = 1. Only the forward noise is random.

    The purified image is ``from_model_space(x_0)`` clamped to [0,1]. Intermediate predictions are
    not clipped (DiffPure does not clip either), which keeps gradients informative.

    The backbone is loaded (and ``shapes-ddpm`` trained, if not cached) on the first ``purify``
    and runs on the input's device. ``backbone``: ``"shapes-ddpm"`` (built in; ``backbone_params``
    go to :class:`~defenses.diffusion.ShapesDDPM`: seed, steps, batch_size, channels, checkpoint,
    device), ``"pixel"`` or ``"latent"`` with ``model_id`` (a local folder or a model id already in
    the Hugging Face cache, e.g. ``google/ddpm-cifar10-32``). ``model_id`` with the default backbone
    loads a pixel model.

    **Memory** (``gradient_checkpointing``; default None: on for samplers with more than
    :data:`CHECKPOINT_ABOVE` network evaluations, where memory would grow with the chain, off for the
    short ones, where it only costs time): when gradients are tracked (an input
    that requires grad, grad mode on), every reverse step, and the backbone's map to and from model
    space (a latent backbone's VAE encode and decode), runs under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the forward pass keeps only each
    step's input, and the backward pass recomputes one step's activations at a time. That is what
    lets exact-gradient adaptive attacks (MEFA / Chen et al. ICML 2024; Lee & Kim ICCV 2023) through
    the full 100-step DDPM, the VP-SDE or SD img2img fit in memory, for about one extra forward pass
    of compute. Each step's noise is drawn from the generator before its checkpointed function and
    added outside it, so the random draws, and so the purification and its gradient, are the same
    with and without checkpointing (and on recomputation). ``gradient_checkpointing=False`` keeps
    every step's activations (faster, memory linear in the number of steps). Without gradients
    (oblivious evaluation) nothing is checkpointed either way.

    **Precision** (``precision``; default ``float32``): ``bfloat16`` or ``float16`` runs the
    backbone's networks (UNet, and a latent backbone's VAE) under ``torch.autocast`` on the input's
    device, for a GPU's tensor cores: about half the memory and time of fp32 on SD-sized UNets.
    The sampler's own arithmetic (noise, ᾱ, the updates) stays in fp32, so only the network
    evaluations are rounded, and gradients flow as in fp32. It is a parameter, so rows computed at
    another precision are never reused for this one.
    """

    stochastic = True  # the forward noise (and the sde/ddpm reverse noise) is drawn per call
    differentiable = True  # exact gradients through every reverse step
    bpda = None
    eot_samples = 4

    def __init__(
        self,
        *,
        t_star: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1,
        sampler: Sampler = "ddpm",
        steps: Annotated[int, Field(ge=1)] | None = None,
        backbone: Literal["shapes-ddpm", "pixel", "latent"] = "shapes-ddpm",
        backbone_params: dict[str, Any] | None = None,
        model_id: str | None = None,
        gradient_checkpointing: bool | None = None,
        precision: Precision = "float32",
    ):
        if isinstance(t_star, bool) or not isinstance(t_star, (int, float)) or not 0.0 < float(t_star) <= 1.0:
            raise ValueError(f"t_star must be in (0, 1] (the diffusion time to purify at), got {t_star!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1 (or omitted for the sampler's default), got {steps!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if gradient_checkpointing is not None and not isinstance(gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true, false or omitted (auto), got {gradient_checkpointing!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.t_star = float(t_star)
        self.sampler = sampler
        self.steps = steps
        self.backbone = backbone
        self.backbone_params = dict(backbone_params or {})
        self.model_id = model_id
        self.gradient_checkpointing = gradient_checkpointing
        check_backbone_params(backbone, self.backbone_params, model_id)
        self._model: Backbone | None = None
        self._shares: DiffPure | None = None  # a surrogate_process loads its parent's backbone

    @classmethod
    def from_backbone(cls, model: Backbone, **params: Any) -> "DiffPure":
        """A DiffPure over an already-built backbone (programmatic use, tests)."""
        defense = cls(**params)
        defense._model = model
        return defense

    def surrogate_process(self, steps: int) -> "DiffPure":
        """A cheaper *surrogate* of this defense for attacks: the same backbone object (shared,
        never reloaded), t*, sampler family and checkpointing, with ``steps`` reverse steps (Lee &
        Kim ICCV 2023: attack through fewer denoising steps at the same noise level when the full
        chain is too costly). Returns ``self`` when this defense already costs <= ``steps`` UNet
        calls. Gradients through it are not the defense's exact gradients: the board must label an
        attack run through a surrogate process as such (surrogate process, its steps), not as an
        exact-gradient attack on the defense."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if self.passes_per_sample() <= steps:
            return self
        surrogate = DiffPure(
            t_star=self.t_star, sampler=self.sampler, steps=steps, backbone=self.backbone,
            backbone_params=self.backbone_params, model_id=self.model_id,
            gradient_checkpointing=self.gradient_checkpointing, precision=self.precision,
        )
        surrogate._model = self._model
        surrogate._shares = self
        return surrogate

    def preparations(self) -> list[Preparation]:
        return backbone_preparations(self.backbone, self.backbone_params, self.model_id)

    # -- the model ------------------------------------------------------------------------------
    def load(self, *, progress: bool = True) -> Backbone:
        if self._model is None:
            if self._shares is not None:
                self._model = self._shares.load(progress=progress)
            else:
                self._model = load_backbone(self.backbone, self.backbone_params, self.model_id, progress=progress)
        return self._model

    def _backbone_on(self, device: torch.device) -> Backbone:
        model = self.load()
        if model.device != device:
            model.to(device)
        return model

    def _num_train_timesteps(self) -> int:
        if self._model is not None:
            return int(self._model.scheduler.config.num_train_timesteps)
        return 1000

    # -- schedules ------------------------------------------------------------------------------
    def start_index(self, n: int | None = None) -> int:
        """K = round(t*·N) (at least 1): the forward process uses ᾱ_{K−1}."""
        n = n or self._num_train_timesteps()
        return max(1, min(n, round(self.t_star * n)))

    def discrete_schedule(self, n: int | None = None) -> list[int]:
        """The timesteps the ddpm/ddim samplers evaluate, first to last."""
        k = self.start_index(n)
        s = self.steps if self.steps is not None else (k if self.sampler == "ddpm" else DDIM_DEFAULT_STEPS)
        s = min(s, k)
        return sorted({round(k * (s - i) / s) - 1 for i in range(s)}, reverse=True)

    def sde_times(self) -> list[float]:
        """SDE times t_0 = t* > t_1 > … > t_M = 1e-5 (M Euler–Maruyama steps)."""
        end = min(SDE_T_END, self.t_star / 2)
        if self.steps is not None:
            return torch.linspace(self.t_star, end, self.steps + 1, dtype=torch.float64).tolist()
        n = max(1, math.ceil((self.t_star - end) / SDE_DT - 1e-6))
        return [self.t_star - i * SDE_DT for i in range(n)] + [end]

    def passes_per_sample(self) -> int:
        """UNet evaluations per image: one per reverse step (a latent backbone's VAE encode and
        decode come on top and are not counted)."""
        if self.sampler == "sde":
            return len(self.sde_times()) - 1
        return len(self.discrete_schedule())

    # -- purification ---------------------------------------------------------------------------
    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"diffpure expects pixels of shape [B,3,H,W], got {tuple(pixels.shape)}")
        model = self._backbone_on(pixels.device)
        track = torch.is_grad_enabled() and pixels.requires_grad
        checkpointing = self.gradient_checkpointing
        if checkpointing is None:
            checkpointing = self.passes_per_sample() > CHECKPOINT_ABOVE
        ckpt = track and checkpointing
        low_precision = torch.autocast(pixels.device.type, dtype=PRECISIONS[self.precision],
                                       enabled=self.precision != "float32")
        with torch.set_grad_enabled(track), low_precision:
            x0 = _step(ckpt, model.to_model_space, pixels.float()).float()  # a VAE's latents come back in its autocast dtype
            alphas_cumprod = model.scheduler.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
            k = self.start_index(len(alphas_cumprod))
            a = alphas_cumprod[k - 1]
            x = a.sqrt() * x0 + (1 - a).sqrt() * _randn(x0, generator)
            if self.sampler == "sde":
                x = self._reverse_sde(model, x, generator, ckpt=ckpt)
            elif self.sampler == "ddpm":
                x = self._reverse_ddpm(model, x, alphas_cumprod, generator, ckpt=ckpt)
            else:
                x = self._reverse_ddim(model, x, alphas_cumprod, ckpt=ckpt)
            # back at the victim's input size (a latent model runs at its own resolution)
            out = _step(ckpt, functools.partial(model.from_model_space, size=pixels.shape[-2:]), x)
        return out.float().clamp(0.0, 1.0).to(pixels.dtype)

    def _pairs(self, alphas_cumprod: torch.Tensor):
        """(k, ᾱ_k, ᾱ_{k'}) for each jump k → k' of the discrete schedule (ᾱ = 1 past the end)."""
        ks = self.discrete_schedule(len(alphas_cumprod))
        one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
        for i, k in enumerate(ks):
            nxt = ks[i + 1] if i + 1 < len(ks) else -1
            yield k, alphas_cumprod[k], (alphas_cumprod[nxt] if nxt >= 0 else one), nxt >= 0

    def _reverse_ddpm(self, model: Backbone, x: torch.Tensor, alphas_cumprod: torch.Tensor,
                      generator: torch.Generator, *, ckpt: bool = False) -> torch.Tensor:
        for k, a_k, a_prev, noisy in self._pairs(alphas_cumprod):
            alpha = a_k / a_prev
            beta = 1 - alpha
            # drawn before the (checkpointed) step and added after it: the step itself is
            # deterministic, so recomputing it on the backward pass draws nothing
            noise = _randn(x, generator) if noisy else None

            def step(x: torch.Tensor, k: int = k, a_k: torch.Tensor = a_k, alpha: torch.Tensor = alpha,
                     beta: torch.Tensor = beta) -> torch.Tensor:
                eps = model.predict_noise(x, k)
                return (x - beta / (1 - a_k).sqrt() * eps) / alpha.sqrt()

            x = _step(ckpt, step, x)
            if noise is not None:
                x = x + beta.sqrt() * noise
        return x

    def _reverse_ddim(self, model: Backbone, x: torch.Tensor, alphas_cumprod: torch.Tensor, *,
                      ckpt: bool = False) -> torch.Tensor:
        for k, a_k, a_prev, _ in self._pairs(alphas_cumprod):
            def step(x: torch.Tensor, k: int = k, a_k: torch.Tensor = a_k, a_prev: torch.Tensor = a_prev) -> torch.Tensor:
                eps = model.predict_noise(x, k)
                x0_hat = (x - (1 - a_k).sqrt() * eps) / a_k.sqrt()
                return a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps

            x = _step(ckpt, step, x)
        return x

    def _reverse_sde(self, model: Backbone, x: torch.Tensor, generator: torch.Generator, *,
                     ckpt: bool = False) -> torch.Tensor:
        config = model.scheduler.config
        if config.get("beta_schedule", "linear") != "linear" or config.get("trained_betas") is not None:
            raise ValueError(
                "sampler 'sde' needs a linear beta schedule (DiffPure's VP-SDE); this model's is "
                f"{config.get('beta_schedule')!r}: use sampler 'ddpm' or 'ddim'"
            )
        n = int(config.num_train_timesteps)
        beta_0, beta_1 = n * float(config.beta_start), n * float(config.beta_end)
        times = self.sde_times()
        for t, t_next in zip(times[:-1], times[1:]):
            h = t - t_next
            beta_t = beta_0 + t * (beta_1 - beta_0)
            alpha_bar_t = math.exp(-0.5 * (beta_1 - beta_0) * t * t - beta_0 * t)
            k = min(n - 1, max(0, round(t * n) - 1))
            noise = _randn(x, generator)  # drawn before the checkpointed step, added after it

            def step(x: torch.Tensor, k: int = k, h: float = h, beta_t: float = beta_t,
                     alpha_bar_t: float = alpha_bar_t) -> torch.Tensor:
                eps = model.predict_noise(x, k)
                score = -eps / math.sqrt(1.0 - alpha_bar_t)
                return x + (0.5 * beta_t * x + beta_t * score) * h

            x = _step(ckpt, step, x) + math.sqrt(beta_t * h) * noise
        return x


def _step(checkpoint: bool, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, under ``torch.utils.checkpoint`` when ``checkpoint`` (purify tracks gradients
    with ``gradient_checkpointing`` on): only ``args`` are kept, and ``fn`` runs again on the backward
    pass, so it must draw nothing random (the callers draw noise before it and add it after)."""
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn from ``generator`` on its own device."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)
