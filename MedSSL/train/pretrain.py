"""Self-supervised pretraining on the user's own volumes: cubes in, a model bundle out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..bundle import save_bundle
from ..data.cubes import CubeSettings, default_cache_dir, prepare_cubes
from ..data.preprocess import IntensityConfig
from ..errors import MedSSLError
from ..io.volumes import find_volumes, is_single_slice
from ..privacy import redact_paths
from ..methods.base import PretrainData, method_class
from ..models.initial_weights import apply_initial_weights, load_initial_weights
from .loop import LoopConfig, TrainingLoop, thin_history
from .progress import Progress
from .runtime import OutputLock, device_description, init_distributed, seed_everything


@dataclass
class PretrainConfig:
    """Everything ``medssl pretrain`` takes. patch is (X, Y, Z) voxels, divisible by 8."""

    data: list
    out: Path
    method: str = "genesis"
    method_settings: dict = field(default_factory=dict)
    init: str | None = None
    width: int = 32
    patch: tuple = (64, 64, 32)
    batch_size: int = 6
    cubes_per_volume: int = 32
    modality: str = "auto"
    spacing: tuple | None = None
    cache_dir: Path | None = None
    val_fraction: float = 0.1
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    loop: LoopConfig = field(default_factory=LoopConfig)


def check_patch(patch) -> tuple:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p < 8 or p % 8 for p in patch):
        raise MedSSLError(f"--patch {' '.join(map(str, patch))}: each size must be a multiple of 8 (the network pools 3 times)")
    return patch


def pretrain(config: PretrainConfig, progress: Progress) -> Path:
    """Run pretraining; returns the bundle folder. Raises MedSSLError on bad input."""
    patch = check_patch(config.patch)
    cls = method_class(config.method)
    ctx, device = init_distributed(config.device)
    out = Path(config.out)
    try:
        with OutputLock(out) if ctx.is_main else _nullcontext():
            return _pretrain_locked(config, cls, patch, ctx, device, progress)
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
    sources = find_volumes(config.data)
    _refuse_mixed_dimensions(sources, config.data)
    settings = CubeSettings(patch=patch, cubes_per_volume=config.cubes_per_volume,
                            intensity=IntensityConfig(modality=config.modality),
                            target_spacing_mm=config.spacing, seed=config.seed)
    progress.stage("preprocess", f"preparing cubes from {len(sources)} volume(s)", total=len(sources))
    if not ctx.is_main:
        ctx.barrier()  # rank 0 fills the cache first; the others then read it
    cubes = prepare_cubes(sources, settings, Path(config.cache_dir or default_cache_dir()),
                          progress=lambda done, total, cached: progress.update(done, total, cached=cached),
                          warn=lambda message: progress.log(redact_paths(message, sources)))
    if ctx.is_main:
        ctx.barrier()
    train, val = cubes.split(config.val_fraction, seed=config.seed)
    progress.log(f"{len(train)} training and {len(val)} validation cubes of {patch} on {device_description(device)}")
    data = PretrainData(train=train, val=val, sources=sources, settings=settings,
                        cache_dir=Path(config.cache_dir or default_cache_dir()), seed=config.seed, log=progress.log,
                        rank=ctx.rank, world_size=ctx.world_size)

    method = cls(width=config.width, settings=config.method_settings).to(device)
    init_info = None
    if config.init:
        init = load_initial_weights(config.init)
        apply_initial_weights(method.backbone, init, what=f"--init {config.init}")
        init_info = init.describe()
    wrapped = DistributedDataParallel(method, find_unused_parameters=True) if ctx.enabled else method
    loop = TrainingLoop(method, config.loop, device, progress, out, "pretrain", ctx)
    if config.resume and loop.resume():
        progress.log(f"resumed from step {loop.step}")
    rng = np.random.default_rng([config.seed, ctx.rank, loop.step])
    generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + ctx.rank * 7919 + loop.step)
    next_batch = method.batch_source(data, config.batch_size, rng, device)
    val_batches = method.validation_batches(data, config.batch_size, device)

    def step_fn(step):
        loss, parts = wrapped(next_batch(), generator)
        return loss, {**parts, "batch": config.batch_size}

    def validate_fn():
        fixed = torch.Generator(device=device).manual_seed(config.seed + 12345)
        return float(np.mean([method.validation_loss(b, fixed) for b in val_batches]))

    result = loop.run(step_fn, validate_fn if val_batches else None)
    if not ctx.is_main:
        return out
    if result.best_state is not None:
        method.load_state_dict(result.best_state)
    state = method.transferable_state_dict()
    meta = {
        "architecture": {"name": "unet3d", "width": config.width, "in_channels": 1, "out_channels": 1, "spatial_dims": 3},
        "task": "pretrain",
        "method": method.describe(),
        "preprocessing": {"intensity": settings.intensity.to_dict(), "target_spacing_mm": config.spacing,
                          "modality": _modality_of(cubes.summary())},
        "patch_size": list(patch),
        "training": {"steps": result.steps_done, "stopped_by": result.stopped_by, "batch_size": config.batch_size,
                     "optimizer": config.loop.optimizer, "lr": config.loop.lr, "best_val_loss": result.best_val,
                     "seed": config.seed, "device": device_description(device), "init": init_info,
                     "seconds": round(result.seconds, 1)},
        "history": thin_history(result.history),
        "data_summary": cubes.summary(),
        "world_size": ctx.world_size,
    }
    save_bundle(out, state, meta)
    return out


def _refuse_mixed_dimensions(sources: list, data) -> None:
    """Refuse a mix of one-slice (2D) images and 3D volumes, judged from the file headers alone."""
    flat = [is_single_slice(source) for source in sources]
    if any(flat) and not all(flat):
        raise MedSSLError(f"{' '.join(map(str, data))}: mixes {sum(flat)} one-slice (2D) image(s) with "
                          f"{len(flat) - sum(flat)} 3D volume(s); pretrain on them separately")


def load_checkpoint_exists(out: Path) -> bool:
    return (Path(out) / "checkpoint.pt").is_file()


def _modality_of(summary: dict) -> str | None:
    counts = summary.get("modalities") or summary.get("modality_counts") or {}
    return max(counts, key=counts.get) if counts else None
