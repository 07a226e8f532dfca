"""What segmentation and classification fine-tuning share: the initial weights, the preprocessing they
imply, reading image volumes, and the bundle fields common to both tasks."""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import torch

from MedSSL.data.preprocess import IntensityConfig, normalize_intensity, resample_to_spacing
from MedSSL.data.spatial import image_dims
from MedSSL.errors import MedSSLError
from MedSSL.io.bundle import Architecture, BundleMeta
from MedSSL.io.volumes import Volume, read_volume
from MedSSL.models.initial_weights import InitialWeights, load_initial_weights
from MedSSL.engine.acceleration import mixed_precision, precision_name
from MedSSL.engine.loop import LoopConfig
from MedSSL.engine.runtime import device_description


def fit_steps_to_time(loop: LoopConfig, step_fn, model, device, trials: int = 4) -> LoopConfig:
    """The loop config with ``steps`` = how many steps fit ``loop.max_time`` seconds.

    The learning-rate schedule (warm-up, cosine decay) is laid out over ``steps``, so a time budget
    alone ("train for 60 s") needs a step count: a few forward/backward passes are timed in the loop's
    precision (no optimiser step; weights and BatchNorm statistics are restored afterwards) and the
    median is used.
    """
    saved = copy.deepcopy(model.state_dict())
    model.train()
    autocast, _ = mixed_precision(device, loop.amp)
    times = []
    for _ in range(trials):
        start = time.monotonic()
        with autocast:
            loss, _ = step_fn(0)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)
        times.append(time.monotonic() - start)
    model.load_state_dict(saved)
    per_step = float(np.median(times[1:] if len(times) > 1 else times))
    return replace(loop, steps=max(1, int(loop.max_time / max(per_step, 1e-6))))


def encoder_only(init: InitialWeights) -> InitialWeights:
    """``init`` restricted to the encoder (``down_tr*``): the decoder then starts from scratch."""
    state = {k: v for k, v in init.state_dict.items() if k.startswith("down_tr")}
    return replace(init, state_dict=state)


def load_init(spec: str | None) -> InitialWeights | None:
    """``--init``: None or "none" = from scratch, else a bundle folder or an official ``.pt``."""
    if spec is None or str(spec).strip().lower() in ("", "none", "scratch"):
        return None
    return load_initial_weights(spec)


def resolve_width(requested: int | None, init: InitialWeights | None) -> int:
    if init is not None:
        if requested is not None and requested != init.width:
            raise MedSSLError(f"--width {requested}: the --init weights have width {init.width}; leave --width out to use it")
        return init.width
    width = 32 if requested is None else int(requested)
    if width < 1:
        raise MedSSLError(f"--width {width}: must be at least 1")
    return width


def preprocessing_from_init(init: InitialWeights | None, modality: str, spacing) -> tuple[IntensityConfig, tuple | None]:
    """The intensity settings and target spacing to fine-tune with.

    Same as the pretraining that produced ``init`` (its bundle's ``preprocessing``) so the encoder sees
    what it learned on; Models Genesis' CT window for official ``.pt`` files and scratch. An explicit
    ``--modality`` / ``--spacing`` overrides.
    """
    bundle = init.bundle if init is not None else None
    recorded = bundle.preprocessing_setting("intensity") if bundle else None
    intensity = IntensityConfig.from_dict(recorded) if recorded else IntensityConfig()
    if modality and modality != "auto":
        intensity = IntensityConfig(modality=modality, ct_window=intensity.ct_window, mr_percentiles=intensity.mr_percentiles)
    target = spacing if spacing is not None or not bundle else bundle.preprocessing_setting("target_spacing_mm")
    if target is not None:
        target = tuple(float(s) for s in np.broadcast_to(np.asarray(target, dtype=np.float64).reshape(-1), (3,)))
        if not all(s > 0 for s in target):
            raise MedSSLError(f"--spacing {list(target)}: spacings must be positive (mm)")
    return intensity, target


def read_image(path, spacing, first=None) -> tuple[Volume, int]:
    """Read an image volume and resample it to ``spacing`` (mm, linear) when given (one-slice images:
    in-plane only). Returns (volume, spatial dims), see :func:`MedSSL.data.spatial.image_dims` for ``first``."""
    volume = read_volume(path)
    dims = image_dims(volume.shape, path, first)
    return (resample_to_spacing(volume, spacing) if spacing is not None else volume), dims


def normalize(volume: Volume, intensity: IntensityConfig) -> tuple[np.ndarray, str]:
    """float32 (X, Y, Z) in [0, 1] (Z = 1 for one-slice images) and the modality used."""
    return normalize_intensity(volume, intensity)


def majority(values) -> str | None:
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else None


def common_meta(*, task: str, width: int, out_channels: int, intensity: IntensityConfig, modality: str | None,
                spacing, patch, init: InitialWeights | None, loop: LoopConfig, result, batch_size: int,
                seed: int, device, spatial_dims: int = 3) -> BundleMeta:
    """The model.json fields every fine-tuned bundle has (no paths, no identifiers); the task adds its own
    with ``dataclasses.replace``. ``spatial_dims`` 2: a 2D network for one-slice images (``patch_size``
    [X, Y, 1], as 2D pretraining bundles)."""
    from MedSSL.engine.loop import thin_history

    resolved = IntensityConfig(modality=modality or intensity.modality, ct_window=intensity.ct_window,
                               mr_percentiles=intensity.mr_percentiles)
    return BundleMeta(
        architecture=Architecture("unet3d", width=width, in_channels=1, out_channels=out_channels,
                                  spatial_dims=spatial_dims),
        task=task,
        method={"name": "finetune", "init_method": (init.describe().get("method") if init else None)},
        init=init.describe() if init is not None else {"source": "scratch"},
        preprocessing={"intensity": resolved.to_dict(), "target_spacing_mm": list(spacing) if spacing else None,
                       "modality": modality},
        patch_size=list(patch),
        training={"steps": result.steps_done, "stopped_by": result.stopped_by, "batch_size": batch_size,
                  "optimizer": loop.optimizer, "lr": loop.lr, "max_time_s": loop.max_time,
                  "best_val_loss": result.best_val, "seed": seed, "device": device_description(device),
                  "precision": precision_name(device, loop.amp), "seconds": round(result.seconds, 1)},
        history=thin_history(result.history),
        world_size=1,
    )
