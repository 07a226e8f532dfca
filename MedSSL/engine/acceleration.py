"""How a training network runs fast on its device: memory format, mixed precision, compilation.

* channels-last 3D memory format: weights in NDHWC order. On the CPU always for 3D networks (oneDNN's
  3D convolutions and their backward pass: 1.3-1.5x per training step, measured with
  ``Testing/Benchmarks/bench_speed.py``); on CUDA with ``--channels-last`` (cuDNN often prefers it with
  mixed precision). Numerically the same network: only the order of the summations changes.
* mixed precision (on unless ``--no-amp``): autocast to bf16 on CUDA where supported (else fp16 with a
  grad scaler), and to bf16 on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX), where oneDNN's
  bf16 convolutions roughly double the step rate again; CPUs without it emulate bf16 slower than fp32,
  so they stay in fp32. Losses that need fp32 cast their inputs (``logits.float()``). Not on the CPU for
  3D inputs whose first axis is under :data:`CPU_BF16_MIN_FIRST_AXIS` voxels: there oneDNN (torch 2.13)
  computes the bottleneck convolutions' bf16 weight gradients non-deterministically (bottleneck extent
  <= 2 along X; a pretraining run on 16 x 16 x 8 cubes reached NaN at step 3), so those train in fp32.
* ``torch.compile`` (``--compile``): compiled on first use; if compilation fails (no compiler, an
  unsupported operation), the module falls back to eager mode with a log line instead of stopping the run.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes in bf16 natively (AVX512-BF16 or AMX tiles); False when unknown."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these probes: assume emulated bf16
        return False


#: smallest first spatial axis (voxels) of a 3D training input for bf16 on the CPU (bottleneck >= 3)
CPU_BF16_MIN_FIRST_AXIS = 24


def amp_for_inputs(device: torch.device, requested: bool, input_sizes) -> bool:
    """Whether mixed precision stays on for a network trained on inputs of ``input_sizes`` (spatial
    voxel sizes, 2 or 3 axes): off on the CPU when a 3D input is under :data:`CPU_BF16_MIN_FIRST_AXIS`
    along its first axis (see the module docstring)."""
    if not requested or device.type != "cpu":
        return requested
    return all(len(size) < 3 or int(size[0]) >= CPU_BF16_MIN_FIRST_AXIS for size in input_sizes)


def mixed_precision(device: torch.device, enabled: bool):
    """(autocast context, grad scaler or None) for training steps on ``device``; see the module docstring."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return torch.autocast("cuda", dtype=dtype), scaler
    if enabled and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return contextlib.nullcontext(), None


def precision_name(device: torch.device, enabled: bool) -> str:
    """What :func:`mixed_precision` chooses, in words ("bf16 autocast", "fp16 autocast", "fp32")."""
    context, _ = mixed_precision(device, enabled)
    return f"{str(context.fast_dtype).removeprefix('torch.')} autocast" if isinstance(context, torch.autocast) else "fp32"


def prepare_for_training(module: nn.Module, device: torch.device, spatial_dims: int, input_sizes, amp: bool,
                         channels_last: bool, log: Callable[[str], None]) -> tuple[bool, bool]:
    """The one set-up every training task runs on its network (already on ``device``): channels-last
    where it pays (a 3D network: always on the CPU, on CUDA when ``channels_last``, ``--channels-last``,
    asks), mixed precision for its ``input_sizes`` (:func:`amp_for_inputs`; ``amp`` = not ``--no-amp``),
    and one log line saying which. Returns (amp for the loop's config, channels-last?)."""
    converted = spatial_dims == 3 and (device.type == "cpu" or channels_last) and use_channels_last(module, log)
    amp = amp_for_inputs(device, amp, input_sizes)
    log(f"training in {precision_name(device, amp)}{', channels-last' if converted else ''}")
    return amp, converted


def use_channels_last(module: nn.Module, log: Callable[[str], None]) -> bool:
    """Convert ``module``'s 5D weights to channels-last 3D; False (and a log line) if it cannot."""
    try:
        module.to(memory_format=torch.channels_last_3d)
        return True
    except (RuntimeError, TypeError) as exc:
        log(f"channels-last not used: {str(exc).splitlines()[0][:120]}")
        return False


def compile_with_fallback(module: nn.Module, log: Callable[[str], None]) -> dict:
    """Compile ``module`` in place (its state-dict keys do not change); on a compilation error at the
    first call, log it and run the module eagerly from then on. Returns what happened, for the bundle:
    {"compiled": True} once compiled, updated to {"compiled": False, "reason": ...} if compiling fails."""
    try:
        module.compile()
    except (RuntimeError, AttributeError) as exc:  # torch without nn.Module.compile, or no backend
        log(f"torch.compile not used: {str(exc).splitlines()[0][:120]}")
        return {"compiled": False, "reason": str(exc).splitlines()[0][:120]}
    compiled_forward = module._compiled_call_impl
    state = {"checked": False}
    outcome = {"compiled": True}

    def guarded(*args, **kwargs):
        if state["checked"]:
            return compiled_forward(*args, **kwargs)
        try:
            out = compiled_forward(*args, **kwargs)
            state["checked"] = True
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            # dynamo's "backend='inductor' raised:" is followed by the compiler's own error: both kept
            reason = f"{exc.__class__.__name__}: {' '.join(lines[:2])[:160]}"
            log(f"torch.compile failed ({reason}); running eagerly")
            outcome.update(compiled=False, reason=reason)
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = guarded
    return outcome


def compile_record(outcome: dict | None) -> str | None:
    """The bundle's ``training.compile``: None (not asked), "torch.compile", or "eager (<why>)"."""
    if outcome is None:
        return None
    return "torch.compile" if outcome["compiled"] else f"eager ({outcome['reason']})"


def prepare_batch(batch, channels_last: bool):
    """A 5D batch in the memory format the module expects (other inputs pass through)."""
    if channels_last and isinstance(batch, torch.Tensor) and batch.dim() == 5:
        return batch.contiguous(memory_format=torch.channels_last_3d)
    return batch
