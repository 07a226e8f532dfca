"""Random cubes cut from a [0, 1] volume, kept when enough of their real voxels lie inside the body mask."""

from __future__ import annotations

import numpy as np

from MedSSL.data.spatial import sampling_size
from MedSSL.errors import MedSSLError


def sample_cubes(
    array01: np.ndarray,
    mask: np.ndarray,
    patch=(64, 64, 32),
    count: int = 32,
    rng: np.random.Generator | None = None,
    min_body_fraction: float = 0.5,
    max_tries: int | None = None,
    return_corners: bool = False,
):
    """Cut up to ``count`` random cubes of ``patch`` voxels from a (X, Y, Z) [0, 1] array.

    Corners are drawn uniformly; a cube is kept when the fraction of its real voxels (padding excluded)
    that lie inside ``mask`` is >= ``min_body_fraction``. Along an axis where the volume is smaller than
    the patch it is padded on both sides with 0 (air) so small volumes (a few slices, a one-slice 2D
    image) still give cubes. Gives up after ``max_tries`` draws (default ``50 * count``) and returns
    what it found: float32 ``(n, *patch)`` with ``n <= count``. With ``return_corners`` also returns
    the ``(n, 3)`` corners in the *unpadded* index space (negative where padding comes first).
    """
    a = np.asarray(array01)
    m = np.asarray(mask, dtype=bool)
    if a.ndim != 3 or m.shape != a.shape:
        raise MedSSLError(f"sample_cubes: array {a.shape} and mask {m.shape} must be the same 3D shape")
    patch = sampling_size(patch)
    count = max(0, int(count))
    rng = rng if rng is not None else np.random.default_rng(0)
    max_tries = 50 * count if max_tries is None else int(max_tries)

    size = np.asarray(a.shape)
    p = np.asarray(patch)
    before = np.maximum(p - size, 0) // 2
    padded = np.maximum(size, p)
    if np.any(padded != size):
        pad = [(int(b), int(t - s - b)) for b, t, s in zip(before, padded, size)]
        a = np.pad(a, pad, mode="constant", constant_values=0)
        m = np.pad(m, pad, mode="constant", constant_values=False)
    high = padded - p  # inclusive upper bound of the corners

    cubes = np.empty((count, *patch), dtype=np.float32)
    corners = np.empty((count, 3), dtype=np.int64)
    n = tries = 0
    while n < count and tries < max_tries:
        tries += 1
        c = np.array([rng.integers(0, h + 1) for h in high])
        window = tuple(slice(int(o), int(o + q)) for o, q in zip(c, p))
        real = 1
        for o, q, b, s in zip(c, p, before, size):  # voxels of the window that are not padding
            real *= max(0, min(o + q, b + s) - max(o, b))
        if real == 0:
            continue
        if np.count_nonzero(m[window]) < min_body_fraction * real:
            continue
        cubes[n] = a[window]
        corners[n] = c - before
        n += 1
    cubes, corners = cubes[:n], corners[:n]
    return (cubes, corners) if return_corners else cubes
