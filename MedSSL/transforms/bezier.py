"""Models Genesis' non-linear (Bezier) intensity map, batched: one lookup table per sample (see
:mod:`MedSSL.transforms.genesis` for how it differs from the official ``np.interp``). Batches are
(N, C, X, Y, Z) float tensors in [0, 1]."""

from __future__ import annotations

import torch

from MedSSL.transforms.random_draws import check_batch, draw_device, uniform_draws

#: Parameter values at which the Bezier curve is sampled (the official code uses 100,000).
BEZIER_SAMPLES = 10_001
#: Entries of the per-sample intensity lookup table (uniform grid on [0, 1]).
BEZIER_TABLE_SIZE = 8_193


# ----------------------------------------------------------------------------------------------------
# non-linear intensity map

_BEZIER_BASIS: dict = {}


def _bezier_basis(samples: int, device: torch.device):
    key = (samples, str(device))
    if key not in _BEZIER_BASIS:
        t = torch.linspace(0.0, 1.0, samples, dtype=torch.float64, device=device)
        inner = torch.stack([3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2])  # weights of P1, P2
        _BEZIER_BASIS[key] = (inner, t**3)  # P3 = (1, 1), P0 = (0, 0) contributes nothing
    return _BEZIER_BASIS[key]


def bezier_tables(
    n: int,
    generator: torch.Generator | None,
    invert_prob: float = 0.5,
    device: torch.device | None = None,
    samples: int = BEZIER_SAMPLES,
    size: int = BEZIER_TABLE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` official Bezier intensity maps as lookup tables.

    Returns (tables (N, size) float32: the map at intensities linspace(0, 1, size); inverted (N,) bool).

    Official curve: cubic Bezier with P0 = (0, 0), P1 = (u1, u2), P2 = (u3, u4), P3 = (1, 1), u ~ U[0, 1).
    Its x(t) and y(t) are non-decreasing on [0, 1] for such control points. The official Bernstein basis
    is written t^(n-i) (1-t)^i, so its sample arrays run from P3 to P0 (decreasing); with probability 1/2
    only the x samples are sorted, which pairs x(t) with y(1 - t): the map is then inverted (0 -> 1,
    1 -> 0, non-increasing); otherwise both are sorted and the map is the curve itself (0 -> 0, 1 -> 1,
    non-decreasing). The map is sampled at ``samples`` values of t and linearly interpolated.
    """
    device = torch.device(device) if device is not None else draw_device(generator, torch.device("cpu"))
    u = uniform_draws(generator, (n, 5), device, dtype=torch.float64)
    inner, cubic = _bezier_basis(samples, device)
    xs = torch.addmm(cubic.expand(n, samples), u[:, [0, 2]], inner)
    ys = torch.addmm(cubic.expand(n, samples), u[:, [1, 3]], inner)
    xs = torch.cummax(xs, dim=1).values  # the official code sorts; x(t) is monotone up to rounding
    inverted = u[:, 4] < invert_prob
    ys = torch.where(inverted.unsqueeze(1), ys.flip(1), ys)
    # np.interp(grid, xs, ys) on the uniform grid k / (size - 1): the segment index of grid point k is
    # (number of xs <= grid[k]) - 1, counted per grid cell instead of by binary search
    cell = torch.ceil(xs * (size - 1)).long().clamp_(0, size)
    counts = torch.zeros(n, size + 1, dtype=torch.int64, device=device).scatter_add_(1, cell, torch.ones_like(cell))
    i = (torch.cumsum(counts[:, :size], 1) - 1).clamp_(0, samples - 2)
    grid = torch.linspace(0.0, 1.0, size, dtype=torch.float64, device=device).expand(n, size)
    x0, x1 = xs.gather(1, i), xs.gather(1, i + 1)
    y0, y1 = ys.gather(1, i), ys.gather(1, i + 1)
    w = ((grid - x0) / (x1 - x0)).nan_to_num_(0.0, 0.0, 0.0).clamp_(0.0, 1.0)
    return (y0 + w * (y1 - y0)).float(), inverted


def apply_intensity_tables(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Map every voxel of sample i of ``x`` (N, C, X, Y, Z) through ``tables[i]`` (N, K), the map
    sampled at linspace(0, 1, K), with linear interpolation; values outside [0, 1] are clamped first."""
    check_batch(x, "x")
    n, k = tables.shape
    if n == 0:
        return x.clone()
    tables = tables.to(device=x.device, dtype=torch.float32)
    # (table[i], table[i + 1] - table[i]) packed as one complex number: one gather per voxel
    slope = torch.cat([tables[:, 1:] - tables[:, :-1], torch.zeros_like(tables[:, :1])], 1)
    packed = torch.view_as_complex(torch.stack([tables, slope], -1)).view(-1)
    pos = x.reshape(n, -1).float().mul(k - 1).clamp_(0, k - 1)
    small = n * k < 2**31
    i = (pos.int() if small else pos.long()).clamp_(max=k - 2)
    w = pos.sub_(i)
    i += (torch.arange(n, device=x.device, dtype=i.dtype) * k).view(n, 1)
    ends = torch.view_as_real(packed.index_select(0, i.view(-1))).view(n, -1, 2)
    return torch.addcmul(ends[..., 0], ends[..., 1], w).view_as(x).to(x.dtype)


def bezier_intensity(x: torch.Tensor, generator: torch.Generator | None, invert_prob: float = 0.5) -> torch.Tensor:
    """The official non-linear intensity transformation, applied to every sample (no skip probability):
    (N, C, X, Y, Z) in [0, 1] -> same shape, in [0, 1]. See :func:`bezier_tables`."""
    check_batch(x, "x")
    if x.shape[0] == 0:
        return x.clone()
    tables, _ = bezier_tables(x.shape[0], generator, invert_prob, device=x.device)
    return apply_intensity_tables(x, tables)
