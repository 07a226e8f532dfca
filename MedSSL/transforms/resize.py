"""Resizing a whole image to a network's patch (the classifier's input fitting, ``input_fit: "resize"``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from MedSSL.data.spatial import is_one_slice


def fit_to_patch(array: np.ndarray, patch) -> torch.Tensor:
    """float32 (X, Y, Z) -> (1, X', Y', Z') = ``patch``, trilinear resize. A 2D patch (X', Y', 1) (or
    (X', Y')) takes a one-slice image (X, Y, 1) to (1, X', Y'), bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    patch = tuple(int(p) for p in patch)
    mode = "trilinear"
    if len(patch) == 2 or patch[2] == 1 and is_one_slice(array.shape):
        t, patch, mode = t[..., 0], patch[:2], "bilinear"
    if tuple(t.shape[2:]) != patch:
        t = F.interpolate(t, size=patch, mode=mode, align_corners=False)
    return t[0]
