"""``medssl demo``: the main job end to end on seeded phantoms, nothing downloaded.

1. writes a few CT-like phantoms (:mod:`MedSSL.data.phantom`) as NIfTI files;
2. pretrains Models Genesis on the unlabeled ones;
3. paints a few axial slices of the liver and spleen of another phantom (the rest 255 = not annotated);
4. completes the painting with the few-shot engine (``medssl finetune`` on the painting, then
   ``medssl predict --annotation``; :mod:`MedSSL.tasks.fewshot`);
5. scores the slices that were not painted, next to Slicer's "Fill between slices" baseline (shape
   interpolation between the same slices), prints the Dice and writes ``demo.png``: a few axial
   slices with the painted contours, the prediction and the truth.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


#: phantoms of 64 x 64 x 40 voxels at 3 x 3 x 4.5 mm and 32 x 32 x 16 patches: minutes on a laptop CPU
PHANTOM = {"shape": (64, 64, 40), "spacing": (3.0, 3.0, 4.5)}
PATCH = ["32", "32", "16"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="pretrain, fine-tune on a few painted slices, predict and evaluate on phantoms")
    p.add_argument("--out", type=Path, default=Path("medssl-demo"), help="output folder (default ./medssl-demo)")
    p.add_argument("--volumes", type=int, default=4, help="unlabeled phantoms to pretrain on (default 4)")
    p.add_argument("--pretrain-time", type=float, default=60.0, metavar="SECONDS", help="pretraining budget (default 60 s)")
    p.add_argument("--finetune-time", type=float, default=60.0, metavar="SECONDS",
                   help="kept for scripts: the few-shot engine needs a few seconds and ignores it")
    p.add_argument("--slices", type=int, default=5, help="painted axial slices (default 5)")
    p.add_argument("--width", type=int, default=8, help="U-Net base width (default 8: fast on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", choices=("bar", "json", "none"), default=None)
    p.set_defaults(run=run)


def _say(args, message: str) -> None:
    if args.progress != "json":
        print(message, flush=True)


def _sub(args, argv: list[str]) -> None:
    """Run another medssl command in this process; its errors stop the demo."""
    from MedSSL.commands.cli import main
    from MedSSL.errors import MedSSLError

    progress = args.progress or ("bar" if sys.stderr.isatty() else "none")
    status = main([*argv, "--device", args.device, "--seed", str(args.seed), "--progress", progress])
    if status != 0:
        raise MedSSLError(f"demo step `medssl {argv[0]}` failed (exit {status})")


def paint_slices(labels: np.ndarray, classes: list[int], count: int) -> tuple[np.ndarray, list[int]]:
    """Keep ``count`` evenly spaced axial slices (Z) through the given classes; 255 elsewhere.

    labels: (X, Y, Z) uint8 truth. Returns the sparse label (other classes become background on the
    painted slices) and the painted slice indices.
    """
    present = np.flatnonzero(np.isin(labels, classes).any(axis=(0, 1)))
    picks = np.unique(np.round(np.linspace(present[0], present[-1], count + 2)[1:-1]).astype(int))
    sparse = np.full(labels.shape, 255, np.uint8)
    for k in picks:
        sparse[:, :, k] = np.where(np.isin(labels[:, :, k], classes), labels[:, :, k], 0)
    return sparse, picks.tolist()


def _score(target, truth_path, prediction, sparse, picks, classes) -> dict:
    """Dice on the unpainted slices of the engine and of shape interpolation from the same slices."""
    from MedSSL.tasks.evaluate import interpolate_between_slices
    from MedSSL.tasks.evaluate.metrics import segmentation_metrics
    from MedSSL.io.volumes import read_volume

    truth = read_volume(truth_path).array
    truth = np.where(np.isin(truth, list(classes)), truth, 0).astype(np.uint8)
    truth[:, :, picks] = 255  # score only the slices nobody painted
    spacing = target.image.spacing
    scores = segmentation_metrics(read_volume(prediction).array, truth, spacing, labels=list(classes))
    filled = interpolate_between_slices(sparse, axis=2, spacing=spacing)
    baseline = segmentation_metrics(filled, truth, spacing, labels=list(classes))
    return {"painted_slices": picks,
            "dice_on_unpainted_slices": {classes[int(k)]: v["dice"] for k, v in scores["per_class"].items()},
            "mean_dice": scores["mean_dice"], "interpolation_mean_dice": baseline["mean_dice"]}


def _figure(target, sparse, prediction, truth_path, picks, classes, report, path) -> None:
    """``demo.png``: five axial slices (the painted middle one and unpainted ones) with the contours."""
    from MedSSL.tasks.evaluate.figures import painted_result_png
    from MedSSL.io.output import atomic_write_bytes
    from MedSSL.io.volumes import read_volume

    truth = read_volume(truth_path).array
    truth = np.where(np.isin(truth, list(classes)), truth, 0)
    present = np.flatnonzero(np.isin(truth, list(classes)).any(axis=(0, 1)))
    shown = sorted({int(present[0]) + 1, (int(present[0]) + picks[0]) // 2, picks[len(picks) // 2],
                    (picks[-1] + int(present[-1])) // 2, int(present[-1]) - 1})
    title = (f"MedSSL few-shot: {len(picks)} painted slices -> Dice {report['mean_dice']:.3f} on the others "
             f"(Fill between slices {report['interpolation_mean_dice']:.3f})")
    atomic_write_bytes(path, painted_result_png(target.image.array, sparse, prediction, truth, 2, shown, classes, title))


def run(args) -> int:
    from MedSSL.data.phantom import make_phantom, write_phantom
    from MedSSL.io.volumes import read_volume, write_volume

    out = args.out
    started = time.monotonic()
    data = out / "data"
    unlabeled = data / "unlabeled"
    unlabeled.mkdir(parents=True, exist_ok=True)
    for i in range(args.volumes):
        write_volume(make_phantom(seed=100 + i, **PHANTOM).image, unlabeled / f"phantom_{i:02d}.nii.gz")
    target = make_phantom(seed=args.seed, **PHANTOM)
    image_path, truth_path, _ = write_phantom(target, data, name="target")
    _say(args, f"[1/4] wrote {args.volumes} unlabeled phantoms and a target phantom under {data}")

    pretrained = out / "pretrained"
    _sub(args, ["pretrain", "--data", str(unlabeled), "--out", str(pretrained), "--width", str(args.width),
                "--patch", *PATCH, "--batch-size", "4", "--max-time", str(args.pretrain_time),
                "--val-every", "20", "--cache", str(out / "cache"), "--resume"])
    _say(args, f"[2/4] pretrained Models Genesis for {args.pretrain_time:g} s -> {pretrained}")

    classes = {1: "liver", 2: "spleen"}
    sparse, picks = paint_slices(target.labels.array, list(classes), args.slices)
    sparse_path = data / "target_painted.nii.gz"
    write_volume(target.labels.with_array(sparse), sparse_path)
    classes_path = data / "painted_classes.json"
    colors = {1: [0.87, 0.51, 0.31], 2: [0.62, 0.31, 0.54]}
    classes_path.write_text(json.dumps({str(k): {"name": v, "color": colors[k]} for k, v in classes.items()}), encoding="utf-8")
    finetuned = out / "finetuned"
    clock = time.monotonic()
    _sub(args, ["finetune", "--image", str(image_path), "--label", str(sparse_path), "--classes", str(classes_path),
                "--out", str(finetuned)])
    prediction = out / "prediction.nii.gz"
    _sub(args, ["predict", "--model", str(finetuned), "--image", str(image_path), "--out", str(prediction),
                "--annotation", str(sparse_path)])
    seconds = time.monotonic() - clock
    _say(args, f"[3/4] completed the painting of {len(picks)} axial slices {picks} with the few-shot engine in "
               f"{seconds:.1f} s -> {prediction}")
    report = _score(target, truth_path, prediction, sparse, picks, classes)
    report.update({"seconds": round(time.monotonic() - started, 1), "fewshot_seconds": round(seconds, 1),
                   "outputs": {"pretrained": str(pretrained), "finetuned": str(finetuned), "prediction": str(prediction),
                               "figure": str(out / "demo.png")}})
    _figure(target, sparse, read_volume(prediction).array, truth_path, picks, classes, report, out / "demo.png")
    (out / "demo_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _say(args, "[4/4] Dice on the slices that were not painted: "
         + ", ".join(f"{name} {dice:.3f}" for name, dice in report["dice_on_unpainted_slices"].items())
         + f" (mean {report['mean_dice']:.3f}; Fill between slices {report['interpolation_mean_dice']:.3f}); "
         + f"total {report['seconds']:.0f} s; report {out / 'demo_report.json'}, figure {out / 'demo.png'}")
    if args.progress == "json":
        print(json.dumps({"event": "done", "outputs": report}), flush=True)
    return 0
