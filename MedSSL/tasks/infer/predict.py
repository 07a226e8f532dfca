"""``medssl predict``: apply a segmentation or classification bundle to one image.

Segmentation output: a uint8 label map of the original label values on the input's grid (resampled back
with nearest neighbour when the model works at another spacing). Optional outputs: the foreground
probability ``1 - p(background)`` as float32 in [0, 1] (for a one-class model, the probability of that
class), and detections (:mod:`.detect`). Memory is bounded: see :mod:`.sliding`.

A 2D bundle (``architecture.spatial_dims: 2``) takes a one-slice image (X, Y, 1) and writes a one-slice
label map (and probabilities) on its grid; ``--annotation``, ``--largest-component`` and detections work
on it as on a volume of one slice (connectivity: the 4 in-plane neighbours).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSSL.io.atomic import atomic_write_text
from MedSSL.errors import MedSSLError
from MedSSL.data.labels import label_array
from MedSSL.io.volumes import WRITE_SUFFIXES, Volume, read_volume, resample_to_grid, write_volume
from MedSSL.engine.progress import Progress
from MedSSL.tasks.infer import PredictOptions  # noqa: F401  (kept light for the CLI)
from MedSSL.tasks.infer.detect import find_detections
from MedSSL.tasks.infer.model import LoadedModel, inference_window, prepare
from MedSSL.tasks.infer.postprocess import drop_small_pieces, keep_connected_to_annotation, largest_component_per_class
from MedSSL.engine.sliding_window import SegmentationReducer, make_predictor, run_slabs
from MedSSL.tasks.infer.adaptation import adapt_to_scan, wants_adaptation


@dataclass
class SegmentationResult:
    """labels: uint8 volume on the input grid; max_prob: float16 (X, Y, Z) probability of the predicted
    channel; fg_prob: float16 (X, Y, Z) foreground probability (both on the input grid; Z = 1 for a
    one-slice image); class_probs: float16 (C, X, Y, Z) probability of each of the C foreground classes
    (``model.channel_values[1:]``) on the input grid, only when asked for."""

    labels: Volume
    max_prob: np.ndarray
    fg_prob: np.ndarray
    class_probs: np.ndarray | None = None


def check_output_path(path, kinds: tuple, option: str) -> Path:
    p = Path(path)
    if not any(p.name.lower().endswith(k) for k in kinds):
        raise MedSSLError(f"{option} {path}: must end with {' or '.join(kinds)}")
    if p.is_dir():
        raise MedSSLError(f"{option} {path}: is a folder; give a file name")
    return p


def write_json(path, data) -> None:
    """Write JSON atomically (temporary file + rename), creating the folder if needed."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise MedSSLError(f"{path}: cannot write ({exc.strerror})") from None


def to_input_grid(array: np.ndarray, work: Volume, volume: Volume, nearest: bool) -> np.ndarray:
    """``array`` on ``work``'s grid -> on ``volume``'s grid (nearest keeps the dtype; linear gives float16)."""
    if work is volume or work.same_grid(volume):
        return array
    src = work.with_array(array if nearest else array.astype(np.float32))
    out = resample_to_grid(src, volume, nearest=nearest, default=0).array
    return out if nearest else out.astype(np.float16)


#: at most this many classes are brought back from a coarser working grid class by class (linear)
SMOOTH_UPSAMPLING_CLASSES = 8


def upsample_labels(labels: np.ndarray, work: Volume, volume: Volume) -> np.ndarray:
    """Labels (X, Y, Z) on ``work``'s grid -> on ``volume``'s grid.

    From a coarser working grid (a model trained at another spacing), nearest-neighbour resampling draws
    every boundary as a staircase of working voxels; with up to :data:`SMOOTH_UPSAMPLING_CLASSES` classes,
    each class' mask is resampled linearly instead and every input voxel takes the class of largest value
    (background where none reaches 0.5), so boundaries follow the interpolated surface. More classes:
    nearest neighbour (memory and time grow with the class count)."""
    if work is volume or work.same_grid(volume):
        return labels
    values = [int(v) for v in np.unique(labels) if v]
    if not values or len(values) > SMOOTH_UPSAMPLING_CLASSES:
        return to_input_grid(labels, work, volume, nearest=True)
    best = np.full(volume.shape, 0.5, np.float32)
    out = np.zeros(volume.shape, labels.dtype)
    for value in values:
        share = resample_to_grid(work.with_array((labels == value).astype(np.float32)), volume, nearest=False).array
        better = share > best
        out[better], best[better] = value, share[better]
    return out


def cohort_clean_up(meta) -> tuple[list[int], float] | None:
    """(classes, share): a cohort model's clean-up, pieces of these classes smaller than ``share`` of their
    largest piece removed (model.json ``cohort.postprocess``, chosen from the training labels by
    :mod:`MedSSL.tasks.cohort.components`); None for other bundles or when no class qualifies."""
    record = (meta.cohort if isinstance(meta.cohort, dict) else {}).get("postprocess") or {}
    classes = [int(v) for v in record.get("one_piece_classes", [])]
    return (classes, float(record["drop_pieces_below"])) if classes and "drop_pieces_below" in record else None


def read_annotation(path, volume: Volume, image_path) -> np.ndarray:
    """The painted label map of ``volume`` (uint8, 255 = not annotated); MedSSLError when off-grid."""
    return label_array(read_volume(path), volume, path, image_path)


