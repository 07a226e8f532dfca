"""HD95 and average surface distance (mm) of two binary arrays, with MONAI, and with surfaces that ignore
unscored (not annotated) voxels. The conventions are those of :mod:`MedSSL.tasks.evaluate.metrics`."""

from __future__ import annotations

import warnings

import numpy as np


def surface_distances(p: np.ndarray, t: np.ndarray, spacing) -> tuple[float, float]:
    """HD95 and symmetric ASD (mm) of two non-empty binary arrays with MONAI's functions."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    yp = torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32))[None, None]
    yt = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI's own internal deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(yp, yt, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(yp, yt, include_background=True, symmetric=True, spacing=spacing)
    return float(hd95.reshape(-1)[0]), float(asd.reshape(-1)[0])


def scored_surface(obj: np.ndarray, unscored: np.ndarray) -> np.ndarray:
    """Surface voxels of ``obj``: those with a 6-neighbour that is scored and outside ``obj`` (or off
    the volume). Unscored neighbours do not make a surface."""
    from scipy.ndimage import binary_erosion

    edges = obj & ~binary_erosion(obj | unscored, border_value=0)
    return edges if edges.any() else obj


def surface_distances_with_unscored(p: np.ndarray, t: np.ndarray, unscored: np.ndarray, spacing) -> tuple[float, float]:
    """HD95 and symmetric ASD (mm) like MONAI's, with surfaces that ignore unscored voxels."""
    from monai.metrics.utils import get_surface_distance

    spacing = [float(s) for s in spacing]
    ep, et = scored_surface(p, unscored), scored_surface(t, unscored)
    d_pt = np.asarray(get_surface_distance(ep, et, "euclidean", spacing), dtype=np.float64)
    d_tp = np.asarray(get_surface_distance(et, ep, "euclidean", spacing), dtype=np.float64)
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    asd = float(np.concatenate([d_pt, d_tp]).mean())
    return hd95, asd
