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

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.methods.self_discovery.autoencoder import bottleneck_features, train_autoencoder
from MedSSL.methods.self_discovery.geometry import resize_volume
from MedSSL.methods.self_discovery.patterns import PatternSet, digest, load_patterns, save_patterns
from MedSSL.methods.self_discovery.planning import crop_instance, plan_classes, plan_instances

DISCOVERY_FORMAT = 1  # bump when the algorithm changes: part of the cache key


# --------------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------------


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


def discover_patterns(data, s, device, backbone_features: Callable[[np.ndarray], np.ndarray] | None = None,
                      backbone_digest: str | None = None) -> PatternSet:
    """Run (or load from ``data.cache_dir``) the self-discovery for method settings ``s`` (a
    :class:`~MedSSL.methods.semantic_genesis.SelfDiscoverySettings`).

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
    k = resolve_instances(s.instances, len(train_ids))
    k_val = min(int(s.val_instances), len(val_ids))
    key = digest({"format": DISCOVERY_FORMAT, "train": train_ids, "val": val_ids, "cubes": settings.to_dict(),
                  "discovery": {name: getattr(s, name) for name in DISCOVERY_KEYS}, "seed": data.seed,
                  "backbone": backbone_digest if s.features == "backbone" else None})
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

    grid = tuple(int(g) for g in s.feature_grid)
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

    if s.features == "backbone":
        if backbone_features is None:
            raise MedSSLError("features=\"backbone\" needs the backbone")
        feats = backbone_features(small)
        log(f"self-discovery: {feats.shape[1]}-d features from the backbone encoder")
    elif s.features == "autoencoder":
        log(f"self-discovery: training the auto-encoder (width {s.ae_width}, {s.ae_steps} steps on "
            f"{len(train_src)} volume(s) resized to {'x'.join(map(str, grid))})")
        net = train_autoencoder(small[: len(train_src)], int(s.ae_width), int(s.ae_steps), int(s.ae_batch),
                                float(s.ae_lr), device, seed=int(data.seed), log=log)
        feats = bottleneck_features(net, small, device)
        del net
    else:
        raise MedSSLError(f"features must be \"autoencoder\" or \"backbone\", got {s.features!r}")
    n_train = len(train_src)
    rng = np.random.default_rng([int(data.seed), 20200101])
    classes = plan_classes(feats[:n_train], masks[:n_train], shapes[:n_train], patch, int(s.classes), k, rng,
                           min_body_fraction=settings.min_body_fraction, min_distance=float(s.min_class_distance),
                           max_tries=int(s.max_tries), val_features=feats[n_train:] if val_src else None,
                           val_instances=k_val, log=log)
    if not classes:
        raise MedSSLError("self-discovery found no place with enough body for a pattern class")
    resolutions = int(s.resolutions)
    instances = plan_instances(classes, patch, resolutions, tuple(s.resolution_size), float(s.resolution_shift), rng)

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
        "classes_requested": int(s.classes),
        "classes_found": len(classes),
        "instances": k,
        "val_instances": k_val,
        "resolutions": resolutions,
        "train_volumes": n_train,
        "val_volumes": len(val_src),
        "feature_dim": int(feats.shape[1]),
        "features": s.features,
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
