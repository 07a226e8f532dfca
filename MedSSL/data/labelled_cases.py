"""One case of a labelled dataset: read, checked, preprocessed and cached as memory-mapped ``.npy`` files
keyed by the image's and label's bytes and the preprocessing settings (see :mod:`MedSSL.data.labelled`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSSL.data.content_hash import source_files, update_hash_with_file
from MedSSL.data.labels import IGNORE, label_array, present_values
from MedSSL.data.preprocess import IntensityConfig, normalize_intensity, resample_to_spacing
from MedSSL.data.spatial import is_one_slice
from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_write
from MedSSL.io.volumes import read_volume

CACHE_FORMAT = 1


@dataclass
class LabelledCase:
    """One preprocessed pair: ``image`` float16 (X, Y, Z) in [0, 1] and ``label`` uint8 (X, Y, Z) of the
    dataset's own values (255 = not annotated), both memory-mapped from the cache (Z = 1 in 2D)."""

    image: np.ndarray
    label: np.ndarray
    info: dict


def _settings_json(intensity: IntensityConfig, spacing) -> str:
    return json.dumps({"format": CACHE_FORMAT, "intensity": intensity.to_dict(),
                       "spacing": None if spacing is None else [float(s) for s in spacing]}, sort_keys=True)


def pair_key(image: Path, label: Path, intensity: IntensityConfig, spacing) -> str:
    """sha256 over the image's and the label's bytes and the preprocessing settings."""
    h = hashlib.sha256()
    for part in (image, label):
        files = source_files(part)
        for f in files:
            update_hash_with_file(h, f)
        h.update(b"|")
    h.update(_settings_json(intensity, spacing).encode("utf-8"))
    return h.hexdigest()


def _resample_label(label_volume, values: np.ndarray, spacing):
    """Nearest-neighbour resampling of label ``values``; voxels from outside the grid become 255."""
    shifted = label_volume.with_array(values.astype(np.uint16) + 1)
    out = resample_to_spacing(shifted, spacing, nearest=True).array.astype(np.int32) - 1
    return np.where(out < 0, IGNORE, out).astype(np.uint8)


def check_dimensions(shape, spatial_dims: int, where: str, image_path) -> None:
    """MedSSLError (naming ``where`` and the image) unless ``shape`` is one slice for a 2D run or 3D for a
    3D run."""
    if spatial_dims == 2:
        if len(shape) != 3 or not is_one_slice(shape) or min(shape[:2]) < 2:
            raise MedSSLError(f"{where}: image {image_path} is not a one-slice (2D) image ({'x'.join(map(str, shape))}); "
                              "a 2D run needs one-slice images and labels in every case")
    elif min(shape) < 2:
        raise MedSSLError(f"{where}: image {image_path} is a one-slice (2D) image; labelled datasets need 3D volumes "
                          "(or one-slice images in every case, for a 2D run)")


def prepare_pair(image_path: Path, label_path: Path, where: str, intensity, spacing,
                 spatial_dims: int = 3) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read, check and preprocess one (image, label) pair: (float16 image in [0, 1], uint8 label, summary)."""
    try:
        image = read_volume(image_path)
        label = read_volume(label_path)
        values = label_array(label, image, label_path, image_path)
    except MedSSLError as exc:
        raise MedSSLError(f"{where}: {exc}") from None
    check_dimensions(image.shape, spatial_dims, where, image_path)
    if spacing is not None:  # a one-slice image is resampled in the plane only (resample_to_spacing)
        values = _resample_label(label, values, spacing)
        image = resample_to_spacing(image, spacing)
    array, modality = normalize_intensity(image, intensity)
    info = {"shape": list(image.shape), "spacing_mm": [round(float(s), 4) for s in image.spacing],
            "modality": modality, "values": present_values(values),
            "annotated_fraction": round(float(np.count_nonzero(values != IGNORE)) / max(1, values.size), 5)}
    return array.astype(np.float16), values, info


def load_cached_case(cache_dir: Path, key: str) -> LabelledCase | None:
    """The memory-mapped case of a finished cache entry, or None when absent, incomplete or of another format."""
    meta = cache_dir / f"{key}.json"
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("format") != CACHE_FORMAT:
            return None
        image = np.load(cache_dir / f"{key}.image.npy", mmap_mode="r")
        label = np.load(cache_dir / f"{key}.label.npy", mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if image.shape != label.shape or list(image.shape) != info.get("shape"):
        return None
    return LabelledCase(image, label, info)


def make_cached_case(pair: dict, key: str, where: str, intensity, spacing, spatial_dims: int,
                     cache_dir: Path) -> LabelledCase:
    """Prepare ``pair`` ({"image", "label"} paths) with :func:`prepare_pair`, write ``<key>.image.npy``,
    ``<key>.label.npy`` and ``<key>.json`` atomically, and return the case memory-mapped from them."""
    image, label, info = prepare_pair(pair["image"], pair["label"], where, intensity, spacing, spatial_dims)
    info = {"format": CACHE_FORMAT, "id": key[:12], **info}
    try:
        atomic_write(cache_dir / f"{key}.image.npy", lambda fh: np.save(fh, image, allow_pickle=False))
        atomic_write(cache_dir / f"{key}.label.npy", lambda fh: np.save(fh, label, allow_pickle=False))
        text = json.dumps(info).encode("utf-8")
        atomic_write(cache_dir / f"{key}.json", lambda fh: fh.write(text))
    except OSError as exc:
        raise MedSSLError(f"{cache_dir}: cannot write the cache ({exc.strerror})") from None
    case = load_cached_case(cache_dir, key)
    if case is None:
        raise MedSSLError(f"{cache_dir}: the cache entry just written cannot be read back")
    return case
