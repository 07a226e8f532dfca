"""``medssl predict``: apply a fine-tuned bundle to an image (label map, probabilities, detections, or
a volume-level class)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import (add_options, add_runtime_options, command_parser, make_progress,
                                    settings_from_args)
from MedSSL.tasks.infer import PredictOptions


DESCRIPTION = ("Segmentation bundles write a uint8 label map of the original label values on the input's grid; "
               "classification bundles write JSON {probabilities, label, name}. A 2D bundle (fine-tuned on "
               "one-slice images) takes a one-slice image and writes a one-slice label map.")


def add_parser(sub) -> None:
    p = command_parser(sub, "predict", "segment, detect or classify an image with a fine-tuned bundle", DESCRIPTION,
                       "bundle folder from `medssl finetune`",
                       image_help="image volume or DICOM folder; several paths, or a folder of scans, segment each "
                                  "one into --out (a folder) with a summary.csv", many=True)
    p.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="label map (.nii.gz, .nrrd, .mha...) for segmentation, .json for classification; a folder "
                        "when --image gives several scans")
    p.add_argument("--detections", type=Path, default=None, metavar="JSON",
                   help="write one finding per connected component: label, name, center_mm and bbox_mm (LPS), score, volume_mm3")
    p.add_argument("--probabilities", type=Path, default=None, metavar="PATH",
                   help="write the foreground probability 1 - p(background) as float32 on the input grid")
    add_options(p, PredictOptions)
    add_runtime_options(p)
    p.set_defaults(run=run)


def parse_window(values):
    """``--window``: None, ["plane"], or two or three integers (checked against the model by
    :func:`MedSSL.tasks.infer.model.inference_window`)."""
    if not values:
        return None
    if values == ["plane"]:
        return "plane"
    try:
        window = tuple(int(v) for v in values)
    except ValueError:
        window = ()
    if len(window) not in (2, 3):
        raise MedSSLError(f"--window {' '.join(values)}: give three sizes X Y Z (X Y for a 2D model) or 'plane'")
    return window


def _finding_filter(min_score, max_findings):
    """None (every finding) or a function keeping the findings that pass --min-score / --max-findings."""
    if min_score is None and max_findings is None:
        return None
    from MedSSL.tasks.infer.detect import select_findings

    return lambda found: select_findings(found, min_score=min_score or 0.0, min_volume_mm3=0.0, max_count=max_findings)


def options_from_args(args, bundle_overlap: float | None = None) -> PredictOptions:
    """``medssl predict``'s options; ``--overlap`` left out: the bundle's (``bundle_overlap``), else the default."""
    given = {"window": parse_window(args.window)}
    if args.overlap is None and bundle_overlap is not None:
        given["overlap"] = float(bundle_overlap)
    options = settings_from_args(PredictOptions, args, **given)
    return replace(options, select=_finding_filter(options.min_score, options.max_findings))


def _run_fewshot(args) -> int:
    """A few-shot bundle: the engine completes the painting given by ``--annotation``."""
    from MedSSL.tasks.fewshot.task import predict_fewshot

    progress = make_progress(args)
    options = options_from_args(args)
    outputs = predict_fewshot(args.model, args.image, args.out, args.annotation, progress, args.detections,
                              args.probabilities, options.min_volume_mm3, options.select)
    progress.done(outputs=outputs)
    return 0


def _check_batch_args(args) -> None:
    """Options that name one file per scan do not apply to a batch."""
    for option, value in (("--annotation", args.annotation), ("--detections", args.detections),
                          ("--probabilities", args.probabilities)):
        if value is not None:
            raise MedSSLError(f"{option} {value}: names one file; with several --image scans predict them one by one "
                              "to get it")


def _run_batch(args, model) -> int:
    from MedSSL.tasks.infer.batch import predict_many

    _check_batch_args(args)
    progress = make_progress(args)
    outputs = predict_many(model, args.image, args.out, options_from_args(args, model.meta.inference_setting("overlap")),
                           progress)
    progress.done(outputs=outputs)
    return 0


def run(args) -> int:
    from MedSSL.tasks.infer.batch import is_batch
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import predict_files
    from MedSSL.engine.runtime import resolve_device, seed_everything

    seed_everything(args.seed)
    from MedSSL.tasks.fewshot.bundle import is_fewshot_bundle

    batch = is_batch(args.image)
    if is_fewshot_bundle(args.model):
        if batch:
            raise MedSSLError(f"--model {args.model}: a few-shot model completes the painting of one scan; give one "
                              "--image and its --annotation (a cohort model from several painted scans segments many)")
        args.image = args.image[0]
        return _run_fewshot(args)
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    if batch:
        return _run_batch(args, model)
    args.image = args.image[0]
    options = options_from_args(args, model.meta.inference_setting("overlap"))
    progress = make_progress(args)
    if args.annotation is not None and model.task == "segment":
        from MedSSL.tasks.cohort.correction import is_cohort_model, predict_corrected

        if is_cohort_model(model.meta):
            if args.detections:
                raise MedSSLError(f"--detections {args.detections}: not with --annotation corrections; predict "
                                  "without --annotation for findings")
            outputs = predict_corrected(model, args.image, args.annotation, args.out, options, progress,
                                        args.probabilities)
            progress.done(outputs=outputs)
            return 0
    outputs = predict_files(model, args.image, args.out, options, progress, detections=args.detections,
                            probabilities=args.probabilities)
    if model.task == "classify" and progress.mode != "json":
        import json

        print(json.dumps({k: outputs[k] for k in ("probabilities", "label", "name")}))
    progress.done(outputs=outputs)
    return 0
