"""The training loop shared by pretraining and fine-tuning.

It owns what every job needs and no method-specific logic: the step/time budget (whichever ends
first), mixed precision (``engine.acceleration.mixed_precision``: bf16 or fp16 on CUDA, bf16 on CPUs that
compute it natively), learning-rate warm-up and
cosine decay, validation with early stopping and best-weights tracking, atomic checkpoints every N
steps, resume from the last checkpoint, progress reporting, and torchrun (only rank 0 writes).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from MedSSL.errors import MedSSLError
from MedSSL.io.settings import at_least, one_of, option
from MedSSL.engine.acceleration import mixed_precision
from MedSSL.engine.checkpoint import load_checkpoint, save_checkpoint
from MedSSL.engine.progress import Progress
from MedSSL.engine.runtime import DistributedContext

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class LoopConfig:
    """Budget and schedule. steps: optimiser steps; max_time: seconds for this invocation (None = no
    limit); lr: peak learning rate; warmup: fraction of steps with linear warm-up; optimizer: adam|adamw|sgd;
    patience: validations without improvement before early stopping (None or 0 = off).

    The defaults are pretraining's; a task config with other defaults holds a ``LoopConfig(...)`` of its own
    (see :class:`MedSSL.tasks.finetune.common.FinetuneConfig`). The command-line options are generated from
    the fields that are :func:`~MedSSL.io.settings.option` s."""

    steps: int = option(1000, type=int, cli_default=None,
                        help="optimiser steps (default {default}, or unlimited with --max-time)")
    max_time: float | None = option(None, type=float, metavar="SECONDS",
                                    help="stop after this many seconds (whichever of --steps/--max-time comes first)")
    lr: float = option(1e-3, type=float, help="peak learning rate (default {default})")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="default {default}")
    weight_decay: float = 0.0
    warmup: float = 0.02
    min_lr_ratio: float = 0.01
    val_every: int = option(50, type=int, help="validate every N steps (default {default})")
    patience: int | None = option(20, type=int, help="early stopping after N validations without improvement "
                                                     "(default {default}; 0 = off)")
    checkpoint_every: int = option(100, type=int, help="write a resumable checkpoint every N steps (default {default})")
    amp: bool = option(True, flag="--no-amp", action="store_false",
                       help="train in fp32 (default: bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16)")
    grad_clip: float | None = 5.0

    def __post_init__(self):
        for name in ("steps", "val_every", "checkpoint_every"):
            at_least(self, name, 1)
        if self.max_time is not None and not self.max_time > 0:
            raise MedSSLError(f"--max-time {self.max_time:g}: must be more than 0 seconds (leave it out for no time limit)")
        one_of(self, "optimizer", OPTIMIZERS)
        if not self.patience:
            object.__setattr__(self, "patience", None)


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how any job runs (``--device``, ``--seed``, ``--progress``, ``--threads``); task configs take
    their ``device`` and ``seed`` defaults from here."""

    device: str = option("auto", help="auto (CUDA, else the Apple GPU (MPS), when available), cpu, cuda or mps "
                         "(default {default})")
    seed: int = option(0, type=int, help="random seed (default {default})")
    progress: str | None = option(None, choices=("bar", "json", "none"),
                                  help="bar in a terminal (default), json = one JSON object per line on stdout, none")
    threads: int | None = option(None, type=int, help="CPU threads for torch (default: torch's choice)")
    parent_pid: int | None = option(None, type=int, help=None)  # hidden: exit when the caller dies


@dataclass
class LoopResult:
    steps_done: int
    stopped_by: str  # "steps" | "time" | "early-stopping"
    history: list = field(default_factory=list)
    best_val: float | None = None
    best_state: dict | None = None
    seconds: float = 0.0


