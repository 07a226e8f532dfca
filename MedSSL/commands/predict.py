"""``medssl predict``: apply a fine-tuned bundle to an image (label map, probabilities, detections, or
a volume-level class)."""

from __future__ import annotations

from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import add_runtime_options, make_progress


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="segment, detect or classify an image with a fine-tuned bundle",
        description="Segmentation bundles write a uint8 label map of the original label values on the input's grid; "
                    "classification bundles write JSON {probabilities, label, name}. A 2D bundle (fine-tuned on "
                    "one-slice images) takes a one-slice image and writes a one-slice label map.")
    p.add_argument("--model", required=True, type=Path, metavar="DIR", help="bundle folder from `medssl finetune`")
    p.add_argument("--image", required=True, metavar="PATH", help="image volume or DICOM folder")
    p.add_argument("--out", required=True, type=Path, metavar="PATH",
                   help="label map (.nii.gz, .nrrd, .mha...) for segmentation, .json for classification")
    p.add_argument("--detections", type=Path, default=None, metavar="JSON",
                   help="write one finding per connected component: label, name, center_mm and bbox_mm (LPS), score, volume_mm3")
    p.add_argument("--probabilities", type=Path, default=None, metavar="PATH",
                   help="write the foreground probability 1 - p(background) as float32 on the input grid")
    p.add_argument("--annotation", type=Path, default=None, metavar="LABEL",
                   help="the painted label map of this image (255 = not annotated). A few-shot bundle needs it: the engine "
                        "completes this painting. With a network bundle: keep only predicted components connected to "
                        "the painted structure of each class and copy the painted voxels (clean-up)")
    p.add_argument("--tta", action="store_true", help="average the predictions of flipped copies (4x slower)")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest connected component of each class")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap 0..0.95 (default: the bundle's, 0.5)")
    p.add_argument("--window", nargs="+", default=None, metavar="X Y Z | plane",
                   help="sliding-window size in voxels (multiples of 8; X Y or X Y 1 for a 2D model), or 'plane': the "
                        "whole plane when it fits a memory budget (default: the bundle's choice, 'plane' for few-shot "
                        "and 2D bundles, else the training patch)")
    p.add_argument("--min-volume", type=float, default=0.0, metavar="MM3", help="smallest detection to report (default 0)")
    p.add_argument("--min-score", type=float, default=None, metavar="P",
                   help="report only detections whose score (mean probability) is at least P (default: all)")
    p.add_argument("--max-findings", type=int, default=None, metavar="N",
                   help="report at most the N best detections (default: all)")
    p.add_argument("--memory-mb", type=float, default=1024.0,
                   help="target size of the sliding-window accumulator; larger volumes are processed in slabs (default 1024)")
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


def _finding_filter(args):
    """None (every finding) or a function keeping the findings that pass --min-score / --max-findings."""
    if args.min_score is None and args.max_findings is None:
        return None
    if args.max_findings is not None and args.max_findings < 1:
        raise MedSSLError(f"--max-findings {args.max_findings}: must be at least 1")
    from MedSSL.tasks.infer.detect import select_findings

    return lambda found: select_findings(found, min_score=args.min_score or 0.0, min_volume_mm3=0.0,
                                         max_count=args.max_findings)


def _run_fewshot(args) -> int:
    """A few-shot bundle: the engine completes the painting given by ``--annotation``."""
    from MedSSL.tasks.fewshot.task import predict_fewshot

    progress = make_progress(args)
    outputs = predict_fewshot(args.model, args.image, args.out, args.annotation, progress, args.detections,
                              args.probabilities, args.min_volume, _finding_filter(args))
    progress.done(outputs=outputs)
    return 0


def run(args) -> int:
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import PredictOptions, predict_files
    from MedSSL.engine.runtime import resolve_device, seed_everything

    seed_everything(args.seed)
    from MedSSL.tasks.fewshot.bundle import is_fewshot_bundle

    if is_fewshot_bundle(args.model):
        return _run_fewshot(args)
    device = resolve_device(args.device)
    model = load_model(args.model, device)
    overlap = args.overlap if args.overlap is not None else float((model.meta.get("inference") or {}).get("overlap", 0.5))
    if not 0.0 <= overlap <= 0.95:
        raise MedSSLError(f"--overlap {overlap}: expected 0..0.95")
    if args.memory_mb <= 0:
        raise MedSSLError(f"--memory-mb {args.memory_mb}: must be positive")
    options = PredictOptions(tta=args.tta, largest_component=args.largest_component, annotation=args.annotation,
                             overlap=overlap, memory_mb=args.memory_mb, min_volume_mm3=args.min_volume,
                             window=parse_window(args.window), select=_finding_filter(args))
    progress = make_progress(args)
    outputs = predict_files(model, args.image, args.out, options, progress, detections=args.detections,
                            probabilities=args.probabilities)
    if model.task == "classify" and progress.mode != "json":
        import json

        print(json.dumps({k: outputs[k] for k in ("probabilities", "label", "name")}))
    progress.done(outputs=outputs)
    return 0
