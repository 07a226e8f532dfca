"""Writing files so that a reader never sees half of one: a temporary name in the same folder, then a rename.

A crash (even SIGKILL) leaves either the old file or the new one, plus at most a ``.tmp-*`` file that
nothing reads.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


@contextmanager
def atomic_path(path, prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is deleted.

    For writers that want a file name (SimpleITK, ``np.savez``); the temporary keeps ``path``'s suffix.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path, write: Callable[[BinaryIO], object], prefix: str = ".tmp-") -> None:
    """Call ``write(handle)`` on a binary file opened at a temporary path, then rename it to ``path``."""
    with atomic_path(path, prefix) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))
