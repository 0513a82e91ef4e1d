"""The session keeper: our ``iSCSITarget`` session, its lease, and the liveness signals tied to it.

- ``establish()``: adopt the session the previous agent process recorded (planned restart: nothing is
  released or unexported) when Consul still has it *and* it matches the config (lock-delay, checks, TTL);
  a recorded session that no longer matches is replaced without an outage by moving its locks to a new
  one in transactions (an explicit unlock has no lock-delay). Anything else is destroyed, after fencing
  whatever may still be served here, and a new session is made.
- ``confirm_once()`` (started by the confirmer thread every ``confirm_interval``, each on a worker of
  its own, so that a slow read never delays the next: during a Consul leader election reads stall or fail
  until a new leader exists, and the first one *sent* after that counts at once): one consistent read of
  the session. A success sent at t extends the fencer's deadline to t + ``fence_after``, records it for the
  next process, pets the watchdog with it (naming the session: the guard confirms that session by itself
  while the pets are late, and the fencer also counts what the watchdog proved for it), and, while the main loop is healthy and we are not fenced,
  passes our TTL check and renews the session's TTL. A missing session means Consul invalidated it:
  fence at once and start over.

The TTL check (``[consul] agent_check_ttl``) is the agent's liveness on the session: a dead, hung or
permanently fenced agent stops passing it and Consul invalidates the session, so its paths go to other
nodes after the lock-delay. The session TTL (``[consul] session_ttl``) does the same from the servers'
side when the node cannot even tell its Consul agent (an RPC-only partition, a revoked token). Both are
safe only because the watchdog stops the data path of an agent that no longer confirms, before the
earliest takeover (docs/fencing.md).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from agent.backend import Watchdog
from agent.config import Config
from agent.core.lease import Lease
from agent.core.model import PathKey
from agent.core.store import CoordinationStore, SessionInfo
from agent.core.tree import leader_value, lock_value, parse_tree
from agent.errors import AgentError, CoordinationError
from agent.runtime.clock import Clock, boot_id
from agent.runtime.fencer import Fencer
from agent.runtime.statedir import StateDir

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32   # confirmations outstanding at once (a partition: each waits for its timeout)
PASS_EVERY = 1.0   # seconds between passes of the liveness check (a local call; the TTL check needs it often)

CHECK_ID = "pathagent-alive"
TRANSFER_BATCH = 21   # check-session + unlock + lock per path, 64 operations per transaction


class SessionKeeper:
    def __init__(self, cfg: Config, store: CoordinationStore, node: str, clock: Clock, fencer: Fencer,
                 watchdog: Watchdog, state: StateDir, healthy: Callable[[], bool] = lambda: True,
                 wake: Callable[[], None] = lambda: None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.sleep = sleep
        self.store = store
        self.node = node
        self.clock = clock
        self.fencer = fencer
        self.watchdog = watchdog
        self.state = state
        self.healthy = healthy
        self.wake = wake
        self.session: str | None = None
        self.lock_delay = cfg.consul.lock_delay      # of the session we hold (an adopted one's may differ)
        self.lease = Lease(cfg.consul.fence_after)
        self.settle_until = float("-inf")
        self.created = False                         # the session is new (not adopted)
        self._lock = threading.Lock()
        self._error: str | None = None
        self._renewed = float("-inf")
        self._passed = float("-inf")
        self._boot = boot_id()
        self.watchdog_error: str | None = None
        self._pet_lock = threading.Lock()            # confirmations answer out of order: pets go one at a time
        self._petted = float("-inf")
        self._in_flight = 0

    # --- what the config asks for ------------------------------------------------------------------------
    def wanted_checks(self) -> tuple[str, ...]:
        c = self.cfg.consul
        return ("serfHealth",) + ((CHECK_ID,) if c.agent_check_ttl > 0 else ()) + tuple(c.checks)

    def matches(self, s: SessionInfo) -> str:
        """Why session ``s`` does not match the config ('' when it does)."""
        c = self.cfg.consul
        if abs(s.lock_delay - c.lock_delay) > 1e-3:
            return f"its lock-delay is {s.lock_delay:g}s, the config says {c.lock_delay:g}s"
        if set(s.checks) != set(self.wanted_checks()):
            return f"its checks are {', '.join(sorted(s.checks)) or 'none'}, the config wants " \
                   f"{', '.join(sorted(self.wanted_checks()))}"
        if abs(s.ttl - c.session_ttl) > 1e-3:
            return f"its TTL is {s.ttl:g}s, the config says {c.session_ttl:g}s"
        if s.behavior != "release":
            return f"its behavior is {s.behavior}"
        return ""

    def fence_after_for(self, lock_delay: float) -> float:
        """``fence_after`` for a session with ``lock_delay`` (shorter when an adopted session's lock-delay is
        shorter than the configured one: the margin of the inequality is kept)."""
        c = self.cfg.consul
        return c.fence_after - max(0.0, c.lock_delay - lock_delay)

    # --- establishing ------------------------------------------------------------------------------------
    def establish(self, maybe_serving: Callable[[], bool]) -> None:
        """Adopt, replace or create our session (see the module docstring). ``maybe_serving()`` tells
        whether anything may still be served here (then a session that is not adopted is destroyed only
        after a fence). Raises ``CoordinationError``."""
        c = self.cfg.consul
        if c.agent_check_ttl > 0:
            # registering again keeps a critical status: pass it too (a session cannot list a critical check)
            self.store.register_check(CHECK_ID, f"pathagent on {self.node}", c.agent_check_ttl)
            self.store.pass_check(CHECK_ID, "agent starting")
        sent = self.clock.now()
        ours = [s for s in self.store.node_sessions(self.node) if s.name == c.session_name]
        recorded = self.state.session()
        old = next((s for s in ours if s.id == recorded), None)
        stale = [s for s in ours if s is not old]
        if stale:
            _, entries = self.store.read_tree()
            view = parse_tree(self.store.prefix, entries)
            for s in stale:
                if view.held_by(s.id) and maybe_serving():
                    self.fencer.fence(f"session {s.id[:8]} of this node holds paths and is not ours to adopt")
                log.info("destroying stale session %s of node %s", s.id[:8], self.node)
                self.store.destroy_session(s.id)
        if old is not None:
            why = self.matches(old)
            if not why:
                self._hold(old.id, old.lock_delay, sent, created=False)
                log.info("adopted session %s (still valid): keeping every path", old.id[:8])
                return
            log.warning("session %s does not match the config (%s): moving its locks to a new session",
                        old.id[:8], why)
            self._replace(old, sent, maybe_serving)
            return
        if maybe_serving():
            self.fencer.fence("a new session does not cover what an earlier agent process left served")
        sent = self.clock.now()
        sid = self._create()
        self._hold(sid, c.lock_delay, sent, created=True)

    def _create(self) -> str:
        c = self.cfg.consul
        if self.store.catalog_agrees(self.node) is False:
            raise CoordinationError(
                f"the Consul servers' catalog has node {self.node} under another node ID than the local Consul "
                "agent's, or not at all yet (an earlier install of this host whose member has not failed or "
                "been removed): this node's health checks would not reach the servers, so no session is made; "
                "retrying (docs/consul.md, Replacing a gateway)")
        for attempt in range(20):
            try:
                sid = self.store.create_session(self.node, c.session_name, self.wanted_checks(), c.lock_delay,
                                                ttl=c.session_ttl)
                break
            except CoordinationError as e:
                # the servers may not have the check's new status yet (the local agent syncs it at once)
                if "critical state" not in str(e) or attempt == 19:
                    raise
                self.sleep(0.1)
        log.info("created session %s on node %s (checks %s, lock-delay %gs%s)", sid[:8], self.node,
                 ", ".join(self.wanted_checks()), c.lock_delay,
                 f", TTL {c.session_ttl:g}s" if c.session_ttl > 0 else "")
        return sid

    def _hold(self, sid: str, lock_delay: float, sent: float, created: bool) -> None:
        with self._lock:
            self.session = sid
            self.lock_delay = lock_delay
            self.created = created
            self.lease = Lease(self.fence_after_for(lock_delay)).confirm(sent)
            if created:
                self.settle_until = sent + self.cfg.placement_settle
        self.state.record_session(sid)
        watchdog = self.watchdog
        self.fencer.follow(lambda: watchdog.confirmed(sid), self.lease.fence_after)
        self._extend(sent, sid)

    def _replace(self, old: SessionInfo, sent: float, maybe_serving: Callable[[], bool]) -> None:
        """Move every lock of ``old`` to a new session matching the config, then destroy ``old``. While the
        move runs, the deadline follows ``old``'s real lock-delay."""
        self._hold(old.id, old.lock_delay, sent, created=False)
        if self.fence_after_for(old.lock_delay) < self.cfg.consul.confirm_interval:
            if maybe_serving():
                self.fencer.fence(f"session {old.id[:8]}'s lock-delay {old.lock_delay:g}s leaves no room to "
                                  "serve while it is replaced")
        proof = self.clock.now()             # the new session exists at least from this send time on
        new = self._create()
        _, entries = self.store.read_tree()
        view = parse_tree(self.store.prefix, entries)
        held: list[PathKey] = sorted(view.held_by(old.id))
        value = lock_value(self.node, new, self.clock.wall())
        moved = 0
        for i in range(0, len(held), TRANSFER_BATCH):
            sent = self.clock.now()
            res = self.store.transfer(held[i:i + TRANSFER_BATCH], old.id, new, value)
            if res.ok:
                proof = sent
            else:
                if maybe_serving():
                    self.fencer.fence(f"moving the locks of session {old.id[:8]} failed ({res.reason()})")
                break
            moved += len(held[i:i + TRANSFER_BATCH])
        if moved < len(held):
            log.error("session %s: %d locks could not be moved; they are lost with it",
                      old.id[:8], len(held) - moved)
        if view.leader == old.id:                # leading: the new session leads on, with no lock-delay
            try:
                if self.store.transfer_leader(old.id, new, leader_value(self.node, new, self.clock.wall())).ok:
                    log.info("leadership moved to session %s", new[:8])
            except CoordinationError as e:
                log.info("leader key of %s not moved: %s", old.id[:8], e)
        try:
            self.store.release_node_record(self.node, old.id)
        except CoordinationError as e:
            log.info("node record of %s not released: %s", old.id[:8], e)
        # the new session first: a confirmation of the old one in between would find it gone and fence
        self._hold(new, self.cfg.consul.lock_delay, proof, created=False)
        try:
            self.store.destroy_session(old.id)
        except CoordinationError as e:
            log.warning("session %s not destroyed (%s): the next start destroys it", old.id[:8], e)
        log.warning("replaced session %s by %s: %d of %d locks moved", old.id[:8], new[:8], moved, len(held))

    # --- confirming --------------------------------------------------------------------------------------
    def _extend(self, sent: float, sid: str) -> None:
        """A confirmation sent at ``sent``: serving may go on until ``sent + fence_after``, but only as far
        as the watchdog accepted it (a "required" watchdog, as Patroni's: a node whose watchdog cannot be
        pet does not serve, since nothing would stop its data path if the agent then froze)."""
        until = sent + self.lease.fence_after
        with self._pet_lock:
            if until <= self._petted:
                return                  # a newer confirmation already went through (answers out of order)
            self._extend_locked(until, sid)

    def _extend_locked(self, until: float, sid: str) -> None:
        try:
            self.watchdog.pet(until, sid)
        except Exception as e:  # noqa: BLE001 - a BackendError, or a plugin bug: either way, not pet
            if self.watchdog_error != str(e):
                log.error("watchdog not pet: %s; not serving on this confirmation (the data path stops at "
                          "the last deadline the watchdog knows)", e)
            self.watchdog_error = str(e)
            return
        if self.watchdog_error:
            log.info("watchdog pet again")
        self.watchdog_error = None
        self._petted = until
        self.fencer.extend(until)
        self.state.record_serve_until(until, self._boot)

    def confirm_once(self) -> None:
        """One consistent read of our session (see the module docstring)."""
        sid = self.session
        if sid is None:
            return
        sent = self.clock.now()
        try:
            info = self.store.session_info(sid, timeout=self.confirm_timeout())
        except CoordinationError as e:
            if self._error != str(e):
                log.warning("session %s not confirmed: %s", sid[:8], e)
            self._error = str(e)
            return
        if self._error:
            log.info("session %s confirmed again", sid[:8])
        self._error = None
        with self._lock:
            if self.session != sid:
                return
            if info is None:
                self.session = None
                self.lease = self.lease.reset()
        if info is None:
            self.fencer.follow(None)
            log.error("session %s is gone (invalidated by Consul)", sid[:8])
            self.fencer.fence(f"session {sid[:8]} was invalidated")
            self.wake()
            return
        with self._lock:
            self.lease = self.lease.confirm(sent)
        self._extend(sent, sid)
        if self.fencer.fenced:
            self.wake()

    def report_liveness(self) -> None:
        """Pass our TTL check (every ``PASS_EVERY`` seconds at most, so that a freeze of the whole agent
        shorter than ``agent_check_ttl - PASS_EVERY`` never ends the session) and renew the session's TTL (at
        a third of its TTL), only while
        the main loop is healthy, we are not fenced and the watchdog takes our pets. On its own thread, so
        that a slow call here never delays a confirmation."""
        c = self.cfg.consul
        sid = self.session
        if sid is None or self.fencer.fenced or self.watchdog_error or not self.healthy():
            return
        try:
            now = self.clock.now()
            if c.agent_check_ttl > 0 and now - self._passed >= min(c.agent_check_ttl / 5, PASS_EVERY):
                self.store.pass_check(CHECK_ID)      # a local call on the Consul agent: cheap
                self._passed = now
            if c.session_ttl > 0 and now - self._renewed >= c.session_ttl / 3:
                if self.store.renew_session(sid):
                    self._renewed = now
        except CoordinationError as e:
            log.warning("liveness not reported: %s", e)

    def confirm_timeout(self) -> float:
        """The HTTP timeout of one confirmation: an answer is of use until its send time + fence_after (a read
        held by the servers through a leader election and answered then still extends the lease), so it may
        take that long; the confirmer does not wait for it (``run``)."""
        return max(self.cfg.consul.timeout, self.lease.fence_after)

    def max_in_flight(self) -> int:
        c = self.cfg.consul
        return max(1, min(MAX_IN_FLIGHT, int(self.confirm_timeout() / c.confirm_interval) + 1))

    def run(self, halt: threading.Event) -> None:
        """The confirmer thread: starts a confirmation every ``confirm_interval`` on a worker thread, never
        more than ``max_in_flight()`` at once, and never waits for one (see the module docstring)."""
        while not halt.is_set():
            with self._lock:
                go = self._in_flight < self.max_in_flight()
                if go:
                    self._in_flight += 1
            if go:
                threading.Thread(target=self._confirm_worker, name="confirm-1", daemon=True).start()
            halt.wait(self.cfg.consul.confirm_interval)

    def _confirm_worker(self) -> None:
        try:
            self.confirm_once()
        except Exception:  # noqa: BLE001 - a bug in one confirmation must not stop the next ones
            log.exception("confirmation failed (a bug)")
        finally:
            with self._lock:
                self._in_flight -= 1

    def run_liveness(self, halt: threading.Event) -> None:
        """The liveness thread."""
        c = self.cfg.consul
        step = min([t / 5 for t in (c.agent_check_ttl, c.session_ttl) if t > 0] or [5.0])
        while not halt.wait(min(step, 1.0)):
            self.report_liveness()

    # --- ending ------------------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Release our node record and destroy the session (after an orderly stop left nothing served)."""
        sid = self.session or self.state.session()
        if sid is None:
            return
        try:
            self.store.release_node_record(self.node, sid)
            self.store.release_leader(sid)          # if we lead: the next leader need not wait its lock-delay
        except CoordinationError as e:
            log.info("node record or leader key not released: %s", e)
        self.fencer.follow(None)
        self.store.destroy_session(sid)
        log.info("session %s destroyed", sid[:8])
        with self._lock:
            self.session = None
        self.state.record_session(None)
