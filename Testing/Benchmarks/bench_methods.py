"""All seven pretraining methods at an equal budget, compared by few-shot segmentation of a real scan
(issue #5): which initialisation helps most when a user paints k slices of the spleen?

Run from the repository root (no installation needed)::

    python Testing/Benchmarks/bench_methods.py --quick      # smoke run: 2 methods, tiny budgets, a few minutes
    python Testing/Benchmarks/bench_methods.py              # the study (about 110 min on 2 CPU cores)
    python Testing/Benchmarks/bench_methods.py --methods genesis dira --pretrain-steps 100 --seeds 0 1 2

The study:

1. **Pretraining**, every method in ``--methods`` (default all seven) with the SAME budget: the same
   U-Net width (``--width``, default 8), cube (``--patch``, 64 64 32), cubes per step (``--batch``, 4)
   and number of optimiser steps (``--pretrain-steps``, default 60), so every method draws the same
   number of training cubes; seed 0. The self-supervised methods read the five unlabelled CTs of the
   Models Genesis benchmark (:data:`bench_label_efficiency.PRETRAIN_DATA`, the evaluation scan's folder
   refused). Ark needs labelled datasets: three partially labelled sets built from the same shared
   folder (TotalSegmentator's abdominal CT with its liver and kidneys, the chest CTA with its aorta,
   the pulmonary CTA with its pulmonary artery; these labels are TotalSegmentator *model output*, and
   the spleen, the evaluation organ, is deliberately not among them). What each method does on top of
   its steps is its own cost and is reported, not equalised: Semantic Genesis and TransVW first train
   the self-discovery auto-encoder (``ae_steps``), DiRA runs a discriminator, Adam several crops per
   cube. Every method's wall time, first and last loss are in ``pretraining.json``.
2. **Target**, as :mod:`bench_label_efficiency`: the MSD spleen crop and its expert mask, ``k`` axial
   slices painted (``--ks``, default 1 3 5), the same picks for every arm and seed.
3. **Fine-tuning**: ``medssl finetune --init <bundle>`` for every method, plus ``scratch`` (``--init
   none``, same width), each for the same number of steps (``--finetune-steps``, default 80; a step
   budget, not a wall-clock one, so the comparison does not depend on the machine's load) and each
   seed in ``--seeds`` (default 0 1 2 3 4).
4. **Prediction and scoring** as :mod:`bench_label_efficiency`: Dice of the spleen on the slices not
   painted, of the raw prediction and with the ``--annotation`` clean-up; the signed-distance
   interpolation baseline alongside.

Outputs in ``--out`` (default ``Testing/Benchmarks/results/methods/``, git-ignored): ``bundles/<method>``
(the pretraining bundles), ``pretraining.json``, ``runs.jsonl``, ``runs/<arm>_k<k>_s<seed>/``,
``table.md``, ``dice_by_method.png``, ``summary.json``. ``--resume`` re-uses finished pretraining
bundles and runs. ``--deadline`` (minutes) stops starting new fine-tuning runs; runs are ordered seed
by seed, every arm of a seed before the next seed, so a cut loses whole seeds. The LAST line on stdout
is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for extra in (ROOT, ROOT / "Testing" / "Python", HERE):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import bench_label_efficiency as le  # shared target, scoring, runner and helpers
import numpy as np

METHODS = ("genesis", "semantic-genesis", "transvw", "dira", "caid", "adam", "ark")
DEFAULT_OUT = ROOT / "Testing" / "Benchmarks" / "results" / "methods"
#: Ark's partially labelled datasets: (name, image, label file, {source value: class name}); the source
#: values are TotalSegmentator ids (its classmap), re-numbered 1..n per dataset by this script
ARK_DATASETS = (
    ("abdomen: liver, kidneys", "totalseg_examples/example_ct.nii.gz",
     "totalseg_examples/example_seg_fast_force_split.nii.gz", {5: "liver", 2: "kidney_right", 3: "kidney_left"}),
    ("chest CTA: aorta", "totalseg_examples/aorta_report/ct_cropped.nii.gz",
     "totalseg_examples/aorta_report/aorta.nii.gz", {1: "aorta"}),
    ("pulmonary CTA: pulmonary artery", "totalseg_examples/pulmonary_report/ct_cropped.nii.gz",
     "totalseg_examples/pulmonary_report/pulmonary_artery.nii.gz", {1: "pulmonary_artery"}),
)
log = le.log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: genesis and caid, 4 pretraining steps, 10 fine-tuning steps, k = 3, seed 0")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods to compare (default all seven)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default Testing/Benchmarks/results/methods/)")
    p.add_argument("--data-root", type=Path, default=le.DATA_ROOT, help=f"the shared data folder (default {le.DATA_ROOT})")
    p.add_argument("--width", type=int, default=8, help="U-Net width of every method and of scratch (default 8)")
    p.add_argument("--patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"),
                   help="pretraining cube (default 64 64 32)")
    p.add_argument("--batch", type=int, default=4, help="pretraining cubes per step (default 4)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps of every method (default 60; quick 4)")
    p.add_argument("--pretrain-guard", type=float, default=1800.0, metavar="S",
                   help="stop a pretraining after this many seconds whatever its steps (default 1800; recorded)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps per run (default 80; quick 10)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="painted slice counts (default 1 3 5; quick 3)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default 0 1 2 3 4; quick 0)")
    p.add_argument("--no-scratch", action="store_true", help="skip the scratch arm")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per command (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda/auto")
    p.add_argument("--cache", type=Path, default=DEFAULT_OUT.parent / "cube_cache",
                   help="cube cache shared by runs (default Testing/Benchmarks/results/cube_cache)")
    p.add_argument("--deadline", type=float, default=None, metavar="MIN", help="start no fine-tuning run after MIN minutes")
    p.add_argument("--keep-models", action="store_true", help="keep the fine-tuned weights")
    p.add_argument("--resume", action="store_true", help="re-use pretraining bundles and runs found in --out")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild table.md, the plot and summary.json from the results in --out")
    args = p.parse_args(argv)
    q = args.quick
    args.methods = args.methods or (["genesis", "caid"] if q else list(METHODS))
    args.pretrain_steps = args.pretrain_steps or (4 if q else 60)
    args.finetune_steps = args.finetune_steps or (10 if q else 80)
    args.ks = args.ks or ([3] if q else [1, 3, 5])
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2, 3, 4])
    args.out = args.out or (DEFAULT_OUT.with_name(DEFAULT_OUT.name + "_quick") if q else DEFAULT_OUT)
    if any(k < 1 for k in args.ks):
        p.error("--ks: slice counts must be at least 1")
    # what bench_label_efficiency's target and runner read
    args.no_full = True
    args.pretrain_width = args.width
    args.finetune_time = None
    args.official_finetune_time = None
    return args


# ----------------------------------------------------------------------------------------------------- pretraining

def ark_spec(args, out: Path) -> Path:
    """Write Ark's three partially labelled datasets (labels re-numbered 1..n) and their SPEC.json."""
    from MedSSL.io.volumes import read_volume, write_volume

    folder = out / "ark_datasets"
    folder.mkdir(parents=True, exist_ok=True)
    datasets = []
    for i, (name, image, label, classes) in enumerate(ARK_DATASETS):
        source = read_volume(args.data_root / label)
        values = np.rint(source.array).astype(np.int64)
        mapped = np.zeros(values.shape, np.uint8)
        for new, old in enumerate(classes, start=1):
            mapped[values == old] = new
        path = folder / f"dataset{i}_label.nii.gz"
        write_volume(source.with_array(mapped), path)
        datasets.append({"name": name, "classes": {str(n): c for n, c in enumerate(classes.values(), start=1)},
                         "cases": [{"image": str((args.data_root / image).resolve()), "label": str(path)}]})
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"datasets": datasets}, indent=2), encoding="utf-8")
    return spec


