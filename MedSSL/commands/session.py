"""``medssl session``: a live few-shot session, JSON lines in on stdin, JSON lines out on stdout.

One process per (image, segmentation): the image is read once, the features computed once, the fitted
model and the current result kept (:mod:`MedSSL.tasks.fewshot.session`). Protocol (one JSON object per
line; every command may carry an ``"id"``, echoed in its answer):

Commands (stdin)::

    {"cmd": "planes", "axis": 2, "planes": [{"index": 12, "labels": PAYLOAD}], "clear": [7]}
    {"cmd": "painting", "path": "painted.nrrd"}        or  {"cmd": "painting", "labels": PAYLOAD}
    {"cmd": "update"}
    {"cmd": "result"}
    {"cmd": "save", "out": "model_folder"}
    {"cmd": "close"}

Answers (stdout)::

    {"event": "ready", "shape": [X, Y, Z], "spacing": [...], "seconds": s}                   once, first
    {"event": "log" | "stage", ...}                                      progress while an update runs
    {"event": "ok", "id": ...}                                              planes / painting / save
    {"event": "result", "id": ..., "mode": "full" | "incremental" | "unchanged", "box": [[i0, i1],
     [j0, j1], [k0, k1]], "labels": PAYLOAD, "axis": a, "slices": [...], "seconds": {...}}
    {"event": "error", "id": ..., "message": "..."}                  a bad command; the session goes on
    {"event": "closed", "reason": "close" | "end of input" | "idle"}                                 last

PAYLOAD: ``{"shape": [...], "dtype": "uint8", "encoding": "zlib+base64", "data": "..."}``, the array in C
order (axes i, j, k, as the image's index axes; a plane along axis a has the other two). ``box``:
half-open index ranges of the voxels whose label changed; ``labels``: their new values (class values
of the painting, 0 background). The session ends on ``close``, at the end of stdin, when the parent
(``--parent-pid``) is gone, or after ``--idle-timeout`` seconds without a command. No paths are printed.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSSL.commands.common import add_options, add_runtime_options, command_parser, settings_from_args
from MedSSL.errors import MedSSLError
from MedSSL.io.settings import at_least, option


@dataclass(frozen=True)
class SessionOptions:
    """``medssl session``'s options."""

    image: str = option(None, metavar="PATH", help="image volume or DICOM folder (read once)")
    painting: Path | None = option(None, type=Path, metavar="PATH",
                                   help="an initial painting (255 = not annotated) on the image grid")
    idle_timeout: float = option(1800.0, type=float, metavar="S",
                                 help="end the session after S seconds without a command (default {default})")
    fewshot_steps: int | None = option(None, type=int, metavar="N",
                                       help="appearance MLP steps of a full fit (default: the engine's)")
    warm_steps: int | None = option(None, type=int, metavar="N",
                                    help="MLP steps of a correction's warm refit (default: a sixth of --fewshot-steps)")

    def __post_init__(self):
        at_least(self, "fewshot_steps", 1)
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise MedSSLError(f"--idle-timeout {self.idle_timeout:g}: must be more than 0 seconds")


DESCRIPTION = ("A live few-shot session on one image: reads JSON-line commands on stdin (planes, painting, update, "
               "result, save, close) and answers JSON lines on stdout; see docs/live-session.md. The few-shot engine "
               "runs on the CPU whatever --device says.")


def add_parser(sub) -> None:
    p = command_parser(sub, "session", "a live few-shot session (JSON lines on stdin/stdout)", DESCRIPTION)
    add_options(p, SessionOptions)
    add_runtime_options(p)
    p.set_defaults(run=run)


def encode(array: np.ndarray) -> dict:
    """uint8 array -> PAYLOAD (see the module docstring)."""
    array = np.ascontiguousarray(array, np.uint8)
    return {"shape": list(array.shape), "dtype": "uint8", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(array.tobytes(), 1)).decode("ascii")}


def decode(payload, what: str) -> np.ndarray:
    """PAYLOAD -> uint8 array; MedSSLError naming ``what`` when it is malformed."""
    try:
        shape = tuple(int(n) for n in payload["shape"])
        if payload.get("encoding", "zlib+base64") != "zlib+base64" or payload.get("dtype", "uint8") != "uint8":
            raise ValueError("expected dtype uint8, encoding zlib+base64")
        data = zlib.decompress(base64.b64decode(payload["data"]))
        return np.frombuffer(data, np.uint8).reshape(shape).copy()
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise MedSSLError(f"{what}: malformed labels payload ({exc.__class__.__name__}: {str(exc)[:80]})") from None


