"""Self-discovery of anatomical patterns (Semantic Genesis / TransVW "visual words"), on users' volumes.

Published (Haghighi et al., self_discovery/ in the SemanticGenesis and TransVW repositories):

1. a Keras U-Net auto-encoder is trained to reconstruct whole patient volumes resized to 128x128x64;
2. each patient's feature is the global average pool of its encoder output (512-d);
3. for each of C classes a not-yet-used reference patient is drawn, all patients are ranked by the
   L2 distance of their features to the reference's, a random voxel coordinate is drawn in the
   reference (same content filter as Models Genesis, at least 5 voxels from the coordinates of the
   earlier classes), and the cubes at that SAME coordinate in the K = 200 nearest patients are the K
   instances of the class (no registration: similar patients are assumed anatomically aligned); the
   30 nearest validation patients give the validation instances. C = 44 classes were used.
4. optionally ("multi-resolution") two more crops per instance with a random in-plane size in
   [50, 80) voxels, shifted by [-10, 10) voxels, same slices, resized to the cube size.

Ours. Users' volumes differ in size and spacing, so the coordinate is a *normalised* one (fractions
of each axis' extent, the cube centre), and cubes are cut around it in each neighbour's own voxel grid
(after the same optional resampling and the same intensity normalisation as the pretraining cubes),
padded with 0 where a volume is smaller than the cube. The auto-encoder is the Genesis GenesisUNet at a
small width trained for a short budget on the volumes resized to a small grid (default 64x64x32, half
the published grid per axis) with its skip connections zeroed, so that the bottleneck has to carry
the volume (the published Keras U-Net kept its skips); the feature is the GAP of its bottleneck
(16 x width values; 512 at width 32, as published). Alternatively (``features="backbone"``) the
GAP of the current backbone's encoder is used, which is meaningful when pretraining starts from
weights (``--init``). The coordinate filter is the body mask of :mod:`MedSSL.data.preprocess`
(the fraction of the cube inside the body), the modality-independent stand-in for the lung filter.
The published "too close" flag was never reset inside the retry loop (one collision wasted the
reference); ours retries properly.

Everything is computed once and cached in the cube cache folder, keyed by the volumes' cache keys,
the cube settings, the discovery settings and the seed.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_path
from MedSSL.models.genesis_unet import GenesisUNet

DISCOVERY_FORMAT = 1  # bump when the algorithm changes: part of the cache key


# --------------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------------


def resize_volume(array: np.ndarray, grid) -> np.ndarray:
    """(X, Y, Z) array -> float32 ``grid``: box-average down, trilinear up (per axis as needed)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    grid = tuple(int(g) for g in grid)
    smaller = tuple(min(s, g) for s, g in zip(t.shape[2:], grid))
    if smaller != tuple(t.shape[2:]):
        t = F.adaptive_avg_pool3d(t, smaller)
    if smaller != grid:
        t = F.interpolate(t, size=grid, mode="trilinear", align_corners=False)
    return t[0, 0].numpy()