def check_sources(args) -> list[Path]:
    data_root = args.data_root.resolve()
    eval_folder = (data_root / le.EVAL_FOLDER).resolve()
    paths = [data_root / p for p in le.PRETRAIN_DATA] + [data_root / d[1] for d in ARK_DATASETS]
    for p in paths:
        if not p.exists():
            raise SystemExit(f"pretraining data missing: {p}")
        if eval_folder == p.resolve() or eval_folder in p.resolve().parents:
            raise SystemExit(f"refusing to pretrain on the evaluation scan's folder: {p}")
    return [data_root / p for p in le.PRETRAIN_DATA]


def pretrain_one(args, out: Path, method: str, volumes: list[Path], spec: Path | None) -> dict:
    bundle = out / "bundles" / method
    result_file = bundle.parent / f"{method}.json"
    if args.resume and (bundle / "model.json").is_file() and result_file.is_file():
        log(f"{method}: re-using {bundle}")
        return json.loads(result_file.read_text(encoding="utf-8"))
    if bundle.exists():
        shutil.rmtree(bundle)
    source = ["--datasets", str(spec)] if method == "ark" else ["--data", *map(str, volumes)]
    argv = ["pretrain", *source, "--method", method, "--out", str(bundle), "--width", str(args.width),
            "--patch", *map(str, args.patch), "--batch-size", str(args.batch), "--steps", str(args.pretrain_steps),
            "--max-time", str(args.pretrain_guard), "--cache", str(args.cache), "--seed", "0",
            "--device", args.device, "--progress", "none", "--threads", str(args.threads)]
    load_before = le.load_average()
    log(f"{method}: pretraining {args.pretrain_steps} steps x {args.batch} cubes {'x'.join(map(str, args.patch))}, width {args.width}")
    status, seconds = le.medssl(argv, bundle.parent / f"{method}_log.txt")
    if status != 0 or not (bundle / "model.json").is_file():
        rec = {"method": method, "status": f"pretrain failed (exit {status})", "seconds_wall": round(seconds, 1)}
        log(f"{method}: pretraining FAILED (exit {status}); see {bundle.parent / f'{method}_log.txt'}")
        return rec
    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    training, history = meta.get("training", {}), meta.get("history") or [{}]
    rec = {"method": method, "status": "ok", "bundle": str(bundle), "seconds_wall": round(seconds, 1),
           "training_seconds": training.get("seconds"), "steps": training.get("steps"),
           "stopped_by": training.get("stopped_by"), **loss_summary(history),
           "settings": meta.get("method", {}).get("settings"),
           "data": "SPEC.json: " + "; ".join(d[0] for d in ARK_DATASETS) if method == "ark"
           else [str(p.relative_to(args.data_root)) for p in volumes],
           "load_average_before": load_before, "load_average_after": le.load_average()}
    result_file.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    log(f"{method}: {rec['steps']} steps in {seconds:.0f} s, loss {rec['first_loss']} -> {rec['last_loss']}")
    return rec


