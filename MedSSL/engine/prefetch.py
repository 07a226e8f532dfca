"""Background loader workers: batches are prepared while the previous step trains.

Threads, not processes: reading cubes from the memory-mapped cache and moving them to the device
release the GIL, and threads share the method's state (pseudo-labels, caches) without pickling.
With ``workers=1`` the batches come in the same order as without prefetching, so runs stay
reproducible.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable


class Prefetcher:
    """Calls ``next_batch`` in ``workers`` threads, keeping up to ``depth`` batches ready.

    ``prefetcher()`` returns the next batch; an exception raised by ``next_batch`` is raised there.
    ``close()`` stops the threads and waits for them: a worker still inside ``next_batch`` (torch ops and
    image reads run in C++ without the GIL) when the interpreter exits is destroyed under the C++ runtime's
    feet, which aborts the process ("terminate called without an active exception", exit status 134) after
    the bundle was written. The threads are daemons only so that an abandoned prefetcher cannot hang exit.
    """

    JOIN_TIMEOUT_S = 120.0
    """Longest wait in ``close()`` for a worker to finish the batch it is drawing."""

    def __init__(self, next_batch: Callable[[], Any], workers: int = 1, depth: int = 2):
        self._next = next_batch
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"medssl-loader-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:  # one draw at a time: the method's random generator is not thread-safe
                    batch = self._next()
                item = (True, batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                item = (False, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def __call__(self) -> Any:
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the workers and join them (each finishes the batch it is drawing, then exits)."""
        self._stop.set()
        deadline = time.monotonic() + self.JOIN_TIMEOUT_S
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                self._drain()  # a worker waiting to put its batch also sees the stop flag within 0.1 s
                thread.join(timeout=0.1)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
