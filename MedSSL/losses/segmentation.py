"""Dice + cross-entropy for sparse labels: voxels marked 255 (not annotated) take no part in either term.

MONAI's ``DiceCELoss`` has no ignore index, so the two terms are built separately: cross-entropy with
``ignore_index=255`` (averaged over annotated voxels only), and MONAI's ``DiceLoss`` on softmax
probabilities and one-hot targets that are both multiplied by the annotation mask, so an ignored voxel
adds nothing to any intersection or denominator (and gets no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from MedSSL.data.labels import IGNORE


class MaskedDiceCELoss(torch.nn.Module):
    """loss(logits (N, C, X, Y, Z), target (N, X, Y, Z) long in 0..C-1 or 255) -> (scalar, parts); the
    same in 2D: logits (N, C, X, Y), target (N, X, Y).

    Dice is computed over the whole batch (``batch=True``), including background, so a class absent
    from one patch does not produce a spurious 0/0 term. With no annotated voxel at all the loss is 0
    (with a graph, so ``backward`` still works). ``skip_absent``: the Dice term averages only the classes
    annotated somewhere in the batch (see :func:`masked_dice_loss`).
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, skip_absent: bool = False):
        super().__init__()
        self.dice_weight, self.ce_weight, self.skip_absent = dice_weight, ce_weight, skip_absent

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits.float()
        target = target.long()
        mask = target != IGNORE
        if not mask.any():
            zero = logits.sum() * 0.0
            return zero, {"dice_loss": 0.0, "ce": 0.0}
        log_probs = F.log_softmax(logits, dim=1)  # once for both terms
        ce = F.nll_loss(log_probs, target, ignore_index=IGNORE)
        dice = masked_dice_loss(log_probs.exp(), target, mask, skip_absent=self.skip_absent)
        loss = self.dice_weight * dice + self.ce_weight * ce
        return loss, {"dice_loss": float(dice.detach()), "ce": float(ce.detach())}


def masked_dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5,
                     skip_absent: bool = False) -> torch.Tensor:
    """MONAI's ``DiceLoss(include_background=True, batch=True, smooth_nr=smooth, smooth_dr=smooth)`` of
    ``probs * mask`` against ``one_hot(target) * mask``, without building the one-hot tensor.

    probs (N, C, *S) float probabilities; target (N, *S) long class indices (any value where ``mask``
    is False); mask (N, *S) bool annotated voxels. Returns the mean over the C classes of
    1 - (2 I_c + smooth) / (P_c + G_c + smooth), with I_c the summed probability of class c on the
    voxels annotated c, P_c the summed probability of class c on the annotated voxels and G_c their count.

    ``skip_absent``: the mean over the classes with G_c > 0 only. A class absent from the batch otherwise
    adds a term of about 1 whose only way down is to predict that class nowhere (with several classes and
    2 patches per step, most classes in most batches). Measured on CHAOS it did not stop classes from
    vanishing in short trainings (docs/cohort.md), so fine-tuning keeps the plain mean.
    """
    classes = probs.shape[1]
    labels = target[mask]  # (M,)
    own = probs.movedim(1, -1)[mask].gather(1, labels[:, None])[:, 0]  # (M,) probability of the own class
    intersection = torch.zeros(classes, dtype=probs.dtype, device=probs.device).index_add(0, labels, own)
    predicted = (probs * mask.unsqueeze(1).to(probs.dtype)).sum(dim=[0, *range(2, probs.dim())])
    truth = torch.bincount(labels, minlength=classes).to(probs.dtype)
    terms = 1.0 - (2.0 * intersection + smooth) / (predicted + truth + smooth)
    return terms[truth > 0].mean() if skip_absent else terms.mean()
