"""The few-shot engine on a suite of real cases: a structure painted on k planes -> the whole structure.

Run from the repository root (no installation needed beyond the project's)::

    python Testing/Benchmarks/bench_fewshot.py --quick        # smoke run: one small case, k = 3, one seed
    python Testing/Benchmarks/bench_fewshot.py                # the suite: 7 cases, k = 1 3 5, 5 seeds
    python Testing/Benchmarks/bench_fewshot.py --previous     # also the previous engine (U-Net fine-tuning)

For every case of :mod:`fewshot_cases` (real scans from ``../shared/data`` with reference masks) and
every k, the planes a user would paint (:func:`fewshot_cases.paint`: spread over the structure, inset
from its ends, on the case's axial axis) are given to

* ``engine``: the few-shot engine (:func:`MedSSL.tasks.fewshot.engine.segment_painted`), once per seed;
* ``interpolation``: signed-distance interpolation between the same planes (Slicer's "Fill between
  slices" baseline, :func:`MedSSL.tasks.evaluate.interpolate_between_slices`);
* ``upper``: the engine given every other plane (the full-label upper bound, scored on the other half);
* ``previous`` (``--previous``): the engine this project had before, ``medssl finetune --engine network
  --max-time 60`` then ``medssl predict --annotation``, one seed, k >= 3.
* ``ablation`` (``--ablation``): the engine with one ingredient removed: ``shape_only`` (appearance
  weight 0), ``appearance_only`` (no interpolation prior: the walk from the middle painted plane only),
  ``fixed_weight`` (no leave-one-plane-out: weight 1), ``fixed_taper`` (no size trend: 0.3 mm/mm).
* ``init`` (``--init-bundle B``): the engine with the decoder features of bundle B (pretrained) and of a
  random network of the same shape ("scratch in the same engine").

Scores: Dice on the planes not painted (mean over classes). Seconds: wall time of the engine in this
process (features + fit + apply). Peak memory: each case runs in a child process whose peak RSS is
reported. Outputs in ``--out`` (default ``Testing/Benchmarks/results/fewshot``, git-ignored):
``runs.jsonl``, ``table.md``, ``dice_vs_k.png``, ``summary.json``; the LAST stdout line is the summary JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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

from fewshot_cases import DATA, dice_unpainted, every_other, load_cases, paint  # noqa: E402

ABLATIONS = {"shape_only": {"weight": 0.0}, "fixed_weight": {"weight": 1.0}, "fixed_taper": {"taper": 0.3}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    p.add_argument("--ks", nargs="*", type=int, default=[1, 3, 5], help="painted planes (none: only the upper bound)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--previous", action="store_true", help="also run the previous engine (slow: about 90 s a run)")
    p.add_argument("--ablation", action="store_true", help="also run the engine with one ingredient removed")
    p.add_argument("--init-bundle", type=Path, default=None, help="also run with this bundle's decoder features")
    p.add_argument("--no-upper", action="store_true", help="skip the every-other-plane upper bound")
    p.add_argument("--quick", action="store_true", help="smoke run: cord_t2w, k = 3, seed 0")
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="DIR",
                   help="no runs: rebuild the table, plot and summary in --out from these folders' runs.jsonl")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fewshot")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.ks, args.seeds, args.no_upper = args.cases or ["cord_t2w"], [3], [0], True
    return args


def _engine(case, sparse, painted, settings=None, **kw) -> dict:
    from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted

    start = time.perf_counter()
    model, result = segment_painted(case.image, case.spacing, sparse, settings or FewShotSettings(), **kw)
    return {"dice": round(dice_unpainted(result.labels, case.truth, case.axis, painted), 4),
            "seconds": round(time.perf_counter() - start, 2), "weight": model.weight, "taper": model.taper}


def _appearance_only(case, sparse, painted, seed) -> dict:
    """Only the middle painted plane's shape, walked both ways: no interpolation prior between planes."""
    from MedSSL.tasks.fewshot.engine import FewShotSettings

    single = np.full_like(sparse, 255)
    index = [slice(None)] * 3
    middle = painted[len(painted) // 2]
    index[case.axis] = middle
    single[tuple(index)] = sparse[tuple(index)]
    out = _engine(case, single, painted, FewShotSettings(seed=seed))
    return out


def _random_backbone(bundle: Path):
    from MedSSL.models.initial_weights import load_initial_weights
    from MedSSL.models.genesis_unet import GenesisUNet
    from MedSSL.tasks.fewshot.network_features import intensity_of

    init = load_initial_weights(bundle)
    import torch

    torch.manual_seed(0)
    return GenesisUNet(1, 1, init.width).eval(), intensity_of(init)


def _previous(case, sparse, painted, work: Path) -> dict:
    """The previous engine through the CLI: U-Net fine-tuning for 60 s, then predict --annotation."""
    from MedSSL.io.volumes import Volume, write_volume

    grid = Volume(case.image, case.spacing, np.zeros(3), np.eye(3))
    work.mkdir(parents=True, exist_ok=True)
    image, label, pred = work / "image.nii.gz", work / "painted.nii.gz", work / "pred.nii.gz"
    write_volume(grid, image)
    write_volume(grid.with_array(sparse), label)
    start = time.perf_counter()
    common = ["--device", "cpu", "--progress", "none"]
    for argv in (["finetune", "--image", str(image), "--label", str(label), "--out", str(work / "model"),
                  "--engine", "network", "--max-time", "60", *common],
                 ["predict", "--model", str(work / "model"), "--image", str(image), "--annotation", str(label),
                  "--out", str(pred), *common]):
        run = subprocess.run([sys.executable, "-m", "MedSSL", *argv], capture_output=True, text=True, encoding="utf-8")
        if run.returncode != 0:
            return {"dice": None, "error": run.stderr.strip().splitlines()[-1:] or ["?"]}
    from MedSSL.io.volumes import read_volume

    labels = read_volume(pred).array
    return {"dice": round(dice_unpainted(labels, case.truth, case.axis, painted), 4),
            "seconds": round(time.perf_counter() - start, 2)}


def run_case(name: str, args) -> list[dict]:
    """Every arm of one case; runs in a child process (peak RSS per case)."""
    from MedSSL.tasks.evaluate import interpolate_between_slices
    from MedSSL.tasks.fewshot.engine import FewShotSettings

    case = load_cases(args.data, [name])[0]
    rows = []

    def add(arm, k, seed, painted, out):
        row = {"case": name, "arm": arm, "k": k, "seed": seed, "painted": painted, **out}
        rows.append(row)
        print(f"{name:16s} {arm:16s} k={k} seed={seed} dice={row.get('dice')} {row.get('seconds', '')}s",
              file=sys.stderr, flush=True)

    for k in args.ks:
        sparse, painted = paint(case.truth, case.axis, k)
        start = time.perf_counter()
        filled = interpolate_between_slices(sparse, axis=case.axis, spacing=case.spacing)
        add("interpolation", k, None, painted, {"dice": round(dice_unpainted(filled, case.truth, case.axis, painted), 4),
                                                 "seconds": round(time.perf_counter() - start, 2)})
        for seed in args.seeds:
            add("engine", k, seed, painted, _engine(case, sparse, painted, FewShotSettings(seed=seed)))
        if args.ablation:
            for arm, kw in ABLATIONS.items():
                add(arm, k, 0, painted, _engine(case, sparse, painted, FewShotSettings(seed=0, **kw)))
            if k >= 3:
                add("appearance_only", k, 0, painted, _appearance_only(case, sparse, painted, 0))
        if args.init_bundle is not None:
            from MedSSL.tasks.fewshot.network_features import build_backbone, intensity_of
            from MedSSL.models.initial_weights import load_initial_weights

            init = load_initial_weights(args.init_bundle)
            add("init_pretrained", k, 0, painted, _engine(case, sparse, painted, backbone=build_backbone(init),
                                                          backbone_intensity=intensity_of(init)))
            net, intensity = _random_backbone(args.init_bundle)
            add("init_random", k, 0, painted, _engine(case, sparse, painted, backbone=net, backbone_intensity=intensity))
        if args.previous and k >= 3:
            with tempfile.TemporaryDirectory() as tmp:
                add("previous", k, 0, painted, _previous(case, sparse, painted, Path(tmp)))
    if not args.no_upper:
        sparse, painted = every_other(case.truth, case.axis)
        add("upper", "half", 0, painted, _engine(case, sparse, painted))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for row in rows:
        row["peak_rss_mb"] = round(peak_mb)
    return rows


def _mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return round(float(np.mean(vals)), 3), round(float(np.std(vals)), 3)


def summarise(rows, args) -> tuple[dict, str]:
    cases = list(dict.fromkeys(r["case"] for r in rows))
    table, per_k = {}, {}
    for name in cases:
        for k in args.ks:
            cell = {}
            for arm in sorted({r["arm"] for r in rows}):
                sel = [r for r in rows if r["case"] == name and r["k"] == k and r["arm"] == arm]
                if sel:
                    mean, std = _mean_std([r["dice"] for r in sel])
                    cell[arm] = {"mean": mean, "std": std, "n": len(sel),
                                 "seconds": round(float(np.mean([r.get("seconds", 0) for r in sel])), 2)}
            table[f"{name}/k{k}"] = cell
        up = [r for r in rows if r["case"] == name and r["arm"] == "upper"]
        if up:
            table[f"{name}/upper"] = {"upper": {"mean": up[0]["dice"], "seconds": up[0]["seconds"]}}
    for k in args.ks:
        if not all("engine" in table[f"{n}/k{k}"] for n in cases):
            continue
        eng = [table[f"{n}/k{k}"]["engine"]["mean"] for n in cases]
        inter = [table[f"{n}/k{k}"]["interpolation"]["mean"] for n in cases]
        margins = [e - i for e, i in zip(eng, inter)]
        per_k[k] = {"engine_mean": round(float(np.mean(eng)), 3), "interpolation_mean": round(float(np.mean(inter)), 3),
                    "margin_mean": round(float(np.mean(margins)), 3), "worst_margin": round(float(min(margins)), 3),
                    "max_seed_std": max(table[f"{n}/k{k}"]["engine"]["std"] for n in cases)}
    peak = {n: max(r["peak_rss_mb"] for r in rows if r["case"] == n) for n in cases}
    summary = {"benchmark": "fewshot", "cases": cases, "ks": args.ks, "seeds": args.seeds, "per_k": per_k,
               "table": table, "peak_rss_mb": peak, "hardware": hardware()}
    return summary, markdown(table, cases, args, per_k, peak)


def markdown(table, cases, args, per_k, peak) -> str:
    arms = ["engine", "interpolation", "previous", "shape_only", "appearance_only", "fixed_weight", "fixed_taper",
            "init_pretrained", "init_random"]
    present = [a for a in arms if any(a in table.get(f"{n}/k{k}", {}) for n in cases for k in args.ks)]
    head = "| case | k | " + " | ".join(present) + " | engine s | upper (every other plane) | peak RSS MB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n in cases:
        for k in args.ks:
            cell = table[f"{n}/k{k}"]

            def fmt(a):
                if a not in cell:
                    return ""
                c = cell[a]
                return f"{c['mean']:.3f} ± {c['std']:.3f}" if a == "engine" else f"{c['mean']:.3f}" if c["mean"] is not None else "failed"

            upper = table.get(f"{n}/upper", {}).get("upper", {}).get("mean")
            lines.append(f"| {n} | {k} | " + " | ".join(fmt(a) for a in present) +
                         f" | {cell['engine']['seconds']:.1f} | {upper if upper is not None else ''} | {peak[n]} |")
    lines.append("")
    for k, s in per_k.items():
        lines.append(f"k = {k}: engine {s['engine_mean']:.3f}, interpolation {s['interpolation_mean']:.3f}, "
                     f"mean margin {s['margin_mean']:+.3f}, worst case {s['worst_margin']:+.3f}, "
                     f"largest seed std {s['max_seed_std']:.3f}")
    return "\n".join(lines)


def plot(table, cases, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cases), figsize=(2.6 * len(cases), 3.0), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], cases):
        for arm, style in (("engine", "o-"), ("interpolation", "s--"), ("previous", "x:")):
            pts = [(k, table[f"{n}/k{k}"][arm]["mean"]) for k in args.ks
                   if arm in table[f"{n}/k{k}"] and table[f"{n}/k{k}"][arm]["mean"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=arm)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("painted planes k")
        ax.set_xticks(args.ks)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("Dice, unpainted planes")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware() -> dict:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def report(args) -> int:
    """Merge earlier runs (``--report``): rows of the later folders replace the same case/arm/k/seed."""
    merged = {}
    for folder in args.report:
        for line in (folder / "runs.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            merged[(row["case"], row["arm"], str(row["k"]), row["seed"])] = row
    rows = list(merged.values())
    args.ks = sorted({r["k"] for r in rows if isinstance(r["k"], int)})
    args.seeds = sorted({r["seed"] for r in rows if r["arm"] == "engine"})
    return _write(rows, args)


def _write(rows, args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    summary, md = summarise(rows, args)
    (args.out / "table.md").write_text(md + "\n", encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot(summary["table"], summary["cases"], args, args.out / "dice_vs_k.png")
    print(md, file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args)
    if not load_cases(args.data, args.cases[:1] if args.cases else ["cord_t2w"]):
        print(json.dumps({"benchmark": "fewshot", "skipped": f"no data at {args.data}"}))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.cases or [c for c in ("spleen_ct", "edema_flair", "cord_t2w", "brain_nuclei_t1", "liver_ct",
                                       "kidney_ct", "lungs_ct")]
    rows = []
    ctx = mp.get_context("spawn")
    with (args.out / "runs.jsonl").open("w", encoding="utf-8") as log:
        for name in names:
            with ctx.Pool(1) as pool:  # a fresh process per case: its peak RSS is the case's
                case_rows = pool.apply(run_case, (name, args))
            for row in case_rows:
                log.write(json.dumps(row) + "\n")
            rows += case_rows
    return _write(rows, args)


if __name__ == "__main__":
    sys.exit(main())
