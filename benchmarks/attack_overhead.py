"""Attack engine overhead on shapes-vlm (a benchmark, not a test).

Prints, in one run:
- native PGD seconds per step vs one raw forward+backward of the victim's loss on the same batch
  (goal: overhead <= 1.05x);
- native PGD vs ART's ProjectedGradientDescent wall time on the same samples and steps
  (goal: native >= 3x faster), with the mean loss each reaches.

    python benchmarks/attack_overhead.py [--n 64] [--steps 20] [--repeats 3]

Uses the cached default shapes-vlm (trained on first use).

Measured 2026-11-26 on one H200 (64 samples, 20 steps): raw forward+backward 13.3 ms, native PGD
13.2 ms/step (0.99x); native PGD 0.26 s vs ART PGD 0.34 s (1.29x: the 3x goal is not met — ART's
per-step cost over native is one host round-trip of a 64x3x32x32 array, small next to the model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attacks.art_attacks import ARTPGD
from attacks.pgd import PGD
from harness.contracts import AttackBatch, ThreatModel
from harness.victims.shapes_vlm import ShapesVLM
from tasks.vqav2 import VQAv2Task


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    victim = ShapesVLM()
    victim.load()
    task = VQAv2Task(data="shapes")
    samples = task.samples("test", args.n, 0)
    batch = AttackBatch(
        victim.prepare([s.image for s in samples]).to(victim.device), [s.prompt for s in samples],
        [task.attack_targets(s)[0] for s in samples], "vqa", seeds=list(range(args.n)),
    )
    threat = ThreatModel("linf-8", "linf", 8 / 255)

    def raw_step() -> None:
        pixels = batch.pixels.clone().requires_grad_(True)
        victim.loss(pixels, batch.prompts, batch.targets, "vqa").sum().backward()

    raw_step()  # warm-up
    raw = _timed(raw_step, args.repeats * 3)
    native_result = {}

    def native() -> None:
        native_result["r"] = PGD(steps=args.steps).perturb(victim, batch, threat, torch.Generator().manual_seed(0))

    def art() -> None:
        native_result["a"] = ARTPGD(steps=args.steps).perturb(victim, batch, threat, torch.Generator().manual_seed(0))

    native_s = _timed(native, args.repeats)
    art_s = _timed(art, args.repeats)
    per_step = native_s / args.steps
    loss = lambda px: victim.loss(px, batch.prompts, batch.targets, "vqa").mean().item()  # noqa: E731
    print(f"shapes-vlm, {args.n} VQA samples, L∞ 8/255, {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"raw forward+backward:   {raw * 1000:8.1f} ms")
    print(f"native PGD per step:    {per_step * 1000:8.1f} ms  -> overhead {per_step / raw:.3f}x (goal <= 1.05x)")
    print(f"native PGD total:       {native_s:8.2f} s   mean loss {loss(native_result['r'].pixels):.3f}")
    print(f"ART PGD total:          {art_s:8.2f} s   mean loss {loss(native_result['a'].pixels):.3f}")
    print(f"native speed-up vs ART: {art_s / native_s:.2f}x (goal >= 3x)")
    print(f"clean mean loss:        {loss(batch.pixels):.3f}")


if __name__ == "__main__":
    main()
