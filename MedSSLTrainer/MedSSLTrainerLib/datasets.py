"""Labelled datasets from the scene for methods that accrue several annotated collections (Ark).

The backend takes ``medssl pretrain --method ark --datasets SPEC.json`` (see ``MedSSL.data.labelled``):
datasets whose label sets differ, e.g. a liver set, a spleen set and an aorta set. In Slicer a dataset is
a name and a list of (volume node, segmentation node) cases; the segments of a dataset's segmentations
become its classes, matched by segment NAME across the dataset's cases (the same organ must carry the same
name in every case of a dataset) and numbered 1, 2, ... in the order they are first met; empty segments
are left out. Voxels outside every segment are background (0): a case must be fully annotated for its
dataset's classes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from MedSSLCommonLib import nodes

MAX_CLASSES = 254


def methodTakesDatasets(method: dict) -> bool:
    """Whether a method of ``medssl methods --json`` learns from labelled datasets (``--datasets SPEC.json``)
    rather than unlabeled volumes (``--data``)."""
    return str(method.get("data", "")).startswith("--datasets")


def writeDatasetsSpec(datasets, folder) -> str:
    """Write every case's image and labels as NRRD and the backend's SPEC.json into ``folder``.

    datasets: ``[{"name": str, "cases": [(volumeNode, segmentationNode), ...]}, ...]``. The labels of a
    case are its segments rasterised on the volume's grid (values = the dataset's class numbers).
    Returns the SPEC.json path. Raises ``ValueError`` (naming the dataset or node) for an empty dataset,
    a missing node, a segmentation without segments, or more than 254 classes in one dataset.
    """
    datasets = list(datasets or [])
    if not datasets:
        raise ValueError("give at least one labelled dataset")
    os.makedirs(folder, exist_ok=True)
    names = [str(d.get("name", "")).strip() for d in datasets]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"every dataset needs its own non-empty name; got {names}")
    spec = []
    for d, (name, dataset) in enumerate(zip(names, datasets)):
        cases = list(dataset.get("cases") or [])
        if not cases:
            raise ValueError(f"dataset '{name}' has no cases")
        classes: dict[str, dict] = {}  # segment name -> {"value", "color"}
        written = []
        for c, case in enumerate(cases):
            volume, segmentation = _case(name, c, case)
            labels, segments = nodes.segmentsLabelmap(segmentation, volume)
            remap = np.zeros(len(segments) + 1, np.uint8)
            present = set(np.unique(labels).tolist())
            for position, segment in enumerate(segments, start=1):
                if position not in present:  # an empty segment declares no class
                    continue
                entry = classes.setdefault(segment["name"], {"value": len(classes) + 1, "color": segment["color"]})
                if entry["value"] > MAX_CLASSES:
                    raise ValueError(f"dataset '{name}' has more than {MAX_CLASSES} classes")
                remap[position] = entry["value"]
            prefix = os.path.join(folder, f"dataset{d:02d}-case{c:03d}")
            image = nodes.writeVolume(volume, prefix + "-image.nrrd")
            label = nodes.writeArray(remap[labels], nodes.ijkToRasArray(volume), prefix + "-label.nrrd")
            written.append({"image": image, "label": label})
        if not classes:
            raise ValueError(f"dataset '{name}': none of its segments contains a voxel inside its volume")
        spec.append({"name": name, "cases": written,
                     "classes": {str(v["value"]): {"name": n, "color": [float(x) for x in v["color"]]}
                                 for n, v in classes.items()}})
    path = os.path.join(folder, "datasets.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"datasets": spec}, handle, indent=1)
    return path


def _case(name, index, case):
    """(volume node, segmentation node) of one case, checked."""
    try:
        volume, segmentation = case
    except (TypeError, ValueError):
        raise ValueError(f"dataset '{name}' case {index}: expected (volume node, segmentation node)") from None
    if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or volume.GetImageData() is None:
        raise ValueError(f"dataset '{name}' case {index}: not a volume with image data")
    if segmentation is None or not segmentation.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"dataset '{name}' case {index}: not a segmentation node")
    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"dataset '{name}' case {index}: segmentation '{segmentation.GetName()}' has no segments")
    return volume, segmentation
