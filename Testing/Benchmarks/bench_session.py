"""A simulated user in a live few-shot session (``medssl session`` through the torch-free client).

    python Testing/Benchmarks/bench_session.py                  # the 7 benchmark cases + the 512 x 512 x 61 chest CT
    python Testing/Benchmarks/bench_session.py --cases spleen_ct --chest none
    python Testing/Benchmarks/bench_session.py --quick          # the phantom only (smoke run, no data needed)

Per case: the client starts the session on the image file (``start_s``: process start, imports, reading the
image, until its "ready" line); the user paints 3 planes along the case's axis (:func:`fewshot_cases.paint`)
and asks for the result (``first_s``: planes sent + update answered, measured at the client); then 5
corrections, each repainting the one unpainted plane along the axis where the current result has the most
wrong voxels (the plane-wise form of the CVPR 2025 interactive 3D challenge's simulated user, which clicks
where the error is largest), each timed at the client (planes sent -> update answered). Dice (mean over
classes, whole volume) after every step; ``scratch_dice``: the engine run from scratch (fit + apply in this
process, as ``finetune`` + ``predict`` do) on the final painting, for comparison. ``peak_mb``: the session
process's peak resident memory (VmHWM). fp32 on the CPU (the engine's only precision). Prints a table on
stderr and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "MedSSLCommon"))

from fewshot_cases import DATA, load_cases, paint  # noqa: E402

CORRECTIONS = 5


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the truth's classes of the Dice, whole volume."""
    scores = []
    for c in [int(v) for v in np.unique(truth) if v > 0]:
        a, b = pred == c, truth == c
        scores.append(2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))
    return float(np.mean(scores))


def worst_plane(pred: np.ndarray, truth: np.ndarray, axis: int, painted) -> int:
    """The unpainted plane along ``axis`` with the most wrong voxels."""
    other = tuple(a for a in range(3) if a != axis)
    errors = (pred != truth).sum(axis=other).astype(np.int64)
    errors[list(painted)] = -1
    return int(np.argmax(errors))


def plane_of(array: np.ndarray, axis: int, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(array, k, axis=axis))


def peak_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def percentile(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def run_case(name: str, volume, truth: np.ndarray, axis: int, work: Path, steps: int | None) -> dict:
    """The simulated user on one case; ``volume``: a MedSSL Volume (written once for the session to read)."""
    from MedSSL.io.volumes import write_volume
    from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted
    from MedSSLCommonLib.session import FewShotSessionClient

    image = work / f"{name}.nii.gz"
    write_volume(volume, image)
    client = FewShotSessionClient(image, device="cpu", steps=steps)
    client.start()
    row = {"case": name, "shape": list(truth.shape), "start_s": round(client.startSeconds, 2)}
    try:
        _, painted = paint(truth, axis, 3)
        clock = time.perf_counter()
        client.setPlanes(axis, {k: plane_of(truth, axis, k) for k in painted})
        first = client.update()
        row["first_s"] = round(time.perf_counter() - clock, 2)
        row["dice"] = [round(dice(client.labels, truth), 4)]
        latencies, modes = [], []
        for _ in range(CORRECTIONS):
            k = worst_plane(client.labels, truth, axis, painted)
            painted = sorted(set(painted) | {k})
            clock = time.perf_counter()
            client.setPlanes(axis, {k: plane_of(truth, axis, k)})
            update = client.update()
            latencies.append(time.perf_counter() - clock)
            modes.append(update.mode)
            row["dice"].append(round(dice(client.labels, truth), 4))
        row["peak_mb"] = peak_mb(client.process.pid)
    finally:
        client.close()
    row.update({"planes": painted, "correction_s": [round(t, 3) for t in latencies], "modes": modes,
                "correction_median_s": percentile(latencies, 50), "correction_p95_s": percentile(latencies, 95),
                "first_seconds": first.seconds})
    sparse = np.full(truth.shape, 255, np.uint8)
    index = [slice(None)] * 3
    index[axis] = painted
    sparse[tuple(index)] = truth[tuple(index)]
    settings = FewShotSettings(steps=steps) if steps else FewShotSettings()
    _, scratch = segment_painted(volume.array.astype(np.float32), volume.spacing, sparse, settings)
    row["scratch_dice"] = round(dice(scratch.labels, truth), 4)
    row["final_minus_scratch"] = round(row["dice"][-1] - row["scratch_dice"], 4)
    return row


def benchmark_cases(names, chest: str, work: Path, steps) -> list:
    from MedSSL.io.volumes import Volume

    rows = []
    for case in load_cases(DATA, names) if names != ["none"] else []:
        volume = Volume(case.image, case.spacing, np.zeros(3), np.eye(3))
        rows.append(run_case(case.name, volume, case.truth, case.axis, work, steps))
        report(rows[-1])
    if chest != "none" and (DATA / "itkelastix_thorax_ct").is_dir():
        from bench_fewshot_speed import make_volume

        volume, truth = make_volume(512, 61)
        rows.append(run_case("chest_ct_512x512x61_lungs", volume, truth, 2, work, steps))
        report(rows[-1])
    return rows


def report(row: dict) -> None:
    print(f"{row['case']} {row['shape']}: start {row['start_s']} s, first result {row['first_s']} s, corrections "
          f"median {row['correction_median_s']} s / p95 {row['correction_p95_s']} s ({', '.join(row['modes'])}); "
          f"Dice {row['dice']}, from scratch {row['scratch_dice']}; peak {row['peak_mb']} MB", file=sys.stderr, flush=True)


def quick(work: Path) -> list:
    from MedSSL.data.phantom import make_phantom

    phantom = make_phantom(0, shape=(64, 64, 40))
    truth = (phantom.labels.array == 1).astype(np.uint8)
    row = run_case("phantom_liver", phantom.image, truth, 2, work, 60)
    report(row)
    return [row]


def summary(rows) -> dict:
    cases = [r for r in rows if not r["case"].startswith("chest_ct")]
    chest = [r for r in rows if r["case"].startswith("chest_ct")]
    corrections = [t for r in cases for t in r["correction_s"]]
    out = {"cases_correction_median_s": percentile(corrections, 50), "cases_correction_p95_s": percentile(corrections, 95),
           "worst_final_minus_scratch": min((r["final_minus_scratch"] for r in rows), default=None)}
    if chest:
        out.update({"chest_first_s": chest[0]["first_s"], "chest_start_s": chest[0]["start_s"],
                    "chest_start_plus_first_s": round(chest[0]["start_s"] + chest[0]["first_s"], 2),
                    "chest_correction_median_s": chest[0]["correction_median_s"], "chest_peak_mb": chest[0]["peak_mb"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the phantom only (no data needed)")
    p.add_argument("--cases", nargs="*", default=None, help="benchmark case names (default: all 7; 'none': none)")
    p.add_argument("--chest", choices=("512x512x61", "none"), default="512x512x61")
    p.add_argument("--steps", type=int, default=None, help="the MLP's steps of a full fit (default: the engine's)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            rows = quick(Path(tmp))
        elif not DATA.is_dir():
            print(json.dumps({"benchmark": "session", "skipped": f"no data at {DATA}"}))
            return 0
        else:
            rows = benchmark_cases(args.cases, args.chest, Path(tmp), args.steps)
    from bench_fewshot import hardware

    print(json.dumps({"benchmark": "session", "precision": "fp32", "rows": rows, "summary": summary(rows),
                      "hardware": hardware()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
