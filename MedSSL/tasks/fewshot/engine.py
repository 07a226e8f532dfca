"""The few-shot engine: a painted label map + its image -> the whole structure.

Frame: the engine moves the main painted axis (:attr:`PaintedPlanes.main_axis`) last, so painted
planes are Z slices of an (X, Y, Z) array with ``spacing`` (sx, sy, sz) mm, and works in a region of
interest around the painting. Per class c and voxel, a log-odds

    z_c = -d_c / tau + weight * a_c

fuses the shape prior (d_c: signed distance in mm to the interpolated or carried shape, negative
inside; tau = TAU0 + TAU1 * distance in mm to the nearest painted plane, so the prior is firm next to a
painted plane and softer between two far ones) with the appearance (a_c: the online classifier's
log-odds, :mod:`.appearance`). A voxel takes the class of largest z_c when it is positive.

* Between painted planes d_c is the blended distance of the two neighbouring planes (:func:`.shape.blend`),
  less the bulge of a rounded structure (:func:`.fusion.bulge_fn`: a local parabola of the squared
  equivalent radius against the linear blend of the radii).
* Past the first and last painted plane, slice by slice, d_c is the previous slice's result carried on
  and shrunk (``taper``: with two or more painted planes, as the painted shapes' equivalent radius
  trends, :func:`.fusion.radius_trend`, at least MIN_TAPER mm per mm; with one, ``default_taper`` mm per mm);
  only 2D components that overlap the previous slice are kept, the appearance weighs at least
  WALK_MIN_WEIGHT there (the image is the only evidence), and the walk stops at the first empty slice.
  It cannot run away: outside the carried shape only voxels of strong appearance (STRONG_ODDS) within
  WALK_GROWTH mm per mm of the previous slice stay, and none when the leave-one-plane-out score says the
  model is poor (POOR_DICE, :func:`.calibration.walk_may_grow`). With one painted plane the walks
  (both ways) are not guarded: the image decides alone.
* ``weight`` is chosen per volume by leave-one-plane-out on the painting itself: each inner painted
  plane is predicted from its two neighbours, each end plane by walking from the next plane, with an
  appearance model trained without that plane, and the weight with the best mean Dice on the held-out
  planes wins. With one painted plane there is nothing to hold out: ``default_weight`` is used.
* Painted voxels keep their painted values; predicted components that touch no painted voxel of their
  class are removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from MedSSL.data.painted_planes import PaintedPlanes
from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.appearance import AppearanceNet
from MedSSL.tasks.fewshot.calibration import choose_weight_and_taper, walk_may_grow
from MedSSL.tasks.fewshot.frame import moved, prepare_frame
from MedSSL.tasks.fewshot.fusion import TREND, compose

__all__ = ["FewShotSettings", "FewShotResult", "FewShotModel", "TREND", "fit_painting", "apply_painting", "segment_painted"]


@dataclass(frozen=True)
class FewShotSettings:
    """weight / taper: None = chosen by leave-one-plane-out (defaults when one plane is painted);
    steps: appearance-MLP optimiser steps (fold models get a third); margin_mm: region of interest grown
    around the painting; seed: the MLP's seed."""

    weight: float | None = None
    default_weight: float = 1.0
    taper: float | str | None = None
    default_taper: float = 0.3
    steps: int = 300
    margin_mm: float = 10.0
    seed: int = 0
    calibrate: bool = True


@dataclass
class FewShotResult:
    """labels: (X, Y, Z) uint8 class values on the input grid; probability: (X, Y, Z) float32 probability
    of the chosen class (0.5..1; 1 = certain, as outside the region of interest); planes: what was painted;
    model: the fitted model that produced them; seconds: wall time of the stages."""

    labels: np.ndarray
    probability: np.ndarray
    planes: PaintedPlanes
    model: "FewShotModel"
    seconds: dict = field(default_factory=dict)


@dataclass
class FewShotModel:
    """What ``finetune`` learns from a painting and ``predict`` applies: the appearance MLP over
    ``classes`` (class values), the chosen ``weight`` and ``taper``, the calibration scores, the painted
    planes it was fitted on, and the optional feature network (:mod:`.network_features`)."""

    net: AppearanceNet
    classes: list
    weight: float
    taper: object
    calibration: dict
    planes: PaintedPlanes
    backbone: object | None = None
    backbone_intensity: object | None = None
    margin_mm: float = 10.0


