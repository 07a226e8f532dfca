"""NIfTI-1 completeness check: refuse a file whose voxel data is shorter than its header says."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError


def check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header says (ITK would read it).

    Reads the 348-byte NIfTI-1 header (dim, bitpix, vox_offset) and counts the (decompressed) bytes in a
    streaming pass; NIfTI-2 and unusual headers are left to ITK.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
            if len(header) < 348:
                raise MedSSLError(f"{os.fspath(path)}: truncated NIfTI file (incomplete header)")
            expected = _expected_size(header)
            if expected is None:
                return
            size = 348
            while size < expected:
                chunk = handle.read(min(1 << 22, expected - size))
                if not chunk:
                    break
                size += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise MedSSLError(f"{os.fspath(path)}: damaged or truncated NIfTI file") from None
    if size < expected:
        raise MedSSLError(f"{os.fspath(path)}: truncated NIfTI file ({size} of {expected} bytes of data)")


def _expected_size(header: bytes) -> int | None:
    """Bytes of header plus voxel data that a NIfTI-1 ``header`` announces; None when it is not NIfTI-1 or
    unusual (left to ITK)."""
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", header[:4])[0] != 348:
        return None
    dims = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    return vox_offset + int(np.prod([max(1, d) for d in dims[1:ndim + 1]], dtype=np.int64)) * bitpix // 8
