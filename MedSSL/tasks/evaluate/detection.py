"""Lesion-level FROC of detections against label volumes, as in the CAD-PE challenge.

Rules (documented for ``medssl evaluate --detections``):

* A lesion is a connected component (26-connectivity) of the truth's lesion voxels: voxels equal to
  ``lesion_label``, or every voxel that is neither 0 nor the ignore value when no label is given.
* A detection is a hit when its ``center_mm`` (LPS point, mm) falls inside a lesion: the point is turned
  into the nearest voxel index with the truth's geometry (SimpleITK ``TransformPhysicalPointToIndex``).
* Each lesion is found once: at a score threshold it is a true positive when at least one detection
  at or above the threshold hits it. Further hits on an already found lesion are neither true nor false
  positives (CAD-PE). A detection outside every lesion (or outside the truth's grid) is a false
  positive; one on an unannotated voxel (truth = ignore value) is left out.
* The FROC curve pools the detections of all scans, thresholding on ``score``; detections with equal
  scores enter together. Sensitivity at *r* false positives per scan is the highest sensitivity reached
  with at most ``r * scans`` false positives (a step function, no interpolation).
  ``mean_sensitivity`` averages the sensitivities at 0.5, 1, 2, 4 and 8 false positives per scan
  (the "competition performance metric" of LUNA16/CAD-PE style challenges).

The detection JSON is a list of objects ``{"label", "name", "center_mm": [x, y, z], "score",
"volume_mm3", "bbox_mm"}``; only ``center_mm`` and ``score`` are used. ``{"detections": [...]}`` is
accepted too.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.io.output import read_json

FP_RATES = (0.5, 1, 2, 4, 8)


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def read_detections(path) -> list[dict]:
    """Validated detections of one scan: a list of dicts with float ``center_mm`` (3,) and ``score``."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("detections"), list):
        data = data["detections"]
    if not isinstance(data, list):
        raise MedSSLError(f"{path}: not a detection list (expected a JSON list of objects with center_mm and score)")
    out = []
    for i, det in enumerate(data):
        if not isinstance(det, dict) or "center_mm" not in det or "score" not in det:
            raise MedSSLError(f"{path}: detection {i} is not an object with center_mm and score")
        center, score = det["center_mm"], det["score"]
        try:
            center = [float(c) for c in center]
            score = float(score)
        except (TypeError, ValueError):
            raise MedSSLError(f"{path}: detection {i} has a non-numeric center_mm or score") from None
        if len(center) != 3 or not all(math.isfinite(c) for c in center) or not math.isfinite(score):
            raise MedSSLError(f"{path}: detection {i} needs center_mm [x, y, z] and a score, all finite numbers")
        out.append({**det, "center_mm": center, "score": score})
    return out


def lesion_components(labels: np.ndarray, lesion_label=None, ignore_value=255) -> tuple[np.ndarray, int]:
    """Connected components (26-connectivity) of the lesion voxels: (component ids, count)."""
    from scipy.ndimage import generate_binary_structure, label

    if lesion_label is not None:
        mask = labels == lesion_label
    else:
        mask = labels != 0
        if ignore_value is not None:
            mask &= labels != ignore_value
    components, count = label(mask, structure=generate_binary_structure(3, 3))
    return components, int(count)


def _index_mapper(volume):
    import SimpleITK as sitk

    geometry = sitk.Image(1, 1, 1, sitk.sitkUInt8)  # TransformPhysicalPointToIndex needs only the geometry
    geometry.SetSpacing([float(s) for s in volume.spacing])
    geometry.SetOrigin([float(o) for o in volume.origin])
    geometry.SetDirection([float(d) for d in volume.direction.reshape(-1)])
    return geometry.TransformPhysicalPointToIndex