def fit_painting(image: np.ndarray, spacing, painted: np.ndarray, settings: FewShotSettings = FewShotSettings(),
                 previous: FewShotModel | None = None, backbone=None, backbone_intensity=None, log=None,
                 frame=None, phase=None) -> FewShotModel:
    """Learn the appearance of the painted classes and choose weight and taper (see the module docstring).

    image: (X, Y, Z) intensities; spacing: (3,) mm; painted: (X, Y, Z) uint8, 0 background, class values,
    255 not annotated (painted planes along any axes, :mod:`.planes`). ``previous``: the model of the
    previous correction round: its MLP is the starting point (a quarter of the steps) and, when it was
    calibrated, its weight and taper are kept. ``backbone``: a U-Net whose decoder features join the
    hand-made ones (:mod:`.network_features`). ``phase``: called with "features", "fit" and "calibration" as
    each of them starts (the CLI's progress reports them).
    """
    phase = phase or (lambda _name: None)
    if previous is not None:
        backbone, backbone_intensity = previous.backbone, previous.backbone_intensity
    phase("features")
    if frame is None:
        frame, planes, _ = prepare_frame(image, spacing, painted, settings.margin_mm, backbone, backbone_intensity)
    else:
        planes = frame.painted_planes
    classes = frame.classes()
    if log:
        log(f"painted planes: {planes.describe()}; classes {classes}; region "
            f"{'x'.join(str(s.stop - s.start) for s in frame.box)} voxels, {frame.features.shape[0]} features")
    init = previous.net if previous is not None and _compatible(previous.net, frame.features.shape[0], classes,
                                                                 previous.classes) else None
    steps = settings.steps if init is None else settings.steps // 4
    phase("fit")
    net = frame.train(classes, steps=steps, seed=settings.seed, init=init)
    phase("calibration")
    if init is not None and previous.calibration and settings.weight is None and settings.taper is None:
        weight, taper, calibration = previous.weight, previous.taper, previous.calibration
    else:
        weight, taper, calibration = choose_weight_and_taper(frame, classes, settings)
    if log:
        log(f"appearance weight {weight:g}, taper {taper}" + (" (leave-one-plane-out)" if calibration else ""))
    return FewShotModel(net, classes, weight, taper, calibration, planes, backbone, backbone_intensity, settings.margin_mm)


def apply_painting(model: FewShotModel, image: np.ndarray, spacing, painted: np.ndarray, frame=None) -> FewShotResult:
    """Segment the whole structure from its painting with a fitted ``model``; see the module docstring."""
    clock = time.perf_counter()
    if frame is None:
        frame, planes, _ = prepare_frame(image, spacing, painted, model.margin_mm, model.backbone, model.backbone_intensity)
    else:
        planes = frame.painted_planes
    extra = sorted(set(frame.classes()) - set(model.classes))
    if extra:
        raise MedSSLError(f"the painting has class value(s) {extra} that the model was not fitted on "
                          f"(it knows {model.classes}): fine-tune again on this painting")
    odds_all = frame.odds(model.net)
    roi_out, roi_prob = compose(frame, lambda k: odds_all[..., k], model.weight, model.taper, model.classes,
                                 grow=walk_may_grow(model.calibration))
    main = planes.main_axis
    moved_shape = moved(planes, painted).shape
    labels = np.zeros(moved_shape, np.uint8)
    prob = np.ones(moved_shape, np.float32)
    labels[frame.box], prob[frame.box] = roi_out, roi_prob
    labels, prob = np.moveaxis(labels, -1, main), np.moveaxis(prob, -1, main)
    labels = _clean(labels, painted)
    return FewShotResult(labels, np.ascontiguousarray(prob), planes, model, {"apply": round(time.perf_counter() - clock, 3)})


def segment_painted(image: np.ndarray, spacing, painted: np.ndarray, settings: FewShotSettings = FewShotSettings(),
                    previous: FewShotModel | None = None, backbone=None, backbone_intensity=None,
                    log=None, extra_features: np.ndarray | None = None) -> tuple[FewShotModel, FewShotResult]:
    """:func:`fit_painting` then :func:`apply_painting` on one shared frame (features computed once).
    ``extra_features``: (F, X, Y, Z) maps on the image's grid that join the appearance features of this one
    run (:func:`.frame.prepare_frame`; the returned model cannot be applied without them)."""
    clock = time.perf_counter()
    if previous is not None:
        backbone, backbone_intensity = previous.backbone, previous.backbone_intensity
    frame, _, _ = prepare_frame(image, spacing, painted, settings.margin_mm, backbone, backbone_intensity,
                                extra_features)
    t_features = time.perf_counter() - clock
    model = fit_painting(image, spacing, painted, settings, previous, backbone, backbone_intensity, log, frame)
    t_fit = time.perf_counter() - clock - t_features
    result = apply_painting(model, image, spacing, painted, frame)
    result.seconds = {"features": round(t_features, 3), "fit": round(t_fit, 3),
                      "apply": result.seconds["apply"], "total": round(time.perf_counter() - clock, 3)}
    return model, result


def _compatible(net: AppearanceNet, n_features: int, classes, previous_classes) -> bool:
    return net.mean.numel() == n_features and list(classes) == list(previous_classes)


def _clean(labels: np.ndarray, painted: np.ndarray) -> np.ndarray:
    """Painted voxels keep their values; per class, only components touching its painted voxels stay."""
    from MedSSL.tasks.infer.postprocess import keep_connected_to_annotation

    return keep_connected_to_annotation(labels, painted)
