"""This node's runtime state files, under ``[state] dir``, all written atomically (``agent.statefile``).

- ``session``: the id of our session, for the next agent process to adopt;
- ``lease.json``: ``{"boot_id", "serve_until"}``: until when (``CLOCK_BOOTTIME``) what this process exports
  may be served without a new confirmation; the next process keeps inherited exports no longer than that;
- ``node``: our node name (for tools that run before Consul answers);
- ``status.json``: the last cycle's report, read by ``pathagent status`` even when Consul is down;
- ``errors.json``: ``{"pid", "started", "errors": [{"time", "first", "count", "level", "logger",
  "message"}]}``: the last warnings and errors of the agent process holding the lock (``ErrorLog``), oldest
  first, so that ``pathagent status`` shows them also when no cycle ran (Consul down since the start);
- ``lock``: an ``flock`` held while an agent runs, so that a second ``pathagent run`` on the same state
  directory refuses to start instead of driving the same session and target daemon (``lock_holder`` tells
  the CLI which process holds it, without touching the lock).

A write that fails (disk full, read-only) is logged once and never stops the loop: none of these files is
needed for safety (the fencing deadline lives in memory and in the watchdog).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any, ClassVar

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
        ErrorLog.holding(self.path, True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            ErrorLog.holding(self.path, False)
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

    def lease(self) -> tuple[str, float] | None:
        """``(boot_id, serve_until)`` as last recorded (``CLOCK_BOOTTIME`` of that boot), or ``None``."""
        v = self._read("lease.json")
        if not isinstance(v, dict) or not isinstance(v.get("boot_id"), str):
            return None
        until = v.get("serve_until")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not math.isfinite(until):
            return None
        return v["boot_id"], float(until)

    def errors(self) -> dict[str, Any]:
        """``errors.json`` (see the module docstring); ``{}`` when missing or unreadable. Entries that are
        not as ``ErrorLog`` writes them are dropped."""
        v = self._read("errors.json")
        if not isinstance(v, dict):
            return {}
        entries = v.get("errors")
        good = [e for e in entries if isinstance(e, dict) and isinstance(e.get("message"), str)
                and isinstance(e.get("time"), (int, float))] if isinstance(entries, list) else []
        return {**v, "errors": good}


def lock_holder(path: str) -> int | None:
    """The pid of the process holding the ``flock`` of state directory ``path`` (a running agent), read
    from ``/proc/locks``; ``None`` when nobody holds it or it cannot be told (no lock file, ``/proc/locks``
    unreadable). Passive: the lock is never taken, so asking can never make a starting agent refuse."""
    try:
        st = os.stat(os.path.join(path, "lock"))
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    by_inode = None
    for line in lines:
        f_ = line.split()
        if len(f_) < 6 or f_[1] != "FLOCK" or not f_[4].isdigit():   # ("->" lines are waiters)
            continue
        if f_[5] == dev:
            return int(f_[4])
        if f_[5].rsplit(":", 1)[-1] == str(st.st_ino):
            by_inode = int(f_[4])        # stacked filesystems may report another device number
    return by_inode


_DURATION = re.compile(r"\b\d+(\.\d+)?m?s\b")


class ErrorLog(logging.Handler):
    """The last ``limit`` warnings and errors this process logged, for ``pathagent status``.

    ``emit`` only appends to memory (no I/O: the fencer thread logs too and must never wait on a disk); a
    thread of its own writes ``errors.json`` atomically, at most every ``every`` seconds, and only while this
    process holds the state directory's lock (``StateDir.lock`` starts it, ``StateDir.unlock`` writes the
    last state and stops it): a second ``pathagent run`` that is refused never overwrites the running
    agent's record. What was logged before the lock was taken is written then. A repeat of the last
    message counts (``count``, ``time`` of the last one, ``first``, the newest text) instead of pushing the
    others out; messages that differ only in durations ("retrying in 0.5s", "... in 1.0s") are repeats.
    ``install`` puts one on the root logger (``pathagent run`` does); ``close`` takes it off again."""

    _live: ClassVar[list["ErrorLog"]] = []
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str, limit: int = 10, every: float = 0.5) -> None:
        super().__init__(logging.WARNING)
        self.path = os.path.abspath(path)
        self.limit = limit
        self.every = every
        self._entries: list[dict[str, Any]] = []
        self._mem = threading.Lock()
        self._dirty = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    @classmethod
    def install(cls, path: str, limit: int = 10) -> "ErrorLog":
        h = cls(path, limit)
        logging.getLogger().addHandler(h)
        with cls._live_lock:
            cls._live.append(h)
        return h

    @classmethod
    def holding(cls, path: str, held: bool) -> None:
        """``StateDir`` took (``held``) or is about to release the lock of ``path``."""
        with cls._live_lock:
            mine = [h for h in cls._live if h.path == os.path.abspath(path)]
        for h in mine:
            if held:
                h._start()
            else:
                h._stop()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                msg += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            msg = " ".join(msg.split())[:500]
            with self._mem:
                last = self._entries[-1] if self._entries else None
                if last is not None and (_DURATION.sub("#", last["message"]), last["level"], last["logger"]) == \
                        (_DURATION.sub("#", msg), record.levelname, record.name):
                    last["count"] += 1
                    last["time"] = round(record.created, 3)
                    last["message"] = msg
                else:
                    self._entries.append({"time": round(record.created, 3), "first": round(record.created, 3),
                                          "count": 1, "level": record.levelname, "logger": record.name,
                                          "message": msg})
                    del self._entries[:-self.limit]
            self._dirty.set()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def snapshot(self) -> dict[str, Any]:
        with self._mem:
            entries = [dict(e) for e in self._entries]
        return {"pid": os.getpid(), "started": self._started, "errors": entries}

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._started = round(time.time(), 3)
        self._halt.clear()
        self._dirty.set()
        self._thread = threading.Thread(target=self._run, name="errorlog", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        t, self._thread = self._thread, None
        if t is None:
            return
        self._halt.set()
        self._dirty.set()
        t.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            last = self._halt.is_set()      # read before the snapshot: a stop during the write needs one more
            self._write()
            if last:
                return
            self._halt.wait(self.every)

    def _write(self) -> None:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            statefile.write(os.path.join(self.path, "errors.json"), self.snapshot())
        except OSError:
            pass        # not logged (that would come back here); StateDir reports the state dir's own failures

    def close(self) -> None:
        self._stop()
        logging.getLogger().removeHandler(self)
        with self._live_lock:
            if self in self._live:
                self._live.remove(self)
        super().close()


def read_status(path: str) -> dict[str, Any]:
    """``status.json`` of the agent using state directory ``path`` (for the CLI)."""
    try:
        with open(os.path.join(path, "status.json"), encoding="utf-8") as f:
            v = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}
