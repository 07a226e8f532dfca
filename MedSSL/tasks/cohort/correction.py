"""Correcting the cohort network's draft on a new scan with a plane or two.

The network's prediction (the draft) is right on most planes of a new scan. The user repaints one or two
planes where it is wrong; :func:`correct_draft` then lets the few-shot engine redo the scan from a painting
made of the user's planes exactly and a few planes of the draft (:data:`DRAFT_PLANES` per class, spread over
the draft's extent as a user would paint them, none nearer than ``gap_mm`` to a corrected plane). The engine
interpolates the shape between them and learns the appearance of this very scan on them, so the correction
reaches every plane, not only its neighbours. With ``draft_planes=None`` it is given the draft on every plane
farther than ``gap_mm`` instead, and only the planes near the corrections change (the first design: 0.826
against 0.849 with 5 draft planes after one corrected plane on a left-atrium draw, docs/cohort.md).
Painted voxels keep their values.

The network's class probabilities (``prior``, from :func:`MedSSL.tasks.infer.predict.segment` with
``class_probs=True``) join the engine's appearance features as log-odds (:func:`prior_features`), so the
engine's classifier, trained on the corrected and draft planes, learns where to follow the network and where
the image: on the 12 left-atrium scans of docs/cohort.md 0.848 against 0.836 after one corrected plane.
"""

from __future__ import annotations

import numpy as np

from MedSSL.data.painted_planes import IGNORE, PAINTED_FRACTION, PaintedPlanes, spread_planes
from MedSSL.errors import MedSSLError
from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted

#: planes nearer than this to a corrected plane (mm) are redone by the engine (4, 8 and 12 mm compared on
#: a left-atrium draw, docs/cohort.md: 12 was worst, 4 and 8 within 0.005)
GAP_MM = 8.0
#: planes of the draft per class given to the engine with the corrections (3, 5 and 7 compared, docs/cohort.md)
DRAFT_PLANES = 5
#: the network's probabilities are clipped to [PRIOR_CLIP, 1 - PRIOR_CLIP] before their log-odds are taken
PRIOR_CLIP = 1e-3


def prior_features(class_probs: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) probabilities of the network's C foreground classes -> (C, X, Y, Z) float16 log-odds,
    clipped at +-log((1 - PRIOR_CLIP) / PRIOR_CLIP) (about +-6.9; float16 keeps the memory of the input)."""
    from scipy.special import logit

    out = np.empty(np.shape(class_probs), np.float16)
    for c, probs in enumerate(class_probs):
        out[c] = logit(np.clip(np.asarray(probs, np.float32), PRIOR_CLIP, 1.0 - PRIOR_CLIP))
    return out


def corrected_planes(corrected: np.ndarray, where: str = "corrections") -> PaintedPlanes:
    """The whole planes painted in ``corrected`` (X, Y, Z; 255 elsewhere). Unlike a first painting, a corrected
    plane may hold background only (the user erased what the draft wrongly found there)."""
    annotated = corrected != IGNORE
    planes = tuple(tuple(int(k) for k in np.flatnonzero(annotated.mean(axis=tuple(a for a in range(3) if a != axis))
                                                         >= PAINTED_FRACTION)) for axis in range(3))
    found = PaintedPlanes(planes)
    if found.count == 0:
        raise MedSSLError(f"{where}: no corrected plane (repaint whole slices where the draft is wrong; 255 elsewhere)")
    return found


def correction_painting(draft: np.ndarray, corrected: np.ndarray, axis: int, spacing, gap_mm: float = GAP_MM,
                        draft_planes: int | None = DRAFT_PLANES) -> np.ndarray:
    """The engine's painting (X, Y, Z) uint8: the corrected planes of ``corrected`` (X, Y, Z; 255 elsewhere)
    and, of the planes of ``axis`` farther than ``gap_mm`` from all of them, the draft on ``draft_planes``
    per class spread over the draft's extent (None: on every one); 255 elsewhere."""
    planes = corrected_planes(corrected).planes[axis] if np.any(corrected != IGNORE) else ()
    positions = np.arange(draft.shape[axis]) * float(spacing[axis])
    near = np.zeros(draft.shape[axis], bool)
    for k in planes:
        near |= np.abs(positions - positions[k]) < gap_mm
    keep = np.flatnonzero(~near)
    if draft_planes is not None:
        keep = [k for k in spread_planes(draft, axis, draft_planes) if not near[k]]
    painting = np.full(draft.shape, IGNORE, np.uint8)
    index = [slice(None)] * 3
    index[axis] = keep
    painting[tuple(index)] = draft[tuple(index)]
    index[axis] = list(planes)
    painting[tuple(index)] = corrected[tuple(index)]
    return painting


