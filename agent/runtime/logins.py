"""Publishing who is logged in on this node: ``{prefix}/logins/{node}``, read by ``disk stop`` (which refuses
to cut off logged-in initiators without ``--force``) through ``agent.core.tree.logins_by_disk``.

Every ``LOGINS_EVERY`` seconds the *logins* thread asks the target backend ``logged_in()`` (initiator names
with a session here, by disk) and, when the answer differs from the report last written (or our session
changed), writes ``agent.core.tree.logins_value`` locked by our agent session, in one transaction
(``ConsulStore.txn``: ``lock``). An unchanged answer writes nothing. Being locked by the session is what
makes the report count: when the session ends (a crash, a partition) Consul unlocks the key and readers
ignore it.

- ``None`` from the backend (it cannot tell): nothing is published; a report left under our node's key
  (an earlier process with another backend) is deleted once.
- An error from the backend (``TransientBackendError``, or a plugin bug): logged once when it starts and
  once when it ends, both at warning; meanwhile the last answer stands (it is re-locked if our session
  changes meanwhile, so a new session never leaves the report unlocked because the backend is slow).
- Consul does not answer or refuses the lock (our previous session's lock-delay after a new session):
  logged once per streak; tried again at the next look.
- An orderly stop (``withdraw``, before the session is destroyed) deletes the key; after a crash or a
  lost session the key stays, unlocked (ignored), until this node's next agent overwrites or deletes it.
  A planned restart (detach) leaves it locked by the session the next process adopts.

Off the fencing path: this runs on a thread of its own (never the fencer's, the confirmer's or the main
loop's; not the duties thread either, whose fences of failed nodes gate their paths' takeover), so a slow
``logged_in()`` or Consul write delays nothing that docs/fencing.md bounds. Tests and tools that drive the
loop single-threaded call ``run_due`` from the cycle instead.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping, Protocol

from agent.adapters.consul_store import TxnOps
from agent.backend import TargetBackend
from agent.core import keys
from agent.core.store import TxnResult
from agent.core.tree import login_sets, logins_value
from agent.errors import AgentError, CoordinationError
from agent.runtime.clock import Clock

log = logging.getLogger(__name__)

#: seconds between two looks at ``TargetBackend.logged_in()`` (a change is published within this)
LOGINS_EVERY = 5.0
#: seconds between looks while the node's name or our session is not known yet
LOGINS_EARLY = 1.0


class SupportsTxn(Protocol):
    """The one store call the publisher makes (``agent.adapters.consul_store.ConsulStore.txn``)."""

    def txn(self, ops: TxnOps) -> TxnResult: ...


class LoginsPublisher:
    def __init__(self, target: TargetBackend, kv: SupportsTxn | None, prefix: str, clock: Clock,
                 node: Callable[[], str], session: Callable[[], str | None]) -> None:
        """``kv`` ``None``: nothing is ever published (tests and tools on a store without transactions).
        ``node()`` and ``session()`` are read at each look (empty / ``None`` while not known: nothing is
        written then)."""
        self.target = target
        self.kv = kv
        self.prefix = prefix
        self.clock = clock
        self.node = node
        self.session = session
        self._lock = threading.Lock()       # one write at a time; none after withdraw()
        self._known: dict[str, frozenset[str]] | None = None   # the backend's last answer
        self._written: tuple[str, str, dict[str, frozenset[str]]] | None = None  # (node, session, logins)
        self._cleared = False               # a None answer: our key was deleted (once)
        self._backend_error: str | None = None
        self._store_error: str | None = None
        self._checked_at: float | None = None
        self._stopped = False
        self.writes = 0                     # reports written (and deletions), for tests and tools

    # --- the thread ------------------------------------------------------------------------------------
    def run(self, halt: threading.Event) -> None:
        """The logins thread: a look every ``LOGINS_EVERY`` seconds until ``halt`` or ``withdraw``."""
        while not halt.is_set() and not self._stopped and self.kv is not None:
            self.poll()
            early = not self.node() or self.session() is None
            halt.wait(LOGINS_EARLY if early else LOGINS_EVERY)

    def run_due(self) -> None:
        """A look if the last one is ``LOGINS_EVERY`` old (single-threaded use: tests and tools)."""
        now = self.clock.now()
        if self._checked_at is None or now - self._checked_at >= LOGINS_EVERY:
            self.poll()

    # --- one look --------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Ask the backend and publish what changed. Never raises: every failure is logged (once per
        streak) and the next look tries again."""
        if self.kv is None or self._stopped:
            return
        self._checked_at = self.clock.now()
        node = self.node()
        if not node:
            return
        try:
            got = self.target.logged_in()
        except Exception as e:  # noqa: BLE001 - a BackendError or a plugin bug: the last answer stands
            kind = type(e).__name__ if isinstance(e, AgentError) else f"plugin bug, {type(e).__name__}"
            if self._backend_error is None:
                log.warning("initiator logins unknown for now (%s: %s); the last report stands", kind, e)
            self._backend_error = kind
            got = self._known
            if got is None:
                return
        else:
            if self._backend_error is not None:
                log.warning("initiator logins known again")
                self._backend_error = None
        if got is None:
            self._known = None
            self._clear(node)
            return
        sets = login_sets(got)
        self._known = sets
        session = self.session()
        if session is None:
            return                          # nothing to lock it with (yet); Consul unlocked the old one
        if self._written == (node, session, sets):
            return
        self._publish(node, session, sets)

    def _publish(self, node: str, session: str, sets: dict[str, frozenset[str]]) -> None:
        key = keys.logins_key(self.prefix, node)
        value = logins_value(node, session, self.clock.wall(), sets)
        assert self.kv is not None
        with self._lock:
            if self._stopped:
                return
            try:
                res = self.kv.txn(TxnOps().lock(key, value, session))
            except CoordinationError as e:
                self._failed(f"not written: {e}", logging.WARNING)
                return
            if not res.ok:
                self._failed(f"not locked: {res.reason()}", logging.INFO)
                return
            self._written, self._cleared = (node, session, sets), False
            self.writes += 1
        self._recovered()
        log.info("published the initiator logins: %s", _summary(sets))

    def _clear(self, node: str) -> None:
        if self._cleared:
            return
        assert self.kv is not None
        with self._lock:
            if self._stopped:
                return
            try:
                self.kv.txn(TxnOps().delete(keys.logins_key(self.prefix, node)))
            except CoordinationError as e:
                self._failed(f"stale report not deleted: {e}", logging.WARNING)
                return
            self._cleared, self._written = True, None
            self.writes += 1
        self._recovered()
        log.info("the target backend cannot tell who is logged in: no initiator logins are published")

    def _failed(self, what: str, level: int) -> None:
        if self._store_error is None:
            log.log(level, "initiator logins %s; trying again in %.0fs", what, LOGINS_EVERY)
        self._store_error = what

    def _recovered(self) -> None:
        if self._store_error is not None:
            log.info("initiator logins written again")
            self._store_error = None

    # --- an orderly stop -------------------------------------------------------------------------------
    def withdraw(self) -> None:
        """Delete our report and publish nothing more (an orderly stop, before the session is destroyed).
        Waits for a write under way (bounded by the store's timeout). A failure is logged: the report is
        then left to be unlocked with the session, and readers ignore it."""
        with self._lock:
            was, self._stopped = self._stopped, True
            node = self.node()
            if was or self.kv is None or not node or (self._written is None and self._cleared):
                return
            try:
                self.kv.txn(TxnOps().delete(keys.logins_key(self.prefix, node)))
            except CoordinationError as e:
                log.warning("initiator logins report not deleted: %s (it is unlocked with the session)", e)
                return
            self._written, self._cleared = None, True


def _summary(sets: Mapping[str, frozenset[str]]) -> str:
    """``3 initiators on 2 disks`` (the names stay in Consul; one short log line per change)."""
    n = sum(len(v) for v in sets.values())
    return f"{n} initiator{'s' if n != 1 else ''} on {len(sets)} disk{'s' if len(sets) != 1 else ''}"
