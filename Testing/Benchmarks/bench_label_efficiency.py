"""Label-efficiency benchmark on real data (issue #3 item 9): does Models Genesis pretraining help
few-shot segmentation of a real scan, and does it beat interpolating between the painted slices?

Run from the repository root (no installation needed)::

    python Testing/Benchmarks/bench_label_efficiency.py --quick          # smoke run, a few minutes
    python Testing/Benchmarks/bench_label_efficiency.py                  # the study (about 45 min on 2 CPU cores)
    python Testing/Benchmarks/bench_label_efficiency.py --pretrain-time 900 --finetune-time 90 --seeds 0 1 2 --ks 1 3 5

The study, run like one:

1. **Pretraining** (``medssl pretrain``, Models Genesis) on the unlabeled CTs of ``../shared/data``
   (``--data-root``): the ITKElastix thorax CT, TotalSegmentator's abdominal CT and its DICOM series,
   the aorta and pulmonary CTA crops. The evaluation scan (``msd_spleen_ivadomed/``) is left out, and
   the script refuses to start if any pretraining path lies under its folder. ``--pretrain-width``
   (default 8), ``--pretrain-patch`` (64 64 32, as Models Genesis), ``--pretrain-time`` (seconds).
2. **Target**: the MSD spleen crop ``sub-spleen2_ct`` (164x166x26, 0.8x0.8x5 mm) and its expert mask.
   ``k`` (``--ks``, default 1 3 5) axial slices are "painted": evenly spaced through the spleen's extent
   (:func:`MedSSL.commands.demo.paint_slices`, the same picks for every arm and seed), every other slice
   255 (not annotated). A ``full`` row fine-tunes on the whole mask (``--no-full`` to skip).
3. **Arms**, each fine-tuned with ``medssl finetune`` for the same wall-clock budget (``--finetune-time``)
   and every seed in ``--seeds``, product defaults otherwise (automatic patch, batch 2, augmentation):

   * ``scratch``: ``--init none --width W`` with W = the pretraining width (same network as ``pretrained``);
   * ``pretrained``: ``--init <our pretraining bundle>``;
   * ``official``: ``--init`` a synthetic file laid out exactly like the official ``Genesis_Chest_CT.pt``
     (``Testing/Python/medssl_testing.official_checkpoint``, width 32). There is NO real official
     checkpoint in this repository or on this machine: these are random weights in the official layout,
     so this arm tests the loading path and the cost of the official width-32 network under the same
     time budget, not the published pretraining. ``--official-finetune-time`` can give it its own budget.
4. **Prediction** of the whole volume (``medssl predict``), once as is (``raw``) and once with
   ``--annotation <painted label>`` (``clean``: keep the components connected to the painted spleen).
5. **Scoring** (:func:`MedSSL.tasks.evaluate.segmentation_metrics`): Dice of the spleen on the slices NOT
   painted (painted slices set to 255 in the truth). The ``full`` row is scored on all slices: it is
   TRAINING-SET Dice (the network saw every slice), an upper reference, not generalisation; its ``clean``
   column is not computed (the clean-up would copy the truth).
6. **Baseline**: shape-based (signed-distance) interpolation between the painted slices
   (:func:`MedSSL.tasks.evaluate.interpolate_between_slices`), scored the same way. With k = 1 there is
   nothing to interpolate: the result is the painted slice alone, so its Dice on the other slices is 0.

Outputs in ``--out`` (default ``Testing/Benchmarks/results/label_efficiency/``, ``..._quick/`` with
``--quick``; git-ignored: results, painted labels and weights are never committed): ``runs.jsonl`` and
``runs/<arm>_k<k>_s<seed>/result.json`` (one record per run), ``table.md`` (mean +- std Dice over
seeds), ``dice_vs_k.png``, ``summary.json``. Fine-tuned weights are deleted after scoring unless
``--keep-models``. ``--resume`` re-uses the per-run results already in ``--out`` (and the pretrained
bundle when it is complete).

Every medssl command runs in this process (``MedSSL.commands.cli.main``), so torch is imported once; each
command's own output goes to ``<run>/log.txt``. Progress goes to stderr; the LAST line on stdout is one
JSON object with the summary (hardware, budgets, the table's numbers, where the files are).

Wall-clock budgets on a shared CPU: ``--max-time`` is wall time, so other busy processes cost an arm
steps; every record carries the steps done and the load average, compare them before reading the
table. ``--deadline`` (minutes) stops starting new fine-tuning runs once that much time has passed;
runs are ordered seed by seed, so a cut-off loses whole seeds, and the summary says which runs are
missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: OpenMP threads wait passively

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "Testing" / "Python"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np

DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout
EVAL_FOLDER = "msd_spleen_ivadomed"
EVAL_IMAGE = "msd_spleen_ivadomed/sub-spleen2_ct.nii.gz"
EVAL_LABEL = "msd_spleen_ivadomed/sub-spleen2_ct_seg-manual.nii.gz"
PRETRAIN_DATA = [
    "itkelastix_thorax_ct/thorax_ct_00_2xdown.nii.gz",
    "totalseg_examples/example_ct.nii.gz",  # example_ct_sm is its first 30 slices: left out as a duplicate
    "totalseg_examples/example_ct_dicom",  # a DICOM series folder
    "totalseg_examples/aorta_report/ct_cropped.nii.gz",
    "totalseg_examples/pulmonary_report/ct_cropped.nii.gz",
]
ARMS = ("scratch", "pretrained", "official")
ARM_TITLES = {"scratch": "scratch", "pretrained": "pretrained (ours)", "official": "official-format init",
              "interpolation": "interpolation"}
DEFAULT_OUT = ROOT / "Testing" / "Benchmarks" / "results" / "label_efficiency"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: pretrain 60 s, fine-tune 15 s, k = 3 only (no full row), seed 0 (about 6 min on 2 busy cores)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT.relative_to(ROOT)}/, "
                   "with --quick ..._quick/)")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT, help=f"the shared data folder (default {DATA_ROOT})")
    p.add_argument("--pretrain-time", type=float, default=None, metavar="S", help="pretraining budget in seconds (default 540; quick 60)")
    p.add_argument("--pretrain-width", type=int, default=8, help="U-Net width of our pretraining and of the scratch arm (default 8)")
    p.add_argument("--pretrain-patch", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"),
                   help="pretraining cube (default 64 64 32, as Models Genesis)")
    p.add_argument("--pretrain-batch", type=int, default=4, help="pretraining cubes per step (default 4)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps (default: as many as fit --pretrain-time, measured by a 4-step timing run)")
    p.add_argument("--cache", type=Path, default=DEFAULT_OUT.parent / "cube_cache",
                   help="pretraining cube cache (default Testing/Benchmarks/results/cube_cache, shared by runs)")
    p.add_argument("--pretrained-bundle", type=Path, default=None,
                   help="use this pretraining bundle instead of pretraining (its data must not include the evaluation scan)")
    p.add_argument("--finetune-time", type=float, default=None, metavar="S", help="fine-tuning budget per run in seconds (default 50; quick 15)")
    p.add_argument("--official-finetune-time", type=float, default=None, metavar="S",
                   help="budget of the official-format (width 32) arm (default: --finetune-time, the equal-budget comparison)")
    p.add_argument("--official-seeds", type=int, nargs="+", default=None,
                   help="seeds of the official-format arm (default: the first of --seeds only; width 32 costs about "
                        "3 min per run on 2 shared cores, mostly prediction)")
    p.add_argument("--verify-cleanup", action=argparse.BooleanOptionalAction, default=True,
                   help="once, run `medssl predict --annotation` and check it equals the in-process clean-up (default on)")
    p.add_argument("--official-width", type=int, default=32, help="width of the official-format file (default 32, as the official one)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="painted slice counts (default 1 3 5; quick 3)")
    p.add_argument("--no-full", action="store_true", help="skip the fine-tuning on the full label")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default 0 1 2; quick 0)")
    p.add_argument("--full-seeds", type=int, nargs="+", default=None,
                   help="seeds of the full-label row (default: all of --seeds)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which initialisations (default all three)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads per command (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda/auto")
    p.add_argument("--deadline", type=float, default=None, metavar="MIN",
                   help="start no new fine-tuning run after this many minutes from the start (default: none)")
    p.add_argument("--keep-models", action="store_true", help="keep the fine-tuned weights (default: delete after scoring)")
    p.add_argument("--resume", action="store_true", help="re-use per-run results and the pretrained bundle found in --out")
    args = p.parse_args(argv)
    quick = args.quick
    if args.pretrain_time is None:
        args.pretrain_time = 60.0 if quick else 540.0
    if args.finetune_time is None:
        args.finetune_time = 15.0 if quick else 50.0
    if args.official_finetune_time is None:
        args.official_finetune_time = args.finetune_time
    if args.ks is None:
        args.ks = [3] if quick else [1, 3, 5]
    if args.seeds is None:
        args.seeds = [0] if quick else [0, 1, 2]
    if quick:
        args.no_full = True
    if args.official_seeds is None:
        args.official_seeds = args.seeds[:1]
    if args.full_seeds is None:
        args.full_seeds = list(args.seeds)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name(DEFAULT_OUT.name + "_quick") if quick else DEFAULT_OUT
    if any(k < 1 for k in args.ks):
        p.error("--ks: slice counts must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------------- helpers

def hardware() -> dict:
    import torch

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or None, "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state() -> dict:
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True, timeout=20, encoding="utf-8").stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "MedSSL")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "last_finetune_commit": git("log", "-1", "--format=%h %ci %s", "--", "MedSSL/tasks/finetune", "MedSSL/tasks/infer"),
            "MedSSL_uncommitted_changes": bool(dirty), "MedSSL_uncommitted_files": dirty.splitlines() if dirty else []}


def medssl(argv: list[str], logfile: Path) -> tuple[int, float]:
    """Run one medssl command in this process, its stdout/stderr appended to ``logfile``; (status, seconds)."""
    from MedSSL.commands.cli import main

    logfile.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(logfile, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        fh.write(f"$ medssl {' '.join(argv)}\n")
        fh.flush()
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse errors
            status = int(exc.code or 0) if isinstance(exc.code, int) else 2
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the study goes on
            import traceback

            traceback.print_exc(file=fh)
            status = 1
            fh.write(f"{exc.__class__.__name__}: {exc}\n")
    return status, time.monotonic() - start


def dice_scores(pred: np.ndarray, truth: np.ndarray, spacing, painted: list[int], between: tuple | None) -> dict:
    """Spleen Dice (and HD95) on the unpainted slices; ``dice_between``: only the unpainted slices between
    the first and last painted one (where interpolation can answer)."""
    from MedSSL.tasks.evaluate import segmentation_metrics

    scored = truth.copy()
    scored[:, :, painted] = 255
    m = segmentation_metrics(pred, scored, spacing, labels=[1])["per_class"]["1"]
    out = {"dice": m["dice"], "hd95_mm": m["hd95_mm"], "pred_voxels": m["pred_voxels"], "truth_voxels": m["truth_voxels"]}
    if between is not None:
        inner = np.full(truth.shape, 255, np.uint8)
        lo, hi = between
        inner[:, :, lo:hi + 1] = truth[:, :, lo:hi + 1]
        inner[:, :, painted] = 255
        out["dice_between"] = segmentation_metrics(pred, inner, spacing, labels=[1])["per_class"]["1"]["dice"]
    return out


def emit(out: Path, md: str, summary: dict) -> None:
    """Write ``summary.json`` in ``out``, the table to stderr, and the summary as the LAST stdout line."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(md, file=sys.stderr)
    print(json.dumps(summary), flush=True)


