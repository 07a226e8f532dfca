"""Schedules of a quantity over the steps of a run (teacher momentum, loss weights)."""

from __future__ import annotations

import math


def cosine_ramp(start: float, end: float, step: int, total: int) -> float:
    """``start`` at step 0 to ``end`` at ``total`` along a half cosine (``step`` clipped to [0, total])."""
    f = min(max(step, 0), max(total, 1)) / max(total, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * f))


def scheduled(start: float, end: float, step: int, total: int) -> float:
    """:func:`cosine_ramp`, or ``start`` when the run's length is unknown (``total`` <= 0)."""
    return cosine_ramp(start, end, step, total) if total > 0 else start