def crop_box(array: np.ndarray, centre, size) -> np.ndarray:
    """The box of ``size`` voxels centred at the normalised ``centre`` (fractions of each axis) of an
    (X, Y, Z) array; parts outside the array are 0. float32."""
    shape = np.asarray(array.shape)
    size = np.asarray(size, dtype=np.int64)
    corner = np.rint(np.asarray(centre, dtype=np.float64) * shape - size / 2.0).astype(np.int64)
    out = np.zeros(tuple(size), dtype=np.float32)
    src, dst = [], []
    for c, s, n in zip(corner, size, shape):
        lo, hi = max(c, 0), min(c + s, n)
        if hi <= lo:
            return out
        src.append(slice(int(lo), int(hi)))
        dst.append(slice(int(lo - c), int(hi - c)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_resized(array: np.ndarray, centre, size, out_size) -> np.ndarray:
    """:func:`crop_box` of ``size`` then resized (trilinear) to ``out_size``."""
    box = crop_box(array, centre, size)
    if tuple(box.shape) == tuple(out_size):
        return box
    t = torch.from_numpy(box)[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in out_size), mode="trilinear", align_corners=False)[0, 0].numpy()


def box_fraction(mask_small: np.ndarray, centre, half_extent) -> float:
    """Fraction of the normalised box [centre - half, centre + half] that is True in a small-grid mask."""
    shape = np.asarray(mask_small.shape)
    lo = np.floor((np.asarray(centre) - half_extent) * shape).astype(int)
    hi = np.ceil((np.asarray(centre) + half_extent) * shape).astype(int)
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    hi = np.maximum(hi, lo + 1)
    region = mask_small[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return float(region.mean()) if region.size else 0.0


def nearest_neighbours(features: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of ``features`` nearest to ``query`` (L2), nearest first (stable)."""
    d = np.linalg.norm(np.asarray(features, dtype=np.float64) - np.asarray(query, dtype=np.float64)[None], axis=1)
    return np.argsort(d, kind="stable")[: max(0, int(k))]


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------


def _bottleneck_features(net: GenesisUNet, small: np.ndarray, device, batch: int = 4) -> np.ndarray:
    feats = []
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i in range(0, len(small), batch):
            x = torch.from_numpy(np.asarray(small[i:i + batch], dtype=np.float32)).unsqueeze(1).to(device)
            b, _ = net.encode(x)
            feats.append(b.float().mean(dim=(2, 3, 4)).cpu().numpy())
    net.train(was_training)
    return np.concatenate(feats).astype(np.float32)


def train_autoencoder(small: np.ndarray, width: int, steps: int, batch: int, lr: float, device,
                      seed: int, log: Callable[[str], None] = print) -> GenesisUNet:
    """A GenesisUNet auto-encoder (skips zeroed) trained ``steps`` Adam steps on (V, X, Y, Z) [0, 1] volumes."""
    torch.manual_seed(seed)
    net = GenesisUNet(1, 1, width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(small, dtype=np.float32)).unsqueeze(1)
    net.train()
    report = max(1, steps // 5)
    first = None
    for step in range(int(steps)):
        idx = np.sort(rng.integers(0, len(data), size=min(batch, len(data)) if len(data) > 1 else 2))
        x = data[idx].to(device)
        bottleneck, skips = net.encode(x)
        out = net.out_tr(net.decode(bottleneck, [torch.zeros_like(s) for s in skips]))
        loss = F.mse_loss(torch.sigmoid(out.float()), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        if (step + 1) % report == 0 or step + 1 == steps:
            log(f"self-discovery auto-encoder: step {step + 1}/{steps}, MSE {float(loss.detach()):.4f} (first {first:.4f})")
    return net


# --------------------------------------------------------------------------------------------------
# class planning
# --------------------------------------------------------------------------------------------------


@dataclass
class PatternClass:
    """One anatomical pattern: a reference volume, a normalised cube centre, its member volumes."""

    reference: int
    centre: np.ndarray
    train_members: np.ndarray
    val_members: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def plan_classes(features: np.ndarray, masks_small: list, shapes: list, patch, classes: int, instances: int,
                 rng: np.random.Generator, min_body_fraction: float = 0.5, min_distance: float = 0.05,
                 max_tries: int = 200, val_features: np.ndarray | None = None, val_instances: int = 0,
                 log: Callable[[str], None] = print) -> list[PatternClass]:
    """Choose up to ``classes`` patterns among training volumes (rows of ``features``).

    For each class: a reference volume (each once before any is reused), its ``instances`` nearest
    training volumes by L2 feature distance (the reference first), and a normalised centre drawn
    uniformly where the patch fits in the reference, with at least ``min_body_fraction`` of the box
    inside the reference's body mask (``masks_small``: masks on any small grid) and at least
    ``min_distance`` (normalised units) from every earlier class centre. Up to ``max_tries``
    centres per reference; a reference that fails is replaced by the next one. Returns fewer classes
    when no more centres can be found.
    """
    n = len(features)
    patch = np.asarray(patch, dtype=np.float64)
    k = min(int(instances), n)
    k_val = min(int(val_instances), 0 if val_features is None else len(val_features))
    found: list[PatternClass] = []
    order = list(rng.permutation(n))
    failures_in_a_row = 0
    while len(found) < classes:
        if not order:
            order = list(rng.permutation(n))
        ref = int(order.pop(0))
        half = np.minimum(patch / (2.0 * np.asarray(shapes[ref], dtype=np.float64)), 0.5)
        centre = None
        for _ in range(int(max_tries)):
            c = rng.uniform(half, 1.0 - half)
            if any(np.linalg.norm(c - p.centre) < min_distance for p in found):
                continue
            if box_fraction(masks_small[ref], c, half) < min_body_fraction:
                continue
            centre = c
            break
        if centre is None:
            failures_in_a_row += 1
            if failures_in_a_row >= max(n, 3):
                log(f"self-discovery: found only {len(found)} of {classes} pattern classes (no further place with "
                    f"enough body at least {min_distance:g} from the others)")
                break
            continue
        failures_in_a_row = 0
        members = nearest_neighbours(features, features[ref], k)
        val_members = (nearest_neighbours(val_features, features[ref], k_val)
                       if k_val else np.zeros(0, dtype=np.int64))
        found.append(PatternClass(ref, np.asarray(centre, dtype=np.float64), members, val_members))
    return found


# --------------------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    label: int
    volume: int  # index into the split's volume list
    split: int  # 0 train, 1 validation
    resolution: int  # 0 = the cube itself, 1.. = multi-resolution crops
    centre: np.ndarray  # the class's normalised centre
    size: tuple  # crop size in voxels before resizing to the patch
    shift_voxels: tuple = (0.0, 0.0)  # in-plane shift of a multi-resolution crop, voxels


def plan_instances(classes: list[PatternClass], patch, multi_resolution: int, size_range, shift,
                   rng: np.random.Generator) -> list[Instance]:
    """All crops: per class, the cube in every member (train and validation) at the class centre,
    plus ``multi_resolution - 1`` extra in-plane windows per training member (published: 2 extra of
    in-plane size U[50, 80) voxels for a 64-voxel cube, shifted by U[-10, 10) voxels, same slices,
    resized to the cube). Here sizes are ``U(size_range) * patch`` and shifts ``U(-shift, shift) *
    patch`` voxels in X and Y."""
    patch = tuple(int(p) for p in patch)
    out: list[Instance] = []
    for label, cls in enumerate(classes):
        for v in cls.train_members:
            out.append(Instance(label, int(v), 0, 0, cls.centre.copy(), patch))
            for r in range(1, int(multi_resolution)):
                frac = rng.uniform(size_range[0], size_range[1])
                sx, sy = (max(2, int(round(frac * p))) for p in patch[:2])
                dx, dy = (float(rng.uniform(-shift, shift) * p) for p in patch[:2])
                out.append(Instance(label, int(v), 0, r, cls.centre.copy(), (sx, sy, patch[2]), (dx, dy)))
        for v in cls.val_members:
            out.append(Instance(label, int(v), 1, 0, cls.centre.copy(), patch))
    return out


def crop_instance(array01: np.ndarray, inst: Instance, patch) -> np.ndarray:
    """The (patch) float32 cube of ``inst`` from its volume's normalised array."""
    centre = np.asarray(inst.centre, dtype=np.float64).copy()
    centre[0] += inst.shift_voxels[0] / array01.shape[0]
    centre[1] += inst.shift_voxels[1] / array01.shape[1]
    return crop_resized(array01, centre, inst.size, patch)


# --------------------------------------------------------------------------------------------------
# the cached pattern set
# --------------------------------------------------------------------------------------------------


@dataclass
class PatternSet:
    """Cubes (N, X, Y, Z) float16 (memory-mapped) with per-cube labels, split, volume, resolution, centre."""

    cubes: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    volume: np.ndarray
    resolution: np.ndarray
    centres: np.ndarray
    info: dict
    features: np.ndarray | None = None  # (training volumes + validation volumes, d) self-discovery features

    def indices(self, split: int) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def get(self, idx) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        cubes = np.empty((len(idx), *self.cubes.shape[1:]), dtype=np.float32)
        cubes[order] = self.cubes[idx[order]]
        return cubes, self.labels[idx].astype(np.int64)




def _write_via_path(path: Path, write: Callable[[str], object]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def save_patterns(path_stem: Path, cubes_writer: Callable[[np.ndarray], None], n: int, patch, meta: dict, info: dict) -> None:
    """Write ``<stem>.npy`` (float16 cubes, filled by ``cubes_writer(memmap)``), ``<stem>.npz``
    (labels, split, volume, resolution, centres) and ``<stem>.json`` (info), each atomically; the
    JSON last, so its presence marks a complete entry."""
    npy, npz, js = (path_stem.with_suffix(s) for s in (".npy", ".npz", ".json"))

    def write_npy(tmp):
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, *patch))
        cubes_writer(mm)
        mm.flush()
        del mm

    _write_via_path(npy, write_npy)

    def write_npz(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **meta)

    _write_via_path(npz, write_npz)
    _write_via_path(js, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1), encoding="utf-8"))


