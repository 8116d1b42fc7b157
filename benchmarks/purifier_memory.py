"""Memory and time of ONE exact-gradient attack step through DiffPure, with and without gradient
checkpointing (a benchmark, not a test).

One attack step = ``purify`` of a batch of held-out shapes images (``--batch``, 32 x 32) that
requires grad, a victim-free scalar loss (the mean of the purified pixels times a fixed random
tensor) and ``backward`` to the input. Configurations (one torch thread each):

    (i)   diffpure ddpm, t* = 0.1 (100 DDPM steps), gradient checkpointing on
    (ii)  the same, checkpointing off
    (iii) diffpure ddim, t* = 0.1, 2 steps, checkpointing on

It prints each one's peak memory and wall time, and the ratios checkpointed-100-step peak / 2-step
peak (goal <= 1.5x: memory does not grow with the sampler's length) and checkpointed / unchecked
time (goal <= 2.5x).

Each configuration runs in two fresh subprocesses, one for memory and one for time, each of which
loads the backbone and runs one no_grad warm-up ``purify`` first.

Peak memory on CPU: the increase of the process's peak RSS over its RSS once the backbone is
loaded and the warm-up has run. The worker returns freed heap to the OS (``malloc_trim``),
records RSS, resets the kernel's high-water mark (``/proc/self/clear_refs``, ``5``), runs one step
and reads ``VmHWM`` from ``/proc/self/status``. glibc is told to serve every allocation over
64 KiB with ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor leaves the RSS at once and
the RSS tracks live memory (with glibc's default heap it does not: freed activations stay
resident and are reused). Where ``clear_refs`` is not writable it falls back to
``resource.getrusage(...).ru_maxrss`` (which then also counts the warm-up's transient). On CUDA
(``--device cuda``) it is ``torch.cuda.max_memory_allocated`` over the allocated memory after the
warm-up.

Wall time: the fastest of ``--repeats`` steps, in a process with glibc's default allocator (an
``mmap`` per tensor makes every step page-fault its memory in afresh, which slows the
checkpointed step, with its recomputation, about twice as much as the plain one).

    python benchmarks/purifier_memory.py [--batch 16] [--repeats 2] [--tiny] [--device cpu]

Uses the cached default shapes-ddpm (trained on first use, ~3.5 min on one CPU thread); ``--tiny``
uses the tests' tiny shapes-ddpm (``tests/conftest.py`` ``TINY_DDPM``, ~20 s to train).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "ddpm-100-ckpt": ("(i)   diffpure ddpm t*=0.1, 100 steps, checkpointed",
                      {"t_star": 0.1, "sampler": "ddpm", "gradient_checkpointing": True}),
    "ddpm-100": ("(ii)  diffpure ddpm t*=0.1, 100 steps, no checkpointing",
                 {"t_star": 0.1, "sampler": "ddpm", "gradient_checkpointing": False}),
    "ddim-2-ckpt": ("(iii) diffpure ddim t*=0.1, 2 steps, checkpointed",
                    {"t_star": 0.1, "sampler": "ddim", "steps": 2, "gradient_checkpointing": True}),
}


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def backbone_params(tiny: bool, device: str) -> dict:
    params: dict = {"device": device}
    if tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY_DDPM

        params.update(TINY_DDPM)
    return params


def worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from defenses.diffpure import DiffPure
    from defenses.diffusion import load_backbone, shapes_heldout_images

    device = torch.device(args.device)
    model = load_backbone("shapes-ddpm", backbone_params(args.tiny, args.device), progress=False)
    defense = DiffPure.from_backbone(model, **CONFIGS[name][1])
    pixels = shapes_heldout_images(args.batch, split="val").to(device)
    weights = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0)).to(device)

    with torch.no_grad():  # warm-up
        defense.purify(pixels, torch.Generator().manual_seed(0))

    def attack_step() -> torch.Tensor:
        x = pixels.clone().requires_grad_(True)
        loss = (defense.purify(x, torch.Generator().manual_seed(1)) * weights).mean()
        (grad,) = torch.autograd.grad(loss, x)  # as the attacks do (non-reentrant checkpointing allows it)
        return grad

    cuda = device.type == "cuda"
    if args.measure == "time":
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            attack_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return {"name": name, "seconds": min(times), "unet_calls": defense.passes_per_sample(),
                "threads": torch.get_num_threads()}

    _malloc_trim()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated - memory_allocated after warm-up"
    else:
        base = _status_kib("VmRSS") * 1024
        if _reset_peak_rss():
            method = "VmHWM (peak RSS, reset via /proc/self/clear_refs) - RSS after load + no_grad warm-up"
        else:
            method = "ru_maxrss (peak RSS, includes the warm-up's transient) - RSS after load + no_grad warm-up"
    attack_step()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("VmHWM"):
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"name": name, "peak_mib": (peak - base) / 2**20, "baseline_mib": base / 2**20, "method": method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny shapes-ddpm (TINY_DDPM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("memory", "time"), default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    # train (or load) the backbone once here, before anything is measured
    import torch

    torch.set_num_threads(1)
    from defenses.diffusion import load_backbone

    load_backbone("shapes-ddpm", backbone_params(args.tiny, args.device))

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    results: dict[str, dict] = {}
    for name in CONFIGS:
        results[name] = {}
        for measure in ("memory", "time"):
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--measure", measure,
                       "--batch", str(args.batch), "--repeats", str(args.repeats), "--device", args.device,
                       *(["--tiny"] if args.tiny else [])]
            extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else {}
            done = subprocess.run(command, cwd=REPO, env={**env, **extra}, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{name} ({measure}) failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
            results[name].update(json.loads(lines[-1][len("RESULT "):]))

    first = next(iter(results.values()))
    model = "tiny shapes-ddpm (TINY_DDPM)" if args.tiny else "default shapes-ddpm"
    print(f"one exact-gradient attack step (purify + (purified * w).mean() + backward to the input), "
          f"{model}, batch {args.batch} x 3 x 32 x 32, device {args.device}, torch threads {first['threads']}, "
          f"time = fastest of {args.repeats} steps (default malloc)")
    print(f"peak memory = {first['method']}" + ("" if args.device.startswith("cuda") else
                                                 " (own process, MALLOC_MMAP_THRESHOLD_=65536)"))
    print(f"{'configuration':56s} {'UNet calls':>10s} {'peak MiB':>9s} {'seconds':>8s}")
    for name, (label, _) in CONFIGS.items():
        r = results[name]
        print(f"{label:56s} {r['unet_calls']:10d} {r['peak_mib']:9.1f} {r['seconds']:8.2f}")
    memory_ratio = results["ddpm-100-ckpt"]["peak_mib"] / results["ddim-2-ckpt"]["peak_mib"]
    time_ratio = results["ddpm-100-ckpt"]["seconds"] / results["ddpm-100"]["seconds"]
    saved = results["ddpm-100"]["peak_mib"] / results["ddpm-100-ckpt"]["peak_mib"]
    print(f"peak, checkpointed 100-step / 2-step:      {memory_ratio:5.2f}x  (goal <= 1.5x)")
    print(f"time, checkpointed / unchecked 100-step:   {time_ratio:5.2f}x  (goal <= 2.5x)")
    print(f"peak, unchecked / checkpointed 100-step:   {saved:5.1f}x")


if __name__ == "__main__":
    main()
