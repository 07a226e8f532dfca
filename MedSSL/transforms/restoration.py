"""Semantic Genesis' (and TransVW's) restoration inputs: the one-of-four perturbation and the in-plane
elastic deformation, on (N, C, X, Y, Z) batches.

The perturbations reuse the batched Models Genesis building blocks of :mod:`MedSSL.transforms.genesis`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from MedSSL.errors import MedSSLError
from MedSSL.transforms.genesis import bezier_intensity, inpaint, local_pixel_shuffle, outpaint


def one_of_four(x: torch.Tensor, generator: torch.Generator, shuffle_blocks: int = 5,
                probabilities=(0.25, 0.25, 0.25, 0.25), paint_fill: str = "noise") -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic Genesis' perturbation: exactly one of four per sample (published 0.25 each):
    local pixel shuffling with ``shuffle_blocks`` blocks (published 5), the Bezier intensity map,
    in-painting with one box, out-painting with one window. Returns (perturbed, choice (N,) in 0..3)."""
    n = x.shape[0]
    p = torch.tensor([float(v) for v in probabilities], dtype=torch.float64)
    if p.numel() != 4 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise MedSSLError("perturbation_probabilities must be four non-negative numbers, not all 0")
    cdf = (p.cumsum(0) / p.sum()).to(torch.float32)
    u = torch.rand(n, generator=generator, device=generator.device).to("cpu")
    choice = torch.searchsorted(cdf, u, right=True).clamp(max=3).to(x.device)
    out = x.clone()
    ops = (
        lambda part: local_pixel_shuffle(part, generator, shuffle_blocks),
        lambda part: bezier_intensity(part, generator),
        lambda part: inpaint(part, generator, boxes=1, continue_prob=1.0, fill=paint_fill),
        lambda part: outpaint(part, generator, windows=1, continue_prob=1.0, fill=paint_fill),
    )
    for k, op in enumerate(ops):
        idx = torch.nonzero(choice == k).squeeze(1)
        if idx.numel():
            out = out.index_copy(0, idx, op(x.index_select(0, idx)))
    return out, choice


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # scipy's gaussian_filter truncates at 4 sigma
    r = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def _smooth2d(field: torch.Tensor, sigma_x: float, sigma_y: float) -> torch.Tensor:
    """Gaussian smoothing of (N, X, Y) with zero padding (scipy ``mode="constant"``)."""
    kx, ky = _gaussian_kernel(sigma_x, field.device), _gaussian_kernel(sigma_y, field.device)
    f = field.unsqueeze(1)
    f = F.conv2d(f, kx.view(1, 1, -1, 1), padding=(kx.numel() // 2, 0))
    f = F.conv2d(f, ky.view(1, 1, 1, -1), padding=(0, ky.numel() // 2))
    return f[:, 0]


def elastic_inplane(x: torch.Tensor, generator: torch.Generator, alpha: float = 991.0, sigma: float = 8.0) -> torch.Tensor:
    """Semantic Genesis' in-plane elastic deformation of (N, C, X, Y, Z) cubes (Z unchanged).

    Published for 64 x 64 x 32 cubes: displacement fields dx, dy = Gaussian-smoothed (sigma 8, zero
    padded) U[-1, 1] noise times alpha = 991, linear interpolation, reflected at the border, the same
    for every slice. Here sigma and alpha are given for a 64-voxel plane and scaled with the cube
    (sigma by s, alpha by s^2, s = sqrt(X * Y) / 64) so the warp is the same fraction of the cube.
    """
    n, _, X, Y, Z = x.shape
    s = math.sqrt(X * Y) / 64.0
    sigma_x, sigma_y = sigma * X / 64.0, sigma * Y / 64.0
    noise = torch.rand(2, n, X, Y, generator=generator, device=generator.device).to(x.device) * 2.0 - 1.0
    dx = _smooth2d(noise[0], sigma_x, sigma_y) * (alpha * s * s)
    dy = _smooth2d(noise[1], sigma_x, sigma_y) * (alpha * s * s)
    ix = torch.arange(X, device=x.device, dtype=torch.float32).view(1, X, 1)
    iy = torch.arange(Y, device=x.device, dtype=torch.float32).view(1, 1, Y)
    gx = 2.0 * (ix + dx) / max(1, X - 1) - 1.0  # (N, X, Y)
    gy = 2.0 * (iy + dy) / max(1, Y - 1) - 1.0
    gz = torch.linspace(-1.0, 1.0, Z, device=x.device) if Z > 1 else torch.zeros(1, device=x.device)
    grid = torch.stack(torch.broadcast_tensors(gz.view(1, 1, 1, Z), gy.unsqueeze(-1), gx.unsqueeze(-1)), dim=-1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out.to(x.dtype)
