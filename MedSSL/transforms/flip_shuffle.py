"""Models Genesis' flips and local pixel shuffling, batched (see :mod:`MedSSL.transforms.genesis` for the
rules and the deviations from the official code). Batches are (N, C, X, Y, Z) float tensors."""

from __future__ import annotations

import math

import torch

from MedSSL.transforms.random_draws import check_batch, draw_device, randint_from, random_bits, uniform_draws


# ----------------------------------------------------------------------------------------------------
# flip


def draw_flips(
    n: int,
    generator: torch.Generator | None,
    rate: float = 0.4,
    max_flips: int = 3,
    flip_z: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Draw the official flip loop for ``n`` samples; returns (N, 3) bool: flip along X, Y, Z.

    Each of up to ``max_flips`` iterations happens while a uniform draw is below ``rate`` and flips one
    axis chosen uniformly among three: (channel, X, Y) when ``flip_z`` is False (the channel flip is a
    no-op, so Z is never flipped: the official quirk), (X, Y, Z) when True. Two flips of one axis cancel.
    """
    device = torch.device(device) if device is not None else draw_device(generator, torch.device("cpu"))
    u = uniform_draws(generator, (n, 2 * max_flips), device)
    active = torch.cumprod((u[:, :max_flips] < rate).to(torch.int64), dim=1).bool()
    choice = randint_from(u[:, max_flips:], 0, 2)  # index into the three candidate axes
    axis = choice if flip_z else choice - 1  # -1 = the channel axis: no flip
    flips = torch.zeros(n, 3, dtype=torch.int64, device=device)
    for a in range(3):
        flips[:, a] = ((axis == a) & active).sum(dim=1)
    return flips % 2 == 1


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample of ``x`` (N, C, X, Y, Z) along the spatial axes marked in ``flips`` (N, 3) bool."""
    check_batch(x, "x")
    flips = flips.to("cpu")
    out = x.clone()
    for i in torch.nonzero(flips.any(dim=1)).flatten().tolist():
        dims = [1 + a for a in range(3) if flips[i, a]]
        out[i] = x[i].flip(dims)
    return out


def random_flip(
    x: torch.Tensor,
    generator: torch.Generator | None,
    rate: float = 0.4,
    max_flips: int = 3,
    flip_z: bool = False,
) -> torch.Tensor:
    """The official flip augmentation on a batch: (N, C, X, Y, Z) -> same shape (see :func:`draw_flips`).

    To flip a second tensor (a separate target) the same way, call :func:`draw_flips` once and
    :func:`apply_flips` on both.
    """
    check_batch(x, "x")
    return apply_flips(x, draw_flips(x.shape[0], generator, rate, max_flips, flip_z, device=x.device))


# ----------------------------------------------------------------------------------------------------
# local pixel shuffling

_TEMPLATES: dict = {}


def _block_templates(mx: int, my: int, mz: int, sy: int, sz: int, device: torch.device):
    """Flat voxel offsets of every block shape (bx, by, bz) <= (mx, my, mz) in a volume with strides
    (sy * sz, sz, 1), concatenated in shape order; plus the start of each shape in that array."""
    key = (mx, my, mz, sy, sz, str(device))
    if key not in _TEMPLATES:
        offsets, starts, n = [], [], 0
        for bx in range(1, mx + 1):
            for by in range(1, my + 1):
                for bz in range(1, mz + 1):
                    ix, iy, iz = torch.meshgrid(torch.arange(bx), torch.arange(by), torch.arange(bz), indexing="ij")
                    offsets.append((ix * (sy * sz) + iy * sz + iz).reshape(-1))
                    starts.append(n)
                    n += bx * by * bz
        _TEMPLATES[key] = (torch.cat(offsets).to(device), torch.tensor(starts, dtype=torch.int64, device=device))
    return _TEMPLATES[key]


def _shuffle_max_side(spatial: tuple) -> tuple:
    """Largest shuffle block per axis: d // 10 (official), at least 1."""
    return tuple(max(1, int(d) // 10) for d in spatial)


def _draw_shuffle_blocks(spatial: tuple, generator, blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sides (3, B) in [1, max side] and corners (3, B) in [0, d - side] of ``blocks`` shuffle blocks."""
    u = uniform_draws(generator, (6, blocks), device)
    sides = torch.stack([randint_from(u[a], 1, m) for a, m in enumerate(_shuffle_max_side(spatial))])
    corners = torch.stack([randint_from(u[3 + a], 0, int(d) - sides[a]) for a, d in enumerate(spatial)])
    return sides, corners


def shuffle_source_index(
    spatial: tuple,
    generator: torch.Generator | None,
    blocks: int = 10000,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Draw one local-shuffle pattern for a cube of shape ``spatial`` = (X, Y, Z).

    Returns (X*Y*Z,) int64: output voxel ``v`` (flat index) takes the input voxel ``src[v]``.

    Semantics of the official loop: ``blocks`` blocks, in order, each of side [1, max(1, d // 10)] per
    axis at a corner in [0, d - side]; each block's content is read from the ORIGINAL cube, randomly
    permuted, and written to the output; a later block overwrites an earlier one.
    """
    device = torch.device(device) if device is not None else draw_device(generator, torch.device("cpu"))
    if blocks <= 0 or math.prod(int(d) for d in spatial) == 0:
        return torch.arange(math.prod(int(d) for d in spatial), device=device)
    sides, corners = _draw_shuffle_blocks(spatial, generator, blocks, device)
    return _shuffle_source(spatial, sides, corners, generator)


def _shuffle_source(spatial: tuple, sides: torch.Tensor, corners: torch.Tensor, generator) -> torch.Tensor:
    """The shuffle source map (X*Y*Z,) int64 of given blocks: sides and corners (3, B), B >= 1, in
    order; the permutations inside the blocks are drawn from ``generator``.

    All blocks at once: every block voxel ("element", numbered block after block) gets its flat
    position; the last block covering a voxel is the largest element number scattered onto it; the
    permutation inside each block is a sort of the keys (block number, random bits); the winning
    element of a voxel reads the element at its own rank in the sorted order of its block.
    """
    X, Y, Z = (int(s) for s in spatial)
    V = X * Y * Z
    device = sides.device
    blocks = sides.shape[1]
    mx, my, mz = (max(m, int(sides[a].max())) for a, m in enumerate(_shuffle_max_side(spatial)))
    template, template_start = _block_templates(mx, my, mz, Y, Z, device)
    bx, by, bz = sides
    cx, cy, cz = corners
    shape_id = ((bx - 1) * my + (by - 1)) * mz + (bz - 1)
    volume = bx * by * bz
    total = int(volume.sum())
    block_start = torch.cumsum(volume, 0) - volume
    corner = cx * (Y * Z) + cy * Z + cz

    # 32-bit element tables where they fit (half the memory traffic); scatter needs an int64 index
    block_bits = max(1, (blocks - 1).bit_length())
    small = block_bits <= 15 and total < 2**31 and V < 2**31
    itype = torch.int32 if small else torch.int64
    template = template.to(itype)
    # element e (numbered block after block) of block b lies at the flat voxel
    # corner[b] + template[template_start[shape of b] + (e - block_start[b])]
    block_of = torch.repeat_interleave(torch.arange(blocks, device=device, dtype=itype), volume, output_size=total)
    element = torch.arange(total, device=device, dtype=itype)
    shift = (template_start.index_select(0, shape_id) - block_start).to(itype)
    voxel = template.index_select(0, element + shift.index_select(0, block_of))
    voxel += corner.to(itype).index_select(0, block_of)

    # the last block covering each voxel = the largest element number scattered onto it
    winner = torch.full((V,), -1, dtype=itype, device=device).scatter_reduce_(0, voxel.long(), element, "amax")
    del element

    # a uniform random permutation inside each block: sort by (block number, random bits)
    low_bits = 31 - block_bits if small else 32
    key = block_of.bitwise_left_shift_(low_bits).bitwise_or_(random_bits(generator, total, low_bits, device, itype))
    del block_of
    sorted_key, order = torch.sort(key, stable=True)
    del key
    ties = torch.nonzero(sorted_key[1:] == sorted_key[:-1]).squeeze(1)
    del sorted_key
    if ties.numel():
        # equal keys keep their original order in a stable sort: swap disjoint tied pairs at random
        if ties.numel() > 1:
            keep = torch.ones_like(ties, dtype=torch.bool)
            keep[1:] = ties[1:] != ties[:-1] + 1
            ties = ties[keep]
        swap = ties[uniform_draws(generator, (ties.numel(),), device) < 0.5]
        first = order[swap]
        order[swap] = order[swap + 1]
        order[swap + 1] = first

    covered = winner >= 0
    source = voxel.index_select(0, order.index_select(0, winner.clamp_(min=0)))
    return torch.where(covered, source, torch.arange(V, device=device, dtype=itype)).long()


def local_pixel_shuffle(x: torch.Tensor, generator: torch.Generator | None, blocks: int = 10000) -> torch.Tensor:
    """Local pixel shuffling of every sample: (N, C, X, Y, Z) -> same shape, same device and dtype.

    ``blocks`` = 10,000 in Models Genesis, 5 in Semantic Genesis. Each sample gets its own blocks (see
    :func:`shuffle_source_index`); the channels of a sample are shuffled alike. Values are only moved
    within blocks of at most (X // 10) x (Y // 10) x (Z // 10) voxels (at least 1 per axis).
    """
    check_batch(x, "x")
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    if n == 0 or blocks <= 0:
        return x.clone()
    src = torch.stack([shuffle_source_index(spatial, generator, blocks, x.device) for _ in range(n)])
    flat = x.reshape(n, c, -1)
    return flat.gather(2, src.unsqueeze(1).expand(n, c, -1)).view_as(x)
