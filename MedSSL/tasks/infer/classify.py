"""Applying a volume classifier: one probability per class for a whole image."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from MedSSL.engine.sliding_window import tta_flips
from MedSSL.transforms.resize import fit_to_patch


@torch.no_grad()
def predict_classification(network: nn.Module, array: np.ndarray, patch, device, tta: bool = False) -> np.ndarray:
    """float32 (X, Y, Z) in [0, 1] -> (n_classes,) softmax probabilities (flip-averaged with ``tta``).
    A 2D network takes a one-slice image (X, Y, 1) resized to its 2D patch."""
    x = fit_to_patch(array, patch)[None].to(device)
    flips = tta_flips(x.dim()) if tta else ((),)
    probs = sum(torch.softmax(network(x.flip(d) if d else x).float(), dim=1) for d in flips) / len(flips)
    return probs[0].cpu().numpy()
