"""The few-shot engine's working frame: the region of interest around a painting, with the main painted
axis moved last, its appearance features and the painted planes in it.

Shapes: the frame's arrays are (X, Y, Z) in the moved frame (main painted axis = Z), spacing (3,) mm in
the same order; features (F, X', Y', Z) on every ``factor``-th voxel in X and Y.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from MedSSL.data.painted_planes import IGNORE, PaintedPlanes, find_painted_planes
from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.appearance import AppearanceNet, log_odds, normalise, train_appearance, voxel_features

#: regions larger than this get their appearance features on a coarser in-plane grid (speed, memory)
MAX_FEATURE_VOXELS = 2_000_000


@dataclass
class Frame:
    """The engine's working copy: region of interest in the moved frame (main axis last)."""

    labels: np.ndarray      # (X, Y, Z) painted values, 255 not annotated
    known: np.ndarray       # (X, Y, Z) bool, voxels of painted planes (any axis)
    features: np.ndarray    # (F, X, Y, Z)
    spacing: np.ndarray     # (3,) mm
    planes: list            # main-axis painted slice indices in the region
    box: tuple              # slices of the region in the moved full volume
    factor: int = 1         # features are on every factor-th voxel in X and Y (large regions)
    painted_planes: PaintedPlanes | None = None  # what was painted, in the input's axes

    def train(self, classes, known=None, **kwargs) -> AppearanceNet:
        """The appearance MLP trained on the painted voxels (``known``: default the frame's) at feature resolution."""
        f = self.factor
        known = self.known if known is None else known
        return train_appearance(self.features, self.labels[::f, ::f], known[::f, ::f], classes,
                                self.spacing * np.array([f, f, 1]), **kwargs)

    def odds(self, net: AppearanceNet, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(C, X, Y, hi - lo) log-odds of Z slices lo..hi-1 at full resolution (bilinear from the feature grid)."""
        hi = self.labels.shape[2] if hi is None else hi
        odds = log_odds(net, self.features[..., lo:hi])
        if self.factor == 1:
            return odds
        import torch

        full = torch.nn.functional.interpolate(torch.from_numpy(odds).permute(3, 0, 1, 2),
                                               size=self.labels.shape[:2], mode="bilinear", align_corners=True)
        return full.permute(1, 2, 3, 0).numpy()

    def painted(self, k: int) -> np.ndarray:
        """(X, Y) painted values of Z slice ``k``, not-annotated voxels as background."""
        plane = self.labels[..., k].copy()
        plane[plane == IGNORE] = 0
        return plane

    def classes(self) -> list:
        """The painted class values, sorted."""
        return sorted(int(v) for v in np.unique(self.labels) if 0 < v < IGNORE)


def region_of_interest(labels: np.ndarray, known: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple:
    """Slices of the region of interest (moved frame): the painted structure's box grown in-plane by
    margin + 30 % of its extent, and along Z by the larger of half its painted span and its in-plane size."""
    fg = known & (labels > 0) & (labels != IGNORE)
    lo = np.array([np.flatnonzero(fg.any(axis=tuple(b for b in range(3) if b != a)))[[0, -1]] for a in range(3)])
    extent_mm = (lo[:, 1] - lo[:, 0] + 1) * spacing
    grow_mm = margin_mm + 0.3 * extent_mm
    grow_mm[2] = margin_mm + max(0.5 * extent_mm[2], extent_mm[0], extent_mm[1])
    grow = np.ceil(grow_mm / spacing).astype(int)
    return tuple(slice(max(0, int(a - g)), min(n, int(b + g + 1))) for (a, b), g, n in zip(lo, grow, labels.shape))


def moved(planes: PaintedPlanes, array: np.ndarray) -> np.ndarray:
    return np.moveaxis(array, planes.main_axis, -1)


def prepare_frame(image: np.ndarray, spacing, painted: np.ndarray, margin_mm: float, backbone=None,
                  backbone_intensity=None, extra_features: np.ndarray | None = None) -> tuple[Frame, PaintedPlanes, tuple]:
    """The engine's frame for ``painted`` on ``image``: (frame, planes, moved full shape).

    ``extra_features``: (F, X, Y, Z) maps on the image's grid (any float dtype; cropped to the region, then
    float32) appended to the appearance features (the cohort network's class log-odds when a draft is
    corrected, :mod:`MedSSL.tasks.cohort.correction`)."""
    if image.shape != painted.shape:
        raise MedSSLError(f"painted label {tuple(painted.shape)} and image {tuple(image.shape)} differ in shape")
    planes = find_painted_planes(painted)
    spacing = np.asarray(spacing, np.float64)
    main = planes.main_axis
    labels_m, image_m = moved(planes, painted), moved(planes, image)
    known_m = moved(planes, planes.known_mask(painted.shape))
    spacing_m = np.array([spacing[a] for a in range(3) if a != main] + [spacing[main]])
    box = region_of_interest(labels_m, known_m, spacing_m, margin_mm)
    roi_labels = np.where(known_m[box], labels_m[box], IGNORE).astype(np.uint8)
    roi_image = np.ascontiguousarray(image_m[box], dtype=np.float32)
    factor = int(np.ceil(np.sqrt(roi_image.size / MAX_FEATURE_VOXELS))) if roi_image.size > MAX_FEATURE_VOXELS else 1
    coarse = coarsen(roi_image, factor)
    features = voxel_features(normalise(coarse), spacing_m * np.array([factor, factor, 1]))
    if backbone is not None:
        from MedSSL.tasks.fewshot.network_features import decoder_features

        features = np.concatenate([features, decoder_features(backbone, coarse, spacing_m * np.array([factor, factor, 1]),
                                                              backbone_intensity)])
    if extra_features is not None:
        if tuple(extra_features.shape[1:]) != tuple(image.shape):
            raise MedSSLError(f"extra features {tuple(extra_features.shape[1:])} and image {tuple(image.shape)} "
                              "differ in shape")
        extra = [coarsen(np.ascontiguousarray(moved(planes, f)[box], np.float32), factor) for f in extra_features]
        features = np.concatenate([features, np.stack(extra)])
    in_roi = [k - box[2].start for k in planes.planes[main] if box[2].start <= k < box[2].stop]
    return Frame(roi_labels, known_m[box].copy(), features, spacing_m, in_roi, box, factor, planes), planes, labels_m.shape


def coarsen(image: np.ndarray, factor: int) -> np.ndarray:
    """Every ``factor``-th voxel in X and Y after an anti-aliasing blur (sigma factor / 2 voxels); Z kept."""
    if factor == 1:
        return image
    smooth = ndimage.gaussian_filter(image, (factor / 2.0, factor / 2.0, 0.0), mode="nearest")
    return np.ascontiguousarray(smooth[::factor, ::factor])
