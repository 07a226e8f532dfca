"""Seeded random draws for the batched transforms: made on the generator's device, returned on the
batch's device, so the same generator state gives the same transform on CPU and CUDA runs alike."""

from __future__ import annotations

import torch


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where draws are made: the generator's device, or ``device`` without a generator."""
    return generator.device if generator is not None else device


def uniform_draws(generator, shape, device, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws made on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=draw_device(generator, device), dtype=dtype).to(device)


def randint_from(u: torch.Tensor, low, high) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise) from uniform draws ``u`` in [0, 1)."""
    low = torch.as_tensor(low, device=u.device)
    high = torch.as_tensor(high, device=u.device)
    span = (high - low + 1).to(u.dtype)
    return (low + (u * span).long()).minimum(high)


def random_bits(generator, count: int, bits: int, device, dtype=torch.int64) -> torch.Tensor:
    """(count,) integers with ``bits`` (<= 62) uniform random bits, as ``dtype``.

    Up to 31 bits: 64-bit draws (63 random bits) split into two 32-bit halves, two values per draw
    (cheaper on the CPU than one draw per value)."""
    gdev = draw_device(generator, device)
    if bits > 31:
        raw = torch.empty(count, dtype=torch.int64, device=gdev).random_(generator=generator)
        return raw.bitwise_and_((1 << bits) - 1).to(device=device, dtype=dtype)
    raw = torch.empty((count + 1) // 2, dtype=torch.int64, device=gdev).random_(generator=generator)
    halves = raw.view(torch.int32)[:count].to(device)  # bit 31 of the odd halves is always 0
    return halves.bitwise_and_((1 << bits) - 1).to(dtype)


def check_batch(x: torch.Tensor, name: str = "batch") -> None:
    """ValueError unless ``x`` is a floating-point (N, C, X, Y, Z) batch."""
    if x.dim() != 5:
        raise ValueError(f"{name} must be (N, C, X, Y, Z), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
