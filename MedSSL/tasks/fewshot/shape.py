"""The shape prior: signed distances of the painted shapes, blended between painted planes.

All arrays here are in the engine's frame: (X, Y, Z) with Z the main painted axis (the painted planes
are Z slices). Distances are in mm (in-plane spacing ``sampling`` = (sx, sy)), negative inside.
Between two painted planes k0 < k1 a class' distance is ``(1 - t) d0 + t d1``, t = (k - k0) / (k1 - k0)
(Raya & Udupa 1990), as :func:`MedSSL.tasks.evaluate.interpolate_between_slices`; a class painted on one of
the two planes only tapers off towards the other one. Past the first and last painted plane the shape
of the previous slice is carried on, shrunk by ``taper`` mm per mm travelled (see
:func:`MedSSL.tasks.fewshot.engine`), and the image decides what stays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: distance given to a class absent from a slice: far outside
FAR = 1e4


def signed_distance(mask: np.ndarray, sampling) -> np.ndarray:
    """(X, Y) bool -> (X, Y) float32 signed distance in mm (negative inside; FAR when ``mask`` is empty)."""
    if not mask.any():
        return np.full(mask.shape, FAR, np.float32)
    if mask.all():
        return np.full(mask.shape, -FAR, np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    return (outside - inside).astype(np.float32)


def class_distances(plane: np.ndarray, classes, sampling) -> np.ndarray:
    """(X, Y) labels -> (C, X, Y) signed distances of each class value in ``classes``."""
    return np.stack([signed_distance(plane == c, sampling) for c in classes])


def blend(d0: np.ndarray, d1: np.ndarray, t: float) -> np.ndarray:
    """Blend two (C, X, Y) distance stacks at 0 <= t <= 1; a class absent on one side tapers to nothing.

    An absent class (FAR everywhere) is replaced by the present side's map raised by its deepest inside
    depth, so the shape erodes linearly and vanishes at the empty plane.
    """
    d0, d1 = d0.copy(), d1.copy()
    for c in range(d0.shape[0]):
        a0, a1 = d0[c].min() < FAR, d1[c].min() < FAR
        if a0 and not a1:
            d1[c] = d0[c] + max(-float(d0[c].min()), 0.0)
        elif a1 and not a0:
            d0[c] = d1[c] + max(-float(d1[c].min()), 0.0)
    return (1.0 - t) * d0 + t * d1


def carry(previous: np.ndarray, classes, sampling, shrink_mm) -> np.ndarray:
    """(X, Y) labels of the previous slice -> (C, X, Y) distances for the next one, each class shrunk by
    ``shrink_mm`` (a number or (C,) mm)."""
    shrink = np.broadcast_to(np.asarray(shrink_mm, np.float32), (len(classes),))
    return class_distances(previous, classes, sampling) + shrink[:, None, None]


def keep_overlapping(labels: np.ndarray, previous: np.ndarray, classes) -> np.ndarray:
    """Per class, keep the 2D components of ``labels`` that overlap the class on ``previous`` (grown by one
    pixel): a structure continues from slice to slice, it does not jump."""
    out = np.zeros_like(labels)
    for c in classes:
        mask = labels == c
        if not mask.any():
            continue
        seeds = ndimage.binary_dilation(previous == c)
        comp, n = ndimage.label(mask)
        if n == 0:
            continue
        hit = np.unique(comp[seeds & mask])
        out[np.isin(comp, hit[hit > 0])] = c
    return out