def make_optimizer(params, config: LoopConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (adam, adamw, sgd)")


#: ``steps`` given when only ``max_time`` bounds a run: the schedule then follows the elapsed time
UNBOUNDED_STEPS = 10**9


def scheduled_by_time(config: LoopConfig) -> bool:
    return config.max_time is not None and config.steps >= UNBOUNDED_STEPS


def lr_factor(step: int, config: LoopConfig, fraction: float | None = None) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine down to ``min_lr_ratio``.

    By step (``step`` of ``config.steps``), or, when ``fraction`` (elapsed / max_time, 0..1) is given,
    by time, so a run bounded only by ``--max-time`` still warms up and decays within its budget.
    """
    if fraction is not None:
        if fraction < config.warmup:
            return max(fraction / config.warmup, 1.0 / 1000)
        progress = min(1.0, (fraction - config.warmup) / max(1e-9, 1 - config.warmup))
    else:
        warm = max(1, int(config.warmup * config.steps))
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, config.steps - warm))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TrainingLoop:
    """Runs ``step_fn`` under a budget; see the module docstring.

    model: the module whose ``state_dict`` is checkpointed (the method, or the segmentation network).
    step_fn(step) -> (loss tensor, {name: float}); validate_fn() -> float (lower is better) or None.
    """

    def __init__(self, model: nn.Module, config: LoopConfig, device: torch.device, progress: Progress,
                 out_dir: Path, stage: str, ctx: DistributedContext | None = None, trainable: nn.Module | None = None):
        self.model, self.config, self.device, self.progress = model, config, device, progress
        self.out_dir, self.stage, self.ctx = Path(out_dir), stage, ctx or DistributedContext()
        self.trainable = trainable or model
        self.optimizer = make_optimizer([p for p in self.trainable.parameters() if p.requires_grad], config)
        self.history: list[dict] = []
        self.step = 0
        self.best_val: float | None = None
        self.best_state: dict | None = None
        self.bad_checks = 0
        self.extra_state: dict = {}

    # ----- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "history": self.history, "best_val": self.best_val, "best_state": self.best_state,
            "bad_checks": self.bad_checks, "extra": self.extra_state,
        }

    def resume(self) -> bool:
        """Load ``<out>/checkpoint.pt`` when present; True if training continues from it."""
        ckpt = load_checkpoint(self.out_dir)
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        self.best_val, self.best_state = ckpt.get("best_val"), ckpt.get("best_state")
        self.bad_checks, self.extra_state = int(ckpt.get("bad_checks", 0)), dict(ckpt.get("extra") or {})
        return True

    def _checkpoint(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.out_dir, self.state())

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, step_fn: Callable[[int], tuple[torch.Tensor, dict]],
            validate_fn: Callable[[], float] | None = None) -> LoopResult:
        cfg = self.config
        autocast, scaler = mixed_precision(self.device, cfg.amp)
        start = time.monotonic()
        by_time = scheduled_by_time(cfg)
        budget = f"{cfg.max_time:g} s" if by_time else f"{cfg.steps} steps" + (f", at most {cfg.max_time:g} s" if cfg.max_time else "")
        self.progress.stage(self.stage, f"{self.stage}: {budget}", total=None if by_time else cfg.steps)
        total, fraction = cfg.steps, None
        stopped_by, samples, last_report = "steps", 0, 0.0
        self.trainable.train()
        while self.step < cfg.steps:
            out_of_time = cfg.max_time is not None and time.monotonic() - start >= cfg.max_time
            if self.ctx.any(out_of_time, self.device):
                stopped_by = "time"
                break
            if by_time:  # the same fraction on every torchrun rank, so their learning rates agree
                fraction = self.ctx.mean(min(1.0, (time.monotonic() - start) / cfg.max_time), self.device)
                total = max(self.step + 1, int(round((self.step + 1) / max(fraction, 1e-6))))  # estimate
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(self.step, cfg, fraction)
            with autocast:
                loss, parts = step_fn(self.step)
            if not torch.isfinite(loss):
                hint = " or train in fp32 (--no-amp)" if isinstance(autocast, torch.autocast) else ""
                raise FloatingPointError(f"the loss became {float(loss.detach())} at step {self.step}; lower --lr{hint}")
            self.optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(self.optimizer)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), cfg.grad_clip)
            (scaler.step(self.optimizer), scaler.update()) if scaler else self.optimizer.step()
            self.step += 1
            if hasattr(self.model, "after_step"):  # momentum teachers, queues, staged losses
                self.model.after_step(self.step, total)
            samples += int(parts.pop("batch", 1))
            record = {"step": self.step, "loss": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"], **parts}
            if validate_fn is not None and (self.step % cfg.val_every == 0 or self.step == total):
                record["val_loss"] = self._validate(validate_fn)
                self.trainable.train()
            self.history.append(record)
            now = time.monotonic()
            if now - last_report > 0.5 or self.step == total or "val_loss" in record:
                values = {k: v for k, v in record.items() if k != "step"}
                values["cubes_per_s"] = samples * self.ctx.world_size / max(1e-9, now - start)
                self.progress.update(self.step, total, **values)
                last_report = now
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._checkpoint()
            if cfg.patience is not None and self.bad_checks >= cfg.patience:
                stopped_by = "early-stopping"
                self.progress.log(f"early stopping: no validation improvement in {cfg.patience} checks")
                break
        self._checkpoint()
        return LoopResult(self.step, stopped_by, self.history, self.best_val, self.best_state, time.monotonic() - start)

    def _validate(self, validate_fn) -> float:
        self.trainable.eval()
        value = self.ctx.mean(float(validate_fn()), self.device)
        if self.best_val is None or value < self.best_val - 1e-7:
            self.best_val, self.bad_checks = value, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.bad_checks += 1
        return value


def thin_history(history: list[dict], keep: int = 200) -> list[dict]:
    """At most ``keep`` records (every k-th, always the validation records and the last)."""
    if len(history) <= keep:
        return copy.deepcopy(history)
    stride = math.ceil(len(history) / keep)
    return [r for i, r in enumerate(history) if i % stride == 0 or "val_loss" in r or i == len(history) - 1]