def correct_draft(image: np.ndarray, spacing, draft: np.ndarray, corrected: np.ndarray, gap_mm: float = GAP_MM,
                  settings: FewShotSettings = FewShotSettings(), draft_planes: int | None = DRAFT_PLANES,
                  prior: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, Z) uint8 labels: the scan redone by the few-shot engine from the user's corrected planes
    (``corrected``: those planes painted, 255 elsewhere) and planes of ``draft`` (X, Y, Z uint8, the network's
    labels), see :func:`correction_painting`. image: (X, Y, Z) intensities; spacing: (3,) mm; prior: None or
    (C, X, Y, Z) probabilities of the network's foreground classes, added to the engine's features as
    log-odds (:func:`prior_features`)."""
    axis = corrected_planes(corrected).main_axis
    painting = correction_painting(draft, corrected, axis, spacing, gap_mm, draft_planes)
    if not np.any((painting > 0) & (painting != IGNORE)):  # nothing left to complete: all background
        return np.where(painting == IGNORE, 0, painting).astype(np.uint8)
    extra = None if prior is None else prior_features(prior)
    _, result = segment_painted(np.asarray(image, np.float32), spacing, painting, settings, extra_features=extra)
    return result.labels.astype(np.uint8)


def refine_draft(image: np.ndarray, spacing, draft: np.ndarray, axis: int = 2,
                 settings: FewShotSettings = FewShotSettings(), draft_planes: int = DRAFT_PLANES) -> np.ndarray:
    """(X, Y, Z) uint8 labels: the scan redone by the few-shot engine from ``draft_planes`` planes per class of
    ``draft`` along ``axis`` alone (no correction). image: (X, Y, Z) intensities; spacing: (3,) mm."""
    painting = correction_painting(draft, np.full(draft.shape, IGNORE, np.uint8), axis, spacing,
                                   draft_planes=draft_planes)
    if not np.any((painting > 0) & (painting != IGNORE)):
        return np.asarray(draft, np.uint8)
    _, result = segment_painted(np.asarray(image, np.float32), spacing, painting, settings)
    return result.labels.astype(np.uint8)


def worst_planes(draft: np.ndarray, truth: np.ndarray, axis: int, count: int, min_gap: int = 3) -> list[int]:
    """The ``count`` planes along ``axis`` where ``draft`` and ``truth`` disagree on the most voxels, at least
    ``min_gap`` planes apart (a simulated user correcting where the draft is worst)."""
    other = tuple(a for a in range(3) if a != axis)
    errors = (draft != truth).sum(axis=other).astype(float)
    picks: list[int] = []
    for k in np.argsort(-errors, kind="stable"):
        if len(picks) == count or errors[k] == 0:
            break
        if all(abs(int(k) - p) >= min_gap for p in picks):
            picks.append(int(k))
    return sorted(picks)


def is_cohort_model(meta) -> bool:
    """A network bundle written by the cohort path (model.json has a ``cohort`` entry)."""
    from MedSSL.io.bundle import ABSENT

    return meta.cohort is not ABSENT


def predict_corrected(model, image_path, annotation_path, out, options, progress, probabilities=None) -> dict:
    """``medssl predict --model COHORT --image NEW --annotation CORRECTED``: the network's draft of ``NEW``,
    corrected on the planes painted in ``CORRECTED`` (:func:`correct_draft`); writes the label map (and the
    draft's foreground probability when asked) and returns the outputs."""
    from MedSSL.io.volumes import WRITE_SUFFIXES, read_volume
    from MedSSL.tasks.infer.predict import check_output_path, read_annotation, segment, write_segmentation

    check_output_path(out, WRITE_SUFFIXES, "--out")
    if probabilities:
        check_output_path(probabilities, WRITE_SUFFIXES, "--probabilities")
    progress.stage("preprocess", "reading the image and the corrected planes")
    volume = read_volume(image_path)
    corrected = read_annotation(annotation_path, volume, image_path)
    planes = corrected_planes(corrected, f"--annotation {annotation_path}")
    draft = segment(model, volume, image_path, options, progress, class_probs=True)
    progress.stage("correct", f"the few-shot engine redoes the scan from {planes.describe()} and the draft", total=1)
    labels = correct_draft(volume.array, volume.spacing, draft.labels.array, corrected, prior=draft.class_probs)
    progress.update(1, 1)
    progress.stage("write", "writing the outputs")
    return write_segmentation(volume.with_array(labels), out, draft.fg_prob if probabilities else None, probabilities,
                              None, None)
