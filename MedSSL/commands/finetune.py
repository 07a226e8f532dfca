"""``medssl finetune``: supervised fine-tuning (segmentation or volume classification) into a bundle.

One-slice images (X, Y, 1: radiographs) get a 2D network; see :mod:`MedSSL.tasks.finetune.segment`."""

from __future__ import annotations

from pathlib import Path

from MedSSL.commands.common import add_options, add_runtime_options, make_progress, training_config
from MedSSL.tasks import FinetuneConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a (pretrained) 3D U-Net on labelled volumes: segmentation or classification",
        description="Fine-tune on label maps (0 background, 1..254 classes, 255 = not annotated, e.g. the "
                    "unpainted slices of a few-shot annotation) or on volume-level labels (--task classify --csv). "
                    "One-slice images (X x Y x 1, e.g. radiographs) get a 2D U-Net and 2D patches; all images of a "
                    "run must then be one-slice, and --init must be a 2D model (e.g. `medssl pretrain` on one-slice "
                    "images). Writes a model bundle (weights.safetensors + model.json) to --out.")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    add_options(p, FinetuneConfig)
    add_runtime_options(p)
    p.set_defaults(run=run)


def config_from_args(args):
    return training_config(FinetuneConfig, args, out=args.out,
                           steps_from_time=args.steps is None and args.max_time is not None)


def _engine(config) -> str:
    from MedSSL.tasks.fewshot.task import choose_engine

    return choose_engine(config, config.engine)


def run(args) -> int:
    config = config_from_args(args)
    progress = make_progress(args)
    if config.task == "classify":
        from MedSSL.tasks.finetune.classify import finetune_classification

        bundle = finetune_classification(config, progress)
    elif _engine(config) == "fewshot":
        from MedSSL.tasks.fewshot.task import finetune_fewshot

        bundle = finetune_fewshot(config, progress, steps=args.steps)
    else:
        from MedSSL.tasks.cohort.train import finetune_cohort

        bundle = finetune_cohort(config, progress, budget_given=args.steps is not None or args.max_time is not None)
    progress.done(bundle=str(Path(bundle).resolve()))
    return 0
