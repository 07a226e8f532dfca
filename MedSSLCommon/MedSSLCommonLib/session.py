"""Client of a live few-shot session (``python -m MedSSL session``): start it, send commands, read answers.

Pure Python + numpy (no torch, no engine, no ``slicer``): Slicer's own process, its Python console and plain
scripts use it alike. The protocol is documented in ``MedSSL/commands/session.py`` and docs/live-session.md.
Arrays are in the image's ITK index order (i, j, k), as the backend reads the image file; a Slicer array
(``slicer.util.arrayFromVolume``, axes k, j, i) is its transpose.

Example::

    from MedSSLCommonLib.session import FewShotSessionClient

    with FewShotSessionClient("ct.nrrd", device="cpu") as session:
        session.setPlanes(2, {12: plane12, 20: plane20, 31: plane31})  # (ni, nj) uint8 each, along k
        session.update()                        # the whole structure: session.labels (ni, nj, nk)
        session.setPlanes(2, {25: corrected25})
        changed = session.update()              # only the changed box comes back
"""

from __future__ import annotations

import base64
import collections
import json
import os
import queue
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np

from . import backend

START_TIMEOUT_S = 300.0
"""Seconds to wait for the session's "ready" line (reading the image; the first start imports torch)."""
ANSWER_TIMEOUT_S = 600.0
"""Seconds to wait for the answer to a command (a full update on a large image takes tens of seconds)."""


class SessionError(RuntimeError):
    """The session answered an error, or ended; ``str()`` is the one-line reason."""


@dataclass
class SessionResult:
    """An update's answer: ``box`` [(start, stop)] * 3 (i, j, k; half-open), ``labels`` the new labels in
    it (uint8, i, j, k), ``mode`` "full" | "incremental" | "unchanged" | "current", ``seconds`` the
    backend's stage times, ``latency`` seconds from sending the command to reading the answer."""

    box: list
    labels: np.ndarray
    mode: str
    seconds: dict
    latency: float
    slices: list


def encodeLabels(array) -> dict:
    """uint8 array -> the protocol's labels payload (zlib + base64, C order)."""
    array = np.ascontiguousarray(array, np.uint8)
    return {"shape": list(array.shape), "dtype": "uint8", "encoding": "zlib+base64",
            "data": base64.b64encode(zlib.compress(array.tobytes(), 1)).decode("ascii")}


def decodeLabels(payload) -> np.ndarray:
    """The protocol's labels payload -> uint8 array."""
    data = zlib.decompress(base64.b64decode(payload["data"]))
    return np.frombuffer(data, np.uint8).reshape([int(n) for n in payload["shape"]]).copy()


