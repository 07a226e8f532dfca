"""Evaluation: segmentation metrics, detection FROC, classification ROC AUC, figures, and the
shape-based slice interpolation baseline.

* :func:`segmentation_metrics` (``metrics.py``): per-class Dice, IoU, HD95 and average surface distance
  on label arrays, voxels marked 255 in the truth excluded.
* :func:`froc` (``detection.py``): lesion-level FROC as in the CAD-PE challenge.
* :func:`classification_metrics` (``classification.py``): ROC AUC by the rank statistic.
* :func:`interpolate_between_slices` (``interpolation.py``): fill between annotated slices by
  signed-distance interpolation (the label-efficiency benchmark's baseline).
* ``figures.py``: PNG figures of the results (matplotlib, Agg).

The CLI front end is ``medssl evaluate`` (:mod:`MedSSL.commands.evaluate`).
"""

from __future__ import annotations

__all__ = [
    "segmentation_metrics",
    "evaluate_segmentation_files",
    "froc",
    "froc_from_files",
    "classification_metrics",
    "interpolate_between_slices",
]


def __getattr__(name):  # light import: torch/MONAI and matplotlib load only when used
    if name in ("segmentation_metrics", "evaluate_segmentation_files"):
        from MedSSL.tasks.evaluate import metrics

        return getattr(metrics, name)
    if name in ("froc", "froc_from_files"):
        from MedSSL.tasks.evaluate import detection

        return getattr(detection, name)
    if name == "classification_metrics":
        from MedSSL.tasks.evaluate import classification

        return classification.classification_metrics
    if name == "interpolate_between_slices":
        from MedSSL.tasks.evaluate import interpolation

        return interpolation.interpolate_between_slices
    raise AttributeError(name)
