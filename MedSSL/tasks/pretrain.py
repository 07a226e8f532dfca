"""Self-supervised pretraining on the user's own volumes: cubes in, a model bundle out.

Two kinds of input, chosen by the method's ``data_kind``:

* ``"cubes"`` (``--data PATH...``): unlabeled volumes cut into cached cubes (:mod:`MedSSL.data.cubes`).
  When every source is a one-slice image (a radiograph) and the method has a 2D variant
  (``supports_2d``), the method is built with a 2D backbone and the cubes are (X, Y, 1) patches;
  other methods pad one-slice images into 3D cubes as before.
* ``"labelled-datasets"`` (``--datasets SPEC.json``): several labelled datasets
  (:mod:`MedSSL.data.labelled`), read, checked and cached once. When every case is a one-slice image
  and the method has a 2D variant, it runs in 2D on (X, Y, 1) patches; a spec mixing one-slice and
  3D cases is refused.

The method may replace model.json fields through :meth:`~MedSSL.methods.base.SSLMethod.bundle_meta`
(Ark writes a segmentation bundle).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from MedSSL.io.bundle import Architecture, BundleMeta, save_bundle
from MedSSL.data import labelled
from MedSSL.data.cubes import CubeSettings, default_cache_dir, prepare_cubes
from MedSSL.data.preprocess import IntensityConfig
from MedSSL.data.spatial import is_one_slice_file, validate_patch
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import find_volumes
from MedSSL.io.privacy import redact_paths
from MedSSL.methods.base import PretrainData, build_method, method_class
from MedSSL.models.initial_weights import apply_initial_weights, load_initial_weights
from MedSSL.engine.acceleration import compile_record, compile_with_fallback, precision_name, prepare_batch, prepare_for_training
from MedSSL.engine.prefetch import Prefetcher
from MedSSL.engine.loop import TrainingLoop, thin_history
from MedSSL.tasks import PretrainConfig  # noqa: F401  (its settings live with the other tasks')
from MedSSL.engine.progress import Progress
from MedSSL.engine.runtime import OutputLock, device_description, init_distributed, seed_everything


def check_data_kind(cls, data, datasets) -> None:
    """Exactly one of ``data`` / ``datasets``, the one the method's ``data_kind`` reads."""
    if data and datasets:
        raise MedSSLError("give either --data (unlabeled volumes) or --datasets (a labelled-datasets spec), not both")
    if cls.data_kind == "labelled-datasets":
        if not datasets:
            raise MedSSLError(f"--method {cls.name} learns from labelled datasets: give them with --datasets SPEC.json "
                              "instead of --data")
    elif cls.data_kind == "cubes":
        if not data:
            raise MedSSLError(f"--method {cls.name} learns from unlabeled volumes: give them with --data PATH... "
                              "(--datasets is for methods that learn from labelled datasets, e.g. ark)")
    else:
        raise MedSSLError(f"--method {cls.name}: unknown data kind {cls.data_kind!r}")