def loss_summary(history: list[dict]) -> dict:
    """First and last total loss and, where the method has one, restoration MSE (the contrastive losses
    of DiRA and CAiD rise while their queue of negatives fills, so their total says little)."""
    first, last = (history or [{}])[0], (history or [{}])[-1]
    return {"first_loss": first.get("loss"), "last_loss": last.get("loss"),
            "first_mse": first.get("mse"), "last_mse": last.get("mse")}


# ----------------------------------------------------------------------------------------------------- report

def table(records, args, arms) -> dict:
    """{variant: {k: {arm: {"mean", "std", "n"}}}}; interpolation is one deterministic value per k."""
    out = {}
    for variant in ("raw", "clean"):
        out[variant] = {}
        for k in args.ks:
            out[variant][str(k)] = {}
            for arm in [*arms, "interpolation"]:
                recs = [r for r in records if r["arm"] == arm and r["k"] == k and r.get("raw")]
                if arm == "interpolation":
                    vals = [r["raw"]["dice"] for r in recs]
                else:
                    vals = [(r.get(variant) or {}).get("dice") for r in recs]
                m, s, n = le.mean_std(vals)
                out[variant][str(k)][arm] = {"mean": m, "std": s, "n": n}
    return out


def markdown(tab, args, arms, pre) -> str:
    def cell(c):
        if c["mean"] is None:
            return "n/a"
        return f"{c['mean']:.3f}" if c["n"] <= 1 else f"{c['mean']:.3f} ± {c['std']:.3f}"

    lines = ["| method | pretraining wall s | loss first → last | restoration MSE first → last | "
             + " | ".join(f"k={k} raw | k={k} clean" for k in args.ks) + " |",
             "|---|---|---|---|" + "---|---|" * len(args.ks)]
    for arm in [*arms, "interpolation"]:
        p = pre.get(arm, {})
        wall = f"{p['seconds_wall']:.0f}" if p.get("seconds_wall") is not None and p.get("status") == "ok" else "—"
        loss = (f"{p['first_loss']:.3g} → {p['last_loss']:.3g}"
                if p.get("first_loss") is not None and p.get("last_loss") is not None else "—")
        mse = (f"{p['first_mse']:.3g} → {p['last_mse']:.3g}"
               if p.get("first_mse") is not None and p.get("last_mse") is not None else "—")
        cells = []
        for k in args.ks:
            raw, clean = tab["raw"][str(k)][arm], tab["clean"][str(k)][arm]
            cells += [cell(raw), "—" if arm == "interpolation" else cell(clean)]
        lines.append(f"| {arm} | {wall} | {loss} | {mse} | " + " | ".join(cells) + " |")
    lines += ["", (f"Spleen Dice on the unpainted axial slices of the MSD spleen2 crop, mean ± sample std over seeds "
              f"{args.seeds}. Every method: width {args.width}, {args.pretrain_steps} steps x {args.batch} cubes "
              f"{'x'.join(map(str, args.patch))}; every fine-tuning run {args.finetune_steps} steps. 'clean' = "
              "`predict --annotation` (components connected to the painted spleen). Interpolation with k = 1 is the "
              "painted slice alone (Dice 0).")]
    return "\n".join(lines) + "\n"


