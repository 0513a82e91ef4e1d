"""The clocks of the runtime, injected so that tests run the loop on a fake one.

``Clock.now()`` is ``CLOCK_BOOTTIME``: the same in every process of the host (so the watchdog guard and a
later agent process understand a deadline this process set) and, unlike ``CLOCK_MONOTONIC``, it keeps
counting while the host is suspended, so a lease cannot look valid after a resume. ``wall()`` is the
calendar time, only ever written for people (``since`` fields), never compared across hosts.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()


def boot_id() -> str:
    """This boot's id (a ``CLOCK_BOOTTIME`` value recorded before a reboot means nothing after it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""
