"""Peak memory of ``medssl predict`` with many classes on a large volume; prints one JSON object.

Default: a width-4 GenesisUNet with 62 classes (as a TotalSegmentator-style model; random weights: memory
does not depend on what the network learned) on a synthetic 25-million-voxel CT (320 x 320 x 245).
A full-volume sliding window would keep a 62 x 25e6 float32 accumulator (6.2 GB) on top of the
logits; ``medssl predict`` runs MONAI's sliding window in Z slabs with an fp16 accumulator and keeps
only the argmax and two float16 probability maps.

The prediction runs in a child process (``python -m MedSSL predict``, with --probabilities, and
--detections on request) so its peak resident set size is measured alone: ``resource.getrusage(RUSAGE_CHILDREN)``.

    python Testing/Benchmarks/bench_predict_memory.py [--shape 320 320 245] [--classes 62] [--width 4]
        [--overlap 0.25] [--memory-mb 1024] [--threads 2]
    python Testing/Benchmarks/bench_predict_memory.py --quick   # smoke run (the test suite's): seconds
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

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_bundle(folder: Path, classes: int, width: int, patch) -> None:
    import torch

    from MedSSL.io.bundle import save_bundle
    from MedSSL.models.genesis_unet import GenesisUNet

    torch.manual_seed(0)
    values = list(range(classes + 1))
    meta = {"architecture": {"name": "unet3d", "width": width, "in_channels": 1, "out_channels": classes + 1, "spatial_dims": 3},
            "task": "segment", "channels": values,
            "classes": {str(v): {"name": f"class_{v}", "color": [0.5, 0.5, 0.5]} for v in values[1:]},
            "preprocessing": {"intensity": {"modality": "CT", "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]},
                              "target_spacing_mm": None, "modality": "CT"},
            "patch_size": list(patch)}
    save_bundle(folder, GenesisUNet(1, classes + 1, width).state_dict(), meta)


def make_volume(path: Path, shape) -> None:
    from MedSSL.io.volumes import Volume, write_volume

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x**2 + y**2 < 0.8)[:, :, None]
    array = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 20, size=shape).astype(np.int16)
    write_volume(Volume(array, np.array([0.8, 0.8, 1.5]), np.zeros(3), np.eye(3)), path, compress=False)


QUICK = {"shape": [48, 48, 24], "classes": 3, "patch": [16, 16, 8], "memory_mb": 0.5, "threads": 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in seconds: a 48x48x24 volume, 3 classes, 16x16x8 patch, 0.5 MB slabs, 1 thread")
    ap.add_argument("--shape", type=int, nargs=3, default=[320, 320, 245])
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 32])
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--memory-mb", type=float, default=1024.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detections", action="store_true",
                    help="also write detections (random weights give a speckled map: very many components)")
    args = ap.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        tmp = Path(tmp)
        make_bundle(tmp / "model", args.classes, args.width, args.patch)
        make_volume(tmp / "ct.mha", tuple(args.shape))
        cmd = [sys.executable, "-m", "MedSSL", "predict", "--model", str(tmp / "model"), "--image", str(tmp / "ct.mha"),
               "--out", str(tmp / "pred.nrrd"), "--probabilities", str(tmp / "prob.nrrd"),
               "--overlap", str(args.overlap), "--memory-mb", str(args.memory_mb),
               "--device", "cpu", "--progress", "none", "--threads", str(args.threads)]
        if args.detections:
            cmd += ["--detections", str(tmp / "det.json")]
        start = time.monotonic()
        done = subprocess.run(cmd, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, encoding="utf-8")
        seconds = time.monotonic() - start
        if done.returncode != 0:
            raise SystemExit(f"predict failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
        voxels = int(np.prod(args.shape))
        print(json.dumps({
            "benchmark": "predict_memory", "quick": args.quick, "peak_rss_mb": round(peak_kb / 1024, 1), "seconds": round(seconds, 1),
            "seconds_per_megavoxel": round(seconds / (voxels / 1e6), 2), "device": "cpu",
            "cpu_model": _cpu_model(), "voxels": voxels, "shape": args.shape, "classes": args.classes, "width": args.width, "patch": args.patch,
            "overlap": args.overlap, "memory_mb_target": args.memory_mb, "threads": args.threads,
            "full_volume_float32_accumulator_mb": round((args.classes + 1) * voxels * 4 / 2**20, 1),
            "detections": len(json.loads((tmp / "det.json").read_text(encoding="utf-8"))) if args.detections else None,
        }))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
