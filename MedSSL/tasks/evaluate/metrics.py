"""Segmentation metrics per class: Dice, IoU, HD95 and average surface distance (mm).

Conventions (also what ``medssl evaluate --pred`` writes):

* Classes are the label values present in the prediction or the truth (within the scored voxels),
  except 0 (background) and the ignore value; ``labels=`` adds or fixes the list. Label values are
  reported as in the files, as JSON object keys (``"1"``, ``"2"``...).
* Voxels whose truth is ``ignore_value`` (255 = not annotated) are not scored: they count as neither
  class in either volume. For surface distances a voxel next to an unscored voxel is *not* a surface
  voxel (its neighbour is unknown), so cutting an object with unannotated slices adds no artificial
  surfaces. Masked entries of ``numpy.ma`` arrays (in either input) are unscored too.
* Dice = 2|P∩T| / (|P|+|T|), IoU = |P∩T| / |P∪T| (MONAI ``DiceMetric`` and ``MeanIoU``).
* HD95 = max of the two directed 95th percentiles of surface-voxel distances; ASD = mean of the
  distances in both directions pooled (MONAI ``compute_hausdorff_distance(percentile=95)`` and
  ``compute_average_surface_distance(symmetric=True)``, surface voxels = the object minus its
  6-connected erosion, the volume border counting as outside), in mm through ``spacing``. A one-slice
  image (X, Y, 1) is scored as 2D: surfaces are its in-plane contours (4-connected erosion).
* A class absent from both volumes (possible only when it is asked for in ``labels``): Dice and IoU 1.0
  but ``"scored": false`` and left out of the means; distances ``None``.
  Absent from one volume only: Dice 0, IoU 0, distances ``None`` (infinite; no surface to compare),
  counted in ``mean_dice``/``mean_iou`` but not in the distance means.
* ``mean_dice``/``mean_iou`` average the scored classes; ``mean_hd95_mm``/``mean_asd_mm`` average the
  classes whose distance is defined. ``None`` when there is nothing to average. ``None`` is JSON null.
* Per-class values are rounded to 6 decimals (MONAI computes in float32).
"""

from __future__ import annotations

import math

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.tasks.evaluate.grid_alignment import align_prediction
from MedSSL.tasks.evaluate.surface_distances import surface_distances, surface_distances_with_unscored


def as_label_array(array, name: str) -> np.ndarray:
    """An integer copy-free view of ``array`` when it holds labels; MedSSLError naming ``name`` otherwise.

    bool -> uint8; integer dtypes as they are; floats accepted when every value is a whole number.
    """
    arr = np.asarray(array)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise MedSSLError(f"{name}: contains NaN or infinite values; expected a label map")
        frac = arr != np.round(arr)
        if frac.any():
            value = float(arr[frac].flat[0])
            raise MedSSLError(
                f"{name}: not a label map (non-integer values such as {value:.4g}); give integer labels, not probabilities"
            )
        if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
            raise MedSSLError(f"{name}: label values out of the integer range")
        return arr.astype(np.int64)
    raise MedSSLError(f"{name}: voxel type {arr.dtype} is not a label map")


def _split_masked(array):
    if np.ma.isMaskedArray(array):
        mask = np.ma.getmaskarray(array)
        return np.ma.getdata(array), (mask if mask.any() else None)
    return array, None


def _present_labels(arr: np.ndarray, scored: np.ndarray | None) -> set:
    values = arr if scored is None else arr[scored]
    if values.size == 0:
        return set()
    if values.dtype.kind in "iu" and values.min() >= 0 and values.max() < 65536:
        counts = np.bincount(values.reshape(-1).astype(np.int64, copy=False))
        return {int(v) for v in np.nonzero(counts)[0]}
    return {int(v) for v in np.unique(values)}


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple:
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.nonzero(mask.any(axis=other))[0]
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        slices.append(slice(max(lo - margin, 0), min(hi + margin, mask.shape[axis])))
    return tuple(slices)


