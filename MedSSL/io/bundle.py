"""Model bundles: the unit users share. A directory with ``weights.safetensors`` and ``model.json``.

``model.json`` (format ``medssl-bundle``, version 1) holds::

    {"format": "medssl-bundle", "format_version": 1,
     "architecture": {"name": "unet3d", "width": 32, "in_channels": 1, "out_channels": 1},
     "method": {"name": "genesis", ...settings},
     "task": "pretrain" | "segment" | "classify" | ...,
     "classes": {"1": {"name": "spleen", "color": [r, g, b]}, ...}     (segment/classify only)
     "preprocessing": {"modality": "CT", "intensity": {...}, "target_spacing_mm": null},
     "patch_size": [64, 64, 32],
     "history": [{"step": ..., "loss": ..., "val_loss": ...}, ...],
     "data_summary": {"volumes": N, "shapes": [...], "spacings_mm": [...]},   (no paths, no identifiers)
     "versions": {"medssl": ..., "torch": ..., "monai": ...}, "world_size": 1}

Loading reads JSON and safetensors only: nothing is unpickled. Official Models Genesis ``.pt`` files load
through :func:`load_initial_weights` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from MedSSL import __version__
from MedSSL.errors import MedSSLError

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"
BUNDLE_FORMAT = "medssl-bundle"
BUNDLE_VERSION = 1


def versions() -> dict:
    """Versions of the libraries that shape a bundle's contents."""
    out = {"medssl": __version__, "torch": torch.__version__}
    try:
        import monai

        out["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    return out


def save_bundle(out_dir, state_dict: dict, meta: dict) -> Path:
    """Write a bundle directory atomically: both files are staged in a temporary sibling folder
    which then replaces ``out_dir`` (an existing bundle there is replaced whole, other files in
    ``out_dir`` such as checkpoints are kept).

    state_dict: name -> tensor (contiguous copies are saved). meta: the model.json content without the
    format fields, which are added here.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedSSLError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise MedSSLError(f"{out_dir}: the output folder is not writable")
    meta = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **meta}
    meta.setdefault("versions", versions())
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False), encoding="utf-8")
        # weights first, model.json last: a bundle is complete once model.json names it
        os.replace(staging / WEIGHTS_FILE, out_dir / WEIGHTS_FILE)
        os.replace(staging / META_FILE, out_dir / META_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_meta(bundle_dir) -> dict:
    """model.json of a bundle, checked for the format fields. Raises MedSSLError naming the folder."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise MedSSLError(f"{bundle_dir}: not a model bundle folder")
    meta_path = bundle_dir / META_FILE
    if not meta_path.is_file():
        raise MedSSLError(f"{bundle_dir}: not a model bundle (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise MedSSLError(f"{meta_path}: broken model.json ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise MedSSLError(f"{meta_path}: not a MedSSL model.json (format field missing or wrong)")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        raise MedSSLError(f"{meta_path}: model.json has an unreadable format_version") from None
    if version > BUNDLE_VERSION:
        raise MedSSLError(f"{meta_path}: bundle format version {meta['format_version']} is newer than this MedSSL reads")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise MedSSLError(f"{meta_path}: model.json has no architecture")
    return meta


def load_bundle(bundle_dir) -> tuple[dict, dict]:
    """(meta, state_dict) of a bundle. Only JSON and safetensors are read."""
    bundle_dir = Path(bundle_dir)
    meta = read_meta(bundle_dir)
    weights = bundle_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise MedSSLError(f"{bundle_dir}: bundle has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError, OSError, ValueError, or anything else a damaged file causes
        raise MedSSLError(f"{weights}: unreadable weights ({type(exc).__name__}: {str(exc)[:100]})") from None
    return meta, state


def is_bundle(path) -> bool:
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()
