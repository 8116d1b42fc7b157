"""Train shapes-vlm under several configs and report clean / PGD-8 VQA accuracy and train time.

Used to choose the built-in victim's defaults (a benchmark, not a test). On an H200 (300 test
questions; clean / after PGD-20 at 8/255): default 0.975 / 0.426; h128-e4 0.950 / 0.406;
h128-e4-s2000 0.897 / 0.499; h128-e4-s1000 0.781 / 0.597; -lr2e-3 0.789 / 0.486; -bs64 0.951 / 0.402;
-p2 0.783 / 0.541.

    python benchmarks/victim_sweep.py [--device cuda] [--configs default,lr2e-3,...]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import torch

try:  # the metric stack is not needed for VQA accuracy; allow running where it is absent
    import pycocoevalcap  # noqa: F401
except ImportError:  # pragma: no cover
    import types

    sys.modules["tasks.caption_metrics"] = types.SimpleNamespace(score_captions=None)

from attacks.pgd import PGD
from harness.contracts import AttackBatch, ThreatModel
from harness.plugins import load_plugins
from harness.victims.shapes_vlm import ShapesVLM, ShapesVLMConfig, train_shapes_vlm
from tasks.vqa_eval import vqa_accuracy
from tasks.vqav2 import VQAv2Task

CONFIGS = {
    "smoke": {"steps": 5},
    "default": {},
    "h128-e4": {"hidden": 128, "encoder_layers": 4},
    "h128-e4-s1000": {"hidden": 128, "encoder_layers": 4, "steps": 1000},
    "h128-e4-s2000": {"hidden": 128, "encoder_layers": 4, "steps": 2000},
    "h128-e4-s2000-lr2e-3": {"hidden": 128, "encoder_layers": 4, "steps": 2000, "lr": 2e-3},
    "h128-e4-s2000-bs64": {"hidden": 128, "encoder_layers": 4, "steps": 2000, "batch_size": 64},
    "h128-e4-s2000-p2": {"hidden": 128, "encoder_layers": 4, "steps": 2000, "patch_size": 2},
    # quickstart candidates: ~3 minutes on one CPU thread
    "s1000-lr2e-3": {"steps": 1000, "lr": 2e-3},
    "h64-e2-s1000-bs64-lr2e-3": {"hidden": 64, "encoder_layers": 2, "steps": 1000, "batch_size": 64, "lr": 2e-3},
    "s1500-lr1.5e-3": {"steps": 1500, "lr": 1.5e-3},
    "p8-s1500-lr1.5e-3": {"patch_size": 8, "steps": 1500, "lr": 1.5e-3},
    "s2000-bs16": {"steps": 2000, "batch_size": 16},
    "h64-e2-s2000-lr2e-3": {"hidden": 64, "encoder_layers": 2, "steps": 2000, "lr": 2e-3},
    "p8-h64-e2-s3000-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 3000, "lr": 2e-3},
    "p8-s2000-lr1.5e-3": {"patch_size": 8, "steps": 2000, "lr": 1.5e-3},
    "p8-h64-e2-s2000-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 2000, "lr": 2e-3},
    "p8-h64-e2-s2000-lr3e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 2000, "lr": 3e-3},
    "p8-h64-e2-s2500-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 2500, "lr": 2e-3},
    "h64-e2-s1500-lr2e-3": {"hidden": 64, "encoder_layers": 2, "steps": 1500, "lr": 2e-3},
    "p8-h64-e2-s3000-lr3e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 3000, "lr": 3e-3},
    "p8-h64-e2-s3500-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 3500, "lr": 2e-3},
    "p8-h64-e2-s2400-bs48-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 2400, "batch_size": 48, "lr": 2e-3},
    # a step is overhead-bound at these sizes: batch 64 costs 1.37x batch 32 per step, not 2x
    "p8-h64-e2-s1800-bs64-lr2.8e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 1800, "batch_size": 64, "lr": 2.8e-3},
    "p8-h64-e2-s2000-bs64-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 2000, "batch_size": 64, "lr": 2e-3},
    "p8-h64-e2-s1500-bs64-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 1500, "batch_size": 64, "lr": 2e-3},
    "p8-h64-e2-s1200-bs64-lr2e-3": {"patch_size": 8, "hidden": 64, "encoder_layers": 2, "steps": 1200, "batch_size": 64, "lr": 2e-3},
}


def evaluate(victim: ShapesVLM, n: int, device: str) -> dict[str, float]:
    task = VQAv2Task(data="shapes")
    samples = task.samples("test", n, 0)
    pixels = victim.prepare([s.image for s in samples]).to(device)
    prompts = [s.prompt for s in samples]
    out = victim.generate(pixels, prompts, "vqa")
    clean = [vqa_accuracy(o, s.references) for o, s in zip(out, samples)]
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    for a, s in zip(clean, samples):
        by_type[s.meta["question_type"]].append(a)
    targets = [task.attack_targets(s)[0] for s in samples]
    adv = []
    for start in range(0, n, 100):
        sl = slice(start, start + 100)
        batch = AttackBatch(pixels[sl], prompts[sl], targets[sl], "vqa")
        adv.append(PGD(steps=20).perturb(victim, batch, ThreatModel("linf-8", "linf", 8 / 255), torch.Generator().manual_seed(0)).pixels)
    out_adv = victim.generate(torch.cat(adv), prompts, "vqa")
    robust = [vqa_accuracy(o, s.references) for o, s in zip(out_adv, samples)]
    return {
        "clean": sum(clean) / n,
        "pgd8": sum(robust) / n,
        **{k: round(sum(v) / len(v), 3) for k, v in by_type.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="/tmp/victim-sweep")
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    for name in args.configs.split(","):
        config = dataclasses.replace(ShapesVLMConfig(), **CONFIGS[name])
        out_dir = Path(args.out) / name
        started = time.perf_counter()
        record = train_shapes_vlm(config, out_dir, load_plugins().tasks, progress=False, device=args.device)
        seconds = time.perf_counter() - started
        victim = ShapesVLM(checkpoint=str(out_dir), device=args.device)
        victim.load()
        result = evaluate(victim, args.n, args.device)
        print(f"{name}: train {seconds:.0f}s loss {record['final_loss']:.3f} | " + " ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
