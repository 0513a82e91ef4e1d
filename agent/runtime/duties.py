"""Slow cluster work off the main loop: fencing failed nodes (as the leader) and this node's fencing identity.

The fencing plugin may block on Ceph for seconds; the main loop must not (it beats, plans and answers
stops). So the planner's ``FenceNode`` actions are handed to ``Duties.submit`` (never blocks), and one
worker thread runs them: ``Fencing.fence`` and then, only if it succeeded, the fence record
``{prefix}/fenced/{node}`` in a transaction that checks we still hold the leader key (a deposed leader's
late fence records nothing). A failed fence is named in the log (node, session, error) and retried with a
backoff (1, 2, 4 ... 30 s); meanwhile that node's paths wait (``planner.fence_pending``). The same thread
refreshes what this node publishes for others to fence it (``Fencing.identity``) every ``IDENTITY_EVERY``
seconds; at start it is asked at once and, while it fails (usually: the node name is not known until Consul
answered), again after 0.25 s, doubling up to 5 s, so that a gateway that fails seconds after it started
can still be fenced on the Ceph side (without its identity the fence finds nothing, and the next owner's
writes wait for Ceph's 30 s watch timeout).

No lock is shared with the fencer of ``agent.runtime.fencer`` (that one stops *this* node's serving;
this one fences *other* nodes through Ceph).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from agent.backend import FailedNode, Fencing
from agent.core.model import FenceNode
from agent.core.store import CoordinationStore
from agent.core.tree import fenced_value
from agent.errors import AgentError
from agent.runtime.clock import Clock

log = logging.getLogger(__name__)

IDENTITY_EVERY = 60.0
#: after a failed identity(): again in 0.25 s, doubling up to 5 s; a warning from the 4th failure on
IDENTITY_RETRY_MIN = 0.25
IDENTITY_RETRY_MAX = 5.0
IDENTITY_QUIET_FAILURES = 4
MAX_BACKOFF = 30.0


@dataclass
class _Job:
    action: FenceNode
    leader: str


class Duties:
    def __init__(self, fencing: Fencing | None, store: CoordinationStore, clock: Clock,
                 wake: Callable[[], None]) -> None:
        """``fencing`` ``None``: nothing to fence with (tests and tools): nothing waits for a fence."""
        self.fencing = fencing
        self.store = store
        self.clock = clock
        self.wake = wake
        self.required = fencing is not None and fencing.required
        self._cond = threading.Condition()
        self._queue: dict[str, _Job] = {}
        self._running: str | None = None
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._identity: Mapping[str, Any] = {}
        self._identity_at: float | None = None
        self._identity_failures = 0
        self._done: dict[tuple[str, str], float] = {}     # (node, session) -> when recorded
        self.fences = 0                 # fences of failed nodes recorded (metric)
        self.failures = 0               # fences of failed nodes that failed (metric)
        self.last_error = ""

    # --- for the main loop (never blocks) ----------------------------------------------------------------
    def identity(self) -> Mapping[str, Any]:
        with self._cond:
            return dict(self._identity)

    def busy(self) -> frozenset[str]:
        """Nodes with a fence queued, running, or backing off after a failure."""
        now = self.clock.now()
        with self._cond:
            return frozenset(set(self._queue) | ({self._running} if self._running else set())
                             | {n for n, t in self._retry_at.items() if t > now})

    def submit(self, action: FenceNode, leader: str) -> None:
        with self._cond:
            if action.node in self._queue or action.node == self._running:
                return
            now = self.clock.now()
            if self._retry_at.get(action.node, 0.0) > now:
                return
            if now - self._done.get((action.node, action.session), -1e9) < 10.0:
                return      # recorded already; the view has not caught up yet
            self._queue[action.node] = _Job(action, leader)
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run_pending(self) -> None:
        """Run what is queued now, on the calling thread (single-threaded use: tests and tools)."""
        self.refresh_identity()
        while True:
            with self._cond:
                if not self._queue:
                    return
                node, job = next(iter(self._queue.items()))
                del self._queue[node]
            self.fence(job)

    # --- the worker --------------------------------------------------------------------------------------
    def run(self, halt: threading.Event) -> None:
        while not halt.is_set():
            self.refresh_identity()
            with self._cond:
                if not self._queue:
                    self._cond.wait(timeout=self._identity_wait())
                if halt.is_set() or not self._queue:
                    continue
                node, job = next(iter(self._queue.items()))
                del self._queue[node]
                self._running = node
            try:
                self.fence(job)
            finally:
                with self._cond:
                    self._running = None
            self.wake()

    def _identity_wait(self) -> float:
        if self._identity_at is None:
            return IDENTITY_RETRY_MIN
        return max(0.1, self._identity_at + IDENTITY_EVERY - self.clock.now())

    def refresh_identity(self, force: bool = False) -> None:
        now = self.clock.now()
        if self.fencing is None or (not force and self._identity_at is not None
                                    and now - self._identity_at < IDENTITY_EVERY):
            return
        try:
            ident = dict(self.fencing.identity())
        except Exception as e:  # noqa: BLE001 - a backend error or a plugin bug: try again later
            # Soon: a node that fails before it published anything cannot be fenced by the Ceph side, and
            # its paths then wait for Ceph's own watch timeout (30 s). At start the name is usually just
            # not known yet (Consul has not answered): that is worth a warning only when it persists.
            self._identity_failures += 1
            delay = min(IDENTITY_RETRY_MAX, IDENTITY_RETRY_MIN * 2 ** (self._identity_failures - 1))
            level = logging.WARNING if self._identity_failures >= IDENTITY_QUIET_FAILURES else logging.DEBUG
            log.log(level, "fencing identity of this node unknown for now (attempt %d, again in %.1fs): %s: %s",
                    self._identity_failures, delay, type(e).__name__, e)
            self._identity_at = now - IDENTITY_EVERY + delay
            return
        if self._identity_failures >= IDENTITY_QUIET_FAILURES:
            log.warning("fencing identity of this node known again")
        self._identity_failures = 0
        self._identity_at = now
        with self._cond:
            changed = ident != self._identity
            self._identity = ident
        if changed:
            self.wake()

    def fence(self, job: _Job) -> None:
        a = job.action
        failed = FailedNode(a.node, a.session, dict(a.identity), a.images)
        start = self.clock.now()
        try:
            if self.fencing is None:
                return
            summary = self.fencing.fence(failed)
        except Exception as e:  # noqa: BLE001 - named and retried; the node's paths wait
            n = self._failures.get(a.node, 0) + 1
            self._failures[a.node] = n
            self.failures += 1
            delay = min(2.0 ** (n - 1), MAX_BACKOFF)
            with self._cond:
                self._retry_at[a.node] = self.clock.now() + delay
            kind = "plugin bug" if not isinstance(e, AgentError) else type(e).__name__
            self.last_error = f"fencing {a.node} failed ({kind}): {e}"
            log.error("fencing node %s (session %s) failed (%s): %s; its paths wait; retrying in %.0fs",
                      a.node, a.session[:8], kind, e, delay)
            return
        took = self.clock.now() - start
        try:
            res = self.store.record_fence(a.node, job.leader, fenced_value(a.node, a.session, self.clock.wall(),
                                                                           summary))
        except AgentError as e:
            log.warning("fenced node %s but could not record it: %s; fencing again", a.node, e)
            with self._cond:
                self._retry_at[a.node] = self.clock.now() + 1.0
            return
        if not res.ok:
            log.warning("fenced node %s but no longer the leader (%s): nothing recorded", a.node, res.reason())
            return
        self._failures.pop(a.node, None)
        with self._cond:
            self._retry_at.pop(a.node, None)
            now = self.clock.now()
            self._done = {k: t for k, t in self._done.items() if now - t < 60.0}
            self._done[(a.node, a.session)] = now
        self.fences += 1
        self.last_error = ""
        log.warning("fenced failed node %s (session %s) in %.0f ms: %s", a.node, a.session[:8], took * 1000, summary)
