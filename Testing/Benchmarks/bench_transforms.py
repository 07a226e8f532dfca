"""Throughput of the Models Genesis transformations and of a Models Genesis training step.

Run from the repository root (no installation needed)::

    python Testing/Benchmarks/bench_transforms.py --seconds 10
    python Testing/Benchmarks/bench_transforms.py --device cuda --width 32 --train-steps 20
    python Testing/Benchmarks/bench_transforms.py --quick   # smoke run (the test suite's): seconds

What is measured, as the trainer runs it:

* ``cubes_per_s``: :func:`MedSSL.transforms.genesis.genesis_transform` with the official
  probabilities (10,000 shuffle blocks per shuffled cube) on batches of ``--batch`` (6) cubes of
  ``--patch`` (64 64 32) voxels, one call per batch, for at least ``--seconds``; the batches are
  uniform random cubes already on the device (the transformation time does not depend on the values).
  ``cubes_per_cpu_s`` divides by this process's CPU time instead of wall time: on a machine shared
  with other work (see ``load_average_*``) it shows what the cores we did get achieved.
* ``stage_ms_per_cube``: each building block alone on the same batches (the pipeline applies them to a
  random subset: shuffle to 50% of the cubes, the intensity map to 90%, painting to 90%).
* ``train_*``: ``--train-steps`` steps (after one untimed warm-up step) of transform + GenesisUNet
  (``--width``, 32 = official) forward + MSE(sigmoid(output), target) + backward + SGD step
  (momentum 0.9; the learning rate does not change the time). ``train_step_s`` is the mean wall time of
  a whole step, transformation included; ``train_network_step_s`` the network part only.

The official numpy generator, for reference, transforms ~13.5 cubes/s on one core (the figure the
project's performance target of >= 135 cubes/s is based on); it is not re-run here.

On a CPU shared with other busy processes, more than one torch thread can be far slower than one
(OpenMP threads spin at every barrier while their partner waits for a core; the transformation runs
~150 small parallel regions per batch). Compare ``--threads 1``, or set ``OMP_WAIT_POLICY=PASSIVE``.

Progress goes to stderr; the LAST line on stdout is one JSON object with all the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from MedSSL.models.genesis_unet import GenesisUNet
from MedSSL.transforms.genesis import (
    GenesisTransformConfig,
    bezier_intensity,
    genesis_transform,
    inpaint,
    local_pixel_shuffle,
    outpaint,
    random_flip,
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3]]
    except (OSError, ValueError):
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_pipeline(batches, config, generator, device, seconds: float) -> dict:
    for batch in batches[:2]:  # warm-up: caches, allocator
        genesis_transform(batch, config, generator)
    sync(device)
    count, start = 0, time.perf_counter()
    cpu_start = time.process_time()
    while True:
        genesis_transform(batches[count % len(batches)], config, generator)
        count += 1
        if count % 4 == 0:
            sync(device)
            if time.perf_counter() - start >= seconds:
                break
    sync(device)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    cubes = count * batches[0].shape[0]
    return {
        "cubes_per_s": cubes / wall,
        "seconds": wall,
        "batches": count,
        "ms_per_batch": 1000 * wall / count,
        # CPU time of this process: below wall time x threads when other processes share the cores
        "process_cpu_s": cpu,
        "cubes_per_cpu_s": cubes / cpu if cpu > 0 else None,
    }


def bench_stages(batches, generator, device, repeats: int) -> dict:
    stages = {
        "flip": lambda x: random_flip(x, generator, rate=0.4),
        "local_shuffle_10000": lambda x: local_pixel_shuffle(x, generator, 10000),
        "bezier": lambda x: bezier_intensity(x, generator),
        "inpaint": lambda x: inpaint(x, generator),
        "outpaint": lambda x: outpaint(x, generator),
    }
    out = {}
    for name, fn in stages.items():
        fn(batches[0])
        sync(device)
        start = time.perf_counter()
        for i in range(repeats):
            fn(batches[i % len(batches)])
        sync(device)
        out[name] = 1000 * (time.perf_counter() - start) / (repeats * batches[0].shape[0])
    return out


def bench_training(batches, config, generator, device, width: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = GenesisUNet(width=width).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_times, network_times = [], []
    for step in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        inputs, targets = genesis_transform(batches[step % len(batches)], config, generator)
        sync(device)
        middle = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(torch.sigmoid(model(inputs)), targets)
        loss.backward()
        optimizer.step()
        sync(device)
        end = time.perf_counter()
        if step == 0:
            log(f"train warm-up step: {end - start:.2f} s, loss {float(loss.detach()):.4f}")
            continue
        step_times.append(end - start)
        network_times.append(end - middle)
        log(f"train step {step}/{steps}: {end - start:.2f} s")
    step_s = sum(step_times) / len(step_times)
    return {
        "train_step_s": step_s,
        "train_network_step_s": sum(network_times) / len(network_times),
        "train_cubes_per_s": batches[0].shape[0] / step_s,
        "train_steps": steps,
        "train_parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum duration of the transform measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"))
    parser.add_argument("--width", type=int, default=32, help="GenesisUNet base width for the training step (32 = official)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps (0 = skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stage-repeats", type=int, default=10, help="batches per building block (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: 0.2 s of 2 cubes of 32x32x16, 1 batch per stage, 1 width-4 step")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.batch, args.patch, args.width, args.train_steps, args.stage_repeats = 0.2, 2, (32, 32, 16), 4, 1, 1

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available"}))
        return 1
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.rand(args.batch, 1, *args.patch, generator=data).to(device) for _ in range(4)]
    config = GenesisTransformConfig()

    result = {
        "benchmark": "transforms",
        "quick": args.quick,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch": args.batch,
        "patch": list(args.patch),
        "config": config.__dict__,
        "load_average_before": load_average(),
    }
    log(f"transforms: {args.batch} x {tuple(args.patch)} on {device}, {result['threads']} threads, >= {args.seconds} s")
    pipeline = bench_pipeline(batches, config, generator, device, args.seconds)
    log(f"transforms: {pipeline['cubes_per_s']:.1f} cubes/s ({pipeline['ms_per_batch']:.1f} ms per batch)")
    result.update(pipeline)
    if args.stage_repeats > 0:
        result["stage_ms_per_cube"] = bench_stages(batches, generator, device, args.stage_repeats)
        log("stages (ms per cube, stage always applied): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["stage_ms_per_cube"].items()))
    result["width"] = args.width
    if args.train_steps > 0:
        result.update(bench_training(batches, config, generator, device, args.width, args.train_steps))
        log(f"training: {result['train_step_s']:.2f} s per step, {result['train_cubes_per_s']:.2f} cubes/s")
    result["load_average_after"] = load_average()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
