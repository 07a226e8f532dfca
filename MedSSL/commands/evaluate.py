"""``medssl evaluate``: segmentation metrics, detection FROC or classification AUC.

One of three modes:

* ``--pred LABEL --truth LABEL``: per-class Dice, IoU, HD95 and ASD in mm (see
  :mod:`MedSSL.tasks.evaluate.metrics`); the prediction is resampled onto the truth's grid (nearest
  neighbour) when the grids differ, which is logged on stderr.
* ``--detections DET.json ... --truth LABEL ...``: lesion FROC, CAD-PE rules (see
  :mod:`MedSSL.tasks.evaluate.detection`); files paired in order.
* ``--classification RESULTS.csv``: ROC AUC (see :mod:`MedSSL.tasks.evaluate.classification`).

A summary goes to stdout; ``--json PATH`` writes the full result (``--json -``: the JSON to stdout instead
of the summary); ``--figure PATH.png`` a figure. Outputs are written atomically, after every input has
been read and checked, so a failed run leaves no output file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import command_parser


def add_parser(sub) -> None:
    p = command_parser(
        sub, "evaluate", "score segmentations (Dice, HD95), detections (FROC) or classifications (AUC)",
        "Score a predicted label volume against a true one (--pred/--truth), detection JSON files against lesion "
        "label volumes (--detections/--truth), or classification scores (--classification). Truth voxels equal to "
        "--ignore-value (255) are not annotated and not scored.")
    p.add_argument("--pred", metavar="LABEL", help="predicted label volume (NIfTI, NRRD, MHA or DICOM folder)")
    p.add_argument("--truth", nargs="+", metavar="LABEL", help="true label volume(s): one with --pred, one per detection file with --detections")
    p.add_argument("--detections", nargs="+", metavar="DET.json", help="detection lists, one JSON file per scan: [{\"center_mm\": [x, y, z], \"score\": s, ...}]")
    p.add_argument("--lesion-label", type=int, default=None, metavar="N", help="with --detections: the truth label of lesions (default: every non-zero label)")
    p.add_argument("--classification", metavar="CSV", help="CSV with a header: truth,score (binary 0/1) or truth,<class1>,<class2>... (scores per class)")
    p.add_argument("--classes", default=None, metavar="JSON", help="class names for --pred: a JSON file or inline JSON {\"1\": \"liver\", ...} (listed classes are always reported)")
    p.add_argument("--ignore-value", default="255", metavar="N", help="truth value meaning 'not annotated' (default 255; 'none' to score every voxel)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON ('-' = stdout)")
    p.add_argument("--figure", default=None, metavar="PNG", help="write a figure: Dice per class, FROC curve or ROC curve")
    p.set_defaults(run=run)


def _ignore_value(text: str):
    if str(text).lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise MedSSLError(f"--ignore-value {text}: expected an integer or 'none'") from None


def _read_classes(text):
    if text is None:
        return None
    path = Path(text)
    source = f"--classes {text}"
    if path.is_file():
        source = str(path)
        text = path.read_text(encoding="utf-8")
    elif not text.lstrip().startswith("{"):
        raise MedSSLError(f"--classes {text}: no such file, and not inline JSON")
    try:
        classes = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MedSSLError(f"{source}: not valid JSON ({exc.msg})") from None
    if isinstance(classes, dict) and isinstance(classes.get("classes"), dict):
        classes = classes["classes"]  # a bundle's model.json
    if not isinstance(classes, dict):
        raise MedSSLError(f"{source}: expected a JSON object {{\"<label value>\": \"name\", ...}}")
    try:
        for key in classes:
            int(key)
    except ValueError:
        raise MedSSLError(f"{source}: class key {key!r} is not an integer label value") from None
    return classes


def _check_outputs(args) -> None:
    if args.figure is not None:
        if not args.figure.lower().endswith(".png"):
            raise MedSSLError(f"--figure {args.figure}: must end with .png")
        if Path(args.figure).is_dir():
            raise MedSSLError(f"--figure {args.figure}: is a folder")
    if args.json not in (None, "-") and Path(args.json).is_dir():
        raise MedSSLError(f"--json {args.json}: is a folder")
    if args.json is not None and args.figure is not None and Path(args.json) == Path(args.figure):
        raise MedSSLError(f"--json and --figure name the same file {args.json}")


def run(args) -> int:
    modes = [name for name in ("pred", "detections", "classification") if getattr(args, name)]
    if len(modes) != 1:
        raise MedSSLError("give exactly one of --pred (segmentation), --detections (FROC) or --classification (AUC)")
    _check_outputs(args)
    ignore_value = _ignore_value(args.ignore_value)
    from MedSSL.tasks.evaluate import figures
    from MedSSL.io.output import to_json, write_json

    if args.pred:
        if not args.truth or len(args.truth) != 1:
            raise MedSSLError("--pred needs exactly one --truth label volume")
        from MedSSL.tasks.evaluate.metrics import evaluate_segmentation_files

        classes = _read_classes(args.classes)
        result = evaluate_segmentation_files(args.pred, args.truth[0], classes=classes, ignore_value=ignore_value)
        render, summary = figures.dice_png, _segmentation_summary
    elif args.detections:
        if not args.truth:
            raise MedSSLError("--detections needs --truth label volume(s), one per detection file")
        from MedSSL.tasks.evaluate.detection import froc_from_files

        result = froc_from_files(args.detections, args.truth, lesion_label=args.lesion_label, ignore_value=ignore_value)
        render, summary = figures.froc_png, _froc_summary
    else:
        if args.truth:
            raise MedSSLError("--classification takes no --truth (the truth is a column of the CSV)")
        from MedSSL.tasks.evaluate.classification import evaluate_classification_file

        result = evaluate_classification_file(args.classification)
        render, summary = figures.roc_png, _auc_summary

    if args.figure:
        figures.write_png(args.figure, render(result))
    if args.json == "-":
        sys.stdout.write(to_json(result))
        return 0
    if args.json:
        write_json(args.json, result)
    summary(result)
    return 0


def _fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def _segmentation_summary(result: dict) -> None:
    print(f"{'class':>8} {'name':<16} {'dice':>6} {'iou':>6} {'hd95_mm':>8} {'asd_mm':>8} {'truth_vox':>10} {'pred_vox':>10}")
    for label, e in result["per_class"].items():
        note = "" if e["scored"] else "  (absent from both, not in the mean)"
        print(f"{label:>8} {str(e.get('name') or ''):<16} {_fmt(e['dice']):>6} {_fmt(e['iou']):>6} "
              f"{_fmt(e['hd95_mm'], '.2f'):>8} {_fmt(e['asd_mm'], '.2f'):>8} {e['truth_voxels']:>10} {e['pred_voxels']:>10}{note}")
    print(f"mean dice {_fmt(result['mean_dice'])}, mean iou {_fmt(result['mean_iou'])}, "
          f"mean hd95 {_fmt(result['mean_hd95_mm'], '.2f')} mm, mean asd {_fmt(result['mean_asd_mm'], '.2f')} mm "
          f"({result['classes_scored']} class(es); {result['ignored_voxels']} unannotated voxel(s) not scored)")


def _froc_summary(result: dict) -> None:
    points = ", ".join(f"{k} FP/scan: {_fmt(v)}" for k, v in result["froc"].items())
    print(f"{result['lesions']} lesion(s) in {result['scans']} scan(s), {result['detections']} detection(s)")
    print(f"sensitivity at {points}")
    print(f"mean sensitivity {_fmt(result['mean_sensitivity'])}")


def _auc_summary(result: dict) -> None:
    if "per_class" in result:
        for name, v in result["per_class"].items():
            print(f"{name}: AUC {_fmt(v['auc'])} ({v['positives']} positive)")
        print(f"macro AUC {_fmt(result['auc'])} over {result['n']} case(s)")
    else:
        print(f"AUC {_fmt(result['auc'])} ({result['positives']} positive, {result['negatives']} negative)")
