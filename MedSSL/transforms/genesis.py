"""Models Genesis image transformations in torch: whole batches, on the training device, seeded.

The official generator (``generate_pair`` in pytorch/utils.py == keras/utils.py of the Models Genesis
repository) transforms one numpy cube at a time in Python; its local pixel shuffling alone loops over
10,000 blocks per cube. This module re-implements the same transformations, written from the
description of their behaviour, with every step vectorised over the batch so that it runs on the device
that trains the network (CPU or CUDA) at a small fraction of the network's step time.

Pipeline of :func:`genesis_transform`, per sample, in this order (probabilities are
:class:`GenesisTransformConfig` fields):

1. flip (input and target together), :func:`random_flip`;
2. local pixel shuffling (``local_rate``), :func:`local_pixel_shuffle`;
3. non-linear Bezier intensity map (``nonlinear_rate``), half of the maps inverted, :func:`bezier_intensity`;
4. painting (``paint_rate``): in-painting (``inpaint_rate``) :func:`inpaint`, otherwise out-painting
   :func:`outpaint`.

The target is the flipped batch; the input is the flipped batch after steps 2-4.

Tensor layout: ``(N, C, X, Y, Z)``, float, values in [0, 1], Z = the slice axis (64 x 64 x 32 cubes in
the official setting, C = 1). Every building block draws independent parameters for every sample; with
C > 1 the channels of a sample share its spatial draws (blocks, boxes, flips, intensity curve) and
only the painting noise is drawn per channel and voxel.

Randomness: every draw comes from the ``generator`` argument (a ``torch.Generator`` on the batch's
device or on the CPU; the draws are made on the generator's device and moved to the batch's device).
The same generator state and input give the same output on the same device. The sequence of draws
differs from the official code (which uses Python's and numpy's global generators), so only the
distributions are the same, not the individual cubes.

Size rules (integer division of the cube's size ``d`` along each axis, as in the official code, which
spells them out for 64 x 64 x 32; ``randint`` bounds are inclusive):

* shuffle blocks: side in [1, max(1, d // 10)], corner in [0, d - side];
* in-painting boxes: side in [max(1, d // 6), max(that, d // 3)], corner in [m, d - side - m];
* out-painting windows: side = d - randint(3 * d // 7, 4 * d // 7), corner in [m, d - side - m];

with the official margin m = 3, reduced to ``(d - side) // 2`` where the cube is too small for it
(out-painting below d = 14, in-painting below d = 9; never at the official sizes), so that no range is
empty. Integer draws are ``low + floor(u * (high - low + 1))`` of float32 uniforms u (24 random bits).

Deviations from the official code, all deliberate:

* Bezier map: the official code samples the curve at 100,000 parameter values and interpolates every
  voxel with ``np.interp``. We sample it at :data:`BEZIER_SAMPLES` = 10,001 parameter values, resample
  that piecewise-linear map on a uniform intensity grid of :data:`BEZIER_TABLE_SIZE` = 8,193 entries and
  interpolate every voxel linearly in that table (one table lookup and a multiply-add per voxel
  instead of a binary search). Against ``np.interp`` on 100,000 samples: mean absolute difference ~2e-8, 99.99th
  percentile ~4e-6, maximum ~1e-3 (only where the curve is nearly vertical, where any resampling of it
  moves values; 1e-3 is 2 HU on the [-1000, 1000] HU scale).
* Local shuffle: the random permutation inside each block comes from sorting 31-bit keys whose high
  bits are the block number and whose low ``31 - bits(blocks)`` bits are random (17 bits for 10,000
  blocks); two equal keys in a block, which would always keep their original order, are swapped with
  probability 1/2, which makes the permutation exactly uniform except for three or more equal keys in
  one block (probability ~1e-5 for the largest, 108-voxel blocks). More than 32,768 blocks: 64-bit
  keys with 32 random bits.
* In-painting noise: overlapping boxes are filled with one noise draw per voxel instead of one per box
  and voxel; i.i.d. uniform noise is the same distribution either way.
* Options the official code does not have: ``flip_z`` (the official code never flips the slice axis),
  ``paint_fill="constant"`` (the paper's wording: one value per in-painting box, one value for the
  whole outside of the out-painting windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from MedSSL.errors import MedSSLError

__all__ = [
    "BEZIER_SAMPLES",
    "BEZIER_TABLE_SIZE",
    "GenesisTransformConfig",
    "apply_flips",
    "apply_intensity_tables",
    "bezier_intensity",
    "bezier_tables",
    "draw_flips",
    "genesis_transform",
    "inpaint",
    "local_pixel_shuffle",
    "outpaint",
    "random_flip",
    "shuffle_source_index",
]

#: Parameter values at which the Bezier curve is sampled (the official code uses 100,000).
BEZIER_SAMPLES = 10_001
#: Entries of the per-sample intensity lookup table (uniform grid on [0, 1]).
BEZIER_TABLE_SIZE = 8_193

PAINT_FILLS = ("noise", "constant")


@dataclass
class GenesisTransformConfig:
    """Probabilities and counts of the Models Genesis transformations; defaults = the official code.

    Sources: ``pytorch/config.py`` / ``keras/config.py`` (rates) and ``pytorch/utils.py`` (counts) of the
    Models Genesis repository, see the module docstring for the size rules.

    Attributes:
        flip_rate: probability of each of up to three successive flips (official ``flip_rate`` 0.4; the
            flip loop continues while a uniform draw is below it, at most 3 times).
        local_rate: probability of local pixel shuffling (official ``local_rate`` 0.5).
        nonlinear_rate: probability of the non-linear Bezier intensity map (official ``nonlinear_rate``
            0.9); half of the applied maps are inverted (official code, fixed 0.5).
        paint_rate: probability of painting, in- or out- (official ``paint_rate`` 0.9).
        inpaint_rate: probability that a painted cube is in-painted rather than out-painted (official
            ``inpaint_rate = 1 - outpaint_rate = 1 - 0.8 = 0.2``; overall in-painting 0.18, out-painting
            0.72, neither 0.10).
        shuffle_blocks: blocks per shuffled cube (official ``num_block = 10000`` in
            ``local_pixel_shuffling``).
        inpaint_max_boxes: at most this many in-painting boxes (official ``cnt = 5`` in
            ``image_in_painting``); each box, the first included, is drawn only while a uniform draw is
            below ``box_continue_prob``, so a cube gets 0-5 boxes (P(5) = 0.95^5 = 0.77).
        outpaint_max_windows: at most this many out-painting windows (official: one window always, then
            ``cnt = 4`` more, each while a uniform draw is below ``box_continue_prob``).
        box_continue_prob: the continuation probability of both box loops (official 0.95).
        flip_z: False = the official behaviour: each flip picks one of the three leading axes of the
            (1, X, Y, Z) sample, and axis 0 is the channel, so X or Y is flipped (or nothing), never Z.
            True = pick among X, Y and Z (the nnU-Net ``competition/`` variant of the official code).
        paint_fill: "noise" = the official code: boxes (in-painting) or the outside of the windows
            (out-painting) get i.i.d. uniform [0, 1) noise per voxel. "constant" = the paper's wording:
            one uniform value per in-painting box, one for the whole outside of the out-painting windows.
    """

    flip_rate: float = 0.4
    local_rate: float = 0.5
    nonlinear_rate: float = 0.9
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2
    shuffle_blocks: int = 10000
    inpaint_max_boxes: int = 5
    outpaint_max_windows: int = 5
    box_continue_prob: float = 0.95
    flip_z: bool = False
    paint_fill: str = "noise"

    def __post_init__(self):
        for name in ("flip_rate", "local_rate", "nonlinear_rate", "paint_rate", "inpaint_rate", "box_continue_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise MedSSLError(f"transform setting {name} must be a probability in [0, 1], got {value!r}")
        for name, low in (("shuffle_blocks", 0), ("inpaint_max_boxes", 0), ("outpaint_max_windows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MedSSLError(f"transform setting {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.flip_z, bool):
            raise MedSSLError(f"transform setting flip_z must be true or false, got {self.flip_z!r}")
        if self.paint_fill not in PAINT_FILLS:
            raise MedSSLError(f"transform setting paint_fill must be one of {', '.join(PAINT_FILLS)}, got {self.paint_fill!r}")


# ----------------------------------------------------------------------------------------------------
# random draws


def _gen_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def _rand(generator, shape, device, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws made on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator, device), dtype=dtype).to(device)


def _randint_from(u: torch.Tensor, low, high) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise) from uniform draws ``u`` in [0, 1)."""
    low = torch.as_tensor(low, device=u.device)
    high = torch.as_tensor(high, device=u.device)
    span = (high - low + 1).to(u.dtype)
    return (low + (u * span).long()).minimum(high)


