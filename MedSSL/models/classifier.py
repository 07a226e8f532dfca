"""The volume classifier: the (pretrained) GenesisUNet encoder with the Models Genesis target-task head."""

from __future__ import annotations

import torch
from torch import nn

from MedSSL.models.genesis_unet import GenesisUNet


class ClassifierNet(nn.Module):
    """GenesisUNet encoder + head. forward: (N, C_in, X, Y, Z) -> logits (N, n_classes); with
    ``spatial_dims=2`` (one-slice images): (N, C_in, X, Y) -> logits (N, n_classes).

    Keys: ``backbone.*`` (a whole GenesisUNet, so the bundle also serves as ``--init``) and ``head.*``.
    """

    def __init__(self, width: int, n_classes: int, in_channels: int = 1, spatial_dims: int = 3):
        super().__init__()
        self.backbone = GenesisUNet(in_channels=in_channels, out_channels=1, width=width, spatial_dims=spatial_dims)
        channels = self.backbone.bottleneck_channels
        self.head = nn.Sequential(nn.Linear(channels, 1024), nn.ReLU(inplace=True), nn.Linear(1024, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, _ = self.backbone.encode(x)
        return self.head(bottleneck.flatten(2).mean(dim=2))
