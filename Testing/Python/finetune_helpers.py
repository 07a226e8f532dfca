"""Small builders shared by the fine-tuning / prediction test files: synthetic volumes and bundles."""

from __future__ import annotations

import numpy as np
import torch

from MedSSL.io.bundle import save_bundle
from MedSSL.io.volumes import Volume

#: an oblique, right-handed direction (columns = LPS directions of the i, j, k axes)
_a, _b = np.deg2rad(30.0), np.deg2rad(20.0)
OBLIQUE = (np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]])
           @ np.array([[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]]))


def volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, modality=None) -> Volume:
    return Volume(np.asarray(array), np.asarray(spacing, dtype=np.float64), np.asarray(origin, dtype=np.float64),
                  np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64), modality)


def ball(shape, centre, radius) -> np.ndarray:
    """Boolean (X, Y, Z) ball of ``radius`` voxels around the index ``centre``."""
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return d2 <= radius**2


def blobs_ct(shape=(32, 32, 16), seed=0, n=4, radius=4, values=(1,), hu=(300,)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like image (int16 HU: -1000 air border, 0 soft tissue, blobs at ``hu``) and its labels."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    image[:2], image[-2:] = -1000, -1000
    labels = np.zeros(shape, dtype=np.uint8)
    for i in range(n):
        which = i % len(values)
        centre = [rng.uniform(min(radius + 2, s / 2), max(s - radius - 2, s / 2)) for s in shape]
        b = ball(shape, centre, radius)
        image[b] = hu[which]
        labels[b] = values[which]
    image += rng.normal(0, 10, size=shape).astype(np.float32)
    return image.round().astype(np.int16), labels


def segment_bundle(path, values=(0, 1), width=4, patch=(16, 16, 16), spacing=None, in_channels=1,
                   task="segment", seed=0, spatial_dims=3, names=None, cohort=None) -> None:
    """An untrained segmentation (or other ``task``) bundle, written without training; ``cohort``: its
    model.json ``cohort`` entry (a cohort model's)."""
    from MedSSL.models.genesis_unet import GenesisUNet

    torch.manual_seed(seed)
    net = GenesisUNet(in_channels, len(values), width, spatial_dims=spatial_dims)
    classes = {str(v): {"name": (names or {}).get(v, f"c{v}"), "color": [0.5, 0.5, 0.5]} for v in values if v}
    meta = {"architecture": {"name": "unet3d", "width": width, "in_channels": in_channels, "out_channels": len(values),
                             "spatial_dims": spatial_dims},
            "task": task, "classes": classes, "channels": list(values),
            "preprocessing": {"intensity": {"modality": "CT", "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]},
                              "target_spacing_mm": list(spacing) if spacing else None, "modality": "CT"},
            "patch_size": list(patch)}
    if cohort is not None:
        meta["cohort"] = cohort
    save_bundle(path, net.state_dict(), meta)
