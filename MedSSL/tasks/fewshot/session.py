"""A live few-shot session: one image, its painting changed plane by plane, the result kept up to date.

``medssl session`` (:mod:`MedSSL.commands.session`) runs one :class:`FewShotSession` per (volume,
segmentation) in a long-lived process: the image is read once, the appearance features of the region of
interest are computed once, and the fitted model and the current result stay in memory.

An update after a change of the painting is one of two kinds:

* **full** (the first update; or the painting's main axis, its planes along other axes or its classes
  changed): the engine's own fit (leave-one-plane-out calibration included; warm from the current model
  when there is one) and a result over the whole region, as :func:`.engine.segment_painted` does.
* **incremental** (planes along the main axis added, repainted or removed): the appearance MLP is refitted
  warm from the current one (``warm_steps`` steps; the taper kept, the appearance weight re-chosen from
  the held-out evidence each new plane gives, :meth:`FewShotSession._score_weights`) and only the
  *affected slices* are recomputed: for each changed plane, the slices between its neighbouring painted planes, and
  past the first or last painted plane (the walk) when the changed plane is, or was, an end plane. Nothing
  outside the affected slices changes (the clean-up by connectivity is applied to them only). When the
  painted structure, grown by the margin, reaches past the frame (the engine's region of interest of the
  first painting), the features are computed again for the engine's region of the new painting first
  (seconds on a large image); the result so far is kept.

Each update returns the box of voxels whose label changed and the labels in it (:class:`SessionUpdate`).
Axes: arrays are in the image's index order (i, j, k) = the backend's (X, Y, Z) order; boxes are half-open
``[(start, stop)] * 3`` in those axes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from MedSSL.data.painted_planes import IGNORE, PaintedPlanes, find_painted_planes
from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.engine import FewShotModel, FewShotSettings, fit_painting
from MedSSL.tasks.fewshot.frame import moved, prepare_frame
from MedSSL.tasks.fewshot.calibration import walk_may_grow
from MedSSL.tasks.fewshot.fusion import compose

#: warm refit of a correction: this fraction of the settings' steps
WARM_FRACTION = 6
#: the session's frame is the engine's region of interest grown by this much more (mm). 0: the first result
#: is the engine's own (a larger region changes the intensity normalisation and cost 0.01 Dice on the brain
#: case); a correction that reaches past the region recomputes the features (:meth:`FewShotSession._regrow`)
EXTRA_MARGIN_MM = 0.0


@dataclass
class SessionUpdate:
    """What an update changed: ``box`` [(start, stop)] * 3 (image index axes, half-open; empty when nothing
    changed), ``labels`` (uint8, the box's shape) the new labels there, ``mode`` "full" | "incremental" |
    "unchanged", ``slices`` the main-axis slices recomputed (image indices), ``seconds`` per stage."""

    box: list
    labels: np.ndarray
    mode: str
    axis: int
    slices: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


class FewShotSession:
    """The state of a live session on one image; see the module docstring.

    image: (X, Y, Z) intensities; spacing: (3,) mm; settings: the engine's; warm_steps: the MLP's steps
    of a correction (default settings.steps // WARM_FRACTION).
    """

    def __init__(self, image: np.ndarray, spacing, settings: FewShotSettings = FewShotSettings(),
                 warm_steps: int | None = None, log=None):
        if image.ndim != 3 or min(image.shape) < 2:
            raise MedSSLError(f"the session needs a 3D image, got shape {tuple(image.shape)}")
        self.image = image
        self.spacing = np.asarray(spacing, np.float64)
        self.settings = settings
        self.warm_steps = int(warm_steps) if warm_steps else max(10, settings.steps // WARM_FRACTION)
        self.log = log
        self.volume = None      # the image's Volume when read from a file (painting files are checked against its grid)
        self.painting = np.full(image.shape, IGNORE, np.uint8)
        self.labels = np.zeros(image.shape, np.uint8)
        self.model: FewShotModel | None = None
        self.frame = None
        self._raw = None        # (X', Y', Z') uint8: the frame's result before the clean-up (moved ROI)
        self._rounds = 0
        self._weight_scores = {}  # {appearance weight: [held-out Dice, ...]}, see _score_weights
        self._last = None       # the painting at the last update

    # ------------------------------------------------------------------ the painting

    def set_planes(self, axis: int, planes: dict) -> None:
        """Paint whole planes: ``planes`` {index along ``axis``: (the other two axes) uint8 labels}; 255 =
        not annotated (a plane mostly 255 is no painted plane)."""
        axis = int(axis)
        if axis not in (0, 1, 2):
            raise MedSSLError(f"axis {axis}: expected 0 (i), 1 (j) or 2 (k)")
        shape = tuple(n for a, n in enumerate(self.image.shape) if a != axis)
        for index, plane in planes.items():
            index = int(index)
            if not 0 <= index < self.image.shape[axis]:
                last = self.image.shape[axis] - 1
                raise MedSSLError(f"plane {index} along axis {axis}: outside the image (0..{last})")
            plane = np.asarray(plane)
            if plane.shape != shape:
                raise MedSSLError(f"plane {index} along axis {axis}: shape {plane.shape}, expected {shape}")
            np.moveaxis(self.painting, axis, 0)[index] = plane.astype(np.uint8)

    def clear_planes(self, axis: int, indices) -> None:
        """Remove painted planes (their voxels become not annotated)."""
        for index in indices:
            np.moveaxis(self.painting, int(axis), 0)[int(index)] = IGNORE

    def set_painting(self, painting: np.ndarray) -> None:
        """Replace the whole painting ((X, Y, Z) uint8 on the image grid, 255 = not annotated)."""
        if painting.shape != self.image.shape:
            raise MedSSLError(f"painting {tuple(painting.shape)} and image {tuple(self.image.shape)} differ in shape")
        self.painting = np.ascontiguousarray(painting, np.uint8).copy()

    # ------------------------------------------------------------------ updates

    def update(self) -> SessionUpdate:
        """Bring the result up to date with the painting; see the module docstring."""
        planes = find_painted_planes(self.painting, "painting")
        reason = self._full_reason(planes)
        if reason:
            if self.log and self.model is not None:
                self.log(f"full update: {reason}")
            return self._full(planes)
        return self._incremental(planes)

    def _full_reason(self, planes: PaintedPlanes) -> str:
        """Why the next update must be a full one ("" = it can be incremental)."""
        if self.model is None:
            return "first update"
        old = self.frame.painted_planes
        main = old.main_axis
        if planes.main_axis != main:
            return "the main painting axis changed"
        if any(planes.planes[a] != old.planes[a] for a in range(3) if a != main):
            return "planes along another axis changed"
        counts = np.bincount(self.painting.ravel(), minlength=IGNORE + 1)
        classes = [int(v) for v in np.flatnonzero(counts[1:IGNORE]) + 1]
        if classes != list(self.model.classes):
            return "the painted classes changed"
        return ""

    def _region_grew(self, planes: PaintedPlanes) -> bool:
        """Whether the painted structure, grown by the margin (``settings.margin_mm``), now reaches outside the
        frame (whose region of interest also has room for the structure's growth and for the walk past its
        ends: a correction inside it keeps the features)."""
        painting_m = moved(planes, self.painting)
        spacing_m = self._moved_spacing(planes.main_axis)
        structure = (painting_m > 0) & (painting_m != IGNORE)
        for axis, (region, n) in enumerate(zip(self.frame.box, painting_m.shape)):
            present = np.flatnonzero(structure.any(axis=tuple(a for a in range(3) if a != axis)))
            grow = int(np.ceil(self.settings.margin_mm / spacing_m[axis]))
            if max(0, present[0] - grow) < region.start or min(n, present[-1] + grow + 1) > region.stop:
                return True
        return False

    def _regrow(self) -> None:
        """The frame (features included) made afresh for the current painting, whose region of interest
        grew; the raw result so far is carried over, so that the correction still changes only the slices
        it affects."""
        old, raw = self.frame, self._raw
        self.frame, _, _ = self._prepare()
        self._raw = np.zeros(self.frame.labels.shape, np.uint8)
        overlap = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(old.box, self.frame.box)]
        if all(o.start < o.stop for o in overlap):
            self._raw[_within(overlap, self.frame.box)] = raw[_within(overlap, old.box)]
        if self.log:
            self.log("the painting grew past the region of interest: features computed again for the larger region")

    def _prepare(self):
        previous = self.model
        return prepare_frame(self.image, self.spacing, self.painting, self.settings.margin_mm + EXTRA_MARGIN_MM,
                             previous.backbone if previous else None, previous.backbone_intensity if previous else None)

    def _moved_spacing(self, main: int) -> np.ndarray:
        return np.array([self.spacing[a] for a in range(3) if a != main] + [self.spacing[main]])

    def _full(self, planes: PaintedPlanes) -> SessionUpdate:
        clock = time.perf_counter()
        previous = self.model
        frame, _, _ = self._prepare()
        t_features = time.perf_counter() - clock
        self.model = fit_painting(self.image, self.spacing, self.painting, self.settings, previous, log=self.log,
                                  frame=frame)
        self.frame = frame
        self._start_weight_scores()
        t_fit = time.perf_counter() - clock - t_features
        self._raw = np.zeros(frame.labels.shape, np.uint8)
        recomputed = list(range(frame.labels.shape[2]))
        self._last = self.painting.copy()
        update = self._recompute(recomputed, fresh=True)
        update.mode = "full"
        update.seconds = {"features": round(t_features, 3), "fit": round(t_fit, 3), **update.seconds,
                          "total": round(time.perf_counter() - clock, 3)}
        return update

    def _incremental(self, planes: PaintedPlanes) -> SessionUpdate:
        clock = time.perf_counter()
        main = planes.main_axis
        other = tuple(a for a in range(3) if a != main)
        changed_image = [int(k) for k in np.flatnonzero((self.painting != self._last).any(axis=other))]
        if not changed_image:
            return SessionUpdate([(0, 0)] * 3, np.zeros((0, 0, 0), np.uint8), "unchanged", main)
        if self._region_grew(planes):
            self._regrow()
        frame = self.frame
        z0, z1 = frame.box[2].start, frame.box[2].stop
        known_m = moved(planes, planes.known_mask(self.painting.shape))[frame.box]
        labels_m = np.where(known_m, moved(planes, self.painting)[frame.box], IGNORE).astype(np.uint8)
        changed = [k - z0 for k in changed_image if z0 <= k < z1]
        new_planes = [k - z0 for k in planes.planes[main] if z0 <= k < z1]
        self._score_weights(changed, new_planes, labels_m)
        frame.labels, frame.known, frame.planes, frame.painted_planes = labels_m, known_m, new_planes, planes
        self._rounds += 1
        net = frame.train(self.model.classes, steps=self.warm_steps, seed=self.settings.seed + self._rounds,
                          init=self.model.net)
        self.model = replace(self.model, net=net, planes=planes)
        self._last = self.painting.copy()
        t_fit = time.perf_counter() - clock
        update = self._recompute(affected_slices(changed, new_planes, frame.labels.shape[2]), fresh=False)
        update.mode = "incremental"
        update.seconds = {"fit": round(t_fit, 3), **update.seconds, "total": round(time.perf_counter() - clock, 3)}
        return update

    def _start_weight_scores(self) -> None:
        """The held-out Dice per appearance weight so far: the leave-one-plane-out calibration's mean,
        counted once per held-out plane (none when the weight was given or one plane was painted)."""
        from MedSSL.tasks.fewshot.calibration import MAX_FOLDS

        calibration = self.model.calibration or {}
        held = min(MAX_FOLDS, sum(1 for k in self.frame.planes if self.frame.painted(k).any()))
        self._weight_scores = {float(w): [float(v)] * held for w, v in calibration.items()}

    def _score_weights(self, changed, new_planes, labels_m) -> None:
        """Online calibration of the appearance weight: a newly painted plane between two painted planes is
        held-out evidence, as the current model (before this correction's refit) predicts it from its two
        neighbours; it is scored for every weight of the calibration grid and the best mean Dice so far
        becomes the weight of the slices recomputed from now on (what is shown elsewhere stays)."""
        from MedSSL.tasks.fewshot.calibration import dice
        from MedSSL.tasks.fewshot.fusion import decide, shape_temperature
        from MedSSL.tasks.fewshot.shape import blend, class_distances

        if not self._weight_scores:
            return
        frame, classes = self.frame, self.model.classes
        sampling, dz = tuple(frame.spacing[:2]), float(frame.spacing[2])
        painted = lambda k: np.where(labels_m[..., k] == IGNORE, 0, labels_m[..., k])  # noqa: E731
        for k in changed:
            below, above = [p for p in new_planes if p < k], [p for p in new_planes if p > k]
            if k not in new_planes or not below or not above:
                continue
            lo, hi = max(below), min(above)
            d = blend(class_distances(painted(lo), classes, sampling), class_distances(painted(hi), classes, sampling),
                      (k - lo) / (hi - lo))
            odds = frame.odds(self.model.net, k, k + 1)[..., 0]
            tau = shape_temperature(min(k - lo, hi - k) * dz)
            for w, scores in self._weight_scores.items():
                scores.append(dice(decide(d, tau, odds, w, classes)[0], painted(k), classes))
        means = {w: float(np.mean(v)) for w, v in self._weight_scores.items()}
        best = max(means, key=lambda w: (round(means[w], 3), -abs(w - self.settings.default_weight)))
        if best != self.model.weight:
            if self.log:
                self.log(f"appearance weight {self.model.weight:g} -> {best:g} (held-out corrected planes)")
            self.model = replace(self.model, weight=best, calibration={f"{w:g}": round(v, 4) for w, v in means.items()})

    def _recompute(self, slices: list, fresh: bool) -> SessionUpdate:
        """Recompute Z slices ``slices`` of the frame (moved ROI indices), clean them, write them into the
        result and return what changed.

        The clean-up (components must touch the painting) runs on the slab from the painted plane before
        the first recomputed slice to the one after the last (or the region's edge): a component cannot
        leave that slab without crossing a painted plane, where it meets a painted voxel, so the slab
        gives the same answer as the whole region."""
        clock = time.perf_counter()
        frame, model = self.frame, self.model
        planes = frame.painted_planes
        lo, hi = min(slices), max(slices) + 1
        slab = frame.odds(model.net, lo, hi)
        odds = lambda k: slab[..., k - lo]  # noqa: E731
        out, _ = compose(frame, odds, model.weight, model.taper, model.classes, None if fresh else set(slices),
                         grow=walk_may_grow(model.calibration))
        self._raw[..., slices] = out[..., slices]
        s0, s1 = max(0, lo - 1), min(frame.labels.shape[2], hi + 1)
        box_m = (frame.box[0], frame.box[1], slice(frame.box[2].start + s0, frame.box[2].start + s1))
        from MedSSL.tasks.infer.postprocess import keep_connected_to_annotation

        cleaned = keep_connected_to_annotation(self._raw[..., s0:s1], moved(planes, self.painting)[box_m])
        wanted = [k - s0 for k in slices]
        previous = bounding_box(self.labels > 0) if fresh else None
        if fresh:
            self.labels[...] = 0
        result_m = moved(planes, self.labels)[box_m]  # a view into self.labels
        before = result_m[..., wanted].copy()
        result_m[..., wanted] = cleaned[..., wanted]
        changed = np.zeros(result_m.shape, bool)
        changed[..., wanted] = before != result_m[..., wanted]
        if fresh:
            changed[...] = True  # the client starts from nothing: the whole region comes back
        box = self._image_box(bounding_box(changed), box_m, planes.main_axis)
        if previous is not None and previous[0][1] > 0:  # a full update also clears the previous result
            box = [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(box, previous)]
        labels_box = np.ascontiguousarray(self.labels[tuple(slice(a, b) for a, b in box)])
        return SessionUpdate(box, labels_box, "", planes.main_axis, [frame.box[2].start + k for k in slices],
                             {"apply": round(time.perf_counter() - clock, 3)})

    @staticmethod
    def _image_box(local: list, box_m: tuple, main: int) -> list:
        """A box inside ``box_m`` (moved frame, main axis last) -> the same box in the image's axes."""
        if local[0][1] == 0:
            return [(0, 0)] * 3
        order = [a for a in range(3) if a != main] + [main]
        out = [None] * 3
        for (a, b), region, axis in zip(local, box_m, order):
            out[axis] = (region.start + a, region.start + b)
        return out


def _within(region, box) -> tuple:
    """Slices of ``region`` relative to the start of ``box`` (both tuples of slices of one frame)."""
    return tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box))


def bounding_box(mask: np.ndarray) -> list:
    """Half-open [(start, stop)] * 3 of the True voxels of ``mask`` ([(0, 0)] * 3 when there are none)."""
    if not mask.any():
        return [(0, 0)] * 3
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return box


def affected_slices(changed, new_planes, depth: int) -> list:
    """Z slices (frame indices) a correction recomputes: for each changed slice k (a plane added, repainted
    or removed), those between the painted planes now on either side of k (a removed plane's two gaps
    merge), to the region's edge when there is none (the walk past an end plane; an end plane that was
    repainted or removed is itself in ``changed``, so the walk past it is recomputed). Sorted, no
    duplicates."""
    out = set()
    for k in changed:
        below = [p for p in new_planes if p < k]
        above = [p for p in new_planes if p > k]
        start = max(below) + 1 if below else 0
        stop = min(above) if above else depth
        out.update(range(start, stop))
        out.add(k)
    return sorted(k for k in out if 0 <= k < depth)
