"""Shape and appearance fused slice by slice (the formula is in :mod:`.engine`'s docstring): between
painted planes by blending their signed distances, past the painted range by walking slice to slice
with the painted shapes' size trend.

Arrays: (C, X, Y) per-class signed distances (mm, negative inside) and log-odds; (X, Y) labels.
"""

from __future__ import annotations

import numpy as np

from MedSSL.tasks.fewshot.frame import Frame
from MedSSL.tasks.fewshot.shape import FAR, blend, carry, class_distances, keep_overlapping

#: taper mode: follow the painted shapes' size trend (two or more painted planes)
TREND = "trend"
#: the least a carried shape shrinks in trend mode, mm per mm travelled
MIN_TAPER = 0.1
#: past the painted range the image is the only evidence: the walk weighs appearance at least this much
WALK_MIN_WEIGHT = 1.0
#: past the painted range a voxel outside the carried shape needs appearance log-odds at least this strong
STRONG_ODDS = 2.0
#: ... and may then lie at most this far outside the previous slice's shape, mm per mm travelled
WALK_GROWTH = 1.0
#: the most a blended shape grows or shrinks between painted planes by the radius' curvature, x its radius
BULGE_LIMIT = 0.25
TAU0_MM = 1.0
TAU1 = 0.15


def decide(d: np.ndarray, tau: float, a: np.ndarray, weight: float, classes) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y) distances and log-odds -> (X, Y) class values and probability of the chosen class."""
    z = -d / np.float32(tau) + np.float32(weight) * a
    best = np.argmax(z, axis=0)
    top = np.take_along_axis(z, best[None], 0)[0]
    values = np.asarray(classes, np.uint8)[best]
    labels = np.where(top > 0, values, 0).astype(np.uint8)
    prob = 1.0 / (1.0 + np.exp(-np.clip(top, -30, 30)))
    return labels, np.where(top > 0, prob, 1.0 - prob).astype(np.float32)


def shape_temperature(distance_mm: float) -> float:
    return TAU0_MM + TAU1 * distance_mm


def walk(start: np.ndarray, start_index: int, slices, odds, weight, shrink, classes, sampling, dz,
         grow: bool = True, guarded: bool = True) -> list:
    """Carry ``start`` (X, Y labels of the painted plane at slice ``start_index``) through ``slices``
    (indices moving away from it, either way), using ``odds(k)`` -> (C, X, Y) and ``shrink(k_from, k_to)``
    -> (C,) mm; returns [(k, labels, prob)] up to the first empty slice.

    The walk cannot run away: a slice keeps outside the carried (shrunk) shape only voxels of strong
    appearance (log-odds >= STRONG_ODDS) within WALK_GROWTH mm per mm of the previous slice's shape, and
    nothing outside it when ``grow`` is False (a poor appearance model, :func:`.calibration.walk_may_grow`).
    ``guarded`` False (one painted plane: the walk is the whole result and nothing tells how good the
    model is) lets the appearance decide alone, as before the guard: on the large benchmark the guard
    cost one-plane paintings of the 7-case suite 0.005 (liver and kidney CT about 0.06)."""
    out, previous, k_prev = [], start, start_index
    for step, k in enumerate(slices, start=1):
        shrunk = np.broadcast_to(np.asarray(shrink(k_prev, k), np.float32), (len(classes),))
        d, a = carry(previous, classes, sampling, shrunk), odds(k)
        labels, prob = decide(d, shape_temperature(step * dz), a, weight, classes)
        if guarded:
            labels, prob = within_reach(labels, prob, d, a, shrunk, classes, WALK_GROWTH * dz if grow else None)
        labels = keep_overlapping(labels, previous, classes)
        out.append((k, labels, prob))
        k_prev = k
        if not labels.any():
            break
        previous = labels
    return out


def within_reach(labels, prob, d, a, shrunk, classes, growth_mm):
    """Drop a walked slice's voxels outside the carried shape (``d`` > 0, (C, X, Y) mm) unless their
    log-odds ``a`` are >= STRONG_ODDS and they lie within ``growth_mm`` of the previous slice's shape
    (``d - shrunk``); ``growth_mm`` None: drop every voxel outside. Returns (labels, prob)."""
    out = labels.copy()
    for i, c in enumerate(classes):
        outside = (labels == c) & (d[i] > 0)
        if growth_mm is not None:
            outside &= (a[i] < STRONG_ODDS) | (d[i] - shrunk[i] > growth_mm)
        out[outside] = 0
    dropped = out != labels
    return out, np.where(dropped, 1.0 - prob, prob).astype(np.float32)


def radius_trend(frame: Frame, classes, planes) -> list:
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
        r2 = np.array([(frame.painted(k) == c).sum() * pixel / np.pi for k in planes])
        fit = np.poly1d(np.polyfit(z, r2, 2)) if len(planes) >= 3 else None
        if fit is None or fit.coeffs[0] > 0:
            fit = np.poly1d(np.polyfit(z, r2, 1))
        fits.append(fit)
    return fits


def shrink_fn(frame: Frame, classes, taper, planes=None, fallback: float = 0.3):
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


def bulge_fn(frame: Frame, classes, planes):
    """(k0, k1, k) -> (C,) mm by which each class' blended shape between painted planes k0 < k1 grows at
    slice k: the equivalent radius of a local parabola of r^2 (through k0, k1 and the painted plane before
    k0; through k0, k1 and the one after k1; the mean of the two) less the linear blend of the two radii.

    Signed-distance blending interpolates the radius linearly; a rounded structure (an ellipsoid's r^2 is
    a parabola) is wider between two planes, so the blend under-fills; a waist (r^2 opening upwards) makes
    it negative. Bounded by BULGE_LIMIT x the larger radius; 0 where a class is absent from k0 or k1, and
    with two painted planes (no curvature to fit)."""
    dz, pixel = float(frame.spacing[2]), float(frame.spacing[0] * frame.spacing[1])
    r2 = np.array([[(frame.painted(k) == c).sum() * pixel / np.pi for c in classes] for k in planes])  # (P, C)
    zero = np.zeros(len(classes), np.float32)

    def bulge(k0: int, k1: int, k: int) -> np.ndarray:
        i = planes.index(k0)
        triples = [t for t in ((i - 1, i, i + 1), (i, i + 1, i + 2)) if t[0] >= 0 and t[2] < len(planes)]
        if not triples:
            return zero
        out = np.zeros(len(classes), np.float32)
        t = (k - k0) / (k1 - k0)
        for c in range(len(classes)):
            if r2[i, c] <= 0 or r2[i + 1, c] <= 0:
                continue
            fits = [np.polyval(np.polyfit([planes[j] * dz for j in tri], r2[list(tri), c], 2), k * dz) for tri in triples]
            r_fit = np.sqrt(max(float(np.mean(fits)), 0.0))
            r0, r1 = np.sqrt(r2[i, c]), np.sqrt(r2[i + 1, c])
            limit = BULGE_LIMIT * max(r0, r1)
            out[c] = np.clip(r_fit - ((1 - t) * r0 + t * r1), -limit, limit)
        return out

    return bulge


def compose(frame: Frame, odds, weight: float, taper, classes, slices=None, grow: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of the whole region for one (weight, taper); ``grow``: see :func:`walk`.

    ``slices``: None (all), or the Z slices wanted (a live session's correction): a gap between two painted
    planes, or a walk past an end plane, is computed only when it holds one of them (whole, as without
    ``slices``); the other slices are left as never reached (0, probability 1)."""
    shrink = shrink_fn(frame, classes, taper)
    shape = frame.labels.shape
    sampling, dz = tuple(frame.spacing[:2]), float(frame.spacing[2])
    out = np.zeros(shape, np.uint8)
    prob = np.ones(shape, np.float32)  # slices never reached: certain background
    planes = frame.planes
    dist = _LazyDistances(frame, classes, sampling)
    for k in planes:
        out[..., k] = frame.painted(k)
        prob[..., k] = 1.0
    wanted = (lambda ks: True) if slices is None else (lambda ks: not set(ks).isdisjoint(slices))  # noqa: E731
    bulge = bulge_fn(frame, classes, planes)
    for k0, k1 in zip(planes[:-1], planes[1:]):
        if not wanted(range(k0 + 1, k1)):
            continue
        for k in range(k0 + 1, k1):
            d = blend(dist[k0], dist[k1], (k - k0) / (k1 - k0)) - bulge(k0, k1, k)[:, None, None]
            out[..., k], prob[..., k] = decide(d, shape_temperature(min(k - k0, k1 - k) * dz), odds(k), weight, classes)
    for start, onward in ((planes[0], range(planes[0] - 1, -1, -1)), (planes[-1], range(planes[-1] + 1, shape[2]))):
        if not wanted(onward):
            continue
        for k, labels, p in walk(out[..., start], start, onward, odds, max(weight, WALK_MIN_WEIGHT), shrink, classes, sampling, dz,
                                 grow, guarded=len(planes) >= 2):
            out[..., k], prob[..., k] = labels, p
    return out, prob


class _LazyDistances(dict):
    """{painted plane k: (C, X, Y) signed distances}, computed the first time a plane is asked for (a live
    session's correction blends two planes, not all of them)."""

    def __init__(self, frame: Frame, classes, sampling):
        super().__init__()
        self.frame, self.classes, self.sampling = frame, classes, sampling

    def __missing__(self, k: int) -> np.ndarray:
        self[k] = class_distances(self.frame.painted(k), self.classes, self.sampling)
        return self[k]

