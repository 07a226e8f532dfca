"""JSON files: read with one-line errors, written atomically with NaN/inf as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_write


def read_json(path):
    """The parsed content of the JSON file ``path``; MedSSLError naming it when it is missing, unreadable,
    not UTF-8 or not valid JSON."""
    p = Path(path)
    if not p.is_file():
        raise MedSSLError(f"{path}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MedSSLError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise MedSSLError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise MedSSLError(f"{path}: not valid JSON ({exc.msg})") from None


def clean_for_json(value):
    """A copy of ``value`` with numpy scalars as Python numbers and NaN/inf floats as None."""
    if isinstance(value, dict):
        return {str(k): clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_for_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def to_json(result: dict) -> str:
    return json.dumps(clean_for_json(result), indent=2, allow_nan=False) + "\n"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, creating the
    folder; MedSSLError naming ``path`` on failure (nothing is left behind)."""
    p = Path(path)
    try:
        (p.parent if str(p.parent) else Path(".")).mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda handle: handle.write(data))
    except OSError as exc:
        raise MedSSLError(f"{path}: cannot write ({exc.strerror})") from None


def write_json(path, result: dict) -> None:
    """``result`` as indented JSON (NaN/inf -> null), written atomically."""
    atomic_write_bytes(path, to_json(result).encode("utf-8"))