def pretrain(config: PretrainConfig, progress: Progress) -> Path:
    """Run pretraining; returns the bundle folder. Raises MedSSLError on bad input."""
    patch = validate_patch(config.patch)
    cls = method_class(config.method)
    check_data_kind(cls, config.data, config.datasets)
    ctx, device = init_distributed(config.device)
    out = Path(config.out)
    try:
        with OutputLock(out) if ctx.is_main else _nullcontext():
            bundle = _pretrain_locked(config, cls, patch, ctx, device, progress)
        ctx.barrier()  # every rank done (rank 0 has written the bundle) before the process group goes away
        return bundle
    finally:
        ctx.close()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _pretrain_locked(config, cls, patch, ctx, device, progress) -> Path:
    out = Path(config.out)
    if not config.resume and load_checkpoint_exists(out):
        raise MedSSLError(f"{out}: already holds a training run; add --resume to continue it or choose another --out")
    seed_everything(config.seed + ctx.rank)
    cache_dir = Path(config.cache_dir or default_cache_dir())
    if cls.data_kind == "labelled-datasets":
        data, summary, modality, spatial_dims = _labelled_data(config, cls, patch, ctx, device, progress, cache_dir)
    else:
        data, summary, modality, spatial_dims = _cube_data(config, cls, patch, ctx, device, progress, cache_dir)
    patch = tuple(data.settings.patch)

    method = build_method(cls, width=config.width, settings=config.method_settings, spatial_dims=spatial_dims).to(device)
    init_info = None
    if config.init:
        init = load_initial_weights(config.init)
        apply_initial_weights(method.backbone, init, what=f"--init {config.init}")
        init_info = init.describe()
    method.setup(data)
    amp, channels_last = prepare_for_training(method.backbone, device, spatial_dims, method.input_sizes(patch),
                                              config.loop.amp, config.channels_last, progress.log)
    compiled = compile_with_fallback(method.backbone, progress.log) if config.compile else None
    wrapped = DistributedDataParallel(method, find_unused_parameters=True) if ctx.enabled else method
    loop = TrainingLoop(method, replace(config.loop, amp=amp), device, progress, out, "pretrain", ctx)
    if config.resume and loop.resume():
        progress.log(f"resumed from step {loop.step}")
    rng = np.random.default_rng([config.seed, ctx.rank, loop.step])
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + ctx.rank * 7919 + loop.step)
    saved = loop.extra_state.get("random", {}).get(str(ctx.rank))
    if saved:  # continue the random streams where the checkpoint left them: a resumed run = an uninterrupted one
        rng.bit_generator.state = json.loads(saved["batches"])
        generator.set_state(saved["transforms"].cpu())
    draw = method.batch_source(data, config.batch_size, rng, device)

    def draw_with_state():  # the batch-stream state after this batch (the loader may run ahead of the steps)
        batch = draw()
        return batch, json.dumps(rng.bit_generator.state)

    next_batch = Prefetcher(draw_with_state, workers=config.workers) if config.workers > 0 else draw_with_state
    val_batches = method.validation_batches(data, config.batch_size, device)

    def step_fn(step):
        batch, batch_state = next_batch()
        loss, parts = wrapped(prepare_batch(batch, channels_last), generator)
        # what the next checkpoint saves (the streams as a run continuing after this step would find them)
        loop.extra_state["random"] = {str(ctx.rank): {"batches": batch_state, "transforms": generator.get_state()}}
        return loss, {**parts, "batch": config.batch_size}

    def validate_fn():
        fixed = torch.Generator(device=device).manual_seed(config.seed + 12345)
        return float(np.mean([method.validation_loss(b, fixed) for b in val_batches]))

    try:
        result = loop.run(step_fn, validate_fn if val_batches else None)
    finally:
        if isinstance(next_batch, Prefetcher):
            next_batch.close()
    if not ctx.is_main:
        return out
    if result.best_state is not None:
        method.load_state_dict(result.best_state)
    state = method.transferable_state_dict()
    settings = data.settings
    meta = BundleMeta(
        architecture=Architecture("unet3d", width=config.width, in_channels=1, out_channels=1,
                                  spatial_dims=method.spatial_dims),
        task="pretrain",
        method=method.describe(),
        preprocessing={"intensity": settings.intensity.to_dict(), "target_spacing_mm": config.spacing,
                       "modality": modality},
        patch_size=list(patch),
        training={"steps": result.steps_done, "stopped_by": result.stopped_by, "batch_size": config.batch_size,
                  "optimizer": config.loop.optimizer, "lr": config.loop.lr, "best_val_loss": result.best_val,
                  "seed": config.seed, "device": device_description(device), "init": init_info,
                  "precision": precision_name(device, loop.config.amp), "compile": compile_record(compiled),
                  "seconds": round(result.seconds, 1)},
        history=thin_history(result.history),
        data_summary=summary,
        world_size=ctx.world_size,
    )
    meta = meta.merged(method.bundle_meta() or {}, f"--method {method.name}: bundle_meta()")
    save_bundle(out, state, meta)
    return out


