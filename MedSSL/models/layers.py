"""Layers picked by the number of spatial dimensions: the torch classes MONAI's layer factories give.

Every network in MedSSL builds its layers here (``layer("conv", dims)``), so a 2D network (one-slice
images such as radiographs: input (N, C, X, Y)) and a 3D one (input (N, C, X, Y, Z)) are the same code
and have the same state-dict keys; only the kernels' rank differs.

The classes are named here, not looked up through ``monai.networks.layers.factories`` (Conv, Norm,
Pool), which return these same ``torch.nn`` classes (Testing/Python/test_spatial.py checks every kind
against them): importing MONAI loads every one of its submodules (2-3 s on a 2-core CPU), which every
training process the Slicer modules start paid before its first step. MONAI is still what runs the
sliding-window inference and the metrics, imported where those are used.
"""

from __future__ import annotations

from torch import nn

#: kind -> the torch class name, ``{d}`` the number of spatial dimensions
_CLASSES = {
    "conv": "Conv{d}d",
    "conv_transpose": "ConvTranspose{d}d",
    "batch_norm": "BatchNorm{d}d",
    "instance_norm": "InstanceNorm{d}d",
    "max_pool": "MaxPool{d}d",
    "adaptive_avg_pool": "AdaptiveAvgPool{d}d",
}


def layer(kind: str, spatial_dims: int) -> type:
    """The torch layer class for ``kind`` (one of ``_CLASSES``) in 2 or 3 spatial dimensions,
    e.g. ``layer("conv", 2)`` is ``nn.Conv2d``. ValueError for any other dims or kind."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if kind not in _CLASSES:
        raise ValueError(f"unknown layer kind {kind!r}; one of {', '.join(_CLASSES)}")
    return getattr(nn, _CLASSES[kind].format(d=spatial_dims))
