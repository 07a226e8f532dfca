"""Run backend commands in child processes without blocking, read their JSON-lines progress, cancel them.

Pure Python (no ``slicer``, no Qt, no torch): the GUI polls :meth:`Job.poll` from a ``qt.QTimer`` on the main
thread; scripts and tests call :meth:`Job.wait`. A job is a folder plus a list of commands run one after the
other (for example ``finetune`` then ``predict``); each command is a child process started in its own
process group (POSIX: new session; Windows: new process group), so :meth:`Job.cancel` can end the whole
tree (data-loader workers included) within a few seconds.

Protocol of a command (the ``MedSSL`` CLI with ``--progress json``): one JSON object per stdout line,
``{"event": "progress" | "stage" | "log" | "done", ...}``; other stdout lines are kept as log text (a
JSON line without "event", such as ``methods --json`` output, is kept in :attr:`Job.outputs`). On bad
input the command exits with status 2 and prints ``medssl: error: <reason>`` on stderr.

Everything the children print goes to ``<job folder>/log.txt``. Input copies (``cleanupPaths``) are deleted
when the job ends, whatever the outcome; with ``keepFiles`` False the job folder is deleted once the job is
done or cancelled, and only ``log.txt`` stays after a failure.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable

ERROR_PREFIX = "medssl: error:"
CANCEL_GRACE_S = 2.0
"""Seconds between SIGTERM and SIGKILL when cancelling (well under the 5 s promised to users)."""

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


class JobError(RuntimeError):
    """A job that failed or was cancelled; ``str()`` is the one-line reason, ``job`` the failed job."""

    def __init__(self, message: str, job: "Job | None" = None):
        super().__init__(message)
        self.job = job


class Job:
    """Commands run in sequence in child processes, with their events and log.

    commands: list of argv lists (``[python, "-m", "MedSSL", "finetune", ...]``).
    jobDir: folder for ``log.txt`` (created). env: the children's environment (default: this process's).
    onFinished: called as ``onFinished(job)`` in the polling thread once every command succeeded; its
        return value becomes :attr:`result` (the GUI imports results into the scene here, on the main
        thread). If it raises, the job fails with that message.
    onEvent: called as ``onEvent(event_dict)`` in the polling thread for each JSON event, in order.
    """

    def __init__(self, commands, jobDir, env=None, onFinished: Callable | None = None,
                 onEvent: Callable | None = None, cwd=None):
        self.commands = [list(map(str, command)) for command in commands]
        self.jobDir = str(jobDir)
        self.env = env
        self.cwd = cwd or self.jobDir
        self.onFinished = onFinished
        self.onEvent = onEvent
        self.status = None  # None until start(), then RUNNING, DONE, FAILED or CANCELLED
        self.error = ""  # one-line reason when FAILED
        self.events: list[dict] = []  # every JSON event received, in order
        self.outputs: list[dict] = []  # JSON lines without "event"
        self.lastProgress: dict | None = None
        self.result = None  # onFinished's return value, else the last "done" event
        self.returnCode = None
        self.exception: Exception | None = None  # what onFinished raised, if it did
        self.commandIndex = -1
        self.logPath = os.path.join(self.jobDir, "log.txt")
        self._process = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stderrTail: list[str] = []
        self._logLock = threading.Lock()
        self._startTime = None
        self.cleanupPaths: list[str] = []  # input copies (patient data): removed when the job ends, whatever the outcome
        self.keepFiles = True  # False: the job folder goes when the job is done or cancelled, and only
        #                        log.txt stays after a failure (see BackendRunner.keepJobFiles)

    # ------------------------------------------------------------------ public API

    def start(self) -> "Job":
        """Start the first command; returns self. Raises :class:`JobError` if it cannot be started."""
        os.makedirs(self.jobDir, exist_ok=True)
        self._startTime = time.monotonic()
        self.status = RUNNING
        self._startNext()
        return self

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return 0.0 if self._startTime is None else time.monotonic() - self._startTime

    def poll(self) -> list[dict]:
        """Deliver queued events (calling ``onEvent``), advance to the next command when one ends, and
        finish the job when all are done. Non-blocking; returns the events delivered by this call."""
        delivered = self._drain()
        if self.status != RUNNING or self._process is None or self._process.poll() is None:
            return delivered
        self._joinReaders()
        delivered += self._drain()
        self.returnCode = self._process.returncode
        if self.returnCode != 0:
            self._fail(self._reason())
        elif self.commandIndex + 1 < len(self.commands):
            self._startNext()
        else:
            self._finish()
        return delivered

    def wait(self, timeout: float | None = None, interval: float = 0.05):
        """Block until the job ends (polling every ``interval`` s). Returns :attr:`result`; raises
        :class:`JobError` with the reason if it failed or was cancelled, ``TimeoutError`` (after cancelling
        the job) when ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status == RUNNING:
            self.poll()
            if self.status != RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"job in {self.jobDir} did not finish within {timeout} s (cancelled)")
            time.sleep(interval)
        if self.status != DONE:
            raise JobError(self.error or self.status or "job was not started", self) from self.exception
        return self.result

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """End the running command's whole process tree (SIGTERM, then SIGKILL after ``grace`` s; Windows:
        ``taskkill /T /F``) and mark the job cancelled. No further command runs and ``onFinished`` is not
        called, so nothing is imported."""
        if self.status != RUNNING:
            return
        self.status = CANCELLED
        self.error = "cancelled"
        if self._process is not None:
            killProcessTree(self._process, grace)
            self._joinReaders()
            self.returnCode = self._process.returncode
        self._drain()
        self._log(f"[{time.strftime('%H:%M:%S')}] medssl-slicer: job cancelled\n")
        self._removeCleanupPaths()
        self._removeFolderUnlessKept()

    def readLog(self, maxChars: int = 1_000_000) -> str:
        """The end of the job's log (at most ``maxChars`` characters)."""
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - maxChars))
                return handle.read()
        except OSError:
            return ""

    # ------------------------------------------------------------------ internals

    def _startNext(self) -> None:
        self.commandIndex += 1
        command = self.commands[self.commandIndex]
        self._stderrTail = []
        self._log(f"[{time.strftime('%H:%M:%S')}] $ {subprocess.list2cmdline(command)}\n")
        try:
            self._process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.env, **processGroupOptions())
        except OSError as exc:
            self._fail(f"cannot start {command[0]}: {exc.strerror or exc}")
            raise JobError(self.error, self) from None
        self._readers = [
            threading.Thread(target=self._readStdout, args=(self._process.stdout,), daemon=True),
            threading.Thread(target=self._readStderr, args=(self._process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _joinReaders(self) -> None:
        """Wait for the reader threads once the child has exited; if a stray grandchild still holds the
        pipes open, end what is left of the process group so that the readers can finish."""
        for attempt in range(2):
            for reader in self._readers:
                reader.join(timeout=1.0)
            if not any(reader.is_alive() for reader in self._readers) or sys.platform == "win32":
                return
            if attempt == 0:
                _signalGroup(self._process.pid, signal.SIGKILL)

    def _readStdout(self, stream) -> None:
        """Reader thread: stdout lines -> log file and queue (parsed JSON when possible)."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._log(line)
            text = line.strip()
            if text.startswith("{"):
                try:
                    self._queue.put(json.loads(text))
                    continue
                except ValueError:
                    pass
        stream.close()

    def _readStderr(self, stream) -> None:
        """Reader thread: stderr lines -> log file; the last lines are kept for the failure reason."""
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._log(line)
            self._stderrTail = (self._stderrTail + [line.rstrip()])[-50:]
        stream.close()

    def _drain(self) -> list[dict]:
        delivered = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return delivered
            if not isinstance(item, dict) or "event" not in item:
                self.outputs.append(item)
                continue
            self.events.append(item)
            if item.get("event") == "progress":
                self.lastProgress = item
            delivered.append(item)
            if self.onEvent is not None:
                self.onEvent(item)

    def _reason(self) -> str:
        """The backend's one-line reason, else the last stderr line, else the exit status."""
        for line in reversed(self._stderrTail):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX):].strip()
        tail = [line for line in self._stderrTail if line.strip()]
        command = self.commands[self.commandIndex]
        name = command[3] if command[1:3] == ["-m", "MedSSL"] and len(command) > 3 else os.path.basename(command[0])
        detail = f": {tail[-1].strip()}" if tail else ""
        return f"{name} exited with status {self.returnCode}{detail} (see {self.logPath})"

    def _fail(self, reason: str) -> None:
        self.status = FAILED
        self.error = reason
        self._log(f"[{time.strftime('%H:%M:%S')}] medssl-slicer: job failed: {reason}\n")
        self._removeCleanupPaths()
        if not self.keepFiles:  # only the log stays, for the error message
            for name in os.listdir(self.jobDir):
                path = os.path.join(self.jobDir, name)
                if os.path.abspath(path) != os.path.abspath(self.logPath):
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _removeFile(path)

    def _finish(self) -> None:
        done = [event for event in self.events if event.get("event") == "done"]
        self.result = done[-1] if done else None
        if self.onFinished is not None:
            try:
                self.result = self.onFinished(self)
            except Exception as exc:  # importing the results failed: report it like a backend failure
                self.exception = exc
                self._log(traceback.format_exc())
                self._fail(f"importing the results failed: {exc}")
                return
        self.status = DONE
        self._log(f"[{time.strftime('%H:%M:%S')}] medssl-slicer: job done in {self.elapsed:.1f} s\n")
        self._removeCleanupPaths()
        self._removeFolderUnlessKept()

    def _removeCleanupPaths(self) -> None:
        """Delete the job's input copies (patient data) once they are no longer needed."""
        for path in self.cleanupPaths:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                _removeFile(path)

    def _removeFolderUnlessKept(self) -> None:
        """With ``keepFiles`` False, the whole job folder (outputs were imported into the scene)."""
        if not self.keepFiles:
            shutil.rmtree(self.jobDir, ignore_errors=True)

    def _log(self, text: str) -> None:
        with self._logLock:
            if not os.path.isdir(self.jobDir):
                return  # the folder was removed when the job ended
            with open(self.logPath, "a", encoding="utf-8") as handle:
                handle.write(text)


def _removeFile(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
"""Windows process creation flag: the child gets no console window."""


def processGroupOptions() -> dict:
    """Popen keyword arguments that put the child in its own process group (and hide its console on
    Windows), so that the whole tree can be ended at once."""
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
        return {"creationflags": flags}
    return {"start_new_session": True}


def killProcessTree(process: subprocess.Popen, grace: float = CANCEL_GRACE_S) -> None:
    """End ``process`` and every process in its group: SIGTERM, wait up to ``grace`` s, then SIGKILL
    (POSIX); ``taskkill /T /F`` (Windows). Returns once the child itself has exited."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False,
                       creationflags=CREATE_NO_WINDOW)  # no console window flashes up on Cancel
        process.wait(timeout=10)
        return
    _signalGroup(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _groupAlive(process):
        time.sleep(0.05)
    _signalGroup(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _signalGroup(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _groupAlive(process: subprocess.Popen) -> bool:
    """True while the child or any other member of its process group still exists."""
    process.poll()
    try:
        os.killpg(process.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def runQuick(command, env=None, timeout: float = 120.0, cwd=None) -> tuple[int, str, str]:
    """Run a short command to completion (blocking; for probes such as ``methods --json``).
    Returns (exit status, stdout, stderr); a timeout kills the process tree and raises ``TimeoutError``.
    The default working folder is the temporary folder, so that ``python -m`` never picks up a package
    from wherever the caller happens to be."""
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env, cwd=cwd or tempfile.gettempdir(),
                               **processGroupOptions())
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killProcessTree(process)
        process.communicate()
        raise TimeoutError(f"{subprocess.list2cmdline(command)} took more than {timeout} s") from None
    return process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def errorReason(stderr: str) -> str | None:
    """The ``medssl: error:`` reason in a command's stderr text, if any."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):].strip()
    return None
