"""``medssl suggest``: which slices to annotate next, ranked by the model's uncertainty.

Uncertainty per voxel: the entropy of the test-time-augmented prediction (softmax averaged over the
identity and three flips), divided by log(C) so it lies in [0, 1]. A slice's score is the mean over its
voxels. Already annotated slices can be left out (``annotation``): with 255 present in the label map a
slice counts as annotated when (almost) all of its voxels are other than 255 (a painted plane: planes
painted along another axis only cross it); a label map without 255 (exported segmentations) counts
slices holding any non-zero voxel.

2D bundles (one-slice images) are refused: an image of one slice has no other slice to suggest.
"""

from __future__ import annotations

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.data.labels import IGNORE
from MedSSL.io.volumes import Volume
from MedSSL.engine.progress import Progress
from MedSSL.tasks.infer.model import LoadedModel, inference_window, prepare
from MedSSL.tasks.infer.predict import to_input_grid
from MedSSL.engine.sliding_window import SegmentationReducer, make_predictor, run_slabs


def slice_entropy(model: LoadedModel, volume: Volume, image_path, tta: bool = True, overlap: float = 0.5,
                  memory_mb: float = 1024.0, progress: Progress | None = None) -> np.ndarray:
    """float16 (X, Y, Z) normalised predictive entropy on the input grid."""
    array, work = prepare(model, volume, image_path, progress.log if progress else None)
    n = len(model.channel_values)
    reducer = SegmentationReducer(work.shape, n, entropy=True)
    if progress:
        progress.stage("predict", "uncertainty with test-time flips", total=1)
    window = inference_window(model, work.shape)
    run_slabs(array, make_predictor(model.network, tta=tta, entropy=True), window, n + 1, reducer,
              overlap=overlap, memory_mb=memory_mb, device=model.device,
              on_slab=(lambda i, k: progress.update(i, k)) if progress else None, spatial_dims=model.spatial_dims)
    return to_input_grid(reducer.entropy, work, volume, nearest=False)


def annotated_slices(annotation: np.ndarray, axis: int) -> np.ndarray:
    """Boolean (n_slices,) along ``axis``: which slices are already annotated (see module doc)."""
    from MedSSL.data.painted_planes import PAINTED_FRACTION

    other = tuple(a for a in range(3) if a != axis)
    if np.any(annotation == IGNORE):
        return (annotation != IGNORE).mean(axis=other) >= PAINTED_FRACTION
    return np.any(annotation > 0, axis=other)


def rank_slices(entropy: np.ndarray, volume: Volume, count: int, axis: int = 2, exclude: np.ndarray | None = None,
                min_gap: int = 1) -> list[dict]:
    """The ``count`` most uncertain slices along ``axis`` as ``{"axis", "index", "score", "center_mm"}``.

    Slices in ``exclude`` are skipped; chosen slices are at least ``min_gap`` apart. ``center_mm``: the
    LPS position of the slice's centre.
    """
    other = tuple(a for a in range(3) if a != axis)
    scores = entropy.astype(np.float32).mean(axis=other)
    order = np.argsort(-scores, kind="stable")
    chosen: list[int] = []
    for index in order:
        if exclude is not None and exclude[index]:
            continue
        if any(abs(int(index) - c) < min_gap for c in chosen):
            continue
        chosen.append(int(index))
        if len(chosen) == count:
            break
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1) / 2
    out = []
    for index in chosen:
        point = centre.copy()
        point[axis] = index
        out.append({"axis": axis, "index": index, "score": round(float(scores[index]), 6),
                    "center_mm": [round(float(c), 3) for c in volume.index_to_physical(point)[0]]})
    return out


def suggest(model: LoadedModel, volume: Volume, image_path, count: int = 5, axis: int = 2,
            annotation: np.ndarray | None = None, min_gap: int = 1, progress: Progress | None = None,
            memory_mb: float = 1024.0) -> dict:
    """``{"slices": [...]}`` (see :func:`rank_slices`)."""
    if model.task != "segment":
        raise MedSSLError(f"--model: a {model.task} bundle; suggest needs a segmentation bundle")
    if model.spatial_dims == 2:
        raise MedSSLError(f"{image_path}: suggest ranks the slices of a 3D volume; the --model is 2D (one-slice "
                          "images have no other slice to annotate): use `medssl predict` and correct its label map")
    if count < 1:
        raise MedSSLError(f"--count {count}: must be at least 1")
    if axis not in (0, 1, 2):
        raise MedSSLError(f"--axis {axis}: expected 0, 1 or 2")
    exclude = annotated_slices(annotation, axis) if annotation is not None else None
    if exclude is not None and exclude.all():
        raise MedSSLError("--label: every slice along axis %d is already annotated" % axis)
    entropy = slice_entropy(model, volume, image_path, memory_mb=memory_mb, progress=progress)
    return {"slices": rank_slices(entropy, volume, count, axis, exclude, min_gap)}
