"""Options shared by several sub-commands, and the argparse options generated from settings dataclasses
(:mod:`MedSSL.io.settings`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from MedSSL.io.settings import default_of, flag_of, jsonable
from MedSSL.engine.loop import UNBOUNDED_STEPS, LoopConfig, RuntimeOptions
from MedSSL.engine.progress import Progress


def _shown(value) -> str:
    """A default as the help text shows it: 64 64 32, 0.001, adam."""
    if isinstance(value, (tuple, list)):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _nested_settings(f):
    """The default instance of a field that holds a nested settings dataclass (e.g. ``loop``), else None."""
    if f.metadata.get("cli") or f.default_factory is dataclasses.MISSING:
        return None
    nested = default_of(f)
    return nested if dataclasses.is_dataclass(nested) else None


def add_options(parser, cls, instance=None, help_for: dict | None = None, skip=()) -> None:
    """Add the argparse options of settings class ``cls``: one per :func:`~MedSSL.io.settings.option` field
    (dest = the field name), its default the field's (``instance``'s, for a nested config a task declares
    with its own defaults); a field holding a nested settings dataclass (e.g. ``loop``) adds that class's
    options, with the help texts its field metadata overrides."""
    help_for = help_for or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if not f.metadata.get("cli"):
            nested = _nested_settings(f)
            if nested is not None:
                add_options(parser, type(nested), nested, f.metadata.get("help"), skip)
            continue
        meta = f.metadata
        default = default_of(f, instance)
        text = help_for.get(f.name, meta["help"])
        kwargs = {"dest": f.name, "help": argparse.SUPPRESS if text is None else text.replace("{default}", _shown(default))}
        cli_default = meta["cli_default"]
        kwargs["default"] = default if cli_default is dataclasses.MISSING else cli_default
        if isinstance(kwargs["default"], tuple):
            kwargs["default"] = list(kwargs["default"])
        if meta["action"]:
            kwargs["action"] = meta["action"]
            if meta["action"] == "append":
                kwargs["default"] = []
        else:
            for key in ("type", "choices", "nargs"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(f), **kwargs)


def settings_from_args(cls, args, instance=None, **given):
    """An instance of settings class ``cls`` from parsed ``args``: option fields from their dest (an option
    left out whose argparse default is None keeps the field's default), nested settings from their own
    options, other fields from ``given``. The class's ``__post_init__`` checks the values."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.metadata.get("cli"):
            if not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if value is None and f.metadata["cli_default"] is None:
                continue
            values[f.name] = tuple(value) if isinstance(value, list) and f.metadata["action"] != "append" else value
        elif (nested := _nested_settings(f)) is not None:
            values[f.name] = settings_from_args(type(nested), args, nested)
    if instance is not None:
        return dataclasses.replace(instance, **values)
    return cls(**values)


def defaults_of(cls, instance=None) -> dict:
    """{flag name without dashes: default} of the options of ``cls`` (nested settings included), as JSON values."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli"):
            if f.metadata["help"] is not None:
                value = default_of(f, instance)
                if f.metadata.get("action") == "store_false":  # --no-amp for amp=True: the flag is off by default
                    value = not value
                out[flag_of(f)[2:]] = jsonable(value)
        elif (nested := _nested_settings(f)) is not None:
            out.update(defaults_of(type(nested), nested))
    return out


def command_parser(sub, name: str, help: str, description: str, model_help: str | None = None,
                   image_help: str = "image volume or DICOM folder", many: bool = False):
    """The sub-command parser ``name`` (``medssl NAME``); with ``model_help``, its ``--model DIR`` and
    ``--image PATH`` (what predict and suggest apply to what; ``many``: one or more paths)."""
    parser = sub.add_parser(name, help=help, description=description)
    if model_help is not None:
        parser.add_argument("--model", required=True, type=Path, metavar="DIR", help=model_help)
        parser.add_argument("--image", required=True, metavar="PATH", nargs="+" if many else None, help=image_help)
    return parser


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RuntimeOptions)


def loop_config(args, default: LoopConfig) -> LoopConfig:
    """The training budget of a command: its options over the command's own ``default``; ``--steps`` left
    out means ``default.steps``, or unlimited (the schedule follows the time) when ``--max-time`` is given."""
    steps = {} if args.steps is not None or not args.max_time else {"steps": UNBOUNDED_STEPS}
    return settings_from_args(LoopConfig, args, default, **steps)


def training_config(cls, args, **given):
    """A task's settings (``cls``: PretrainConfig, FinetuneConfig) from ``args``, its ``loop`` built by
    :func:`loop_config` over the task's own loop defaults."""
    default = next(f for f in dataclasses.fields(cls) if f.name == "loop").default_factory()
    return settings_from_args(cls, args, loop=loop_config(args, default), device=args.device, seed=args.seed, **given)


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
