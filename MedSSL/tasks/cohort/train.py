"""``medssl finetune`` on several scans (or ``--engine network``): the cohort model.

What it adds to :func:`MedSSL.tasks.finetune.segment.finetune_segmentation`: paintings completed by the
few-shot engine (:mod:`.completion`), a working grid chosen for the CPU when neither ``--spacing`` nor the
``--init`` bundle sets one (:mod:`.grid`), and the width of a network from scratch chosen for the CPU
(:data:`DEFAULT_WIDTH`). Each choice is logged and recorded in model.json (``cohort``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from MedSSL.data.labels import present_values
from MedSSL.data.painted_planes import IGNORE, find_painted_planes, is_painting
from MedSSL.data.spatial import is_one_slice
from MedSSL.engine.progress import Progress
from MedSSL.io.volumes import read_volume
from MedSSL.tasks import FinetuneConfig
from MedSSL.tasks.cohort.completion import PaintingCompleter
from MedSSL.tasks.cohort.components import ComponentSurvey
from MedSSL.tasks.cohort.grid import class_diameters_mm, working_spacing
from MedSSL.tasks.finetune.common import load_init, preprocessing_from_init
from MedSSL.tasks.finetune.segment import finetune_segmentation
from MedSSL.models.initial_weights import input_channels

#: U-Net width of a cohort network trained from scratch (``--width`` overrides; ``--init`` sets its own)
DEFAULT_WIDTH = 8
#: optimiser steps of a first cohort model of one class when neither ``--steps`` nor ``--max-time`` is given:
#: 5 painted scans, completion included, took 6.5 minutes on 2 idle AVX2 cores in fp32 at width 8 (target 10;
#: docs/cohort.md). Several classes get more (:func:`default_steps`), up to :data:`MAX_DEFAULT_STEPS`.
DEFAULT_STEPS = 300
#: the most default steps of a first cohort model: 4 abdominal organs fit at 600 steps and not at 300 (CHAOS:
#: 0.81 against 0.53 mean Dice on new scans, docs/cohort.md)
MAX_DEFAULT_STEPS = 600
#: a refresh (``--init`` a cohort model) without a budget trains this share of the previous model's steps
REFRESH_FRACTION = 0.25


def painted_diameters_mm(labels: np.ndarray, spacing, where: str = "label") -> list[float]:
    """Each class's diameter (mm) as far as a label map shows it: the equivalent-sphere diameter of a dense
    label; for a painting, the equivalent-circle diameter of the class' largest painted cross-section."""
    if not is_painting(labels):
        return class_diameters_mm(labels, spacing)
    planes = find_painted_planes(labels, where)
    best: dict[int, float] = {}
    for axis in planes.axes:
        pixel = float(np.prod([s for a, s in enumerate(spacing) if a != axis]))
        for k in planes.planes[axis]:
            plane = np.take(labels, k, axis=axis)
            counts = np.bincount(plane.reshape(-1), minlength=256)
            for value in np.flatnonzero(counts[1:IGNORE]) + 1:
                best[int(value)] = max(best.get(int(value), 0.0), float(2.0 * np.sqrt(counts[value] * pixel / np.pi)))
    return list(best.values())


def survey(config: FinetuneConfig) -> dict:
    """Spacings, shapes, class diameters and class values of the training scans (headers and labels only)."""
    spacings, shapes, diameters, values = [], [], [], set()
    for label_path in config.labels:
        label = read_volume(label_path)
        spacings.append(np.asarray(label.spacing, float))
        shapes.append(label.shape)
        if _plain_label(label.array):  # bad labels: refused when read
            labels = np.rint(label.array).astype(np.uint8)
            values.update(present_values(labels))
            if not is_one_slice(label.shape):
                diameters += painted_diameters_mm(labels, label.spacing, f"--label {label_path}")
    return {"spacings": spacings, "shapes": shapes, "diameters_mm": diameters, "classes": sorted(values)}


def _plain_label(array: np.ndarray) -> bool:
    """Integer values 0..255: a label map the survey can read (anything else is refused, with its reason
    and file, when the training data are read)."""
    if array.size == 0 or array.min() < 0 or array.max() > IGNORE:
        return False
    return array.dtype.kind != "f" or bool(np.all(np.abs(array - np.rint(array)) < 1e-3))


def cohort_config(config: FinetuneConfig, log=None, budget_given: bool = True) -> tuple[FinetuneConfig, dict]:
    """``config`` with the CPU choices filled in where the user left them open, and a record of them.
    ``budget_given``: False when neither ``--steps`` nor ``--max-time`` was given (see :func:`default_steps`)."""
    init = load_init(config.init)
    _, spacing = preprocessing_from_init(init, config.modality, config.spacing)
    record: dict = {}
    labelled = bool(config.labels) and len(config.labels) == len(config.images)  # else: refused later
    counts_classes = not budget_given and previous_steps(init) is None  # a refresh takes its steps from the init
    found = survey(config) if labelled and (spacing is None or counts_classes) else None
    if not budget_given:
        steps, why = default_steps(init, len(found["classes"]) if found else 1)
        config = replace(config, loop=replace(config.loop, steps=steps))
        record["steps"] = f"{steps} ({why})"
        if log:
            log(f"{steps} optimiser steps ({why}; --steps or --max-time overrides)")
    config, record["position"] = position_setting(config, init)
    if log and config.position == "on":
        log("position channels on: the U-Net also sees where each voxel lies in the body")
    if init is None and config.width is None:
        config = replace(config, width=DEFAULT_WIDTH)
        record["width"] = f"{DEFAULT_WIDTH} (default for a network from scratch)"
    if spacing is None and found is not None:
        if all(not is_one_slice(s) for s in found["shapes"]):
            auto = working_spacing(found["spacings"], found["shapes"], found["diameters_mm"])
            if auto is not None:
                config = replace(config, spacing=auto)
                record["working_spacing_mm"] = list(auto)
                if log:
                    log(f"working grid {auto[0]:g} x {auto[1]:g} x {auto[2]:g} mm (coarser than the scans' for the "
                        "CPU; predict resamples back; --spacing overrides)")
    return config, record


