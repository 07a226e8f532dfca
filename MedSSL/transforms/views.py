"""Geometric views for the teacher-student and contrastive methods, whole batches at once with
``affine_grid``/``grid_sample``: random resized crops (DiRA, CAiD) and Adam-v2's boxes (anchors, nested
centre crops, parts). Every function takes (N, C, X, Y, Z) batches, or (N, C, X, Y) in 2D; randomness
comes from the ``generator`` argument.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) U[low, high) draws on the generator's device."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_resized_crop3d(x: torch.Tensor, scale: tuple, generator: torch.Generator,
                          aspect: float = 4.0 / 3.0) -> torch.Tensor:
    """Random sub-box of each (N, C, X, Y, Z) cube resampled (trilinear) to the cube's size; in 2D the
    same for (N, C, X, Y) images (a sub-rectangle, bilinear): published RandomResizedCrop.

    The box holds a fraction ``U(scale)`` of the cube's volume (of the image's area in 2D); each side is
    that fraction's d-th root (d = 3 or 2 axes) times a log-uniform aspect factor in [1/aspect, aspect]
    per axis (clipped to the cube), and the box lies at a uniform random position inside the cube.
    3D analogue of RandomResizedCrop (published 2D: scale 0.2-1 of the area, aspect 3/4-4/3).
    """
    n, d = x.shape[0], x.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected (N, C, X, Y, Z) or (N, C, X, Y), got shape {tuple(x.shape)}")
    device = x.device
    volume = uniform(n, float(scale[0]), float(scale[1]), generator).to(device)
    log_a = math.log(aspect)
    sides = []
    for _ in range(d):
        jitter = torch.exp(uniform(n, -log_a, log_a, generator)).to(device)
        sides.append((volume.pow(1.0 / d) * jitter).clamp(max=1.0))
    # sides[a] is the fraction of axis a (X, Y[, Z]); grid coords are ordered last axis first
    theta = torch.zeros(n, d, d + 1, device=device, dtype=torch.float32)
    for row, axis in enumerate(reversed(range(d))):
        f = sides[axis]
        centre = (1.0 - f) * (2.0 * uniform(n, 0.0, 1.0, generator).to(device) - 1.0)
        theta[:, row, row] = f
        theta[:, row, d] = centre
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def sample_boxes(x: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, size, angle: torch.Tensor | None = None) -> torch.Tensor:
    """Resample one box per sample of ``x`` (N, C, *S) to (N, C, *size) voxels (linear, zeros outside).

    centre, half: (N, d) in normalised coordinates ([-1, 1] spans the cube), axes in array order
    (X, Y[, Z]); the box is ``centre +- half``. angle: (N,) radians, a rotation of the box in the
    (X, Y) plane about its centre.
    """
    n, c = x.shape[:2]
    d = x.dim() - 2
    theta = torch.zeros(n, d, d + 1, device=x.device, dtype=torch.float32)
    centre, half = centre.to(x.device, torch.float32), half.to(x.device, torch.float32)
    row = lambda axis: d - 1 - axis  # noqa: E731 - affine_grid orders coordinates last axis first
    for axis in range(d):
        theta[:, row(axis), row(axis)] = half[:, axis]
        theta[:, row(axis), d] = centre[:, axis]
    if angle is not None:
        cos, sin = torch.cos(angle).to(x.device), torch.sin(angle).to(x.device)
        rx, ry = row(0), row(1)
        theta[:, rx, rx], theta[:, rx, ry] = cos * half[:, 0], -sin * half[:, 1]
        theta[:, ry, rx], theta[:, ry, ry] = sin * half[:, 0], cos * half[:, 1]
    grid = F.affine_grid(theta, [n, c, *[int(s) for s in size]], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def draw_anchor(n: int, d: int, level: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, half), each (n, d), of anchors with sides ``2^-level`` of the cube at uniform positions inside it."""
    side = 2.0 ** -int(level)
    half = torch.full((n, d), side)
    centre = (1.0 - side) * (2.0 * torch.rand(n, d, generator=generator, device=generator.device).cpu() - 1.0)
    return centre, half


def centre_crop_half(anchor_half: torch.Tensor, scale, generator: torch.Generator, aspect: float = 4.0 / 3.0) -> torch.Tensor:
    """(N, d) half-sides of centre crops holding a fraction ``U(scale)`` of the anchor's volume (area in
    2D), each side jittered by a log-uniform factor in [1/aspect, aspect] and clipped to the anchor."""
    n, d = anchor_half.shape
    fraction = uniform(n, float(scale[0]), float(scale[1]), generator).cpu()
    log_a = math.log(aspect)
    jitter = torch.exp(uniform(n * d, -log_a, log_a, generator).cpu()).view(n, d)
    sides = (fraction.pow(1.0 / d).unsqueeze(1) * jitter).clamp(max=1.0)
    return anchor_half * sides


def part_boxes(centre: torch.Tensor, half: torch.Tensor, grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The anchor ``centre +- half`` ((N, d) each) split into ``grid`` (per axis) equal parts, in C order."""
    d = centre.shape[1]
    grid = [int(g) for g in grid][:d]
    boxes = []
    for index in np.ndindex(*grid):
        offset = torch.tensor([-1.0 + (2 * i + 1) / g for i, g in zip(index, grid)])
        boxes.append((centre + half * offset, half / torch.tensor([float(g) for g in grid])))
    return boxes


def local_size(patch, fraction: float) -> tuple:
    """Local-crop size: ``fraction`` of the patch per axis, rounded down to a multiple of 8 (>= 8)."""
    return tuple(max(8, int(p * fraction) // 8 * 8) if p >= 8 else int(p) for p in patch)
