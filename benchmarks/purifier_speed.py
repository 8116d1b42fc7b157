"""CoDefend's purifier vs DiffPure at its original ~100-step setting: speed and robustness in one run
(a benchmark, not a test).

On the same VQA test images (clean, and PGD-20 at L∞ 8/255 against the undefended shapes-vlm), it
prints for each purifier: images per second of ``purify`` (median of ``--repeats`` timed passes
over all images, batch ``--batch``), network evaluations per image, and the VQA accuracy of the
victim on the purified clean and attacked images. Goal (issue #4): the purifier ≥ 20× faster.

    python benchmarks/purifier_speed.py [--n 200] [--batch 50] [--repeats 3]

Uses the cached default shapes-vlm, shapes-ddpm and codefend-purifier (each trained on first use,
as `codefend train codefend-purifier` would).

Measured 2026-11-26 on this project's 2-core CPU machine (2 torch threads, 200 images, batch 50;
"purifier is" = how many times faster the purifier is):

    no defense: clean 0.931, PGD-8 0.313
    defense                                  images/s  purifier is evals/img  clean  PGD-8
    codefend-purifier (t*=0.05, DDIM 2)         228.9        1.0x         2  0.936  0.907
    diffpure (t*=0.1, DDPM 100)                   4.3       53.1x       100  0.934  0.907
    diffpure (t*=0.1, SDE h=1e-3)                 4.6       49.9x       100  0.934  0.912
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attacks.pgd import PGD
from defenses.diffpure import DiffPure
from defenses.purifier import CoDefendPurifier
from harness.contracts import AttackBatch, ThreatModel
from harness.victims.shapes_vlm import ShapesVLM
from tasks.vqav2 import VQAv2Task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    victim = ShapesVLM()
    victim.load()
    task = VQAv2Task(data="shapes")
    samples = task.samples("test", args.n, 0)
    prompts = [s.prompt for s in samples]
    clean = victim.prepare([s.image for s in samples]).to(victim.device)
    chunks = range(0, len(samples), args.batch)
    threat = ThreatModel("linf-8", "linf", 8 / 255)
    adversarial = torch.cat([
        PGD(steps=20).perturb(
            victim,
            AttackBatch(clean[i : i + args.batch], prompts[i : i + args.batch],
                        [task.attack_targets(s)[0] for s in samples[i : i + args.batch]], "vqa"),
            threat, torch.Generator().manual_seed(0),
        ).pixels
        for i in chunks
    ])

    def accuracy(pixels: torch.Tensor) -> float:
        outputs = victim.generate(pixels, prompts, "vqa")
        return sum(s["vqa_accuracy"] for s in task.score(outputs, samples)) / len(samples)

    purifier = CoDefendPurifier()
    purifier.bind(victim)
    purifier.train()
    defenses = {
        "codefend-purifier (t*=0.05, DDIM 2)": purifier,
        "diffpure (t*=0.1, DDPM 100)": DiffPure(t_star=0.1, sampler="ddpm"),
        "diffpure (t*=0.1, SDE h=1e-3)": DiffPure(t_star=0.1, sampler="sde"),
    }
    print(f"device {victim.device}, torch threads {torch.get_num_threads()}, {len(samples)} images, batch {args.batch}")
    print(f"no defense: clean {accuracy(clean):.3f}, PGD-8 {accuracy(adversarial):.3f}")
    rows = []
    for name, defense in defenses.items():
        def purify_all(pixels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([defense.purify(pixels[i : i + args.batch], torch.Generator().manual_seed(i)) for i in chunks])

        with torch.no_grad():  # warm-up (loads, or trains, the backbone)
            defense.purify(clean[: args.batch], torch.Generator().manual_seed(0))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            purified_adversarial = purify_all(adversarial)
            times.append(time.perf_counter() - started)
        rate = len(samples) / statistics.median(times)
        rows.append((name, rate, defense.passes_per_sample(), accuracy(purify_all(clean)), accuracy(purified_adversarial)))
    base = rows[0][1]
    print(f"{'defense':38s} {'images/s':>10s} {'purifier is':>12s} {'evals/img':>9s} {'clean':>6s} {'PGD-8':>6s}")
    for name, rate, passes, clean_acc, robust_acc in rows:
        print(f"{name:38s} {rate:10.1f} {base / rate:10.1f}x {passes:9d} {clean_acc:6.3f} {robust_acc:6.3f}")


if __name__ == "__main__":
    main()
