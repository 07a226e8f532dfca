"""The bytes that make up a volume source, fed to a hash: the content keys of the cube and labelled caches.

A source is a volume file (with the data file a .mhd / .nhdr header names) or a DICOM folder (its files
sorted by name). File names and locations are not hashed, so a copied or renamed volume keeps its key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_CHUNK = 1 << 20


def update_hash_with_file(h, path: Path) -> None:
    """Feed ``h`` (a hashlib object) the file's size, then its bytes streamed in 1 MiB chunks."""
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