def position_setting(config: FinetuneConfig, init) -> tuple[FinetuneConfig, str]:
    """``config`` with ``--position auto`` resolved, and the record: on when the ``--init`` model was trained
    with position channels (a refresh keeps its inputs), else off (on CHAOS they helped one draw of three
    and hurt two, docs/cohort.md); an explicit on/off is kept."""
    if config.position != "auto":
        return config, f"{config.position} (--position {config.position})"
    if init is not None and input_channels(init) > 1:
        return replace(config, position="on"), "on (the --init model has position channels)"
    return replace(config, position="off"), "off (default)"


def previous_steps(init) -> int | None:
    """The steps the ``--init`` model trained when it is a cohort model (a refresh), else None; both rounds of
    a self-trained one."""
    meta = init.bundle if init is not None else None
    training = meta.training if meta is not None and isinstance(meta.cohort, dict) else None
    previous = training.get("steps") if isinstance(training, dict) else None
    if not previous:
        return None
    first_round = (meta.cohort.get("self_training") or {}).get("round1") or {}
    return int(previous) + int(first_round.get("steps") or 0)


def default_steps(init, n_classes: int = 1) -> tuple[int, str]:
    """(steps, why) of a cohort model trained without ``--steps``/``--max-time``; for a refresh from a cohort
    model :data:`REFRESH_FRACTION` of the steps that model trained.

    A first model of ``n_classes`` classes: :data:`DEFAULT_STEPS` x (n_classes + 1) / 2, at most
    :data:`MAX_DEFAULT_STEPS`. Patches are centred on each channel in turn (background included), so each
    class is at the centre of 2 / (n_classes + 1) of them; this gives each class as many centred patches as the
    one-class default, within the time cap (300 steps for one class, 450 for two, 600 from three on)."""
    previous = previous_steps(init)
    if previous:
        steps = max(1, int(round(REFRESH_FRACTION * previous)))
        return steps, f"a refresh: {REFRESH_FRACTION:g} of the {previous} steps of the --init cohort model"
    n_classes = max(1, int(n_classes))
    steps = min(MAX_DEFAULT_STEPS, int(round(DEFAULT_STEPS * (n_classes + 1) / 2)))
    return steps, f"default of a cohort model of {n_classes} class{'es' if n_classes > 1 else ''}"


def finetune_cohort(config: FinetuneConfig, progress: Progress, budget_given: bool = True,
                    pseudo_from: int | None = None, self_training: dict | None = None) -> Path:
    """Complete the paintings, choose the grid and width, fine-tune; returns the bundle folder.
    ``budget_given``: False when the user gave neither ``--steps`` nor ``--max-time`` (:func:`default_steps`).
    With ``--unlabeled``: two rounds (:mod:`.self_training`), which call this with ``pseudo_from`` (the index
    of the first pseudo-labelled scan: used as it is, not completed, not surveyed) and ``self_training`` (its
    record for model.json)."""
    if config.unlabeled:
        from MedSSL.tasks.cohort.self_training import self_train

        return self_train(config, progress, budget_given, finetune_cohort)
    config, record = cohort_config(config, progress.log, budget_given)
    completer = (PaintingCompleter(config.completion_confidence, config.seed, progress.log)
                 if config.complete_paintings else None)
    survey = ComponentSurvey()

    def complete(image, labels: np.ndarray, index: int) -> np.ndarray:
        if pseudo_from is not None and index >= pseudo_from:
            if completer is not None:
                completer.records.append({"scan": index, "label": "pseudo-label (self-training)"})
            return labels
        three_d = not is_one_slice(labels.shape) and (completer is not None or not is_painting(labels))
        if completer is not None:
            labels = completer(image, labels, index)
        if three_d:
            survey.add(labels)
        return labels

    weights = None
    if pseudo_from is not None:
        from MedSSL.tasks.cohort.self_training import sample_weights

        weights = sample_weights(pseudo_from, len(config.images) - pseudo_from)
    if self_training:
        record["self_training"] = {**self_training, "pseudo_weight": weights[-1] if weights else None}
    return finetune_segmentation(config, progress, complete=complete,
                                 describe=_describe(record, completer, survey, config), sample_weights=weights)


def _describe(record: dict, completer, survey: ComponentSurvey, config) -> dict:
    """model.json's ``cohort`` entry. The completer's per-scan records and the survey are filled in while the
    data are read, so the dicts are shared and read when the bundle is written."""
    record["completion"] = ("off" if completer is None else
                            {"engine": "few-shot", "confidence": config.completion_confidence,
                             "scans": completer.records})
    record["postprocess"] = survey.record
    return record
