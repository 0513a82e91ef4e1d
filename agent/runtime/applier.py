"""The applier: carries out a ``Plan`` action by action, contains every failure to its path, and reports
what took effect (``Effects``) for the next snapshot. ``PathBackoff`` keeps the per-path failure record.

Rules on top of the plan's order (agent.core.planner):

- before an acquire or an export the lease is checked again (the plan may be old by then), and an
  address is brought up only through ``Fencer.bring_up`` (lease checked under the fence's lock): after
  the deadline, or once our session changed, the rest of the plan is dropped and the loop plans again;
- a path whose address could not be taken down, or whose unexport failed, is not released in that run
  (``Release`` means nothing of it is served here any more);
- a path released in this plan: the network backend's ``connections()`` to its address, read right
  before its address-down, are written into the released key (``tree.release_value``), and the node that
  takes it over tickles them after its ``AddressUp`` (``NetworkBackend.tickle``; docs/placement.md); an
  acquire that carries such connections runs alone (its lock value is its own);
- acquires run in batches of 32 per transaction; a batch that is rolled back (a path changed meanwhile)
  is retried one path at a time; a refusal because of a lock-delay asks for another look in a second;
- applying stops after ``budget`` seconds so that a long plan never runs on a stale snapshot: the loop
  plans again at once;
- every acquire that does not take effect is counted in ``Effects.acquire_failures`` under one of
  ``ACQUIRE_FAILURE_REASONS`` (``refusal_reason``): a refused transaction once per path (a batch that is
  rolled back is not counted: its paths are retried one by one and those retries are), a Consul call that
  failed once.

Every log line names its path through ``label`` (``d15c0001/1 (vm)``: with the disk's display name where
its definition is known).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.backend import NetworkBackend, TargetBackend
from agent.core.model import (Acquire, AcquireLeader, Action, AddressDown, AddressUp, CleanUp, Disk, EndMove,
                              Export, FenceNode, LockNodeRecord, PathKey, Peer, Plan, Release, RequestMove,
                              Unexport)
from agent.core.store import CoordinationStore, TxnResult
from agent.core.tree import leader_value, lock_value, move_value, node_value, release_value
from agent.errors import CoordinationError, TransientBackendError
from agent.runtime.clock import Clock
from agent.runtime.fencer import Fenced, Fencer

log = logging.getLogger(__name__)

ACQUIRE_BATCH = 32
SURRENDER_AFTER = 3          # consecutive failures of one path before this node gives it up
SURRENDER_BLOCK = 30.0       # then it does not take that path back for this long
UNSERVICEABLE_AFTER = 30.0   # a held path this node has no definition for is given up after this long
MAX_BACKOFF = 30.0
LOCK_DELAY_RETRY = 0.2       # a lock refused for its lock-delay is tried again this soon (failover time)

#: why an acquire did not take effect (the ``reason`` label of ``pathagent_acquire_failures_total``):
#: the key's lock-delay has not expired; another session holds the lock; the key changed or is gone since it
#: was observed; our session is not valid (any more); Consul did not answer; anything else
ACQUIRE_FAILURE_REASONS = ("lock_delay", "held", "changed", "session", "consul", "other")


def refusal_reason(res: TxnResult) -> str:
    """The ``ACQUIRE_FAILURE_REASONS`` entry for a refused lock transaction (Consul's error texts)."""
    what = " ".join(w for _, w in res.errors)
    if res.lock_delay():
        return "lock_delay"
    if "already held" in what:
        return "held"
    if "index" in what:
        return "changed"
    if "invalid session" in what:
        return "session"
    return "other"


@dataclass
class PathBackoff:
    """Failures per path: a path backs off (exponentially, or for a transient error's own delay) and after
    ``SURRENDER_AFTER`` failures in a row it is surrendered (released for another node to try), then not
    taken back for ``SURRENDER_BLOCK`` seconds."""

    failures: dict[PathKey, int] = field(default_factory=dict)
    until: dict[PathKey, float] = field(default_factory=dict)
    unserviceable: dict[PathKey, float] = field(default_factory=dict)

    def fail(self, path: PathKey, now: float, error: Exception) -> float:
        n = self.failures.get(path, 0) + 1
        self.failures[path] = n
        delay = error.retry_after if isinstance(error, TransientBackendError) else 2.0 ** n
        self.until[path] = now + min(delay, MAX_BACKOFF)
        return self.until[path] - now

    def ok(self, path: PathKey) -> None:
        self.failures.pop(path, None)
        self.until.pop(path, None)

    def surrendering(self, now: float) -> frozenset[PathKey]:
        return frozenset({p for p, n in self.failures.items() if n >= SURRENDER_AFTER}
                         | {p for p, t in self.unserviceable.items() if now - t >= UNSERVICEABLE_AFTER})

    def surrendered(self, path: PathKey, now: float) -> None:
        self.failures.pop(path, None)
        self.unserviceable.pop(path, None)
        self.until[path] = now + SURRENDER_BLOCK

    def note_unserviceable(self, held_without_definition: frozenset[PathKey], now: float) -> None:
        for p in held_without_definition:
            self.unserviceable.setdefault(p, now)
        for p in [p for p in self.unserviceable if p not in held_without_definition]:
            del self.unserviceable[p]

    def prune(self, known: frozenset[PathKey], now: float) -> None:
        """Forget paths that no longer exist and backoffs long over."""
        for p in [p for p, t in self.until.items() if p not in known or (t <= now and p not in self.failures)]:
            del self.until[p]
        for p in [p for p in self.failures if p not in known]:
            del self.failures[p]


@dataclass
class Effects:
    """What a run of the applier changed."""

    acquired: dict[PathKey, int] = field(default_factory=dict)     # path -> ModifyIndex after our lock
    acquired_from: set[int] = field(default_factory=set)           # the ModifyIndexes they had before
    released: dict[PathKey, int] = field(default_factory=dict)
    peers: dict[PathKey, tuple[Peer, ...]] = field(default_factory=dict)   # the connections those values record
    exported: dict[PathKey, Disk] = field(default_factory=dict)
    unexported: set[PathKey] = field(default_factory=set)
    up: set[PathKey] = field(default_factory=set)
    down: set[PathKey] = field(default_factory=set)
    node_record: bool = False
    leader: int = 0                     # we took the leader key: its ModifyIndex then
    moves: int = 0                      # move requests made or ended (as the leader)
    moved: dict[PathKey, str | None] = field(default_factory=dict)   # path -> target (None: ended)
    failed: int = 0
    acquire_failures: dict[str, int] = field(default_factory=dict)   # reason -> count (ACQUIRE_FAILURE_REASONS)
    retry_at: float | None = None       # look again then (a lock-delay refusal, Consul not answering)
    interrupted: str = ""               # why the rest of the plan was dropped
    replan: bool = False                # plan again at once (the plan went stale while applying)

    def progressed(self) -> bool:
        return bool(self.acquired or self.released or self.exported or self.unexported or self.up
                    or self.down or self.node_record or self.leader or self.moves)


class Applier:
    def __init__(self, store: CoordinationStore, target: TargetBackend, network: NetworkBackend, fencer: Fencer,
                 clock: Clock, node: str, backend_name: str, backoff: PathBackoff,
                 beat: Callable[[], None] = lambda: None, budget: float = 1.0,
                 fence_node: Callable[[FenceNode, str], None] | None = None,
                 record: Callable[[], tuple[float, Mapping[str, Any]]] = lambda: (1.0, {}),
                 label: Callable[[PathKey], str] = str) -> None:
        """``label``: how log lines name a path (``DefinitionCache.label``: with its disk's name)."""
        self.store = store
        self.target = target
        self.network = network
        self.fencer = fencer
        self.clock = clock
        self.node = node
        self.backend_name = backend_name
        self.backoff = backoff
        self.beat = beat
        self.budget = budget
        self.fence_node = fence_node
        self.record = record            # (weight, identity) that our node record publishes
        self.label = label

    def apply(self, plan: Plan, session: str | None, current: Callable[[], str | None],
              stopping: bool = False) -> Effects:
        """Carry out ``plan`` for ``session``; ``current()`` tells whether the session is still ours (it is
        re-read before each step that starts serving)."""
        fx = Effects()
        start = self.clock.now()
        not_down: set[PathKey] = set()
        releasing = {a.path for a in plan.actions if isinstance(a, Release)}
        handed: dict[PathKey, tuple[Peer, ...]] = {}     # connections to the address of a path released now
        acquires = [a for a in plan.actions if isinstance(a, Acquire) and not a.peers]
        batched: set[PathKey] | None = None
        for a in plan.actions:
            self.beat()
            if not stopping and self.clock.now() - start > self.budget:
                fx.interrupted, fx.replan = f"applying for more than {self.budget:g}s", True
                break
            if isinstance(a, (Acquire, Export, AddressUp, LockNodeRecord, AcquireLeader, FenceNode, RequestMove)) \
                    and not stopping:
                if current() != session or session is None or not self.fencer.allowed():
                    fx.interrupted, fx.replan = "the lease or the session changed", True
                    break
            try:
                if isinstance(a, Acquire):
                    assert session is not None
                    if batched is None:
                        batched = self._acquire_batches(acquires, session, fx)
                    if a.path not in batched:
                        self._acquire_one(a, session, fx)
                elif isinstance(a, Release):
                    if a.path in not_down:
                        log.error("keeping %s locked: it may still be served here", self.label(a.path))
                        continue
                    if session is not None:
                        self._release(a.path, session, fx, handed.get(a.path, ()))
                elif isinstance(a, LockNodeRecord):
                    assert session is not None
                    self._lock_node_record(session, fx)
                elif isinstance(a, AcquireLeader):
                    assert session is not None
                    self._acquire_leader(session, fx)
                elif isinstance(a, FenceNode):
                    if session is not None and self.fence_node is not None:
                        self.fence_node(a, session)
                elif isinstance(a, RequestMove):
                    assert session is not None
                    res = self.store.request_move(a.path, session, move_value(a.node))
                    if res.ok:
                        fx.moves += 1
                        fx.moved[a.path] = a.node
                        log.info("leader: moving %s to %s (balance)", self.label(a.path), a.node)
                    else:
                        log.info("leader: move of %s refused: %s", self.label(a.path), res.reason())
                elif isinstance(a, CleanUp):
                    if session is not None and self.store.clean_up(a.key, a.modify_index, session).ok:
                        fx.moves += 1
                        log.info("leader: removed the leftover key %s", a.key)
                elif isinstance(a, EndMove):
                    if session is not None and self.store.end_move(a.path, session).ok:
                        fx.moves += 1
                        fx.moved[a.path] = None
                        log.info("leader: move request of %s ended", self.label(a.path))
                elif isinstance(a, AddressDown):
                    if a.path in releasing and a.path not in handed:
                        handed[a.path] = self._connections(a)
                    if not self._guarded(a, lambda: self.network.down(a.path, a.spec), fx):
                        not_down.add(a.path)
                    else:
                        fx.down.add(a.path)
                        log.info("address of %s down%s", self.label(a.path), f": {a.spec.ip}" if a.spec else "")
                elif isinstance(a, Unexport):
                    if not self._guarded(a, lambda: self.target.unexport(a.path), fx):
                        not_down.add(a.path)
                    else:
                        fx.unexported.add(a.path)
                        log.info("unexported %s", self.label(a.path))
                elif isinstance(a, Export):
                    if self._guarded(a, lambda: self.target.export(a.path, a.disk), fx, backoff=True):
                        fx.exported[a.path] = a.disk
                        self.backoff.ok(a.path)
                        spec = a.disk.path(a.path.index)
                        log.info("exported %s as %s%s", self.label(a.path), a.disk.iqn,
                                 f" on {spec.ip}/{spec.prefix}" if spec else "")
                elif isinstance(a, AddressUp):
                    try:
                        if self._guarded(a, lambda: self.fencer.bring_up(a.path, a.spec), fx, backoff=True):
                            fx.up.add(a.path)
                            log.info("address of %s up: %s/%d", self.label(a.path), a.spec.ip, a.spec.prefix)
                            if a.peers:
                                self._tickle(a)
                    except Fenced as e:
                        fx.interrupted, fx.replan = str(e), True
                        break
            except CoordinationError as e:
                p = getattr(a, "path", None)
                log.warning("%s %s: %s", type(a).__name__, self.label(p) if isinstance(p, PathKey) else "", e)
                fx.failed += 1
                if isinstance(a, Acquire):
                    fx.acquire_failures["consul"] = fx.acquire_failures.get("consul", 0) + 1
                fx.interrupted = "Consul did not answer"
                fx.retry_at = self.clock.now() + 1.0     # not at once: it would only hammer an absent Consul
                break
        return fx

    def _guarded(self, a: Action, call: Callable[[], None], fx: Effects, backoff: bool = False) -> bool:
        """Run one backend call; a failure (a ``BackendError`` or a plugin bug) is logged and contained."""
        try:
            call()
            return True
        except Fenced:
            raise
        except Exception as e:  # noqa: BLE001 - contained per path (BackendError or a plugin bug)
            fx.failed += 1
            p = getattr(a, "path")
            wait = self.backoff.fail(p, self.clock.now(), e) if backoff else 0.0
            log.error("%s %s failed (%s)%s: %s", _verb(a), self.label(p), type(e).__name__,
                      f", retrying in {wait:.0f}s" if backoff else "", e)
            return False

    def _acquire_batches(self, acquires: list[Acquire], session: str, fx: Effects) -> set[PathKey]:
        done: set[PathKey] = set()
        if len(acquires) < 2:
            return done
        value = lock_value(self.node, session, self.clock.wall())
        for i in range(0, len(acquires), ACQUIRE_BATCH):
            batch = acquires[i:i + ACQUIRE_BATCH]
            res = self.store.acquire_many([(a.path, a.modify_index) for a in batch], session, value)
            if not res.ok:
                continue
            for a, r in zip(batch, res.results[1::2]):
                fx.acquired[a.path] = r.modify_index
                fx.acquired_from.add(a.modify_index)
                done.add(a.path)
            log.info("acquired %d paths in one transaction: %s", len(batch),
                     ", ".join(self.label(a.path) for a in batch))
        return done

    def _acquire_one(self, a: Acquire, session: str, fx: Effects) -> None:
        res = self.store.acquire_many([(a.path, a.modify_index)], session,
                                      lock_value(self.node, session, self.clock.wall(), a.peers))
        if not res.ok:
            log.info("acquire %s refused: %s", self.label(a.path), res.reason())
            why = refusal_reason(res)
            fx.acquire_failures[why] = fx.acquire_failures.get(why, 0) + 1
            if res.lock_delay():
                fx.retry_at = self.clock.now() + LOCK_DELAY_RETRY
            return
        fx.acquired[a.path] = res.results[-1].modify_index if res.results else a.modify_index
        fx.acquired_from.add(a.modify_index)
        if a.peers:
            fx.peers[a.path] = a.peers
        log.info("acquired %s%s", self.label(a.path),
                 f" with {len(a.peers)} connection(s) its previous owner left open" if a.peers else "")

    def _release(self, path: PathKey, session: str, fx: Effects, peers: tuple[Peer, ...] = ()) -> None:
        res = self.store.release(path, session, release_value(peers))
        if res.ok:
            fx.released[path] = res.results[-1].modify_index if res.results else 0
            if peers:
                fx.peers[path] = peers
            log.info("released %s%s", self.label(path),
                     f" ({len(peers)} connection(s) recorded for the next owner)" if peers else "")
            if path in self.backoff.surrendering(self.clock.now()):
                self.backoff.surrendered(path, self.clock.now())
                log.warning("gave up %s; not taking it back for %.0fs", self.label(path), SURRENDER_BLOCK)

    def _connections(self, a: AddressDown) -> tuple[Peer, ...]:
        """The network backend's connections to the address of ``a.path`` (none on any error: advisory)."""
        try:
            return tuple(self.network.connections(a.path, a.spec))
        except Exception as e:  # noqa: BLE001 - a plugin bug costs the next owner's tickle, nothing more
            log.warning("connections to the address of %s not read (%s): %s", self.label(a.path),
                        type(e).__name__, e)
            return ()

    def _tickle(self, a: AddressUp) -> None:
        """Tickle the connections the previous owner of ``a.path`` left open (errors are logged only: the
        initiators then notice by their own timeouts, as after a crash)."""
        try:
            self.network.tickle(a.path, a.spec, a.peers)
            log.info("tickling %d connection(s) left open to %s by its previous owner", len(a.peers), a.spec.ip)
        except Exception as e:  # noqa: BLE001 - advisory
            log.warning("tickle of %s failed (%s): %s", self.label(a.path), type(e).__name__, e)

    def _acquire_leader(self, session: str, fx: Effects) -> None:
        res = self.store.acquire_leader(session, leader_value(self.node, session, self.clock.wall()))
        if res.ok:
            fx.leader = res.results[-1].modify_index if res.results else 1
            log.info("this node is now the cluster leader")
        elif res.lock_delay():
            fx.retry_at = self.clock.now() + LOCK_DELAY_RETRY

    def _lock_node_record(self, session: str, fx: Effects) -> None:
        weight, identity = self.record()
        res = self.store.lock_node_record(self.node, session,
                                          node_value(self.node, session, self.clock.wall(), self.backend_name,
                                                     weight, identity))
        if res.ok:
            fx.node_record = True
        else:
            log.info("node record not locked yet: %s", res.reason())
            fx.retry_at = self.clock.now() + 1.0


def _verb(a: Action) -> str:
    return {AddressDown: "address down of", AddressUp: "address up of", Unexport: "unexport",
            Export: "export"}.get(type(a), type(a).__name__.lower())
