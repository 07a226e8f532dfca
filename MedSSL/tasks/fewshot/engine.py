"""The few-shot engine: a painted label map + its image -> the whole structure.

Frame: the engine moves the main painted axis (:attr:`PaintedPlanes.main_axis`) last, so painted
planes are Z slices of an (X, Y, Z) array with ``spacing`` (sx, sy, sz) mm, and works in a region of
interest around the painting. Per class c and voxel, a log-odds

    z_c = -d_c / tau + weight * a_c

fuses the shape prior (d_c: signed distance in mm to the interpolated or carried shape, negative
inside; tau = TAU0 + TAU1 * distance in mm to the nearest painted plane, so the prior is firm next to a
painted plane and softer between two far ones) with the appearance (a_c: the online classifier's
log-odds, :mod:`.appearance`). A voxel takes the class of largest z_c when it is positive.

* Between painted planes d_c is the blended distance of the two neighbouring planes (:func:`.shape.blend`).
* Past the first and last painted plane, slice by slice, d_c is the previous slice's result carried on
  and shrunk (``taper``: with two or more painted planes, as the painted shapes' equivalent radius
  trends, :func:`radius_trend`, at least MIN_TAPER mm per mm; with one, ``default_taper`` mm per mm);
  only 2D components that overlap the previous slice are kept, the appearance weighs at least
  WALK_MIN_WEIGHT there (the image is the only evidence), and the walk stops at the first empty slice.
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
from scipy import ndimage

from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.appearance import AppearanceNet, log_odds, normalise, train_appearance, voxel_features
from MedSSL.data.painted_planes import IGNORE, PaintedPlanes, find_painted_planes
from MedSSL.tasks.fewshot.shape import FAR, blend, carry, class_distances, keep_overlapping

WEIGHTS = (0.0, 0.5, 1.0, 2.0)
#: taper mode: follow the painted shapes' size trend (two or more painted planes)
TREND = "trend"
#: the least a carried shape shrinks in trend mode, mm per mm travelled
MIN_TAPER = 0.1
#: past the painted range the image is the only evidence: the walk weighs appearance at least this much
WALK_MIN_WEIGHT = 1.0
TAU0_MM = 1.0
TAU1 = 0.15
MAX_FOLDS = 6
#: regions larger than this get their appearance features on a coarser in-plane grid (speed, memory)
MAX_FEATURE_VOXELS = 2_000_000


@dataclass(frozen=True)
class FewShotSettings:
    """weight / taper: None = chosen by leave-one-plane-out (defaults when one plane is painted);
    steps: appearance-MLP optimiser steps (fold models get a third); margin_mm: region of interest grown
    around the painting; seed: the MLP's seed."""

    weight: float | None = None
    taper: float | str | None = None
    default_weight: float = 1.0
    default_taper: float = 0.3
    steps: int = 300
    margin_mm: float = 10.0
    seed: int = 0
    calibrate: bool = True


@dataclass
class FewShotResult:
    """labels: (X, Y, Z) uint8 class values on the input grid; probability: (X, Y, Z) float32 probability
    of the chosen class (0.5..1; 1 = certain, as outside the region of interest); planes: what was painted; model: the
    appearance MLP; classes: class values; weight, taper: the values used; folds: calibration scores."""

    labels: np.ndarray
    probability: np.ndarray
    planes: PaintedPlanes
    model: AppearanceNet
    classes: list
    weight: float
    taper: object
    seconds: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)