def mean_std(values):
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


# ----------------------------------------------------------------------------------------------------- stages

def pretrain(args, out: Path, hw_log) -> dict:
    data_root = args.data_root.resolve()
    eval_folder = (data_root / EVAL_FOLDER).resolve()
    if args.pretrained_bundle is not None:
        bundle = args.pretrained_bundle
        info = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
        return {"bundle": str(bundle), "reused": True, "width": info.get("architecture", {}).get("width"),
                "note": "given with --pretrained-bundle; its data were not checked by this script"}
    paths = [data_root / p for p in PRETRAIN_DATA]
    for p in paths:
        if not p.exists():
            raise SystemExit(f"pretraining data missing: {p}")
        if eval_folder == p.resolve() or eval_folder in p.resolve().parents:
            raise SystemExit(f"refusing to pretrain on the evaluation scan's folder: {p}")
    bundle = out / "pretrained"
    result_file = out / "pretrain_result.json"
    if args.resume and (bundle / "model.json").is_file() and result_file.is_file():
        log(f"pretraining: re-using {bundle}")
        return {**json.loads(result_file.read_text(encoding="utf-8")), "reused": True}
    if bundle.exists():
        shutil.rmtree(bundle)
    common = ["pretrain", "--data", *map(str, paths), "--method", "genesis",
              "--width", str(args.pretrain_width), "--patch", *map(str, args.pretrain_patch),
              "--batch-size", str(args.pretrain_batch), "--cache", str(args.cache), "--seed", "0",
              "--device", args.device, "--progress", "none", "--threads", str(args.threads)]
    load_before = load_average()
    timing = None
    steps = args.pretrain_steps
    if steps is None:
        # Time a few steps, then give --steps explicitly: the budget becomes a step count, the same
        # schedule for every run (`--max-time` alone schedules by elapsed time, which depends on load).
        timing_dir = out / "pretrain_timing"
        if timing_dir.exists():
            shutil.rmtree(timing_dir)
        n_timing = 5
        log(f"pretraining: timing {n_timing} steps (also fills the cube cache)")
        timing_log = out / "pretrain_timing_log.txt"
        timing_log.unlink(missing_ok=True)
        argv = [*common, "--out", str(timing_dir), "--steps", str(n_timing)]
        argv[argv.index("--progress") + 1] = "json"
        status, seconds = medssl(argv, timing_log)
        if status != 0:
            raise SystemExit(f"pretraining timing run failed (exit {status}); see {timing_log}")
        tmeta = json.loads((timing_dir / "model.json").read_text(encoding="utf-8"))["training"]
        per_step = float(tmeta["seconds"]) / max(1, int(tmeta["steps"]))
        # steady-state time per step from the JSON progress (elapsed = eta * step / (total - step)): the
        # first step also loads the cubes, which a long run pays once
        elapsed = {}
        for line in timing_log.read_text(encoding="utf-8").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == "progress" and ev.get("eta_s") is not None \
                    and 0 < ev.get("step", 0) < ev.get("total", 0):
                elapsed[int(ev["step"])] = float(ev["eta_s"]) * ev["step"] / (ev["total"] - ev["step"])
        if len(elapsed) >= 2:
            first, last = min(elapsed), max(elapsed)
            per_step = (elapsed[last] - elapsed[first]) / (last - first)
        steps = max(2, int(args.pretrain_time / per_step))
        timing = {"steps": tmeta["steps"], "seconds": tmeta["seconds"], "seconds_wall": round(seconds, 1),
                  "seconds_per_step_steady": round(per_step, 3), "progress_points": len(elapsed)}
        shutil.rmtree(timing_dir, ignore_errors=True)
    guard = args.pretrain_time * 1.25 + 30
    log(f"pretraining Models Genesis, width {args.pretrain_width}, {steps} steps (budget {args.pretrain_time:g} s, "
        f"stopped at {guard:g} s at the latest) on {len(paths)} unlabeled CTs")
    argv = [*common, "--out", str(bundle), "--steps", str(steps), "--max-time", str(guard)]
    status, seconds = medssl(argv, out / "pretrain_log.txt")
    if status != 0 or not (bundle / "model.json").is_file():
        raise SystemExit(f"pretraining failed (exit {status}); see {out / 'pretrain_log.txt'}")
    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    training = meta.get("training", {})
    result = {"bundle": str(bundle), "reused": False, "method": "genesis", "width": args.pretrain_width,
              "patch": list(args.pretrain_patch), "batch_size": args.pretrain_batch, "max_time_s": args.pretrain_time,
              "steps_planned": steps, "timing_run": timing, "final_loss": (meta.get("history") or [{}])[-1].get("loss"),
              "first_loss": (meta.get("history") or [{}])[0].get("loss"),
              "data": [str(Path(p).relative_to(data_root)) for p in paths], "evaluation_scan_excluded": EVAL_IMAGE,
              "seconds_wall": round(seconds, 1), "steps": training.get("steps", meta.get("steps")),
              "stopped_by": training.get("stopped_by"), "best_val_loss": training.get("best_val_loss"),
              "load_average_before": load_before, "load_average_after": load_average()}
    result_file.write_text(json.dumps(result, indent=2), encoding="utf-8")
    log(f"pretraining done: {result['steps']} steps in {seconds:.0f} s (stopped by {result['stopped_by']})")
    return result


