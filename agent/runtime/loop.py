"""The node loop: build a snapshot, plan, apply, then sleep until something changes.

Four threads:

- the *watcher* runs recursive blocking queries on ``{prefix}/`` (no fixed-interval polling) and posts
  each new tree;
- the *confirmer* reads our session with a consistent read every ``confirm_interval`` seconds; each
  success extends the lease (see ``agent.core.lease``); a missing session means it was invalidated;
- the *catalog* thread reads disk definitions (Ceph calls may block for ``[ceph] timeout``), so the main
  loop never waits on Ceph and a hung Ceph cannot delay fencing;
- the *main* loop wakes on a new tree, a lease change, a backoff or placement deadline, or a signal; it
  builds an immutable ``Snapshot``, asks ``planner.plan`` what to do, applies the actions one by one and
  logs one summary line per cycle that did something.

Failures are contained per item: a catalog error skips that disk, a backend error backs off that path,
Consul errors retry with a delay. The loop itself never dies of them.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from agent.core import keys
from agent.core import planner
from agent.backend import Catalog, NetworkBackend, TargetBackend
from agent.config import Config
from agent.adapters.consul_store import ConsulStore, KVEntry, next_index
from agent.errors import (AgentError, BackendError, CatalogError, ConfigError, CoordinationError,
                          TransientBackendError)
from agent.core.lease import Lease
from agent.core.model import (Acquire, Action, Disk, DiskRecord, Export, PathKey, PathState, Release, Snapshot,
                         Unexport)

log = logging.getLogger(__name__)

SURRENDER_AFTER = 3          # consecutive failures of one path before this node gives it up
SURRENDER_BLOCK = 30.0       # then it does not take that path back for this long
MAX_BACKOFF = 30.0
MOVE_TTL = 120.0             # a `path move` request older than this is ignored (its CLI died)


@dataclass
class Tree:
    """The parsed content of ``{prefix}/``."""

    disks: dict[str, DiskRecord] = field(default_factory=dict)
    paths: dict[PathKey, PathState] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)     # node -> session (locked node records only)
    moves: dict[PathKey, str] = field(default_factory=dict)  # pending move requests: path -> target node


def parse_tree(prefix: str, entries: list[KVEntry]) -> Tree:
    t = Tree()
    for e in entries:
        kind = keys.parse(prefix, e.key)
        if kind is None:
            continue
        what, ident = kind
        if what == "disk" and isinstance(ident, str):
            try:
                rec = json.loads(e.value or b"{}")
                t.disks[ident] = DiskRecord(ident, str(rec.get("pool", "")), str(rec.get("image", "")),
                                            e.modify_index)
            except (ValueError, AttributeError):
                t.disks[ident] = DiskRecord(ident, "", "", e.modify_index)
        elif what == "path" and isinstance(ident, PathKey):
            node = None
            if e.session and e.value:
                try:
                    node = json.loads(e.value).get("node")
                except (ValueError, AttributeError):
                    node = None
            t.paths[ident] = PathState(ident, e.modify_index, e.session, node)
        elif what == "node" and isinstance(ident, str) and e.session:
            t.nodes[ident] = e.session
        elif what == "move" and isinstance(ident, PathKey):
            try:
                target = json.loads(e.value or b"{}").get("node")
            except (ValueError, AttributeError):
                target = None
            try:
                since = float(json.loads(e.value or b"{}").get("since", 0))
            except (ValueError, AttributeError, TypeError):
                since = 0.0
            if isinstance(target, str) and time.time() - since < MOVE_TTL:
                t.moves[ident] = target     # a request older than MOVE_TTL is left over: ignored
    return t


def inherited_deadline(cfg: Config, clock: Callable[[], float] = time.monotonic) -> float:
    """Monotonic time until which exports inherited from an earlier agent process may be kept while
    this one adopts its session: that process's last confirmation (``{state.dir}/lease``) plus
    ``fence_after``. Without a record: now."""
    try:
        with open(os.path.join(cfg.state_dir, "lease"), encoding="utf-8") as f:
            confirmed_wall = float(f.read().strip())
    except (OSError, ValueError):
        return clock()
    return clock() + (confirmed_wall + cfg.consul.fence_after - time.time())


@dataclass
class Backoff:
    until: float = 0.0
    failures: int = 0


class Agent:
    """One node's agent. ``run()`` blocks until ``stop()`` (release everything) or ``detach()`` (leave
    the session and the exports in place for the next agent process to adopt)."""

    def __init__(self, cfg: Config, store: ConsulStore, catalog: Catalog, target: TargetBackend,
                 network: NetworkBackend, node: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.store = store
        self.catalog = catalog
        self.target = target
        self.network = network
        self.node = node
        self.clock = clock
        self.prefix = cfg.consul.prefix.rstrip("/")
        self.session: str | None = None
        self.lease = Lease(cfg.consul.fence_after)
        self.fenced = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._defs_wake = threading.Event()
        self._definer_running = False
        self._halt = threading.Event()
        self._stop_mode: str | None = None      # "release" | "detach"
        self._tree: Tree | None = None
        self._tree_seq = 0
        self._session_file = os.path.join(cfg.state_dir, "session")
        self._lease_file = os.path.join(cfg.state_dir, "lease")
        self._status_file = os.path.join(cfg.state_dir, "status.json")
        self._definitions: dict[str, Disk] = {}
        self._catalog_errors: dict[str, str] = {}
        self._applied: dict[PathKey, Disk] = {}
        self._backoff: dict[PathKey, Backoff] = {}
        self._free_since: dict[PathKey, float] = {}
        self._watch_error: str | None = None
        self._confirm_error: str | None = None
        self._node_record_locked = False
        self._settle_until = 0.0
        self._retry_at = float("inf")
        self._last_exported = 0
        self._last_summary = ""
        self.cycles = 0
        self._threads: list[threading.Thread] = []

    # --- control ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Orderly shutdown: unexport everything, release every lock, destroy the session."""
        self._stop_mode = self._stop_mode or "release"
        self._wake.set()

    def detach(self) -> None:
        """Planned restart: exit leaving the session, locks and exports for the next process to adopt."""
        self._stop_mode = self._stop_mode or "detach"
        self._wake.set()

    # --- threads ---------------------------------------------------------------------------------------
    def _guarded(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        """Run a thread's loop; a bug in one pass is logged and the thread carries on after a pause
        (a dead watcher or confirmer would silently freeze this node's view or its fencing)."""
        def run() -> None:
            while not self._halt.is_set():
                try:
                    body()
                    return
                except Exception:  # noqa: BLE001 - keep the thread alive whatever happens
                    log.exception("%s thread failed; restarting it in 1s", name)
                    self._halt.wait(1.0)
        return run

    def _watch(self) -> None:
        index = 0
        delay = 0.5
        while not self._halt.is_set():
            try:
                got, entries = self.store.read_tree(index, self.cfg.consul.wait)
            except CoordinationError as e:
                if self._watch_error != str(e):
                    log.warning("watch: %s; retrying", e)
                    self._watch_error = str(e)
                self._halt.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._watch_error:
                log.info("watch: Consul reachable again")
                self._watch_error = None
            delay = 0.5
            new_index = next_index(index, got)
            if new_index == index and index != 0 and self._tree is not None:
                continue    # the wait ran out with no change
            tree = parse_tree(self.prefix, entries)
            with self._lock:
                self._tree = tree
                self._tree_seq += 1
            index = new_index
            self._defs_wake.set()
            self._wake.set()

    def _confirm_once(self) -> None:
        """One consistent read of our session. Extends the lease or declares the session lost."""
        sid = self.session
        if sid is None:
            return
        sent = self.clock()
        sent_wall = time.time()
        try:
            info = self.store.session_info(sid)
        except CoordinationError as e:
            if self._confirm_error != str(e):
                log.warning("session %s not confirmed: %s", sid[:8], e)
                self._confirm_error = str(e)
            return
        self._confirm_error = None
        with self._lock:
            if self.session != sid:
                return
            if info is None:
                log.error("session %s is gone (invalidated by Consul): fencing and starting over", sid[:8])
                self.session = None
                self.lease = self.lease.reset()
            else:
                self.lease = self.lease.confirm(sent)
                self._record_lease(sent_wall)
                if not self.fenced:
                    return          # routine confirmation: nothing for the main loop to do
        self._wake.set()

    def _confirmer(self) -> None:
        while not self._halt.is_set():
            self._confirm_once()
            self._halt.wait(self.cfg.consul.confirm_interval)

    # --- session ---------------------------------------------------------------------------------------
    def _read_recorded_session(self) -> str | None:
        try:
            with open(self._session_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def _record_session(self, sid: str | None) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        tmp = self._session_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(sid or "")
        os.replace(tmp, self._session_file)

    def _record_lease(self, confirmed_wall: float) -> None:
        """Persist the wall-clock time of the newest confirmation, so that the next agent process knows
        how long the exports it inherits may still be served without a confirmation of its own."""
        try:
            tmp = self._lease_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(f"{confirmed_wall:.3f}")
            os.replace(tmp, self._lease_file)
        except OSError as e:
            log.debug("lease record not written: %s", e)

    def _inherited_deadline(self) -> float:
        return inherited_deadline(self.cfg, self.clock)

    def _establish_session(self) -> None:
        """Adopt our earlier session if it is still valid, else destroy stale ones and create a new one."""
        name = self.cfg.consul.session_name
        sent = self.clock()
        sent_wall = time.time()
        ours = [s for s in self.store.node_sessions(self.node) if s.name == name]
        recorded = self._read_recorded_session()
        adopted = next((s.id for s in ours if s.id == recorded), None)
        for s in ours:
            if s.id != adopted:
                log.info("destroying stale session %s of node %s", s.id[:8], self.node)
                self.store.destroy_session(s.id)
        if adopted:
            sid = adopted
            log.info("adopted session %s (still valid): keeping every path", sid[:8])
        else:
            sent = self.clock()
            sent_wall = time.time()
            sid = self.store.create_session(self.node, name, self.cfg.consul.checks, self.cfg.consul.lock_delay)
            self._settle_until = sent + self.cfg.placement_settle
            log.info("created session %s on node %s (checks serfHealth%s, lock-delay %gs)", sid[:8], self.node,
                     "".join(f", {c}" for c in self.cfg.consul.checks), self.cfg.consul.lock_delay)
        self._record_session(sid)
        self._record_lease(sent_wall)
        with self._lock:
            self.session = sid
            self.lease = Lease(self.cfg.consul.fence_after).confirm(sent)
            self._node_record_locked = False
        self._lock_node_record()

    def _lock_node_record(self) -> None:
        sid = self.session
        if sid is None or self._node_record_locked:
            return
        value = json.dumps({"node": self.node, "session": sid, "since": time.time(),
                            "backend": self.cfg.target.backend}).encode()
        try:
            res = self.store.lock_node_record(self.node, sid, value)
        except CoordinationError as e:
            log.warning("node record not locked: %s", e)
            return
        if res.ok:
            self._node_record_locked = True
        else:
            log.info("node record not locked yet: %s", res.reason())

    # --- definitions -----------------------------------------------------------------------------------
    def _load_definitions(self, tree: Tree) -> bool:
        """Read the definition of every started disk through the catalog. A disk whose definition cannot
        be read now keeps the last good one (what is served keeps being served) and is reported once
        per distinct problem. Returns whether the set of definitions changed."""
        with self._lock:
            prev = self._definitions
            errors = dict(self._catalog_errors)
        defs: dict[str, Disk] = {}
        for disk_id, rec in tree.disks.items():
            try:
                disk = self.catalog.get(disk_id, rec.pool, rec.image, rec.modify_index)
            except Exception as e:  # noqa: BLE001 - CatalogError, or a catalog plugin bug: never fatal
                msg = str(e) if isinstance(e, CatalogError) else \
                    f"disk {disk_id}: catalog plugin raised {type(e).__name__}: {e}"
                if errors.get(disk_id) != msg:
                    log.error("disk %s skipped: %s", disk_id, msg)
                    errors[disk_id] = msg
                if disk_id in prev:
                    defs[disk_id] = prev[disk_id]   # keep serving what already works
                continue
            if disk_id in errors:
                log.info("disk %s: definition readable again", disk_id)
                del errors[disk_id]
            defs[disk_id] = disk
        for d in [d for d in errors if d not in tree.disks]:
            del errors[d]
        with self._lock:
            self._definitions = defs
            self._catalog_errors = errors
        return defs != prev

    def _definer(self) -> None:
        """Catalog thread: re-reads definitions whenever the tree changes and at least every half
        ``[ceph] refresh``. Ceph calls can block for ``[ceph] timeout``; keeping them off the main
        loop means a hung Ceph never delays fencing or unexporting."""
        interval = max(0.5, self.cfg.ceph.refresh / 2)
        first = True
        while not self._halt.is_set():
            with self._lock:
                tree = self._tree
            if tree is not None:
                changed = self._load_definitions(tree)
                if changed or first:
                    first = False
                    self._wake.set()
            self._defs_wake.wait(interval)
            self._defs_wake.clear()

    # --- one cycle -------------------------------------------------------------------------------------
    def _snapshot(self, tree: Tree, exported: frozenset[PathKey], defs: dict[str, Disk], now: float,
                  stopping: bool) -> Snapshot:
        blocked = frozenset(p for p, b in self._backoff.items() if b.until > now)
        for p, st in tree.paths.items():
            if st.session is None:
                self._free_since.setdefault(p, now)
            else:
                self._free_since.pop(p, None)
        for p in list(self._free_since):
            if p not in tree.paths:
                del self._free_since[p]
        grace = self.cfg.placement_grace
        # the grace runs from when the path was free *and* we were done settling
        overdue = frozenset(p for p, t in self._free_since.items()
                            if now - max(t, self._settle_until) >= grace)
        serviceable = frozenset(defs)
        return Snapshot(node=self.node, session=self.session, paths=dict(tree.paths), disks=dict(tree.disks),
                        exported=exported, serviceable=serviceable, nodes=dict(tree.nodes),
                        fenced=self.fenced, stopping=stopping, blocked=blocked, overdue=overdue,
                        moves=dict(tree.moves), settling=now < self._settle_until)

    def _fail(self, path: PathKey, now: float, error: Exception) -> None:
        b = self._backoff.setdefault(path, Backoff())
        b.failures += 1
        delay = error.retry_after if isinstance(error, TransientBackendError) else 2.0 ** b.failures
        b.until = now + min(delay, MAX_BACKOFF)

    def _apply(self, action: Action, tree: Tree, defs: dict[str, Disk], now: float) -> bool:
        """Apply one action; True if it changed something. Errors are logged and contained."""
        p = action.path
        sid = self.session
        if isinstance(action, Acquire):
            if sid is None:
                return False
            value = json.dumps({"node": self.node, "session": sid, "since": int(time.time())}).encode()
            res = self.store.acquire(p, action.modify_index, sid, value)
            if not res.ok:
                log.info("acquire %s refused: %s", p, res.reason())
                if "lock delay" in res.reason():
                    self._retry_at = min(self._retry_at, now + 1.0)   # try again once the delay is over
                return False
            mi = res.results[-1].modify_index if res.results else action.modify_index
            tree.paths[p] = PathState(p, mi, sid, self.node)
            log.info("acquired %s", p)
            return True
        if isinstance(action, Export):
            disk = defs.get(p.disk)
            spec = disk.path(p.index) if disk else None
            if disk is None or spec is None:
                log.error("path %s: disk definition has no path %d; not exported", p, p.index)
                self._fail(p, now, BackendError("no such path"))
                return False
            try:
                self.target.export(p, disk)
                try:
                    self.network.up(p, spec)
                except BaseException:
                    self._undo(p)
                    raise
            except Exception as e:  # noqa: BLE001 - contained per path (BackendError or a plugin bug)
                self._fail(p, now, e)
                log.error("export %s failed (%s), retrying in %.0fs: %s", p, type(e).__name__,
                          self._backoff[p].until - now, e)
                return False
            self._backoff.pop(p, None)
            self._applied[p] = disk
            log.info("exported %s (%s, %s/%d)", p, disk.iqn, spec.ip, spec.prefix)
            return True
        if isinstance(action, Unexport):
            disk = defs.get(p.disk)
            spec = disk.path(p.index) if disk else None
            try:
                self.network.down(p, spec)
                self.target.unexport(p)
            except Exception as e:  # noqa: BLE001
                log.error("unexport %s failed (%s): %s", p, type(e).__name__, e)
                return False
            self._applied.pop(p, None)
            log.info("unexported %s", p)
            return True
        if isinstance(action, Release):
            if sid is None:
                return False
            res = self.store.release(p, sid)
            if res.ok:
                tree.paths[p] = PathState(p, res.results[-1].modify_index if res.results else 0, None)
                log.info("released %s", p)
            return res.ok
        raise AssertionError(f"unknown action {action!r}")

    def _acquire_batches(self, acquires: list[Acquire], tree: Tree) -> set[PathKey]:
        """Acquire free paths 32 to a transaction (fast start-up with many free paths). A batch that is
        rolled back (some path was taken or changed meanwhile) is left to the one-by-one path."""
        sid = self.session
        done: set[PathKey] = set()
        if sid is None or len(acquires) < 2:
            return done
        value = json.dumps({"node": self.node, "session": sid, "since": int(time.time())}).encode()
        for i in range(0, len(acquires), 32):
            batch = acquires[i:i + 32]
            try:
                res = self.store.acquire_many([(a.path, a.modify_index) for a in batch], sid, value)
            except CoordinationError as e:
                log.warning("batch acquire: %s", e)
                break
            if not res.ok:
                continue
            lock_results = res.results[1::2]
            for a, r in zip(batch, lock_results):
                tree.paths[a.path] = PathState(a.path, r.modify_index, sid, self.node)
                done.add(a.path)
            log.info("acquired %d paths in one transaction: %s", len(batch),
                     " ".join(str(a.path) for a in batch))
        return done

    def _undo(self, p: PathKey) -> None:
        try:
            self.target.unexport(p)
        except Exception as e:  # noqa: BLE001
            log.error("undo of export %s failed: %s", p, e)

    def _exported(self) -> frozenset[PathKey]:
        try:
            return self.target.exported()
        except Exception as e:  # noqa: BLE001
            raise BackendError(f"target backend cannot list its exports: {type(e).__name__}: {e}") from e

    def _check_lease(self) -> None:
        """Fence when the lease ran out (after one more synchronous confirmation, so that a process that
        was merely frozen does not fence itself); unfence when a confirmation arrived again."""
        now = self.clock()
        with self._lock:
            lease = self.lease
        if self.session is None:
            self.fenced = False
            return
        if lease.expired(now) and not self.fenced:
            self._confirm_once()
            with self._lock:
                lease = self.lease
            now = self.clock()
            if self.session is not None and lease.expired(now):
                log.error("no confirmation of session %s for %.1fs (fence_after %gs): fencing, unexporting "
                          "everything", (self.session or "")[:8],
                          now - (lease.confirmed_at or now), self.cfg.consul.fence_after)
                self.fenced = True
        elif self.fenced and not lease.expired(now):
            # Our tree may predate the partition: read it afresh before serving anything again.
            try:
                self._refresh_tree()
            except CoordinationError as e:
                log.warning("session %s confirmed again, but the keys cannot be read: %s", self.session[:8], e)
                return
            log.warning("session %s confirmed again: unfenced", self.session[:8])
            self.fenced = False

    def _refresh_tree(self) -> None:
        _, entries = self.store.read_tree()
        tree = parse_tree(self.prefix, entries)
        with self._lock:
            self._tree = tree
            self._tree_seq += 1

    def _must_stop_applying(self, sid: str | None, stopping: bool) -> bool:
        """Before an acquire or export: the session changed or the lease ran out, so re-plan first
        (unexports and releases always go on: stopping to serve is never unsafe)."""
        if stopping:
            return False
        return self.session != sid or (sid is not None and self.lease.expired(self.clock()))

    def _emergency_ips_down(self, exported: frozenset[PathKey], defs: dict[str, Disk]) -> None:
        """When fencing or after session loss, take every floating IP down before any (slower) target
        call, so initiators stop reaching this node as early as possible."""
        for p in sorted(exported):
            disk = defs.get(p.disk)
            try:
                self.network.down(p, disk.path(p.index) if disk else None)
            except Exception as e:  # noqa: BLE001
                log.error("taking the address of %s down failed: %s", p, e)

    def cycle(self, stopping: bool = False) -> tuple[list[Action], int]:
        """One snapshot -> plan -> apply pass. Returns the plan and how many actions took effect."""
        self._check_lease()
        with self._lock:
            tree = self._tree
        if tree is None:
            if self.session is not None and not self.fenced and not stopping:
                return [], 0          # no view of the keys yet: plan nothing rather than from nothing
            tree = Tree()
        if not stopping and not self._definer_running:
            self._load_definitions(tree)     # single-threaded use (tests, tools): read inline
        defs = self._definitions               # one consistent view for this cycle
        now = self.clock()
        exported = self._exported()
        snap = self._snapshot(tree, exported, defs, now, stopping)
        sid = snap.session
        if sid is not None and not snap.fenced and not stopping:
            self._lock_node_record()
        stale = frozenset(p for p in exported & snap.held()
                          if p.disk in defs and self._applied.get(p) != defs[p.disk])
        surrender = frozenset(p for p, b in self._backoff.items() if b.failures >= SURRENDER_AFTER)
        actions = planner.plan(snap, stale=stale, surrender=surrender)
        if exported and (sid is None or snap.fenced):
            self._emergency_ips_down(exported, defs)
        done = 0
        not_unexported: set[PathKey] = set()
        batched: set[PathKey] | None = None
        for a in actions:
            if isinstance(a, (Acquire, Export)) and self._must_stop_applying(sid, stopping):
                log.warning("session or lease changed while applying: re-planning")
                self._wake.set()
                break
            if isinstance(a, Acquire):
                if batched is None:
                    batched = self._acquire_batches([x for x in actions if isinstance(x, Acquire)], tree)
                    done += len(batched)
                if a.path in batched:
                    continue
            if isinstance(a, Release) and a.path in not_unexported:
                log.error("keeping %s locked: it is still exported here", a.path)
                continue
            try:
                ok = self._apply(a, tree, defs, now)
            except CoordinationError as e:
                log.warning("%s %s: %s", type(a).__name__.lower(), a.path, e)
                break
            if not ok and isinstance(a, Unexport):
                not_unexported.add(a.path)
            if ok:
                done += 1
                if isinstance(a, Release) and a.path in surrender:
                    self._backoff[a.path] = Backoff(until=now + SURRENDER_BLOCK, failures=0)
                    log.warning("gave up %s after %d failures; not taking it back for %.0fs", a.path,
                                SURRENDER_AFTER, SURRENDER_BLOCK)
        self.cycles += 1
        held = snap.held()
        summary = (f"session={(self.session or 'none')[:8]} fenced={snap.fenced} held={len(held)} "
                   f"exported={len(exported)} free={sum(1 for s in tree.paths.values() if s.session is None)} "
                   f"nodes={len(snap.nodes)} disks={len(tree.disks)} bad_disks={len(self._catalog_errors)}")
        if actions:
            kinds: dict[str, int] = {}
            for a in actions:
                kinds[type(a).__name__.lower()] = kinds.get(type(a).__name__.lower(), 0) + 1
            log.info("cycle %d: %s; planned %s, %d applied", self.cycles, summary,
                     ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), done)
        elif summary != self._last_summary:
            log.info("cycle %d: %s; nothing to do", self.cycles, summary)
        self._last_summary = summary
        self._write_status(snap, exported)
        return actions, done

    def metrics(self) -> dict[str, float]:
        """Numbers for ``agent.runtime.metrics``; reads only what the loop already keeps."""
        now = self.clock()
        tree = self._tree or Tree()
        sid = self.session
        return {
            "pathagent_up": 1,
            "pathagent_session_valid": int(sid is not None),
            "pathagent_fenced": int(self.fenced),
            "pathagent_lease_age_seconds": -1 if self.lease.confirmed_at is None else round(now - self.lease.confirmed_at, 3),
            "pathagent_paths_held": sum(1 for s in tree.paths.values() if sid is not None and s.session == sid),
            "pathagent_paths_exported": self._last_exported,
            "pathagent_paths_total": len(tree.paths),
            "pathagent_paths_free": sum(1 for s in tree.paths.values() if s.session is None),
            "pathagent_nodes_live": len(tree.nodes),
            "pathagent_disks_started": len(tree.disks),
            "pathagent_disks_invalid": len(self._catalog_errors),
            "pathagent_paths_backing_off": sum(1 for b in self._backoff.values() if b.until > now),
            "pathagent_cycles_total": self.cycles,
        }

    def _write_status(self, snap: Snapshot, exported: frozenset[PathKey]) -> None:
        self._last_exported = len(exported)
        data = {"node": self.node, "session": self.session, "fenced": snap.fenced, "pid": os.getpid(),
                "held": len(snap.held()), "exported": len(exported), "backend": self.cfg.target.backend,
                "bad_disks": dict(self._catalog_errors), "updated": time.time(),
                "lease_age": None if self.lease.confirmed_at is None else round(self.clock() - self.lease.confirmed_at, 3)}
        try:
            tmp = self._status_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self._status_file)
        except OSError as e:
            log.debug("status file not written: %s", e)

    def _next_deadline(self, now: float) -> float:
        cands = [now + self.cfg.ceph.refresh]
        if self.session is not None and not self._node_record_locked:
            cands.append(now + 1.0)      # e.g. the node record is still in its lock-delay
        d = self.lease.deadline()
        if self.session is not None and d is not None and not self.fenced:
            cands.append(d)
        cands += [b.until for b in self._backoff.values() if b.until > now]
        if self._settle_until > now:
            cands.append(self._settle_until)
        if self._retry_at != float("inf"):
            cands.append(self._retry_at)
            self._retry_at = float("inf")
        grace = self.cfg.placement_grace
        cands += [max(t, self._settle_until) + grace for t in self._free_since.values()
                  if max(t, self._settle_until) + grace > now]
        return min(cands)

    # --- main ------------------------------------------------------------------------------------------
    def run(self) -> None:
        os.makedirs(self.cfg.state_dir, exist_ok=True)
        self._threads = [threading.Thread(target=self._guarded(n, f), name=n, daemon=True)
                         for n, f in (("watch", self._watch), ("confirm", self._confirmer),
                                      ("catalog", self._definer))]
        self._definer_running = True
        for t in self._threads:
            t.start()
        retry = 0.5
        # Exports inherited from an earlier agent process stay while we adopt its session, but no longer
        # than that process's lease would have let it serve them.
        inherited_until = self._inherited_deadline()
        try:
            while True:
                if self._stop_mode == "detach":
                    log.info("detaching: leaving session %s and %d exports for the next agent process",
                             (self.session or "none")[:8], len(self._safe_exported() or ()))
                    return
                if self._stop_mode == "release":
                    self._shutdown()
                    return
                self._wake.clear()
                try:
                    if self.session is None:
                        # Without a session nothing may be served: unexport first, then start over.
                        if self.clock() >= inherited_until:
                            self.cycle()
                        self._establish_session()
                    actions, done = self.cycle()
                    retry = 0.5
                    if done and any(isinstance(a, Acquire) for a in actions):
                        continue          # export what we just acquired without waiting for the watch
                except ConfigError:
                    raise
                except (CoordinationError, BackendError) as e:
                    log.warning("cycle failed: %s; retrying in %.1fs", e, retry)
                    self._wake.wait(retry)
                    retry = min(retry * 2, 5.0)
                    continue
                now = self.clock()
                self._wake.wait(max(0.0, self._next_deadline(now) - now))
        finally:
            self._halt.set()
            self._defs_wake.set()

    def _safe_exported(self) -> frozenset[PathKey] | None:
        """What the backend exports, or ``None`` when it cannot tell."""
        try:
            return self.target.exported()
        except Exception as e:  # noqa: BLE001
            log.error("target backend cannot list its exports: %s", e)
            return None

    def _shutdown(self) -> None:
        """Unexport everything, release every lock explicitly, destroy the session. If something may
        still be exported, the session (and so every lock) is kept: Consul's lock-delay then protects
        the paths until the session expires, instead of another node serving them beside us."""
        log.info("stopping: unexporting everything and releasing every lock")
        try:
            self.cycle(stopping=True)
        except (CoordinationError, BackendError) as e:
            log.warning("stop cycle: %s", e)
        left = self._safe_exported()
        for p in sorted(left if left is not None else self._applied):
            self._apply(Unexport(p), self._tree or Tree(), self._definitions, self.clock())
        left = self._safe_exported()
        if left is None or left:
            log.error("%s still exported: keeping session %s and its locks",
                      "some paths may be" if left is None else f"{len(left)} paths are",
                      (self.session or self._read_recorded_session() or "none")[:8])
            return
        sid = self.session or self._read_recorded_session()   # also an inherited session never adopted
        if sid is not None:
            try:
                if self.session is not None:
                    self.store.release_node_record(self.node, sid)
                self.store.destroy_session(sid)
                log.info("session %s destroyed", sid[:8])
                self._record_session(None)
            except AgentError as e:
                log.warning("could not destroy session %s: %s (Consul will invalidate it)", sid[:8], e)
        self.session = None
