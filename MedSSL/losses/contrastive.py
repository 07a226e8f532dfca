"""InfoNCE losses of the instance-discrimination methods (MoCo-v2 in DiRA / CAiD).

MONAI's ``ContrastiveLoss`` is SimCLR's NT-Xent over a pair of batches; MoCo's loss against a queue of
negatives is not in MONAI or torch, so it is written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo InfoNCE. q, k: (N, dim) L2-normalised (k without gradient), negatives (K, dim).

    Returns (loss, accuracy of picking the positive among 1 + K candidates), both scalars.
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ negatives.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=1) == 0).float().mean()
    return loss, acc


def in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with the other keys of the batch as negatives (q_i's positive is k_i); q, k (N, dim)."""
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
