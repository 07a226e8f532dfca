"""Small helpers shared by the test files (importable because pytest puts this folder on sys.path)."""

from pathlib import Path

import torch

from MedSSL.models.unet3d import UNet3D


def official_checkpoint(path: Path, width: int = 32, seed: int = 0) -> dict:
    """Write a file laid out like Genesis_Chest_CT.pt (epoch, state_dict with 'module.' keys,
    optimizer_state_dict); returns the state dict written."""
    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in UNet3D(width=width).state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}, path)
    return state
