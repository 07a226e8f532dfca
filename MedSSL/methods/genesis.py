"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): restore the original cube from a transformed one.

Loss: MSE between sigmoid(backbone(T(x))) and x, T = flip, local pixel shuffling, Bezier intensity
map, in- or out-painting (:mod:`MedSSL.transforms.genesis`, written by hand: no library has them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from MedSSL.transforms.genesis import GenesisTransformConfig, genesis_transform
from MedSSL.methods.base import SSLMethod, register


@register
class ModelsGenesis(SSLMethod):
    name = "genesis"
    description = "Models Genesis: restoration of cubes after shuffling, Bezier intensity and in/out-painting"
    published = (
        "3D U-Net on 64x64x32 LUNA16 CT cubes, MSE restoration, SGD lr 1.0 (momentum 0.9), batch 6; "
        "ours: same transforms and probabilities, Adam lr 1e-3 with cosine decay by default (SGD lr 1.0 "
        "collapses to a constant output for some users), standard BatchNorm"
    )
    supports_2d = True
    Settings = GenesisTransformConfig

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch (N, 1, X, Y, Z) in [0, 1] (or (N, 1, X, Y) in 2D) -> MSE of the restoration."""
        inputs, targets = genesis_transform(batch, self.settings, generator)  # 2D: as one-slice cubes
        restored = torch.sigmoid(self.backbone(inputs).float())
        loss = F.mse_loss(restored, targets)
        return loss, {"mse": float(loss.detach())}
