"""Waking the main loop from other threads and from signal handlers.

``threading.Event.set()`` takes a lock: a signal handler that calls it while the main thread is inside
``set``/``wait``/``clear`` of the same event deadlocks the process (the handler runs on the main thread).
So the loop sleeps in ``select`` on a pipe, and ``wake()`` only writes one byte to it (non-blocking; a
full pipe already means "wake up"), which is safe from any thread and from a signal handler.
"""
from __future__ import annotations

import os
import select


class Wakeup:
    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def wake(self) -> None:
        try:
            os.write(self._w, b"!")
        except (BlockingIOError, OSError):
            pass  # full (a wake-up is pending anyway) or closed (shutting down)

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or ``timeout`` seconds passed; returns whether it was woken. Drains the pipe."""
        try:
            ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        except InterruptedError:
            ready = [self._r]
        woken = bool(ready)
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        return woken

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
