"""The voxel grid of the phantom: checked geometry, normalised LPS coordinates and smooth random fields."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from MedSSL.errors import MedSSLError


class PhantomGrid:
    """Physical coordinates of a voxel grid, normalised to its field of view.

    Normalised coordinates (u, v, w) are LPS (x, y, z) relative to the centre of the field of view,
    divided by its half extent along x, y and z; they are affine in the voxel index, so any linear
    combination of them can be evaluated by broadcasting three 1D arrays.
    """

    def __init__(self, shape, spacing, origin, direction):
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        self.direction = direction
        steps = direction * spacing[None, :]  # column a: mm moved in LPS per index step along axis a
        self.center = origin + steps @ ((np.asarray(shape) - 1) / 2.0)
        self.half = 0.5 * np.abs(steps) @ np.asarray(shape, dtype=np.float64)  # half extent along x, y, z
        # norm coordinate c (0=u,1=v,2=w) = offset[c] + sum_a coef[c, a] * index_a
        self.coef = steps / self.half[:, None]
        self.offset = (origin - self.center) / self.half
        self.index = [np.arange(n, dtype=np.float64) for n in shape]
        self.hmin = float(min(self.half[0], self.half[1]))

    def affine(self, weights, constant=0.0) -> np.ndarray:
        """Full float32 array of weights . (u, v, w) + constant."""
        weights = np.asarray(weights, dtype=np.float64)
        per_axis = weights @ self.coef
        c = float(weights @ self.offset + constant)
        i, j, k = self.index
        out = (per_axis[0] * i + c).astype(np.float32)[:, None, None] + (per_axis[1] * j).astype(np.float32)[None, :, None]
        return out + (per_axis[2] * k).astype(np.float32)[None, None, :]

    def smooth_field(self, rng, n=4, cycles=(0.4, 1.2)) -> np.ndarray:
        """Sum of ``n`` random plane waves (about unit standard deviation): smooth low-frequency noise."""
        out = np.zeros(self.shape, dtype=np.float32)
        for _ in range(n):
            k = rng.normal(size=3)
            k *= rng.uniform(*cycles) * np.pi / np.linalg.norm(k)
            out += np.cos(self.affine(k, rng.uniform(0, 2 * np.pi)))
        out *= np.float32(np.sqrt(2.0 / n))
        return out


def coarse_noise(rng, shape, step) -> np.ndarray:
    """Random field with correlation length ~``step`` voxels (coarse Gaussian grid, linearly upsampled)."""
    coarse_shape = [max(2, int(np.ceil(n / step)) + 1) for n in shape]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse_shape)]
    out = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1], : shape[2]]


def check_geometry(shape, spacing, origin, direction):
    """(shape, spacing, origin, direction) of a phantom grid as numbers and arrays; MedSSLError when they are
    not three sizes, three positive spacings (mm) and orthonormal direction columns."""
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    if len(shape) != 3 or min(shape) < 1:
        raise MedSSLError(f"phantom shape {shape}: expected three sizes >= 1")
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, 3)
    if spacing.size != 3 or not np.all(spacing > 0):
        raise MedSSLError(f"phantom spacing {spacing.tolist()}: expected three positive values (mm)")
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise MedSSLError("phantom direction: the columns must be orthonormal")
    if origin is None:  # centre the field of view on (0, 0, 0)
        origin = -(direction * spacing[None, :]) @ ((np.asarray(shape) - 1) / 2.0)
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    return shape, spacing, origin, direction
