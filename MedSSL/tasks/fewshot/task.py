"""The few-shot engine behind the CLI: ``finetune`` on a painting, ``predict`` and ``suggest`` with a
few-shot bundle. Files in, files out; the engine itself is :mod:`.engine`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import WRITE_SUFFIXES, Volume, read_volume
from MedSSL.engine.progress import Progress
from MedSSL.tasks.fewshot.engine import FewShotSettings, apply_painting, fit_painting
from MedSSL.data.painted_planes import IGNORE, is_painting

#: ``--engine`` choices of ``medssl finetune``
ENGINES = ("auto", "fewshot", "network")

#: the few-shot fit's phases as progress reports them (``finetune``), with their status messages; ``predict``
#: reports the fourth, "apply"
FIT_PHASES = {"features": "image features around the painted structure",
              "fit": "learning the painted structure's appearance",
              "calibration": "choosing the appearance weight on held-out painted planes"}


def read_pair(image_path, label_path) -> tuple[Volume, np.ndarray]:
    """The image and its painted label (uint8 on the image grid); MedSSLError naming the file."""
    from MedSSL.data.labels import label_array

    image = read_volume(image_path)
    label = label_array(read_volume(label_path), image, label_path, image_path)
    return image, label


def choose_engine(config, engine: str) -> str:
    """"fewshot" or "network" for a segmentation fine-tuning run.

    auto: the few-shot engine for one 3D image whose label is a painting (painted planes, 255 elsewhere);
    the network for dense labels, several images, one-slice (2D) images, detectors (``--detection``: a
    detector is applied to other scans, which have no painting), self-training (``--unlabeled``: a cohort
    model) and runs under torchrun (WORLD_SIZE > 1).
    """
    if engine not in ENGINES:
        raise MedSSLError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if engine == "fewshot" and getattr(config, "detection", False):
        raise MedSSLError("--detection: a detector is applied to other scans; it needs --engine network (or auto)")
    if engine == "network" or getattr(config, "detection", False) or getattr(config, "unlabeled", None):
        return "network"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: the engine is one process of seconds
        if engine == "fewshot":
            raise MedSSLError("--engine fewshot runs in one process (seconds on a CPU); start it without torchrun")
        return "network"
    if len(config.images) != 1 or len(config.labels) != 1:
        if engine == "fewshot":
            raise MedSSLError("--engine fewshot: give exactly one --image and its painted --label")
        return "network"
    label = read_volume(config.labels[0]).array  # the image is read (and the grids checked) by the chosen path
    painting = min(label.shape) > 1 and is_painting(label)
    if engine == "fewshot" and not painting:
        raise MedSSLError(f"--label {config.labels[0]}: not a painting (whole planes annotated, 255 elsewhere), "
                          "which --engine fewshot needs")
    return "fewshot" if painting else "network"


def _classes(config, values: list[int]) -> dict:
    """The bundle's classes: ``--classes``, else the label's sidecar file, else defaults (as the network path)."""
    from MedSSL.data.labels import classes_to_json, resolve_classes
    from MedSSL.tasks.finetune.segment_data import given_classes

    given, where = given_classes(config)
    return classes_to_json(resolve_classes(values, given, where))


def _check_same_image(meta, image: Volume, init) -> None:
    """A few-shot model continues the painting of its own image only: MedSSLError when ``--init``'s recorded
    image size or spacing differs from ``--image``'s (the model.json of older bundles may lack them)."""
    summary = meta.data_summary or {}
    shapes, spacings = summary.get("shapes") or [], summary.get("spacings_mm") or []
    if shapes and [int(v) for v in shapes[0]] != [int(v) for v in image.shape]:
        raise MedSSLError(f"--init {init}: a few-shot model of an image of size {list(shapes[0])}, not "
                          f"{list(image.shape)}: it only continues the painting of its own image; pass a pretrained "
                          "model or none")
    if spacings and not np.allclose(spacings[0], image.spacing, atol=1e-3):
        raise MedSSLError(f"--init {init}: a few-shot model of an image with spacing {list(spacings[0])} mm, not "
                          f"{[round(float(v), 4) for v in image.spacing]} mm: it only continues the painting of "
                          "its own image; pass a pretrained model or none")


def _initial(config, progress: Progress, image: Volume):
    """(previous few-shot model or None, backbone or None, its intensity or None) from ``--init``; a previous
    few-shot model must come from an image of the same size and spacing (:func:`_check_same_image`)."""
    if config.init is None or str(config.init).lower() == "none":
        return None, None, None
    from MedSSL.tasks.fewshot.bundle import is_fewshot_bundle, load_fewshot_bundle

    if is_fewshot_bundle(config.init):
        previous, meta = load_fewshot_bundle(config.init, "--init")
        _check_same_image(meta, image, config.init)
        progress.log(f"correction round: starting from the few-shot model {config.init}")
        return previous, None, None
    from MedSSL.models.initial_weights import load_initial_weights
    from MedSSL.tasks.fewshot.network_features import build_backbone, intensity_of

    init = load_initial_weights(config.init)
    if init.spatial_dims != 3:
        raise MedSSLError(f"--init {config.init}: a 2D network; the few-shot engine takes a 3D U-Net's features")
    progress.log(f"appearance features: hand-made + the decoder of --init {config.init} (width {init.width})")
    return None, build_backbone(init), intensity_of(init)


