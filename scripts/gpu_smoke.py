"""GPU smoke test (not part of CI): tiny-config victims and purifiers on CUDA, with timings.

    bash scripts/gpu_smoke.sh            # CUDA (fails if there is none)
    bash scripts/gpu_smoke.sh --device cpu

Builds a tiny LLaVA and a tiny BLIP-2 from configs, loads them through the hf-llava / hf-blip2
adapters, runs generate, a PGD attack (loss must rise) and an SD-style latent DiffPure and
codefend-purifier (tiny VAE + UNet, LoRA fine-tuning) on the device, and prints what each step
took. Everything is random-weight and tiny: it checks the code paths and the device, not scores.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(label: str, fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"  {label:48s} {time.perf_counter() - started:8.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu to check the code paths on the CPU")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if device.startswith('cuda') else 'cpu'}")

    from attacks.pgd import PGD
    from defenses.diffpure import DiffPure
    from defenses.purifier import PurifierTraining, load_tuned_unet, train_purifier
    from defenses.training_pairs import Pairs
    from harness.contracts import AttackBatch, ThreatModel
    from harness.victims.hf import HFBlip2, HFLlava
    from defenses.diffusion import build_tiny_latent_backbone
    from harness.victims.tiny_models import build_tiny_blip2, build_tiny_llava

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 56, 3), dtype=np.uint8) for _ in range(8)]
    with tempfile.TemporaryDirectory() as folder:
        for cls, build in ((HFLlava, build_tiny_llava), (HFBlip2, build_tiny_blip2)):
            print(cls.name)
            victim = cls(model_id=str(build(Path(folder) / cls.name)), device=device, max_new_tokens=4)
            _timed("load", victim.load, device)
            pixels = victim.prepare(images).to(victim.device)
            prompts = ["what colour is the shape ?"] * len(images)
            _timed("generate (8 images, 4 tokens)", lambda: victim.generate(pixels, prompts, "vqa"), device)
            batch = AttackBatch(pixels, prompts, ["red"] * len(images), "vqa")
            result = _timed("PGD, 10 steps", lambda: PGD(steps=10).perturb(
                victim, batch, ThreatModel("linf-8", "linf", 8 / 255), torch.Generator().manual_seed(0)), device)
            print(f"  PGD loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} (must rise)")
            assert result.losses[-1] > result.losses[0]

        print("latent purifiers (tiny VAE + UNet)")
        backbone = build_tiny_latent_backbone().to(device)
        clean = torch.rand(8, 3, 32, 32, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        out = _timed("diffpure (latent, ddpm, t*=0.1: 100 UNet calls)",
                     lambda: DiffPure.from_backbone(backbone, t_star=0.1, sampler="ddpm").purify(clean, generator), device)
        assert out.shape == clean.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        pairs = Pairs(clean=clean.cpu(), adversarial=(clean.cpu() + 0.03).clamp(0, 1), prompts=[""] * 8,
                      targets=[""] * 8, kinds=["vqa"] * 8, attack=["toy"] * 8)
        config = PurifierTraining(t_max=0.1, steps=20, batch_size=8, feature_weight=0.0, adapter="lora", lora_rank=4)
        _timed("codefend-purifier LoRA fine-tune, 20 steps",
               lambda: train_purifier(backbone, pairs, config, Path(folder) / "purifier", progress=False), device)
        tuned = copy.copy(backbone)
        tuned.unet = load_tuned_unet(backbone, Path(folder) / "purifier", config)
        out = _timed("codefend-purifier (latent, DDIM 2 steps)",
                     lambda: DiffPure.from_backbone(tuned, t_star=0.1, sampler="ddim", steps=2).purify(clean, generator), device)
        assert out.shape == clean.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    print("GPU smoke test passed")


if __name__ == "__main__":
    main()
