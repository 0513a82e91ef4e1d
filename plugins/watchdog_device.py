"""``device`` watchdog: the Linux watchdog device API (``/dev/watchdog``: softdog or a hardware timer).

Patroni's approach: the kernel (or the board) resets the whole node when the device is not written to
within its timeout T, which covers even a node whose userspace no longer runs (a wedged kernel thread
excepted, for softdog). Options (``[watchdog.device]``):

- ``path`` (default ``/dev/watchdog``);
- ``timeout`` T, whole seconds (default 2), set with ``WDIOC_SETTIMEOUT`` when the device is opened;
- ``set_timeout`` (default true): false leaves the device's own timeout alone (a device without the
  ioctl; T must then be the timeout it really has).

The first ``pet`` opens the device (``O_WRONLY``: the timer starts), sets the timeout, and reads back the
value the driver really set (a driver may round; a longer one than asked is refused, since the agent
could then not pet it in time; a failure after the open stops the device again with the magic character,
so a failed start never leaves a timer running). Each ``pet(deadline)`` then writes one byte *only when
now + T <= deadline*: a write restarts the timer, so the reset comes at now + T at the latest, never after
the deadline. When the deadline is nearer than T the device is left to run out, and the node is reset at
the last good write + T, which is before that deadline too. (The first pet opens the device even when the
deadline is nearer than T, with a warning: a reset up to T late beats none.) ``disarm`` writes the magic
character ``V`` and closes (the driver stops the timer; a driver built with ``nowayout`` keeps it running
regardless); ``close`` closes without it, so the device stays armed and resets the node unless the next
agent process opens it and pets it in time (a watchdog device admits one open at a time, so the next
process can open it only after this one closed it). The timeout has to fit the agent's cadence
(``check-config`` enforces T < fence_after - confirm_interval - timeout): every confirmation must leave
room for a write.

Errors raise ``PermanentBackendError`` naming the path: no such device, not allowed, the ioctl is not
supported (``ENOTTY``: not a watchdog device; use ``set_timeout = false`` only for a device that really
lacks it), a write that fails.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
from typing import Mapping

from agent.backend import PluginContext, Watchdog
from agent.errors import PermanentBackendError
from plugins.options import Options

log = logging.getLogger(__name__)

# linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 7, int)
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
MAGIC_CLOSE = b"V"
KEEPALIVE = b"1"


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class DeviceWatchdog(Watchdog):
    config_keys: Mapping[str, str] = {
        "path": "the watchdog device (default /dev/watchdog)",
        "timeout": "seconds (integer) without a write after which the device resets the node (default 2)",
        "set_timeout": "set the timeout with WDIOC_SETTIMEOUT when opening (default true)",
    }

    def __init__(self, context: PluginContext) -> None:
        o = Options("watchdog.device", context.options)
        self.path = o.text("path", "/dev/watchdog")
        self.timeout = o.integer("timeout", 2, 1, 3600)
        self.set_timeout = o.flag("set_timeout", True)
        o.done()
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._skipped = False
        self.writes = 0          # keepalive writes so far (for tests and status)

    def _error(self, what: str, e: OSError) -> PermanentBackendError:
        why = e.strerror or str(e)
        if e.errno == errno.ENOTTY:
            why = "the device does not support WDIOC_SETTIMEOUT (not a watchdog device?); set " \
                  "[watchdog.device] set_timeout = false only for a watchdog without that ioctl"
        return PermanentBackendError(f"watchdog {self.path}: {what}: {why}")

    def _open(self) -> int:
        """Open the device (this arms it) and set its timeout. On any failure after the open, the device
        is stopped again with the magic character before it is closed (a watchdog armed by a failed open
        and then forgotten would reset a healthy node)."""
        try:
            # O_NONBLOCK: a path that is a FIFO (a test double) must not block the agent in open()
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise self._error("cannot open", e) from None
        try:
            if self.set_timeout:
                try:
                    buf = fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", self.timeout))
                except OSError as e:
                    raise self._error("cannot set the timeout", e) from None
                actual = struct.unpack("i", buf)[0]
                if actual > self.timeout:
                    raise PermanentBackendError(f"watchdog {self.path}: asked for a {self.timeout}s timeout, the "
                                                f"driver set {actual}s (it could reset the node after the "
                                                "deadline, or the agent could not pet it in time); choose a "
                                                "timeout the device supports")
                if actual != self.timeout:
                    log.warning("watchdog %s: timeout %ds instead of %ds", self.path, actual, self.timeout)
                    self.timeout = max(1, actual)
            try:
                os.write(fd, KEEPALIVE)
            except OSError as e:
                raise self._error("cannot write", e) from None
        except PermanentBackendError:
            try:
                os.write(fd, MAGIC_CLOSE)
            except OSError:
                pass
            os.close(fd)
            raise
        log.info("watchdog %s armed: the node is reset %ds after the last pet", self.path, self.timeout)
        return fd

    def pet(self, deadline: float, session: str = "") -> None:
        with self._lock:
            if self._fd is None:
                # armed even when the deadline is nearer than T: a reset up to T late beats none at all
                # (check-config keeps T below what every confirmation leaves)
                if _now() + self.timeout > deadline:
                    log.warning("watchdog %s: deadline in less than its %ds timeout at the first pet",
                                self.path, self.timeout)
                self._fd = self._open()
                self.writes += 1
                return
            if _now() + self.timeout > deadline:
                if not self._skipped:
                    log.warning("watchdog %s not pet: deadline in less than its %ds timeout; it runs out",
                                self.path, self.timeout)
                self._skipped = True
                return
            try:
                os.write(self._fd, KEEPALIVE)
            except OSError as e:
                raise self._error("cannot write", e) from None
            self.writes += 1
            if self._skipped:
                log.info("watchdog %s pet again", self.path)
            self._skipped = False

    def disarm(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                os.write(fd, MAGIC_CLOSE)
            except OSError as e:
                raise self._error("cannot write the magic close character (the device stays armed)", e) from None
            finally:
                os.close(fd)
            log.info("watchdog %s disarmed", self.path)

    def close(self) -> None:
        """Close without the magic character: the device stays armed (the next process must pet it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