def _cube_data(config, cls, patch, ctx, device, progress, cache_dir):
    """(PretrainData with cube sets, data summary, modality, spatial dims) for ``--data``."""
    sources = find_volumes(config.data)
    flat = _refuse_mixed_dimensions(sources, config.data)
    spatial_dims = 3
    if flat and cls.supports_2d:
        spatial_dims = 2
        if patch[2] != 1:
            progress.log(f"one-slice images: {cls.name} runs in 2D on {patch[0]}x{patch[1]} patches")
        patch = (patch[0], patch[1], 1)
    elif flat:
        progress.log(f"one-slice images: {cls.name} has no 2D variant; each image is padded into 3D cubes")
    if spatial_dims == 3 and patch[2] == 1:
        raise MedSSLError(f"--patch {' '.join(map(str, patch))}: Z = 1 is for one-slice images with a method that has "
                          "a 2D variant; 3D patches need Z a multiple of 8")
    settings = CubeSettings(patch=patch, cubes_per_volume=config.cubes_per_volume,
                            intensity=IntensityConfig(modality=config.modality),
                            target_spacing_mm=config.spacing, seed=config.seed)
    progress.stage("preprocess", f"preparing cubes from {len(sources)} volume(s)", total=len(sources))
    if not ctx.is_main:
        ctx.barrier()  # rank 0 fills the cache first; the others then read it
    cubes = prepare_cubes(sources, settings, cache_dir,
                          progress=lambda done, total, cached: progress.update(done, total, cached=cached),
                          warn=lambda message: progress.log(redact_paths(message, sources)))
    if ctx.is_main:
        ctx.barrier()
    train, val = cubes.split(config.val_fraction, seed=config.seed)
    progress.log(f"{len(train)} training and {len(val)} validation cubes of {patch} on {device_description(device)}")
    data = PretrainData(train=train, val=val, sources=sources, settings=settings, cache_dir=cache_dir,
                        seed=config.seed, log=progress.log, rank=ctx.rank, world_size=ctx.world_size)
    summary = cubes.summary()
    return data, summary, _modality_of(summary), spatial_dims


def _labelled_data(config, cls, patch, ctx, device, progress, cache_dir):
    """(PretrainData with the labelled datasets, data summary, modality, spatial dims) for ``--datasets``."""
    spec = labelled.read_spec(config.datasets)
    spatial_dims, mixed = labelled.case_dimensions(spec)
    if mixed:
        raise MedSSLError(mixed)
    if spatial_dims == 2 and not cls.supports_2d:
        raise MedSSLError(f"--datasets {spec['spec']}: one-slice (2D) cases, and {cls.name} has no 2D variant")
    if spatial_dims == 2:
        if patch[2] != 1:
            progress.log(f"one-slice cases: {cls.name} runs in 2D on {patch[0]}x{patch[1]} patches")
        patch = (patch[0], patch[1], 1)
    elif patch[2] == 1:
        raise MedSSLError(f"--patch {' '.join(map(str, patch))}: labelled datasets of 3D volumes need Z a multiple of 8 "
                          "(Z = 1 is for one-slice cases)")
    sources = [p for d in spec["datasets"] for case in d["cases"] for p in (case["image"], case["label"])]
    intensity = IntensityConfig(modality=config.modality)
    settings = CubeSettings(patch=patch, cubes_per_volume=config.cubes_per_volume, intensity=intensity,
                            target_spacing_mm=config.spacing, seed=config.seed)
    total = len(sources) // 2
    progress.stage("preprocess", f"reading {total} labelled case(s) of {len(spec['datasets'])} dataset(s)", total=total)
    if not ctx.is_main:
        ctx.barrier()
    datasets = labelled.load_datasets(spec, intensity, settings.target_spacing_mm, cache_dir / "labelled",
                                      progress=lambda done, n, cached: progress.update(done, n, cached=cached),
                                      val_fraction=config.val_fraction, seed=config.seed, spatial_dims=spatial_dims)
    if ctx.is_main:
        ctx.barrier()
    summary = labelled.summary(datasets)
    progress.log(", ".join(f"{d.name}: {len(d.cases)} training and {len(d.val_cases)} validation case(s)"
                           for d in datasets) + f"; patch {patch} on {device_description(device)}")
    data = PretrainData(sources=sources, settings=settings, datasets={"datasets": datasets, "summary": summary},
                        cache_dir=cache_dir, seed=config.seed, log=progress.log, rank=ctx.rank,
                        world_size=ctx.world_size)
    modalities = summary["modalities"]
    return data, summary, (max(modalities, key=modalities.get) if modalities else None), spatial_dims


def _refuse_mixed_dimensions(sources: list, data) -> bool:
    """Refuse a mix of one-slice (2D) images and 3D volumes, judged from the file headers alone.
    Returns True when every source is a one-slice image."""
    flat = [is_one_slice_file(source) for source in sources]
    if any(flat) and not all(flat):
        raise MedSSLError(f"{' '.join(map(str, data))}: mixes {sum(flat)} one-slice (2D) image(s) with "
                          f"{len(flat) - sum(flat)} 3D volume(s); pretrain on them separately")
    return bool(flat) and all(flat)


def load_checkpoint_exists(out: Path) -> bool:
    return (Path(out) / "checkpoint.pt").is_file()


def _modality_of(summary: dict) -> str | None:
    counts = summary.get("modalities") or summary.get("modality_counts") or {}
    return max(counts, key=counts.get) if counts else None