def plot(tab, args, arms, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.ks), figsize=(4 * len(args.ks), 4.2), dpi=110, squeeze=False, sharey=True)
    names = [*arms, "interpolation"]
    for ax, k in zip(axes[0], args.ks):
        for j, arm in enumerate(names):
            for variant, shift, marker in (("raw", -0.12, "o"), ("clean", 0.12, "s")):
                if arm == "interpolation" and variant == "clean":
                    continue
                c = tab[variant][str(k)][arm]
                if c["mean"] is None:
                    continue
                ax.errorbar(j + shift, c["mean"], yerr=c["std"] or 0.0, fmt=marker, capsize=3,
                            color="tab:blue" if variant == "raw" else "tab:orange",
                            label=variant if j == 0 else None)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"k = {k} painted slices")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("spleen Dice, unpainted slices")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main

def report_only(args, out: Path) -> int:
    """Rebuild the table, plot and summary from ``pretraining.json``, ``interpolation.json`` and
    ``runs.jsonl`` in ``out`` (loss summaries re-read from the bundles' histories)."""
    pre = json.loads((out / "pretraining.json").read_text(encoding="utf-8"))
    for rec in pre.values():
        model = Path(rec.get("bundle", "")) / "model.json"
        if rec.get("status") == "ok" and model.is_file():
            rec.update(loss_summary(json.loads(model.read_text(encoding="utf-8")).get("history") or []))
    records = json.loads((out / "interpolation.json").read_text(encoding="utf-8"))
    records += [json.loads(line) for line in (out / "runs.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    arms = ([] if args.no_scratch else ["scratch"]) + [m for m in args.methods if pre.get(m, {}).get("status") == "ok"]
    tab = table(records, args, arms)
    md = markdown(tab, args, arms, pre)
    (out / "table.md").write_text(md, encoding="utf-8")
    plot(tab, args, arms, out / "dice_by_method.png")
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    summary.update(pretraining=pre, dice=tab, report_rebuilt=True)
    le.emit(out, md, summary)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out.resolve()
    if args.report:
        return report_only(args, out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"output folder {out}")
    hw, git = le.hardware(), le.git_state()
    volumes = check_sources(args)
    spec = ark_spec(args, out) if "ark" in args.methods else None
    pre = {m: pretrain_one(args, out, m, volumes, spec) for m in args.methods}
    (out / "pretraining.json").write_text(json.dumps(pre, indent=2), encoding="utf-8")
    image_path, truth, spacing, classes, targets, extent = le.write_target(args, out)
    log("painted slices: " + "; ".join(f"k={t['k']}: {t['painted']}" for t in targets.values()))
    records = le.interpolation_baseline(truth, spacing, targets, out)
    arms = ([] if args.no_scratch else ["scratch"]) + [m for m in args.methods if pre[m].get("status") == "ok"]
    inits = {"scratch": "none", **{m: pre[m]["bundle"] for m in arms if m != "scratch"}}
    le.VERIFY["pending"] = False
    jsonl = out / "runs.jsonl"
    jsonl.write_text("", encoding="utf-8")
    skipped = []
    for seed in args.seeds:
        for target in targets.values():
            for arm in arms:
                if args.deadline is not None and time.monotonic() - started > args.deadline * 60:
                    skipped.append(f"{arm}_k{target['k']}_s{seed}")
                    continue
                rec = le.run_one(args, out, arm, target, seed, image_path, truth, spacing, classes, inits[arm], extent)
                records.append(rec)
                with open(jsonl, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
    if skipped:
        log(f"deadline reached: {len(skipped)} run(s) not started: {', '.join(skipped)}")
    tab = table(records, args, arms)
    md = markdown(tab, args, arms, pre)
    (out / "table.md").write_text(md, encoding="utf-8")
    plot(tab, args, arms, out / "dice_by_method.png")
    failed = [f"{r['arm']}_k{r['k']}_s{r['seed']}: {r.get('status')}" for r in records
              if r["arm"] != "interpolation" and r.get("status") != "ok"]
    failed += [f"pretrain {m}: {p['status']}" for m, p in pre.items() if p.get("status") != "ok"]
    summary = {
        "benchmark": "methods_label_efficiency", "quick": args.quick, "hardware": hw, "git": git,
        "load_average_end": le.load_average(),
        "data": {"evaluation_image": le.EVAL_IMAGE, "evaluation_label": le.EVAL_LABEL + " (expert, MSD labelsTr)",
                 "spleen_slices": list(extent), "painted": {k: t["painted"] for k, t in targets.items()},
                 "pretraining_volumes": [str(p.relative_to(args.data_root)) for p in volumes],
                 "ark_datasets": [d[0] for d in ARK_DATASETS] if spec else None},
        "budget": {"width": args.width, "patch": list(args.patch), "batch": args.batch,
                   "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                   "threads": args.threads, "seeds": args.seeds, "ks": args.ks},
        "pretraining": pre,
        "dice": tab, "failed": failed, "skipped_runs": skipped,
        "files": {"folder": str(out), "table": str(out / "table.md"), "plot": str(out / "dice_by_method.png"),
                  "runs": str(jsonl)},
        "seconds_total": round(time.monotonic() - started, 1),
    }
    le.emit(out, md, summary)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
