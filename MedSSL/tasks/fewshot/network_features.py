"""Optional deep features for the appearance model: the last decoder layer of a (pretrained) U-Net.

With ``medssl finetune --init BUNDLE`` on a painting, the initial network (a pretraining bundle, a
fine-tuned bundle or an official Models Genesis ``.pt``) is run once over the region of interest and its
last decoder features, (2w, X, Y, Z), are appended to the hand-made ones (:func:`.appearance.voxel_features`).
The network is not trained here: on a CPU a minute buys a few dozen steps of a 3D U-Net, while the MLP on
top of fixed features converges in seconds. The README reports whether this helps (it is measured
against a random, untrained network of the same shape: "scratch in the same engine").
"""

from __future__ import annotations

import numpy as np
import torch

from MedSSL.data.preprocess import IntensityConfig, normalize_intensity
from MedSSL.io.volumes import Volume
from MedSSL.models.initial_weights import InitialWeights
from MedSSL.models.genesis_unet import GenesisUNet


def build_backbone(init: InitialWeights) -> GenesisUNet:
    """The U-Net of ``init`` (any output head; only the decoder features are used), eval mode, CPU."""
    net = GenesisUNet(in_channels=1, out_channels=1, width=init.width)
    state = {k: v for k, v in init.state_dict.items() if not k.startswith("out_tr.")}
    net.load_state_dict(state, strict=False)
    return net.eval()


def intensity_of(init: InitialWeights) -> IntensityConfig:
    recorded = init.bundle.preprocessing_setting("intensity") if init.bundle is not None else None
    return IntensityConfig.from_dict(recorded) if recorded else IntensityConfig()


@torch.inference_mode()
def decoder_features(net: GenesisUNet, image: np.ndarray, spacing, intensity: IntensityConfig,
                     device: torch.device | None = None) -> np.ndarray:
    """(X, Y, Z) raw intensities of the region -> (2w, X, Y, Z) float32 decoder features.

    The region is normalised as the network was trained (``intensity``) and padded (edge values) to a
    multiple of 8 on each axis; the padding is cropped off again.
    """
    device = device or torch.device("cpu")
    volume = Volume(image, np.asarray(spacing, float), np.zeros(3), np.eye(3))
    array, _ = normalize_intensity(volume, intensity)
    pad = [(0, (-n) % 8) for n in array.shape]
    padded = np.pad(array, pad, mode="edge")
    x = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device)
    net = net.to(device)
    bottleneck, skips = net.encode(x)
    feats = net.decode(bottleneck, skips)[0].float().cpu().numpy()
    return feats[:, : image.shape[0], : image.shape[1], : image.shape[2]].astype(np.float32)