def match_detections(detections: list[dict], volume, lesion_label=None, ignore_value=255) -> tuple[list, int, int]:
    """Where each detection of one scan falls: (list of (score, lesion id or 0 = FP or -1 = ignored),
    number of lesions, number of detections outside the grid)."""
    components, count = lesion_components(volume.array, lesion_label, ignore_value)
    to_index = _index_mapper(volume)
    shape = volume.shape
    matched, outside = [], 0
    for det in detections:
        index = to_index(tuple(det["center_mm"]))
        if any(i < 0 or i >= n for i, n in zip(index, shape)):
            matched.append((det["score"], 0))
            outside += 1
            continue
        lesion = int(components[index])
        if lesion == 0 and ignore_value is not None and volume.array[index] == ignore_value:
            lesion = -1
        matched.append((det["score"], lesion))
    return matched, count, outside


def froc(matches_per_scan: list[list], lesions_per_scan: list[int], fp_rates=FP_RATES) -> dict:
    """FROC from per-scan matches ((score, lesion id / 0 / -1) lists) and per-scan lesion counts."""
    scans = len(matches_per_scan)
    total = int(sum(lesions_per_scan))
    pooled = sorted(
        ((score, s, lesion) for s, matches in enumerate(matches_per_scan) for score, lesion in matches if lesion >= 0),
        key=lambda item: -item[0],
    )
    found: set = set()
    fp = 0
    curve = [{"fp_per_scan": 0.0, "sensitivity": 0.0 if total else None, "score": None}]
    i = 0
    while i < len(pooled):
        threshold = pooled[i][0]
        while i < len(pooled) and pooled[i][0] == threshold:
            _, scan, lesion = pooled[i]
            if lesion > 0:
                found.add((scan, lesion))
            else:
                fp += 1
            i += 1
        curve.append({"fp_per_scan": fp / scans if scans else 0.0,
                      "sensitivity": len(found) / total if total else None, "score": threshold})
    values = {}
    for rate in fp_rates:
        reachable = [c["sensitivity"] for c in curve if c["fp_per_scan"] <= rate + 1e-12]
        values[_rate_key(rate)] = max(reachable) if total and reachable else None
    defined = [v for v in values.values() if v is not None]
    return {
        "froc": values,
        "mean_sensitivity": float(np.mean(defined)) if total and defined else None,
        "lesions": total,
        "scans": scans,
        "detections": int(sum(len(m) for m in matches_per_scan)),
        "detections_ignored": int(sum(1 for m in matches_per_scan for _, lesion in m if lesion < 0)),
        "lesions_found": len(found),
        "false_positives": fp,
        "curve": curve,
    }


def froc_from_files(detection_paths, truth_paths, lesion_label=None, ignore_value=255, log=None) -> dict:
    """FROC of detection JSON files against label volumes, paired in order (see the module docstring)."""
    from MedSSL.io.volumes import read_volume
    from MedSSL.tasks.evaluate.metrics import as_label_array

    detection_paths, truth_paths = list(detection_paths), list(truth_paths)
    if len(detection_paths) != len(truth_paths):
        raise MedSSLError(
            f"--detections: {len(detection_paths)} file(s) but {len(truth_paths)} --truth volume(s); give one truth per detection file, in the same order"
        )
    detections = [read_detections(p) for p in detection_paths]
    matches, lesions = [], []
    for det_path, truth_path, dets in zip(detection_paths, truth_paths, detections):
        volume = read_volume(truth_path)
        volume.array = as_label_array(volume.array, str(truth_path))
        m, count, outside = match_detections(dets, volume, lesion_label, ignore_value)
        if count == 0:
            (log or _stderr)(f"{truth_path}: no lesion voxels" + (f" with label {lesion_label}" if lesion_label is not None else ""))
        if outside:
            (log or _stderr)(f"{det_path}: {outside} detection(s) outside the grid of {truth_path}, counted as false positives")
        matches.append(m)
        lesions.append(count)
    result = froc(matches, lesions)
    if result["lesions"] == 0:
        (log or _stderr)("no lesions in any truth volume: sensitivities are undefined (null)")
    return result


def _stderr(message: str) -> None:
    sys.stderr.write(f"medssl evaluate: {message}\n")
