"""The tasks (evaluate, pretrain, finetune, infer, fewshot), and here the settings of the two training tasks:
frozen, validated dataclasses whose :func:`~MedSSL.io.settings.option` fields are the commands' options,
defaults included. They live here, apart from the task modules, so that the CLI builds its options
without loading the networks and methods (``medssl --help`` and usage errors stay fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from MedSSL.errors import MedSSLError
from MedSSL.io.settings import at_least, option
from MedSSL.engine.loop import LoopConfig, RuntimeOptions


@dataclass(frozen=True)
class PretrainConfig:
    """Everything ``medssl pretrain`` takes. patch is (X, Y, Z) voxels, divisible by 8 (Z is ignored
    for 2D methods on one-slice images). Exactly one of ``data`` (volumes, for methods of data kind
    "cubes") and ``datasets`` (a spec file, for "labelled-datasets") is given. The fields that are
    :func:`~MedSSL.io.settings.option` s are the command's options, defaults included."""

    data: list | None
    out: Path
    method: str = option("genesis", help="self-supervised method (see `medssl methods`; default {default})")
    method_settings: dict = field(default_factory=dict)
    init: str | None = option(None, metavar="BUNDLE_OR_PT",
                              help="start from a bundle or an official Models Genesis .pt")
    width: int = option(32, type=int, help="base channels of the U-Net (32 = official Models Genesis; 8 or 16 for "
                                           "CPUs and small GPUs)")
    patch: tuple = option((64, 64, 32), type=int, nargs=3, metavar=("X", "Y", "Z"),
                          help="cube size in voxels, multiples of 8 (default {default})")
    batch_size: int = option(6, type=int, help="cubes per step (default {default})")
    cubes_per_volume: int = option(32, type=int, help="cubes sampled per volume (default {default}, as Models Genesis)")
    modality: str = option("auto", choices=("auto", "CT", "MR"),
                           help="intensity normalisation: CT window [-1000, 1000] HU or MR percentiles (default: from the data)")
    spacing: tuple | None = option(None, type=float, nargs=3, metavar=("X", "Y", "Z"),
                                   help="resample to this spacing in mm first (default: keep the voxel grid, as Models Genesis)")
    cache_dir: Path | None = option(None, flag="--cache", type=Path, metavar="CACHE",
                                    help="cube cache folder (default $MEDSSL_CACHE or ~/.cache/medssl/cubes)")
    val_fraction: float = 0.1
    device: str = RuntimeOptions.device
    seed: int = RuntimeOptions.seed
    resume: bool = option(False, action="store_true", help="continue from the checkpoint in --out")
    compile: bool = option(False, action="store_true",
                           help="torch.compile the U-Net (falls back to eager mode if compilation fails)")
    workers: int = option(1, type=int, help="loader threads preparing batches while the GPU trains (default {default}; 0 = none)")
    channels_last: bool = option(False, action="store_true",
                                 help="channels-last 3D memory format on CUDA (often faster with AMP; the CPU always uses it for 3D networks)")
    loop: LoopConfig = field(default_factory=LoopConfig)
    datasets: Path | None = None

    def __post_init__(self):
        for name in ("batch_size", "width"):
            at_least(self, name, 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``medssl finetune`` takes; the :func:`~MedSSL.io.settings.option` fields are the command's
    options, defaults included (the training budget's in ``loop``: 500 steps).

    images/labels: paired paths (segment); csv: the ``image,label`` table (classify). init: bundle or
    official ``.pt`` (None = from scratch). width: None = the init's width, else 8 (segmentation,
    :data:`MedSSL.tasks.cohort.train.DEFAULT_WIDTH`) or 32 (classification). patch: (X, Y, Z)
    voxels, multiples of 8 (None = automatic); for one-slice images (X, Y) or (X, Y, 1), kept as
    (X, Y, 1). spacing: mm (None = the init bundle's, else the grid; one-slice images keep their own
    slice thickness: only X and Y are resampled).
    """

    out: Path
    task: str = option("segment", choices=("segment", "classify"), help="default {default}")
    images: list = option(flag="--image", action="append", metavar="PATH", default_factory=list,
                          help="image volume (repeat, paired with --label)")
    labels: list = option(flag="--label", action="append", metavar="PATH", default_factory=list,
                          help="label map on the image's grid (repeat, in the order of --image); 255 = not annotated")
    unlabeled: tuple = option((), flag="--unlabeled", nargs="+", metavar="PATH",
                             help="network: scans of the same cohort without labels (files, folders, DICOM series): "
                                  "self-training in two rounds, the model of the labelled scans segments them and its "
                                  "confident voxels train a second round of half as many steps (docs/cohort.md)")
    csv: Path | None = option(None, type=Path, metavar="FILE",
                              help="classify: rows image,label (label = class value or name; paths relative to the "
                                   "CSV's folder)")
    init: str | None = option(None, metavar="BUNDLE_OR_PT|none",
                              help="initial weights: a MedSSL bundle (any method or task) or an official Models Genesis "
                                   ".pt; default (or 'none'): from scratch")
    classes: str | None = option(None, metavar="JSON_OR_LIST",
                                 help='class names and colours: a JSON file {"1": {"name": "spleen", "color": [r, g, b]}} '
                                      "(0..1) or 1=spleen,2=liver; default: <label>.classes.json next to the first label "
                                      "(label.nii.gz -> label.classes.json), else label_<value>")
    width: int | None = option(None, type=int, help="base channels of the U-Net (default: the --init model's width; from "
                                                    "scratch 8 for segmentation, chosen for a CPU, 32 for classification)")
    patch: tuple | None = option(None, type=int, nargs="+", metavar="N",
                                 help="patch size in voxels, multiples of 8: X Y Z for volumes (default: segment 64 64 Z "
                                      "with Z about the in-plane extent, 8..32, e.g. 16 for 5 mm slices; classify 64 64 "
                                      "32, the volume is resized to it); X Y or X Y 1 for one-slice images (default: "
                                      "segment 128 128, at most the image size; classify 64 64)")
    batch_size: int = option(2, type=int, help="cubes per step (default {default})")
    modality: str = option("auto", choices=("auto", "CT", "MR"),
                           help="intensity normalisation (default: the --init bundle's, else detected per image)")
    spacing: tuple | None = option(None, type=float, nargs=3, metavar=("X", "Y", "Z"),
                                   help="resample to this spacing in mm first (default: the --init bundle's, else the "
                                        "image grid; one-slice images: X and Y only); predict resamples back")
    detection: bool = option(False, action="store_true", help="mark the bundle as a detector (model.json detection: true)")
    augment: bool = option(True, flag="--no-augment", action="store_false",
                           help="no random flips, rotations or intensity jitter")
    val_fraction: float = option(0.0, type=float, help="hold out this fraction of the volumes for validation and early "
                                                       "stopping (default 0: none)")
    device: str = RuntimeOptions.device
    seed: int = RuntimeOptions.seed
    resume: bool = option(False, action="store_true", help="continue from the checkpoint in --out")
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=500), metadata={"help": {
        "steps": "optimiser steps (default {default}; a cohort model (several scans, --engine network): 300 for one "
                 "class, 300 x (classes + 1) / 2 for several, at most 600; a refresh "
                 "from a cohort model a quarter of its steps; with --max-time alone: as many as fit in that time, "
                 "measured on a few steps, so the learning-rate schedule spans the budget)"}})
    #: which initial weights to copy: "all" (encoder and decoder, as Models Genesis) or "encoder"
    transfer: str = option("all", choices=("all", "encoder"),
                           help="which --init weights to copy: all (encoder and decoder, as Models Genesis; default) "
                                "or encoder")
    #: batches of random patches used to recompute BatchNorm statistics after training (0 = keep them)
    recalibrate_bn: int = option(16, flag="--bn-recalibration", type=int, metavar="N",
                                 help="after training, recompute BatchNorm statistics on N batches of training patches "
                                      "(default {default}; 0 = off)")
    #: segmentation engine: "fewshot" completes a painting, "network" fine-tunes the U-Net, "auto" chooses
    engine: str = option("auto", choices=("auto", "fewshot", "network"),
                         help="segmentation: 'fewshot' completes a painting (one image whose label has whole planes "
                              "painted along any axes and 255 elsewhere) with the few-shot engine: shape interpolation "
                              "+ appearance learned on the volume + propagation past the painted planes, seconds on a "
                              "CPU; 'network' fine-tunes the U-Net; default auto: fewshot for one painted 3D image, "
                              "else network")
    #: network path: complete each painting with the few-shot engine before training (:mod:`MedSSL.tasks.cohort`)
    complete_paintings: bool = option(True, flag="--no-completion", action="store_false",
                                      help="network: train on the painted planes only, instead of on each painting "
                                           "completed into a dense label by the few-shot engine")
    #: completed voxels below this probability are not trained on
    completion_confidence: float = option(0.7, type=float, metavar="P",
                                          help="network: voxels the few-shot engine completed with a probability below P "
                                               "are left out of training (default {default}; 0 keeps all)")
    #: network path: the voxels' positions in the body as extra input channels (:mod:`MedSSL.data.position`)
    position: str = option("auto", choices=("auto", "on", "off"),
                           help="network: give the U-Net each voxel's left-right and anterior-posterior position in the "
                                "body as two extra input channels, so that paired structures (kidneys, lungs, "
                                "hippocampi) are told apart; 3D images only; an --init model without them starts with "
                                "zero weights on them (default auto: on when the --init model has them, else off)")
    #: segmentation loss: the Dice term over the classes present in each batch only (:mod:`MedSSL.losses.segmentation`)
    dice_skip_absent: bool = False
    #: augmentation: out-of-plane rotations up to this many degrees (:class:`MedSSL.transforms.augment.AugmentConfig`);
    #: dense labels of volumes only (painted planes would be smeared); measured off by default (docs/cohort.md)
    augment_tilt_deg: float = 0.0
    #: only ``--max-time`` bounds training: set the step count (and so the lr schedule) from a timing
    steps_from_time: bool = False

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise MedSSLError(f"--val-fraction {self.val_fraction}: expected 0 <= f < 1")
        for name in ("batch_size", "width"):
            at_least(self, name, 1)
        if self.task == "classify" and (self.images or self.labels):
            raise MedSSLError("--task classify takes --csv FILE, not --image/--label")
        if self.task == "classify" and self.detection:
            raise MedSSLError("--detection applies to segmentation bundles, not --task classify")
        if self.unlabeled and (self.task != "segment" or self.engine == "fewshot"):
            raise MedSSLError("--unlabeled: self-training is for the network of a segmentation cohort "
                              "(--task segment, several scans or --engine network)")
        if self.task == "segment" and self.csv is not None:
            raise MedSSLError("--csv is for --task classify; segmentation takes --image PATH --label PATH pairs")
        object.__setattr__(self, "recalibrate_bn", max(0, int(self.recalibrate_bn)))
        if not 0.0 <= self.completion_confidence < 1.0:
            raise MedSSLError(f"--completion-confidence {self.completion_confidence}: expected 0 <= P < 1")
