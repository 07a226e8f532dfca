"""The cached result of self-discovery: :class:`PatternSet` (cubes, labels, splits) and its files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from MedSSL.io.atomic import atomic_path


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
