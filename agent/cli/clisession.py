"""A short-lived Consul session for one CLI command: what ``path move`` and ``disk stop`` lock keys with.

``Behavior=delete`` with a TTL and no health checks: while the command runs, a thread renews it; if the
command dies, Consul invalidates the session after at most twice the TTL and deletes every key it holds
(a move request, the path keys of a disk being stopped), so nothing the command left behind outlives it
and no agent has to compare clocks to tell a live request from a stale one. Lock-delay 0: the keys are
deleted, not handed on.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from agent.adapters.consul_store import ConsulStore
from agent.errors import CoordinationError

TTL = 10.0


@contextlib.contextmanager
def cli_session(store: ConsulStore, purpose: str) -> Iterator[str]:
    node = store.agent_node_name()
    sid = store.create_session(node, f"pathagent-cli: {purpose}"[:128], (), 0.0, ttl=TTL, behavior="delete")
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
