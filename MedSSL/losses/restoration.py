"""The restoration loss of the Genesis family (Models Genesis, Semantic Genesis, TransVW, DiRA, CAiD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def restoration_mse(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE between sigmoid(logits) and target, the restoration sigmoid(logits)) in float32; logits and
    target (N, C, X, Y, Z) or (N, C, X, Y)."""
    restored = torch.sigmoid(logits.float())
    return F.mse_loss(restored, target.float()), restored
