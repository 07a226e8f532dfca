"""Optional speed-ups for the GPU path, each behind a flag and each with a fallback.

* channels-last 3D memory format (``--channels-last``): weights in NDHWC order, which cuDNN's 3D
  convolutions often prefer with mixed precision; inputs are converted batch by batch.
* ``torch.compile`` (``--compile``): compiled on first use; if compilation fails (no compiler, an
  unsupported operation), the module falls back to eager mode with a log line instead of stopping the run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def use_channels_last(module: nn.Module, log: Callable[[str], None]) -> bool:
    """Convert ``module``'s 5D weights to channels-last 3D; False (and a log line) if it cannot."""
    try:
        module.to(memory_format=torch.channels_last_3d)
        return True
    except (RuntimeError, TypeError) as exc:
        log(f"channels-last not used: {str(exc).splitlines()[0][:120]}")
        return False


def compile_with_fallback(module: nn.Module, log: Callable[[str], None]) -> None:
    """Compile ``module`` in place (its state-dict keys do not change); on a compilation error at the
    first call, log it and run the module eagerly from then on."""
    try:
        module.compile()
    except (RuntimeError, AttributeError) as exc:  # torch without nn.Module.compile, or no backend
        log(f"torch.compile not used: {str(exc).splitlines()[0][:120]}")
        return
    compiled_forward = module._compiled_call_impl
    state = {"checked": False}

    def guarded(*args, **kwargs):
        if state["checked"]:
            return compiled_forward(*args, **kwargs)
        try:
            out = compiled_forward(*args, **kwargs)
            state["checked"] = True
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            log(f"torch.compile failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:100]}); running eagerly")
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = guarded


def prepare_batch(batch, channels_last: bool):
    """A 5D batch in the memory format the module expects (other inputs pass through)."""
    if channels_last and isinstance(batch, torch.Tensor) and batch.dim() == 5:
        return batch.contiguous(memory_format=torch.channels_last_3d)
    return batch