def _random_bits(generator, count: int, bits: int, device, dtype=torch.int64) -> torch.Tensor:
    """(count,) integers with ``bits`` (<= 62) uniform random bits, as ``dtype``.

    Up to 31 bits: 64-bit draws (63 random bits) split into two 32-bit halves, two values per draw
    (cheaper on the CPU than one draw per value)."""
    gdev = _gen_device(generator, device)
    if bits > 31:
        raw = torch.empty(count, dtype=torch.int64, device=gdev).random_(generator=generator)
        return raw.bitwise_and_((1 << bits) - 1).to(device=device, dtype=dtype)
    raw = torch.empty((count + 1) // 2, dtype=torch.int64, device=gdev).random_(generator=generator)
    halves = raw.view(torch.int32)[:count].to(device)  # bit 31 of the odd halves is always 0
    return halves.bitwise_and_((1 << bits) - 1).to(dtype)


def _check_batch(x: torch.Tensor, name: str = "batch") -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must be (N, C, X, Y, Z), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


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
    device = torch.device(device) if device is not None else _gen_device(generator, torch.device("cpu"))
    u = _rand(generator, (n, 2 * max_flips), device)
    active = torch.cumprod((u[:, :max_flips] < rate).to(torch.int64), dim=1).bool()
    choice = _randint_from(u[:, max_flips:], 0, 2)  # index into the three candidate axes
    axis = choice if flip_z else choice - 1  # -1 = the channel axis: no flip
    flips = torch.zeros(n, 3, dtype=torch.int64, device=device)
    for a in range(3):
        flips[:, a] = ((axis == a) & active).sum(dim=1)
    return flips % 2 == 1


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample of ``x`` (N, C, X, Y, Z) along the spatial axes marked in ``flips`` (N, 3) bool."""
    _check_batch(x, "x")
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
    _check_batch(x, "x")
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
    u = _rand(generator, (6, blocks), device)
    sides = torch.stack([_randint_from(u[a], 1, m) for a, m in enumerate(_shuffle_max_side(spatial))])
    corners = torch.stack([_randint_from(u[3 + a], 0, int(d) - sides[a]) for a, d in enumerate(spatial)])
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
    device = torch.device(device) if device is not None else _gen_device(generator, torch.device("cpu"))
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
    random_bits = 31 - block_bits if small else 32
    key = block_of.bitwise_left_shift_(random_bits).bitwise_or_(_random_bits(generator, total, random_bits, device, itype))
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
        swap = ties[_rand(generator, (ties.numel(),), device) < 0.5]
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
    _check_batch(x, "x")
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    if n == 0 or blocks <= 0:
        return x.clone()
    src = torch.stack([shuffle_source_index(spatial, generator, blocks, x.device) for _ in range(n)])
    flat = x.reshape(n, c, -1)
    return flat.gather(2, src.unsqueeze(1).expand(n, c, -1)).view_as(x)


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
    device = torch.device(device) if device is not None else _gen_device(generator, torch.device("cpu"))
    u = _rand(generator, (n, 5), device, dtype=torch.float64)
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
    _check_batch(x, "x")
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
    _check_batch(x, "x")
    if x.shape[0] == 0:
        return x.clone()
    tables, _ = bezier_tables(x.shape[0], generator, invert_prob, device=x.device)
    return apply_intensity_tables(x, tables)


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
        corners.append(_randint_from(u[..., 3 + a], margin, d - side - margin))
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
    return _randint_from(u, low, max(low, min(d, d // 3)))


def _outpaint_sides(d: int, u: torch.Tensor) -> torch.Tensor:
    return d - _randint_from(u, 3 * d // 7, 4 * d // 7)


def _fill_noise(x: torch.Tensor, mask: torch.Tensor, generator) -> torch.Tensor:
    """Replace the voxels of ``x`` (N, C, X, Y, Z) where ``mask`` (N, X, Y, Z) is True by U[0, 1) noise."""
    full = mask.unsqueeze(1).expand_as(x)
    count = int(full.sum())
    if count == 0:
        return x.clone()
    return x.masked_scatter(full, _rand(generator, (count,), x.device).to(x.dtype))


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
    _check_batch(x, "x")
    if fill not in PAINT_FILLS:
        raise ValueError(f"fill must be one of {PAINT_FILLS}, got {fill!r}")
    n = x.shape[0]
    dims = tuple(x.shape[2:])
    if n == 0 or boxes <= 0:
        return x.clone()
    u = _rand(generator, (n, boxes, 7), x.device)
    active = torch.cumprod((u[..., 6] < continue_prob).to(torch.int64), dim=1).bool()
    inside = _axis_inside(*_draw_boxes(u, dims, _inpaint_sides), dims)
    if fill == "constant":
        values = _rand(generator, (n, boxes), x.device).to(x.dtype)
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
    _check_batch(x, "x")
    if fill not in PAINT_FILLS:
        raise ValueError(f"fill must be one of {PAINT_FILLS}, got {fill!r}")
    n = x.shape[0]
    dims = tuple(x.shape[2:])
    if n == 0:
        return x.clone()
    windows = max(1, windows)
    u = _rand(generator, (n, windows, 7), x.device)
    active = torch.cumprod((u[:, 1:, 6] < continue_prob).to(torch.int64), dim=1).bool()
    active = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=x.device), active], dim=1)
    keep = _union_mask(_axis_inside(*_draw_boxes(u, dims, _outpaint_sides), dims), active)
    if fill == "constant":
        values = _rand(generator, (n,), x.device).to(x.dtype)
        return torch.where(keep.unsqueeze(1), x, values.view(n, 1, 1, 1, 1))
    return _fill_noise(x, ~keep, generator)


# ----------------------------------------------------------------------------------------------------
# the whole pipeline


def _apply_to(x: torch.Tensor, selected: torch.Tensor, transform) -> torch.Tensor:
    """``x`` with the samples where ``selected`` (N,) is True replaced by ``transform`` of them."""
    index = torch.nonzero(selected).squeeze(1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return transform(x)
    return x.index_copy(0, index, transform(x.index_select(0, index)))


def genesis_transform(
    batch: torch.Tensor, config: GenesisTransformConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis input/target pairs for a batch.

    Args:
        batch: (N, C, X, Y, Z) float in [0, 1] (C = 1 for Models Genesis), any device; 2D images
            (N, C, X, Y) are transformed as one-slice cubes (N, C, X, Y, 1), as Models Genesis 2D does.
        config: probabilities and counts (:class:`GenesisTransformConfig`; defaults = official).
        generator: source of all randomness, on the batch's device or the CPU (None: torch's global
            generator of the batch's device).

    Returns:
        (inputs, targets), both the batch's shape, on the batch's device, dtype of the batch: targets = the
        batch after the random flip; inputs = the targets after local pixel shuffling (prob
        ``local_rate``), the Bezier intensity map (``nonlinear_rate``) and in-painting
        (``paint_rate * inpaint_rate``) or out-painting (``paint_rate * (1 - inpaint_rate)``).
    """
    if batch.dim() == 4:
        inputs, targets = genesis_transform(batch.unsqueeze(-1), config, generator)
        return inputs.squeeze(-1), targets.squeeze(-1)
    _check_batch(batch)
    n = batch.shape[0]
    device = batch.device
    decide = _rand(generator, (n, 4), device)
    flips = draw_flips(n, generator, config.flip_rate, 3, config.flip_z, device=device)
    targets = apply_flips(batch, flips)
    if n == 0:
        return targets.clone(), targets
    inputs = targets
    blocks = config.shuffle_blocks
    inputs = _apply_to(inputs, decide[:, 0] < config.local_rate, lambda part: local_pixel_shuffle(part, generator, blocks))
    inputs = _apply_to(inputs, decide[:, 1] < config.nonlinear_rate, lambda part: bezier_intensity(part, generator))
    painted = decide[:, 2] < config.paint_rate
    inner = decide[:, 3] < config.inpaint_rate
    p, fill = config.box_continue_prob, config.paint_fill
    inputs = _apply_to(inputs, painted & inner, lambda part: inpaint(part, generator, config.inpaint_max_boxes, p, fill))
    inputs = _apply_to(inputs, painted & ~inner, lambda part: outpaint(part, generator, config.outpaint_max_windows, p, fill))
    if inputs is targets:
        inputs = targets.clone()
    return inputs, targets
