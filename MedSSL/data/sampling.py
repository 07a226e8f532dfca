"""Class-balanced patch sampling around annotated voxels.

Every patch holds an annotated voxel of one channel (background or a class), the channels taken in
turn (a random permutation per round), so a class painted on three slices is seen as often as the
background of a whole volume. That voxel lies within ``jitter`` (0.4) of the patch around its centre, so
the patch stays about the class; along the axis of painted slices (``full_axes``) it lies anywhere,
borders included, so the painted plane falls at every depth of the 3D window and the network is
supervised at every position of its window. With the plane kept near the centre, the outermost slices
of a window were never supervised, and a sliding window predicted the whole end slices of the spleen
volume as spleen; with the voxel anywhere along all axes, small dense classes were no longer centred
and a 100-step run missed one of two blob classes entirely. Parts of a patch outside the volume are
padded with 0 (image) and 255 (not annotated).

One-slice (2D) images are sampled the same way as (X, Y, 1) volumes with (X, Y, 1) patches (the
caller drops the last axis for a 2D network); :func:`auto_patch_2d` chooses their patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from MedSSL.data.labels import IGNORE
from MedSSL.data.position import PositionFrame

#: at most this many candidate centres are kept per channel and volume (a random subset)
MAX_CANDIDATES = 200_000


@dataclass
class TrainingVolume:
    """image: float32 (X, Y, Z) in [0, 1]; target: uint8 (X, Y, Z) channels, 255 = not annotated
    (Z = 1 for a one-slice image); position: None, or the frame of the position channels that follow the
    image channel in every patch (:mod:`.position`); weight: how often the sampler picks this volume relative
    to the others holding the same channel (1 = as often)."""

    image: np.ndarray
    target: np.ndarray
    position: PositionFrame | None = None
    weight: float = 1.0


def crop(array: np.ndarray, start: np.ndarray, size, fill) -> np.ndarray:
    """The box ``[start, start + size)`` of ``array`` (X, Y, Z), padded with ``fill`` outside it."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(size), array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        array[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out


def _odds(weights: list) -> np.ndarray | None:
    """Picking probabilities proportional to ``weights``; None when they are all equal (or there are none)."""
    w = np.asarray(weights, dtype=float)
    if w.size == 0 or np.all(w == w[0]):
        return None
    return w / w.sum()


