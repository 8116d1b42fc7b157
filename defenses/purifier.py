r"""``codefend-purifier``: CoDefend's supervised ("directional") diffusion purifier.

DiffPure's denoiser was trained to remove Gaussian noise from clean images; it removes an
adversarial perturbation only as a side effect of drowning it in noise. CoDefend fine-tunes the
denoiser on pairs (x_adv, x_clean) made by attacks against the victim, so that from the
*adversarial* image noised to t ≤ t*,

    x_t = √ᾱ_t·x_adv + √(1 − ᾱ_t)·ε,

its x0-prediction is the *clean* image. In ε-parameterisation the regression target is the
directional ε-target

    ε* = (x_t − √ᾱ_t·x_clean) / √(1 − ᾱ_t),

so that x̂0 = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t = x_clean when ε̂ = ε*. The loss is
‖ε̂ − ε*‖²·(1 − ᾱ_t)/ᾱ_t = ‖x̂0 − x_clean‖² (the ε-loss with SNR weighting: without it the
t → 0 terms, where ε* ≈ √ᾱ(x_adv − x_clean)/√(1 − ᾱ) explodes, would dominate). Added to it:

- clean → clean pairs (``clean_fraction`` of each batch), which keep clean images intact;
- the task-aligned term (``feature_weight``): the victim's image tokens of the purified x̂0 match
  those of the clean image (relative squared error), as in HGD (Liao et al. 2018), so the purifier
  removes what the victim reads, not just what a pixel loss sees.

Inference is deterministic DDIM from t* in ``steps`` steps (2 by default), after one random draw
of the forward noise. The fair control is the same backbone fine-tuned for the same steps on the
same clean images with the ordinary unsupervised objective ‖ε̂ − ε‖² (``objective:
unsupervised``): without it, a gain could be nothing more than extra training.

Small UNets are fine-tuned in full; large ones (``adapter: lora``) through peft's LoRA on the
attention and convolution layers. The tuned weights are cached under
``$CODEFEND_HOME/models/codefend-purifier-<fingerprint>`` (victim weights, pairs, backbone weights
and hyper-parameters), so a second run, or a second defense row over the same purifier, skips
training.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.plugins import PluginsUser
from defenses.diffpure import PRECISIONS, DiffPure, Precision
from defenses.diffusion import BACKBONES, Backbone, backbone_preparations, check_backbone_params, load_backbone
from defenses.training_pairs import (
    DEFAULT_PAIR_TASKS,
    PairSpec,
    PairTask,
    Pairs,
    make_pairs,
    check_pair_attack_names,
    parse_pair_attacks,
)
from harness.contracts import Defense, EmbeddingVictim, ImageFeatureVictim, Preparation, TrainingAttack, Victim
from harness.store import digest_json
from harness.paths import codefend_home, publish_checkpoint
from defenses import diffusion, training_pairs
from harness import reproducible
from harness.code_version import files_code_version
from harness.reproducible import deterministic_training, training_environment

PURIFIER_FORMAT_VERSION = 1
"""Bumped when the checkpoint's layout changes; a change of training code changes the key by itself
(:data:`TRAINING_CODE`)."""
TRAINING_CODE = (__file__, diffusion.__file__, training_pairs.__file__, reproducible.__file__)
"""The modules that fine-tune the purifier: their code version is part of its checkpoint key."""
Objective = Literal["directional", "unsupervised"]
Adapter = Literal["full", "lora"]
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


@dataclass(frozen=True)
class PurifierTraining:
    """Everything about fine-tuning that determines the weights (with the pairs and backbone)."""

    objective: str = "directional"
    t_max: float = 0.1
    """Training timesteps are drawn uniformly from [0, round(t_max·N)): the purifier's t*."""
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    clean_fraction: float = 0.25
    feature_weight: float = 1.0
    adapter: str = "full"
    lora_rank: int = 8
    seed: int = 0

    def fingerprint(self, *parts: Any) -> str:
        blob = json.dumps({"format": PURIFIER_FORMAT_VERSION, "code": files_code_version(TRAINING_CODE), **asdict(self),
                           "parts": parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def directional_epsilon(x_t: torch.Tensor, x0_clean: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """CoDefend's directional ε-target ε* = (x_t − √ᾱ·x_clean)/√(1 − ᾱ): the noise that, predicted
    at x_t (the *adversarial* image noised), makes the x0-prediction the *clean* image."""
    return (x_t - alpha_bar.sqrt() * x0_clean) / (1 - alpha_bar).sqrt()


def x0_prediction(x_t: torch.Tensor, epsilon: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1 − ᾱ)·ε)/√ᾱ."""
    return (x_t - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """A digest of named tensors (a ``state_dict``, or a subset of a module's parameters)."""
    h = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _image_features(victim: Victim, pixels: torch.Tensor) -> torch.Tensor:
    if isinstance(victim, ImageFeatureVictim):
        return victim.image_features(pixels)
    if isinstance(victim, EmbeddingVictim):
        return victim.embed_image(pixels)
    raise ValueError(
        f"feature_weight > 0 needs a victim with image_features() or embed_image(); {getattr(victim, 'name', victim)!r} "
        "has neither: set feature_weight: 0"
    )


def add_lora(unet: torch.nn.Module, rank: int) -> torch.nn.Module:
    """Freeze ``unet`` and add LoRA adapters (peft) to its attention and convolution layers."""
    from peft import LoraConfig

    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    targets = [t for t in LORA_TARGETS if t.split(".")[-1] in names or t in names]
    if not targets:
        raise ValueError(f"no LoRA target layers ({', '.join(LORA_TARGETS)}) in this UNet")
    for p in unet.parameters():
        p.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    return unet


@deterministic_training
def train_purifier(
    backbone: Backbone,
    pairs: Pairs,
    config: PurifierTraining,
    out_dir: Path,
    *,
    victim: Victim | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``backbone``'s UNet on ``pairs`` with ``config.objective`` and save it to ``out_dir``.

    ``victim`` is needed for the task-aligned term (directional objective, ``feature_weight`` > 0).
    Deterministic for ``config.seed`` on a given device. Per-step losses go to ``training.json``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = backbone.device
    torch.manual_seed(config.seed)
    unet = copy.deepcopy(backbone.unet)
    if config.adapter == "lora":
        add_lora(unet, config.lora_rank)
    else:
        for p in unet.parameters():
            p.requires_grad_(True)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    tuned = copy.copy(backbone)
    tuned.unet = unet  # the backbone's own to/from model space and epsilon conversion

    alphas_cumprod = backbone.scheduler.alphas_cumprod.to(device)
    n_train = len(alphas_cumprod)
    k_max = max(1, min(n_train, round(config.t_max * n_train)))
    use_features = config.objective == "directional" and config.feature_weight > 0
    if use_features and victim is None:
        raise ValueError("the task-aligned term (feature_weight > 0) needs the victim")

    clean_all = pairs.clean.to(device)
    adv_all = pairs.adversarial.to(device)
    optimiser = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)),
    )
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.steps), desc=f"train codefend-purifier ({config.objective})", unit="step",
               disable=not progress, mininterval=1.0)
    history: list[dict[str, float]] = []
    for step in bar:
        index = torch.randint(0, len(pairs), (config.batch_size,), generator=generator).to(device)
        clean = clean_all[index]
        if config.objective == "directional":
            keep_clean = (torch.rand(config.batch_size, generator=generator) < config.clean_fraction).to(device)
            source = torch.where(keep_clean.view(-1, 1, 1, 1), clean, adv_all[index])
        else:
            source = clean  # the control sees the same clean images, never the adversarial ones
        t = torch.randint(0, k_max, (config.batch_size,), generator=generator).to(device)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            x0_source = backbone.to_model_space(source)  # pixels, or VAE latents
            x0_clean = backbone.to_model_space(clean) if config.objective == "directional" else x0_source
        noise = torch.randn(x0_source.shape, generator=generator).to(device)
        x_t = ac.sqrt() * x0_source + (1 - ac).sqrt() * noise
        eps_hat = tuned.predict_noise(x_t, t)
        terms: dict[str, torch.Tensor] = {}
        if config.objective == "unsupervised":
            terms["eps"] = F.mse_loss(eps_hat, noise)
        else:
            # ‖ε̂ − ε*‖² weighted by (1 − ᾱ)/ᾱ, which equals ‖x̂0 − x_clean‖²
            target = directional_epsilon(x_t, x0_clean, ac)
            terms["directional"] = ((eps_hat - target).pow(2) * ((1 - ac) / ac)).mean()
            x0_hat = x0_prediction(x_t, eps_hat, ac)
            if use_features:
                assert victim is not None
                purified = tuned.from_model_space(x0_hat, size=clean.shape[-2:]).clamp(0, 1)
                with torch.no_grad():
                    target = _image_features(victim, clean)
                got = _image_features(victim, purified)
                terms["features"] = config.feature_weight * (got - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-8)
        loss = sum(terms.values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
        history.append({k: round(v.item(), 6) for k, v in terms.items()})
        if step % 20 == 0:
            bar.set_postfix({k: f"{v.item():.4f}" for k, v in terms.items()})

    unet.eval()
    record = {
        "config": asdict(config),
        "pairs": pairs.record,
        "backbone": getattr(backbone, "name", type(backbone).__name__),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "history": history,
        "seconds": round(time.perf_counter() - started, 1),
        **training_environment(),
        "device": str(device),
    }
    with publish_checkpoint(out_dir) as scratch:
        if config.adapter == "lora":
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
            save_file(state, str(scratch / "lora.safetensors"))
        else:
            unet.save_pretrained(scratch / "unet", safe_serialization=True)
        (scratch / "training.json").write_text(json.dumps(record))
    return record


def load_tuned_unet(backbone: Backbone, out_dir: Path, config: PurifierTraining) -> torch.nn.Module:
    """The fine-tuned UNet saved by :func:`train_purifier` in ``out_dir`` (frozen, eval mode)."""
    if config.adapter == "lora":
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        unet = add_lora(copy.deepcopy(backbone.unet), config.lora_rank)
        set_peft_model_state_dict(unet, load_file(str(out_dir / "lora.safetensors")))
    else:
        unet = type(backbone.unet).from_pretrained(out_dir / "unet")
    unet.to(backbone.device).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


class CoDefendPurifier(PluginsUser, Defense):
    """CoDefend's supervised purifier (see the module docstring); ``objective: unsupervised`` is
    the fair control (same backbone, steps and images, the ordinary DDPM loss).

    Trained on first use against the victim it is bound to (the runner binds each cell's victim),
    on pairs from ``train_attacks`` over ``train_tasks``' ``train_split``; every other attack is
    unseen. Inference: DDIM from ``t_star`` in ``steps`` steps (random forward noise, deterministic
    reverse), so it is stochastic (EOT for adaptive attacks) and differentiable (exact gradients).
    """

    stochastic = True
    differentiable = True
    bpda = None
    eot_samples = 4

    def __init__(
        self,
        *,
        t_star: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05,
        steps: Annotated[int, Field(ge=1)] = 2,
        objective: Objective = "directional",
        train_attacks: list[Any] | None = None,
        train_tasks: list[dict[str, Any]] | None = None,
        train_split: str = "train",
        train_pairs_per_task: Annotated[int, Field(ge=1)] = 600,
        train_steps: Annotated[int, Field(ge=1)] = 600,
        batch_size: Annotated[int, Field(ge=1)] = 32,
        lr: Annotated[float, Field(gt=0.0)] = 5e-4,
        clean_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25,
        feature_weight: Annotated[float, Field(ge=0.0)] = 1.0,
        adapter: Adapter = "full",
        lora_rank: Annotated[int, Field(ge=1)] = 8,
        seed: int = 0,
        backbone: Literal["shapes-ddpm", "pixel", "latent"] = "shapes-ddpm",
        backbone_params: dict[str, Any] | None = None,
        model_id: str | None = None,
        precision: Precision = "float32",
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        # what rebuilds this purifier in a worker (its preparation); precision is the
        # purification's alone (training runs in fp32), so it does not key the training
        self.params = {k: v for k, v in locals().items() if k not in ("self", "__class__", "precision")}
        self.precision = precision
        self.t_star, self.steps = float(t_star), int(steps)
        self.objective = objective
        self.train_attacks = parse_pair_attacks(train_attacks)
        self.train_tasks = tuple(PairTask(**t) for t in train_tasks) if train_tasks else DEFAULT_PAIR_TASKS
        self.train_split = train_split
        self.train_pairs_per_task = train_pairs_per_task
        self.training = PurifierTraining(
            objective=objective, t_max=self.t_star, steps=train_steps, batch_size=batch_size, lr=lr,
            clean_fraction=clean_fraction, feature_weight=feature_weight, adapter=adapter,
            lora_rank=lora_rank, seed=seed,
        )
        self.backbone, self.backbone_params, self.model_id = backbone, dict(backbone_params or {}), model_id
        check_backbone_params(backbone, self.backbone_params, model_id)
        self._victim: Victim | None = None
        self._base: Backbone | None = None
        self._samplers: dict[str, DiffPure] = {}

    # -- the training contract ---------------------------------------------------------------
    @property
    def training_attacks(self) -> list[TrainingAttack]:
        """The ``train_attacks`` this purifier was trained on (every other attack is unseen); none
        for the unsupervised control, which never sees an adversarial image. ``seen_attacks`` (the
        names) derives from this."""
        if self.objective == "unsupervised":
            return []
        return [TrainingAttack(a.attack, dict(a.params), a.norm, a.eps) for a in self.train_attacks]  # type: ignore[arg-type]

    def preparations(self) -> list[Preparation]:
        """The backbone, then the fine-tuning against the victim (pairs included)."""
        base = backbone_preparations(self.backbone, self.backbone_params, self.model_id)
        pairs = self.train_pairs_per_task * len(self.train_tasks) * len(self.train_attacks)
        tuned = Preparation(
            key=f"codefend-purifier:{digest_json(self.params)[:16]}",
            label=f"train codefend-purifier ({self.objective})",
            run=functools.partial(_prepare_purifier, dict(self.params)), needs_victim=True,
            after=tuple(p.key for p in base),
            # pairs: a PGD-10 attack each (~20 passes); fine-tuning: steps x batch x 2 UNet passes (~4 each)
            cost=20.0 * pairs + 8.0 * self.training.steps * self.training.batch_size,
        )
        return [*base, tuned]

    def bind_plugins(self, plugins: Any) -> None:
        check_pair_attack_names(self.train_attacks, plugins)  # the attacks that make its pairs
        super().bind_plugins(plugins)

    def bind(self, victim: Victim, *, prepare: bool = True) -> None:
        """Serve ``victim``; with ``prepare``, train or load the purifier now (not inside purify)."""
        self._victim = victim
        if prepare:
            self.sampler()

    def _require_victim(self) -> Victim:
        if self._victim is None:
            raise RuntimeError(
                "codefend-purifier is trained against a victim: call bind(victim) first (the runner "
                "and `codefend train codefend-purifier --victim ...` do)"
            )
        return self._victim

    def base_backbone(self, *, progress: bool = True) -> Backbone:
        if self._base is None:
            self._base = load_backbone(self.backbone, self.backbone_params, self.model_id, progress=progress)
        return self._base

    def pair_spec(self, victim: Victim) -> PairSpec:
        return PairSpec(
            victim_fingerprint=victim.fingerprint, attacks=self.train_attacks, tasks=self.train_tasks,
            split=self.train_split, per_task=self.train_pairs_per_task, seed=self.training.seed,
        )

    def checkpoint_dir(self, victim: Victim) -> Path:
        base = self.base_backbone()
        spec = self.pair_spec(victim)
        pairs = {
            "victim": spec.victim_fingerprint,
            "attacks": [a.model_dump() for a in spec.attacks],
            "tasks": [t.model_dump(exclude_none=True) for t in spec.tasks],
            "split": spec.split,
            "per_task": spec.per_task,
            "seed": spec.seed,
        }
        parts = {
            "backbone": weights_digest(base.unet.state_dict()),
            "victim": victim.fingerprint,
            # the control never sees adversarial images or the victim: only the clean images count
            "pairs": pairs if self.objective == "directional" else {**pairs, "attacks": "clean only"},
            "pairs_code": spec.code_versions(self.plugins) if self.objective == "directional" else None,
        }
        return codefend_home() / "models" / f"codefend-purifier-{self.training.fingerprint(parts)}"

    def is_trained(self, victim: Victim) -> bool:
        return (self.checkpoint_dir(victim) / "training.json").exists()

    def train(self, *, progress: bool = True) -> dict[str, Any]:
        """Make the pairs and fine-tune (or find both in the cache); returns ``training.json``."""
        victim = self._require_victim()
        out = self.checkpoint_dir(victim)
        if not self.is_trained(victim):
            # first use may come from inside the runner's no_grad purification
            with torch.enable_grad():
                pairs = make_pairs(victim, self.pair_spec(victim), plugins=self.plugins, progress=progress)
                base = self.base_backbone(progress=progress).to(victim.device)
                train_purifier(base, pairs, self.training, out, victim=victim, progress=progress)
        return json.loads((out / "training.json").read_text())

    def sampler(self) -> DiffPure:
        victim = self._require_victim()
        key = victim.fingerprint
        if key not in self._samplers:
            self.train()
            base = self.base_backbone()
            tuned = copy.copy(base)
            tuned.unet = load_tuned_unet(base, self.checkpoint_dir(victim), self.training)
            tuned.name = f"codefend-purifier-{self.checkpoint_dir(victim).name.rsplit('-', 1)[-1]}"
            # precision as diffpure's: the purification's network evaluations (training stays fp32)
            self._samplers[key] = DiffPure.from_backbone(tuned, t_star=self.t_star, sampler="ddim", steps=self.steps,
                                                         precision=self.precision)
        return self._samplers[key]

    # -- the defense contract ----------------------------------------------------------------
    def purify(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.sampler().purify(pixels, generator)

    def passes_per_sample(self) -> int:
        return DiffPure(t_star=self.t_star, sampler="ddim", steps=self.steps).passes_per_sample()


def _prepare_purifier(params: dict[str, Any], victim: Victim, *, plugins: Any) -> None:
    purifier = CoDefendPurifier(**params)
    purifier.bind_plugins(plugins)
    purifier.bind(victim)