def load_patterns(path_stem: Path) -> PatternSet | None:
    npy, npz, js = (path_stem.with_suffix(s) for s in (".npy", ".npz", ".json"))
    if not (npy.is_file() and npz.is_file() and js.is_file()):
        return None
    try:
        info = json.loads(js.read_text(encoding="utf-8"))
        cubes = np.load(npy, mmap_mode="r")
        with np.load(npz) as meta:
            arrays = {k: meta[k] for k in ("labels", "split", "volume", "resolution", "centres")}
            arrays["features"] = meta["features"] if "features" in meta.files else None
    except (OSError, ValueError, KeyError):
        return None
    if cubes.ndim != 4 or len(cubes) != len(arrays["labels"]):
        return None
    return PatternSet(cubes, info=info, **arrays)


# --------------------------------------------------------------------------------------------------
# the driver: sources -> cached PatternSet
# --------------------------------------------------------------------------------------------------

#: method settings that change the discovered patterns (so they are part of the cache key)
DISCOVERY_KEYS = ("classes", "instances", "val_instances", "features", "feature_grid", "ae_width", "ae_steps",
                  "ae_batch", "ae_lr", "min_class_distance", "resolutions", "resolution_size", "resolution_shift",
                  "max_tries")


def load_normalised(source, cube_settings) -> tuple[np.ndarray, np.ndarray]:
    """(array01, body mask) of one source, prepared exactly like its pretraining cubes."""
    from MedSSL.data.preprocess import body_mask, normalize_intensity, resample_to_spacing
    from MedSSL.io.volumes import read_volume

    volume = resample_to_spacing(read_volume(source), cube_settings.target_spacing_mm)
    array01, modality = normalize_intensity(volume, cube_settings.intensity)
    del volume
    return array01, body_mask(array01, modality, ct_window=cube_settings.intensity.ct_window)


