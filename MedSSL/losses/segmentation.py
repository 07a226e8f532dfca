"""Dice + cross-entropy for sparse labels: voxels marked 255 (not annotated) take no part in either term.

MONAI's ``DiceCELoss`` has no ignore index, so the two terms are built separately: cross-entropy with
``ignore_index=255`` (averaged over annotated voxels only), and MONAI's ``DiceLoss`` on softmax
probabilities and one-hot targets that are both multiplied by the annotation mask, so an ignored voxel
adds nothing to any intersection or denominator (and gets no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from MedSSL.data.labels import IGNORE


class MaskedDiceCELoss(torch.nn.Module):
    """loss(logits (N, C, X, Y, Z), target (N, X, Y, Z) long in 0..C-1 or 255) -> (scalar, parts); the
    same in 2D: logits (N, C, X, Y), target (N, X, Y).

    Dice is computed over the whole batch (``batch=True``), including background, so a class absent
    from one patch does not produce a spurious 0/0 term. With no annotated voxel at all the loss is 0
    (with a graph, so ``backward`` still works).
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.dice = DiceLoss(include_background=True, softmax=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits.float()
        target = target.long()
        mask = target != IGNORE
        if not mask.any():
            zero = logits.sum() * 0.0
            return zero, {"dice_loss": 0.0, "ce": 0.0}
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
        probs = torch.softmax(logits, dim=1)
        m = mask.unsqueeze(1).to(probs.dtype)
        onehot = F.one_hot(torch.where(mask, target, 0), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        dice = self.dice(probs * m, onehot * m)
        loss = self.dice_weight * dice + self.ce_weight * ce
        return loss, {"dice_loss": float(dice.detach()), "ce": float(ce.detach())}
