"""What the runtime and the CLI need from the coordination store (Consul), as a ``Protocol``, and the plain
values it answers with. Pure: no implementation here.

``agent.adapters.consul_store.ConsulStore`` is the real one; tests of the loop use an in-memory one.
Every method may raise ``CoordinationError`` (the store could not be reached or refused); a transaction
that is rolled back is an outcome (``TxnResult.ok`` false with the reasons), not an exception.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from agent.core.model import PathKey
from agent.core.tree import KVEntry

MAX_TXN_OPS = 64  # Consul 1.8.7's limit


@dataclass(frozen=True)
class SessionInfo:
    id: str
    name: str
    node: str
    checks: tuple[str, ...] = ()
    lock_delay: float = 0.0
    ttl: float = 0.0
    behavior: str = "release"
    create_index: int = 0


@dataclass(frozen=True)
class TxnResult:
    """Outcome of a transaction: ``ok`` and the entries returned, or the per-op errors of a rollback."""

    ok: bool
    results: tuple[KVEntry, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()

    def reason(self) -> str:
        return "; ".join(f"op {i}: {w}" for i, w in self.errors)

    def lock_delay(self) -> bool:
        """Refused because a key is still in its lock-delay."""
        return any("lock delay" in w for _, w in self.errors)


class CoordinationStore(Protocol):
    """The operations on Consul that the node agent makes (keys are relative to the configured prefix
    through ``agent.core.keys``)."""

    prefix: str

    def agent_node_name(self) -> str:
        """The local Consul agent's node name."""

    def catalog_agrees(self, node: str) -> bool | None:
        """Whether the servers' catalog has ``node`` under the local Consul agent's node ID: ``False`` when
        it has another ID for that name (an earlier install of this host whose member has not failed or
        been removed yet: the servers refuse this agent's registration, so its health checks never reach
        them and a session made now would not end when this node's checks fail) or none yet; ``None`` when
        it cannot tell (no permission to read the catalog)."""

    def read_tree(self, index: int = 0, wait: float | None = None) -> tuple[int, list[KVEntry]]:
        """Everything under ``{prefix}/``; with ``index`` > 0 a blocking read that returns when something
        changed or after ``wait`` seconds. Returns Consul's index with the entries."""

    def session_info(self, sid: str, timeout: float | None = None) -> SessionInfo | None:
        """A consistent read of session ``sid`` (proof that the servers answer); ``None``: it is gone.
        ``timeout``: the HTTP timeout of this call (default: the configured one)."""

    def node_sessions(self, node: str) -> list[SessionInfo]:
        """The sessions bound to ``node``."""

    def create_session(self, node: str, name: str, checks: Sequence[str], lock_delay: float,
                       ttl: float = 0.0, behavior: str = "release") -> str:
        """A new session bound to ``node`` with exactly ``checks``; ``ttl`` 0: none."""

    def renew_session(self, sid: str) -> bool:
        """Renew a session's TTL; false when the session is gone."""

    def destroy_session(self, sid: str) -> None:
        """Invalidate the session (its locks are released; lock-delay applies to them)."""

    def register_check(self, check_id: str, name: str, ttl: float) -> None:
        """Register (or re-register) a TTL health check on the local Consul agent, passing."""

    def pass_check(self, check_id: str, note: str = "") -> None:
        """Report the TTL check as passing."""

    def acquire_many(self, items: Sequence[tuple[PathKey, int]], session: str, value: bytes) -> TxnResult:
        """Lock every path key with ``session`` if its ModifyIndex is still the one given, all or none."""

    def release(self, path: PathKey, session: str, value: bytes = b"") -> TxnResult:
        """Unlock the path key if ``session`` holds it (no lock-delay for the next owner)."""

    def transfer(self, paths: Sequence[PathKey], old: str, new: str, value: bytes) -> TxnResult:
        """Move the locks on ``paths`` from session ``old`` to ``new`` in one transaction, all or none."""

    def lock_node_record(self, node: str, session: str, value: bytes) -> TxnResult:
        """Lock ``{prefix}/nodes/{node}`` with ``session``."""

    def release_node_record(self, node: str, session: str) -> TxnResult:
        """Unlock our node record."""

    def acquire_leader(self, session: str, value: bytes) -> TxnResult:
        """Lock ``{prefix}/leader`` with ``session`` (refused while another holds it or in its lock-delay)."""

    def transfer_leader(self, old: str, new: str, value: bytes) -> TxnResult:
        """Move ``{prefix}/leader`` from session ``old`` to ``new`` in one transaction (refused if ``old``
        does not hold it)."""

    def release_leader(self, session: str) -> TxnResult:
        """Unlock ``{prefix}/leader`` if ``session`` holds it (no lock-delay for the next leader)."""

    def record_fence(self, node: str, leader: str, value: bytes) -> TxnResult:
        """Write ``{prefix}/fenced/{node}``, only while ``leader`` holds the leader key."""

    def request_move(self, path: PathKey, leader: str, value: bytes) -> TxnResult:
        """Lock the move request of ``path`` with ``leader``, only while it holds the leader key."""

    def end_move(self, path: PathKey, session: str) -> TxnResult:
        """Delete the move request of ``path`` if ``session`` holds it."""

    def clean_up(self, key: str, modify_index: int, leader: str) -> TxnResult:
        """Delete ``key`` if it is still at ``modify_index``, only while ``leader`` holds the leader key."""


def next_index(sent: int, got: int) -> int:
    """Consul's rule for the next blocking index: reset to 0 when it went backwards or is not positive."""
    if got <= 0 or got < sent:
        return 0
    return got
