"""The Models Genesis U-Net (``UNet3D`` in the official code), with the official PyTorch module names so
published weights load strictly. Named ``GenesisUNet`` here because it also builds the 2D network; bundles
keep the architecture name ``"unet3d"`` in model.json, so every bundle written before still loads.

Written by hand because no MONAI network has this topology (3 poolings, transposed-conv upsampling, the
channel plan 32-64 | 64-128 | 128-256 | 256-512). Attribute names (``down_tr64.ops.0.conv1``, ``bn1``,
``up_tr256.up_conv``, ``out_tr.final_conv``) and tensor shapes at ``width=32`` match the official
``UNet3D`` state dict key for key (106 tensors, 19,073,665 parameters); the module names keep the
official numbers (``down_tr64``...) at every width so any width's checkpoint has the same keys.

BatchNorm: the official ``ContBatchNorm3d`` always normalises with batch statistics, even in ``eval()``,
and keeps updating its running statistics at inference. We use standard ``nn.BatchNorm3d``: batch
statistics while training, the stored running statistics in ``eval()``. Inference is then deterministic
and independent of the batch (a sliding window of batch 1 gives the same answer as batch 8), which the
official behaviour is not. The state-dict keys are the same either way.

Input: (N, C_in, X, Y, Z) with X, Y, Z divisible by 8. Output: (N, C_out, X, Y, Z) logits (no sigmoid:
the restoration loss applies it; segmentation uses softmax).

``spatial_dims=2`` builds the same network with 2D layers (input (N, C_in, X, Y)) for one-slice images
such as radiographs loaded in Slicer; its keys are the same, its kernels 2D.
"""

from __future__ import annotations

import torch
from torch import nn

from MedSSL.models.layers import layer


class LUConv(nn.Module):
    """Conv(k=3, padding 1) -> BatchNorm -> ReLU. Keys: conv1.*, bn1.*."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 3):
        super().__init__()
        self.conv1 = layer("conv", spatial_dims)(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = layer("batch_norm", spatial_dims)(out_channels)
        self.relu1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConvs (in -> w*2^d -> 2w*2^d), then MaxPool3d(2) except at the bottleneck (depth 3).

    Returns (output, skip): the pooled tensor and the pre-pool tensor kept for the decoder.
    """

    def __init__(self, in_channels: int, depth: int, width: int, spatial_dims: int = 3):
        super().__init__()
        mid = width * 2**depth
        self.ops = nn.Sequential(LUConv(in_channels, mid, spatial_dims), LUConv(mid, mid * 2, spatial_dims))
        self.out_channels = mid * 2
        self.pool = layer("max_pool", spatial_dims)(2) if depth < 3 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (self.pool(skip) if self.pool is not None else skip), skip


class UpTransition(nn.Module):
    """ConvTranspose3d(k=2, s=2) -> concat with the skip -> two LUConvs to ``out_channels``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, spatial_dims: int = 3):
        super().__init__()
        self.up_conv = layer("conv_transpose", spatial_dims)(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(in_channels + skip_channels, out_channels, spatial_dims),
                                 LUConv(out_channels, out_channels, spatial_dims))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class OutputTransition(nn.Module):
    """1x1x1 convolution to the output channels (logits). Key: final_conv.*."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 3):
        super().__init__()
        self.final_conv = layer("conv", spatial_dims)(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class GenesisUNet(nn.Module):
    """Models Genesis GenesisUNet scaled by ``width`` (32 = official).

    Args:
        in_channels: input channels (1 for CT/MR; 2.5D inputs use more).
        out_channels: output channels (1 for restoration; the number of classes for segmentation).
        width: base channels; the bottleneck has ``16 * width`` channels.
        spatial_dims: 3 (volumes, the official network) or 2 (one-slice images).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 32, spatial_dims: int = 3):
        super().__init__()
        if width < 1:
            raise ValueError("width must be >= 1")
        self.in_channels, self.out_channels, self.width = in_channels, out_channels, width
        self.spatial_dims = spatial_dims
        d = spatial_dims
        self.down_tr64 = DownTransition(in_channels, 0, width, d)
        self.down_tr128 = DownTransition(self.down_tr64.out_channels, 1, width, d)
        self.down_tr256 = DownTransition(self.down_tr128.out_channels, 2, width, d)
        self.down_tr512 = DownTransition(self.down_tr256.out_channels, 3, width, d)
        c64, c128, c256, c512 = (t.out_channels for t in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512))
        self.up_tr256 = UpTransition(c512, c256, c256, d)
        self.up_tr128 = UpTransition(c256, c128, c128, d)
        self.up_tr64 = UpTransition(c128, c64, c64, d)
        self.out_tr = OutputTransition(c64, out_channels, d)

    @property
    def bottleneck_channels(self) -> int:
        return self.down_tr512.out_channels

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, C_in, X, Y, Z) -> bottleneck (N, 16w, X/8, Y/8, Z/8) and the three skips."""
        x, s64 = self.down_tr64(x)
        x, s128 = self.down_tr128(x)
        x, s256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        return x, [s64, s128, s256]

    def decode(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Bottleneck and skips -> last decoder features (N, 2w, X, Y, Z)."""
        s64, s128, s256 = skips
        x = self.up_tr256(bottleneck, s256)
        x = self.up_tr128(x, s128)
        return self.up_tr64(x, s64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encode(x)
        return self.out_tr(self.decode(bottleneck, skips))

    def forward_with_bottleneck(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C_out, X, Y, Z), bottleneck (N, 16w, X/8, Y/8, Z/8)) in one pass."""
        bottleneck, skips = self.encode(x)
        return self.out_tr(self.decode(bottleneck, skips)), bottleneck


#: the state-dict key of the first convolution: (width, input channels, *kernel)
FIRST_KERNEL = "down_tr64.ops.0.conv1.weight"


def spatial_dims_from_state_dict(state: dict) -> int:
    """2 or 3: the number of spatial dimensions of a GenesisUNet state dict's kernels."""
    return int(state[FIRST_KERNEL].dim()) - 2


def width_from_state_dict(state: dict) -> int:
    """Base width of a GenesisUNet state dict (the first convolution's output channels)."""
    if FIRST_KERNEL not in state:
        raise KeyError(FIRST_KERNEL)
    return int(state[FIRST_KERNEL].shape[0])


def in_channels_from_state_dict(state: dict) -> int:
    """Input channels of a GenesisUNet state dict (1 = the image only; more with position channels)."""
    return int(state[FIRST_KERNEL].shape[1])
