"""Intensity normalisation, resampling and body masks for pretraining and fine-tuning.

All arrays are indexed (X, Y, Z) like :class:`MedSSL.io.volumes.Volume`.

* CT: clip the HU to a window (Models Genesis default [-1000, 1000]) and scale it to [0, 1].
* MR: scale robust percentiles (default 0.5 and 99.5, over the non-zero voxels) to [0, 1] and clip.
* :func:`detect_modality` decides between the two when the configuration says ``"auto"``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from MedSSL.data.spatial import is_one_slice
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import Volume, from_sitk, to_sitk

MODALITIES = ("auto", "CT", "MR")

# detect_modality thresholds (see its docstring)
_CT_AIR_HU = -500.0
_CT_MIN_AIR_FRACTION = 0.01
_CT_LOWEST_HU = -4096.0
_SAMPLE = 2_000_000


@dataclass
class IntensityConfig:
    """How voxel values become [0, 1].

    modality: "auto" (see :func:`detect_modality`), "CT" or "MR".
    ct_window: HU (low, high) clipped and scaled to [0, 1].
    mr_percentiles: (low, high) percentiles of the non-zero voxels scaled to [0, 1].
    """

    modality: str = "auto"
    ct_window: tuple = (-1000.0, 1000.0)
    mr_percentiles: tuple = (0.5, 99.5)

    def __post_init__(self):
        self.modality = _check_modality(self.modality)
        self.ct_window = _pair(self.ct_window, "ct_window")
        self.mr_percentiles = _pair(self.mr_percentiles, "mr_percentiles")
        if not self.ct_window[0] < self.ct_window[1]:
            raise MedSSLError(f"ct_window {list(self.ct_window)}: the low end must be below the high end")
        lo, hi = self.mr_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise MedSSLError(f"mr_percentiles {list(self.mr_percentiles)}: expected 0 <= low < high <= 100")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ct_window"] = list(self.ct_window)
        d["mr_percentiles"] = list(self.mr_percentiles)
        return d

    @classmethod
    def from_dict(cls, data: dict | None) -> "IntensityConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - {"modality", "ct_window", "mr_percentiles"})
        if unknown:
            raise MedSSLError(f"intensity settings: unknown key(s) {', '.join(unknown)}")
        return cls(**data)


def _check_modality(value) -> str:
    if value is None:
        return "auto"
    text = str(value).strip()
    for m in MODALITIES:
        if text.upper() == m.upper():
            return m
    raise MedSSLError(f"modality {value!r}: expected one of {', '.join(MODALITIES)}")


def _pair(value, name) -> tuple:
    try:
        a, b = (float(x) for x in value)
    except (TypeError, ValueError):
        raise MedSSLError(f"{name} {value!r}: expected two numbers") from None
    if not (np.isfinite(a) and np.isfinite(b)):
        raise MedSSLError(f"{name} {value!r}: expected finite numbers")
    return (a, b)


def _sample(array: np.ndarray) -> np.ndarray:
    """A deterministic, evenly strided sample of at most ~2 M voxels (a view when possible)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    return flat[::step]


def detect_modality(volume: Volume) -> str:
    """"CT" or "MR" for ``volume``.

    Rule: the Volume's ``modality`` (set from the DICOM Modality tag) wins when it is "CT" or "MR".
    Otherwise the intensities decide (on an evenly strided sample of at most 2 M voxels): it is CT when
    the values look like Hounsfield units, i.e. all of

    * the minimum is <= -500 and >= -4096 (air is -1000; scanners pad with -1024, -2048 or -3024),
    * at least 1 % of the voxels are <= -500 (air outside the body or in the lungs/bowel),
    * the values are integer-like (integer dtype, or floats holding whole numbers) or, for resampled
      float data, at least 0.5 % of the voxels lie in the air band [-1100, -900].

    Everything else is MR (including CT stored without its rescale, e.g. 0..4095: set the modality
    explicitly for such data, or for CT crops that hold no air).
    """
    if volume.modality in ("CT", "MR"):
        return volume.modality
    sample = _sample(volume.array)
    if sample.size == 0:
        return "MR"
    lowest = float(sample.min())
    if not (_CT_LOWEST_HU <= lowest <= _CT_AIR_HU):
        return "MR"
    if np.count_nonzero(sample <= _CT_AIR_HU) < _CT_MIN_AIR_FRACTION * sample.size:
        return "MR"
    if sample.dtype.kind in "iu":
        return "CT"
    integer_like = bool(np.all(np.abs(sample - np.rint(sample)) < 1e-3))
    if integer_like:
        return "CT"
    air_band = np.count_nonzero((sample >= -1100.0) & (sample <= -900.0))
    return "CT" if air_band >= 0.005 * sample.size else "MR"


def resolve_modality(volume: Volume, config: IntensityConfig) -> str:
    """The modality the configuration asks for, or the detected one for "auto"."""
    return detect_modality(volume) if config.modality == "auto" else config.modality