def finetune_fewshot(config, progress: Progress, steps: int | None = None) -> Path:
    """Fit the few-shot engine on one painted image and write a few-shot bundle; returns its folder.

    steps: the appearance MLP's optimiser steps (``--steps``; default :class:`FewShotSettings`'s)."""
    from MedSSL.engine.runtime import OutputLock
    from MedSSL.tasks.fewshot.bundle import save_fewshot_bundle

    started = time.perf_counter()
    progress.stage("preprocess", "reading the image and its painting")
    image, label = read_pair(config.images[0], config.labels[0])
    values = sorted(int(v) for v in np.unique(label) if 0 < v < IGNORE)
    if not values:
        raise MedSSLError(f"--label {config.labels[0]}: no class voxels on the painted planes; paint the structure")
    classes = _classes(config, values)
    previous, backbone, intensity = _initial(config, progress, image)
    settings = FewShotSettings(seed=config.seed, steps=int(steps) if steps else FewShotSettings.steps)
    phases = list(FIT_PHASES)

    def phase(name):  # each phase a stage, and the bar one step further
        progress.stage(name, FIT_PHASES[name], total=len(phases))
        progress.update(phases.index(name), len(phases))

    model = fit_painting(image.array, image.spacing, label, settings, previous, backbone, intensity, progress.log,
                         phase=phase)
    progress.update(len(phases), len(phases))
    out = Path(config.out)
    with OutputLock(out):
        extra = {"history": [{"seconds": round(time.perf_counter() - started, 2)}],
                 "data_summary": {"volumes": 1, "shapes": [list(image.shape)],
                                  "spacings_mm": [[round(float(s), 4) for s in image.spacing]]},
                 "init": {"fewshot_round": previous is not None, "backbone": backbone is not None}}
        save_fewshot_bundle(out, model, classes, extra)
    progress.log(f"few-shot model written to {out} in {time.perf_counter() - started:.1f} s")
    return out


def predict_fewshot(model_path, image_path, out, annotation_path, progress: Progress, detections=None,
                    probabilities=None, min_volume_mm3: float = 0.0, select=None) -> dict:
    """``medssl predict`` with a few-shot bundle: the painting (``--annotation``) is required.
    ``select``: None or a function filtering the detections list."""
    from MedSSL.tasks.infer.detect import find_detections
    from MedSSL.tasks.infer.predict import check_output_path, write_segmentation
    from MedSSL.tasks.fewshot.bundle import load_fewshot_bundle

    if annotation_path is None:
        raise MedSSLError(f"--model {model_path}: a few-shot model completes a painting; pass the painted label map "
                          "of this image with --annotation PAINTED (it holds the shape the model continues)")
    check_output_path(out, WRITE_SUFFIXES, "--out")
    if detections:
        check_output_path(detections, (".json",), "--detections")
    if probabilities:
        check_output_path(probabilities, WRITE_SUFFIXES, "--probabilities")
    model, meta = load_fewshot_bundle(model_path)
    progress.stage("preprocess", "reading the image and its painting")
    image, label = read_pair(image_path, annotation_path)
    progress.stage("apply", "shape prior + appearance, slice by slice", total=1)
    progress.update(0, 1)
    result = apply_painting(model, image.array, image.spacing, label)
    progress.update(1, 1)
    progress.log(f"painted planes: {result.planes.describe()}; {int((result.labels > 0).sum())} voxels segmented")
    fg_prob = np.where(result.labels > 0, result.probability, 1.0 - result.probability).astype(np.float32)
    found = None
    if detections:
        names = {value: entry["name"] for value, entry in meta.class_table.items()}
        found = find_detections(result.labels, np.where(result.labels > 0, fg_prob, 0).astype(np.float16), image,
                                names, min_volume_mm3)
        found = select(found) if select else found
    progress.stage("write", "writing the outputs")
    return write_segmentation(image.with_array(result.labels.astype(np.uint8)), out, fg_prob, probabilities, found,
                              detections)


def suggest_fewshot(model_path, image_path, annotation_path, count: int, min_gap: int) -> dict:
    """The ``count`` planes (along the painting's main axis) where the engine is least sure, unpainted ones only.

    Uncertainty of a voxel: ``1 - |2 p - 1|`` with p the probability of the chosen class; a plane's score is
    its sum over the plane divided by the plane's voxel count (mean), as for network bundles.
    """
    from MedSSL.tasks.infer.suggest import rank_slices
    from MedSSL.tasks.fewshot.bundle import load_fewshot_bundle

    if annotation_path is None:
        raise MedSSLError(f"--model {model_path}: a few-shot model needs the current painting: pass --label PAINTED")
    model, _ = load_fewshot_bundle(model_path)
    image, label = read_pair(image_path, annotation_path)
    result = apply_painting(model, image.array, image.spacing, label)
    uncertainty = 1.0 - np.abs(2.0 * result.probability - 1.0)
    axis = result.planes.main_axis
    exclude = np.zeros(image.shape[axis], bool)
    exclude[list(result.planes.planes[axis])] = True
    return {"slices": rank_slices(uncertainty, image, count, axis, exclude, min_gap)}