@dataclass
class _Frame:
    """The engine's working copy: region of interest in the moved frame (main axis last)."""

    labels: np.ndarray      # (X, Y, Z) painted values, 255 not annotated
    known: np.ndarray       # (X, Y, Z) bool, voxels of painted planes (any axis)
    features: np.ndarray    # (F, X, Y, Z)
    spacing: np.ndarray     # (3,) mm
    planes: list            # main-axis painted slice indices in the region
    box: tuple              # slices of the region in the moved full volume
    factor: int = 1         # features are on every factor-th voxel in X and Y (large regions)
    painted_planes: PaintedPlanes | None = None  # what was painted, in the input's axes

    def train(self, classes, known=None, **kwargs) -> AppearanceNet:
        """The appearance MLP trained on the painted voxels (``known``: default the frame's) at feature resolution."""
        f = self.factor
        known = self.known if known is None else known
        return train_appearance(self.features, self.labels[::f, ::f], known[::f, ::f], classes,
                                self.spacing * np.array([f, f, 1]), **kwargs)

    def odds(self, net: AppearanceNet, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(C, X, Y, hi - lo) log-odds of Z slices lo..hi-1 at full resolution (bilinear from the feature grid)."""
        hi = self.labels.shape[2] if hi is None else hi
        odds = log_odds(net, self.features[..., lo:hi])
        if self.factor == 1:
            return odds
        import torch

        full = torch.nn.functional.interpolate(torch.from_numpy(odds).permute(3, 0, 1, 2),
                                               size=self.labels.shape[:2], mode="bilinear", align_corners=True)
        return full.permute(1, 2, 3, 0).numpy()


def _region(labels: np.ndarray, known: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple:
    """Slices of the region of interest (moved frame): the painted structure's box grown in-plane by
    margin + 30 % of its extent, and along Z by the larger of half its painted span and its in-plane size."""
    fg = known & (labels > 0) & (labels != IGNORE)
    lo = np.array([np.flatnonzero(fg.any(axis=tuple(b for b in range(3) if b != a)))[[0, -1]] for a in range(3)])
    extent_mm = (lo[:, 1] - lo[:, 0] + 1) * spacing
    grow_mm = margin_mm + 0.3 * extent_mm
    grow_mm[2] = margin_mm + max(0.5 * extent_mm[2], extent_mm[0], extent_mm[1])
    grow = np.ceil(grow_mm / spacing).astype(int)
    return tuple(slice(max(0, int(a - g)), min(n, int(b + g + 1))) for (a, b), g, n in zip(lo, grow, labels.shape))


def _decide(d: np.ndarray, tau: float, a: np.ndarray, weight: float, classes) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y) distances and log-odds -> (X, Y) class values and probability of the chosen class."""
    z = -d / np.float32(tau) + np.float32(weight) * a
    best = np.argmax(z, axis=0)
    top = np.take_along_axis(z, best[None], 0)[0]
    values = np.asarray(classes, np.uint8)[best]
    labels = np.where(top > 0, values, 0).astype(np.uint8)
    prob = 1.0 / (1.0 + np.exp(-np.clip(top, -30, 30)))
    return labels, np.where(top > 0, prob, 1.0 - prob).astype(np.float32)


def _tau(distance_mm: float) -> float:
    return TAU0_MM + TAU1 * distance_mm


def _walk(start: np.ndarray, start_index: int, slices, odds, weight, shrink, classes, sampling, dz) -> list:
    """Carry ``start`` (X, Y labels of the painted plane at slice ``start_index``) through ``slices``
    (indices moving away from it, either way), using ``odds(k)`` -> (C, X, Y) and ``shrink(k_from, k_to)``
    -> (C,) mm; returns [(k, labels, prob)] up to the first empty slice."""
    out, previous, k_prev = [], start, start_index
    for step, k in enumerate(slices, start=1):
        d = carry(previous, classes, sampling, shrink(k_prev, k))
        labels, prob = _decide(d, _tau(step * dz), odds(k), weight, classes)
        labels = keep_overlapping(labels, previous, classes)
        out.append((k, labels, prob))
        k_prev = k
        if not labels.any():
            break
        previous = labels
    return out


def radius_trend(frame: _Frame, classes, planes) -> list:
    """Per class, the squared equivalent radius r^2(z) (mm^2, z in mm along Z) fitted to the painted planes.

    r = sqrt(area / pi) on each painted plane (0 where the class is absent: a painted plane without it
    says the structure has ended). Two planes: a line; three or more: a parabola (an ellipsoid's r^2 is
    exactly one), or a line where the parabola opens upwards. None with one plane (no trend).
    """
    if len(planes) < 2:
        return [None] * len(classes)
    z = np.asarray(planes, np.float64) * float(frame.spacing[2])
    pixel = float(frame.spacing[0] * frame.spacing[1])
    fits = []
    for c in classes:
        r2 = np.array([(_painted(frame, k) == c).sum() * pixel / np.pi for k in planes])
        fit = np.poly1d(np.polyfit(z, r2, 2)) if len(planes) >= 3 else None
        if fit is None or fit.coeffs[0] > 0:
            fit = np.poly1d(np.polyfit(z, r2, 1))
        fits.append(fit)
    return fits


def _shrink_fn(frame: _Frame, classes, taper, planes=None, fallback: float = 0.3):
    """(k_from, k_to) -> (C,) mm that each class' carried shape shrinks by from slice k_from to k_to.

    ``taper`` a number: that many mm per mm travelled; "trend" (``planes``, default the frame's, two or
    more; else ``fallback``): the decrease of the fitted equivalent
    radius (:func:`radius_trend`), at least MIN_TAPER mm per mm, and the whole shape once r^2 <= 0.
    """
    dz = float(frame.spacing[2])
    planes = frame.planes if planes is None else planes
    if taper == TREND and len(planes) < 2:
        taper = fallback
    if taper != TREND:
        fixed = np.full(len(classes), float(taper) * dz, np.float32)
        return lambda k_from, k_to: fixed
    fits = radius_trend(frame, classes, planes)
    floor = np.full(len(classes), MIN_TAPER * dz, np.float32)

    def shrink(k_from: int, k_to: int) -> np.ndarray:
        out = np.empty(len(classes), np.float32)
        for i, fit in enumerate(fits):
            r_from = np.sqrt(max(fit(k_from * dz), 0.0))
            r2_to = fit(k_to * dz)
            out[i] = FAR if r2_to <= 0 else max(floor[i], r_from - np.sqrt(r2_to))
        return out

    return shrink


def _dice(pred: np.ndarray, truth: np.ndarray, classes) -> float:
    scores = []
    for c in classes:
        p, t = pred == c, truth == c
        total = p.sum() + t.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else 1.0


def _painted(frame: _Frame, k: int) -> np.ndarray:
    plane = frame.labels[..., k].copy()
    plane[plane == IGNORE] = 0
    return plane


def _compose(frame: _Frame, odds, weight: float, taper, classes) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of the whole region for one (weight, taper)."""
    shrink = _shrink_fn(frame, classes, taper)
    shape = frame.labels.shape
    sampling, dz = tuple(frame.spacing[:2]), float(frame.spacing[2])
    out = np.zeros(shape, np.uint8)
    prob = np.ones(shape, np.float32)  # slices never reached: certain background
    planes = frame.planes
    dist = {k: class_distances(_painted(frame, k), classes, sampling) for k in planes}
    for k in planes:
        out[..., k] = _painted(frame, k)
        prob[..., k] = 1.0
    for k0, k1 in zip(planes[:-1], planes[1:]):
        for k in range(k0 + 1, k1):
            d = blend(dist[k0], dist[k1], (k - k0) / (k1 - k0))
            out[..., k], prob[..., k] = _decide(d, _tau(min(k - k0, k1 - k) * dz), odds(k), weight, classes)
    for start, slices in ((planes[0], range(planes[0] - 1, -1, -1)), (planes[-1], range(planes[-1] + 1, shape[2]))):
        for k, labels, p in _walk(out[..., start], start, slices, odds, max(weight, WALK_MIN_WEIGHT), shrink, classes, sampling, dz):
            out[..., k], prob[..., k] = labels, p
    return out, prob


def _fold_scores(frame: _Frame, classes, settings: FewShotSettings) -> dict:
    """Mean Dice on held-out painted planes for every appearance weight of the grid.

    An inner plane is predicted from its two neighbours; an end plane by walking from the next plane
    with the size trend of the other planes; each fold's appearance model is trained without the held-out
    plane (a third of the steps).
    """
    planes = frame.planes
    sampling, dz = tuple(frame.spacing[:2]), float(frame.spacing[2])
    with_structure = [k for k in planes if _painted(frame, k).any()]  # empty planes score 1 for every weight
    held = with_structure if len(with_structure) <= MAX_FOLDS else \
        [with_structure[int(round(i))] for i in np.linspace(0, len(with_structure) - 1, MAX_FOLDS)]
    scores = {w: [] for w in WEIGHTS}
    for index in [planes.index(k) for k in held]:
        k = planes[index]
        known = frame.known.copy()
        known[..., k] = False
        net = frame.train(classes, known, steps=max(50, settings.steps // 3), seed=settings.seed + 1 + index)
        lo = planes[index - 1] if index > 0 else k
        hi = planes[index + 1] if index + 1 < len(planes) else k
        slab = frame.odds(net, lo, hi + 1)
        odds = lambda j: slab[..., j - lo]  # noqa: E731
        truth = _painted(frame, k)
        if 0 < index < len(planes) - 1:
            d = blend(class_distances(_painted(frame, lo), classes, sampling),
                      class_distances(_painted(frame, hi), classes, sampling), (k - lo) / (hi - lo))
            for w in WEIGHTS:
                pred, _ = _decide(d, _tau(min(k - lo, hi - k) * dz), odds(k), w, classes)
                scores[w].append(_dice(pred, truth, classes))
            continue
        start = hi if index == 0 else lo
        slices = range(start - 1, k - 1, -1) if index == 0 else range(start + 1, k + 1)
        taper = settings.taper if settings.taper is not None else TREND
        shrink = _shrink_fn(frame, classes, taper, [p for p in planes if p != k], settings.default_taper)
        for w in WEIGHTS:
            walked = _walk(_painted(frame, start), start, slices, odds, max(w, WALK_MIN_WEIGHT), shrink, classes, sampling, dz)
            pred = walked[-1][1] if walked and walked[-1][0] == k else np.zeros_like(truth)
            scores[w].append(_dice(pred, truth, classes))
    return {w: float(np.mean(v)) if v else 0.0 for w, v in scores.items()}


def _choose(frame: _Frame, classes, settings: FewShotSettings) -> tuple[float, object, dict]:
    """(weight, taper, calibration scores): taper "trend" with two or more painted planes, else the
    default; weight by :func:`_fold_scores` (ties: the one nearest the default)."""
    taper = settings.taper if settings.taper is not None else (TREND if len(frame.planes) >= 2 else settings.default_taper)
    if settings.weight is not None or not settings.calibrate or len(frame.planes) < 2:
        return (settings.weight if settings.weight is not None else settings.default_weight), taper, {}
    scores = _fold_scores(frame, classes, settings)
    best = max(scores, key=lambda w: (round(scores[w], 3), -abs(w - settings.default_weight)))
    return best, taper, {f"{w:g}": round(v, 4) for w, v in scores.items()}


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


def _moved(planes: PaintedPlanes, array: np.ndarray) -> np.ndarray:
    return np.moveaxis(array, planes.main_axis, -1)


def _prepare(image: np.ndarray, spacing, painted: np.ndarray, margin_mm: float, backbone=None,
             backbone_intensity=None) -> tuple[_Frame, PaintedPlanes, tuple]:
    """The engine's frame for ``painted`` on ``image``: (frame, planes, moved full shape)."""
    if image.shape != painted.shape:
        raise MedSSLError(f"painted label {tuple(painted.shape)} and image {tuple(image.shape)} differ in shape")
    planes = find_painted_planes(painted)
    spacing = np.asarray(spacing, np.float64)
    main = planes.main_axis
    labels_m, image_m = _moved(planes, painted), _moved(planes, image)
    known_m = _moved(planes, planes.known_mask(painted.shape))
    spacing_m = np.array([spacing[a] for a in range(3) if a != main] + [spacing[main]])
    box = _region(labels_m, known_m, spacing_m, margin_mm)
    roi_labels = np.where(known_m[box], labels_m[box], IGNORE).astype(np.uint8)
    roi_image = np.ascontiguousarray(image_m[box], dtype=np.float32)
    factor = int(np.ceil(np.sqrt(roi_image.size / MAX_FEATURE_VOXELS))) if roi_image.size > MAX_FEATURE_VOXELS else 1
    coarse = _coarse(roi_image, factor)
    features = voxel_features(normalise(coarse), spacing_m * np.array([factor, factor, 1]))
    if backbone is not None:
        from MedSSL.tasks.fewshot.network_features import decoder_features

        features = np.concatenate([features, decoder_features(backbone, coarse, spacing_m * np.array([factor, factor, 1]),
                                                              backbone_intensity)])
    in_roi = [k - box[2].start for k in planes.planes[main] if box[2].start <= k < box[2].stop]
    return _Frame(roi_labels, known_m[box].copy(), features, spacing_m, in_roi, box, factor, planes), planes, labels_m.shape


def _coarse(image: np.ndarray, factor: int) -> np.ndarray:
    """Every ``factor``-th voxel in X and Y after an anti-aliasing blur (sigma factor / 2 voxels); Z kept."""
    if factor == 1:
        return image
    smooth = ndimage.gaussian_filter(image, (factor / 2.0, factor / 2.0, 0.0), mode="nearest")
    return np.ascontiguousarray(smooth[::factor, ::factor])


def _classes_of(frame: _Frame) -> list:
    return sorted(int(v) for v in np.unique(frame.labels) if 0 < v < IGNORE)


def fit_painting(image: np.ndarray, spacing, painted: np.ndarray, settings: FewShotSettings = FewShotSettings(),
                 previous: FewShotModel | None = None, backbone=None, backbone_intensity=None, log=None,
                 frame=None) -> FewShotModel:
    """Learn the appearance of the painted classes and choose weight and taper (see the module docstring).

    image: (X, Y, Z) intensities; spacing: (3,) mm; painted: (X, Y, Z) uint8, 0 background, class values,
    255 not annotated (painted planes along any axes, :mod:`.planes`). ``previous``: the model of the
    previous correction round: its MLP is the starting point (a quarter of the steps) and, when it was
    calibrated, its weight and taper are kept. ``backbone``: a U-Net whose decoder features join the
    hand-made ones (:mod:`.network_features`).
    """
    if previous is not None:
        backbone, backbone_intensity = previous.backbone, previous.backbone_intensity
    if frame is None:
        frame, planes, _ = _prepare(image, spacing, painted, settings.margin_mm, backbone, backbone_intensity)
    else:
        planes = frame.painted_planes
    classes = _classes_of(frame)
    if log:
        log(f"painted planes: {planes.describe()}; classes {classes}; region "
            f"{'x'.join(str(s.stop - s.start) for s in frame.box)} voxels, {frame.features.shape[0]} features")
    init = previous.net if previous is not None and _compatible(previous.net, frame.features.shape[0], classes,
                                                                 previous.classes) else None
    steps = settings.steps if init is None else settings.steps // 4
    net = frame.train(classes, steps=steps, seed=settings.seed, init=init)
    if init is not None and previous.calibration and settings.weight is None and settings.taper is None:
        weight, taper, calibration = previous.weight, previous.taper, previous.calibration
    else:
        weight, taper, calibration = _choose(frame, classes, settings)
    if log:
        log(f"appearance weight {weight:g}, taper {taper}" + (" (leave-one-plane-out)" if calibration else ""))
    return FewShotModel(net, classes, weight, taper, calibration, planes, backbone, backbone_intensity, settings.margin_mm)


def apply_painting(model: FewShotModel, image: np.ndarray, spacing, painted: np.ndarray, frame=None) -> FewShotResult:
    """Segment the whole structure from its painting with a fitted ``model``; see the module docstring."""
    clock = time.perf_counter()
    if frame is None:
        frame, planes, _ = _prepare(image, spacing, painted, model.margin_mm, model.backbone, model.backbone_intensity)
    else:
        planes = frame.painted_planes
    extra = sorted(set(_classes_of(frame)) - set(model.classes))
    if extra:
        raise MedSSLError(f"the painting has class value(s) {extra} that the model was not fitted on "
                          f"(it knows {model.classes}): fine-tune again on this painting")
    odds_all = frame.odds(model.net)
    roi_out, roi_prob = _compose(frame, lambda k: odds_all[..., k], model.weight, model.taper, model.classes)
    main = planes.main_axis
    moved_shape = _moved(planes, painted).shape
    labels = np.zeros(moved_shape, np.uint8)
    prob = np.ones(moved_shape, np.float32)
    labels[frame.box], prob[frame.box] = roi_out, roi_prob
    labels, prob = np.moveaxis(labels, -1, main), np.moveaxis(prob, -1, main)
    labels = _clean(labels, painted)
    return FewShotResult(labels, np.ascontiguousarray(prob), planes, model.net, model.classes, model.weight, model.taper,
                         {"apply": round(time.perf_counter() - clock, 3)}, model.calibration)


def segment_painted(image: np.ndarray, spacing, painted: np.ndarray, settings: FewShotSettings = FewShotSettings(),
                    previous: FewShotModel | None = None, backbone=None, backbone_intensity=None,
                    log=None) -> tuple[FewShotModel, FewShotResult]:
    """:func:`fit_painting` then :func:`apply_painting` on one shared frame (features computed once)."""
    clock = time.perf_counter()
    if previous is not None:
        backbone, backbone_intensity = previous.backbone, previous.backbone_intensity
    frame, _, _ = _prepare(image, spacing, painted, settings.margin_mm, backbone, backbone_intensity)
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