class FewShotSessionClient:
    """One live session on one image file; see the module docstring.

    imagePath: the image (read once by the session; the caller may delete it once :meth:`start` returned).
    python: the backend's Python (default :func:`backend.pythonExecutable`). device, threads, steps,
    warmSteps, idleTimeout: the session's ``--device``, ``--threads``, ``--fewshot-steps``,
    ``--warm-steps``, ``--idle-timeout`` (None: the backend's defaults). onEvent: called with each
    progress line (``{"event": "log", ...}``) while a command runs. The child gets ``--parent-pid``: it
    ends when this process does.
    """

    def __init__(self, imagePath, python=None, device=None, threads=None, steps=None, warmSteps=None,
                 idleTimeout=None, onEvent=None, extraEnvironment=None):
        self.imagePath = str(imagePath)
        self.python = python
        self.options = [("--device", device), ("--threads", threads), ("--fewshot-steps", steps),
                        ("--warm-steps", warmSteps), ("--idle-timeout", idleTimeout)]
        self.onEvent = onEvent
        self.extraEnvironment = dict(extraEnvironment or {})
        self.process = None
        self.shape = None
        self.labels = None        # (ni, nj, nk) uint8: the current result, kept up to date by update()
        self.startSeconds = None  # wall time from starting the process to its "ready" line
        self._lines: queue.Queue = queue.Queue()
        self._stderr = collections.deque(maxlen=50)
        self._nextId = 0
        self._stderrThread = None
        self._launched = None

    # ------------------------------------------------------------------ process

    def command(self) -> list:
        args = ["--image", self.imagePath, "--parent-pid", os.getpid()]
        for flag, value in self.options:
            if value is not None:
                args += [flag, value]
        return backend.command("session", *args, python=self.python)

    def start(self, timeout: float = START_TIMEOUT_S) -> "FewShotSessionClient":
        """Start the session and wait until it has read the image; raises :class:`SessionError`."""
        self.launch()
        return self.waitReady(timeout)

    def launch(self) -> "FewShotSessionClient":
        """Start the session's process without waiting for it (:meth:`waitReady` waits): the image is read
        and torch imported while the caller goes on."""
        self._launched = time.perf_counter()
        self.process = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=backend.childEnvironment(self.extraEnvironment),
                                        text=True, encoding="utf-8", bufsize=1)
        threading.Thread(target=self._pump, args=(self.process.stdout, self._lines), daemon=True,
                         name="medssl-session-stdout").start()
        self._stderrThread = threading.Thread(target=self._pumpStderr, daemon=True, name="medssl-session-stderr")
        self._stderrThread.start()
        return self

    @property
    def ready(self) -> bool:
        """Whether the session has said it is ready (after :meth:`waitReady`)."""
        return self.shape is not None

    def waitReady(self, timeout: float = START_TIMEOUT_S) -> "FewShotSessionClient":
        """Wait for the launched session's "ready" line (it has read the image); raises :class:`SessionError`."""
        if self.ready:
            return self
        ready = self._answer(None, timeout, expect="ready")
        self.shape = tuple(int(n) for n in ready["shape"])
        self.labels = np.zeros(self.shape, np.uint8)
        self.startSeconds = time.perf_counter() - self._launched
        return self

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.put(line)
        lines.put(None)

    def _pumpStderr(self):
        for line in self.process.stderr:
            self._stderr.append(line.rstrip("\n"))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """End the session (the close command; killed if it does not end within ``timeout`` s)."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"cmd": "close"}) + "\n")
                self.process.stdin.flush()
                self.process.stdin.close()
            self.process.wait(timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            self.process = None

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ commands

    def request(self, command: dict, timeout: float = ANSWER_TIMEOUT_S) -> dict:
        """Send ``command`` (a dict with "cmd") and return its answer; raises :class:`SessionError`."""
        if not self.running:
            raise SessionError(self._endReason("the session is not running"))
        self.waitReady()
        self._nextId += 1
        ident = self._nextId
        try:
            self.process.stdin.write(json.dumps({**command, "id": ident}) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):
            raise SessionError(self._endReason("the session ended")) from None
        return self._answer(ident, timeout)

    def _answer(self, ident, timeout: float, expect: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SessionError(f"no answer from the session within {timeout:g} s") from None
            if line is None:
                if self.process is not None:
                    self.process.wait()
                    self._stderrThread.join(5.0)
                raise SessionError(self._endReason("the session ended"))
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not a protocol line
            kind = event.get("event")
            if kind == "error" and event.get("id") == ident:
                raise SessionError(event.get("message", "error"))
            if (expect and kind == expect) or (ident is not None and event.get("id") == ident):
                return event
            if kind == "closed":
                raise SessionError(f"the session closed ({event.get('reason')})")
            if self.onEvent is not None:
                self.onEvent(event)

    def _endReason(self, default: str) -> str:
        errors = [line for line in self._stderr if line.startswith("medssl: error:")]
        return errors[-1] if errors else default

    def setPlanes(self, axis: int, planes: dict, clear=()) -> None:
        """Paint whole planes along ITK index ``axis`` (0 = i, 1 = j, 2 = k): ``{index: 2D uint8 labels}``
        (the other two axes in i, j, k order; 255 = not annotated); ``clear``: indices to unpaint."""
        entries = [{"index": int(index), "labels": encodeLabels(plane)} for index, plane in planes.items()]
        self.request({"cmd": "planes", "axis": int(axis), "planes": entries, "clear": [int(k) for k in clear]})

    def setPainting(self, painting=None, path=None) -> None:
        """Replace the whole painting: an (ni, nj, nk) uint8 array (255 = not annotated) or a label file."""
        if path is not None:
            self.request({"cmd": "painting", "path": str(path)})
        else:
            self.request({"cmd": "painting", "labels": encodeLabels(painting)})

    def update(self) -> SessionResult:
        """Bring the result up to date; :attr:`labels` is updated with the changed box, which is returned."""
        result = self._result(self._timed({"cmd": "update"}))
        self._paste(result)
        return result

    def result(self) -> SessionResult:
        """The current result's bounding box (resynchronises :attr:`labels`)."""
        result = self._result(self._timed({"cmd": "result"}))
        self.labels[...] = 0
        self._paste(result)
        return result

    def save(self, out) -> None:
        """Write the fitted model as a few-shot bundle folder (``medssl predict`` / ``finetune --init``)."""
        self.request({"cmd": "save", "out": str(out)})

    def _timed(self, command):
        clock = time.perf_counter()
        answer = self.request(command)
        answer["latency"] = time.perf_counter() - clock
        return answer

    @staticmethod
    def _result(answer) -> SessionResult:
        return SessionResult([tuple(b) for b in answer["box"]], decodeLabels(answer["labels"]), answer["mode"],
                             answer.get("seconds", {}), answer["latency"], answer.get("slices", []))

    def _paste(self, result: SessionResult) -> None:
        if result.labels.size:
            self.labels[tuple(slice(a, b) for a, b in result.box)] = result.labels
