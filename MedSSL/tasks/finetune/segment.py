"""``medssl finetune --task segment``: (image, label map) pairs in, a segmentation bundle out.

Few-shot design (a user painted a few slices of this very volume):

* patches hold annotated voxels of each channel in turn (background included) near their centre, and
  anywhere along the painted axis, so the painted plane lies at every depth of the 3D window, borders
  included (see :mod:`.sampling`); the automatic patch is thin along thick slices (64 x 64 x 16 at
  0.8 x 0.8 x 5 mm);
* prediction uses a sliding window covering the whole plane (model.json ``inference.window: "plane"``;
  see :func:`MedSSL.tasks.infer.model.inference_window`);
* Dice + cross-entropy ignore the unpainted voxels (:mod:`.losses`);
* augmentation warps only in-plane (rotation, scaling), so painted planes stay exact, and does not flip
  (anatomy is lateral); CT intensities are jittered by at most about 20 HU;
* the bundle records how the labels were annotated and, for painted slices, recommends keeping at
  prediction only the components connected to the painted structure (``predict --annotation``).

One-slice images (X, Y, 1), e.g. radiographs loaded in Slicer, get a 2D U-Net (``GenesisUNet(spatial_dims=2)``,
model.json ``architecture.spatial_dims: 2``): patches (X, Y, 1) are sampled as above around annotated
pixels and fed to the network as (N, 1, X, Y) with (N, X, Y) targets, augmented by in-plane warps,
trained with the same masked loss; ``--init`` must then be a 2D model (e.g. ``medssl pretrain --method
genesis`` on one-slice images), and prediction slides a 2D window over the image (whole image when it
fits, ``inference.window: "plane"``). All images of a run are one-slice or all are volumes.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from MedSSL.io.bundle import save_bundle
from MedSSL.data.spatial import validate_patch
from MedSSL.errors import MedSSLError
from MedSSL.data.position import POSITION_AXES, describe as describe_position
from MedSSL.models.initial_weights import apply_initial_weights, check_initial_dims, with_input_channels
from MedSSL.models.batchnorm import recalibrate_batchnorm
from MedSSL.models.genesis_unet import GenesisUNet
from MedSSL.engine.acceleration import prepare_for_training
from MedSSL.engine.checkpoint import load_checkpoint
from MedSSL.engine.loop import TrainingLoop
from MedSSL.engine.progress import Progress
from MedSSL.engine.runtime import DistributedContext, OutputLock, device_description, init_distributed, seed_everything
from MedSSL.transforms.augment import AugmentConfig, augment_batch
from MedSSL.tasks import FinetuneConfig
from MedSSL.tasks.finetune.common import (common_meta, encoder_only, fit_steps_to_time, load_init, majority,
                     preprocessing_from_init, resolve_width)
from MedSSL.tasks.finetune.segment_data import load_segmentation_data, mapping_and_classes
from MedSSL.data.labels import LabelMapping, classes_to_json
from MedSSL.losses.segmentation import MaskedDiceCELoss
from MedSSL.data.sampling import PatchSampler, auto_patch, auto_patch_2d


def slice_axes(annotations: list[dict]) -> tuple:
    """The axis of painted slices when every label was annotated as slices along the same axis."""
    axes = {a.get("axis") for a in annotations if a["kind"] == "slices"}
    if len(axes) == 1 and all(a["kind"] == "slices" for a in annotations):
        return (axes.pop(),)
    return ()


def _split(volumes: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(volumes) < 2:
        return volumes, []
    n_val = min(len(volumes) - 1, max(1, int(round(fraction * len(volumes)))))
    order = np.random.default_rng(seed).permutation(len(volumes))
    val = set(order[:n_val].tolist())
    return [v for i, v in enumerate(volumes) if i not in val], [v for i, v in enumerate(volumes) if i in val]


class _Float32Sampler(PatchSampler):
    """Patches of float16-stored volumes returned as float32: (N, 1, X, Y, Z) images and (N, X, Y, Z)
    targets, or for a 2D network (``spatial_dims`` 2, patches (X, Y, 1)) (N, 1, X, Y) and (N, X, Y)."""

    def __init__(self, *args, spatial_dims: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.spatial_dims = spatial_dims

    def sample(self, batch: int):
        images, targets = super().sample(batch)
        if self.spatial_dims == 2:
            images, targets = images[..., 0], targets[..., 0]
        return np.ascontiguousarray(images, dtype=np.float32), np.ascontiguousarray(targets)


def finetune_segmentation(config: FinetuneConfig, progress: Progress, complete=None, describe=None,
                          sample_weights=None) -> Path:
    """Train and write the bundle; returns its folder. All input checks happen before ``--out`` is touched.

    ``complete``: see :func:`.segment_data.load_segmentation_data` (paintings completed into dense labels);
    ``describe``: None or a dict recorded as model.json's ``cohort`` entry (how the labels were completed);
    ``sample_weights``: None or one weight per image, how often its patches are drawn relative to the others
    (:class:`MedSSL.data.sampling.TrainingVolume`)."""
    init = load_init(config.init)
    width = resolve_width(config.width, init)
    intensity, spacing = preprocessing_from_init(init, config.modality, config.spacing)
    ctx, device = init_distributed(config.device)
    try:
        bundle = _finetune_checked(config, progress, init, width, intensity, spacing, ctx, device, complete, describe,
                                   sample_weights)
        ctx.barrier()  # every rank done (rank 0 has written the bundle) before the process group goes away
        return bundle
    finally:
        ctx.close()


def _finetune_checked(config, progress, init, width, intensity, spacing, ctx, device, complete=None,
                      describe=None, sample_weights=None) -> Path:
    progress.stage("preprocess", f"reading {len(config.images)} image/label pair(s)")
    volumes, summary, modalities, spatial_dims = load_segmentation_data(config, intensity, spacing, complete)
    for volume, weight in zip(volumes, sample_weights or ()):
        volume.weight = float(weight)
    if init is not None:
        check_initial_dims(init, spatial_dims, f"--init {config.init}",
                           "the --image inputs" if len(config.images) > 1 else f"--image {config.images[0]}")
    if config.position == "on" and spatial_dims == 2:
        raise MedSSLError("--position on: position channels are for 3D images; these are one-slice images")
    mapping, classes = mapping_and_classes(volumes, config)
    for v in volumes:
        v.target = mapping.to_channels(v.target)
    if config.patch:
        patch = validate_patch(config.patch, spatial_dims, log=progress.log)
    elif spatial_dims == 2:
        patch = auto_patch_2d(summary["shapes"])
    else:
        patch = auto_patch(summary["spacings_mm"], summary["shapes"])
    out = Path(config.out)
    with OutputLock(out) if ctx.is_main else contextlib.nullcontext():
        if not config.resume and load_checkpoint(out) is not None:
            raise MedSSLError(f"{out}: already holds a training run; add --resume to continue it or choose another --out")
        return _train(config, progress, init, width, intensity, spacing, device, volumes, summary, modalities,
                      mapping, classes, patch, ctx, spatial_dims, describe)


def _train(config, progress, init, width, intensity, spacing, device, volumes, summary, modalities, mapping,
           classes, patch, ctx: DistributedContext, spatial_dims: int = 3, describe=None) -> Path:
    """Under torchrun every rank samples its own patches (seeded by rank); gradients are averaged by
    DistributedDataParallel; only rank 0 writes checkpoints and the bundle. ``spatial_dims`` 2: a 2D
    network on the (X, Y) plane of one-slice images."""
    out = Path(config.out)
    seed_everything(config.seed + ctx.rank)
    in_channels = 1 + (len(POSITION_AXES) if config.position == "on" else 0)
    model = GenesisUNet(in_channels=in_channels, out_channels=mapping.n_channels, width=width,
                        spatial_dims=spatial_dims).to(device)
    if init is not None:
        weights = init if config.transfer == "all" else encoder_only(init)
        apply_initial_weights(model, with_input_channels(weights, in_channels), what=f"--init {config.init}")
    amp, _ = prepare_for_training(model, device, spatial_dims, [patch[:spatial_dims]], config.loop.amp, False,
                                  progress.log)
    train_volumes, val_volumes = _split(volumes, config.val_fraction, config.seed)
    wrapped = DistributedDataParallel(model) if ctx.enabled else model
    loop = TrainingLoop(model, replace(config.loop, amp=amp), device, progress, out, "finetune", ctx)
    if config.resume and loop.resume():
        progress.log(f"resumed from step {loop.step}")
    saved = loop.extra_state.get("random", {}).get(str(ctx.rank))
    start = 0 if saved else loop.step  # with saved streams, built as at step 0 and then continued
    rng = np.random.default_rng([config.seed, start, ctx.rank])
    painted_axes = slice_axes(summary["annotations"])
    sampler = _Float32Sampler(train_volumes, patch, mapping.n_channels, rng, full_axes=painted_axes,
                              spatial_dims=spatial_dims)
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + start + 7919 * ctx.rank)
    if saved:  # continue the random streams where the checkpoint left them: a resumed run = an uninterrupted one
        sampler.continue_stream(saved["batches"])
        generator.set_state(saved["transforms"].cpu())
    dense = all(a["kind"] == "dense" for a in summary["annotations"])  # a tilt would smear painted planes
    augment = replace(AugmentConfig.for_task("segment", majority(modalities)),
                      tilt_deg=config.augment_tilt_deg if dense and spatial_dims == 3 else 0.0)
    loss_fn = MaskedDiceCELoss(skip_absent=config.dice_skip_absent)
    progress.log(f"{len(train_volumes)} training {'image' if spatial_dims == 2 else 'volume'}(s), "
                 f"{mapping.n_channels - 1} class(es), {'2D ' if spatial_dims == 2 else ''}patch {patch}, "
                 f"width {width}, init {init.source if init else 'scratch'}, on {device_description(device)}")

    def step_fn(step):
        images, targets = sampler.sample(config.batch_size)
        x = torch.from_numpy(images).to(device)
        y = torch.from_numpy(targets).to(device).long()
        if config.augment:
            x, y = augment_batch(x, y, augment, generator)
        loss, parts = loss_fn(wrapped(x), y)
        # what the next checkpoint saves (the streams as a run continuing after this step would find them)
        loop.extra_state["random"] = {str(ctx.rank): {"batches": sampler.stream_state(),
                                                      "transforms": generator.get_state()}}
        return loss, {**parts, "batch": config.batch_size}

    if config.steps_from_time and config.loop.max_time and not loop.step:
        loop.config = fit_steps_to_time(loop.config, step_fn, model, device)
        if ctx.enabled:  # every rank must run the same number of steps
            loop.config = replace(loop.config, steps=max(1, int(round(ctx.mean(float(loop.config.steps), device)))))
        progress.log(f"{loop.config.steps} steps fit in {config.loop.max_time:g} s")
    validate_fn = None
    if val_volumes:
        val_sampler = _Float32Sampler(val_volumes, patch, mapping.n_channels, np.random.default_rng(config.seed + 1),
                                      spatial_dims=spatial_dims)
        val_batches = [val_sampler.sample(config.batch_size) for _ in range(8)]

        @torch.no_grad()
        def validate_fn():
            losses = [float(loss_fn(model(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device).long())[0])
                      for x, y in val_batches]
            return float(np.mean(losses))

    result = loop.run(step_fn, validate_fn)
    if not ctx.is_main:
        return out
    if result.best_state:
        model.load_state_dict(result.best_state)
    if config.recalibrate_bn:
        progress.stage("batchnorm", "recomputing BatchNorm statistics on training patches")
        recalibrate_batchnorm(model, (sampler.sample(config.batch_size)[0] for _ in range(config.recalibrate_bn)), device)
    state = model.state_dict()
    meta = common_meta(task="segment", width=width, out_channels=mapping.n_channels, intensity=intensity,
                       modality=majority(modalities), spacing=spacing, patch=patch, init=init, loop=loop.config,
                       result=result, batch_size=config.batch_size, seed=config.seed, device=device,
                       spatial_dims=spatial_dims)
    sparse = all(a["kind"] == "slices" for a in summary["annotations"])
    if in_channels > 1:
        meta = replace(meta, architecture=replace(meta.architecture, in_channels=in_channels),
                       preprocessing={**meta.preprocessing, "position": describe_position()})
    meta = replace(
        meta, classes=classes_to_json(classes), channels=[int(v) for v in mapping.channel_values()],
        detection=bool(config.detection),
        inference={"overlap": 0.5, "blend": "gaussian", **({"window": "plane"} if sparse or spatial_dims == 2 else {})},
        world_size=ctx.world_size, transfer=config.transfer if init is not None else None,
        batchnorm=(f"statistics recomputed on {config.recalibrate_bn} batches of training patches after training"
                   if config.recalibrate_bn else "running statistics from training"),
        fewshot={
            "annotation": "slices" if sparse else "dense",
            "sampling": "class-balanced: an annotated voxel of each channel in turn, within 40% of the patch "
                        "around its centre, anywhere along the painted axis",
            "painted_axis": painted_axes[0] if painted_axes else None,
            "augmentation": augment.to_dict() if config.augment else None,
            "loss": "dice+ce, not-annotated (255) voxels masked",
            "postprocess": {"connected_to_annotation": sparse},
        },
        data_summary={**summary, "modalities": _counts(modalities),
                      "class_voxels": _class_voxels(train_volumes + val_volumes, mapping)})
    if describe:
        meta = replace(meta, cohort=describe)
    save_bundle(out, state, meta)
    return out


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _class_voxels(volumes, mapping: LabelMapping) -> dict:
    counts = np.zeros(256, dtype=np.int64)
    for v in volumes:
        counts += np.bincount(v.target.reshape(-1), minlength=256)
    return {str(value): int(counts[c]) for c, value in enumerate(mapping.channel_values()) if c > 0}
