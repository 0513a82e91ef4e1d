"""What the guard client and the guard process share: file names, the config hash, the wire format.

Files, all in the node's state directory (``H`` = the first 12 hex digits of the SHA-256 of the config
file's bytes, so a changed config gets a new guard beside the old one):

- ``guard-H.sock``: the guard's unix stream socket (mode 0600; only root or the guard's own uid may talk);
- ``guard-H.lock``: ``flock``-ed by the guard for its whole life (liveness that a zombie cannot fake: a
  dead process holds no lock) and holding its pid as text; never removed (removing a lock file races with
  a process about to lock it);
- ``guard.log``: the guard's stdout and stderr;
- ``guard-events.json``: ``{"count": n, "last": {...}}``: how many times a guard fenced this node, and
  the last time (when, how late, how long, why, what failed), for ``status`` and metrics; see
  ``read_events``.

And one outside it, in memory: ``/dev/shm/pathagent-guard-S-H``, the deadline the guard proved by itself
for the agent's session, which the agent's fencer reads (``plugins.guard.shared``).

Wire format: one request per connection, one JSON object on one line each way::

    -> {"op": "pet", "deadline": 12345.678, "session": "<id>"}   CLOCK_BOOTTIME seconds; the session whose
                                                     confirmation proved it (optional: an older agent's pet
                                                     has none, and the guard then never confirms by itself)
    <- {"ok": true, "pid": 4242, "config": "0123456789ab", "state": "armed", "deadline": 12345.678,
        "session": "<first 8>", "confirmed": ..., "confirm_sent": ..., "confirmations": n, ...}
    -> {"op": "disarm"}                              nothing is served: exit without fencing
    -> {"op": "retire", "by": "ba9876543210"}       a guard of a newer config took over: exit, no fence
    -> {"op": "status"}
    <- {"ok": false, "error": "..."}                 a request the guard refuses
    <- {"ok": false, "retry": true, "error": "..."}  not now (it is exiting): try again
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from typing import Any, Iterator

from agent import statefile

LOG = "guard.log"
EVENTS = "guard-events.json"
SOCK_RE = re.compile(r"^guard-([0-9a-f]{12})\.sock$")
MAX_MESSAGE = 4096
#: a deadline further ahead than this is refused (the agent's are ``fence_after`` <= 60 s ahead)
MAX_AHEAD = 3600.0
#: longest path ``bind``/``connect`` take (sun_path is 108 bytes with its terminating NUL)
MAX_SUN_PATH = 107


def config_hash(data: bytes) -> str:
    """The short hash naming the guard of a config file with content ``data``."""
    return hashlib.sha256(data).hexdigest()[:12]


def read_config_bytes(path: str) -> bytes:
    """The config file's bytes; a missing file reads as empty (the agent then runs on defaults)."""
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def sock_name(h: str) -> str:
    return f"guard-{h}.sock"


def lock_name(h: str) -> str:
    return f"guard-{h}.lock"


def other_guards(state_dir: str, own: str) -> list[str]:
    """Hashes of the guard sockets in ``state_dir`` other than ``own`` (guards of an earlier config)."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        m = SOCK_RE.match(n)
        if m and m.group(1) != own:
            out.append(m.group(1))
    return out


@contextlib.contextmanager
def sun_path(state_dir: str, name: str) -> Iterator[str]:
    """An address for ``state_dir/name`` that fits in ``sun_path``: the path itself when short enough,
    else the same file reached through ``/proc/self/fd/N`` of the directory (thread-safe, unlike chdir)."""
    full = os.path.join(state_dir, name)
    if len(full.encode()) <= MAX_SUN_PATH:
        yield full
        return
    fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def lock_holder(state_dir: str, h: str) -> int | None:
    """The pid in ``guard-h.lock`` when a process holds that lock (a guard runs or is starting), else
    ``None`` (no guard: a dead one released it, even while still a zombie). 0 when held but unreadable."""
    path = os.path.join(state_dir, lock_name(h))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(raw) if raw.isdigit() else 0
        return None
    finally:
        os.close(fd)


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; ``ValueError`` when it is not one JSON object."""
    v = json.loads(line.decode("utf-8"))
    if not isinstance(v, dict):
        raise ValueError("not a JSON object")
    return v


def request(state_dir: str, h: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``msg`` to the guard of hash ``h`` and return its answer, all within about ``timeout``.

    Raises ``FileNotFoundError``/``ConnectionRefusedError`` when no guard listens there, ``TimeoutError``
    when one is there but does not answer in time (frozen, or busy fencing), ``OSError``/``ValueError``
    for anything else."""
    until = time.monotonic() + timeout

    def left() -> float:
        t = until - time.monotonic()
        if t <= 0:
            raise socket.timeout()
        return t
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(left())             # one budget for the whole exchange, not one per call
        with sun_path(state_dir, sock_name(h)) as addr:
            s.connect(addr)
        s.settimeout(left())
        s.sendall(encode(msg))
        buf = b""
        while not buf.endswith(b"\n"):
            s.settimeout(left())
            chunk = s.recv(MAX_MESSAGE)
            if not chunk:
                raise ConnectionResetError("the guard closed the connection without answering")
            buf += chunk
            if len(buf) > MAX_MESSAGE:
                raise ValueError("answer too long")
        return decode(buf)
    except socket.timeout:
        raise TimeoutError(f"no answer within {timeout:g}s") from None
    finally:
        s.close()


def read_events(state_dir: str) -> dict[str, Any]:
    """``guard-events.json``: ``{"count": fences so far, "last": {...}}`` (empty counts when none)."""
    try:
        v = statefile.read(os.path.join(state_dir, EVENTS), {})
    except (OSError, ValueError, RecursionError):
        v = {}
    if not isinstance(v, dict):
        v = {}
    count = v.get("count", 0)
    return {"count": count if isinstance(count, int) and not isinstance(count, bool) else 0,
            "last": v.get("last") if isinstance(v.get("last"), dict) else None}
