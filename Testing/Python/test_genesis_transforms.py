"""Statistical and structural properties of the batched Models Genesis transformations.

No snapshots: every check is a property of the official transformations (what may change, where the
values come from, size ranges, rates over many draws), so the tests hold for any correct sequence of
random draws.
"""

from math import comb

import numpy as np
import pytest
import torch

from MedSSL.errors import MedSSLError
from MedSSL.transforms import flip_shuffle as FS
from MedSSL.transforms import genesis as G
from MedSSL.transforms.genesis import (
    GenesisTransformConfig,
    bezier_intensity,
    bezier_tables,
    draw_flips,
    genesis_transform,
    inpaint,
    local_pixel_shuffle,
    outpaint,
    random_flip,
    shuffle_source_index,
)

torch.set_num_threads(1)

OFF = {"flip_rate": 0.0, "local_rate": 0.0, "nonlinear_rate": 0.0, "paint_rate": 0.0}
# uniform float32 noise takes values k / 2**24; 1/3 (an odd multiple of 2**-25 in float32) is never one,
# so a voxel equal to THIRD after painting was not painted
THIRD = 1.0 / 3.0


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def distinct_cube(shape, seed=0) -> torch.Tensor:
    """(1, 1, X, Y, Z) holding a random permutation of 0..V-1 scaled into [0, 1): every value unique."""
    v = int(np.prod(shape))
    return (torch.randperm(v, generator=gen(seed)).float() / v).view(1, 1, *shape)


