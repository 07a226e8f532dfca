"""Heads that the self-supervised methods put on the Genesis U-Net, DiRA's discriminator, and the
folding of Ark's per-dataset heads into one output layer.

Shapes: a bottleneck is (N, 16w, x, y, z) ((N, 16w, x, y) for a 2D network); a pooled embedding (N, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def global_pool(bottleneck: torch.Tensor) -> torch.Tensor:
    """Global average pool (N, C, *S) -> (N, C), float32."""
    return bottleneck.float().mean(dim=tuple(range(2, bottleneck.dim())))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them: (N, sizes[0]) -> (N, sizes[-1])."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """MoCo-v2 projection: GAP of a bottleneck (N, C, *S) -> (N, dim) (not normalised); the MLP
    Linear(C, hidden) ReLU Linear(hidden, dim), or one Linear when ``mlp`` is False."""

    def __init__(self, in_channels: int, dim: int = 128, hidden: int | None = None, mlp: bool = True):
        super().__init__()
        hidden = hidden or in_channels
        if mlp:
            self.fc = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        else:
            self.fc = nn.Sequential(nn.Linear(in_channels, dim))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc(global_pool(bottleneck))


class ClassificationHead(nn.Module):
    """Semantic Genesis' self-classification head on the bottleneck: (N, C, x, y, z) -> (N, classes) logits.

    Conv3d(C -> hidden, k 3, padding 1) -> BatchNorm -> ReLU -> global average pool -> Linear(hidden -> classes)
    (the published head ends in a softmax fed to log + NLL, i.e. plain cross-entropy on logits).
    Published at width 32: 512 -> 1024 -> C; the attribute names (``conv1``, ``bn1``, ``fc1``) are the
    published ones (``clc_out.*``).
    """

    def __init__(self, in_channels: int, hidden: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, hidden, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(hidden)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(hidden, classes)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(bottleneck)))
        return self.fc1(x.float().mean(dim=(2, 3, 4)))


class LocalizabilityHead(nn.Module):
    """DINO head (Adam-v2): GAP -> Linear(in, h) GELU Linear(h, h) GELU Linear(h, b) -> L2 norm -> prototypes.

    ``prototypes`` (out_dim, b) is used with unit-norm rows (weight normalisation with the norm fixed
    at 1, the published ``norm_last_layer``); linear layers trunc-normal(std 0.02), biases 0.
    """

    def __init__(self, in_channels: int, out_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach().clone())

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, in) pooled embeddings -> (N, out_dim) logits (cosines to the prototypes)."""
        h = F.normalize(self.mlp(embedding.float()), dim=-1)
        return h @ F.normalize(self.prototypes, dim=1).t()

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.project(global_pool(bottleneck))


class Discriminator(nn.Module):
    """PatchGAN-like discriminator (DiRA), 3D or (``spatial_dims=2``) 2D as published (published 2D:
    64-128-256-512 channels, three stride-2 convs and one stride-1 conv with LeakyReLU 0.2 and
    InstanceNorm after the first, then a 1-channel conv).

    Kernels 3x3x3 (3x3 in 2D). Input (N, C, X, Y, Z) (or (N, C, X, Y)), output a one-channel patch
    map of the same number of dimensions. An axis is only strided while it is at least 4 voxels, so
    small cubes (down to 8 voxels) keep at least 2 voxels per axis for the InstanceNorm. Weights
    N(0, 0.02) as published. The 2D and 3D state dicts have the same keys.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, spatial_dims: int = 3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        self.convs = nn.ModuleList(conv(chans[i], chans[i + 1], 3, padding=1) for i in range(4))
        self.norms = nn.ModuleList(norm(chans[i + 1]) for i in range(1, 4))
        self.out = conv(chans[4], 1, 3, padding=1)
        self.strided = (True, True, True, False)
        for m in self.modules():
            if isinstance(m, conv):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"a {self.spatial_dims}D discriminator takes (N, C, {'X, Y, Z' if self.spatial_dims == 3 else 'X, Y'}), "
                             f"got shape {tuple(x.shape)}")
        conv_nd = F.conv3d if self.spatial_dims == 3 else F.conv2d
        for i, conv in enumerate(self.convs):
            stride = tuple(2 if (self.strided[i] and s >= 4) else 1 for s in x.shape[2:])
            x = conv_nd(x, conv.weight, conv.bias, stride=stride, padding=1)
            if i > 0:
                x = self.norms[i - 1](x)
            x = F.leaky_relu(x, 0.2)
        return self.out(x)


def fold_heads(heads, mappings: list[dict], n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ark's per-dataset 1x1x1 heads -> (weight (1 + n_classes, C), bias (1 + n_classes,)) of one output layer.

    ``mappings[h]`` maps head h's output channel (1..) to a global class (1..n_classes). Fused logit of
    class g = mean over the heads having g of (logit_h(g) - logit_h(background)); fused background
    logit = 0 (why: :mod:`MedSSL.methods.ark`). A class no head has keeps a zero row.
    """
    first = heads[0].weight
    c = first.shape[1]
    weight = torch.zeros(1 + n_classes, c, dtype=torch.float32, device=first.device)
    bias = torch.zeros(1 + n_classes, dtype=torch.float32, device=first.device)
    count = torch.zeros(1 + n_classes, dtype=torch.float32, device=first.device)
    for head, mapping in zip(heads, mappings):
        w = head.weight.detach().float().reshape(head.weight.shape[0], c)
        b = head.bias.detach().float()
        for channel, g in mapping.items():
            weight[g] += w[channel] - w[0]
            bias[g] += b[channel] - b[0]
            count[g] += 1
    scale = 1.0 / count.clamp_min(1.0)
    return weight * scale.unsqueeze(1), bias * scale
