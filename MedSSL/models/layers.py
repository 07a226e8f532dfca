"""Layers picked by the number of spatial dimensions, through MONAI's layer factories.

Every network in MedSSL builds its layers here (``layer("conv", dims)``), so a 2D network (one-slice
images such as radiographs: input (N, C, X, Y)) and a 3D one (input (N, C, X, Y, Z)) are the same code
and have the same state-dict keys; only the kernels' rank differs.
"""

from __future__ import annotations

from monai.networks.layers.factories import Conv, Norm, Pool

_FACTORIES = {
    "conv": (Conv, Conv.CONV),
    "conv_transpose": (Conv, Conv.CONVTRANS),
    "batch_norm": (Norm, Norm.BATCH),
    "instance_norm": (Norm, Norm.INSTANCE),
    "max_pool": (Pool, Pool.MAX),
    "adaptive_avg_pool": (Pool, Pool.ADAPTIVEAVG),
}


def layer(kind: str, spatial_dims: int) -> type:
    """The torch layer class for ``kind`` (one of ``_FACTORIES``) in 2 or 3 spatial dimensions,
    e.g. ``layer("conv", 2)`` is ``nn.Conv2d``. ValueError for any other dims or kind."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if kind not in _FACTORIES:
        raise ValueError(f"unknown layer kind {kind!r}; one of {', '.join(_FACTORIES)}")
    factory, name = _FACTORIES[kind]
    return factory[name, spatial_dims]
