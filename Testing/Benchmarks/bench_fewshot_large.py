"""The few-shot engine on many structures: one seed per structure, k painted planes -> the whole structure.

Run from the repository root::

    python Testing/Benchmarks/bench_fewshot_large.py --quick     # smoke run: 2 structures, k = 3
    python Testing/Benchmarks/bench_fewshot_large.py             # every structure, k = 1 3 5 + k = 3 off-axis
    python Testing/Benchmarks/bench_fewshot_large.py --report    # no runs: summary + figure from runs.jsonl

Structures (one instance = one labelled structure of one scan, from ``../shared/data``, read, never
copied): the 20 left-atrium LGE-MR scans, the 12 CHAOS T2 MR scans x 4 organs (liver, both kidneys,
spleen), the 7 cases of :mod:`fewshot_cases`, further FreeSurfer structures of the voxelmorph brain and
further organs of the TotalSegmentator example CT (:data:`EXTRA_BRAIN`, :data:`EXTRA_CT`).

For each instance and each painting (k = 1, 3, 5 planes on the main axis, k = 3 on another axis;
:func:`fewshot_cases.paint`: spread over the structure, inset from its ends) the benchmark scores, on
the planes not painted, the engine (:func:`MedSSL.tasks.fewshot.engine.segment_painted`, seed 0, in
this process, one torch thread) and signed-distance interpolation between the same planes (Slicer's
"Fill between slices"; with one plane it has nothing to interpolate and scores 0 off the plane).
Each instance also gets its size (mm^3) and contrast: |mean inside - mean of a 3 mm shell outside| /
standard deviation of the shell.

Rows are appended to ``--out``/runs.jsonl as they finish (a partial run is usable; a rerun skips the
rows already there unless ``--fresh``); the summary (per painting: engine mean, interpolation mean,
mean margin, worst decile, fraction of structures more than 0.02 below interpolation) is written to
summary.json and table.md, the figure to dice_vs_size_contrast.png; the LAST stdout line is the summary JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from fewshot_cases import DATA, Case, dice_unpainted, load_cases, paint  # noqa: E402

#: FreeSurfer aseg ids of the voxelmorph brain used beyond the 7-case suite's right caudate/putamen/thalamus
EXTRA_BRAIN = {17: "left hippocampus", 53: "right hippocampus", 18: "left amygdala", 11: "left caudate",
               12: "left putamen", 10: "left thalamus", 4: "left lateral ventricle", 16: "brainstem"}
#: TotalSegmentator ids of the example CT used beyond the suite's liver and right kidney
EXTRA_CT = {1: "spleen", 3: "left kidney", 6: "stomach", 7: "pancreas", 52: "aorta", 63: "inferior vena cava",
            21: "urinary bladder", 29: "vertebra L3"}
SUITE = ("spleen_ct", "edema_flair", "cord_t2w", "brain_nuclei_t1", "liver_ct", "kidney_ct", "lungs_ct")
#: (name, axis role, k): the paintings of every instance
PAINTINGS = (("main", 1), ("main", 3), ("main", 5), ("other", 3))
#: a structure is "below interpolation" when its margin is under this
LOSS = -0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--only", nargs="+", default=None, help="instance names or name prefixes (default: all)")
    p.add_argument("--paintings", nargs="+", default=None, metavar="ROLE:K",
                   help="paintings to run, e.g. main:3 main:5 (default: main:1 main:3 main:5 other:3)")
    p.add_argument("--quick", action="store_true", help="smoke run: cord_t2w and one CHAOS kidney, main:3")
    p.add_argument("--fresh", action="store_true", help="start a new runs.jsonl instead of adding to it")
    p.add_argument("--report", action="store_true", help="no runs: rebuild summary and figure from runs.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fewshot_large")
    args = p.parse_args(argv)
    args.paintings = [(r, int(k)) for r, k in (s.split(":") for s in args.paintings)] if args.paintings else list(PAINTINGS)
    if args.quick:
        args.only, args.paintings = args.only or ["cord_t2w", "chaos_001_right_kidney"], [("main", 3)]
    return args


# ------------------------------------------------------------------------------------------- instances

def _volume(path):
    from MedSSL.io.volumes import read_volume

    return read_volume(path)


def _cohort(root: Path, folder: str, case: str):
    image, label = _volume(root / folder / f"{case}_image.nii.gz"), _volume(root / folder / f"{case}_label.nii.gz")
    return image.array.astype(np.float32), np.round(label.array).astype(np.int64), np.asarray(image.spacing, float)


def _one(name, image, label, value, spacing, axis, other, source) -> tuple[Case, int]:
    truth = (label == value).astype(np.uint8)
    return Case(name, image, truth, spacing, axis, {"1": name}, source), other


def instance_makers(root: Path) -> dict:
    """name -> a function returning (Case, other axis); scans shared by several instances are read once each."""
    makers, cache = {}, {}

    def cached(key, read):
        if key not in cache:
            cache.clear()  # instances of one scan come one after another: keep one scan in memory
            cache[key] = read()
        return cache[key]

    la = json.loads((root / "la_lge_mri" / "cohort.json").read_text(encoding="utf-8"))["cases"]
    for case in la:
        makers[f"la_{case[:6]}"] = (lambda case=case: _one(
            f"la_{case[:6]}", *_pick(cached(("la", case), lambda: _cohort(root, "la_lge_mri", case)), 1), 2, 0,
            "2018 LA challenge LGE-MR (manual)"))
    chaos = json.loads((root / "chaos_t2_mri" / "cohort.json").read_text(encoding="utf-8"))
    for case in chaos["cases"]:
        for value, organ in chaos["classes"].items():
            name = f"chaos_{case}_{organ.replace(' ', '_')}"
            makers[name] = (lambda case=case, value=int(value), name=name: _one(
                name, *_pick(cached(("chaos", case), lambda: _cohort(root, "chaos_t2_mri", case)), value), 2, 0,
                "CHAOS T2-SPIR MR (manual)"))
    for name in SUITE:
        makers[name] = lambda name=name: (load_cases(root, [name])[0], _suite_other_axis(name))

    def brain():
        scan = np.load(root / "voxelmorph_brain" / "test_scan.npz")
        return scan["vol"].astype(np.float32), np.round(scan["seg"]).astype(np.int64), np.ones(3)

    for value, structure in EXTRA_BRAIN.items():
        name = "brain_" + structure.replace(" ", "_")
        makers[name] = (lambda value=value, name=name: _one(
            name, *_pick(cached("brain", brain), value), 1, 2, "voxelmorph T1, FreeSurfer (silver)"))

    def ct():
        image = _volume(root / "totalseg_examples" / "example_ct.nii.gz")
        label = _volume(root / "totalseg_examples" / "example_seg_fast_force_split.nii.gz")
        return image.array.astype(np.float32), np.round(label.array).astype(np.int64), np.asarray(image.spacing, float)

    for value, organ in EXTRA_CT.items():
        name = "ct_" + organ.replace(" ", "_")
        makers[name] = (lambda value=value, name=name: _one(
            name, *_pick(cached("ct", ct), value), 2, 0, "TotalSegmentator example CT (model output)"))
    return makers


def _pick(scan, value):
    image, label, spacing = scan
    return image, label, value, spacing


def _suite_other_axis(name: str) -> int:
    return 2 if name == "brain_nuclei_t1" else 0


def size_and_contrast(case: Case) -> tuple[float, float]:
    """(volume of the structure in mm^3, |mean inside - mean of a 3 mm outer shell| / std of the shell)."""
    from scipy import ndimage

    inside = case.truth > 0
    outside = ndimage.distance_transform_edt(~inside, sampling=case.spacing)
    shell = (outside > 0) & (outside <= 3.0)
    ring = case.image[shell]
    contrast = abs(float(case.image[inside].mean()) - float(ring.mean())) / max(float(ring.std()), 1e-6)
    return float(inside.sum() * np.prod(case.spacing)), contrast


# ------------------------------------------------------------------------------------------------ runs

def run_painting(case: Case, axis: int, k: int) -> dict:
    """Engine (seed 0) and interpolation from ``k`` planes along ``axis``: Dice on the planes not painted."""
    from MedSSL.tasks.evaluate import interpolate_between_slices
    from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted

    sparse, painted = paint(case.truth, axis, k)
    filled = interpolate_between_slices(sparse, axis=axis, spacing=case.spacing)
    start = time.perf_counter()
    model, result = segment_painted(case.image, case.spacing, sparse, FewShotSettings(seed=0))
    seconds = time.perf_counter() - start
    engine = dice_unpainted(result.labels, case.truth, axis, painted)
    interpolation = dice_unpainted(filled, case.truth, axis, painted)
    return {"painted": painted, "engine": round(engine, 4), "interpolation": round(interpolation, 4),
            "margin": round(engine - interpolation, 4), "seconds": round(seconds, 2), "weight": model.weight,
            "calibration": model.calibration, "errors": {"engine": errors(result.labels, case.truth, axis, painted),
                                                         "interpolation": errors(filled, case.truth, axis, painted)}}


def errors(pred: np.ndarray, truth: np.ndarray, axis: int, painted: list) -> dict:
    """Voxels wrongly added (fp) and missed (fn) on the unpainted planes, between the first and last painted
    plane (``_in``) and past them (``_out``): where a method loses."""
    index = np.arange(truth.shape[axis])
    inside = (index > min(painted)) & (index < max(painted)) & ~np.isin(index, painted)
    outside = (index < min(painted)) | (index > max(painted))
    out = {}
    for where, keep in (("in", inside), ("out", outside)):
        p, t = np.compress(keep, pred > 0, axis=axis), np.compress(keep, truth > 0, axis=axis)
        out[f"fp_{where}"], out[f"fn_{where}"] = int((p & ~t).sum()), int((t & ~p).sum())
    out["truth"] = int((truth > 0).sum())
    return out


def _done(path: Path) -> set:
    if not path.is_file():
        return set()
    return {(r["instance"], r["role"], r["k"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def run(args) -> None:
    import torch

    torch.set_num_threads(1)
    makers = instance_makers(args.data)
    names = list(makers) if args.only is None else \
        list(dict.fromkeys(n for o in args.only for n in makers if n == o or n.startswith(o)))  # in --only's order
    runs = args.out / "runs.jsonl"
    if args.fresh and runs.is_file():
        runs.unlink()
    done = _done(runs)
    for name in names:
        todo = [(r, k) for r, k in args.paintings if (name, r, k) not in done]
        if not todo:
            continue
        case, other = makers[name]()
        size_mm3, contrast = size_and_contrast(case)
        for role, k in todo:
            row = {"instance": name, "source": case.source, "role": role, "k": k,
                   "axis": case.axis if role == "main" else other, "size_mm3": round(size_mm3, 1),
                   "contrast": round(contrast, 3), **run_painting(case, case.axis if role == "main" else other, k)}
            with runs.open("a", encoding="utf-8") as log:
                log.write(json.dumps(row) + "\n")
            print(f"{name:34s} {role}:{k} engine {row['engine']:.3f} interp {row['interpolation']:.3f} "
                  f"{row['seconds']:.1f}s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- summary

def summarise(rows: list[dict]) -> dict:
    """Per painting: n, engine / interpolation means, mean margin, worst decile (mean of the lowest 10 %
    of engine Dice and of margins), fraction of instances more than 0.02 below interpolation, median s."""
    out = {}
    for role, k in sorted({(r["role"], r["k"]) for r in rows}):
        sel = [r for r in rows if r["role"] == role and r["k"] == k]
        eng = np.array([r["engine"] for r in sel])
        inter = np.array([r["interpolation"] for r in sel])
        margin = eng - inter
        tail = max(1, int(np.ceil(0.1 * len(sel))))
        out[f"{role}:{k}"] = {
            "n": len(sel), "engine_mean": round(float(eng.mean()), 3), "interpolation_mean": round(float(inter.mean()), 3),
            "margin_mean": round(float(margin.mean()), 3), "worst_decile_engine": round(float(np.sort(eng)[:tail].mean()), 3),
            "worst_decile_margin": round(float(np.sort(margin)[:tail].mean()), 3),
            "fraction_below_interpolation": round(float((margin < LOSS).mean()), 3),
            "below": sorted(r["instance"] for r, m in zip(sel, margin) if m < LOSS),
            "median_seconds": round(float(np.median([r["seconds"] for r in sel])), 2)}
    suite = [r for r in rows if r["instance"] in SUITE and r["role"] == "main"]
    out["suite_7"] = {f"k{k}": round(float(np.mean([r["engine"] for r in suite if r["k"] == k])), 3)
                      for k in sorted({r["k"] for r in suite})}
    return out


def markdown(summary: dict) -> str:
    head = ("| painting | n | engine mean | interpolation mean | mean margin | worst decile (engine) | "
            "worst decile (margin) | > 0.02 below interpolation | median s |")
    lines = [head, "|" + "---|" * 9]
    for key, s in summary.items():
        if key == "suite_7":
            continue
        lines.append(f"| {key} | {s['n']} | {s['engine_mean']:.3f} | {s['interpolation_mean']:.3f} | "
                     f"{s['margin_mean']:+.3f} | {s['worst_decile_engine']:.3f} | {s['worst_decile_margin']:+.3f} | "
                     f"{100 * s['fraction_below_interpolation']:.0f} % | {s['median_seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Engine Dice (and its margin over interpolation) against structure size and contrast, per painting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), squeeze=False)
    paintings = sorted({(r["role"], r["k"]) for r in rows})
    for (role, k), marker in zip(paintings, "ov^sD"):
        sel = [r for r in rows if r["role"] == role and r["k"] == k]
        size = [r["size_mm3"] for r in sel]
        contrast = [r["contrast"] for r in sel]
        for col, x in enumerate((size, contrast)):
            axes[0][col].scatter(x, [r["engine"] for r in sel], s=12, marker=marker, alpha=0.7, label=f"{role} k={k}")
            axes[1][col].scatter(x, [r["margin"] for r in sel], s=12, marker=marker, alpha=0.7)
    for row in (0, 1):
        axes[row][0].set_xscale("log")
        axes[row][0].set_xlabel("structure volume, mm³")
        axes[row][1].set_xlabel("contrast |in - shell| / shell std")
        axes[1][row].axhline(0.0, color="k", lw=0.6)
        axes[1][row].axhline(LOSS, color="r", lw=0.6, ls="--")
    axes[0][0].set_ylabel("engine Dice, unpainted planes")
    axes[1][0].set_ylabel("engine - interpolation")
    axes[0][1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(args) -> dict:
    runs = args.out / "runs.jsonl"
    rows = [json.loads(line) for line in runs.read_text(encoding="utf-8").splitlines()] if runs.is_file() else []
    rows = list({(r["instance"], r["role"], r["k"]): r for r in rows}.values())  # a rerun's row replaces the older one
    if args.only:
        rows = [r for r in rows if any(r["instance"] == o or r["instance"].startswith(o) for o in args.only)]
    rows = [r for r in rows if (r["role"], r["k"]) in set(args.paintings)]
    summary = {"benchmark": "fewshot_large", "instances": len({r["instance"] for r in rows}), "per_painting": summarise(rows)}
    from bench_fewshot import hardware

    summary["hardware"] = hardware()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    table = markdown(summary["per_painting"])
    (args.out / "table.md").write_text(table + "\n", encoding="utf-8")
    if rows:
        plot(rows, args.out / "dice_vs_size_contrast.png")
    print(table, file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "la_lge_mri").is_dir():
        print(json.dumps({"benchmark": "fewshot_large", "skipped": f"no data at {args.data}"}))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(args)
    write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
