"""Pretraining cubes: sampling with a content filter, and a content- and settings-keyed disk cache.

Models Genesis cut up to 32 cubes of 64 x 64 x 32 voxels (slice axis last) per CT scan, in [0, 1]
units, and rejected cubes dominated by the wrong content. Here the filter is simpler and works for any
modality: a cube is kept when at least ``min_body_fraction`` of its (real, unpadded) voxels lie inside the
body mask of :func:`MedSSL.data.preprocess.body_mask`, i.e. it is not mostly air around the patient.

:func:`prepare_cubes` turns a list of volume sources into a :class:`CubeSet`. Each source is processed
once per settings: the cubes go to ``<cache_dir>/<key>.npy`` (float16) with a small ``<key>.json``
summary, where ``key`` is a sha256 over the source's bytes and the settings. A second run (or a resumed
one) reuses the files without reading the image again. The CubeSet reads cubes from the memory-mapped
files on demand, so memory stays flat however many volumes there are.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from MedSSL.data.content_hash import source_files, update_hash_with_file
from MedSSL.data.cube_sampling import sample_cubes
from MedSSL.data.cube_set import CubeSet
from MedSSL.data.spatial import sampling_size
from MedSSL.errors import MedSSLError
from MedSSL.io import volumes as _volumes
from MedSSL.io.atomic import atomic_write
from MedSSL.data.preprocess import IntensityConfig, body_mask, normalize_intensity, resample_to_spacing

CACHE_FORMAT = 1  # bump when the cube-making algorithm changes: it is part of every key


def default_cache_dir() -> Path:
    """``$MEDSSL_CACHE`` when set, else ``~/.cache/medssl/cubes``."""
    env = os.environ.get("MEDSSL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medssl" / "cubes"


# --------------------------------------------------------------------------------------------------
# settings and keys
# --------------------------------------------------------------------------------------------------


@dataclass
class CubeSettings:
    """Everything that changes the cubes made from one volume (and so the cache key)."""

    patch: tuple = (64, 64, 32)
    cubes_per_volume: int = 32
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    target_spacing_mm: tuple | None = None
    min_body_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        self.patch = sampling_size(self.patch)
        self.cubes_per_volume = int(self.cubes_per_volume)
        if self.cubes_per_volume < 1:
            raise MedSSLError(f"cubes per volume {self.cubes_per_volume}: expected at least 1")
        if isinstance(self.intensity, dict):
            self.intensity = IntensityConfig.from_dict(self.intensity)
        if self.target_spacing_mm is not None:
            spacing = np.asarray(self.target_spacing_mm, dtype=np.float64).reshape(-1)
            if spacing.size == 1:
                spacing = np.repeat(spacing, 3)
            if spacing.size != 3 or not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
                raise MedSSLError(f"target spacing {self.target_spacing_mm!r}: expected one or three positive numbers (mm)")
            self.target_spacing_mm = tuple(float(s) for s in spacing)
        self.min_body_fraction = float(self.min_body_fraction)
        if not 0.0 <= self.min_body_fraction <= 1.0:
            raise MedSSLError(f"min body fraction {self.min_body_fraction}: expected a value in [0, 1]")
        self.seed = int(self.seed)

    def to_dict(self) -> dict:
        return {
            "patch": list(self.patch),
            "cubes_per_volume": self.cubes_per_volume,
            "intensity": self.intensity.to_dict(),
            "target_spacing_mm": None if self.target_spacing_mm is None else list(self.target_spacing_mm),
            "min_body_fraction": self.min_body_fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CubeSettings":
        data = dict(data)
        unknown = sorted(set(data) - {"patch", "cubes_per_volume", "intensity", "target_spacing_mm", "min_body_fraction", "seed"})
        if unknown:
            raise MedSSLError(f"cube settings: unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces), including the cache format version."""
        return json.dumps({"format": CACHE_FORMAT, **self.to_dict()}, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """sha256 hex of :meth:`to_json`: stable across runs and machines."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def cache_key(source_path, settings: CubeSettings) -> str:
    """sha256 hex over the source's bytes (a DICOM folder: its files sorted by name) and the settings JSON.

    Files are streamed in 1 MiB chunks, never loaded whole. File names and locations are not part of
    the key, so a copied or renamed volume reuses its cubes.
    """
    source = Path(source_path)
    if not source.exists():
        raise MedSSLError(f"{source}: no such file or folder")
    h = hashlib.sha256()
    files = source_files(source)
    if not files:
        raise MedSSLError(f"{source}: an empty folder")
    try:
        for f in files:
            update_hash_with_file(h, f)
    except OSError as exc:
        raise MedSSLError(f"{source}: cannot be read ({exc.strerror})") from None
    h.update(b"S" + settings.to_json().encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# preparation with the cache
# --------------------------------------------------------------------------------------------------


def _load_cached(cache_dir: Path, key: str) -> dict | None:
    """The summary of a finished cache entry, or None when absent or incomplete."""
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT:
            return None
        if info.get("n_cubes") == 0:
            return info  # nothing to map
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if arr.ndim != 4 or arr.shape[0] != info.get("n_cubes"):
        return None
    del arr
    return info


def make_volume_cubes(volume, settings: CubeSettings, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Resample, normalise, mask and sample one Volume; returns (float32 cubes, summary without ids)."""
    volume = resample_to_spacing(volume, settings.target_spacing_mm)
    array01, modality = normalize_intensity(volume, settings.intensity)
    mask = body_mask(array01, modality, ct_window=settings.intensity.ct_window)
    cubes = sample_cubes(array01, mask, settings.patch, settings.cubes_per_volume, rng, settings.min_body_fraction)
    info = {
        "shape": list(volume.shape),
        "spacing_mm": [round(float(s), 4) for s in volume.spacing],
        "modality": modality,
        "n_cubes": int(len(cubes)),
        "patch": list(settings.patch),
        "body_fraction": round(float(mask.mean()), 4),
    }
    return cubes, info


def _created_cache_dir(cache_dir) -> Path:
    """``cache_dir`` (``~`` expanded), created when missing; MedSSLError when it cannot be."""
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{cache_dir}: cannot create the cube cache folder ({exc.strerror})") from None
    return cache_dir


def _make_and_cache(source: Path, key: str, settings: CubeSettings, cache_dir: Path) -> dict:
    """Read ``source``, make its cubes with a generator seeded from ``(key, settings.seed)`` and write
    ``<key>.npy`` (float16) and ``<key>.json`` atomically; returns the summary written."""
    volume = _volumes.read_volume(source)
    seed_seq = np.random.SeedSequence([int(key[:16], 16), settings.seed % (1 << 63)])
    cubes, info = make_volume_cubes(volume, settings, np.random.default_rng(seed_seq))
    del volume
    info = {"id": key[:12], "format": CACHE_FORMAT, **info}
    half = cubes.astype(np.float16)
    del cubes
    try:
        atomic_write(cache_dir / f"{key}.npy", lambda fh: np.save(fh, half, allow_pickle=False))
        data = json.dumps(info, indent=1).encode("utf-8")
        atomic_write(cache_dir / f"{key}.json", lambda fh: fh.write(data))
    except OSError as exc:
        raise MedSSLError(f"{cache_dir}: cannot write the cube cache ({exc.strerror})") from None
    return info


def prepare_cubes(
    sources: list,
    settings: CubeSettings,
    cache_dir,
    progress: Callable[[int, int, bool], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> CubeSet:
    """Cubes of every source (volume files or DICOM folders), made once and cached in ``cache_dir``.

    For each source the key is :func:`cache_key`; ``<key>.npy`` + ``<key>.json`` are reused when present
    (the image is not read), otherwise the volume is read, resampled to ``settings.target_spacing_mm``
    (when given), normalised, masked and sampled with a generator seeded from ``(settings.seed, key)``,
    and both files are written atomically. ``progress(done, total, cached)`` is called after each
    source. Sources that give no cube are skipped with a message to ``warn`` (default:
    :func:`warnings.warn`). Raises MedSSLError when no source gives any cube, or naming a source that
    cannot be read.
    """
    sources = [Path(s) for s in sources]
    if not sources:
        raise MedSSLError("no volumes to prepare cubes from")
    cache_dir = _created_cache_dir(cache_dir)
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))

    files: list[Path] = []
    infos: list[dict] = []
    skipped = 0
    seen: set[str] = set()
    total = len(sources)
    for done, source in enumerate(sources, start=1):
        key = cache_key(source, settings)
        info = _load_cached(cache_dir, key)
        cached = info is not None
        if info is None:
            info = _make_and_cache(source, key, settings, cache_dir)
        if info["n_cubes"] == 0:
            skipped += 1
            warn(
                f"{source}: no {'x'.join(map(str, settings.patch))} cube with at least "
                f"{settings.min_body_fraction:.0%} body voxels; skipped"
            )
        elif key in seen:
            warn(f"{source}: the same image as an earlier source; used once")
        else:
            seen.add(key)
            files.append(cache_dir / f"{key}.npy")
            infos.append(info)
        if progress is not None:
            progress(done, total, cached)
    if not files:
        raise MedSSLError(
            f"none of the {total} volume(s) gave a {'x'.join(map(str, settings.patch))} cube with at least "
            f"{settings.min_body_fraction:.0%} of its voxels inside the body (images too small, empty, or "
            "mostly air?)"
        )
    return CubeSet(files, infos)
