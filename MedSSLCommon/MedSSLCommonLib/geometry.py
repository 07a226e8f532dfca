"""Voxel-to-world geometry: Slicer's IJK->RAS matrix versus ITK's LPS origin/spacing/direction.

Pure numpy: no ``slicer`` import, so it is usable anywhere.

Conventions:

* Slicer (MRML) places voxels with a 4x4 IJK->RAS matrix: RAS = M @ [i, j, k, 1], in mm. Its 3x3 part is
  ``directions @ diag(spacing)``; the columns of ``directions`` are the unit vectors of the i, j, k axes in
  RAS (right, anterior, superior).
* ITK / SimpleITK / NRRD / NIfTI headers (and the MedSSL backend) use LPS (left, posterior, superior):
  ``point = origin + direction @ (spacing * index)`` with the columns of ``direction`` being the i, j, k axis
  directions in LPS.
* RAS and LPS differ by the sign of the first two coordinates, so converting a point or a direction flips
  x and y. Spacing (mm per voxel along i, j, k) and the index order are the same in both.
* numpy arrays from Slicer (``slicer.util.arrayFromVolume``) and SimpleITK (``GetArrayFromImage``) are both
  indexed ``[k, j, i]``; no transposition is needed between them.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""3x3 matrix that converts a point or direction between LPS and RAS (its own inverse)."""


def lpsToRas(points) -> np.ndarray:
    """(3,) or (N, 3) points in mm, LPS -> the same points in RAS (float64 copy)."""
    return np.asarray(points, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


rasToLps = lpsToRas
"""(3,) or (N, 3) points in mm, RAS -> LPS (the same flip)."""


def ijkToRasFromItk(origin, spacing, direction) -> np.ndarray:
    """4x4 IJK->RAS matrix (mm) from ITK geometry.

    origin: (3,) LPS position of voxel (0, 0, 0) in mm; spacing: (3,) mm; direction: (3, 3) or 9 numbers in
    row-major order (SimpleITK's ``GetDirection()``), columns = i, j, k axis directions in LPS.
    """
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=np.float64))
    matrix[:3, 3] = lpsToRas(origin)
    return matrix


def itkFromIjkToRas(ijkToRas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin LPS mm (3,), spacing mm (3,), direction (3, 3) LPS columns) from a 4x4 IJK->RAS matrix.

    The spacing of each axis is the length of its column; the direction is that column normalised.
    """
    matrix = np.asarray(ijkToRas, dtype=np.float64).reshape(4, 4)
    scaled = matrix[:3, :3]
    spacing = np.linalg.norm(scaled, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJK->RAS matrix has a zero-length axis (spacing {spacing.tolist()})")
    direction = LPS_TO_RAS @ (scaled / spacing)
    origin = rasToLps(matrix[:3, 3])
    return origin, spacing, direction


def sameGeometry(a, b, tolerance: float = 1e-6) -> bool:
    """True when two 4x4 IJK->RAS matrices place every voxel of a 1000-voxel-wide grid within
    ``tolerance`` * 1000 mm of each other (relative, so it copes with float rounding in file headers)."""
    a = np.asarray(a, dtype=np.float64).reshape(4, 4)
    b = np.asarray(b, dtype=np.float64).reshape(4, 4)
    scale = max(1.0, float(np.abs(a).max()))
    return bool(np.abs(a - b).max() <= tolerance * scale)


def sliceCenterIndex(shape_kji, axis: int, index: int) -> np.ndarray:
    """Continuous (i, j, k) voxel index of the centre of slice ``index`` along ITK axis ``axis``
    (0 = i, 1 = j, 2 = k) of a grid whose numpy shape is (nk, nj, ni)."""
    center = (np.array(shape_kji[::-1], dtype=np.float64) - 1.0) / 2.0
    center[axis] = float(index)
    return center


def indexToRas(ijkToRas, ijk) -> np.ndarray:
    """(N, 3) or (3,) continuous voxel indices (i, j, k) -> RAS points in mm."""
    matrix = np.asarray(ijkToRas, dtype=np.float64).reshape(4, 4)
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]
