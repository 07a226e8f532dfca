"""Self-discovery geometry on numpy volumes: resizing to the feature grid, cubes around normalised
centres, body fractions of boxes, nearest neighbours by feature distance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_volume(array: np.ndarray, grid) -> np.ndarray:
    """(X, Y, Z) array -> float32 ``grid``: box-average down, trilinear up (per axis as needed)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    grid = tuple(int(g) for g in grid)
    smaller = tuple(min(s, g) for s, g in zip(t.shape[2:], grid))
    if smaller != tuple(t.shape[2:]):
        t = F.adaptive_avg_pool3d(t, smaller)
    if smaller != grid:
        t = F.interpolate(t, size=grid, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def crop_box(array: np.ndarray, centre, size) -> np.ndarray:
    """The box of ``size`` voxels centred at the normalised ``centre`` (fractions of each axis) of an
    (X, Y, Z) array; parts outside the array are 0. float32."""
    shape = np.asarray(array.shape)
    size = np.asarray(size, dtype=np.int64)
    corner = np.rint(np.asarray(centre, dtype=np.float64) * shape - size / 2.0).astype(np.int64)
    out = np.zeros(tuple(size), dtype=np.float32)
    src, dst = [], []
    for c, s, n in zip(corner, size, shape):
        lo, hi = max(c, 0), min(c + s, n)
        if hi <= lo:
            return out
        src.append(slice(int(lo), int(hi)))
        dst.append(slice(int(lo - c), int(hi - c)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_resized(array: np.ndarray, centre, size, out_size) -> np.ndarray:
    """:func:`crop_box` of ``size`` then resized (trilinear) to ``out_size``."""
    box = crop_box(array, centre, size)
    if tuple(box.shape) == tuple(out_size):
        return box
    t = torch.from_numpy(box)[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in out_size), mode="trilinear", align_corners=False)[0, 0].numpy()


def box_fraction(mask_small: np.ndarray, centre, half_extent) -> float:
    """Fraction of the normalised box [centre - half, centre + half] that is True in a small-grid mask."""
    shape = np.asarray(mask_small.shape)
    lo = np.floor((np.asarray(centre) - half_extent) * shape).astype(int)
    hi = np.ceil((np.asarray(centre) + half_extent) * shape).astype(int)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    hi = np.maximum(hi, lo + 1)
    region = mask_small[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return float(region.mean()) if region.size else 0.0


def nearest_neighbours(features: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of ``features`` nearest to ``query`` (L2), nearest first (stable)."""
    d = np.linalg.norm(np.asarray(features, dtype=np.float64) - np.asarray(query, dtype=np.float64)[None], axis=1)
    return np.argsort(d, kind="stable")[: max(0, int(k))]
