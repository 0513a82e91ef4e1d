"""systemd's notification protocol (``sd_notify``), without libsystemd: datagrams on ``$NOTIFY_SOCKET``.

The unit is ``Type=notify`` with ``WatchdogSec=``: the agent sends ``READY=1`` once it holds its session
and has planned once, and ``WATCHDOG=1`` from the main loop only, after a cycle, at least every half
watchdog interval (``$WATCHDOG_USEC``); a loop that stalls (a backend call that never returns, a deadlock)
stops the pings and systemd restarts the agent. The data path is outside the agent's kill scope
(``KillMode=process``), so that restart does not interrupt service. The variables are read once and
removed from this process's environment, so no child (tgtd, arping) can notify on our behalf.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        src = os.environ if env is None else env
        self.address = src.get("NOTIFY_SOCKET", "")
        usec = src.get("WATCHDOG_USEC", "")
        pid = src.get("WATCHDOG_PID", "")
        self.interval = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0
        if env is None:
            for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(k, None)
        self._sock: socket.socket | None = None
        self._failed = False
        self.sent: list[str] = []     # for tests and status (the last few messages)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, message: str) -> None:
        if not self.address:
            return
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]      # abstract namespace
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), addr)
            self._failed = False
            self.sent = (self.sent + [message])[-20:]
        except OSError as e:
            if not self._failed:
                log.warning("systemd notification %r not sent to %s: %s", message.split("\n")[0],
                            self.address, e.strerror)
            self._failed = True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        if self.interval > 0:
            self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
