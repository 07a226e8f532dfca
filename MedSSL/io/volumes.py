"""Reading and writing 3D volumes with their geometry (SimpleITK underneath).

Conventions used everywhere in MedSSL:

* ``Volume.array`` is indexed ``[i, j, k]`` = ITK index (x, y, z): SimpleITK's ``(z, y, x)`` array
  transposed. The slice axis is last, as in the Models Genesis cubes (64 x 64 x 32).
* ``spacing`` is in mm per index step along (i, j, k); ``origin`` is the physical position of voxel
  (0, 0, 0) in mm, LPS (ITK's patient coordinates); ``direction`` is a 3x3 matrix whose *columns* are the
  LPS unit vectors of the i, j, k axes (ITK's convention). Physical point of index ``v``:
  ``origin + direction @ (spacing * v)``.

Supported inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM series
folders (one series per folder). A path given to :func:`find_volumes` may be a file, a folder of such
files (searched recursively) or a DICOM folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_path
from MedSSL.io.dicom import dicom_series, modality_from_metadata, read_dicom_series
from MedSSL.io.nifti import check_nifti_complete

sitk.ProcessObject_SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class Volume:
    """A 3D image and where it lies in space.

    array: (X, Y, Z) voxel values (any numeric dtype).
    spacing: (3,) mm. origin: (3,) mm, LPS. direction: (3, 3), columns are the axis directions in LPS.
    modality: "CT", "MR" or None when unknown (taken from DICOM tags when present).
    """

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    modality: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding ``array`` (same (X, Y, Z) shape)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), self.modality)

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) continuous voxel indices (i, j, k) -> (N, 3) LPS points in mm."""
        index = np.atleast_2d(np.asarray(index, dtype=np.float64))
        return self.origin + (index * self.spacing) @ self.direction.T

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes have the same shape, spacing, origin and direction."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol, rtol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10, rtol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def geometry_summary(self) -> dict:
        """Shape and spacing only: safe to record in bundles (no identifiers, no positions)."""
        return {"shape": list(self.shape), "spacing_mm": [round(float(s), 4) for s in self.spacing]}


def from_sitk(image: sitk.Image, modality: str | None = None) -> Volume:
    """SimpleITK image (3D, scalar) -> Volume."""
    if image.GetDimension() != 3:
        raise MedSSLError(f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSSLError(
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return Volume(
        array=np.ascontiguousarray(array),
        spacing=np.array(image.GetSpacing(), dtype=np.float64),
        origin=np.array(image.GetOrigin(), dtype=np.float64),
        direction=np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        modality=modality,
    )


def to_sitk(volume: Volume) -> sitk.Image:
    """Volume -> SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in volume.spacing])
    image.SetOrigin([float(o) for o in volume.origin])
    image.SetDirection([float(d) for d in volume.direction.reshape(-1)])
    return image


def _display(path) -> str:
    return os.fspath(path)


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in VOLUME_SUFFIXES)


def read_volume(path) -> Volume:
    """Read a volume file or a DICOM series folder.

    Raises MedSSLError (naming ``path``) when it is missing, unreadable, not 3D, not scalar, or holds
    non-finite values. 2D images are read as one-slice volumes (Z = 1).
    """
    p = Path(path)
    if not p.exists():
        raise MedSSLError(f"{_display(path)}: no such file or folder")
    if p.is_dir():
        image, modality = read_dicom_series(p)
        return _checked_volume(image, p, modality)
    if p.stat().st_size == 0:
        raise MedSSLError(f"{_display(path)}: the file is empty")
    if not _is_volume_file(p) and p.suffix.lower() != ".dcm":
        raise MedSSLError(
            f"{_display(path)}: not a supported volume file (expected {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)"
        )
    if p.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_complete(p)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        hint = next((line for line in reason if "Exception" not in line and line.strip()), "")
        raise MedSSLError(f"{_display(path)}: cannot be read as an image ({hint[:120] or 'unreadable'})") from None
    return _checked_volume(image, path)


def _checked_volume(image: sitk.Image, path, modality: str | None = None) -> Volume:
    """``image`` as a Volume (2D as one slice, a one-time-point 4D as 3D); MedSSLError naming ``path`` when it
    is not a scalar 3D image with finite values."""
    dim = image.GetDimension()
    if dim == 2:
        image = sitk.JoinSeries(image)
    elif dim == 4:
        size = image.GetSize()
        if size[3] == 1:
            image = image[:, :, :, 0]
        else:
            raise MedSSLError(f"{_display(path)}: a 4D image ({size[3]} time points or channels); give one 3D volume")
    elif dim != 3:
        raise MedSSLError(f"{_display(path)}: a {dim}D image; expected 3D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSSLError(
            f"{_display(path)}: {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector); expected a scalar image"
        )
    if modality is None:
        modality = modality_from_metadata(image)
    volume = from_sitk(image, modality)
    if volume.array.dtype.kind == "f" and not np.isfinite(volume.array).all():
        raise MedSSLError(f"{_display(path)}: contains NaN or infinite voxel values")
    if min(volume.shape) < 1 or volume.array.size == 0:
        raise MedSSLError(f"{_display(path)}: the image is empty")
    return volume


def read_size(source) -> tuple | None:
    """The voxel size (X, Y[, Z]) from a file's header, without reading the voxels; None for DICOM folders
    and unreadable files."""
    p = Path(source)
    if p.is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return tuple(int(s) for s in reader.GetSize())


def find_volumes(paths) -> list[Path]:
    """Expand files and folders into volume sources (files or DICOM series folders), sorted.

    A folder is a DICOM source when it directly holds a DICOM series; otherwise it is searched
    recursively for volume files and DICOM folders. Raises MedSSLError naming a path that does not exist
    or that holds nothing readable.
    """
    found: list[Path] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise MedSSLError(f"{_display(path)}: no such file or folder")
        if p.is_file():
            found.append(p)
            continue
        before = len(found)
        for folder, dirs, files in os.walk(p):
            dirs.sort()
            here = Path(folder)
            volume_files = [here / f for f in sorted(files) if _is_volume_file(here / f)]
            found.extend(volume_files)
            others = [f for f in files if not _is_volume_file(here / f)]
            if others and dicom_series(here):
                found.append(here)
        if len(found) == before:
            raise MedSSLError(f"{_display(path)}: no volumes found (looked for {', '.join(VOLUME_SUFFIXES)} and DICOM series)")
    return found


def write_volume(volume: Volume, path, compress: bool = True) -> None:
    """Write ``volume`` to ``path`` atomically (temporary name in the same folder, then rename)."""
    p = Path(path)
    name = p.name.lower()
    suffix = next((s for s in WRITE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise MedSSLError(f"{_display(path)}: output must end with one of {', '.join(WRITE_SUFFIXES)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedSSLError(f"{_display(parent)}: cannot create the output folder ({exc.strerror})") from None
    try:
        with atomic_path(p) as tmp:
            sitk.WriteImage(to_sitk(volume), tmp, compress)
    except (RuntimeError, OSError) as exc:
        raise MedSSLError(f"{_display(path)}: cannot write ({str(exc).strip().splitlines()[-1][:120]})") from None


def resample_to_grid(volume: Volume, reference: Volume, nearest: bool = True, default=0) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid by physical position (SimpleITK)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(to_sitk(volume), to_sitk(reference), sitk.Transform(), interpolator, default)
    result = from_sitk(out, volume.modality)
    result.array = result.array.astype(volume.array.dtype, copy=False)
    return result
