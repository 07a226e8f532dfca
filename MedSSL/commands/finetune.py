"""``medssl finetune``: supervised fine-tuning (segmentation or volume classification) into a bundle.

One-slice images (X, Y, 1: radiographs) get a 2D network; see :mod:`MedSSL.tasks.finetune.segment`."""

from __future__ import annotations

from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.commands.common import add_runtime_options, add_training_options, loop_config, make_progress

DEFAULT_STEPS = 500


def _set_default(parser, dest: str, default, help_text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.default, action.help = default, help_text


def _set_nargs(parser, dest: str, nargs, metavar) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.nargs, action.metavar = nargs, metavar


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a (pretrained) 3D U-Net on labelled volumes: segmentation or classification",
        description="Fine-tune on label maps (0 background, 1..254 classes, 255 = not annotated, e.g. the "
                    "unpainted slices of a few-shot annotation) or on volume-level labels (--task classify --csv). "
                    "One-slice images (X x Y x 1, e.g. radiographs) get a 2D U-Net and 2D patches; all images of a "
                    "run must then be one-slice, and --init must be a 2D model (e.g. `medssl pretrain` on one-slice "
                    "images). Writes a model bundle (weights.safetensors + model.json) to --out.")
    p.add_argument("--task", choices=("segment", "classify"), default="segment", help="default segment")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image volume (repeat, paired with --label)")
    p.add_argument("--label", action="append", default=[], metavar="PATH",
                   help="label map on the image's grid (repeat, in the order of --image); 255 = not annotated")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="classify: rows image,label (label = class value or name; paths relative to the CSV's folder)")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--init", default=None, metavar="BUNDLE_OR_PT|none",
                   help="initial weights: a MedSSL bundle (any method or task) or an official Models Genesis .pt; "
                        "default (or 'none'): from scratch")
    p.add_argument("--transfer", choices=("all", "encoder"), default="all",
                   help="which --init weights to copy: all (encoder and decoder, as Models Genesis; default) or encoder")
    p.add_argument("--classes", default=None, metavar="JSON_OR_LIST",
                   help='class names and colours: a JSON file {"1": {"name": "spleen", "color": [r, g, b]}} (0..1) or '
                        "1=spleen,2=liver; default: <label>.classes.json next to the first label "
                        "(label.nii.gz -> label.classes.json), else label_<value>")
    p.add_argument("--detection", action="store_true", help="mark the bundle as a detector (model.json detection: true)")
    p.add_argument("--engine", choices=("auto", "fewshot", "network"), default="auto",
                   help="segmentation: 'fewshot' completes a painting (one image whose label has whole planes painted "
                        "along any axes and 255 elsewhere) with the few-shot engine: shape interpolation + appearance "
                        "learned on the volume + propagation past the painted planes, seconds on a CPU; 'network' "
                        "fine-tunes the U-Net; default auto: fewshot for one painted 3D image, else network")
    add_training_options(p, steps=DEFAULT_STEPS, batch=2, lr=1e-3, patch=(64, 64, 32))
    _set_default(p, "patch", None, "patch size in voxels, multiples of 8: X Y Z for volumes (default: segment 64 64 Z "
                                   "with Z about the in-plane extent, 8..32, e.g. 16 for 5 mm slices; classify 64 64 32, "
                                   "the volume is resized to it); X Y or X Y 1 for one-slice images (default: segment "
                                   "128 128, at most the image size; classify 64 64)")
    _set_nargs(p, "patch", "+", "N")
    _set_default(p, "steps", None, f"optimiser steps (default {DEFAULT_STEPS}; with --max-time alone: as many as fit in "
                                   "that time, measured on a few steps, so the learning-rate schedule spans the budget)")
    _set_default(p, "width", None, "base channels of the U-Net (default: the --init model's width, else 32)")
    p.add_argument("--modality", choices=("auto", "CT", "MR"), default="auto",
                   help="intensity normalisation (default: the --init bundle's, else detected per image)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="resample to this spacing in mm first (default: the --init bundle's, else the image grid; "
                        "one-slice images: X and Y only); predict resamples back")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the volumes for validation and early stopping (default 0: none)")
    p.add_argument("--bn-recalibration", type=int, default=16, metavar="N",
                   help="after training, recompute BatchNorm statistics on N batches of training patches (default 16; 0 = off)")
    p.add_argument("--no-augment", action="store_true", help="no random flips, rotations or intensity jitter")
    add_runtime_options(p)
    p.set_defaults(run=run)


def config_from_args(args):
    from MedSSL.tasks.finetune.common import FinetuneConfig

    if not 0.0 <= args.val_fraction < 1.0:
        raise MedSSLError(f"--val-fraction {args.val_fraction}: expected 0 <= f < 1")
    if args.task == "classify" and (args.image or args.label):
        raise MedSSLError("--task classify takes --csv FILE, not --image/--label")
    if args.task == "classify" and args.detection:
        raise MedSSLError("--detection applies to segmentation bundles, not --task classify")
    if args.task == "segment" and args.csv is not None:
        raise MedSSLError("--csv is for --task classify; segmentation takes --image PATH --label PATH pairs")
    return FinetuneConfig(
        out=args.out, task=args.task, images=list(args.image), labels=list(args.label), csv=args.csv, init=args.init,
        classes=args.classes, width=args.width, patch=tuple(args.patch) if args.patch else None,
        batch_size=args.batch_size, modality=args.modality, spacing=tuple(args.spacing) if args.spacing else None,
        detection=args.detection, augment=not args.no_augment, val_fraction=args.val_fraction, device=args.device,
        seed=args.seed, resume=args.resume, loop=loop_config(args, default_steps=DEFAULT_STEPS),
        transfer=args.transfer, recalibrate_bn=max(0, args.bn_recalibration),
        steps_from_time=args.steps is None and args.max_time is not None,
    )


def _engine(args, config) -> str:
    from MedSSL.tasks.fewshot.task import choose_engine

    return choose_engine(config, getattr(args, "engine", "auto"))


def run(args) -> int:
    config = config_from_args(args)
    progress = make_progress(args)
    if config.task == "classify":
        from MedSSL.tasks.finetune.classify import finetune_classification

        bundle = finetune_classification(config, progress)
    elif _engine(args, config) == "fewshot":
        from MedSSL.tasks.fewshot.task import finetune_fewshot

        bundle = finetune_fewshot(config, progress, steps=args.steps)
    else:
        from MedSSL.tasks.finetune.segment import finetune_segmentation

        bundle = finetune_segmentation(config, progress)
    progress.done(bundle=str(Path(bundle).resolve()))
    return 0