def normalize_intensity(volume: Volume, config: IntensityConfig | None = None) -> tuple[np.ndarray, str]:
    """Voxel values -> float32 (X, Y, Z) in [0, 1]; returns ``(array01, modality_used)``.

    CT: clip to ``config.ct_window`` then scale linearly (Models Genesis: [-1000, 1000] -> [0, 1]).
    MR: the ``config.mr_percentiles`` of the non-zero voxels (all voxels if every voxel is zero) are
    mapped to 0 and 1, then clipped. A constant image gives all zeros.
    """
    config = config or IntensityConfig()
    modality = resolve_modality(volume, config)
    data = np.asarray(volume.array, dtype=np.float32)
    if modality == "CT":
        lo, hi = config.ct_window
    else:
        lo, hi = _mr_range(data, config.mr_percentiles)
    if not hi > lo:
        return np.zeros(data.shape, dtype=np.float32), modality
    out = data - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out, modality


def _mr_range(data: np.ndarray, percentiles) -> tuple[float, float]:
    sample = _sample(data)
    nonzero = sample[sample != 0]
    values = nonzero if nonzero.size else sample
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi)


def resample_to_spacing(volume: Volume, spacing_mm, nearest: bool = False) -> Volume:
    """Resample ``volume`` to ``spacing_mm`` (one number or three, mm) keeping origin and direction.

    The new size is ``round(size * old_spacing / new_spacing)`` (at least 1) so the physical extent is
    preserved. A one-slice image (X, Y, 1), e.g. a radiograph, is resampled in-plane only: its slice
    keeps its thickness, so resampling never adds slices extrapolated from nothing or drops the one. Linear interpolation gives float32 (outside the old grid: the image minimum); ``nearest``
    keeps the dtype (outside: 0), for label maps. ``None`` returns ``volume`` unchanged.
    """
    if spacing_mm is None:
        return volume
    new = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if new.size == 1:
        new = np.repeat(new, 3)
    if new.size != 3 or not np.all(np.isfinite(new)) or not np.all(new > 0):
        raise MedSSLError(f"target spacing {np.asarray(spacing_mm).tolist()}: expected one or three positive numbers (mm)")
    old = np.asarray(volume.spacing, dtype=np.float64)
    if is_one_slice(volume.shape):
        new[2] = old[2]
    if np.allclose(new, old, rtol=1e-6, atol=1e-9):
        return volume
    size = np.maximum(1, np.rint(np.asarray(volume.shape) * old / new)).astype(int)
    image = to_sitk(volume)
    if nearest:
        interpolator, default, pixel = sitk.sitkNearestNeighbor, 0.0, image.GetPixelID()
    else:
        interpolator, default, pixel = sitk.sitkLinear, float(np.min(volume.array)), sitk.sitkFloat32
    out = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        interpolator,
        [float(o) for o in volume.origin],
        [float(s) for s in new],
        [float(d) for d in np.asarray(volume.direction).reshape(-1)],
        default,
        pixel,
    )
    result = from_sitk(out, volume.modality)
    result.meta = dict(volume.meta)
    return result


def ct_body_threshold(ct_window=(-1000.0, 1000.0), hu: float = -500.0) -> float:
    """``hu`` expressed in the [0, 1] units of :func:`normalize_intensity` for ``ct_window``.

    When the window starts above ``hu`` the threshold is just above 0 (everything above the window's
    low end counts as body).
    """
    lo, hi = (float(x) for x in ct_window)
    return max((hu - lo) / (hi - lo), 1e-6)


def body_mask(array01: np.ndarray, modality: str, ct_window=(-1000.0, 1000.0), mr_threshold: float = 0.05) -> np.ndarray:
    """Boolean (X, Y, Z) mask of the inside of the body for a normalised [0, 1] array.

    CT: voxels above -500 HU (in the units given by ``ct_window``); holes filled slice by slice (XY
    planes, so the lungs and the bowel gas count as inside); then the largest 3D connected component
    (drops the table, clothing and noise).
    MR: voxels above ``mr_threshold`` (5 % of the robust 0.5-99.5 percentile range above the low
    percentile), holes filled slice by slice; all components are kept.
    """
    a = np.asarray(array01)
    if a.ndim != 3:
        raise MedSSLError(f"body mask: expected a 3D array, got shape {a.shape}")
    modality = _check_modality(modality)
    if modality == "CT":
        fg = a > np.float32(ct_body_threshold(ct_window))
    else:
        fg = a > np.float32(mr_threshold)
    mask = fill_holes_per_slice(fg)
    if modality == "CT":
        mask = largest_component(mask)
    return mask


_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[:, 1, 1] = _PLANE[1, :, 1] = True  # 4-connectivity within an XY plane, no link across Z


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every XY plane of a boolean (X, Y, Z) mask (all planes at once).

    A background region is a hole when it does not touch the X or Y border of its plane.
    """
    mask = np.asarray(mask, dtype=bool)
    background, n = ndimage.label(~mask, structure=_PLANE)
    if n == 0:
        return mask.copy()
    border = np.zeros(n + 1, dtype=bool)
    for face in (background[0], background[-1], background[:, 0], background[:, -1]):
        border[np.unique(face)] = True
    border[0] = True  # label 0 is the foreground itself
    return mask | ~border[background]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (all False when the mask is empty)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    counts = np.bincount(labels.reshape(-1), minlength=n + 1)
    counts[0] = 0
    return labels == int(np.argmax(counts))
