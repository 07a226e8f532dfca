"""Test-time BatchNorm adaptation: a cohort network's statistics blended with those of the scan it segments.

A cohort network (``finetune`` on a few scans) keeps the BatchNorm statistics of patches of its few
training scans (:func:`MedSSL.models.batchnorm.recalibrate_batchnorm`). A new subject's image differs from
all of them in contrast and anatomy, and each layer then normalises its activations with statistics of
other images. As in AdaBN (Li et al., "Revisiting batch normalization for practical domain adaptation",
2016), the statistics are recomputed on the image to be segmented; here with the same class balance as
after training: the network first segments the scan (the draft), :data:`ADAPT_BATCHES` batches of 2
patches are drawn around the draft's classes in turn, background included
(:class:`MedSSL.data.sampling.PatchSampler`, as training draws them around the labels), and each BatchNorm
uses the average of the bundle's statistics and this scan's (:data:`SCAN_SHARE`). The scan is then
segmented again with those statistics. Measured in docs/cohort.md ("Test-time BatchNorm adaptation"): on
the cohort models of the benchmark it raised Dice on new scans on both cohorts; this scan's statistics
alone (share 1) gained less.

The bundle's network is not changed: the adapted network is a copy, made for one scan.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from MedSSL.data.position import PositionFrame
from MedSSL.data.sampling import PatchSampler, TrainingVolume
from MedSSL.engine.acceleration import mixed_precision
from MedSSL.models.batchnorm import batchnorm_layers, blend_statistics, recalibrate_batchnorm, running_statistics

#: batches of 2 patches of the scan whose statistics are averaged (what fine-tuning recalibrates on)
ADAPT_BATCHES = 16
#: weight of the scan's own statistics in the blend (the bundle's get the rest)
SCAN_SHARE = 0.5


def wants_adaptation(model, setting: str) -> bool:
    """Whether ``predict`` adapts ``model`` (a :class:`~.model.LoadedModel`) to each scan: ``setting`` "on" or
    "off", or "auto": cohort models (model.json ``cohort``) with BatchNorm layers, 3D segmentation only."""
    if setting == "off" or model.task != "segment" or model.spatial_dims != 3 or not batchnorm_layers(model.network):
        return False
    return setting == "on" or bool(model.meta.cohort)


def adapt_to_scan(model, array: np.ndarray, draft: np.ndarray, spacing, direction, batches: int = ADAPT_BATCHES,
                  share: float = SCAN_SHARE, low_precision: bool = True, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model.network`` (eval mode) with BatchNorm statistics adapted to one scan.

    array: the network's input on the model's grid, float32 (X, Y, Z) in [0, 1], or (3, X, Y, Z) with position
    channels (:func:`~.model.prepare`); draft: (X, Y, Z) channel indices (0 = background) of the network's
    prediction on that grid; spacing (3,) mm and direction (3, 3) of that grid (position channels).
    share: weight of this scan's statistics (1 = this scan's only); low_precision: the patches run in the
    precision prediction uses (``predict --fp32`` = False). Deterministic for a given ``seed``.
    """
    image = array[0] if array.ndim == 4 else array
    position = PositionFrame.of(image, spacing, direction) if model.position else None
    n_channels = len(model.channel_values)
    sampler = PatchSampler([TrainingVolume(image, np.ascontiguousarray(draft, dtype=np.uint8), position)],
                           model.patch, n_channels, np.random.default_rng(seed))
    adapted = copy.deepcopy(model.network).to(memory_format=torch.channels_last_3d)
    bundle = running_statistics(adapted)
    autocast, _ = mixed_precision(model.device, low_precision)
    recalibrate_batchnorm(adapted, (sampler.sample(2)[0] for _ in range(batches)), model.device, autocast)
    blend_statistics(adapted, bundle, share)
    return adapted
