"""Options shared by several sub-commands."""

from __future__ import annotations

import argparse

import torch

from MedSSL.engine.loop import UNBOUNDED_STEPS, LoopConfig
from MedSSL.engine.progress import Progress


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                        help="bar in a terminal (default), json = one JSON object per line on stdout, none")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # exit when the caller dies


def add_training_options(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float, patch) -> None:
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {steps}, or unlimited with --max-time)")
    parser.add_argument("--max-time", type=float, default=None, metavar="SECONDS", help="stop after this many seconds (whichever of --steps/--max-time comes first)")
    parser.add_argument("--batch-size", type=int, default=batch, help=f"cubes per step (default {batch})")
    parser.add_argument("--patch", type=int, nargs=3, default=list(patch), metavar=("X", "Y", "Z"), help=f"cube size in voxels, multiples of 8 (default {' '.join(map(str, patch))})")
    parser.add_argument("--width", type=int, default=32, help="base channels of the U-Net (32 = official Models Genesis; 8 or 16 for CPUs and small GPUs)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    parser.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam", help="default adam")
    parser.add_argument("--val-every", type=int, default=50, help="validate every N steps (default 50)")
    parser.add_argument("--patience", type=int, default=20, help="early stopping after N validations without improvement (default 20; 0 = off)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="write a resumable checkpoint every N steps (default 100)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")


def loop_config(args, default_steps: int) -> LoopConfig:
    steps = args.steps if args.steps is not None else (UNBOUNDED_STEPS if args.max_time else default_steps)
    for name in ("steps", "batch_size", "width", "val_every", "checkpoint_every"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            from MedSSL.errors import MedSSLError

            raise MedSSLError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.max_time is not None and not args.max_time > 0:
        from MedSSL.errors import MedSSLError

        raise MedSSLError(f"--max-time {args.max_time:g}: must be more than 0 seconds (leave it out for no time limit)")
    return LoopConfig(steps=steps, max_time=args.max_time, lr=args.lr, optimizer=args.optimizer,
                      val_every=args.val_every, patience=args.patience or None,
                      checkpoint_every=args.checkpoint_every, amp=not args.no_amp)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie, dead but not yet reaped, counts as gone).

    Portable: on Windows ``os.kill(pid, 0)`` does not test existence (signal 0 is CTRL_C_EVENT there), so
    the process is opened and waited on with a zero timeout instead.
    """
    import os
    import sys

    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        synchronize, query_limited = 0x00100000, 0x1000
        handle = kernel32.OpenProcess(synchronize | query_limited, False, int(pid))
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists, owned by someone else
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) succeeded


def watch_parent(pid: int, interval: float = 2.0, exists=process_exists) -> None:
    """Exit this process (status 3) once process ``pid`` is gone.

    The Slicer modules start jobs in their own process group so Cancel can end the whole tree; this
    watchdog makes sure a job does not outlive a Slicer that crashed or was killed (and keep its GPU). A
    check that fails unexpectedly is retried at the next interval: the watchdog thread never dies.
    """
    import os
    import threading
    import time

    direct_child = os.getppid() == pid  # POSIX: a child whose parent dies is re-parented

    def gone() -> bool:
        if direct_child and os.name != "nt" and os.getppid() != pid:
            return True
        return not exists(pid)

    def watch():
        while True:
            time.sleep(interval)
            try:
                if gone():
                    os._exit(3)
            except Exception:  # noqa: BLE001 - keep watching
                continue

    threading.Thread(target=watch, name="medssl-parent-watchdog", daemon=True).start()


def make_progress(args) -> Progress:
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "parent_pid", None):
        watch_parent(args.parent_pid)
    import sys

    mode = args.progress or ("bar" if sys.stderr.isatty() else "none")
    return Progress(mode)
