"""Shape-based interpolation between annotated slices: the "no learning" baseline.

This is what Slicer's Segment Editor "Fill between slices" does for a user who paints every n-th slice:
each unannotated slice between two annotated ones gets a shape blended from its two neighbours, and
nothing is extrapolated beyond the first and last annotated slices.

Slicer's effect uses ITK's morphological contour interpolation (``itk::MorphologicalContourInterpolator``).
That filter is an ITK remote module that the SimpleITK wheels do not ship (SimpleITK 2.5 has no
``MorphologicalContourInterpolator``), so the baseline here is the classic signed-distance
interpolation (Raya & Udupa 1990; Herman et al. 1992):

* per class and per pair of consecutive annotated slices ``k0 < k1``, the 2D signed distance map of the
  class on each (in mm when ``spacing`` is given, negative inside; ``scipy.ndimage.distance_transform_edt``)
  is blended linearly, ``(1 - t) * d0 + t * d1`` with ``t = (k - k0) / (k1 - k0)``, and the class is
  where the blend is negative. Two concentric discs of radii r0 and r1 give discs of radius
  ``(1 - t) r0 + t r1`` (a cone), exactly as painting by hand would suggest.
* a class present on one of the two slices only tapers off: the empty side is given the present side's
  map shifted by its largest inside depth, so the shape erodes linearly and vanishes at the empty slice
  (an annotated slice without the class says the class is absent there).
* where the blended shapes of several classes overlap, the voxel goes to the class it is deepest in
  (lowest blended distance).

Both approaches agree on convex shapes that overlap from slice to slice; they differ on branching and on
shapes that move a lot between annotated slices, where the morphological method aligns and matches
regions and this one blends in place.

Input convention: ``ignore_value`` (255) marks voxels that are not annotated. A slice with at least one
other value is an annotated slice; its remaining ignore-valued voxels are taken as background.
"""

from __future__ import annotations

import numpy as np

from MedSSL.errors import MedSSLError


def _signed_distance(mask: np.ndarray, sampling) -> np.ndarray:
    """2D signed distance (negative inside, zero level halfway between boundary pixels)."""
    from scipy.ndimage import distance_transform_edt

    if mask.all():  # no background: everything deep inside
        return np.full(mask.shape, -float(np.sum(np.asarray(sampling) * mask.shape)), dtype=np.float64)
    outside = distance_transform_edt(~mask, sampling=sampling)
    inside = distance_transform_edt(mask, sampling=sampling)
    return outside - inside


def annotated_slices(sparse_label: np.ndarray, axis: int = 2, ignore_value=255) -> list[int]:
    """Indices along ``axis`` of the slices holding at least one voxel other than ``ignore_value``."""
    arr = np.asarray(sparse_label)
    other = tuple(a for a in range(arr.ndim) if a != axis)
    if ignore_value is None:
        return list(range(arr.shape[axis]))
    return [int(k) for k in np.nonzero((arr != ignore_value).any(axis=other))[0]]


def interpolate_between_slices(sparse_label: np.ndarray, axis: int = 2, spacing=None, ignore_value=255) -> np.ndarray:
    """Fill the unannotated slices between annotated ones by signed-distance interpolation per class.

    sparse_label: (X, Y, Z) integer labels, ``ignore_value`` (255) = not annotated. axis: the slice axis
    (2 = Z, the axial slices of an (X, Y, Z) volume). spacing: (3,) mm per index step (only the two
    in-plane values matter; None = isotropic). Returns an array of the same shape and dtype with no
    ignore values: annotated slices as given (their ignore voxels -> 0), slices between two annotated
    slices interpolated, slices before the first or after the last annotated slice background (0).
    """
    from MedSSL.tasks.evaluate.metrics import as_label_array

    arr = as_label_array(sparse_label, "sparse label")
    if arr.ndim != 3:
        raise MedSSLError(f"sparse label: expected a 3D array, got shape {tuple(arr.shape)}")
    if axis not in (0, 1, 2, -1, -2, -3):
        raise MedSSLError(f"axis {axis}: must be 0, 1 or 2")
    axis = axis % 3
    if spacing is None:
        sampling = (1.0, 1.0)
    else:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if spacing.size != 3 or not np.all(spacing > 0):
            raise MedSSLError(f"spacing {spacing.tolist()}: expected 3 positive values")
        sampling = tuple(float(s) for i, s in enumerate(spacing) if i != axis)

    moved = np.moveaxis(arr, axis, -1)
    dtype = np.asarray(sparse_label).dtype
    out = np.zeros(moved.shape, dtype=np.uint8 if dtype == bool else dtype)
    done = annotated_slices(moved, axis=2, ignore_value=ignore_value)
    for k in done:
        plane = moved[..., k].copy()
        if ignore_value is not None:
            plane[plane == ignore_value] = 0
        out[..., k] = plane

    classes = set()
    for k in done:
        classes |= {int(v) for v in np.unique(out[..., k])}
    classes.discard(0)

    for k0, k1 in zip(done[:-1], done[1:]):
        if k1 - k0 < 2:
            continue
        maps = []
        for c in sorted(classes):
            m0, m1 = out[..., k0] == c, out[..., k1] == c
            if not m0.any() and not m1.any():
                continue
            d0 = _signed_distance(m0, sampling) if m0.any() else None
            d1 = _signed_distance(m1, sampling) if m1.any() else None
            if d0 is None:
                d0 = d1 + max(float(-d1.min()), 0.0)
            if d1 is None:
                d1 = d0 + max(float(-d0.min()), 0.0)
            maps.append((c, d0, d1))
        if not maps:
            continue
        for k in range(k0 + 1, k1):
            t = (k - k0) / (k1 - k0)
            best = np.zeros(moved.shape[:2], dtype=np.float64)  # only negative (inside) values win
            plane = np.zeros(moved.shape[:2], dtype=out.dtype)
            for c, d0, d1 in maps:
                d = (1.0 - t) * d0 + t * d1
                win = d < best
                plane[win] = c
                best[win] = d[win]
            out[..., k] = plane
    return np.moveaxis(out, -1, axis)
