"""A short-lived Consul session for one CLI command: what ``path move``, ``disk stop`` and ``disk create``
lock keys with.

A TTL and no health checks: while the command runs, a thread renews it; if the command dies, Consul
invalidates the session after at most twice the TTL. With ``Behavior=delete`` (the default) every key it
holds is then deleted (a move request, the path keys of a disk being stopped), so nothing the command left
behind outlives it and no agent has to compare clocks to tell a live request from a stale one. With
``release`` (a disk's name claim while it is being created) the key stays, unlocked: the mark of an
interrupted command that the next run finishes. Lock-delay 0: the keys are not handed on to anyone.

The session's name says which process holds it (``[pid P start S host H]``), so a command run again on the
same host after the first was killed can tell at once that the holder is dead (``holder_is_gone``) and end
its session instead of waiting up to twice the TTL.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from typing import Iterator

from agent.adapters.consul_store import ConsulStore
from agent.core.store import SessionInfo
from agent.errors import CoordinationError

TTL = 10.0
_HOLDER_RE = re.compile(r"\[pid (\d+) start (\d+) host (\S+)\]$")


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/PID/stat``); '' if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def _holder_tag() -> str:
    pid = os.getpid()
    return f"[pid {pid} start {_start_time(pid)} host {socket.gethostname()}]"


def holder_is_gone(info: SessionInfo) -> bool:
    """Whether ``info`` is a CLI session of a process on this host that no longer runs (a killed
    command). False whenever that cannot be told (another host, another kind of session)."""
    m = _HOLDER_RE.search(info.name)
    if m is None or m.group(3) != socket.gethostname():
        return False
    return _start_time(int(m.group(1))) != m.group(2)


@contextlib.contextmanager
def cli_session(store: ConsulStore, purpose: str, behavior: str = "delete") -> Iterator[str]:
    node = store.agent_node_name()
    tag = _holder_tag()
    name = f"pathagent-cli: {purpose}"[:127 - len(tag)] + " " + tag
    sid = store.create_session(node, name, (), 0.0, ttl=TTL, behavior=behavior)
    halt = threading.Event()

    def renew() -> None:
        while not halt.wait(TTL / 3):
            try:
                store.renew_session(sid)
            except CoordinationError:
                pass   # the next renewal may work; the TTL leaves room for two misses

    t = threading.Thread(target=renew, name="cli-session", daemon=True)
    t.start()
    try:
        yield sid
    finally:
        halt.set()
        t.join(1.0)
        try:
            store.destroy_session(sid)
        except CoordinationError:
            pass   # Consul ends it after its TTL anyway
