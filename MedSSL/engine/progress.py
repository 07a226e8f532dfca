"""Progress reporting for long jobs: a terminal bar, JSON lines on stdout, or nothing.

JSON lines (``--progress json``), one object per line, flushed at once:

* ``{"event": "stage", "stage": "preprocess", "message": "..."}``
* ``{"event": "progress", "stage": "pretrain", "step": 10, "total": 100, "loss": 0.01, "lr": 0.001,
  "eta_s": 12.5, "cubes_per_s": 40.2, ...}`` (extra keys such as ``val_loss`` when known)
* ``{"event": "log", "message": "..."}``
* ``{"event": "done", "bundle": "<dir>"}`` or ``{"event": "done", "outputs": {...}}`` last.

The Slicer modules read these lines from the child process; the bar is for people in a terminal.
"""

from __future__ import annotations

import json
import math
import sys
import time


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


class Progress:
    """Reports stages, steps, messages and the final result in one of three modes: bar|json|none."""

    def __init__(self, mode: str = "bar", stream=None):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.stream = stream or sys.stdout
        self._bar = None
        self._stage = None
        self._started = time.monotonic()

    def _emit(self, obj: dict) -> None:
        self.stream.write(json.dumps({k: _clean(v) for k, v in obj.items()}) + "\n")
        self.stream.flush()

    def stage(self, stage: str, message: str = "", total: int | None = None) -> None:
        """A new phase of the job (preprocess, pretrain, finetune, predict...)."""
        self._close_bar()
        self._stage = stage
        self._started = time.monotonic()
        if self.mode == "json":
            self._emit({"event": "stage", "stage": stage, "message": message})
        elif self.mode == "bar":
            if message:
                sys.stderr.write(f"{message}\n")
            if total:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, total: int, **values) -> None:
        """Step ``step`` of ``total`` is done; values are loss, lr, cubes_per_s and the like."""
        elapsed = time.monotonic() - self._started
        eta = elapsed / step * (total - step) if step > 0 else None
        if self.mode == "json":
            self._emit({"event": "progress", "stage": self._stage, "step": step, "total": total, "eta_s": eta, **values})
        elif self.mode == "bar":
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self._stage, unit="step", file=sys.stderr, dynamic_ncols=True)
            self._bar.total = total
            self._bar.n = step
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items() if v is not None}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()

    def log(self, message: str) -> None:
        if self.mode == "json":
            self._emit({"event": "log", "message": message})
        elif self.mode == "bar":
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")

    def done(self, **result) -> None:
        """The final line: ``bundle=DIR`` for training, ``outputs={...}`` for other jobs."""
        self._close_bar()
        if self.mode == "json":
            self._emit({"event": "done", **result})
        elif self.mode == "bar":
            for key, value in result.items():
                sys.stderr.write(f"{key}: {value}\n")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