class PatchSampler:
    """Draws (image, target) patches balanced over channels.

    volumes: the training volumes; patch: (X, Y, Z) voxels; n_channels: background + classes;
    jitter: where the chosen voxel may lie, as a fraction of the patch around its centre (1 = anywhere,
    0 = at the centre); full_axes: axes along which it may lie anywhere (the axis of painted slices).
    """

    def __init__(self, volumes: list[TrainingVolume], patch, n_channels: int, rng: np.random.Generator,
                 jitter: float = 0.4, full_axes=()):
        self.volumes, self.patch, self.rng = volumes, np.asarray(patch, dtype=int), rng
        self.n_channels = n_channels
        centre = self.patch // 2
        fraction = np.array([1.0 if a in tuple(full_axes) else jitter for a in range(3)])
        half = np.floor(fraction * self.patch / 2).astype(int)
        #: inclusive range of the chosen voxel's position inside the patch, per axis
        self.depth_lo = np.clip(centre - half, 0, self.patch - 1)
        self.depth_hi = np.clip(centre + half, 0, self.patch - 1)
        # candidates[c] = [(volume index, flat indices), ...] for every volume holding channel c
        self.candidates: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n_channels)]
        for i, vol in enumerate(volumes):
            flat = vol.target.reshape(-1)
            for c in range(n_channels):
                idx = np.flatnonzero(flat == c)
                if idx.size > MAX_CANDIDATES:
                    idx = np.sort(rng.choice(idx, MAX_CANDIDATES, replace=False))
                if idx.size:
                    self.candidates[c].append((i, idx))
        self.channels = [c for c in range(n_channels) if self.candidates[c]]
        #: per channel, the volumes' picking probabilities; None when every volume weighs the same (uniform draw)
        self.odds = [_odds([volumes[i].weight for i, _ in self.candidates[c]]) for c in range(n_channels)]
        if not self.channels:
            raise ValueError("no annotated voxels to sample from")
        self._queue: list[int] = []

    def stream_state(self) -> str:
        """Where the patch stream stands (random generator and class queue), as JSON for a checkpoint."""
        return json.dumps({"rng": self.rng.bit_generator.state, "queue": [int(c) for c in self._queue]})

    def continue_stream(self, state: str) -> None:
        """Continue the patch stream from :meth:`stream_state` (a resumed run draws what the uninterrupted
        run would have drawn)."""
        saved = json.loads(state)
        self.rng.bit_generator.state = saved["rng"]
        self._queue = [int(c) for c in saved["queue"]]

    def _next_channel(self) -> int:
        if not self._queue:
            self._queue = list(self.rng.permutation(self.channels))
        return int(self._queue.pop())

    def _draw(self) -> tuple[TrainingVolume, np.ndarray]:
        """The next patch: its volume and its start (X, Y, Z) voxel index (may lie outside the volume)."""
        channel = self._next_channel()
        choices, odds = self.candidates[channel], self.odds[channel]
        pick = self.rng.integers(len(choices)) if odds is None else self.rng.choice(len(choices), p=odds)
        vol_index, idx = choices[int(pick)]
        vol = self.volumes[vol_index]
        voxel = np.array(np.unravel_index(int(idx[self.rng.integers(idx.size)]), vol.target.shape))
        return vol, voxel - self.rng.integers(self.depth_lo, self.depth_hi + 1)

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """image (N, C, X, Y, Z) float32 (C = 1, or 3 when the volumes have position frames: the image and
        its position channels), target (N, X, Y, Z) uint8."""
        images, targets = [], []
        for _ in range(batch):
            vol, start = self._draw()
            image = crop(vol.image, start, self.patch, 0.0)[None]
            if vol.position is not None:
                image = np.concatenate([image.astype(np.float32), vol.position.channels(start, self.patch)])
            images.append(image)
            targets.append(crop(vol.target, start, self.patch, IGNORE))
        return np.stack(images), np.stack(targets)


def auto_patch(spacings: list, shapes: list, base: int = 64, max_z: int = 32) -> tuple[int, int, int]:
    """A patch for fine-tuning when ``--patch`` is not given.

    In-plane (X, Y): ``base`` voxels. Along Z: about the same physical extent as in-plane, in multiples
    of 8, between 8 and ``max_z`` (64 x 64 x 32 for isotropic data as Models Genesis; 64 x 64 x 16 for
    0.8 x 0.8 x 5 mm slices: thin along thick slices, still 3D). No axis exceeds the largest volume's
    size rounded up to a multiple of 8.
    """
    spacing = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    largest = np.max(np.asarray(shapes), axis=0)
    in_plane = float(min(spacing[0], spacing[1]))
    z = int(np.clip(8 * np.ceil(base * in_plane / spacing[2] / 8), 8, max_z))
    patch = np.array([base, base, z])
    cap = 8 * np.ceil(largest / 8).astype(int)
    return tuple(int(p) for p in np.maximum(8, np.minimum(patch, cap)))


def auto_patch_2d(shapes: list, base: int = 128) -> tuple[int, int, int]:
    """The patch for one-slice (2D) images when ``--patch`` is not given: ``base`` x ``base`` x 1,
    each side at most the largest image's rounded up to a multiple of 8 (at least 8). 128 x 128 pixels
    cost about what a 64 x 64 x 4 cube does, and give more in-plane context than 64 x 64 on a radiograph."""
    largest = np.max(np.asarray(shapes), axis=0)
    cap = 8 * np.ceil(largest[:2] / 8).astype(int)
    x, y = (int(max(8, min(base, c))) for c in cap)
    return x, y, 1
