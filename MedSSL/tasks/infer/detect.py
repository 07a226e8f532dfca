"""Detections: one finding per connected component (6-connectivity) of each predicted class.

Positions are physical LPS millimetres as ITK/SimpleITK gives them (``origin + direction @ (spacing *
index)``), so they land on the same spot in Slicer (which shows RAS: negate x and y) as in any ITK tool.

On a one-slice map (X, Y, 1) (a 2D model's prediction) components are 4-connected in the plane;
``volume_mm3`` then uses the slice thickness of the image header, and ``area_mm2`` gives the in-plane
area.

:func:`find_detections` returns every component, ranked (the complete findings list);
:func:`select_findings` keeps the handful a reader wants to see: score at least :data:`DEFAULT_MIN_SCORE`,
volume at least :data:`DEFAULT_MIN_VOLUME_MM3`, at most :data:`DEFAULT_MAX_FINDINGS`, best first. The
Slicer module applies the same defaults to the markups it creates (the findings table can list all).
The defaults were checked by FROC on new scans of the two cohorts of ../shared/data (cohort models' findings;
Testing/Benchmarks/bench_detection_defaults.py, docs/benchmarks/detection.md): at most 1 false positive per
scan in each cohort, no other minimum score or volume was more sensitive (the cap is not chosen there).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from MedSSL.data.spatial import is_one_slice
from MedSSL.io.volumes import Volume


DEFAULT_MIN_SCORE = 0.5
"""Findings whose mean probability is below this are not shown by default."""

DEFAULT_MIN_VOLUME_MM3 = 20.0
"""Findings smaller than this (mm^3; about 3 mm across) are not shown by default: one- or two-voxel
components are the bulk of a detector's false positives."""

DEFAULT_MAX_FINDINGS = 10
"""At most this many findings are shown by default, best score first."""


def select_findings(found: list[dict], min_score: float = DEFAULT_MIN_SCORE,
                    min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3, max_count: int | None = DEFAULT_MAX_FINDINGS) -> list[dict]:
    """The findings to show: score >= ``min_score`` and ``volume_mm3`` >= ``min_volume_mm3``, best first, at
    most ``max_count`` (None: no cap). ``found`` as :func:`find_detections` returns it."""
    kept = [f for f in sorted(found, key=lambda d: (-d["score"], -d["volume_mm3"]))
            if f["score"] >= min_score and f["volume_mm3"] >= min_volume_mm3]
    return kept if max_count is None else kept[: max(0, int(max_count))]


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(8, 3) index-space corners of the voxel box [lo - 0.5, hi + 0.5]."""
    return np.array([[(lo if b == 0 else hi)[a] + (0.5 if b else -0.5) for a, b in enumerate(bits)]
                     for bits in itertools.product((0, 1), repeat=3)], dtype=np.float64)


def find_detections(labels: np.ndarray, prob: np.ndarray, grid: Volume, names: dict,
                    min_volume_mm3: float = 0.0) -> list[dict]:
    """labels: uint8 (X, Y, Z) original values; prob: (X, Y, Z) probability of the predicted class at
    each voxel; grid: the geometry; names: {value: name}.

    Returns a list of ``{"label", "name", "center_mm", "score", "max_score", "volume_mm3", "voxels",
    "bbox_mm", "rank"}`` (and ``"area_mm2"`` on a one-slice grid) sorted by ``score`` (mean probability
    inside the component) descending, ``rank`` 1 first: every component (see :func:`select_findings`). ``center_mm``:
    LPS centroid of the voxel centres; ``bbox_mm``: [[min x, y, z], [max x, y, z]] in LPS over the
    corners of the component's voxels (on an oblique grid: the LPS-aligned box around them).
    """
    voxel_mm3 = float(np.prod(grid.spacing))
    pixel_mm2 = float(grid.spacing[0] * grid.spacing[1]) if is_one_slice(grid.shape) else None
    found = []
    class_boxes = ndimage.find_objects(labels)  # bounding box of each value, so work happens on crops
    for value, class_box in enumerate(class_boxes, start=1):
        if class_box is None:
            continue
        offset = np.array([s.start for s in class_box], dtype=np.float64)
        mask = labels[class_box] == value
        comp, n = ndimage.label(mask)
        index = np.arange(1, n + 1)
        counts = np.bincount(comp.reshape(-1), minlength=n + 1)[1:]
        p = prob[class_box].astype(np.float32)
        means, maxima = ndimage.mean(p, comp, index), ndimage.maximum(p, comp, index)
        centres = np.atleast_2d(np.array(ndimage.center_of_mass(mask, comp, index), dtype=np.float64)) + offset
        for k, box in enumerate(ndimage.find_objects(comp)):
            volume = float(counts[k]) * voxel_mm3
            if box is None or volume < min_volume_mm3:
                continue
            lo = offset + np.array([s.start for s in box], dtype=np.float64)
            hi = offset + np.array([s.stop - 1 for s in box], dtype=np.float64)
            corners = grid.index_to_physical(_corners(lo, hi))
            found.append({
                "label": value,
                "name": names.get(value, f"label_{value}"),
                "center_mm": [round(float(c), 3) for c in grid.index_to_physical(centres[k])[0]],
                "score": round(float(means[k]), 4),
                "max_score": round(float(maxima[k]), 4),
                "volume_mm3": round(volume, 3),
                **({"area_mm2": round(float(counts[k]) * pixel_mm2, 3)} if pixel_mm2 is not None else {}),
                "voxels": int(counts[k]),
                "bbox_mm": [[round(float(c), 3) for c in corners.min(axis=0)],
                            [round(float(c), 3) for c in corners.max(axis=0)]],
            })
    found.sort(key=lambda d: (-d["score"], -d["volume_mm3"]))
    for rank, finding in enumerate(found, start=1):
        finding["rank"] = rank
    return found
