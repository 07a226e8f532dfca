"""Wall time of the few-shot path a clinician runs, from painted label to result, at full CT resolution.

    python Testing/Benchmarks/bench_fewshot_speed.py            # 512 x 512 x 61 and 512 x 512 x 300
    python Testing/Benchmarks/bench_fewshot_speed.py --quick    # 128 x 128 x 40 only (smoke run)

The chest CT of ``../shared/data/itkelastix_thorax_ct`` (256 x 256 x 141, 1.95 x 1.95 x 2 mm) is brought
back to the scanner's 512 x 512 in-plane grid (linear, 0.977 mm) and cut to 61 slices, or resampled to
300 slices (0.94 mm). The structure is both lungs (mask derived on the original grid as in
:func:`fewshot_cases.lung_mask`, resampled with the image): the
worst case, a structure that fills most of the field of view. Round 1: 3 axial planes painted,
``medssl finetune`` then ``medssl predict --annotation`` as separate processes (imports, I/O included),
as the Slicer module runs them. Round 2: 5 planes painted, ``finetune --init <round 1 model>``, predict.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from fewshot_cases import DATA, dice_unpainted, lung_mask, paint  # noqa: E402


def make_volume(shape_xy: int, depth: int):
    """(Volume with HU, lung mask) at shape_xy x shape_xy x depth: the mask is derived on the original grid
    (:func:`fewshot_cases.lung_mask`) and resampled with the image (nearest neighbour)."""
    import SimpleITK as sitk

    from MedSSL.io.volumes import Volume, read_volume

    src = read_volume(DATA / "itkelastix_thorax_ct" / "thorax_ct_00_2xdown.nii.gz")
    full_z = max(depth, 141)
    spacing = [src.spacing[0] * 256 / shape_xy, src.spacing[1] * 256 / shape_xy, src.spacing[2] * 141 / full_z]

    def resample(array, interpolator, default):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
        image.SetSpacing([float(s) for s in src.spacing])
        resampler = sitk.ResampleImageFilter()
        resampler.SetOutputSpacing(spacing)
        resampler.SetSize([shape_xy, shape_xy, full_z])
        resampler.SetInterpolator(interpolator)
        resampler.SetDefaultPixelValue(default)
        out = sitk.GetArrayFromImage(resampler.Execute(image)).T
        start = (full_z - depth) // 2
        return out[..., start:start + depth]

    hu = src.array.astype(np.float32)
    array = resample(hu, sitk.sitkLinear, -1024).astype(np.int16)
    mask = resample(lung_mask(hu).astype(np.uint8), sitk.sitkNearestNeighbor, 0).astype(np.uint8)
    return Volume(array, np.asarray(spacing), np.zeros(3), np.eye(3)), mask


def cli(argv) -> float:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "MedSSL", *argv, "--device", "cpu", "--progress", "none"],
                         capture_output=True, text=True, encoding="utf-8")
    if run.returncode != 0:
        raise SystemExit(f"medssl {argv[0]} failed: {run.stderr.strip()[-400:]}")
    return time.perf_counter() - start


def child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def one_size(shape_xy: int, depth: int, work: Path) -> dict:
    from MedSSL.io.volumes import read_volume, write_volume

    volume, truth = make_volume(shape_xy, depth)
    image = work / "ct.nii.gz"
    write_volume(volume, image)
    row = {"shape": [shape_xy, shape_xy, depth], "mvoxels": round(volume.array.size / 1e6, 1)}
    for rnd, k in ((1, 3), (2, 5)):
        sparse, painted = paint(truth, 2, k)
        label = work / f"painted{rnd}.nii.gz"
        write_volume(volume.with_array(sparse), label)
        init = ["--init", str(work / "m1")] if rnd == 2 else []
        t_fit = cli(["finetune", "--image", str(image), "--label", str(label), "--out", str(work / f"m{rnd}"), *init])
        t_pred = cli(["predict", "--model", str(work / f"m{rnd}"), "--image", str(image), "--annotation", str(label),
                      "--out", str(work / f"pred{rnd}.nii.gz")])
        dice = dice_unpainted(read_volume(work / f"pred{rnd}.nii.gz").array, truth, 2, painted)
        row[f"round{rnd}"] = {"k": k, "finetune_s": round(t_fit, 1), "predict_s": round(t_pred, 1),
                              "total_s": round(t_fit + t_pred, 1), "dice": round(dice, 3)}
    row["peak_rss_mb"] = round(child_peak_mb())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not (DATA / "itkelastix_thorax_ct").is_dir():
        print(json.dumps({"benchmark": "fewshot_speed", "skipped": f"no data at {DATA}"}))
        return 0
    sizes = [(128, 40)] if args.quick else [(512, 61), (512, 300)]
    rows = []
    for xy, z in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_size(xy, z, Path(tmp)))
        r = rows[-1]
        print(f"{r['shape']}: round 1 (k=3) {r['round1']['total_s']} s (finetune {r['round1']['finetune_s']}, predict "
              f"{r['round1']['predict_s']}), Dice {r['round1']['dice']}; round 2 (k=5, --init) {r['round2']['total_s']} s, "
              f"Dice {r['round2']['dice']}; peak RSS {r['peak_rss_mb']} MB", file=sys.stderr, flush=True)
    from bench_fewshot import hardware

    print(json.dumps({"benchmark": "fewshot_speed", "rows": rows, "hardware": hardware()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
