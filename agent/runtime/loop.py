"""The node loop: parts with one job each, composed by ``Agent``.

Threads (each body guarded: a bug in one pass is logged and the thread carries on):

- *fencer* (``agent.runtime.fencer``): stops serving at the lease deadline, waiting on nothing else;
- *confirm* (``agent.runtime.session``): confirms our session, feeds the deadline, pets the watchdog,
  reports liveness;
- *watch* (``agent.runtime.watcher``): blocking queries on the prefix, posting ``ClusterView``s;
- *catalog* (``agent.runtime.definitions``): disk definitions from the catalog (Ceph may block);
- *duties* (``agent.runtime.duties``): the leader's fences of failed nodes, this node's fencing identity;
- *logins* (``agent.runtime.logins``): who is logged in here, published every ``LOGINS_EVERY`` seconds
  when it changed (only with a ``logins_store``);
- *main*: ``cycle()`` = local facts (what the target exports, which addresses are up) + the view +
  definitions -> ``Snapshot`` -> ``planner.plan`` -> ``Applier`` -> ``CycleReport`` (one log line) and
  the metrics' published state (``agent.runtime.metrics``: a scrape reads only that, on the metrics
  server's threads), then it sleeps until the plan's ``wake_at``, a wake-up (new view, lease change,
  fence, signal) or the heartbeat. Only the main loop sends systemd's ``WATCHDOG=1``.

Nothing one cycle meets ends the process: a failure is logged and the cycle retried after a delay;
only a configuration error at start does (``ConfigError``).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Mapping

from agent.backend import Catalog, Fencing, NetworkBackend, TargetBackend, Watchdog
from agent.config import Config, serving_bound
from agent.core import planner
from agent.core.model import Disk, PathKey, PathState
from agent.core.planner import Snapshot
from agent.core.store import CoordinationStore
from agent.core.tree import ClusterView, overlay
from agent.errors import AgentError, ConfigError, CoordinationError
from agent.runtime.applier import Applier, Effects, PathBackoff
from agent.runtime.clock import Clock, SystemClock, boot_id
from agent.runtime.definitions import DefinitionCache
from agent.runtime.duties import Duties
from agent.runtime.fencer import Fencer
from agent.runtime.logins import LoginsPublisher, SupportsTxn
from agent.runtime.metrics import AgentMetrics, FailoverTimer, Live
from agent.runtime.notify import Notifier
from agent.runtime.report import CycleReport
from agent.runtime.session import SessionKeeper
from agent.runtime.statedir import StateDir
from agent.runtime.wakeup import Wakeup
from agent.runtime.watcher import TreeWatcher

log = logging.getLogger(__name__)

HEARTBEAT = 2.0              # the main loop runs a cycle at least this often (its liveness: see healthy())
TARGET_UNKNOWN_FENCE = 10.0  # the target cannot say what it serves for this long: stop its data path
MAX_IMMEDIATE = 20           # cycles in a row planned at once before the loop sleeps anyway (no spinning)


class Agent:
    """One node's agent. ``run()`` blocks until ``stop()`` (take everything down, release every lock,
    destroy the session) or ``detach()`` (leave the session and the exports for the next process)."""

    def __init__(self, cfg: Config, store: CoordinationStore, catalog: Catalog, target: TargetBackend,
                 network: NetworkBackend, watchdog: Watchdog, node: str, clock: Clock | None = None,
                 notifier: Notifier | None = None, fencing: Fencing | None = None,
                 logins_store: SupportsTxn | None = None) -> None:
        """``logins_store``: where the initiator logins are published (the Consul store; ``None``: they
        are not, as in tests and tools on a store without transactions)."""
        self.cfg = cfg
        self.store = store
        self.target = target
        self.network = network
        self.watchdog = watchdog
        self.node = node
        self.clock = clock or SystemClock()
        self.notifier = notifier or Notifier({})
        self.state = StateDir(cfg.state_dir)
        self.wakeup = Wakeup()
        self.fencer = Fencer(network, target, self.clock, on_fence=self.wakeup.wake)
        self.backoff = PathBackoff()
        self.watcher = TreeWatcher(store, cfg.consul.wait, wake=self._on_view)
        self.definitions = DefinitionCache(catalog, cfg.ceph.refresh, self.watcher.latest, wake=self.wakeup.wake)
        self.keeper = SessionKeeper(cfg, store, node, self.clock, self.fencer, watchdog, self.state,
                                    healthy=self.healthy, wake=self.wakeup.wake)
        self.duties = Duties(fencing, store, self.clock, wake=self.wakeup.wake)
        self.logins = LoginsPublisher(target, logins_store, store.prefix, self.clock, node=lambda: self.node,
                                      session=lambda: self.keeper.session)
        self.applier = Applier(store, target, network, self.fencer, self.clock, node, cfg.target.backend,
                               self.backoff, beat=self._beat, fence_node=self.duties.submit,
                               record=lambda: (cfg.node_weight, self.duties.identity()),
                               label=self.definitions.label)
        self.report = CycleReport(node=node, backend=cfg.target.backend)
        self.metrics = AgentMetrics(Live(session=lambda: self.keeper.session, fenced=lambda: self.fencer.fenced,
                                         serve_until=lambda: self.fencer.serve_until,
                                         fence_events=lambda: self.fencer.events,
                                         beat_age=lambda: self.clock.now() - self._beat_at, now=self.clock.now))
        self.failovers = FailoverTimer()
        self._planned_view: ClusterView | None = None   # the view of the last cycle that planned (metrics)
        self._stop_mode: str | None = None          # "release" | "detach"
        self._threads_running = False
        self._halt = threading.Event()
        self._beat_at = self.clock.now()
        self._own: dict[PathKey, PathState] = {}    # our lock writes the view may not show yet
        self._own_node = False
        self._own_leader: tuple[str, int] | None = None     # (session, view index) when we took the leader key
        self._own_moves: dict[PathKey, tuple[str | None, int]] = {}   # our move writes -> view index then
        self._applied: dict[PathKey, Disk] = {}
        self._free_since: dict[PathKey, float] = {}
        self._orphan_since: dict[str, float] = {}   # node record first seen orphaned
        self._live_since: dict[str, float] = {}     # node first seen live (continuously)
        self._move_since: dict[PathKey, float] = {} # our move request first seen
        self._lockable: set[int] = set()
        self._view_index = 0
        self._claimable_since: dict[PathKey, float] = {}
        self._leader_free_since: float | None = None            # orphan groups (ModifyIndex) proven past their lock-delay
        self._exported: frozenset[PathKey] = frozenset()   # the target's last answer
        self._addresses: frozenset[PathKey] = frozenset()
        self._target_unknown_since: float | None = None
        self._fenced_blind = False                  # fenced while the target could not tell: nothing served
        self._last_summary = ""
        self._mixed: Mapping[str, tuple[str, ...]] = {}   # the mixed backends last warned of ({}: none)
        self._ready = False
        self.cycles = 0
        self.takeovers = 0

    # --- control (safe from signal handlers: a flag and a pipe write) ------------------------------------
    def stop(self) -> None:
        self._stop_mode = self._stop_mode or "release"
        self.wakeup.wake()

    def detach(self) -> None:
        self._stop_mode = self._stop_mode or "detach"
        self.wakeup.wake()

    def _on_view(self) -> None:
        self.definitions.poke()
        self.wakeup.wake()

    def _beat(self) -> None:
        self._beat_at = self.clock.now()

    def healthy(self) -> bool:
        """The main loop made progress recently: it beats at least every ``HEARTBEAT`` seconds (each cycle,
        each action), so a beat older than twice that (or than half the TTL check's TTL, whichever is
        longer) means it is stuck; the TTL check then lapses (``agent_check_ttl`` >= 5 > 2 x HEARTBEAT)."""
        limit = max(2 * HEARTBEAT, self.cfg.consul.agent_check_ttl / 2)
        return self.clock.now() - self._beat_at < limit

    def set_node(self, node: str) -> None:
        self.node = self.keeper.node = self.applier.node = node
        self.report = CycleReport(node=node, backend=self.cfg.target.backend)
        self.state.record_node(node)

    def resolve_node(self) -> str:
        """The node name: the local Consul agent's. ``[node] name``, if set, must equal it
        (``ConfigError``); ``CoordinationError`` while Consul does not answer."""
        agent_node = self.store.agent_node_name()
        if self.cfg.node_name and self.cfg.node_name != agent_node:
            raise ConfigError([("node.name", f"is {self.cfg.node_name!r} but the local Consul agent's node name "
                                             f"is {agent_node!r}; they must be the same")])
        return agent_node

    # --- local facts -------------------------------------------------------------------------------------
    def _read_target(self, now: float) -> bool:
        """Ask the target what it serves; returns whether it could tell (else the last answer stands)."""
        try:
            self._exported = self.target.exported()
        except Exception as e:  # noqa: BLE001 - a backend error or a plugin bug: the state is unknown
            if self._target_unknown_since is None:
                self._target_unknown_since = now
                log.error("the target backend cannot say what it serves: %s: %s", type(e).__name__, e)
            return False
        if self._target_unknown_since is not None:
            log.info("the target backend answers again")
        self._target_unknown_since = None
        return True

    def _read_addresses(self) -> None:
        try:
            self._addresses = self.network.active()
        except Exception as e:  # noqa: BLE001 - keep the last answer (addresses that were up stay planned down)
            log.error("the network backend cannot list its addresses: %s: %s", type(e).__name__, e)

    def maybe_serving(self) -> bool:
        """Whether anything may be served here now (for the session keeper, before it drops a session)."""
        self._read_addresses()
        known = self._read_target(self.clock.now())
        return not known or bool(self._exported or self._addresses)

    # --- one cycle ---------------------------------------------------------------------------------------
    def cycle(self, stopping: bool = False) -> tuple[CycleReport, float | None, bool]:
        """One snapshot -> plan -> apply pass. Returns the report, when to look again at the latest, and
        whether something took effect (then the caller plans again at once). Each pass, also one that
        fails, is timed (``pathagent_cycle_seconds``) and ends by publishing the metrics' state."""
        started = self.clock.now()
        try:
            return self._cycle(stopping)
        finally:
            self.metrics.observe_cycle(self.clock.now() - started)
            self.metrics.publish(self.report, self._planned_view, self._exported, self._addresses,
                                 node_fence_failures=self.duties.failures)

    def _cycle(self, stopping: bool) -> tuple[CycleReport, float | None, bool]:
        now = self.clock.now()
        self._beat()
        self.fencer.check()
        session = self.keeper.session
        if session is not None and self.fencer.fenced and now < self.fencer.serve_until and not stopping:
            try:
                self.watcher.refresh()              # our view may predate a partition
            except CoordinationError as e:
                # The lease is valid: whatever is served here is either covered by it (an adopted session
                # after a restart) or already fenced. Planning now would tear down what may stay: retry.
                log.warning("lease valid, but the keys cannot be read before serving: %s; retrying", e)
                return self.report, now + 0.5, False
            self.fencer.unfence()
        fenced = self.fencer.fenced
        view = self.watcher.latest()
        if view is None:
            if session is not None and not fenced and not stopping:
                return self.report, None, False     # no view of the keys yet: plan nothing from nothing
            view = ClusterView()
        if not self._threads_running:
            self.definitions.load(view)             # single-threaded use (tests, tools): read inline
        defs, bad = self.definitions.current()
        self._read_addresses()
        known = self._read_target(now)
        if not known and self._target_unknown_since is not None and \
                now - self._target_unknown_since >= TARGET_UNKNOWN_FENCE and not fenced:
            self.fencer.fence(f"the target backend could not say what it serves for "
                              f"{now - self._target_unknown_since:.0f}s")
            self._target_unknown_since = now
            fenced = self.fencer.fenced
            self._read_addresses()
            known = self._read_target(now)
            self._fenced_blind = not known and self.fencer.done
        if known:
            self._fenced_blind = False
        elif self._fenced_blind:
            # the target still cannot tell, but a completed fence stopped its data path and nothing was
            # exported since: nothing is served, so its paths may be given up (they back off and surrender)
            known, self._exported = True, frozenset()
        self._own = {p: st for p, st in self._own.items()
                     if p in view.paths and view.paths[p].modify_index < st.modify_index}
        self._own_node = self._own_node and view.nodes.get(self.node) != session and session is not None
        if self._own_leader is not None and (view.index >= self._own_leader[1] or self._own_leader[0] != session):
            self._own_leader = None             # the view shows our write (or what came after it)
        self._own_moves = {p: m for p, m in self._own_moves.items() if view.index <= m[1]}
        moves: dict[PathKey, tuple[str, str] | None] = {
            p: (None if t is None or session is None else (t, session)) for p, (t, _) in self._own_moves.items()}
        view = overlay(view, self._own, self.node, session if self._own_node else None,
                       self._own_leader[0] if self._own_leader else None, moves)
        self._view_index = view.index
        self._track(view, defs, session, now)
        self._check_backends(view)
        self.failovers.observe(view, session, now)
        self._planned_view = view
        snap = Snapshot(node=self.node, session=session, view=view, definitions=defs, exported=self._exported,
                        addresses=self._addresses, applied=self._applied, target_known=known, fenced=fenced,
                        stopping=stopping, now=now, backoff=dict(self.backoff.until),
                        surrender=self.backoff.surrendering(now) & view.held_by(session),
                        free_since=self._free_since, grace=self.cfg.placement_grace,
                        settle_until=self.keeper.settle_until, fencing_required=self.duties.required,
                        weight=self.cfg.node_weight, identity=self.duties.identity(),
                        lock_delay=self.cfg.consul.lock_delay, orphan_since=self._orphan_since,
                        fence_hold=self.cfg.consul.fence_after + serving_bound(self.cfg)[0],
                        fence_busy=self.duties.busy(), live_since=self._live_since,
                        rebalance_after=self.cfg.rebalance_after, move_since=self._move_since,
                        move_timeout=self.cfg.move_timeout, max_moves=self.cfg.max_moves,
                        lockable=frozenset(self._lockable), claimable_since=self._claimable_since,
                        prefix=self.store.prefix, leader_free_since=self._leader_free_since or now)
        plan = planner.plan(snap)
        fx = self.applier.apply(plan, session, lambda: self.keeper.session, stopping)
        if not self._threads_running:
            self.duties.run_pending()               # single-threaded use (tests, tools): fence inline
            self.logins.run_due()                   # and publish the logins inline
        self._absorb(fx, session)
        self.failovers.acquired(fx.acquired)
        for seconds in self.failovers.served(self._exported & self._addresses, self.clock.now()):
            self.metrics.observe_failover(seconds)
        self.metrics.count_acquire_failures(fx.acquire_failures)
        self.cycles += 1
        planned: dict[str, int] = {}
        for a in plan.actions:
            planned[type(a).__name__.lower()] = planned.get(type(a).__name__.lower(), 0) + 1
        applied = (len(fx.acquired) + len(fx.released) + len(fx.exported) + len(fx.unexported) + len(fx.up)
                   + len(fx.down) + int(fx.node_record))
        self.report = CycleReport(
            cycle=self.cycles, node=self.node, session=session, fenced=self.fencer.fenced,
            lease_left=None if session is None else self.fencer.serve_until - self.clock.now(),
            held=len(snap.held()), exported=frozenset(str(p) for p in self._exported),
            addresses=len(self._addresses), free=len(view.free()), paths=len(view.paths), nodes=len(view.nodes),
            disks=len(view.disks), bad_disks=bad, target_known=known,
            disk_names={d: defs[d].name for d in bad if d in defs}, planned=planned, applied=applied,
            failed=fx.failed, interrupted=fx.interrupted, backing_off=len(planner.blocked(snap)),
            fence_events=self.fencer.events, fence_reason=self.fencer.last_reason, takeovers=self.takeovers,
            watchdog_error=self.keeper.watchdog_error, backend=self.cfg.target.backend, wall=self.clock.wall(),
            leader=session is not None and view.leader == session, drained=self.node in view.drained,
            fences_done=self.duties.fences, fence_error=self.duties.last_error,
            waiting_fence=session is not None and planner.must_wait_fence(snap))
        line = self.report.summary()
        if planned or self.report.state_line() != self._last_summary:
            log.info("cycle %d: %s", self.cycles, line)
        self._last_summary = self.report.state_line()
        self.state.record_status(self.report.status(os.getpid()))
        wake = [t for t in (plan.wake_at, fx.retry_at) if t is not None]
        return self.report, min(wake) if wake else None, fx.progressed() or fx.replan

    def _check_backends(self, view: ClusterView) -> None:
        """One warning when the live gateways start running different target backends (and whenever which
        run which changes), one line when they agree again: initiators would see a disk's paths on different
        LUNs."""
        by = view.backends()
        mixed = by if len(by) > 1 else {}
        if mixed and mixed != self._mixed:
            log.warning("the live gateways run different target backends (%s): initiators see the paths of a "
                        "disk on different LUNs; run one backend on every gateway (docs/upgrades.md)",
                        "; ".join(f"{b} on {', '.join(ns)}" for b, ns in mixed.items()))
        elif self._mixed and not mixed:
            log.info("the live gateways run one target backend again (%s)", ", ".join(by) or "none recorded")
        self._mixed = mixed

    def _track(self, view: ClusterView, defs: Mapping[str, Disk], session: str | None, now: float) -> None:
        """Local timing facts: when each free path was first seen free; held paths with no definition."""
        for p, st in view.paths.items():
            if st.session is None:
                self._free_since.setdefault(p, now)
                waits = (self.duties.required and st.orphan_of is not None
                         and view.fenced.get(st.orphan_of, 0) <= st.modify_index)
                if waits:
                    self._claimable_since.pop(p, None)
                else:
                    self._claimable_since.setdefault(p, now)
            else:
                self._free_since.pop(p, None)
                self._claimable_since.pop(p, None)
        for p in [p for p in self._free_since if p not in view.paths]:
            del self._free_since[p]
        for p in [p for p in self._claimable_since if p not in view.paths]:
            del self._claimable_since[p]
        for n, rec in view.records.items():
            if rec.orphaned():
                self._orphan_since.setdefault(n, now)
            else:
                self._orphan_since.pop(n, None)
        for n in [n for n in self._orphan_since if n not in view.records]:
            del self._orphan_since[n]
        for n in view.nodes:
            self._live_since.setdefault(n, now)
        for n in [n for n in self._live_since if n not in view.nodes]:
            del self._live_since[n]
        if view.leader is None:
            self._leader_free_since = self._leader_free_since or now
        else:
            self._leader_free_since = None
        groups = {st.modify_index for st in view.paths.values() if st.orphan_of is not None and st.session is None}
        self._lockable &= groups
        for p, sid in view.move_holders.items():
            if sid == session:
                self._move_since.setdefault(p, now)
        for p in [p for p in self._move_since if view.move_holders.get(p) != session]:
            del self._move_since[p]
        undefined = frozenset(p for p in view.held_by(session) if p.disk not in defs
                              or defs[p.disk].path(p.index) is None)
        self.backoff.note_unserviceable(undefined, now)
        self.backoff.prune(frozenset(view.paths), now)

    def _absorb(self, fx: Effects, session: str | None) -> None:
        """Fold what took effect into the local facts for the next cycle."""
        for p, mi in fx.acquired.items():
            if session is not None:
                self._own[p] = PathState(p, mi, session, self.node, None, fx.peers.get(p, ()))
        self.takeovers += len(fx.acquired)
        self._lockable |= fx.acquired_from
        for p, mi in fx.released.items():
            self._own[p] = PathState(p, mi, None, None, None, fx.peers.get(p, ()))
        if fx.node_record:
            self._own_node = True
        if fx.leader and session is not None:
            self._own_leader = (session, fx.leader)
        for p, t in fx.moved.items():
            self._own_moves[p] = (t, self._view_index)
        if fx.exported:
            self._fenced_blind = False
        for p, d in fx.exported.items():
            self._applied[p] = d
        self._exported = (self._exported | frozenset(fx.exported)) - frozenset(fx.unexported)
        for p in fx.unexported:
            self._applied.pop(p, None)
        self._addresses = (self._addresses | frozenset(fx.up)) - frozenset(fx.down)

    # --- threads -----------------------------------------------------------------------------------------
    def _guarded(self, name: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            while not self._halt.is_set():
                try:
                    body()
                    return
                except Exception:  # noqa: BLE001 - a dead fencer, watcher or confirmer would be silent
                    log.exception("%s thread failed; restarting it in 1s", name)
                    self._halt.wait(1.0)
        return threading.Thread(target=run, name=name, daemon=True)

    def start_threads(self) -> None:
        threads = [self._guarded("fencer", self.fencer.run),
                   self._guarded("confirm", lambda: self.keeper.run(self._halt)),
                   self._guarded("liveness", lambda: self.keeper.run_liveness(self._halt)),
                   self._guarded("watch", lambda: self.watcher.run(self._halt)),
                   self._guarded("catalog", lambda: self.definitions.run(self._halt)),
                   self._guarded("duties", lambda: self.duties.run(self._halt)),
                   self._guarded("logins", lambda: self.logins.run(self._halt))]
        self._threads_running = True
        for t in threads:
            t.start()

    # --- main --------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until ``stop()`` or ``detach()``. Exports inherited from an earlier agent process stay until
        that process's recorded deadline, and no longer, unless this one adopts its session first."""
        self.state.lock()
        now = self.clock.now()
        inherited = self.state.serve_until(now, boot_id(), self.cfg.consul.fence_after)
        if not self.maybe_serving():
            self.fencer.nothing_served()
        elif inherited > now:
            log.info("keeping what the previous agent process serves for %.1fs at most, unless its session is "
                     "adopted before", inherited - now)
        self.fencer.extend(inherited)
        self.start_threads()
        retry = 0.5
        immediate = 0
        try:
            while True:
                if self._stop_mode == "detach":
                    # one last confirmation: the next process gets the whole fence_after to adopt the
                    # session before the watchdog (and its own fencer) would stop the data path
                    self.keeper.confirm_once()
                    log.info("detaching: leaving session %s, %d exports and the armed watchdog for the next "
                             "agent process (it must confirm within %.1fs)", (self.keeper.session or "none")[:8],
                             len(self._exported), max(0.0, self.fencer.serve_until - self.clock.now()))
                    return
                if self._stop_mode == "release":
                    self.notifier.stopping()
                    self.shutdown()
                    return
                try:
                    if not self.node:
                        self.set_node(self.resolve_node())
                    if self.keeper.session is None:
                        self.keeper.establish(self.maybe_serving)
                        self.wakeup.wake()
                    report, wake_at, again = self.cycle()
                    retry = 0.5
                except ConfigError:
                    raise
                except Exception as e:  # noqa: BLE001 - nothing one cycle meets ends the agent
                    if isinstance(e, AgentError):
                        log.warning("cycle failed: %s; retrying in %.1fs", e, retry)
                    else:
                        log.exception("cycle failed (a bug); retrying in %.1fs", retry)
                    self.notifier.watchdog()        # the loop runs (it is Consul that does not answer)
                    self.wakeup.wait(retry)
                    retry = min(retry * 2, 5.0)
                    continue
                if self.keeper.session is not None and not self._ready:
                    self._ready = True
                    self.notifier.ready(f"serving as {self.node}")
                if self.healthy():
                    self.notifier.watchdog()
                immediate = immediate + 1 if again else 0
                if again and immediate <= MAX_IMMEDIATE:
                    continue                        # plan again at once (an export done: bring it up)
                now = self.clock.now()
                limit = HEARTBEAT if self.notifier.interval <= 0 else min(HEARTBEAT, self.notifier.interval / 2)
                until = min(now + limit, wake_at if wake_at is not None else now + limit)
                self.wakeup.wait(max(0.0, until - now))
        finally:
            self._halt.set()
            self.fencer.stop()
            self.definitions.poke()
            self.duties.poke()
            self.state.unlock()

    def shutdown(self) -> None:
        """Take every address down and unexport everything, release every lock, delete our logins report,
        destroy the session, and disarm the watchdog. If something may still be served, the data path is
        fenced first; if even then the backends cannot confirm that nothing is served, the session, its
        locks and the logins report are kept (Consul's lock-delay then protects the paths once it expires)
        and the watchdog stays armed."""
        log.info("stopping: taking every address down, unexporting everything, releasing every lock")
        for attempt in range(3):
            try:
                report, _, _ = self.cycle(stopping=True)
            except Exception as e:  # noqa: BLE001
                log.warning("stop cycle: %s", e)
                continue
            if report.target_known and not self._exported and not self._addresses and not report.held:
                break
            if attempt == 1:
                self.fencer.fence("stopping, and the paths would not come down one by one")
        left = self.maybe_serving()
        if left:
            log.error("something may still be served here (%d exported, %d addresses): keeping session %s "
                      "and its locks, and the watchdog armed", len(self._exported), len(self._addresses),
                      (self.keeper.session or self.state.session() or "none")[:8])
            return
        self.logins.withdraw()          # nothing is served: nobody is logged in here any more
        try:
            self.keeper.destroy()
        except AgentError as e:
            log.warning("could not destroy the session: %s (Consul will invalidate it)", e)
        try:
            self.watchdog.disarm()
        except AgentError as e:
            log.warning("watchdog not disarmed: %s", e)
