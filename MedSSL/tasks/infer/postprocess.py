"""Clean-ups of predicted label maps (uint8 (X, Y, Z) of original label values, 0 = background).

Connectivity is 6-neighbour (faces) in 3D throughout, as :func:`scipy.ndimage.label` by default.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from MedSSL.data.labels import IGNORE


def _class_values(labels: np.ndarray) -> list[int]:
    counts = np.bincount(labels.reshape(-1), minlength=256)
    return [int(v) for v in np.flatnonzero(counts[1:]) + 1]


def _bbox_slices(mask: np.ndarray, pad: int = 1):
    """Slices of the bounding box of ``mask`` (grown by ``pad``), so labelling works on a crop."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return None
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box[0], mask.shape))


def largest_component_per_class(labels: np.ndarray) -> np.ndarray:
    """Keep, for every class value, only its largest connected component (the rest becomes 0; components
    of equal largest size are all kept)."""
    return drop_small_pieces(labels, _class_values(labels), 1.0)


def drop_small_pieces(labels: np.ndarray, values, share: float) -> np.ndarray:
    """For each class value in ``values``, remove (set to 0) its connected pieces smaller than ``share`` (0..1)
    of its largest piece; ``share`` 1 keeps the largest piece only (ties: all of them)."""
    out = labels.copy()
    for value in _class_values(labels):
        if value not in values:
            continue
        mask = labels == value
        box = _bbox_slices(mask)
        sub = mask[box]
        comp, n = ndimage.label(sub)
        if n <= 1:
            continue
        sizes = np.bincount(comp.reshape(-1))
        sizes[0] = 0
        small = sizes < share * sizes.max()
        small[0] = False
        out[box][small[comp] & sub] = 0
    return out


def keep_connected_to_annotation(labels: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """Few-shot clean-up on the volume the user painted.

    labels: predicted values (X, Y, Z); annotation: the painted label map on the same grid (0
    background, class values, 255 not annotated). For every class the user painted, predicted
    components that touch none of its painted voxels are removed (false positives far from the painted
    structure); classes not painted are left as predicted. Then every annotated voxel takes its painted
    value (the user's strokes are ground truth).
    """
    out = labels.copy()
    painted = set(_class_values(np.where(annotation == IGNORE, 0, annotation).astype(np.uint8)))
    for value in _class_values(labels):
        if value not in painted:
            continue
        predicted, seeds = labels == value, annotation == value
        comp, n = ndimage.label(predicted | seeds)  # painted voxels bridge gaps in the prediction
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.unique(comp[seeds])] = True
        keep[0] = False
        out[predicted & ~keep[comp]] = 0
    annotated = annotation != IGNORE
    out[annotated] = annotation[annotated]
    return out