def source_of(out: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Flat index in ``original`` (a :func:`distinct_cube`) of every value of ``out``."""
    v = original.numel()
    where = torch.empty(v, dtype=torch.long)
    where[torch.round(original.reshape(-1).double() * v).long()] = torch.arange(v)
    src = where[torch.round(out.reshape(-1).double() * v).long().clamp(0, v - 1)]
    assert torch.equal(original.reshape(-1)[src], out.reshape(-1)), "an output value does not occur in the input"
    return src


def coords(flat: torch.Tensor, shape) -> torch.Tensor:
    _X, Y, Z = shape
    return torch.stack([flat // (Y * Z), (flat // Z) % Y, flat % Z], dim=-1)


def bounding_box(mask: torch.Tensor):
    """(start, size) per axis of the True voxels of a (X, Y, Z) mask."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0])).flatten()
        out.append((int(idx[0]), int(idx[-1] - idx[0] + 1)))
    return out


# ----------------------------------------------------------------------------------------------------
# configuration


def test_config_defaults_are_official():
    c = GenesisTransformConfig()
    assert (c.flip_rate, c.local_rate, c.nonlinear_rate, c.paint_rate, c.inpaint_rate) == (0.4, 0.5, 0.9, 0.9, 0.2)
    assert (c.shuffle_blocks, c.inpaint_max_boxes, c.outpaint_max_windows, c.box_continue_prob) == (10000, 5, 5, 0.95)
    assert c.flip_z is False and c.paint_fill == "noise"


@pytest.mark.parametrize(
    "bad", [{"flip_rate": 1.5}, {"local_rate": -0.1}, {"shuffle_blocks": -1}, {"shuffle_blocks": 2.5},
            {"outpaint_max_windows": 0}, {"paint_fill": "zeros"}, {"flip_z": "yes"}]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(MedSSLError):
        GenesisTransformConfig(**bad)


# ----------------------------------------------------------------------------------------------------
# shapes, dtypes, ranges, determinism


@pytest.mark.parametrize("shape", [(64, 64, 32), (32, 32, 16), (16, 16, 8), (5, 7, 3)])
def test_pipeline_shapes_dtype_range(shape):
    n = 4 if shape == (64, 64, 32) else 6
    batch = torch.rand(n, 1, *shape, generator=gen(1))
    everything = GenesisTransformConfig(flip_rate=0.9, local_rate=1.0, nonlinear_rate=1.0, paint_rate=1.0, inpaint_rate=0.5)
    for config in (GenesisTransformConfig(), everything):
        inputs, targets = genesis_transform(batch, config, gen(2))
        for t in (inputs, targets):
            assert t.shape == batch.shape and t.dtype == batch.dtype and t.device == batch.device
            assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
        assert not torch.equal(inputs, targets)
    # float64 and several channels (2.5D inputs) work too
    batch = torch.rand(2, 3, *shape, generator=gen(3), dtype=torch.float64)
    inputs, targets = genesis_transform(batch, everything, gen(4))
    assert inputs.dtype == torch.float64 and inputs.shape == batch.shape and float(inputs.max()) <= 1.0


def test_empty_batch():
    inputs, targets = genesis_transform(torch.rand(0, 1, 16, 16, 8), GenesisTransformConfig(), gen(0))
    assert inputs.shape == targets.shape == (0, 1, 16, 16, 8)


def test_same_seed_same_output_different_seed_different():
    batch = torch.rand(3, 1, 64, 64, 32, generator=gen(5))
    config = GenesisTransformConfig(local_rate=1.0)
    a = genesis_transform(batch, config, gen(11))
    b = genesis_transform(batch, config, gen(11))
    c = genesis_transform(batch, config, gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(batch, torch.rand(3, 1, 64, 64, 32, generator=gen(5)))  # input untouched


def test_samples_get_independent_draws():
    batch = torch.rand(1, 1, 32, 32, 16, generator=gen(6)).expand(4, 1, 32, 32, 16).contiguous()
    for transform in (
        lambda x, g: local_pixel_shuffle(x, g, 200),
        bezier_intensity,
        lambda x, g: inpaint(x, g, 1, 1.0),
        lambda x, g: outpaint(x, g, 1, 1.0),
    ):
        out = transform(batch, gen(7))
        assert all(not torch.equal(out[0], out[i]) for i in range(1, 4))


# ----------------------------------------------------------------------------------------------------
# local pixel shuffling


def test_single_block_permutes_its_values():
    shape = (64, 64, 32)
    for seed in range(10):
        cube = distinct_cube(shape, seed)
        out = local_pixel_shuffle(cube, gen(seed), blocks=1)
        src = source_of(out, cube)
        moved = torch.nonzero(src != torch.arange(src.numel())).flatten()
        if moved.numel() == 0:
            continue
        # the moved voxels are a permutation of themselves, inside one block of at most 6 x 6 x 3
        assert torch.equal(torch.sort(src[moved]).values, moved)
        c = coords(moved, shape)
        assert ((c.max(0).values - c.min(0).values + 1) <= torch.tensor([6, 6, 3])).all()
        assert torch.equal(torch.sort(out.flatten()).values, torch.sort(cube.flatten()).values)


@pytest.mark.parametrize("blocks", [300, 2000, 40000])  # 40,000 > 2**15: the 64-bit sort keys
def test_blocks_follow_last_write_wins_from_the_original(blocks):
    """Exact semantics against a plain loop: each voxel's value comes from the last block covering it,
    distinct voxels of one block read distinct voxels of that block, uncovered voxels keep theirs."""
    shape = (30, 30, 20)  # blocks up to 3 x 3 x 2
    v = 30 * 30 * 20
    sides, corners = FS._draw_shuffle_blocks(shape, gen(blocks), blocks, torch.device("cpu"))
    src = FS._shuffle_source(shape, sides, corners, gen(blocks + 1))
    winner = torch.full(shape, -1, dtype=torch.long)
    for b, ((x, y, z), (sx, sy, sz)) in enumerate(zip(corners.t().tolist(), sides.t().tolist())):
        winner[x : x + sx, y : y + sy, z : z + sz] = b
    winner = winner.flatten()
    covered = winner >= 0
    assert torch.equal(src[~covered], torch.nonzero(~covered).flatten())
    b, s = winner[covered], src[covered]
    c = coords(s, shape)
    assert ((c >= corners[:, b].t()) & (c < (corners + sides)[:, b].t())).all()
    assert torch.unique(b * v + s).numel() == s.numel()  # injective within each block
    if blocks >= 2000:
        assert (s != torch.nonzero(covered).flatten()).float().mean() > 0.5


def test_block_permutation_is_uniform():
    """100 disjoint 2 x 2 x 1 blocks per call: each permutation of 4 voxels about 1/24 of the time."""
    shape = (20, 20, 1)
    xs, ys = torch.meshgrid(torch.arange(0, 20, 2), torch.arange(0, 20, 2), indexing="ij")
    corners = torch.stack([xs.flatten(), ys.flatten(), torch.zeros(100, dtype=torch.long)])
    sides = torch.tensor([2, 2, 1]).view(3, 1).expand(3, 100).contiguous()
    counts = {}
    g = gen(3)
    base = (corners[0] * 20 + corners[1]).view(100, 1) + torch.tensor([0, 1, 20, 21])
    for _ in range(30):
        src = FS._shuffle_source(shape, sides, corners, g)
        local = src[base] - base[:, :1]
        for row in local.tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 24 and all(sorted(k) == [0, 1, 20, 21] for k in counts)
    expected = 3000 / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001


def test_many_blocks_move_values_only_locally():
    shape = (64, 64, 32)
    cube = distinct_cube(shape, 1)
    out = local_pixel_shuffle(cube, gen(1))  # the official 10,000 blocks
    src = source_of(out, cube)
    here = torch.arange(src.numel())
    dist = (coords(src, shape) - coords(here, shape)).abs()
    assert (dist <= torch.tensor([5, 5, 2])).all()
    changed = float((src != here).float().mean())
    assert 0.72 < changed < 0.84  # ~78% of the voxels change (the research note's simulation)


def test_shuffle_on_small_cubes_and_source_index():
    src = shuffle_source_index((16, 16, 8), gen(0), 10000)
    assert torch.equal(src, torch.arange(16 * 16 * 8))  # blocks are single voxels below 20
    src = shuffle_source_index((32, 32, 16), gen(0), 1000)
    assert src.shape == (32 * 32 * 16,) and src.dtype == torch.int64
    dist = (coords(src, (32, 32, 16)) - coords(torch.arange(src.numel()), (32, 32, 16))).abs()
    assert (dist <= torch.tensor([2, 2, 0])).all() and (dist.sum(1) > 0).any()


# ----------------------------------------------------------------------------------------------------
# non-linear intensity


def official_bezier_map(u, inverted, x):
    """np.interp on the official 100,000 samples (Bernstein basis t^(n-i) (1-t)^i, sorting rule)."""
    points = [(0.0, 0.0), (u[0], u[1]), (u[2], u[3]), (1.0, 1.0)]
    t = np.linspace(0.0, 1.0, 100000)
    basis = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xv = np.array([p[0] for p in points]) @ basis
    yv = np.array([p[1] for p in points]) @ basis
    xv, yv = (np.sort(xv), yv) if inverted else (np.sort(xv), np.sort(yv))
    return np.interp(x, xv, yv)


def test_bezier_tables_monotone_endpoints_and_half_inverted():
    g = gen(0)
    draws = [bezier_tables(100, g) for _ in range(5)]
    tables, inverted = torch.cat([t for t, _ in draws]), torch.cat([i for _, i in draws])
    assert tables.shape == (500, G.BEZIER_TABLE_SIZE) and inverted.shape == (500,)
    diff = tables[:, 1:] - tables[:, :-1]
    assert (diff[~inverted] >= -1e-6).all() and (diff[inverted] <= 1e-6).all()
    assert torch.allclose(tables[~inverted][:, 0], torch.zeros(1), atol=1e-6)
    assert torch.allclose(tables[~inverted][:, -1], torch.ones(1), atol=1e-6)
    assert torch.allclose(tables[inverted][:, 0], torch.ones(1), atol=1e-6)
    assert torch.allclose(tables[inverted][:, -1], torch.zeros(1), atol=1e-6)
    assert abs(float(inverted.float().mean()) - 0.5) < 0.08


def test_bezier_matches_the_official_curve():
    # the tables draw u (N, 5) first: control points u[:, :4], inversion u[:, 4] < 0.5
    u = torch.rand((8, 5), generator=gen(9), dtype=torch.float64).numpy()
    tables, inverted = bezier_tables(8, gen(9))
    x = torch.rand(20000, generator=gen(10))
    cubes = x.view(1, 1, 20000, 1, 1).expand(8, 1, 20000, 1, 1)
    ours = G.apply_intensity_tables(cubes, tables).view(8, -1).double().numpy()
    for i in range(8):
        assert bool(inverted[i]) == (u[i, 4] < 0.5)
        err = np.abs(ours[i] - official_bezier_map(u[i, :4], bool(inverted[i]), x.double().numpy()))
        assert err.mean() < 1e-5 and err.max() < 5e-3


def test_bezier_intensity_on_ramps():
    ramp = torch.linspace(0, 1, 16 * 16 * 8).view(1, 1, 16, 16, 8).expand(200, 1, 16, 16, 8)
    out = bezier_intensity(ramp, gen(4)).reshape(200, -1)
    d = out[:, 1:] - out[:, :-1]
    up = (d >= -1e-6).all(1)
    down = (d <= 1e-6).all(1)
    assert (up | down).all()
    assert abs(float(down.float().mean()) - 0.5) < 0.12
    assert float(out.min()) >= 0 and float(out.max()) <= 1


# ----------------------------------------------------------------------------------------------------
# painting


def test_painting_rates_match_the_configuration():
    """Default rates, painting only: out-painting 0.72, visible in-painting 0.18 * (1 - 0.05),
    unchanged 0.10 + 0.18 * 0.05. Out-painting always replaces the corner voxel (windows keep a 1-3
    voxel margin); in-painting boxes never reach it."""
    n = 4000
    batch = torch.full((n, 1, 16, 16, 8), THIRD)
    config = GenesisTransformConfig(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0)
    inputs, targets = genesis_transform(batch, config, gen(0))
    assert torch.equal(targets, batch)
    changed = (inputs != batch).view(n, -1)
    out = changed[:, 0]
    inner = changed.any(1) & ~out
    none = ~changed.any(1)
    tol = 4 * (0.25 / n) ** 0.5
    assert abs(float(out.float().mean()) - 0.72) < tol
    assert abs(float(inner.float().mean()) - 0.18 * 0.95) < tol
    assert abs(float(none.float().mean()) - (0.10 + 0.18 * 0.05)) < tol


def test_inpainting_one_box_official_sizes():
    n, shape = 120, (64, 64, 32)
    batch = torch.full((n, 1, *shape), THIRD)
    out = inpaint(batch, gen(1), boxes=1, continue_prob=1.0)
    sides = []
    for i in range(n):
        changed = out[i, 0] != THIRD
        box = bounding_box(changed)
        # the changed voxels fill exactly one box, at least 3 voxels from every face
        assert int(changed.sum()) == np.prod([s for _, s in box])
        for (start, size), d in zip(box, shape):
            assert start >= 3 and start + size <= d - 3
        sides.append([s for _, s in box])
    sides = torch.tensor(sides)
    assert sides[:, :2].min() == 10 and sides[:, :2].max() == 21  # [64 // 6, 64 // 3]
    assert sides[:, 2].min() == 5 and sides[:, 2].max() == 10  # [32 // 6, 32 // 3]
    assert float(out.min()) >= 0 and float(out.max()) < 1


def test_inpainting_box_count_follows_continue_probability():
    n = 3000
    batch = torch.full((n, 1, 16, 16, 8), THIRD)
    out = inpaint(batch, gen(2))  # official: up to 5 boxes, each while U < 0.95
    none = float((out == batch).view(n, -1).all(1).float().mean())
    assert abs(none - 0.05) < 0.02
    outside = torch.ones(16, 16, 8, dtype=torch.bool)
    outside[3:13, 3:13, 3:5] = False  # boxes stay 3 voxels away from every face
    assert (out[:, 0][:, outside] == THIRD).all()


def test_outpainting_keeps_one_window_official_sizes():
    n, shape = 120, (64, 64, 32)
    batch = torch.full((n, 1, *shape), THIRD)
    out = outpaint(batch, gen(4), windows=1, continue_prob=1.0)
    sides = []
    for i in range(n):
        kept = out[i, 0] == batch[i, 0]
        box = bounding_box(kept)
        assert int(kept.sum()) == np.prod([s for _, s in box])  # original inside the window only
        for (start, size), d in zip(box, shape):
            assert start >= 3 and start + size <= d - 3
        sides.append([s for _, s in box])
    sides = torch.tensor(sides)
    assert sides[:, :2].min() == 28 and sides[:, :2].max() == 37  # 64 - [27, 36]
    assert sides[:, 2].min() == 14 and sides[:, 2].max() == 19  # 32 - [13, 18]


def test_outpainting_default_windows_keep_the_original_inside():
    batch = torch.rand(50, 1, 32, 32, 16, generator=gen(5))
    out = outpaint(batch, gen(6))
    kept = (out == batch).view(50, -1).float().mean(1)
    assert (kept > 0.05).all() and (kept < 0.9).all()
    # the kept voxels are the original ones, the rest is noise in [0, 1)
    assert float(out.min()) >= 0 and float(out.max()) < 1


def test_constant_fill_variants():
    batch = torch.full((20, 1, 32, 32, 16), THIRD)
    out = inpaint(batch, gen(7), boxes=1, continue_prob=1.0, fill="constant")
    for i in range(20):
        values = torch.unique(out[i])
        assert values.numel() == 2 and int((out[i] == THIRD).sum()) > 16 * 32 * 32 // 2
    out = outpaint(torch.rand(20, 1, 32, 32, 16, generator=gen(8)), gen(9), fill="constant")
    corner_values = out[:, 0, 0, 0, 0]
    assert torch.equal(out[:, 0, :3, :, :].amax(dim=(1, 2, 3)), corner_values)
    assert torch.equal(out[:, 0, :3, :, :].amin(dim=(1, 2, 3)), corner_values)


# ----------------------------------------------------------------------------------------------------
# flip


def flip_of(out: torch.Tensor, cube: torch.Tensor):
    """Which axes (X, Y, Z) flip ``cube`` (C, X, Y, Z) into ``out``; None if no flip does."""
    for fx in (False, True):
        for fy in (False, True):
            for fz in (False, True):
                dims = [1 + a for a, f in enumerate((fx, fy, fz)) if f]
                if torch.equal(cube.flip(dims) if dims else cube, out):
                    return (fx, fy, fz)
    return None


@pytest.mark.parametrize("flip_z", [False, True])
def test_flips_input_and_target_together(flip_z):
    n = 2000
    batch = distinct_cube((6, 6, 4), 0).expand(n, 1, 6, 6, 4).contiguous()
    config = GenesisTransformConfig(**{**OFF, "flip_rate": 0.4}, flip_z=flip_z)
    inputs, targets = genesis_transform(batch, config, gen(1))
    assert torch.equal(inputs, targets)
    found = torch.tensor([flip_of(targets[i], batch[i]) for i in range(n)])
    if flip_z:
        assert found[:, 2].any()
    else:
        assert not found[:, 2].any()
    # P(X flipped) = sum_k P(k flips) P(odd number of X picks | k); X is one of 3 candidates either way
    p = sum(pk * (1 - (1 / 3) ** k) / 2 for k, pk in ((1, 0.6 * 0.4), (2, 0.6 * 0.4**2), (3, 0.4**3)))
    for axis in (0, 1):
        assert abs(float(found[:, axis].float().mean()) - p) < 0.035


def test_flip_helpers():
    flips = draw_flips(500, gen(2), rate=1.0)
    assert flips.shape == (500, 3) and flips.dtype == torch.bool and not flips[:, 2].any()
    cube = distinct_cube((6, 6, 4), 1).expand(8, 1, 6, 6, 4)
    out = random_flip(cube, gen(3), rate=1.0, flip_z=True)
    assert all(flip_of(out[i], cube[i]) is not None for i in range(8))


# ----------------------------------------------------------------------------------------------------
# devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batch_with_cpu_and_cuda_generators():
    batch = torch.rand(4, 1, 64, 64, 32, generator=gen(0)).cuda()
    config = GenesisTransformConfig(local_rate=1.0)
    for device in ("cpu", "cuda"):
        a = genesis_transform(batch, config, gen(1, device))
        b = genesis_transform(batch, config, gen(1, device))
        assert a[0].device == batch.device and a[1].device == batch.device
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert float(a[0].min()) >= 0 and float(a[0].max()) <= 1
    # the shuffle moves values only locally on the GPU too
    cube = distinct_cube((64, 64, 32), 2)
    out = local_pixel_shuffle(cube.cuda(), gen(3, "cuda")).cpu()
    src = source_of(out, cube)
    dist = (coords(src, (64, 64, 32)) - coords(torch.arange(src.numel()), (64, 64, 32))).abs()
    assert (dist <= torch.tensor([5, 5, 2])).all()


def test_2d_images_are_transformed_as_one_slice_cubes():
    """(N, C, X, Y) images get exactly what (N, C, X, Y, 1) cubes get with the same generator."""
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    config = GenesisTransformConfig()
    flat_in, flat_target = genesis_transform(x, config, torch.Generator().manual_seed(0))
    cube_in, cube_target = genesis_transform(x[..., None], config, torch.Generator().manual_seed(0))
    assert flat_in.shape == x.shape and flat_target.shape == x.shape
    assert torch.equal(flat_in, cube_in[..., 0]) and torch.equal(flat_target, cube_target[..., 0])
