"""Loading a fine-tuned bundle for inference and preparing an image the way it was trained.

A bundle with ``architecture.spatial_dims: 2`` holds a 2D network for one-slice images (X, Y, 1): its
``patch`` is (X, Y, 1) and it takes (N, 1, X, Y) inputs; 3D bundles take volumes only, 2D bundles
one-slice images only (:func:`check_image`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from MedSSL.io.bundle import BundleMeta, open_bundle
from MedSSL.data.position import POSITION_AXES, with_position_channels
from MedSSL.data.preprocess import IntensityConfig, detect_modality, normalize_intensity, resample_to_spacing
from MedSSL.data.spatial import validate_patch
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import Volume
from MedSSL.models.genesis_unet import GenesisUNet

TASKS = ("segment", "classify")


@dataclass
class LoadedModel:
    """A bundle ready to run.

    network: eval-mode module on ``device`` (GenesisUNet for segment, :class:`ClassifierNet` for classify).
    channel_values: (C,) uint8, channel -> original label value (segment). class_values: ordered class
    values (classify). classes: {value: {"name", "color"}}. patch: (X, Y, Z) voxels ((X, Y, 1) for a 2D
    network). spacing: target mm or None. intensity: the training intensity settings (modality fixed to
    the one trained on). spatial_dims: 3, or 2 for a network on one-slice images. position: the network
    takes position channels after the image (model.json ``preprocessing.position``, :mod:`MedSSL.data.position`).
    """

    meta: BundleMeta
    network: nn.Module
    task: str
    classes: dict
    patch: tuple
    spacing: tuple | None
    intensity: IntensityConfig
    device: torch.device
    channel_values: np.ndarray | None = None
    class_values: list | None = None
    spatial_dims: int = 3
    position: bool = False

    def name_of(self, value: int) -> str:
        entry = self.classes.get(int(value))
        return entry["name"] if entry else f"label_{int(value)}"


def load_model(bundle_dir, device: torch.device, allowed=TASKS, what: str = "--model") -> LoadedModel:
    """Read a bundle and build its network. Raises MedSSLError for pretraining bundles (nothing to
    predict yet), unknown tasks or architectures, and weights that do not fit the description."""
    meta, state = open_bundle(bundle_dir)
    task, arch = meta.task or None, meta.architecture
    if task not in allowed:
        hint = " (a pretraining bundle: fine-tune it first with `medssl finetune --init`)" if task == "pretrain" else ""
        raise MedSSLError(f"{what} {bundle_dir}: task {task!r}{hint}; expected {' or '.join(allowed)}")
    if arch.name != "unet3d":
        raise MedSSLError(f"{what} {bundle_dir}: unknown architecture {arch.name!r}")
    if not arch.width or not arch.out_channels:
        raise MedSSLError(f"{what} {bundle_dir}: model.json gives no architecture width or out_channels")
    classes, dims = meta.class_table, meta.spatial_dims
    if dims not in (2, 3):
        raise MedSSLError(f"{what} {bundle_dir}: spatial_dims {dims} in model.json; expected 2 or 3")
    if task == "segment":
        network = GenesisUNet(meta.in_channels, arch.out_channels, arch.width, spatial_dims=dims)
    else:
        from MedSSL.models.classifier import ClassifierNet

        network = ClassifierNet(arch.width, arch.out_channels, meta.in_channels, dims)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MedSSLError(f"{what} {bundle_dir}: the weights do not match model.json ({str(exc).splitlines()[0][:120]})") from None
    network.to(device).eval()
    intensity = IntensityConfig.from_dict(meta.preprocessing_setting("intensity"))
    modality = meta.preprocessing_setting("modality")
    if modality in ("CT", "MR"):
        intensity = IntensityConfig(modality, intensity.ct_window, intensity.mr_percentiles)
    spacing = meta.preprocessing_setting("target_spacing_mm")
    position = meta.preprocessing_setting("position") is not None
    expected = 1 + (len(POSITION_AXES) if position else 0)
    if meta.in_channels != expected:
        raise MedSSLError(f"{what} {bundle_dir}: the network takes {meta.in_channels} input channels but model.json "
                          f"describes {expected} (the image{' and its position channels' if position else ''})")
    model = LoadedModel(meta, network, task, classes, meta.patch, tuple(float(s) for s in spacing) if spacing else None,
                        intensity, device, spatial_dims=dims, position=position)
    if task == "segment":
        values = meta.channel_values
        if len(values) != arch.out_channels:
            raise MedSSLError(f"{what} {bundle_dir}: model.json lists {len(values)} channels for {arch.out_channels} outputs")
        model.channel_values = np.asarray(values, dtype=np.uint8)
    else:
        model.class_values = meta.output_values
    return model


#: memory one batch of windows may take in the automatic choice (MB): activations and class maps
WINDOW_MEMORY_MB = 512


def inference_window(model: LoadedModel, shape, requested=None, sw_batch_size: int = 2) -> tuple[int, int, int]:
    """The sliding window for an image of ``shape`` (X, Y, Z) voxels on the model's grid.

    A 2D model's window is (X, Y, 1) (``--window X Y`` or ``X Y 1``); "plane" is then the whole image
    when it fits the memory budget. ``requested`` (``--window X Y Z`` or ``--window plane``) wins; None takes the bundle's
    ``inference.window`` (few-shot bundles say "plane"), else the training patch. ``"plane"`` makes the
    window cover the whole plane (X, Y rounded up to multiples of 8) when a batch of such windows fits
    :data:`WINDOW_MEMORY_MB` (estimated as voxels x (6 x width + output channels) x 4 bytes x batch),
    else the training patch grown in-plane as far as that allows; Z is the training patch's. The
    network is fully convolutional, and fewer window borders inside the body mattered: on the few-shot
    spleen (164 x 166 x 26) a 168 x 168 x 16 window raised Dice from 0.89 to 0.95 over the 64 x 64 x 16
    training patch (96 or 128 did not help: window borders remained inside the body).
    """
    if requested is None:
        requested = model.meta.inference_setting("window")
    if requested is None:
        return tuple(model.patch)
    if requested != "plane":
        return validate_patch(requested, model.spatial_dims, what="--window")
    px, py, pz = model.patch
    arch = model.meta.architecture
    per_voxel = 4 * (6 * arch.width + arch.out_channels) * max(1, sw_batch_size)
    limit = WINDOW_MEMORY_MB * 2**20 / per_voxel / pz  # in-plane voxels
    full = [max(p, 8 * -(-int(s) // 8)) for p, s in zip((px, py), shape[:2])]
    if full[0] * full[1] <= limit:
        return full[0], full[1], pz
    side = 8 * int(np.sqrt(limit) // 8)
    return min(full[0], max(px, side)), min(full[1], max(py, side)), pz


def check_image(model: LoadedModel, volume: Volume, path) -> None:
    """The image must suit the network: a 3D volume for a 3D network, a one-slice image (X, Y, 1) for a
    2D one (images are scalar: :func:`load_model` checked that the network takes one image channel)."""
    dims = model.meta.spatial_dims
    shape = "x".join(map(str, volume.shape))
    single = min(volume.shape) < 2
    if dims == 3 and single:
        raise MedSSLError(f"{path}: a single-slice image ({shape}) but the model is 3D; give a 3D volume or a 2D model")
    if dims == 2 and not single:
        raise MedSSLError(f"{path}: a 3D image ({shape}) but the model is 2D (one-slice images only)")
    if dims == 2 and (volume.shape[2] != 1 or min(volume.shape[:2]) < 2):
        raise MedSSLError(f"{path}: a single-slice image ({shape}) along X or Y; a 2D model takes images of shape X x Y x 1")


def prepare(model: LoadedModel, volume: Volume, path, log=None) -> tuple[np.ndarray, Volume]:
    """Image -> (the network's input on the model's grid, the volume on that grid). The input is float32
    (X, Y, Z) in [0, 1], or for a model with position channels (3, X, Y, Z): that image and its channels
    (:func:`MedSSL.data.position.with_position_channels`).

    The grid is the input's, or the bundle's target spacing (linear resampling) when it has one; a
    one-slice image (X, Y, 1) is resampled in-plane only (it keeps its one slice).
    """
    check_image(model, volume, path)
    if model.intensity.modality != "auto" and volume.modality is None and log is not None:
        detected = detect_modality(volume)
        if detected != model.intensity.modality:
            log(f"warning: the image looks like {detected} but the model was trained on {model.intensity.modality}")
    work = resample_to_spacing(volume, model.spacing) if model.spacing else volume
    array, _ = normalize_intensity(work, model.intensity)
    if model.position:
        array = with_position_channels(array, work.spacing, work.direction)
    return array, work
