"""``medssl finetune --task classify``: one label per volume, from a CSV of ``image,label`` rows.

The network is the (pretrained) GenesisUNet encoder with the Models Genesis target-task head: global
average pooling of the bottleneck (16w channels) -> Linear(16w, 1024) -> ReLU -> Linear(1024, n),
trained with cross-entropy on class-balanced batches.

Input fitting: each volume is intensity-normalised as in pretraining, then **resized** (trilinear) to
the patch, so the whole volume is seen whatever its size; give volume crops (e.g. 64 x 64 x 32 cubes
around candidates, as the Models Genesis NCC task) when the finding is small. The same fitting is
applied at prediction (``input_fit: "resize"`` in model.json).

CSV: ``image,label`` per row (a first row ``image,label`` is a header and skipped); ``label`` is a
class value (integer) or a class name; relative image paths resolve against the CSV's folder. Classes
come from ``--classes`` (value -> name, 0 allowed) or, without it, from the labels: integers keep their
values, names get values 0..n-1 in sorted order.

One-slice images (X, Y, 1), e.g. radiographs: when every image of the CSV is one, the network is 2D
(``GenesisUNet(spatial_dims=2)`` encoder, model.json ``architecture.spatial_dims: 2``), each image is resized
(bilinear) to the 2D patch (X, Y) (default 64 x 64; ``--patch X Y`` or ``X Y 1``), and ``--init`` must
be a 2D model. A CSV mixing one-slice images and volumes is refused.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from MedSSL.io.bundle import save_bundle
from MedSSL.data.spatial import validate_patch
from MedSSL.errors import MedSSLError
from MedSSL.models.initial_weights import apply_initial_weights, check_initial_dims
from MedSSL.models.classifier import ClassifierNet
from MedSSL.transforms.resize import fit_to_patch
from MedSSL.engine.acceleration import prepare_for_training
from MedSSL.engine.checkpoint import load_checkpoint
from MedSSL.engine.loop import TrainingLoop
from MedSSL.engine.progress import Progress
from MedSSL.engine.runtime import OutputLock, device_description, resolve_device, seed_everything
from MedSSL.transforms.augment import AugmentConfig, augment_batch
from MedSSL.tasks import FinetuneConfig
from MedSSL.tasks.finetune.common import (fit_steps_to_time, common_meta, load_init, majority, normalize,
                     preprocessing_from_init, read_image, resolve_width)
from MedSSL.data.labels import classes_to_json, default_color, parse_classes

DEFAULT_PATCH = (64, 64, 32)
#: one-slice (2D) images: resized to 64 x 64 (kept as (X, Y, 1) like every 2D patch)
DEFAULT_PATCH_2D = (64, 64, 1)


def read_csv_rows(path) -> list[tuple[Path, str, int]]:
    """(image path, label text, row number) of every data row. Raises MedSSLError naming the CSV."""
    p = Path(path)
    if not p.is_file():
        raise MedSSLError(f"--csv {path}: no such file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as handle:
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(handle)) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedSSLError(f"--csv {path}: cannot be read ({exc.__class__.__name__})") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["image", "label"]:
        rows = rows[1:]
    if not rows:
        raise MedSSLError(f"--csv {path}: no image,label rows")
    out = []
    for number, row in rows:
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise MedSSLError(f"--csv {path}: row {number}: expected image,label")
        image = Path(row[0].strip())
        out.append((image if image.is_absolute() else p.parent / image, row[1].strip(), number))
    return out


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def resolve_volume_classes(labels: list[str], rows, spec: str | None, csv_path) -> tuple[dict, list[int]]:
    """(classes {value: {"name", "color"}}, value of each row)."""
    given = parse_classes(spec, allow_zero=True)
    if given is None:
        if all(_is_int(t) for t in labels):
            values = sorted({int(t) for t in labels})
            given = {v: {"name": f"class_{v}", "color": default_color(v + 1)} for v in values}
        else:
            names = sorted(set(labels))
            given = {i: {"name": n, "color": default_color(i + 1)} for i, n in enumerate(names)}
    by_name = {e["name"]: v for v, e in given.items()}
    row_values = []
    for text, (_, _, number) in zip(labels, rows):
        if _is_int(text) and int(text) in given:
            row_values.append(int(text))
        elif text in by_name:
            row_values.append(by_name[text])
        else:
            known = ", ".join(f"{v}={e['name']}" for v, e in sorted(given.items()))
            raise MedSSLError(f"--csv {csv_path}: row {number}: unknown class {text!r} (known: {known})")
    if len(given) < 2:
        raise MedSSLError(f"--csv {csv_path}: classification needs at least two classes, found {len(given)}")
    return given, row_values


def load_classification_data(config: FinetuneConfig, intensity, patch, log=None):
    """Read the CSV and every image: (tensor (N, 1, X, Y, Z), class indices (N,), classes, class_values,
    summary, modalities, patch, spatial dims). One-slice images (all of them, or MedSSLError naming the
    first that differs): (N, 1, X, Y), spatial dims 2. ``patch``: ``--patch`` or None (the default for
    the images' dimensions); the checked patch is returned."""
    rows = read_csv_rows(config.csv)
    classes, values = resolve_volume_classes([r[1] for r in rows], rows, config.classes, config.csv)
    class_values = sorted(classes)
    index_of = {v: i for i, v in enumerate(class_values)}
    images, modalities, summary = [], [], {"volumes": 0, "shapes": [], "spacings_mm": []}
    first = None
    for image_path, _, _ in rows:
        volume, dims = read_image(image_path, config.spacing, first)
        if first is None:
            first = (dims, image_path)
            patch = validate_patch(patch, dims, log=log) if patch else (DEFAULT_PATCH_2D if dims == 2 else DEFAULT_PATCH)
        array, modality = normalize(volume, intensity)
        images.append(fit_to_patch(array, patch))
        modalities.append(modality)
        summary["volumes"] += 1
        summary["shapes"].append(list(volume.shape))
        summary["spacings_mm"].append([round(float(s), 4) for s in volume.spacing])
    targets = torch.tensor([index_of[v] for v in values], dtype=torch.long)
    summary["class_counts"] = {str(v): int((targets == index_of[v]).sum()) for v in class_values}
    return torch.stack(images), targets, classes, class_values, summary, modalities, patch, first[0]


def finetune_classification(config: FinetuneConfig, progress: Progress) -> Path:
    """Train the classifier and write the bundle; input checks happen before ``--out`` is touched."""
    if config.csv is None:
        raise MedSSLError("finetune --task classify: give --csv FILE with image,label rows")
    init = load_init(config.init)
    width = resolve_width(config.width, init)
    intensity, spacing = preprocessing_from_init(init, config.modality, config.spacing)
    config = replace(config, spacing=spacing)
    device = resolve_device(config.device)
    progress.stage("preprocess", "reading the volumes listed in the CSV")
    images, targets, classes, class_values, summary, modalities, patch, spatial_dims = load_classification_data(
        config, intensity, config.patch, progress.log)
    if init is not None:
        check_initial_dims(init, spatial_dims, f"--init {config.init}", f"the images of --csv {config.csv}")
    out = Path(config.out)
    with OutputLock(out):
        if not config.resume and load_checkpoint(out) is not None:
            raise MedSSLError(f"{out}: already holds a training run; add --resume to continue it or choose another --out")
        seed_everything(config.seed)
        model = ClassifierNet(width, len(class_values), spatial_dims=spatial_dims).to(device)
        if init is not None:
            apply_initial_weights(model.backbone, init, what=f"--init {config.init}")
        result, loop_config = _train(config, progress, model, images, targets, device, out, majority(modalities))
        meta = common_meta(task="classify", width=width, out_channels=len(class_values), intensity=intensity,
                           modality=majority(modalities), spacing=spacing, patch=patch, init=init, loop=loop_config,
                           result=result, batch_size=config.batch_size, seed=config.seed, device=device,
                           spatial_dims=spatial_dims)
        meta = replace(
            meta, classes=classes_to_json(classes), class_values=class_values,
            head=f"gap -> linear({model.backbone.bottleneck_channels}, 1024) -> relu -> linear(1024, {len(class_values)})",
            input_fit="resize",
            data_summary={**summary, "modalities": {m: modalities.count(m) for m in set(modalities)}})
        save_bundle(out, result.best_state or model.state_dict(), meta)
    return out


def _balanced_indices(targets: torch.Tensor, batch: int, rng: np.random.Generator) -> np.ndarray:
    by_class = [np.flatnonzero(targets.numpy() == c) for c in range(int(targets.max()) + 1)]
    by_class = [idx for idx in by_class if idx.size]
    classes = rng.integers(len(by_class), size=batch)
    return np.array([rng.choice(by_class[c]) for c in classes])


def _train(config, progress, model, images, targets, device, out, modality):
    n = len(targets)
    order = np.random.default_rng(config.seed).permutation(n)
    n_val = int(round(config.val_fraction * n)) if config.val_fraction > 0 and n >= 4 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_x, train_y = images[train_idx], targets[train_idx]
    amp, _ = prepare_for_training(model, device, images.dim() - 2, [tuple(images.shape[2:])], config.loop.amp, False,
                                  progress.log)
    loop = TrainingLoop(model, replace(config.loop, amp=amp), device, progress, out, "finetune")
    if config.resume and loop.resume():
        progress.log(f"resumed from step {loop.step}")
    rng = np.random.default_rng([config.seed, loop.step])
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + loop.step)
    augment = AugmentConfig.for_task("classify", modality)
    progress.log(f"{len(train_idx)} training and {n_val} validation volume(s) on {device_description(device)}")

    def step_fn(step):
        idx = _balanced_indices(train_y, config.batch_size, rng)
        x = train_x[idx].to(device)
        if config.augment:
            x, _ = augment_batch(x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=device), augment, generator)
        y = train_y[idx].to(device)
        loss = F.cross_entropy(model(x).float(), y)
        return loss, {"ce": float(loss.detach()), "batch": config.batch_size}

    if config.steps_from_time and config.loop.max_time and not loop.step:
        loop.config = fit_steps_to_time(loop.config, step_fn, model, device)
        progress.log(f"{loop.config.steps} steps fit in {config.loop.max_time:g} s")
    validate_fn = None
    if n_val:
        val_x, val_y = images[val_idx], targets[val_idx]

        @torch.no_grad()
        def validate_fn():
            losses = [float(F.cross_entropy(model(val_x[i:i + 8].to(device)).float(), val_y[i:i + 8].to(device), reduction="sum"))
                      for i in range(0, n_val, 8)]
            return sum(losses) / n_val

    result = loop.run(step_fn, validate_fn)
    return result, loop.config