class _Emitter:
    """JSON lines on stdout, one writer at a time."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, obj: dict) -> None:
        with self.lock:
            self.stream.write(json.dumps(obj) + "\n")
            self.stream.flush()

    def log(self, message: str) -> None:
        self({"event": "log", "message": message})


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of input


def run(args) -> int:
    from MedSSL.commands.common import watch_parent

    options = settings_from_args(SessionOptions, args)
    if not options.image:
        raise MedSSLError("--image: required (the image of the session)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.parent_pid:
        watch_parent(args.parent_pid)  # Slicer gone (crashed, killed): the session ends
    emit = _Emitter(sys.stdout)
    clock = time.perf_counter()
    session = _open(options, args, emit)
    emit({"event": "ready", "shape": list(session.image.shape), "spacing": [float(s) for s in session.spacing],
          "seconds": round(time.perf_counter() - clock, 3)})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(sys.stdin, lines), name="medssl-session-stdin", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=options.idle_timeout)
        except queue.Empty:
            emit({"event": "closed", "reason": "idle"})
            return 0
        if line is None:
            emit({"event": "closed", "reason": "end of input"})
            return 0
        if not line.strip():
            continue
        if _handle(session, line, emit) == "close":
            emit({"event": "closed", "reason": "close"})
            return 0


def _open(options: SessionOptions, args, emit):
    from MedSSL.io.volumes import read_volume
    from MedSSL.tasks.fewshot.engine import FewShotSettings
    from MedSSL.tasks.fewshot.session import FewShotSession

    image = read_volume(options.image)
    settings = FewShotSettings(seed=args.seed, steps=options.fewshot_steps or FewShotSettings.steps)
    session = FewShotSession(image.array, image.spacing, settings, options.warm_steps, log=emit.log)
    session.volume = image
    if options.painting is not None:
        from MedSSL.data.labels import label_array

        session.set_painting(label_array(read_volume(options.painting), image, "--painting", "--image"))
    return session


def _handle(session, line: str, emit) -> str | None:
    """Run one command line; answers on ``emit``. Returns "close" for the close command."""
    ident = None
    try:
        try:
            command = json.loads(line)
        except ValueError:
            raise MedSSLError(f"not a JSON line: {line.strip()[:60]!r}") from None
        if not isinstance(command, dict):
            raise MedSSLError("a command is a JSON object with a \"cmd\" key")
        ident = command.get("id")
        name = command.get("cmd")
        if name == "close":
            return "close"
        handler = COMMANDS.get(name)
        if handler is None:
            raise MedSSLError(f"unknown command {name!r}: expected one of {', '.join(sorted(COMMANDS) + ['close'])}")
        answer = handler(session, command)
        emit({"id": ident, **answer})
    except MedSSLError as exc:
        emit({"event": "error", "id": ident, "message": str(exc)})
    except (MemoryError, RuntimeError, FloatingPointError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        emit({"event": "error", "id": ident, "message": f"{exc.__class__.__name__}: {first}"})
    return None


def _planes(session, command) -> dict:
    axis = command.get("axis")
    if axis not in (0, 1, 2):
        raise MedSSLError(f"planes: \"axis\" {axis!r}: expected 0 (i), 1 (j) or 2 (k)")
    given = {}
    for entry in command.get("planes", []):
        if not isinstance(entry, dict) or "index" not in entry or "labels" not in entry:
            raise MedSSLError("planes: each entry is {\"index\": k, \"labels\": PAYLOAD}")
        given[int(entry["index"])] = decode(entry["labels"], f"plane {entry['index']}")
    session.set_planes(axis, given)
    session.clear_planes(axis, [int(k) for k in command.get("clear", [])])
    return {"event": "ok"}


def _painting(session, command) -> dict:
    if "path" in command:
        from MedSSL.data.labels import label_array
        from MedSSL.io.volumes import read_volume

        painting = label_array(read_volume(command["path"]), session.volume, "painting", "the session's image")
    elif "labels" in command:
        painting = decode(command["labels"], "painting")
    else:
        raise MedSSLError("painting: give \"path\" (a label file) or \"labels\" (PAYLOAD)")
    session.set_painting(painting)
    return {"event": "ok"}


def _update(session, command) -> dict:
    update = session.update()
    return {"event": "result", "mode": update.mode, "box": [list(b) for b in update.box],
            "labels": encode(update.labels), "axis": update.axis, "slices": update.slices, "seconds": update.seconds}


def _result(session, command) -> dict:
    from MedSSL.tasks.fewshot.session import bounding_box

    box = bounding_box(session.labels > 0)
    labels = session.labels[tuple(slice(a, b) for a, b in box)]
    return {"event": "result", "mode": "current", "box": [list(b) for b in box], "labels": encode(labels)}


def _save(session, command) -> dict:
    from MedSSL.engine.runtime import OutputLock
    from MedSSL.tasks.fewshot.bundle import save_fewshot_bundle

    if session.model is None:
        raise MedSSLError("save: nothing fitted yet (send an update first)")
    if not command.get("out"):
        raise MedSSLError("save: give \"out\", the model folder to write")
    from MedSSL.data.labels import classes_to_json, resolve_classes

    classes = command.get("classes") or classes_to_json(resolve_classes(list(session.model.classes), None, "save"))
    with OutputLock(Path(command["out"])):
        save_fewshot_bundle(Path(command["out"]), session.model, classes,
                            {"data_summary": {"volumes": 1, "shapes": [list(session.image.shape)]},
                             "init": {"fewshot_round": True, "backbone": False}})
    return {"event": "ok"}


COMMANDS = {"planes": _planes, "painting": _painting, "update": _update, "result": _result, "save": _save}
