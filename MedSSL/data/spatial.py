"""Dimensionality, decided once: whether an image is a one-slice (2D) image, which patches a network
of 2 or 3 spatial dimensions takes, and the spatial spec that the entry points derive from the data and
pass down.

A one-slice image is stored as (X, Y, 1) (a radiograph, one DICOM frame); networks for it are 2D and
take (N, C, X, Y). Patches are always written (X, Y, Z) in voxels, with Z = 1 for 2D. The Models Genesis
U-Net pools three times, so every patch side of a network input is a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import read_size


@dataclass(frozen=True)
class SpatialSpec:
    """What a run's data decided: ``dims`` 2 or 3, ``patch`` (X, Y, Z) voxels (Z = 1 when 2D) and the
    target ``spacing_mm`` (X, Y, Z) or None to keep each image's grid."""

    dims: int
    patch: tuple
    spacing_mm: tuple | None = None

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {self.dims}")
        if self.dims == 2 and self.patch[2] != 1:
            raise ValueError(f"a 2D spec has Z = 1 in its patch, got {self.patch}")

    @property
    def network_patch(self) -> tuple:
        """The network input's spatial shape: (X, Y) for 2D, (X, Y, Z) for 3D."""
        return tuple(self.patch[: self.dims])


def is_one_slice(shape) -> bool:
    """True for a one-slice image: shape (X, Y) or (X, Y, 1)."""
    return len(shape) == 2 or int(shape[2]) == 1


def is_one_slice_file(source) -> bool:
    """:func:`is_one_slice` from a file's header alone; DICOM folders and unreadable files count as 3D
    here (reading them later gives the real answer)."""
    size = read_size(source)
    return size is not None and is_one_slice(size)


def image_dims(shape, path, first=None) -> int:
    """2 for a one-slice image (X, Y, 1), 3 for a volume. MedSSLError naming ``path`` for an image thin
    along X or Y (a single slice along another axis), or when it differs from ``first`` = (dims, path)
    of the first image (one-slice images and 3D volumes are not trained together)."""
    text = "x".join(map(str, shape))
    if min(shape[:2]) < 2:
        raise MedSSLError(f"{path}: a single-slice image ({text}) along X or Y; fine-tuning takes 3D volumes or "
                          "one-slice images of shape X x Y x 1")
    dims = 2 if is_one_slice(shape) else 3
    if first is not None and dims != first[0]:
        kind = "a one-slice (2D) image" if dims == 2 else "a 3D volume"
        other = "one-slice (2D) image" if first[0] == 2 else "3D volume"
        raise MedSSLError(f"{path}: {kind} ({text}) among {other}s (first: {first[1]}); fine-tune one-slice images "
                          "and 3D volumes separately")
    return dims


def _multiple_of_8(size: int) -> bool:
    return size >= 8 and size % 8 == 0


def validate_patch(patch, dims: int | None = None, what: str = "--patch", log=None) -> tuple:
    """The one patch (or window) validator: returns (X, Y, Z) voxels.

    ``dims`` 3: three multiples of 8. ``dims`` 2: ``X Y`` or ``X Y Z`` with X, Y multiples of 8; Z is
    set to 1 (a Z other than 1 is noted through ``log``). ``dims`` None (the data are not read yet): X, Y
    multiples of 8 and Z either 1 or a multiple of 8. MedSSLError naming ``what`` otherwise.
    """
    try:
        patch = tuple(int(p) for p in patch)
    except (TypeError, ValueError):
        raise MedSSLError(f"{what} {patch!r}: expected sizes in voxels") from None
    text = " ".join(map(str, patch))
    if dims is None:
        if len(patch) != 3 or not all(map(_multiple_of_8, patch[:2])) or not (patch[2] == 1 or _multiple_of_8(patch[2])):
            raise MedSSLError(f"{what} {text}: each size must be a multiple of 8 (the network pools 3 times)")
        return patch
    if dims == 2:
        if len(patch) not in (2, 3) or not all(map(_multiple_of_8, patch[:2])) or (len(patch) == 3 and patch[2] < 1):
            raise MedSSLError(f"{what} {text}: one-slice (2D) images take X Y or X Y 1, X and Y multiples of 8 "
                              "(the network pools 3 times)")
        if len(patch) == 3 and patch[2] != 1 and log is not None:
            log(f"one-slice images: 2D patches of {patch[0]}x{patch[1]} (Z {patch[2]} ignored)")
        return patch[0], patch[1], 1
    if len(patch) == 3 and patch[2] == 1:
        raise MedSSLError(f"{what} {text}: Z = 1 is for one-slice (2D) images; 3D volumes need Z a multiple of 8")
    if len(patch) != 3:
        raise MedSSLError(f"{what} {text}: 3D volumes take three sizes X Y Z (multiples of 8)")
    if not all(map(_multiple_of_8, patch)):
        raise MedSSLError(f"{what} {text}: each size must be a multiple of 8 (the network pools 3 times)")
    return patch


def sampling_size(patch, what: str = "patch") -> tuple:
    """A cube size for sampling, not yet for a network: three whole numbers >= 1 (voxels)."""
    try:
        patch = tuple(int(p) for p in patch)
    except (TypeError, ValueError):
        raise MedSSLError(f"{what} {patch!r}: expected three sizes in voxels") from None
    if len(patch) != 3 or min(patch) < 1:
        raise MedSSLError(f"{what} {list(patch)}: expected three sizes >= 1 (voxels)")
    return patch

