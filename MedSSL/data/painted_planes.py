"""Which planes of a painted label map were annotated.

A painted label map is (X, Y, Z) uint8 on the image grid: 0 = background, 1..254 = classes, 255 = not
annotated. A *painted plane* is a whole slice along one of the three index axes (0 = i, 1 = j, 2 = k)
in which (almost) every voxel is annotated. Painting on several axes at once is allowed (e.g. two axial
planes and one sagittal plane): each axis keeps its own list. Planes of other axes cross a slice in
lines only: even with every other axial plane painted, a sagittal slice is only half annotated, so
"almost every voxel" (PAINTED_FRACTION) tells a painted plane from a slice that other planes cross.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from MedSSL.errors import MedSSLError

IGNORE = 255
#: a slice counts as painted when at least this fraction of its voxels is annotated
PAINTED_FRACTION = 0.98
AXIS_NAMES = ("i", "j", "k")


@dataclass(frozen=True)
class PaintedPlanes:
    """planes[axis] = sorted indices of the painted slices along that index axis (0, 1, 2)."""

    planes: tuple

    @property
    def axes(self) -> list[int]:
        """Axes with at least one painted plane."""
        return [a for a in range(3) if self.planes[a]]

    @property
    def count(self) -> int:
        return sum(len(p) for p in self.planes)

    @property
    def main_axis(self) -> int:
        """The axis with the most painted planes (ties: the slice axis k first, then j, then i)."""
        return max((2, 1, 0), key=lambda a: len(self.planes[a]))

    def describe(self) -> str:
        """E.g. ``"k=12,20; i=40"`` (index axis = slice indices)."""
        parts = [f"{AXIS_NAMES[a]}={','.join(map(str, self.planes[a]))}" for a in (2, 1, 0) if self.planes[a]]
        return "; ".join(parts) if parts else "none"

    def known_mask(self, shape) -> np.ndarray:
        """(X, Y, Z) bool: the voxels of the painted planes."""
        known = np.zeros(shape, bool)
        for axis in range(3):
            index = [slice(None)] * 3
            index[axis] = list(self.planes[axis])
            if self.planes[axis]:
                known[tuple(index)] = True
        return known


def find_painted_planes(label: np.ndarray, where: str = "label") -> PaintedPlanes:
    """The painted planes of ``label`` (X, Y, Z); MedSSLError when there are none or nothing is painted."""
    if label.ndim != 3:
        raise MedSSLError(f"{where}: expected a 3D label map, got shape {tuple(label.shape)}")
    annotated = label != IGNORE
    planes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        fraction = annotated.mean(axis=other)
        planes.append(tuple(int(k) for k in np.flatnonzero(fraction >= PAINTED_FRACTION)))
    found = PaintedPlanes(tuple(planes))
    if found.count == 0:
        raise MedSSLError(f"{where}: no painted plane (a whole slice along i, j or k annotated; 255 = not annotated)")
    known = found.known_mask(label.shape)
    if not np.any((label > 0) & (label != IGNORE) & known):
        raise MedSSLError(f"{where}: the painted planes hold no structure (only background)")
    return found


def is_painting(label: np.ndarray) -> bool:
    """True when ``label`` is a painting (some voxels 255 = not annotated, at least one painted plane)."""
    if label.ndim != 3 or not np.any(label == IGNORE):
        return False
    annotated = label != IGNORE
    return any(annotated.mean(axis=tuple(a for a in range(3) if a != axis)).max() >= PAINTED_FRACTION for axis in range(3))


def spread_planes(labels: np.ndarray, axis: int, count: int) -> list[int]:
    """Planes along ``axis`` a user would paint on ``labels`` (X, Y, Z uint8, 0 = background): for each class,
    ``count`` planes evenly spread over its extent, inset from its first and last plane; the union, sorted
    (empty when no class is present)."""
    other = tuple(a for a in range(3) if a != axis)
    picks: set[int] = set()
    for value in np.flatnonzero(np.bincount(labels.reshape(-1), minlength=256)[1:IGNORE]) + 1:
        present = np.flatnonzero((labels == value).any(axis=other))
        picks.update(np.round(np.linspace(present[0], present[-1], count + 2)[1:-1]).astype(int).tolist())
    return sorted(picks)