def resolve_instances(value, n_train: int) -> int:
    """K: ``"auto"`` = min(200, number of training volumes) (published 200); an int is capped likewise."""
    k = 200 if value in (None, "auto") else int(value)
    if k < 1:
        raise MedSSLError("instances must be >= 1 or \"auto\"")
    return max(1, min(k, n_train))


def _ids(cubeset) -> list[str]:
    seen: list[str] = []
    for info in (cubeset.infos if cubeset is not None else []):
        if info["id"] not in seen:
            seen.append(info["id"])
    return seen


def _wait_for_rank0(stem: Path, log: Callable[[str], None]) -> PatternSet:
    """Under torchrun, ranks other than 0 wait for rank 0's self-discovery (same key) instead of
    repeating it (torchrun ends every rank if rank 0 fails)."""
    import time

    log("self-discovery: waiting for rank 0")
    while True:
        found = load_patterns(stem)
        if found is not None:
            return found
        time.sleep(2.0)


def discover_patterns(data, s: dict, device, backbone_features: Callable[[np.ndarray], np.ndarray] | None = None,
                      backbone_digest: str | None = None) -> PatternSet:
    """Run (or load from ``data.cache_dir``) the self-discovery for method settings ``s``.

    ``data`` is the trainer's PretrainData. Training volumes are those of ``data.train``; validation
    volumes those of ``data.val`` that are not training volumes.
    """
    log = data.log
    settings = data.settings
    patch = tuple(int(p) for p in settings.patch)
    train_ids = _ids(data.train)
    val_ids = [i for i in _ids(data.val) if i not in train_ids]
    if not train_ids:
        raise MedSSLError("self-discovery needs at least one training volume")
    k = resolve_instances(s["instances"], len(train_ids))
    k_val = min(int(s["val_instances"]), len(val_ids))
    key = digest({"format": DISCOVERY_FORMAT, "train": train_ids, "val": val_ids, "cubes": settings.to_dict(),
                  "discovery": {name: s[name] for name in DISCOVERY_KEYS}, "seed": data.seed,
                  "backbone": backbone_digest if s["features"] == "backbone" else None})
    cache_dir = Path(data.cache_dir) if data.cache_dir is not None else Path(tempfile.mkdtemp(prefix="medssl-sd-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"patterns-{key[:32]}"
    cached = load_patterns(stem)
    if cached is None and getattr(data, "world_size", 1) > 1 and getattr(data, "rank", 0) > 0:
        cached = _wait_for_rank0(stem, log)
    if cached is not None:
        log(f"self-discovery: reusing {cached.info['classes_found']} pattern classes x {cached.info['instances']} "
            f"instances from the cache")
        return cached

    from MedSSL.data.cubes import cache_key

    by_id: dict[str, Path] = {}
    for source in data.sources:
        by_id.setdefault(cache_key(source, settings)[:12], Path(source))
    missing = [i for i in train_ids + val_ids if i not in by_id]
    if missing:
        raise MedSSLError(f"self-discovery: {len(missing)} volume(s) of the cube set are not among the sources")
    train_src = [by_id[i] for i in train_ids]
    val_src = [by_id[i] for i in val_ids]
    if len(train_src) == 1:
        log("self-discovery: only one training volume: the pattern classes are different places in that volume "
            "(one instance each); add more volumes for real anatomical classes")

    grid = tuple(int(g) for g in s["feature_grid"])
    smalls, masks, shapes = [], [], []
    for n, source in enumerate(train_src + val_src, start=1):
        array01, mask = load_normalised(source, settings)
        shapes.append(tuple(array01.shape))
        smalls.append(resize_volume(array01, grid))
        masks.append(resize_volume(mask.astype(np.float32), grid) >= 0.5)
        del array01, mask
        log(f"self-discovery: read volume {n}/{len(train_src) + len(val_src)}")
    small = np.stack(smalls)
    del smalls

    if s["features"] == "backbone":
        if backbone_features is None:
            raise MedSSLError("features=\"backbone\" needs the backbone")
        feats = backbone_features(small)
        log(f"self-discovery: {feats.shape[1]}-d features from the backbone encoder")
    elif s["features"] == "autoencoder":
        log(f"self-discovery: training the auto-encoder (width {s['ae_width']}, {s['ae_steps']} steps on "
            f"{len(train_src)} volume(s) resized to {'x'.join(map(str, grid))})")
        net = train_autoencoder(small[: len(train_src)], int(s["ae_width"]), int(s["ae_steps"]), int(s["ae_batch"]),
                                float(s["ae_lr"]), device, seed=int(data.seed), log=log)
        feats = _bottleneck_features(net, small, device)
        del net
    else:
        raise MedSSLError(f"features must be \"autoencoder\" or \"backbone\", got {s['features']!r}")
    n_train = len(train_src)
    rng = np.random.default_rng([int(data.seed), 20200101])
    classes = plan_classes(feats[:n_train], masks[:n_train], shapes[:n_train], patch, int(s["classes"]), k, rng,
                           min_body_fraction=settings.min_body_fraction, min_distance=float(s["min_class_distance"]),
                           max_tries=int(s["max_tries"]), val_features=feats[n_train:] if val_src else None,
                           val_instances=k_val, log=log)
    if not classes:
        raise MedSSLError("self-discovery found no place with enough body for a pattern class")
    resolutions = int(s["resolutions"])
    instances = plan_instances(classes, patch, resolutions, tuple(s["resolution_size"]), float(s["resolution_shift"]), rng)

    def fill(mm: np.ndarray) -> None:
        sources = [(0, i, src) for i, src in enumerate(train_src)] + [(1, i, src) for i, src in enumerate(val_src)]
        for n, (split, v, source) in enumerate(sources, start=1):
            rows = [j for j, inst in enumerate(instances) if inst.split == split and inst.volume == v]
            if not rows:
                continue
            array01, _ = load_normalised(source, settings)
            for j in rows:
                mm[j] = crop_instance(array01, instances[j], patch).astype(np.float16)
            del array01
            log(f"self-discovery: cropped the patterns of volume {n}/{len(sources)}")

    meta = {
        "labels": np.array([i.label for i in instances], dtype=np.int64),
        "split": np.array([i.split for i in instances], dtype=np.int8),
        "volume": np.array([i.volume for i in instances], dtype=np.int64),
        "resolution": np.array([i.resolution for i in instances], dtype=np.int8),
        "centres": np.array([i.centre for i in instances], dtype=np.float64).reshape(-1, 3),
        "features": np.asarray(feats, dtype=np.float32),
    }
    info = {
        "format": DISCOVERY_FORMAT,
        "classes_requested": int(s["classes"]),
        "classes_found": len(classes),
        "instances": k,
        "val_instances": k_val,
        "resolutions": resolutions,
        "train_volumes": n_train,
        "val_volumes": len(val_src),
        "feature_dim": int(feats.shape[1]),
        "features": s["features"],
        "references": [int(c.reference) for c in classes],
        "class_centres": [[round(float(x), 4) for x in c.centre] for c in classes],
        "train_cubes": int(np.sum(meta["split"] == 0)),
        "val_cubes": int(np.sum(meta["split"] == 1)),
    }
    save_patterns(stem, fill, len(instances), patch, meta, info)
    log(f"self-discovery: {len(classes)} pattern classes x {k} instance(s) x {resolutions} resolution(s) = "
        f"{info['train_cubes']} training cubes, {info['val_cubes']} validation cubes")
    loaded = load_patterns(stem)
    if loaded is None:
        raise OSError(f"{stem}: the pattern cache could not be read back")
    return loaded
