"""Time and peak memory of ONE adaptive attack step through DiffPure with EOT: the exact EOT
gradient against DiffHammer's gradient grafting (a benchmark, not a test).

One attack step = ``DefendedTarget.loss`` on a batch of held-out shapes VQA questions (``--batch``)
that requires grad, through ``diffpure`` (DDPM, t* = ``--t-star``, gradient checkpointing on) and
the real shapes-vlm victim, then ``backward`` to the input. For each EOT count in ``--eot``:

- exact: every draw keeps its graph; the backward pass runs through the sampler once per draw;
- grafted (``adaptive: {grafting: true}``): one draw keeps its graph, the others run without one;
  the mean of the draws' gradients at the purified images goes back through that one draw.

Each configuration runs in fresh subprocesses (one for time, one for memory), with the memory
method of benchmarks/purifier_memory.py (peak RSS over the RSS after a no_grad warm-up, with
glibc serving large allocations by mmap so the RSS tracks live memory). Strength (what each
route breaks) is measured by benchmarks/attack_strength.py ``--variants standard,grafted``.

    python benchmarks/eot_grafting.py [--batch 8] [--eot 4 20] [--t-star 0.05] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from purifier_memory import _malloc_trim, _reset_peak_rss, _status_kib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from harness.adaptive import DefendedTarget, gradient_route
    from harness.plugins import get_plugins

    plugins = get_plugins()
    victim = plugins.victims.create("shapes-vlm", {})
    victim.load(progress=False)
    task = plugins.tasks.create("vqav2", {"data": "shapes"})
    samples = task.samples("test", 100, 0)[: args.batch]
    defense = plugins.defenses.create("diffpure", {"t_star": args.t_star, "sampler": "ddpm"})
    defense.bind(victim)
    pixels = victim.prepare([s.image for s in samples])
    prompts, targets = [s.prompt for s in samples], [task.attack_targets(s)[0] for s in samples]
    route = gradient_route(defense, args.worker_eot, grafting=args.worker_route == "grafted")
    target = DefendedTarget(victim, defense, route, torch.Generator().manual_seed(0))

    with torch.no_grad():  # warm-up
        target.loss(pixels, prompts, targets, "vqa")

    def attack_step() -> None:
        x = pixels.clone().requires_grad_(True)
        torch.autograd.grad(target.loss(x, prompts, targets, "vqa").sum(), x)

    if args.measure == "time":
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            attack_step()
            times.append(time.perf_counter() - started)
        return {"seconds": min(times), "unet_calls": defense.passes_per_sample()}
    _malloc_trim()
    base = _status_kib("VmRSS") * 1024
    if not _reset_peak_rss():
        sys.exit("peak memory needs a writable /proc/self/clear_refs")
    attack_step()
    return {"peak_mib": (_status_kib("VmHWM") * 1024 - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eot", type=int, nargs="+", default=[4, 20])
    parser.add_argument("--t-star", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker-route", choices=("exact", "grafted"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-eot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("memory", "time"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_route:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    for eot in args.eot:
        for route in ("exact", "grafted"):
            result: dict = {"route": route, "eot": eot}
            for measure in ("time", "memory"):
                command = [sys.executable, str(Path(__file__).resolve()), "--worker-route", route, "--worker-eot", str(eot),
                           "--measure", measure, "--batch", str(args.batch), "--t-star", str(args.t_star),
                           "--repeats", str(args.repeats)]
                extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else {}
                done = subprocess.run(command, cwd=REPO, env={**env, **extra}, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{route} EOT {eot} ({measure}) failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
                result.update(json.loads(lines[-1][len("RESULT "):]))
            rows.append(result)
            print(f"{route:8s} EOT {eot:3d}: {result['seconds']:8.2f} s  {result['peak_mib']:8.1f} MiB peak", flush=True)

    print(f"\none adaptive attack step through diffpure (ddpm, t*={args.t_star}, {rows[0]['unet_calls']} UNet calls, "
          f"checkpointed) and shapes-vlm, batch {args.batch}, one torch thread, time = fastest of {args.repeats}")
    print(f"{'EOT':>4s} {'exact s':>9s} {'grafted s':>10s} {'speed-up':>9s} {'exact MiB':>10s} {'grafted MiB':>12s}")
    for eot in args.eot:
        exact, grafted = (next(r for r in rows if r["eot"] == eot and r["route"] == name) for name in ("exact", "grafted"))
        print(f"{eot:4d} {exact['seconds']:9.2f} {grafted['seconds']:10.2f} {exact['seconds'] / grafted['seconds']:8.2f}x "
              f"{exact['peak_mib']:10.1f} {grafted['peak_mib']:12.1f}")


if __name__ == "__main__":
    main()
