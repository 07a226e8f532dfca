"""Resumable training checkpoints: written atomically, read without unpickling code.

A checkpoint is ``<out>/checkpoint.pt``: a dict of tensors, numbers, strings and lists (model and
optimiser state, step, generator states, history) saved by ``torch.save`` to a temporary name and
renamed, and loaded with ``torch.load(weights_only=True)``: a file carrying other objects is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from MedSSL.errors import MedSSLError
from MedSSL.io.atomic import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(out_dir: Path, payload: dict) -> Path:
    """Atomically write ``payload`` to ``<out_dir>/checkpoint.pt``."""
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_FILE
    atomic_write(path, lambda handle: torch.save(payload, handle), prefix=".tmp-checkpoint-")
    return path


def load_checkpoint(out_dir: Path) -> dict | None:
    """The checkpoint in ``out_dir``, or None when there is none."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MedSSLError(f"{path}: refused: the checkpoint holds pickled objects other than tensors") from None
    except Exception:  # torch's unpickler fails in many ways on a damaged file (IndexError, KeyError, ...)
        raise MedSSLError(f"{path}: the checkpoint is damaged; delete it to start again") from None