def _finite_or_none(value) -> float | None:
    """A float rounded to 6 decimals (MONAI computes in float32), None when NaN or infinite."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def _overlap_scores(p: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two non-empty-union binary arrays with MONAI's metrics."""
    import torch
    from monai.metrics import DiceMetric, MeanIoU

    yp = torch.from_numpy(np.ascontiguousarray(p, dtype=np.float64))[None, None]
    yt = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64))[None, None]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(yp, yt)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(yp, yt)
    return float(dice.reshape(-1)[0]), float(iou.reshape(-1)[0])


def _drop_single_slice_axes(pred, truth, pred_mask, truth_mask, spacing):
    """A one-slice image (X, Y, 1) is a 2D image: its axes of length 1 are dropped (with their spacing)
    so that surfaces are the in-plane contours, not every pixel (a neighbour off a one-voxel-thick
    volume would make every pixel a surface pixel). Volumes are returned unchanged."""
    flat = tuple(a for a in range(truth.ndim) if truth.shape[a] == 1)
    if not flat or truth.ndim - len(flat) < 2:
        return pred, truth, pred_mask, truth_mask, spacing
    keep = [a for a in range(truth.ndim) if a not in flat]

    def squeeze(a):
        return None if a is None else np.squeeze(a, axis=flat)

    return squeeze(pred), squeeze(truth), squeeze(pred_mask), squeeze(truth_mask), spacing[keep]


def _class_name(classes, label):
    if not classes:
        return None
    entry = classes.get(str(label), classes.get(label) if isinstance(classes, dict) else None)
    if isinstance(entry, dict):
        entry = entry.get("name")
    return None if entry is None else str(entry)


