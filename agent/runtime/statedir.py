"""This node's runtime state files, under ``[state] dir``, all written atomically (``agent.statefile``).

- ``session``: the id of our session, for the next agent process to adopt;
- ``lease.json``: ``{"boot_id", "serve_until"}``: until when (``CLOCK_BOOTTIME``) what this process exports
  may be served without a new confirmation; the next process keeps inherited exports no longer than that;
- ``node``: our node name (for tools that run before Consul answers);
- ``status.json``: the last cycle's report, read by ``pathagent status`` even when Consul is down;
- ``lock``: an ``flock`` held while an agent runs, so that a second ``pathagent run`` on the same state
  directory refuses to start instead of driving the same session and target daemon.

A write that fails (disk full, read-only) is logged once and never stops the loop: none of these files is
needed for safety (the fencing deadline lives in memory and in the watchdog).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from typing import Any

from agent import statefile
from agent.errors import ConfigError

log = logging.getLogger(__name__)


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._failed: set[str] = set()

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _write(self, name: str, data: Any) -> None:
        try:
            statefile.write(self._file(name), data)
            self._failed.discard(name)
        except OSError as e:
            if name not in self._failed:
                log.warning("cannot write %s: %s (carrying on without it)", self._file(name), e.strerror)
                self._failed.add(name)

    def _read(self, name: str) -> Any:
        try:
            return statefile.read(self._file(name), None)
        except (OSError, ValueError, RecursionError):
            return None

    def lock(self) -> None:
        """Take the single-instance lock; ``ConfigError`` when another agent holds it."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            fd = os.open(self._file("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError([("state.dir", f"{self.path}: {e.strerror}")]) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError([("state.dir", f"another pathagent runs with {self.path} (it holds "
                                             f"{self._file('lock')})")]) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def session(self) -> str | None:
        v = self._read("session.json")
        return v.get("id") if isinstance(v, dict) and isinstance(v.get("id"), str) and v["id"] else None

    def record_session(self, sid: str | None) -> None:
        self._write("session.json", {"id": sid})

    def serve_until(self, now: float, boot: str, cap: float) -> float:
        """The recorded deadline of the previous process, clamped to ``[now, now + cap]`` (a record from
        another boot, from the future, or unreadable gives ``now``: keep nothing)."""
        v = self._read("lease.json")
        if not isinstance(v, dict) or v.get("boot_id") != boot:
            return now
        until = v.get("serve_until")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not math.isfinite(until):
            return now
        return min(max(float(until), now), now + cap)

    def record_serve_until(self, until: float, boot: str) -> None:
        self._write("lease.json", {"boot_id": boot, "serve_until": round(until, 3)})

    def node(self) -> str:
        v = self._read("node.json")
        return v.get("node", "") if isinstance(v, dict) and isinstance(v.get("node"), str) else ""

    def record_node(self, node: str) -> None:
        self._write("node.json", {"node": node})

    def status(self) -> dict[str, Any]:
        v = self._read("status.json")
        return v if isinstance(v, dict) else {}

    def record_status(self, data: dict[str, Any]) -> None:
        self._write("status.json", data)


def read_status(path: str) -> dict[str, Any]:
    """``status.json`` of the agent using state directory ``path`` (for the CLI)."""
    try:
        with open(os.path.join(path, "status.json"), encoding="utf-8") as f:
            v = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}
