"""Adam-v2's self-distillation losses (DINO cross-entropy and distances between unit embeddings)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sharpened_targets(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's centred and sharpened distribution softmax((t - center) / tau_t): (N, K)."""
    return torch.softmax((teacher_logits.float() - center) / temperature, dim=-1)


def dino_loss(targets: torch.Tensor, student_logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over the student's views (each (N, K)) of CE(targets (N, K), log_softmax(s / tau_s))."""
    losses = [-(targets * F.log_softmax(v.float() / temperature, dim=-1)).sum(dim=-1).mean() for v in student_logits]
    return torch.stack(losses).mean()


def embedding_distance(a: torch.Tensor, b: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Squared Euclidean distance of (N, d) embeddings: summed over d and averaged over N ("sum",
    2 - 2 cos for unit vectors) or averaged over both ("mean", PyTorch's MSELoss default)."""
    sq = (a - b).pow(2)
    return sq.sum(dim=-1).mean() if reduction == "sum" else sq.mean()


@torch.no_grad()
def normalised_entropy(p: torch.Tensor) -> float:
    """Mean entropy of the rows of (N, K) distributions over log K: 1 = uniform, 0 = one-hot."""
    return float(-(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean() / math.log(p.shape[-1]))
