"""Reading the (image, label) pairs of ``medssl finetune --task segment`` and naming their classes."""

from __future__ import annotations

import numpy as np

from MedSSL.data.labels import (IGNORE, LabelMapping, annotation_summary, label_array, parse_classes, present_values,
                                read_classes_file, resolve_classes, sidecar_path)
from MedSSL.data.position import PositionFrame
from MedSSL.data.preprocess import resample_to_spacing
from MedSSL.data.sampling import TrainingVolume
from MedSSL.data.spatial import image_dims
from MedSSL.errors import MedSSLError
from MedSSL.tasks import FinetuneConfig
from MedSSL.tasks.finetune.common import normalize


def _resample_label(label, spacing):
    """Nearest-neighbour resampling of a label volume; voxels from outside the grid become 255."""
    shifted = label.with_array(label.array.astype(np.uint16) + 1)
    out = resample_to_spacing(shifted, spacing, nearest=True)
    values = out.array.astype(np.int32) - 1
    out.array = np.where(values < 0, IGNORE, values).astype(np.uint8)
    return out


def given_classes(config: FinetuneConfig) -> tuple[dict | None, str]:
    """Classes from ``--classes`` or the first label's sidecar, and where they came from."""
    if config.classes is not None:
        return parse_classes(config.classes), f"--classes {config.classes}"
    sidecar = sidecar_path(config.labels[0])
    if sidecar.is_file():
        return read_classes_file(sidecar), str(sidecar)
    return None, "labels"


def load_segmentation_data(config: FinetuneConfig, intensity, spacing, complete=None):
    """Read, check and preprocess every (image, label) pair.

    With ``config.position`` "on" each volume gets its position frame (:mod:`MedSSL.data.position`).
    ``complete``: None, or a function ``(image Volume, labels (X, Y, Z) uint8, index) -> labels`` applied to
    each pair on its own grid before any resampling (the cohort model completes paintings with it,
    :mod:`MedSSL.tasks.cohort`); the summary describes the labels trained on (completed ones are dense).

    Returns (volumes as :class:`TrainingVolume` with label values still original, summary dict,
    modalities list, spatial dims: 2 when every image is one-slice (X, Y, 1), 3 when every image is a
    volume). Raises MedSSLError naming the offending file (a mix of both included).
    """
    from MedSSL.io.volumes import read_volume

    if not config.images:
        raise MedSSLError("finetune --task segment: give at least one --image PATH --label PATH pair")
    if len(config.images) != len(config.labels):
        raise MedSSLError(f"--image/--label: {len(config.images)} image(s) but {len(config.labels)} label(s); give them in pairs")
    volumes, summary, modalities = [], {"volumes": 0, "shapes": [], "spacings_mm": [], "annotations": []}, []
    first = None
    for image_path, label_path in zip(config.images, config.labels):
        raw_image = read_volume(image_path)
        dims = image_dims(raw_image.shape, image_path, first)
        first = first or (dims, image_path)
        raw_label = read_volume(label_path)
        labels = label_array(raw_label, raw_image, label_path, image_path)
        if complete is not None:
            labels = complete(raw_image, labels, len(volumes))
        summary["annotations"].append(annotation_summary(labels))
        image = raw_image
        if spacing is not None:  # one-slice images: in-plane only (resample_to_spacing)
            image = resample_to_spacing(raw_image, spacing)
            labels = _resample_label(raw_label.with_array(labels), spacing).array
        array, modality = normalize(image, intensity)
        modalities.append(modality)
        frame = PositionFrame.of(array, image.spacing, image.direction) if config.position == "on" else None
        volumes.append(TrainingVolume(array.astype(np.float16), labels, frame))
        summary["volumes"] += 1
        summary["shapes"].append(list(image.shape))
        summary["spacings_mm"].append([round(float(s), 4) for s in image.spacing])
    return volumes, summary, modalities, first[0]


def mapping_and_classes(volumes, config: FinetuneConfig) -> tuple[LabelMapping, dict]:
    """The label values present in ``volumes`` (channel mapping) and their classes (names, colours)."""
    values = sorted(set().union(*(present_values(v.target) for v in volumes)))
    if not values:
        raise MedSSLError(
            f"{config.labels[0] if len(config.labels) == 1 else '--label'}: no class voxels in any label "
            "(only background 0 and not-annotated 255); paint at least one structure"
        )
    given, where = given_classes(config)
    return LabelMapping(values), resolve_classes(values, given, where)
