"""Models Genesis' in-painting and out-painting, batched (size rules in :mod:`MedSSL.transforms.genesis`).
Batches are (N, C, X, Y, Z) float tensors in [0, 1]."""

from __future__ import annotations

import torch

from MedSSL.transforms.random_draws import check_batch, randint_from, uniform_draws

PAINT_FILLS = ("noise", "constant")


# ----------------------------------------------------------------------------------------------------
# in- and out-painting


def _draw_boxes(u: torch.Tensor, dims: tuple, sides) -> tuple[list, list]:
    """Box sides and corners per axis from uniform draws ``u`` (N, K, 6).

    ``sides(d, u)`` maps the draws to a side per box for an axis of size d. Corners follow the official
    rule [3, d - side - 3], with the margin reduced to (d - side) // 2 where it would leave no room.
    """
    sizes, corners = [], []
    for a, d in enumerate(dims):
        side = sides(d, u[..., a])
        margin = ((d - side) // 2).clamp(max=3)
        corners.append(randint_from(u[..., 3 + a], margin, d - side - margin))
        sizes.append(side)
    return sizes, corners


def _axis_inside(sizes: list, corners: list, dims: tuple) -> list:
    """Per axis a: (N, K, d_a) bool, coordinate inside box k along that axis."""
    inside = []
    for a, d in enumerate(dims):
        r = torch.arange(d, device=sizes[a].device)
        c = corners[a].unsqueeze(-1)
        inside.append((r >= c) & (r < c + sizes[a].unsqueeze(-1)))
    return inside


def _box_mask(inside: list, k: int) -> torch.Tensor:
    """(N, X, Y, Z) bool: inside box k."""
    return inside[0][:, k, :, None, None] & inside[1][:, k, None, :, None] & inside[2][:, k, None, None, :]


def _union_mask(inside: list, active: torch.Tensor) -> torch.Tensor:
    """(N, X, Y, Z) bool: inside any active box (the sum of the boxes' separable indicators)."""
    fx = (inside[0] & active.unsqueeze(-1)).float()
    count = torch.einsum("nkx,nky,nkz->nxyz", fx, inside[1].float(), inside[2].float())
    return count > 0.5


def _inpaint_sides(d: int, u: torch.Tensor) -> torch.Tensor:
    low = max(1, d // 6)
    return randint_from(u, low, max(low, min(d, d // 3)))


def _outpaint_sides(d: int, u: torch.Tensor) -> torch.Tensor:
    return d - randint_from(u, 3 * d // 7, 4 * d // 7)


def _fill_noise(x: torch.Tensor, mask: torch.Tensor, generator) -> torch.Tensor:
    """Replace the voxels of ``x`` (N, C, X, Y, Z) where ``mask`` (N, X, Y, Z) is True by U[0, 1) noise."""
    full = mask.unsqueeze(1).expand_as(x)
    count = int(full.sum())
    if count == 0:
        return x.clone()
    return x.masked_scatter(full, uniform_draws(generator, (count,), x.device).to(x.dtype))


def _batch_and_dims(x: torch.Tensor, fill: str) -> tuple[int, tuple]:
    """(N, (X, Y, Z)) of a batch to paint, after checking it and ``fill``."""
    check_batch(x, "x")
    if fill not in PAINT_FILLS:
        raise ValueError(f"fill must be one of {PAINT_FILLS}, got {fill!r}")
    return x.shape[0], tuple(x.shape[2:])


def inpaint(
    x: torch.Tensor,
    generator: torch.Generator | None,
    boxes: int = 5,
    continue_prob: float = 0.95,
    fill: str = "noise",
) -> torch.Tensor:
    """In-painting of every sample: (N, C, X, Y, Z) -> same shape.

    Up to ``boxes`` boxes per sample; box k is drawn only while successive uniform draws stay below
    ``continue_prob`` (official: 5 and 0.95, so 0-5 boxes; Semantic Genesis: 1 box always, i.e.
    ``boxes=1, continue_prob=1``). Box side per axis in [max(1, d // 6), d // 3], corner in
    [3, d - side - 3]. The boxes get i.i.d. U[0, 1) noise per voxel (``fill="noise"``, official code) or
    one U[0, 1) value per box, later boxes on top (``fill="constant"``, the paper's wording).
    """
    n, dims = _batch_and_dims(x, fill)
    if n == 0 or boxes <= 0:
        return x.clone()
    u = uniform_draws(generator, (n, boxes, 7), x.device)
    active = torch.cumprod((u[..., 6] < continue_prob).to(torch.int64), dim=1).bool()
    inside = _axis_inside(*_draw_boxes(u, dims, _inpaint_sides), dims)
    if fill == "constant":
        values = uniform_draws(generator, (n, boxes), x.device).to(x.dtype)
        out = x.clone()
        for k in range(boxes):
            box = (_box_mask(inside, k) & active[:, k, None, None, None]).unsqueeze(1)
            out = torch.where(box, values[:, k].view(n, 1, 1, 1, 1), out)
        return out
    return _fill_noise(x, _union_mask(inside, active), generator)


def outpaint(
    x: torch.Tensor,
    generator: torch.Generator | None,
    windows: int = 5,
    continue_prob: float = 0.95,
    fill: str = "noise",
) -> torch.Tensor:
    """Out-painting of every sample: (N, C, X, Y, Z) -> same shape.

    The sample keeps its values inside 1 to ``windows`` windows (the first always, each further one while
    successive uniform draws stay below ``continue_prob``; official: 5 and 0.95; Semantic Genesis: 1) and
    gets i.i.d. U[0, 1) noise outside them (``fill="noise"``, official) or one U[0, 1) value per sample
    (``fill="constant"``). Window side per axis d - randint(3 * d // 7, 4 * d // 7) (28-37 for 64,
    14-19 for 32), corner in [3, d - side - 3].
    """
    n, dims = _batch_and_dims(x, fill)
    if n == 0:
        return x.clone()
    windows = max(1, windows)
    u = uniform_draws(generator, (n, windows, 7), x.device)
    active = torch.cumprod((u[:, 1:, 6] < continue_prob).to(torch.int64), dim=1).bool()
    active = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=x.device), active], dim=1)
    keep = _union_mask(_axis_inside(*_draw_boxes(u, dims, _outpaint_sides), dims), active)
    if fill == "constant":
        values = uniform_draws(generator, (n,), x.device).to(x.dtype)
        return torch.where(keep.unsqueeze(1), x, values.view(n, 1, 1, 1, 1))
    return _fill_noise(x, ~keep, generator)