def segment(model: LoadedModel, volume: Volume, image_path, options: PredictOptions,
            progress: Progress | None = None, annotation: np.ndarray | None = None,
            class_probs: bool = False) -> SegmentationResult:
    """Run a segmentation bundle on ``volume``; see the module docstring. ``class_probs``: also return each
    foreground class' probability on the input grid (:class:`SegmentationResult`)."""
    log = progress.log if progress else None
    array, work = prepare(model, volume, image_path, log)
    n = len(model.channel_values)
    network = model.network
    if wants_adaptation(model, options.bn_adaptation):
        draft = SegmentationReducer(work.shape, n)
        _sliding_window(model, network, array, work, options, draft, progress, "draft, for the BatchNorm adaptation")
        network = adapt_to_scan(model, array, draft.channel, work.spacing, work.direction,
                                low_precision=not options.fp32)
        del draft
    reducer = SegmentationReducer(work.shape, n, class_probs=class_probs)
    _sliding_window(model, network, array, work, options, reducer, progress, "")
    del array
    labels = upsample_labels(model.channel_values[reducer.channel], work, volume)
    max_prob = to_input_grid(reducer.max_prob, work, volume, nearest=False)
    fg_prob = to_input_grid(reducer.fg_prob, work, volume, nearest=False)
    per_class = None if reducer.class_probs is None else np.stack(
        [to_input_grid(p, work, volume, nearest=False) for p in reducer.class_probs]).astype(np.float16)
    if annotation is not None:
        labels = keep_connected_to_annotation(labels, annotation)
    clean_up = None if options.all_components else cohort_clean_up(model.meta)
    if options.largest_component:
        labels = largest_component_per_class(labels)
    elif clean_up:
        labels = drop_small_pieces(labels, *clean_up)
    out = volume.with_array(labels.astype(np.uint8))
    return SegmentationResult(out, max_prob, fg_prob, per_class)


def _sliding_window(model: LoadedModel, network, array: np.ndarray, work: Volume, options: PredictOptions,
                    reducer: SegmentationReducer, progress: Progress | None, purpose: str) -> None:
    """Run ``network`` over ``array`` (the model's input on ``work``'s grid) into ``reducer``."""
    if progress:
        what = f" ({purpose})" if purpose else ""
        progress.stage("predict", f"sliding window over {'x'.join(map(str, work.shape))} voxels{what}", total=1)
    window = inference_window(model, work.shape, options.window, options.sw_batch_size)
    run_slabs(array, make_predictor(network, options.tta, low_precision=not options.fp32), window, len(model.channel_values),
              reducer, overlap=options.overlap, sw_batch_size=options.sw_batch_size, memory_mb=options.memory_mb,
              device=model.device, on_slab=(lambda i, k: progress.update(i, k)) if progress else None,
              spatial_dims=model.spatial_dims)


def classify(model: LoadedModel, volume: Volume, image_path, tta: bool = False) -> dict:
    """``{"probabilities": {name: p}, "label": value, "name": name}`` for a classification bundle."""
    from MedSSL.tasks.infer.classify import predict_classification

    array, _ = prepare(model, volume, image_path)
    probs = predict_classification(model.network, array, model.patch, model.device, tta)
    best = int(np.argmax(probs))
    value = model.class_values[best]
    return {"probabilities": {model.name_of(v): round(float(p), 6) for v, p in zip(model.class_values, probs)},
            "label": value, "name": model.name_of(value)}


def predict_files(model: LoadedModel, image_path, out, options: PredictOptions, progress: Progress,
                  detections=None, probabilities=None) -> dict:
    """Predict ``image_path`` and write the requested files; returns {"labels"|"prediction": path, ...}.

    Every output path is checked before any work, and files are written only once everything is
    computed (each one atomically).
    """
    if model.task == "classify":
        check_output_path(out, (".json",), "--out")
        if detections or probabilities or options.annotation:
            raise MedSSLError("--model: a classification bundle gives one label per volume; "
                              "--detections, --probabilities and --annotation apply to segmentation bundles")
    else:
        check_output_path(out, WRITE_SUFFIXES, "--out")
        if detections:
            check_output_path(detections, (".json",), "--detections")
        if probabilities:
            check_output_path(probabilities, WRITE_SUFFIXES, "--probabilities")
    progress.stage("preprocess", "reading the image")
    volume = read_volume(image_path)
    if model.task == "classify":
        result = classify(model, volume, image_path, options.tta)
        write_json(out, result)
        progress.log(json.dumps(result["probabilities"]))
        return {"prediction": os.fspath(out), **result}
    annotation = read_annotation(options.annotation, volume, image_path) if options.annotation else None
    seg = segment(model, volume, image_path, options, progress, annotation)
    found = None
    if detections:
        progress.stage("detect", "connected components")
        names = {v: model.name_of(v) for v in model.classes}
        prob = np.where(seg.labels.array > 0, seg.max_prob, 0).astype(np.float16)
        found = find_detections(seg.labels.array, prob, volume, names, options.min_volume_mm3)
        found = options.select(found) if options.select else found
    progress.stage("write", "writing the outputs")
    return write_segmentation(seg.labels, out, seg.fg_prob if probabilities else None, probabilities, found, detections)


def write_segmentation(labels: Volume, out, fg_prob, probabilities, found, detections) -> dict:
    """Write the label map, and the foreground probability (X, Y, Z) and findings when asked; returns
    ``{"labels": path, "probabilities": path, "detections": path, "findings": count}`` for what was written."""
    outputs = {"labels": os.fspath(out)}
    write_volume(labels, out)
    if probabilities:
        write_volume(labels.with_array(np.asarray(fg_prob, np.float32)), probabilities)
        outputs["probabilities"] = os.fspath(probabilities)
    if found is not None:
        write_json(detections, found)
        outputs["detections"] = os.fspath(detections)
        outputs["findings"] = len(found)
    return outputs
