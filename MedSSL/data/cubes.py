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
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from MedSSL.data.spatial import sampling_size
from MedSSL.errors import MedSSLError
from MedSSL.io import volumes as _volumes
from MedSSL.io.atomic import atomic_write
from MedSSL.data.preprocess import IntensityConfig, body_mask, normalize_intensity, resample_to_spacing

CACHE_FORMAT = 1  # bump when the cube-making algorithm changes: it is part of every key
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$MEDSSL_CACHE`` when set, else ``~/.cache/medssl/cubes``."""
    env = os.environ.get("MEDSSL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medssl" / "cubes"


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------


def sample_cubes(
    array01: np.ndarray,
    mask: np.ndarray,
    patch=(64, 64, 32),
    count: int = 32,
    rng: np.random.Generator | None = None,
    min_body_fraction: float = 0.5,
    max_tries: int | None = None,
    return_corners: bool = False,
):
    """Cut up to ``count`` random cubes of ``patch`` voxels from a (X, Y, Z) [0, 1] array.

    Corners are drawn uniformly; a cube is kept when the fraction of its real voxels (padding excluded)
    that lie inside ``mask`` is >= ``min_body_fraction``. Along an axis where the volume is smaller than
    the patch it is padded on both sides with 0 (air) so small volumes (a few slices, a one-slice 2D
    image) still give cubes. Gives up after ``max_tries`` draws (default ``50 * count``) and returns
    what it found: float32 ``(n, *patch)`` with ``n <= count``. With ``return_corners`` also returns
    the ``(n, 3)`` corners in the *unpadded* index space (negative where padding comes first).
    """
    a = np.asarray(array01)
    m = np.asarray(mask, dtype=bool)
    if a.ndim != 3 or m.shape != a.shape:
        raise MedSSLError(f"sample_cubes: array {a.shape} and mask {m.shape} must be the same 3D shape")
    patch = sampling_size(patch)
    count = max(0, int(count))
    rng = rng if rng is not None else np.random.default_rng(0)
    max_tries = 50 * count if max_tries is None else int(max_tries)

    size = np.asarray(a.shape)
    p = np.asarray(patch)
    before = np.maximum(p - size, 0) // 2
    padded = np.maximum(size, p)
    if np.any(padded != size):
        pad = [(int(b), int(t - s - b)) for b, t, s in zip(before, padded, size)]
        a = np.pad(a, pad, mode="constant", constant_values=0)
        m = np.pad(m, pad, mode="constant", constant_values=False)
    high = padded - p  # inclusive upper bound of the corners

    cubes = np.empty((count, *patch), dtype=np.float32)
    corners = np.empty((count, 3), dtype=np.int64)
    n = tries = 0
    while n < count and tries < max_tries:
        tries += 1
        c = np.array([rng.integers(0, h + 1) for h in high])
        window = tuple(slice(int(o), int(o + q)) for o, q in zip(c, p))
        real = 1
        for o, q, b, s in zip(c, p, before, size):  # voxels of the window that are not padding
            real *= max(0, min(o + q, b + s) - max(o, b))
        if real == 0:
            continue
        if np.count_nonzero(m[window]) < min_body_fraction * real:
            continue
        cubes[n] = a[window]
        corners[n] = c - before
        n += 1
    cubes, corners = cubes[:n], corners[:n]
    return (cubes, corners) if return_corners else cubes


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


def _update_with_file(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(b"F" + size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)


_DATA_FILE_PATTERNS = {
    ".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.MULTILINE),
    ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.MULTILINE | re.IGNORECASE),
}


def _detached_data_files(path: Path) -> list[Path]:
    """Data files named by a .mhd / .nhdr header (their bytes belong to the image too)."""
    pattern = _DATA_FILE_PATTERNS.get(path.suffix.lower())
    if pattern is None:
        return []
    try:
        with open(path, "rb") as fh:
            header = fh.read(64 * 1024).decode("latin-1")
    except OSError:
        return []
    match = pattern.search(header)
    if not match:
        return []
    name = match.group(1).strip()
    if name.upper() in ("LOCAL", "") or name.upper().startswith("LIST") or "%" in name:
        return []  # inline data, or lists/patterns we do not expand
    candidate = Path(name) if os.path.isabs(name) else path.parent / name
    return [candidate] if candidate.is_file() else []


def source_files(source: Path) -> list[Path]:
    """The files whose bytes make up ``source``: the file (plus a detached .raw), or a folder's files sorted."""
    source = Path(source)
    if source.is_dir():
        return sorted((p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    return [source, *_detached_data_files(source)]


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
            _update_with_file(h, f)
    except OSError as exc:
        raise MedSSLError(f"{source}: cannot be read ({exc.strerror})") from None
    h.update(b"S" + settings.to_json().encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the cube set
# --------------------------------------------------------------------------------------------------


class CubeSet:
    """Cubes of many volumes, read lazily from memory-mapped ``.npy`` files.

    ``len(cubes)`` counts cubes; ``get(indices)`` returns float32 ``(B, X, Y, Z)``. At most
    ``max_open`` files are mapped at a time (least recently used are closed), and pickling (e.g. to
    DataLoader workers) sends file names, not data.
    """

    def __init__(self, files: list, infos: list[dict], selections: list | None = None, max_open: int = 64):
        if len(files) != len(infos):
            raise ValueError("files and infos must have the same length")
        self.files = [Path(f) for f in files]
        self.infos = [dict(i) for i in infos]
        if selections is None:
            selections = [np.arange(int(i["n_cubes"]), dtype=np.int64) for i in self.infos]
        self.selections = [np.asarray(s, dtype=np.int64) for s in selections]
        self.max_open = max(1, int(max_open))
        self._offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.selections])]).astype(np.int64)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    # pickling: never send the mapped data
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_volumes(self) -> int:
        return len(self.files)

    @property
    def patch(self) -> tuple | None:
        return tuple(self.infos[0]["patch"]) if self.infos else None

    def volume_array(self, v: int) -> np.ndarray:
        """The memory-mapped float16 ``(n, X, Y, Z)`` array of volume ``v`` (all of its cubes)."""
        arr = self._open.get(v)
        if arr is not None:
            self._open.move_to_end(v)
            return arr
        try:
            arr = np.load(self.files[v], mmap_mode="r")
        except (OSError, ValueError):
            raise MedSSLError(
                f"cube cache file {self.files[v].name} is missing or damaged; run the preprocessing again"
            ) from None
        self._open[v] = arr
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return arr

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Global cube indices -> (volume number, row in that volume's file)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"cube index out of range for {n} cubes")
        idx = np.where(idx < 0, idx + n, idx)
        vol = np.searchsorted(self._offsets, idx, side="right") - 1
        rows = np.empty_like(idx)
        for v in np.unique(vol):
            sel = vol == v
            rows[sel] = self.selections[v][idx[sel] - self._offsets[v]]
        return vol, rows

    def get(self, indices) -> np.ndarray:
        """float32 ``(B, X, Y, Z)`` cubes for the given global indices (in that order)."""
        vol, rows = self.locate(indices)
        if self.patch is None:
            raise IndexError("an empty cube set")
        out = np.empty((len(rows), *self.patch), dtype=np.float32)
        for v in np.unique(vol):
            where = np.flatnonzero(vol == v)
            arr = self.volume_array(int(v))
            order = np.argsort(rows[where], kind="stable")  # read the file in order
            out[where[order]] = arr[rows[where][order]]
        return out

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get([index])[0]

    def subset(self, volumes: list[int], selections: list | None = None) -> "CubeSet":
        """A CubeSet of some volumes (optionally only some rows of each)."""
        selections = [self.selections[v] for v in volumes] if selections is None else selections
        return CubeSet([self.files[v] for v in volumes], [self.infos[v] for v in volumes], selections, self.max_open)

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["CubeSet", "CubeSet"]:
        """(train, validation). With >= 2 volumes whole volumes go to one side only (at least one volume
        each side when ``val_fraction`` > 0); with one volume its cubes are split (they may overlap in
        space, so that validation is optimistic). ``val_fraction`` <= 0 gives an empty validation set.
        """
        val_fraction = float(val_fraction)
        if not 0.0 <= val_fraction < 1.0:
            raise MedSSLError(f"validation fraction {val_fraction}: expected a value in [0, 1)")
        rng = np.random.default_rng(seed)
        volumes = [v for v in range(self.num_volumes) if len(self.selections[v])]
        if val_fraction <= 0 or not volumes:
            return self.subset(volumes), self.subset([])
        if len(volumes) >= 2:
            order = [volumes[i] for i in rng.permutation(len(volumes))]
            n_val = min(max(1, int(round(val_fraction * len(order)))), len(order) - 1)
            val, train = sorted(order[:n_val]), sorted(order[n_val:])
            return self.subset(train), self.subset(val)
        v = volumes[0]
        rows = self.selections[v]
        if len(rows) < 2:
            return self.subset([v]), self.subset([])
        perm = rng.permutation(len(rows))
        n_val = min(max(1, int(round(val_fraction * len(rows)))), len(rows) - 1)
        return self.subset([v], [np.sort(rows[perm[n_val:]])]), self.subset([v], [np.sort(rows[perm[:n_val]])])

    def summary(self) -> dict:
        """Counts, modalities, shapes and spacings: no paths, no names (ids are the first 12 hex of the keys)."""
        return {
            "volumes": self.num_volumes,
            "cubes": len(self),
            "patch": list(self.patch) if self.patch else None,
            "modalities": dict(Counter(i.get("modality") or "unknown" for i in self.infos)),
            "cubes_per_volume": [len(s) for s in self.selections],
            "shapes": [list(i["shape"]) for i in self.infos],
            "spacings_mm": [[round(float(s), 3) for s in i["spacing_mm"]] for i in self.infos],
            "ids": [i["id"] for i in self.infos],
        }


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
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{cache_dir}: cannot create the cube cache folder ({exc.strerror})") from None
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
            del half
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