def segmentation_metrics(pred, truth, spacing=None, labels=None, ignore_value=255, classes=None) -> dict:
    """Per-class Dice, IoU, HD95 and ASD of a label array against a truth label array on the same grid.

    pred, truth: (X, Y, Z) integer label arrays (whole-number floats and bool accepted; ``numpy.ma``
    masked entries are not scored). spacing: (3,) mm per index step, None = 1 (distances in voxels).
    labels: label values to report (default: those present, 0 and ``ignore_value`` excepted).
    ignore_value: truth value meaning "not annotated" (None: every voxel is scored).
    classes: optional {label: name or {"name": ...}}; names are added to the report.

    Returns ``{"per_class": {"<label>": {"dice", "iou", "hd95_mm", "asd_mm", "truth_voxels",
    "pred_voxels", "scored"[, "name"]}}, "mean_dice", "mean_iou", "mean_hd95_mm", "mean_asd_mm",
    "classes_scored", "scored_voxels", "ignored_voxels", "spacing_mm"}`` (see the module docstring for
    empty classes). Raises MedSSLError for shape mismatches and non-label inputs.
    """
    pred, pred_mask = _split_masked(pred)
    truth, truth_mask = _split_masked(truth)
    pred = as_label_array(pred, "prediction")
    truth = as_label_array(truth, "truth")
    if pred.shape != truth.shape:
        raise MedSSLError(f"prediction: shape {tuple(pred.shape)} differs from the truth's {tuple(truth.shape)}")
    spacing = np.ones(truth.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != truth.ndim or not np.all(spacing > 0):
        raise MedSSLError(f"spacing {spacing.tolist()}: expected {truth.ndim} positive values")
    reported_spacing = [float(s) for s in spacing]
    pred, truth, pred_mask, truth_mask, spacing = _drop_single_slice_axes(pred, truth, pred_mask, truth_mask, spacing)

    unscored = _unscored_voxels(truth, ignore_value, pred_mask, truth_mask)
    scored = None if unscored is None else ~unscored
    wanted = _wanted_labels(pred, truth, scored, labels, classes, ignore_value)

    per_class: dict[str, dict] = {}
    for label in sorted(wanted):
        entry = _class_scores(pred == label, truth == label, scored, unscored, spacing)
        name = _class_name(classes, label)
        if name is not None:
            entry["name"] = name
        per_class[str(label)] = entry

    n_unscored = 0 if unscored is None else int(np.count_nonzero(unscored))
    return {
        "per_class": per_class,
        "mean_dice": _mean_over_classes(per_class, "dice"),
        "mean_iou": _mean_over_classes(per_class, "iou"),
        "mean_hd95_mm": _mean_over_classes(per_class, "hd95_mm"),
        "mean_asd_mm": _mean_over_classes(per_class, "asd_mm"),
        "classes_scored": sum(1 for e in per_class.values() if e["scored"]),
        "scored_voxels": int(truth.size - n_unscored),
        "ignored_voxels": n_unscored,
        "spacing_mm": reported_spacing,
    }


def _unscored_voxels(truth: np.ndarray, ignore_value, pred_mask, truth_mask) -> np.ndarray | None:
    """Voxels not scored: truth == ``ignore_value`` or masked in either input; None when every voxel is."""
    unscored = None
    if ignore_value is not None:
        ignored = truth == ignore_value
        if ignored.any():
            unscored = ignored
    for mask in (pred_mask, truth_mask):
        if mask is not None:
            unscored = mask if unscored is None else (unscored | mask)
    return unscored


def _wanted_labels(pred, truth, scored, labels, classes, ignore_value) -> set:
    """``labels`` when given, else the values present in either array (scored voxels) or in ``classes``,
    0 and ``ignore_value`` excepted."""
    if labels is not None:
        return {int(v) for v in labels}
    wanted = _present_labels(pred, scored) | _present_labels(truth, scored)
    if classes:
        wanted |= {int(k) for k in classes}
    wanted -= {0}
    if ignore_value is not None:
        wanted.discard(int(ignore_value))
    return wanted


def _class_scores(p: np.ndarray, t: np.ndarray, scored, unscored, spacing) -> dict:
    """The report entry of one class (binary prediction ``p`` and truth ``t``), without its name."""
    if scored is not None:
        p &= scored
        t &= scored
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    entry = {"dice": 1.0, "iou": 1.0, "hd95_mm": None, "asd_mm": None,
             "truth_voxels": n_t, "pred_voxels": n_p, "scored": bool(n_p or n_t)}
    if n_p or n_t:
        box = _bbox(p | t)
        pc, tc = p[box], t[box]
        entry["dice"], entry["iou"] = (_finite_or_none(v) for v in _overlap_scores(pc, tc))
        if n_p and n_t:
            if unscored is not None and unscored[box].any():
                hd95, asd = surface_distances_with_unscored(pc, tc, unscored[box], spacing)
            else:
                hd95, asd = surface_distances(pc, tc, spacing)
            entry["hd95_mm"], entry["asd_mm"] = _finite_or_none(hd95), _finite_or_none(asd)
    return entry


def _mean_over_classes(per_class: dict, key: str) -> float | None:
    """Mean of ``key`` over the scored classes where it is defined; None when there is none."""
    values = [e[key] for e in per_class.values() if e[key] is not None and e["scored"]]
    return float(np.mean(values)) if values else None


def evaluate_segmentation_files(pred_path, truth_path, classes=None, ignore_value=255, log=None) -> dict:
    """Read a predicted and a true label volume and return :func:`segmentation_metrics` on the truth's
    grid (the prediction resampled there when needed, see :func:`align_prediction`)."""
    from MedSSL.io.volumes import read_volume

    truth = read_volume(truth_path)
    pred = read_volume(pred_path)
    as_label_array(truth.array, str(truth_path))
    as_label_array(pred.array, str(pred_path))
    aligned = align_prediction(pred, truth, str(pred_path), log)
    result = segmentation_metrics(aligned.array, truth.array, truth.spacing, ignore_value=ignore_value, classes=classes)
    result["prediction_resampled"] = aligned is not pred
    return result