def official_file(args, out: Path) -> Path:
    from medssl_testing import official_checkpoint

    path = out / f"synthetic_Genesis_Chest_CT_layout_w{args.official_width}.pt"
    if not path.is_file():
        official_checkpoint(path, width=args.official_width, seed=0)
    return path


def write_target(args, out: Path):
    """Painted labels for every k (same picks for every arm), the class file, truth and geometry."""
    from MedSSL.commands.demo import paint_slices
    from MedSSL.io.volumes import read_volume, write_volume

    image_path = args.data_root / EVAL_IMAGE
    label = read_volume(args.data_root / EVAL_LABEL)
    truth = (label.array == 1).astype(np.uint8)
    data = out / "target"
    data.mkdir(parents=True, exist_ok=True)
    classes = data / "spleen.classes.json"
    classes.write_text(json.dumps({"1": {"name": "spleen", "color": [0.62, 0.31, 0.54]}}), encoding="utf-8")
    extent = np.flatnonzero(truth.any(axis=(0, 1)))
    targets = {}
    for k in args.ks:
        sparse, picks = paint_slices(truth, [1], k)
        path = data / f"painted_k{k}.nii.gz"
        write_volume(label.with_array(sparse), path)
        targets[str(k)] = {"k": k, "label": path, "painted": picks}
    if not args.no_full:
        path = data / "full_label.nii.gz"
        write_volume(label.with_array(truth), path)
        targets["full"] = {"k": "full", "label": path, "painted": []}
    return image_path, truth, label.spacing, classes, targets, (int(extent[0]), int(extent[-1]))


