"""The working grid of the cohort network: coarse enough for a CPU, fine enough for the structure.

A U-Net's cost grows with the voxels it sees: a 0.625 mm left-atrium MR (2.5 Mvoxel) costs about 15 times
what the same scan at 1.5 mm does, for a structure 30-60 mm across that 1.5 mm still draws with 20-40
voxels. :func:`working_spacing` coarsens the finest axes of the median training
spacing (never past the coarsest axis, as nnU-Net's low-resolution stage) until the median scan has at most
``max_voxels``, but keeps every class at least ``min_extent`` voxels across (its equivalent-sphere diameter
in the training labels). Prediction resamples back to each input's grid (``model.json``
``preprocessing.target_spacing_mm``).
"""

from __future__ import annotations

import numpy as np

#: voxels of the median scan on the working grid (chosen on the cohorts, see docs/cohort.md)
MAX_VOXELS = 300_000
#: smallest class diameter on the working grid, in voxels
MIN_EXTENT = 16.0


def class_diameters_mm(labels: np.ndarray, spacing) -> list[float]:
    """Equivalent-sphere diameter (mm) of each class in one label map (X, Y, Z) uint8 (255 ignored)."""
    voxel = float(np.prod(spacing))
    counts = np.bincount(labels.reshape(-1), minlength=256)[1:255]
    return [float((6.0 * c * voxel / np.pi) ** (1.0 / 3.0)) for c in counts if c > 0]


def working_spacing(spacings: list, shapes: list, diameters_mm: list[float], max_voxels: int = MAX_VOXELS,
                    min_extent: float = MIN_EXTENT) -> tuple[float, float, float] | None:
    """The spacing (mm) to train and predict at, or None to keep each scan's own grid.

    spacings / shapes: (3,) per training scan (mm / voxels); diameters_mm: every class's diameter in every
    labelled scan (:func:`class_diameters_mm`). The finest axes are coarsened together, in steps of 1.25x,
    up to the coarsest axis' spacing (then all axes together), while the median scan exceeds ``max_voxels`` and the smallest
    diameter stays at least ``min_extent`` voxels.
    """
    if not spacings:
        return None
    spacing = np.median(np.asarray(spacings, np.float64), axis=0)
    voxels = float(np.median([np.prod(s) for s in shapes]))
    smallest = min(diameters_mm) if diameters_mm else np.inf
    current = spacing.copy()
    while voxels * np.prod(spacing / current) > max_voxels:
        if np.allclose(current, current.max()):  # isotropic: all axes together
            proposal = current * 1.25
        else:  # the finest axes, up to the coarsest
            proposal = np.minimum(np.maximum(current, current.min() * 1.25), current.max())
        coarsened = proposal[proposal > spacing * (1 + 1e-6)]  # the slice axis of thick slices may stay as it is
        if smallest / coarsened.max() < min_extent:
            break
        current = proposal
    if np.allclose(current, spacing, rtol=1e-3):
        return None
    return tuple(round(float(s), 4) for s in current)
