"""Initial weights for pretraining or fine-tuning: a MedSSL bundle or an official Models Genesis ``.pt``.

Official files (``Genesis_Chest_CT.pt``) are dicts with ``state_dict`` whose keys carry a ``module.``
prefix; they load with ``torch.load(weights_only=True)``, so a file carrying pickled code objects is
refused before anything in it runs. Semantic Genesis / TransVW releases may also nest the encoder under
``classficationNet.`` (sic) and carry extra heads; those prefixes are stripped and unknown keys ignored.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from MedSSL.io.bundle import BundleMeta, is_bundle, open_bundle
from MedSSL.errors import MedSSLError
from MedSSL.models.genesis_unet import (FIRST_KERNEL, in_channels_from_state_dict, spatial_dims_from_state_dict,
                                        width_from_state_dict)

_PREFIXES = ("module.", "classficationNet.", "backbone.", "encoder_q.")


@dataclass
class InitialWeights:
    """GenesisUNet weights to start from.

    state_dict: GenesisUNet key -> tensor (prefixes stripped). width: base channels. source: "bundle" or
    "official-pt". bundle: the bundle's model.json (None for .pt files). spatial_dims: 3, or 2 for a
    network of 2D kernels (pretrained or fine-tuned on one-slice images), read from the kernels.
    """

    state_dict: dict
    width: int
    source: str
    bundle: BundleMeta | None
    spatial_dims: int = 3

    def describe(self) -> dict:
        """What to record in a bundle about the initialisation (no paths)."""
        info = {"source": self.source, "width": self.width}
        if self.spatial_dims != 3:
            info["spatial_dims"] = self.spatial_dims
        if self.bundle is not None:
            info["method"] = self.bundle.method_name
            info["task"] = self.bundle.task or None
        return info


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def load_official_checkpoint(path) -> dict:
    """State dict (prefixes stripped) of a Models Genesis-style ``.pt``; never unpickles code."""
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MedSSLError(
            f"{path}: refused: the checkpoint holds pickled objects other than tensors (it could run code); "
            "re-save it as plain tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError):
        raise MedSSLError(f"{path}: not a PyTorch checkpoint") from None
    except Exception as exc:  # torch's unpickler fails in many ways on a file that is not a checkpoint
        raise MedSSLError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__} while reading it)") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise MedSSLError(f"{path}: the checkpoint holds no state_dict")
    return {_strip(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_initial_weights(path) -> InitialWeights:
    """Load a bundle folder or an official ``.pt``/``.pth`` file. Raises MedSSLError naming ``path``."""
    p = Path(path)
    if not p.exists():
        raise MedSSLError(f"{path}: no such model file or bundle")
    if p.is_dir():
        if not is_bundle(p):
            raise MedSSLError(f"{path}: not a model bundle (no model.json)")
        meta, state = open_bundle(p)
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")} or state
        source = "bundle"
    else:
        if p.stat().st_size == 0:
            raise MedSSLError(f"{path}: the model file is empty")
        meta, state, source = None, load_official_checkpoint(p), "official-pt"
    try:
        width = width_from_state_dict(state)
    except KeyError:
        raise MedSSLError(f"{path}: not a Models Genesis GenesisUNet (no {FIRST_KERNEL})") from None
    spatial_dims = spatial_dims_from_state_dict(state)
    if spatial_dims not in (2, 3):
        raise MedSSLError(f"{path}: not a Models Genesis GenesisUNet (its first kernel has {spatial_dims} spatial dimensions)")
    return InitialWeights(state, width, source, meta, spatial_dims)


def check_initial_dims(init: InitialWeights, spatial_dims: int, what: str, images: str = "the images") -> None:
    """Refuse weights of another dimensionality than the network: MedSSLError naming ``what``.

    There is no transfer between 3D and 2D kernels here (summing or slicing kernels would be a method
    of its own, untested): a 3D model initialises 3D networks, a 2D one (from one-slice images) 2D ones.
    """
    if init.spatial_dims == spatial_dims:
        return
    have = "a 2D model (from one-slice images)" if init.spatial_dims == 2 else "a 3D model"
    need = "one-slice images" if spatial_dims == 2 else "3D volumes"
    raise MedSSLError(f"{what}: {have} cannot initialise the {spatial_dims}D network for {images} ({need}); "
                      f"give a {spatial_dims}D model or none (--init none)")


def apply_initial_weights(model: nn.Module, init: InitialWeights, what: str = "model") -> dict:
    """Copy every tensor of ``init`` whose key and shape match ``model``'s GenesisUNet.

    The encoder must match completely (else MedSSLError: wrong width, input channels, or 2D weights
    for a 3D network and vice versa, see :func:`check_initial_dims`); decoder and
    output layers that differ (e.g. 1 restoration channel vs N classes) are left as initialised.
    Returns {"loaded": n, "skipped": [keys]}.
    """
    if isinstance(getattr(model, "spatial_dims", None), int):
        check_initial_dims(init, model.spatial_dims, what)
    target = model.state_dict()
    loaded, skipped = {}, []
    for key, value in init.state_dict.items():
        if key in target and tuple(target[key].shape) == tuple(value.shape):
            loaded[key] = value.to(target[key].dtype)
        elif key in target:
            skipped.append(key)
    encoder_keys = [k for k in target if k.startswith("down_tr")]
    missing = [k for k in encoder_keys if k not in loaded]
    if missing:
        raise MedSSLError(
            f"{what}: initial weights do not fit this network ({len(missing)} encoder tensors differ, e.g. "
            f"{missing[0]}; the weights have width {init.width}, the network {getattr(model, 'width', '?')})"
        )
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": skipped}


def input_channels(init: InitialWeights) -> int:
    """The input channels of the initial weights' network (1 = the image only)."""
    return in_channels_from_state_dict(init.state_dict)


def with_input_channels(init: InitialWeights, channels: int) -> InitialWeights:
    """``init`` for a network of ``channels`` inputs: the weights of extra inputs (position channels, see
    :mod:`MedSSL.data.position`) start at zero, so the network starts computing what ``init`` computed.
    MedSSLError when ``init`` has more inputs than ``channels``."""
    have = input_channels(init)
    if have == channels:
        return init
    if have > channels:
        raise MedSSLError(f"the initial weights take {have} input channels (image and position channels) but the "
                          f"network {channels}; keep --position on (or auto) with this --init")
    kernel = init.state_dict[FIRST_KERNEL]
    extra = torch.zeros((kernel.shape[0], channels - have, *kernel.shape[2:]), dtype=kernel.dtype)
    return InitialWeights({**init.state_dict, FIRST_KERNEL: torch.cat([kernel, extra], dim=1)}, init.width,
                          init.source, init.bundle, init.spatial_dims)
