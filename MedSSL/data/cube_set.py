"""CubeSet: the cubes of many volumes, read lazily from the memory-mapped ``.npy`` files of the cube cache."""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError


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
