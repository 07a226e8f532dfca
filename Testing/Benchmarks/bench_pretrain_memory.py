"""Peak memory of pretraining as the collection grows: N phantom volumes for each N given.

Each size runs `medssl pretrain` in a fresh process (so peak RSS is that run's own) on N seeded phantoms,
with a fresh cube cache, and reports the child's peak resident memory (ru_maxrss). The cubes are read
memory-mapped from the cache, so the peak should stay flat as N grows. Prints one JSON object per size
and a summary object as the last line.

    python Testing/Benchmarks/bench_pretrain_memory.py --volumes 10 100
    python Testing/Benchmarks/bench_pretrain_memory.py --quick   # smoke run (the test suite's): seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run_size(n: int, args, work: Path) -> dict:
    from MedSSL.data.phantom import make_phantom
    from MedSSL.io.volumes import write_volume

    data = work / f"n{n}"
    data.mkdir()
    for seed in range(n):
        write_volume(make_phantom(seed, shape=tuple(args.shape), spacing=(3.0, 3.0, 4.0)).image, data / f"v{seed:04d}.nii.gz")
    cmd = [sys.executable, "-m", "MedSSL", "pretrain", "--data", str(data), "--out", str(work / f"out{n}"),
           "--cache", str(work / f"cache{n}"), "--width", str(args.width), "--patch", *map(str, args.patch),
           "--batch-size", "4", "--steps", str(args.steps), "--cubes-per-volume", str(args.cubes_per_volume),
           "--threads", "1", "--device", "cpu", "--progress", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    child = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"pretrain on {n} volumes failed (exit {child.returncode})")
    peak_kb = usage.ru_maxrss
    cache_mb = sum(p.stat().st_size for p in (work / f"cache{n}").glob("*.npy")) / 2**20
    return {"volumes": n, "peak_rss_mb": round(peak_kb / 1024, 1),
            "cube_cache_mb": round(cache_mb, 1), "seconds": round(time.monotonic() - started, 1)}


QUICK = {"volumes": [2], "shape": [32, 32, 16], "patch": [16, 16, 8], "cubes_per_volume": 4, "steps": 2}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: 2 volumes of 32x32x16, 16x16x8 cubes, 2 steps")
    parser.add_argument("--volumes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48])
    parser.add_argument("--patch", type=int, nargs=3, default=[32, 32, 16])
    parser.add_argument("--cubes-per-volume", type=int, default=32)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    results = []
    with tempfile.TemporaryDirectory(prefix="medssl-bench-") as tmp:
        for n in sorted(args.volumes):
            results.append(run_size(n, args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"benchmark": "pretrain_memory", "results": results, "cpu": platform.processor() or platform.machine(),
                      "settings": {k: v for k, v in vars(args).items() if k != "volumes"}}))


if __name__ == "__main__":
    main()
