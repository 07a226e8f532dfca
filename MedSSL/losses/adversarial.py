"""Least-squares GAN losses (DiRA's adversary), written so that one optimiser over both players works.

* :func:`generator_loss` runs the discriminator with *detached copies of its parameters*
  (``torch.func.functional_call``), so its gradient moves the generator only, never D;
* :func:`discriminator_loss` sees the restoration *detached*, so its gradient moves D only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def generator_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """MSE(D(fake), 1) with D frozen; fake (N, C, *S) with gradient."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    score = functional_call(discriminator, frozen, (fake,)).float()
    return F.mse_loss(score, torch.ones_like(score))


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * [MSE(D(real), 1) + MSE(D(fake.detach()), 0)]; real, fake (N, C, *S)."""
    real_score = discriminator(real).float()
    fake_score = discriminator(fake.detach()).float()
    return 0.5 * (F.mse_loss(real_score, torch.ones_like(real_score))
                  + F.mse_loss(fake_score, torch.zeros_like(fake_score)))