def interpolation_baseline(truth, spacing, targets, out: Path) -> list[dict]:
    from MedSSL.tasks.evaluate import interpolate_between_slices
    from MedSSL.io.volumes import read_volume

    records = []
    for key, t in targets.items():
        if key == "full":
            continue
        sparse = read_volume(t["label"]).array
        start = time.monotonic()
        filled = interpolate_between_slices(sparse, axis=2, spacing=spacing)
        seconds = time.monotonic() - start
        picks = t["painted"]
        scores = dice_scores(filled, truth, spacing, picks, (min(picks), max(picks)) if len(picks) > 1 else None)
        rec = {"arm": "interpolation", "k": t["k"], "seed": None, "painted_slices": picks,
               "raw": scores, "clean": None, "seconds_interpolate": round(seconds, 3),
               "note": "k = 1: nothing to interpolate, the painted slice alone (Dice 0 on the other slices)" if len(picks) < 2 else None}
        records.append(rec)
        log(f"interpolation k={t['k']}: Dice {scores['dice']:.3f} on the unpainted slices")
    (out / "interpolation.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    return records


VERIFY = {"pending": False}


def run_one(args, out: Path, arm: str, target: dict, seed: int, image_path: Path, truth, spacing, classes: Path,
            init: str, extent) -> dict:
    from MedSSL.io.volumes import read_volume

    name = f"{arm}_k{target['k']}_s{seed}"
    run_dir = out / "runs" / name
    result_file = run_dir / "result.json"
    if args.resume and result_file.is_file():
        rec = json.loads(result_file.read_text(encoding="utf-8"))
        if rec.get("status") == "ok":
            log(f"{name}: re-using the result in {result_file}")
            return rec
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    bundle, logfile = run_dir / "model", run_dir / "log.txt"
    budget = args.official_finetune_time if arm == "official" else args.finetune_time
    steps = getattr(args, "finetune_steps", None)  # bench_methods: a step budget instead of wall time
    limit = ["--steps", str(steps)] if steps else ["--max-time", str(budget)]
    # --engine network: these arms compare initialisations of the fine-tuned U-Net (a painted image alone
    # would otherwise go to the few-shot engine, which has no network to initialise; see bench_fewshot)
    argv = ["finetune", "--engine", "network", "--image", str(image_path), "--label", str(target["label"]),
            "--classes", str(classes), "--out", str(bundle), "--init", init, *limit, "--seed", str(seed),
            "--device", args.device, "--progress", "none", "--threads", str(args.threads)]
    if arm == "scratch":
        argv += ["--width", str(args.pretrain_width)]
    rec = {"arm": arm, "k": target["k"], "seed": seed, "painted_slices": target["painted"], "init": Path(init).name if init != "none" else "none",
           "finetune_budget_s": None if steps else budget, "finetune_steps_budget": steps,
           "load_average_before": load_average()}
    log(f"{name}: fine-tuning for " + (f"{steps} steps" if steps else f"{budget:g} s"))
    status, seconds = medssl(argv, logfile)
    rec["seconds_finetune_wall"] = round(seconds, 1)
    if status != 0 or not (bundle / "model.json").is_file():
        rec.update(status=f"finetune failed (exit {status})")
        result_file.write_text(json.dumps(rec, indent=2), encoding="utf-8")
        log(f"{name}: fine-tuning FAILED (exit {status}); see {logfile}")
        return rec
    meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    training = meta.get("training", {})
    rec.update(width=meta.get("architecture", {}).get("width"), patch=meta.get("patch_size"), steps=training.get("steps"),
               stopped_by=training.get("stopped_by"), training_seconds=training.get("seconds"),
               batch_size=training.get("batch_size"), batchnorm=meta.get("batchnorm"))
    painted = target["painted"]
    between = (min(painted), max(painted)) if len(painted) > 1 else None
    predict = ["predict", "--model", str(bundle), "--image", str(image_path), "--device", args.device,
               "--progress", "none", "--threads", str(args.threads)]
    pred_path = run_dir / "prediction_raw.nii.gz"
    status, seconds = medssl([*predict, "--out", str(pred_path)], logfile)
    rec["seconds_predict"] = round(seconds, 1)
    if status != 0:
        rec.update(status=f"predict failed (exit {status})")
    else:
        pred = read_volume(pred_path).array
        rec["raw"] = dice_scores(pred, truth, spacing, painted, between)
        rec["status"] = "ok"
        if target["k"] != "full":
            # `predict --annotation` = the same sliding-window prediction, then exactly this function on the
            # labels (MedSSL.tasks.infer.predict.segment): applied here to save a second ~10-100 s prediction.
            from MedSSL.tasks.infer.postprocess import keep_connected_to_annotation
            from MedSSL.io.volumes import write_volume

            painted_map = read_volume(target["label"]).array
            clean = keep_connected_to_annotation(pred, painted_map)
            write_volume(read_volume(pred_path).with_array(clean), run_dir / "prediction_clean.nii.gz")
            rec["clean"] = dice_scores(clean, truth, spacing, painted, between)
            rec["clean_via"] = "MedSSL.tasks.infer.postprocess.keep_connected_to_annotation on the raw prediction"
            if VERIFY["pending"]:
                cli_path = run_dir / "prediction_clean_cli.nii.gz"
                status, seconds = medssl([*predict, "--out", str(cli_path), "--annotation", str(target["label"])], logfile)
                same = status == 0 and np.array_equal(read_volume(cli_path).array, clean)
                VERIFY.update(pending=False, run=name, identical=bool(same), seconds_cli=round(seconds, 1))
                rec["clean_cli_identical"] = bool(same)
                log(f"{name}: `predict --annotation` {'matches' if same else 'DIFFERS FROM'} the in-process clean-up")
    if target["k"] == "full":
        rec["scoring"] = "all slices: training-set Dice (every slice was a training label)"
        rec["clean"] = None
    rec["load_average_after"] = load_average()
    if not args.keep_models:
        for f in bundle.glob("*"):
            if f.suffix in (".safetensors", ".pt", ".pth") or f.name.startswith("checkpoint"):
                f.unlink() if f.is_file() else shutil.rmtree(f, ignore_errors=True)
    result_file.write_text(json.dumps(rec, indent=2), encoding="utf-8")
    raw, clean = rec.get("raw") or {}, rec.get("clean") or {}
    log(f"{name}: {rec.get('steps')} steps; Dice raw {raw.get('dice', float('nan')):.3f}"
        + (f", clean {clean.get('dice', float('nan')):.3f}" if clean else "") + f" [{rec['status']}]")
    return rec


# ----------------------------------------------------------------------------------------------------- report

def summarise(records, args):
    """{row: {column: {"mean", "std", "n"}}} for the raw and clean predictions."""
    rows = [str(k) for k in args.ks] + ([] if args.no_full else ["full"])
    columns = list(args.arms) + ["interpolation"]
    table = {}
    for variant in ("raw", "clean"):
        table[variant] = {}
        for row in rows:
            table[variant][row] = {}
            for col in columns:
                recs = [r for r in records if r["arm"] == col and str(r["k"]) == row and r.get("raw")]
                if col == "interpolation":
                    vals = [r["raw"]["dice"] for r in recs]
                elif variant == "clean" and row != "full":
                    vals = [r["clean"]["dice"] for r in recs if r.get("clean")]
                else:  # full row: no clean-up (it would copy the truth): show the raw prediction
                    vals = [r["raw"]["dice"] for r in recs]
                m, s, n = mean_std(vals)
                table[variant][row][col] = {"mean": m, "std": s, "n": n}
    return rows, columns, table


def markdown(rows, columns, table, args, records, extent) -> str:
    def cell(c):
        if c["mean"] is None:
            return "n/a"
        if c["n"] <= 1:
            return f"{c['mean']:.3f}" + (" (1 run)" if c["n"] == 1 and c.get("seeded", True) else "")
        return f"{c['mean']:.3f} ± {c['std']:.3f}"

    def row_name(row):
        if row == "full":
            return "full (all slices; training-set Dice)"
        picks = next((r["painted_slices"] for r in records if str(r["k"]) == row), [])
        return f"{row} (slices {', '.join(map(str, picks))})"

    lines = []
    for variant, title in (("raw", "Prediction as is (`medssl predict`)"),
                           ("clean", "With the few-shot clean-up (`medssl predict --annotation <painted label>`)")):
        lines += [f"### {title}", "", "| k painted slices | " + " | ".join(ARM_TITLES[c] for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for row in rows:
            cells = []
            for col in columns:
                c = dict(table[variant][row][col])
                c["seeded"] = col != "interpolation"
                if col == "interpolation" and row == "full":
                    cells.append("—")
                elif col == "interpolation":
                    cells.append("n/a" if c["mean"] is None else f"{c['mean']:.3f}")
                else:
                    cells.append(cell(c))
            lines.append(f"| {row_name(row)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Spleen Dice on the axial slices that were not painted, mean ± sample std over seeds {args.seeds} "
                 f"(interpolation is deterministic: one value). The spleen spans slices {extent[0]}-{extent[1]} of 26. "
                 f"Fine-tuning budget {args.finetune_time:g} s wall per run (official-format arm "
                 f"{args.official_finetune_time:g} s). The 'full' row is training-set Dice and has no clean-up "
                 "(it would copy the truth). Interpolation with k = 1 is the painted slice alone.")
    return "\n".join(lines) + "\n"


def plot(rows, columns, table, records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    labels = [r if r != "full" else "full\n(train Dice)" for r in rows]
    colors = {"scratch": "tab:gray", "pretrained": "tab:blue", "official": "tab:orange", "interpolation": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for col in columns:
        for variant, style in (("raw", "-"), ("clean", "--")):
            if col == "interpolation" and variant == "clean":
                continue
            means = [table[variant][r][col]["mean"] for r in rows]
            stds = [table[variant][r][col]["std"] or 0.0 for r in rows]
            keep = [i for i, m in enumerate(means) if m is not None and not (col == "interpolation" and rows[i] == "full")]
            if variant == "clean":
                keep = [i for i in keep if rows[i] != "full"]
            if not keep:
                continue
            label = ARM_TITLES[col] + ("" if col == "interpolation" else f" ({variant})")
            ax.errorbar(x[keep], [means[i] for i in keep], yerr=[stds[i] for i in keep], fmt="o" + style,
                        color=colors[col], capsize=3, label=label, alpha=1.0 if variant == "raw" else 0.7)
    ax.set_xticks(x, labels)
    ax.set_xlabel("painted axial slices k")
    ax.set_ylabel("spleen Dice on unpainted slices")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Label efficiency: MSD spleen2 crop (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log(f"output folder {out}")
    hw = hardware()
    git = git_state()
    pre = pretrain(args, out, None)
    official = official_file(args, out) if "official" in args.arms else None
    image_path, truth, spacing, classes, targets, extent = write_target(args, out)
    log("painted slices: " + "; ".join(f"k={t['k']}: {t['painted']}" for t in targets.values() if t["k"] != "full"))
    records = interpolation_baseline(truth, spacing, targets, out)
    inits = {"scratch": "none", "pretrained": pre["bundle"], "official": str(official) if official else None}
    VERIFY["pending"] = bool(args.verify_cleanup) and any(k != "full" for k in targets)
    jsonl = out / "runs.jsonl"
    jsonl.write_text("", encoding="utf-8")
    skipped = []
    # order: scratch and pretrained seed by seed, then the costly official-format (width 32) runs, so a
    # --deadline cut loses whole seeds or official runs first, never one arm of the main comparison
    plan = []
    for seed in args.seeds:
        for key, target in targets.items():
            if key == "full" and seed not in args.full_seeds:
                continue
            plan += [(arm, target, seed) for arm in args.arms if arm != "official"]
    if "official" in args.arms:
        plan += [("official", target, seed) for seed in args.official_seeds for key, target in targets.items()
                 if key != "full" or seed in args.full_seeds]
    for arm, target, seed in plan:
        if args.deadline is not None and time.monotonic() - started > args.deadline * 60:
            skipped.append(f"{arm}_k{target['k']}_s{seed}")
            continue
        rec = run_one(args, out, arm, target, seed, image_path, truth, spacing, classes, inits[arm], extent)
        records.append(rec)
        with open(jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
    if skipped:
        log(f"deadline reached: {len(skipped)} run(s) not started: {', '.join(skipped)}")
    rows, columns, table = summarise(records, args)
    md = markdown(rows, columns, table, args, records, extent)
    (out / "table.md").write_text(md, encoding="utf-8")
    plot(rows, columns, table, records, out / "dice_vs_k.png")
    failed = [f"{r['arm']}_k{r['k']}_s{r['seed']}: {r.get('status')}" for r in records
              if r["arm"] != "interpolation" and r.get("status") != "ok"]
    per_run_steps = {}
    for r in records:
        if r["arm"] != "interpolation" and r.get("steps") is not None:
            per_run_steps.setdefault(r["arm"], []).append(r["steps"])
    summary = {
        "benchmark": "label_efficiency", "quick": args.quick, "hardware": hw, "git": git,
        "load_average_end": load_average(),
        "data": {"evaluation_image": EVAL_IMAGE, "evaluation_label": EVAL_LABEL + " (expert, MSD labelsTr)",
                 "spleen_slices": list(extent), "painted": {k: t["painted"] for k, t in targets.items() if k != "full"},
                 "pretraining": pre.get("data"), "evaluation_scan_in_pretraining": False},
        "budgets": {"pretrain_time_s": args.pretrain_time, "pretrain_width": pre.get("width"),
                    "pretrain_patch": list(args.pretrain_patch), "pretrain_batch": args.pretrain_batch,
                    "pretrain_steps": pre.get("steps"), "pretrain_seconds_wall": pre.get("seconds_wall"),
                    "finetune_time_s": args.finetune_time, "official_finetune_time_s": args.official_finetune_time,
                    "scratch_width": args.pretrain_width, "official_width": args.official_width,
                    "threads": args.threads, "seeds": args.seeds, "official_seeds": args.official_seeds, "full_seeds": args.full_seeds, "ks": args.ks, "full": not args.no_full,
                    "finetune_steps_per_arm": {a: {"min": min(v), "max": max(v), "mean": round(float(np.mean(v)), 1)}
                                               for a, v in per_run_steps.items()}},
        "official_init_note": "synthetic random weights in the official Genesis_Chest_CT.pt layout (no real official "
                              "checkpoint available): tests the loading path and the width-32 cost, not the published pretraining",
        "scoring": "spleen Dice on unpainted axial slices (painted slices 255 in the truth); full row = training-set Dice",
        "dice": {v: {row: {col: table[v][row][col] for col in columns} for row in rows} for v in table},
        "cleanup_check": {k: v for k, v in VERIFY.items() if k != "pending"} or None,
        "failed_runs": failed, "skipped_runs": skipped,
        "files": {"folder": str(out), "table": str(out / "table.md"), "plot": str(out / "dice_vs_k.png"),
                  "runs": str(jsonl), "summary": str(out / "summary.json")},
        "seconds_total": round(time.monotonic() - started, 1),
    }
    emit(out, md, summary)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
