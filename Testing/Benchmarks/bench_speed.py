"""Prediction and training speed against the machine's own compute limit, measured in the same run.

One run measures:

* ``matmul_gflops``: the fp32 rate of a large matrix product (torch, 2048 x 2048, best of 5): the
  compute limit the network's rate is compared with (it moves with the machine's load, hence in the
  same run).
* ``predict``: for each width x classes, ``medssl predict``'s own path (``predict_files``: read the
  image, intensity normalisation, Z slabs of MONAI's sliding window, blending, reduction, write the
  labels) on a synthetic CT, in a child process (so its peak RSS is its own). The network's forward
  calls are timed and counted; FLOPs per window are counted once with ``torch.utils.flop_counter``.
  Reported: seconds per Mvoxel, achieved GFLOP/s of the forward passes (FLOPs / time inside
  ``forward``), that as a fraction of ``matmul_gflops``, the share of wall time outside the network
  (I/O, normalisation, blending, accumulation, reduction, writing) and peak RSS; in predict's default
  precision (bf16 on CPUs with native bf16), or in fp32 with ``--fp32``.
* ``train``: one pretraining step (Models Genesis: transform in a loader thread + forward + backward +
  Adam, batch 6) and one fine-tuning step (Dice + cross-entropy on an augmented random crop of a
  labelled volume, batch 2), set up as the commands set them up (channels-last on the CPU, the loop's
  mixed precision), each the mean of ``--steps`` steps after a warm-up: achieved GFLOP/s of forward +
  backward (counted), its fraction of the fp32 matmul rate, and the loader wait (the time the step
  waits for its batch: the loader thread's queue, or the crop and augmentation) as a share of the
  step. Where the default precision is not fp32 (bf16 on CPUs that compute it natively), both are
  measured.

Random weights: speed does not depend on what the network learned. ``os.getloadavg()`` is reported
next to every figure (the CPU is shared). The last stdout line is the JSON result.

    python Testing/Benchmarks/bench_speed.py                 # about 10 minutes on 2 busy cores
    python Testing/Benchmarks/bench_speed.py --shape 320 320 245 --widths 8 16 32 --classes 2 62  # the issue's full sizes
    python Testing/Benchmarks/bench_speed.py --quick         # smoke run (the test suite's): well under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: spinning threads starve a shared CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GEMM rate (GFLOP/s)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- predict


def make_bundle(folder: Path, classes: int, width: int, patch) -> None:
    from MedSSL.io.bundle import save_bundle
    from MedSSL.models.genesis_unet import GenesisUNet

    torch.manual_seed(0)
    values = list(range(classes))
    meta = {"architecture": {"name": "unet3d", "width": width, "in_channels": 1, "out_channels": classes, "spatial_dims": 3},
            "task": "segment", "channels": values,
            "classes": {str(v): {"name": f"class_{v}", "color": [0.5, 0.5, 0.5]} for v in values[1:]},
            "preprocessing": {"intensity": {"modality": "CT", "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]},
                              "target_spacing_mm": None, "modality": "CT"},
            "patch_size": list(patch)}
    save_bundle(folder, GenesisUNet(1, classes, width).state_dict(), meta)


def make_volume(path: Path, shape) -> None:
    from MedSSL.io.volumes import Volume, write_volume

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x**2 + y**2 < 0.8)[:, :, None]
    array = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 20, size=shape).astype(np.int16)
    write_volume(Volume(array, np.array([0.8, 0.8, 1.5]), np.zeros(3), np.eye(3)), path, compress=False)


def predict_child(args) -> None:
    """In the child: one ``predict_files`` run with the network's forward timed; prints one JSON line."""
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import PredictOptions, predict_files
    from MedSSL.engine.progress import Progress

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    model = load_model(args.bundle, device)
    from MedSSL.models.genesis_unet import GenesisUNet

    network = model.network
    forward = GenesisUNet.forward  # timed at the class: predict may run a prepared copy of the network
    state = {"seconds": 0.0, "calls": 0, "windows": 0}

    def timed(self, x, *rest, **kw):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = forward(self, x, *rest, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["seconds"] += time.perf_counter() - t0
        state["calls"] += 1
        state["windows"] += int(x.shape[0])
        return y

    GenesisUNet.forward = timed
    options = PredictOptions(overlap=args.overlap, memory_mb=args.memory_mb, sw_batch_size=args.sw_batch_size,
                             fp32=args.fp32)
    predict_files(model, args.image, args.out, options, Progress("none"))
    wall = time.perf_counter() - start
    GenesisUNet.forward = forward
    window = torch.zeros(1, 1, *model.patch, device=device)
    with torch.inference_mode():
        flops_window = count_flops(lambda: network(window))
    print(json.dumps({"wall_s": wall, "network_s": state["seconds"], "forward_calls": state["calls"],
                      "windows": state["windows"], "flops_per_window": flops_window,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_predict(tmp: Path, image: Path, shape, width: int, classes: int, args, rate: float) -> dict:
    bundle = tmp / f"model_w{width}_c{classes}"
    make_bundle(bundle, classes, width, args.patch)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--bundle", str(bundle), "--image", str(image),
           "--out", str(tmp / "labels.nrrd"), "--threads", str(args.threads), "--device", args.device,
           "--overlap", str(args.overlap), "--memory-mb", str(args.memory_mb), "--sw-batch-size", str(args.sw_batch_size),
           *(["--fp32"] if args.fp32 else [])]
    load_before = load()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"predict failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    mvox = float(np.prod(shape)) / 1e6
    gflops = child["flops_per_window"] * child["windows"] / max(child["network_s"], 1e-9) / 1e9
    from MedSSL.engine.acceleration import precision_name

    row = {"width": width, "classes": classes, "shape": list(shape), "mvoxels": round(mvox, 3),
           "precision": precision_name(torch.device(args.device), not args.fp32),
           "wall_s": round(child["wall_s"], 2), "s_per_mvoxel": round(child["wall_s"] / mvox, 2),
           "network_s": round(child["network_s"], 2), "windows": child["windows"],
           "gflop_per_window": round(child["flops_per_window"] / 1e9, 3),
           "mflop_per_voxel_window": round(child["flops_per_window"] / np.prod(args.patch) / 1e6, 4),
           "achieved_gflops": round(gflops, 2), "fraction_of_matmul": round(gflops / rate, 3),
           "outside_network_share": round(1 - child["network_s"] / child["wall_s"], 3),
           "peak_rss_mb": round(child["peak_rss_mb"], 1), "load_before": load_before, "load_after": load()}
    log(f"predict w{width} c{classes} {'x'.join(map(str, shape))} {row['precision']}: {row['s_per_mvoxel']} s/Mvoxel, "
        f"{row['achieved_gflops']} GFLOP/s ({row['fraction_of_matmul']:.0%} of the first matmul), "
        f"outside network {row['outside_network_share']:.0%}, peak RSS {row['peak_rss_mb']} MB, load {row['load_after']}")
    return row


# ---------------------------------------------------------------------------------------------- train


def bench_train(kind: str, width: int, classes: int, batch: int, patch, steps: int, device: torch.device,
                rate: float, amp: bool = True) -> dict:
    """One pretraining (Genesis) or fine-tuning (Dice + cross-entropy) step as ``medssl pretrain`` and
    ``medssl finetune`` run it: the network prepared by ``engine.acceleration`` (channels-last on the
    CPU), the loop's precision (``amp`` False = ``--no-amp``), the batch from a loader thread
    (pretraining, ``--workers 1``) or drawn and augmented in the step (fine-tuning). Mean of ``steps``
    steps after a warm-up."""
    from MedSSL.engine.acceleration import mixed_precision, precision_name, prepare_for_training
    from MedSSL.engine.prefetch import Prefetcher
    from MedSSL.losses.segmentation import MaskedDiceCELoss
    from MedSSL.models.genesis_unet import GenesisUNet
    from MedSSL.transforms.augment import AugmentConfig, augment_batch

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    out_channels = 1 if kind == "pretrain" else classes
    model = GenesisUNet(1, out_channels, width).to(device).train()
    amp, _ = prepare_for_training(model, device, 3, [tuple(patch)], amp, False, log)
    autocast, scaler = mixed_precision(device, amp)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if kind == "pretrain":
        import torch.nn.functional as F

        from MedSSL.transforms.genesis import GenesisTransformConfig, genesis_transform

        config = GenesisTransformConfig()
        cubes = torch.rand(batch, 1, *patch, generator=generator)

        def draw():
            inputs, targets = genesis_transform(cubes, config, generator)
            return inputs.to(device), targets.to(device)

        make_batch = Prefetcher(draw, workers=1)

        def loss_fn(output, target):
            return F.mse_loss(torch.sigmoid(output.float()), target)
    else:
        big = [s * 2 for s in patch]
        volume = torch.rand(1, *big, generator=generator)
        labels = torch.randint(0, classes, tuple(big), generator=generator)
        augment = AugmentConfig.for_task("segment", "CT")
        dice_ce = MaskedDiceCELoss()

        def make_batch():
            xs, ys = [], []
            for _ in range(batch):
                o = [int(torch.randint(0, b - p + 1, (1,), generator=generator)) for b, p in zip(big, patch)]
                sl = tuple(slice(a, a + p) for a, p in zip(o, patch))
                xs.append(volume[(slice(None), *sl)])
                ys.append(labels[sl])
            return augment_batch(torch.stack(xs).to(device), torch.stack(ys).to(device), augment, generator)

        def loss_fn(output, target):
            return dice_ce(output, target)[0]

    def network_step(inputs, targets):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(inputs), targets)
        (scaler.scale(loss) if scaler else loss).backward()
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()

    inputs, targets = make_batch()
    flops = count_flops(lambda: loss_fn(model(inputs), targets).backward())
    optimizer.zero_grad(set_to_none=True)
    step_times, loader_times = [], []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        inputs, targets = make_batch()
        t1 = time.perf_counter()
        network_step(inputs, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step:
            step_times.append(t2 - t0)
            loader_times.append(t1 - t0)
    if isinstance(make_batch, Prefetcher):
        make_batch.close()
    step_s = float(np.mean(step_times))
    loader_s = float(np.mean(loader_times))
    gflops = flops / (step_s - loader_s) / 1e9
    row = {"kind": kind, "width": width, "classes": out_channels, "batch": batch, "patch": list(patch), "steps": steps,
           "precision": precision_name(device, amp), "step_s": round(step_s, 3), "gflop_per_step": round(flops / 1e9, 2),
           "achieved_gflops": round(gflops, 2), "fraction_of_matmul": round(gflops / rate, 3),
           "loader_share": round(loader_s / step_s, 3), "load": load()}
    log(f"train {kind} w{width} {row['precision']}: {row['step_s']} s/step, {row['achieved_gflops']} GFLOP/s "
        f"({row['fraction_of_matmul']:.0%} of the first matmul), loader wait {row['loader_share']:.0%}, load {row['load']}")
    return row


# ---------------------------------------------------------------------------------------------- main

QUICK = {"shape": [48, 48, 24], "widths": [2], "classes": [2, 5], "patch": [16, 16, 8], "train_width": 2,
         "train_patch": [16, 16, 8], "steps": 1, "matmul_n": 512}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny sizes (well under a minute)")
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 128, 48],
                    help="synthetic CT for predict (default 0.79 Mvoxel: the whole default run takes ~10 min on 2 busy "
                         "cores; the issue's sizes are 512 512 61 (16 Mvoxel) and 320 320 245 (25 Mvoxel))")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 62], help="output channels, background included")
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--overlap", type=float, default=0.5, help="as medssl predict's default")
    ap.add_argument("--memory-mb", type=float, default=1024.0)
    ap.add_argument("--sw-batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-width", type=int, default=8)
    ap.add_argument("--train-patch", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--steps", type=int, default=2, help="timed training steps of each kind (after one warm-up)")
    ap.add_argument("--fp32", action="store_true", help="predict with medssl predict --fp32 (default: its default "
                                                        "precision, bf16 on CPUs with native bf16)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-predict", action="store_true")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        predict_child(args)
        return 0
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    rate = matmul_gflops(device, args.matmul_n)
    result = {"benchmark": "speed", "quick": args.quick, "device": args.device, "cpu_model": cpu_model(),
              "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "matmul_gflops": round(rate, 1), "load_at_matmul": load(), "overlap": args.overlap,
              "patch": args.patch, "memory_mb": args.memory_mb, "sw_batch_size": args.sw_batch_size,
              "predict": [], "train": []}
    log(f"fp32 matmul: {rate:.1f} GFLOP/s ({args.threads} threads, load {result['load_at_matmul']})")
    if not args.no_predict:
        with tempfile.TemporaryDirectory(prefix="medssl-speed-") as tmp:
            tmp = Path(tmp)
            image = tmp / "ct.mha"
            make_volume(image, tuple(args.shape))
            for width in args.widths:
                for classes in args.classes:
                    result["predict"].append(bench_predict(tmp, image, args.shape, width, classes, args, rate))
    if not args.no_train:
        from MedSSL.engine.acceleration import amp_for_inputs, precision_name

        # the default precision, and fp32 (--no-amp) when the default is another
        default = precision_name(device, amp_for_inputs(device, True, [tuple(args.train_patch)]))
        precisions = [True, False] if default != "fp32" else [True]
        for amp in precisions:
            result["train"].append(bench_train("pretrain", args.train_width, 1, 6, args.train_patch, args.steps, device,
                                               rate, amp))
            result["train"].append(bench_train("finetune", args.train_width, max(args.classes), 2, args.train_patch,
                                               args.steps, device, rate, amp))
    result["matmul_gflops_end"] = round(matmul_gflops(device, args.matmul_n), 1)
    # the load moves the GEMM rate too: fractions are of the better of the two measurements
    result["matmul_gflops_reference"] = reference = max(rate, result["matmul_gflops_end"])
    for row in result["predict"] + result["train"]:
        row["fraction_of_matmul"] = round(row["achieved_gflops"] / reference, 3)
    result["load_end"] = load()
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
