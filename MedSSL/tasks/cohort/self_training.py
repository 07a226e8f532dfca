"""Self-training on the cohort's scans that have no labels (``medssl finetune --unlabeled PATH...``).

Two rounds, written here (MONAI has no self-training loop):

1. the cohort model is trained on the painted (or labelled) scans as without ``--unlabeled``, into a
   temporary folder;
2. it segments each unlabelled scan as ``medssl predict`` would (the cohort clean-up included); the voxels
   whose class probability is at least :data:`PSEUDO_CONFIDENCE` keep the predicted class, the others become
   255 (not annotated); these pseudo-labels join the training labels (they are not completed by the few-shot
   engine) and round 1's model is fine-tuned on all the scans for :data:`SECOND_ROUND_FRACTION` of round 1's
   steps (a new learning-rate schedule) into ``--out``.

This is pseudo-labelling self-training (Lee 2013; Xie et al., "Self-training with Noisy Student", CVPR 2020:
the student is trained with augmentation on the teacher's confident labels). What it gained on new scans
is in docs/cohort.md ("Self-training on unlabelled scans").
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from MedSSL.data.painted_planes import IGNORE
from MedSSL.engine.checkpoint import CHECKPOINT_FILE
from MedSSL.engine.progress import Progress
from MedSSL.errors import MedSSLError
from MedSSL.io.bundle import read_bundle_meta
from MedSSL.io.volumes import find_volumes, read_size, read_volume, write_volume
from MedSSL.tasks import FinetuneConfig

#: a pseudo-label keeps the voxels whose predicted class has at least this probability (255 elsewhere)
PSEUDO_CONFIDENCE = 0.9
#: in round 2 at most this share of the patches comes from pseudo-labelled scans (the labelled scans weigh more
#: when the unlabelled ones outnumber them)
PSEUDO_SHARE = 0.5
#: round 2 trains this fraction of round 1's steps
SECOND_ROUND_FRACTION = 0.5
#: with ``--max-time`` round 1 gets this share of it (round 2's steps take about the rest)
FIRST_ROUND_TIME_SHARE = 2.0 / 3.0


def unlabeled_scans(config: FinetuneConfig, log=None) -> list[Path]:
    """The ``--unlabeled`` sources (files, folders searched recursively, DICOM series folders), less those that
    are also an ``--image``. MedSSLError naming the input for a path that does not exist, holds no volume, is
    not a readable image or is a one-slice image, and when nothing is left."""
    labelled = {Path(p).resolve() for p in config.images}
    scans, skipped = [], 0
    try:
        sources = find_volumes(config.unlabeled)
    except MedSSLError as error:
        raise MedSSLError(f"--unlabeled {error}") from None
    for source in sources:
        if source.resolve() in labelled:
            skipped += 1
            continue
        if source.is_file():  # a DICOM series folder: read when it is segmented
            _check_header(source)
        scans.append(source)
    if log and skipped:
        log(f"{skipped} --unlabeled scan(s) skipped: they are also --image")
    if not scans:
        raise MedSSLError("--unlabeled: every scan given is also an --image; give scans without labels")
    return scans


def _check_header(source: Path) -> None:
    size = read_size(source)
    if size is None:
        raise MedSSLError(f"--unlabeled {source}: not a readable image")
    if len(size) < 3 or min(size) < 2:
        raise MedSSLError(f"--unlabeled {source}: a one-slice image; self-training takes 3D scans")


def check_self_training(config: FinetuneConfig) -> None:
    """What self-training cannot do, refused before anything runs."""
    if config.resume:
        raise MedSSLError("--resume cannot continue a run with --unlabeled (two rounds of training): start it again")
    if config.val_fraction:
        raise MedSSLError("--val-fraction: not with --unlabeled (round 2 would validate on pseudo-labels)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MedSSLError("--unlabeled runs in one process: start it without torchrun")
    if (Path(config.out) / CHECKPOINT_FILE).is_file():
        raise MedSSLError(f"{config.out}: already holds a training run; choose another --out")


def self_train(config: FinetuneConfig, progress: Progress, budget_given: bool, train_round) -> Path:
    """Both rounds; returns ``config.out``. ``train_round(config, progress, budget_given, pseudo_from=None,
    self_training=None)`` trains one cohort model (:func:`MedSSL.tasks.cohort.train.finetune_cohort`)."""
    check_self_training(config)
    scans = unlabeled_scans(config, progress.log)
    with tempfile.TemporaryDirectory(prefix="medssl-selftrain-") as tmp:
        progress.log(f"self-training round 1: the cohort model from the {len(config.images)} labelled scan(s)")
        first = train_round(replace(config, unlabeled=(), out=Path(tmp) / "round1",
                                    loop=_first_round_loop(config)), progress, budget_given)
        meta = read_bundle_meta(first)
        steps = int(meta.training.get("steps") or 1)
        labels, kept = pseudo_labels(first, scans, Path(tmp) / "pseudo", config.device, progress)
        second_steps = max(1, int(round(SECOND_ROUND_FRACTION * steps)))
        progress.log(f"self-training round 2: {second_steps} steps on the labelled scans and {len(scans)} "
                     f"pseudo-labelled scan(s) ({100 * float(np.mean(kept)):.0f} % of their voxels kept)")
        record = {"unlabeled_scans": len(scans), "confidence": PSEUDO_CONFIDENCE,
                  "kept_fraction": [round(float(k), 4) for k in kept],
                  "round1": {"steps": steps, "init": meta.init}, "round2_steps": second_steps}
        second = replace(config, unlabeled=(), init=str(first), transfer="all", width=None, spacing=None,
                         patch=tuple(meta.patch_size), images=list(config.images) + scans,
                         labels=list(config.labels) + labels, steps_from_time=False,
                         loop=replace(config.loop, steps=second_steps, max_time=None))
        return train_round(second, progress, True, pseudo_from=len(config.images), self_training=record)


def sample_weights(labelled: int, pseudo: int) -> list[float]:
    """Per scan (the labelled ones first), how often round 2 draws its patches: 1 for a labelled scan; a
    pseudo-labelled one less when they outnumber the labelled ones, so that they give at most
    :data:`PSEUDO_SHARE` of the patches."""
    if pseudo == 0 or pseudo / (labelled + pseudo) <= PSEUDO_SHARE:
        return [1.0] * (labelled + pseudo)
    weight = PSEUDO_SHARE / (1.0 - PSEUDO_SHARE) * labelled / pseudo
    return [1.0] * labelled + [weight] * pseudo


def pseudo_labels(model_dir: Path, scans: list[Path], folder: Path, device: str,
                  progress: Progress) -> tuple[list[Path], list[float]]:
    """Each scan segmented by the bundle in ``model_dir`` (as ``medssl predict``), voxels below
    :data:`PSEUDO_CONFIDENCE` set to 255; written as ``folder``/pseudo-NNN.nii.gz on the scan's grid. Returns
    the paths and the fraction of voxels kept per scan."""
    from MedSSL.engine.runtime import resolve_device
    from MedSSL.tasks.infer import PredictOptions
    from MedSSL.tasks.infer.model import load_model
    from MedSSL.tasks.infer.predict import segment

    model = load_model(model_dir, resolve_device(device))
    options = PredictOptions(overlap=float(model.meta.inference_setting("overlap") or 0.5))
    folder.mkdir(parents=True, exist_ok=True)
    paths, kept = [], []
    progress.stage("pseudo-labels", f"segmenting {len(scans)} unlabelled scan(s)", total=len(scans))
    for i, source in enumerate(scans):
        volume = read_volume(source)
        result = segment(model, volume, source, options)
        labels = np.where(result.max_prob >= PSEUDO_CONFIDENCE, result.labels.array, IGNORE).astype(np.uint8)
        path = folder / f"pseudo-{i:03d}.nii.gz"
        write_volume(volume.with_array(labels), path)
        paths.append(path)
        kept.append(float(np.mean(labels != IGNORE)))
        progress.update(i + 1, len(scans))
    return paths, kept


def _first_round_loop(config: FinetuneConfig):
    if config.loop.max_time is None:
        return config.loop
    return replace(config.loop, max_time=config.loop.max_time * FIRST_ROUND_TIME_SHARE)
