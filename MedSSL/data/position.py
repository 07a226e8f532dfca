"""Position channels: where each voxel lies in the patient, for a network that must tell left from right.

A U-Net trained on a CPU budget sees 64-voxel patches and a few hundred steps: two structures that look
alike on either side of the body (the kidneys, the hippocampi, the lungs) are told apart only by where
they are, which such a network learns late or not at all (CHAOS: a third of each kidney's voxels got the
other kidney's label). Position channels give it where directly (as CoordConv, Liu et al. 2018): two
extra input channels holding each voxel's position along the patient's left-right axis (LPS x) and
anterior-posterior axis (LPS y), in mm from the centre of the body divided by :data:`SCALE_MM`.

The centre of the body is the centroid of the voxels brighter than :data:`BODY_THRESHOLD` in the
normalised image (intensities in [0, 1]: air and MR background are below it), so the channels do not
depend on where the field of view was placed. The superior-inferior axis is left out: a scan's field of
view cuts the body there, so a centre along it would move with the field of view.

The channels are linear in the voxel index, so a :class:`PositionFrame` (a 2 x 3 matrix and an offset)
gives the channels of any box of the volume, inside or beyond it: training computes each patch's from its
start (:mod:`.sampling`), prediction the whole volume's (:func:`with_position_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the channels, in order (LPS axes of the patient)
POSITION_AXES = ("left-right (LPS x)", "anterior-posterior (LPS y)")
#: positions are given in units of this many mm (a body is about +-2 units wide)
SCALE_MM = 100.0
#: normalised intensity above which a voxel counts as body when finding the centre of the body
BODY_THRESHOLD = 0.1


@dataclass(frozen=True)
class PositionFrame:
    """Voxel index (i, j, k) -> position channels: ``matrix @ (i, j, k) + offset``.

    matrix: (2, 3) channel units per voxel step; offset: (2,) the channels at index (0, 0, 0)."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray, spacing, direction) -> "PositionFrame":
        """The frame of a normalised image ``array`` (X, Y, Z) in [0, 1] with ``spacing`` (3,) mm and
        ``direction`` (3, 3) (columns: the voxel axes in LPS)."""
        centre = _centroid(array > BODY_THRESHOLD)
        matrix = (np.asarray(direction, np.float64) * np.asarray(spacing, np.float64)[None, :])[:2] / SCALE_MM
        return cls(matrix, -matrix @ centre)

    def channels(self, start, size) -> np.ndarray:
        """float32 (2, X, Y, Z): the channels of the box ``[start, start + size)`` (voxel indices, any
        part of it may lie outside the volume)."""
        axes = [np.arange(s, s + n, dtype=np.float64) for s, n in zip(start, size)]
        out = np.empty((2, *(int(n) for n in size)), np.float32)
        for c in range(2):
            m = self.matrix[c]
            out[c] = (self.offset[c] + m[0] * axes[0][:, None, None] + m[1] * axes[1][None, :, None]
                      + m[2] * axes[2][None, None, :])
        return out


def _centroid(mask: np.ndarray) -> np.ndarray:
    """(3,) mean voxel index of ``mask`` (X, Y, Z) bool, from its per-axis counts (no list of voxels); the
    volume's centre when ``mask`` is empty."""
    total = int(mask.sum())
    if total == 0:
        return (np.asarray(mask.shape, np.float64) - 1) / 2
    axes = range(mask.ndim)
    return np.array([np.dot(mask.sum(axis=tuple(b for b in axes if b != a), dtype=np.int64), np.arange(mask.shape[a]))
                     for a in axes], np.float64) / total


def with_position_channels(array: np.ndarray, spacing, direction) -> np.ndarray:
    """float32 (3, X, Y, Z): the normalised image ``array`` (X, Y, Z) and its two position channels."""
    frame = PositionFrame.of(array, spacing, direction)
    return np.concatenate([array[None].astype(np.float32), frame.channels((0, 0, 0), array.shape)])


def describe() -> dict:
    """model.json ``preprocessing.position``: what the extra input channels hold."""
    return {"channels": list(POSITION_AXES), "origin": f"centroid of the voxels above {BODY_THRESHOLD} of the "
            "normalised image", "unit_mm": SCALE_MM}
