"""Choosing the appearance weight per volume by leave-one-plane-out on the painting itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from MedSSL.tasks.fewshot.frame import Frame
from MedSSL.tasks.fewshot.fusion import TREND, WALK_MIN_WEIGHT, decide, shape_temperature, shrink_fn, walk
from MedSSL.tasks.fewshot.shape import blend, class_distances

if TYPE_CHECKING:
    from MedSSL.tasks.fewshot.engine import FewShotSettings

WEIGHTS = (0.0, 0.5, 1.0, 2.0)
MAX_FOLDS = 6
#: below this best held-out Dice the engine's model of the painting is poor: its walks may not grow
POOR_DICE = 0.35


def dice(pred: np.ndarray, truth: np.ndarray, classes) -> float:
    scores = []
    for c in classes:
        p, t = pred == c, truth == c
        total = p.sum() + t.sum()
        if total:
            scores.append(2.0 * np.logical_and(p, t).sum() / total)
    return float(np.mean(scores)) if scores else 1.0


def fold_scores(frame: Frame, classes, settings: FewShotSettings) -> dict:
    """Mean Dice on held-out painted planes for every appearance weight of the grid.

    An inner plane is predicted from its two neighbours; an end plane by walking from the next plane
    with the size trend of the other planes; each fold's appearance model is trained without the held-out
    plane (a third of the steps).
    """
    planes = frame.planes
    sampling, dz = tuple(frame.spacing[:2]), float(frame.spacing[2])
    with_structure = [k for k in planes if frame.painted(k).any()]  # empty planes score 1 for every weight
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
        truth = frame.painted(k)
        if 0 < index < len(planes) - 1:
            d = blend(class_distances(frame.painted(lo), classes, sampling),
                      class_distances(frame.painted(hi), classes, sampling), (k - lo) / (hi - lo))
            for w in WEIGHTS:
                pred, _ = decide(d, shape_temperature(min(k - lo, hi - k) * dz), odds(k), w, classes)
                scores[w].append(dice(pred, truth, classes))
            continue
        start = hi if index == 0 else lo
        slices = range(start - 1, k - 1, -1) if index == 0 else range(start + 1, k + 1)
        taper = settings.taper if settings.taper is not None else TREND
        shrink = shrink_fn(frame, classes, taper, [p for p in planes if p != k], settings.default_taper)
        for w in WEIGHTS:
            walked = walk(frame.painted(start), start, slices, odds, max(w, WALK_MIN_WEIGHT), shrink, classes, sampling, dz)
            pred = walked[-1][1] if walked and walked[-1][0] == k else np.zeros_like(truth)
            scores[w].append(dice(pred, truth, classes))
    return {w: float(np.mean(v)) if v else 0.0 for w, v in scores.items()}


def choose_weight_and_taper(frame: Frame, classes, settings: FewShotSettings) -> tuple[float, object, dict]:
    """(weight, taper, calibration scores): taper "trend" with two or more painted planes, else the
    default; weight by :func:`fold_scores` (ties: the one nearest the default)."""
    taper = settings.taper if settings.taper is not None else (TREND if len(frame.planes) >= 2 else settings.default_taper)
    if settings.weight is not None or not settings.calibrate or len(frame.planes) < 2:
        return (settings.weight if settings.weight is not None else settings.default_weight), taper, {}
    scores = fold_scores(frame, classes, settings)
    best = max(scores, key=lambda w: (round(scores[w], 3), -abs(w - settings.default_weight)))
    return best, taper, {f"{w:g}": round(v, 4) for w, v in scores.items()}


def walk_may_grow(calibration: dict) -> bool:
    """False when leave-one-plane-out says the model is poor (best held-out Dice < POOR_DICE): the walks
    past the painted range then stay inside the carried shape (:func:`.fusion.walk`). True without a
    calibration (one painted plane, a fixed weight)."""
    return not calibration or max(calibration.values()) >= POOR_DICE
