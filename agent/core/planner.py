"""What this node should change now: ``plan(Snapshot) -> Plan``. Pure: no I/O, no clock (the time is in the
snapshot), no logging; the same snapshot gives the same plan. Consumed by ``agent.runtime.applier``.

Serving a path here means two things, planned separately: the target backend exports it, and the
network backend has its floating IP up. The planner sees both as they are (``exported``, ``addresses``:
the backends' own views, not a memory of what was asked), so whatever is left over after a crash, a
lost target, a release or a stop is taken down.

Invariants (tests/unit/test_planner.py):

1. Nothing is served without the lock: ``Export`` and ``AddressUp`` are planned only for paths our
   session holds; without a valid, unfenced session the plan takes every address down and unexports
   everything.
2. No address without a held, exported path: ``AddressUp`` only for a path the target already exports;
   an address whose path is not held and exported is taken down.
3. Order: addresses down, then unexports, then releases, then acquires, then addresses up (of paths
   exported already), then exports. So when a node stops serving, its IPs go first; a path is released
   only after both are down (every release is preceded by an address-down of its path, even when the
   network backend does not list it, and the applier skips a release whose address-down or unexport failed
   in the same run); a path acquired now is exported by a later plan, and brought up by the one after that.
   A path handed over by a planned move keeps that order (address down, unexport, release), so its iSCSI
   connections end silently: no FIN or RST can leave once the address is gone, and the initiators are
   told by the next owner instead (the released key records the connections, the next owner's
   ``AddressUp`` carries them, and its network backend tickles them: ``NetworkBackend.tickle``). Ending
   them while the address was still up sent the initiator back at once to the old owner, which refused it,
   and libiscsi then waited up to a second before trying again (docs/placement.md). Addresses come before
   exports so that a node with hundreds of exports to make (a start, a failover) brings up each path it has
   exported at its next run, not only once every export is done: the applier stops after a second, and
   the exports alone took minutes at 333 paths per node (scripts/bench-lab).
4. Convergence: applying a plan and planning again gives nothing to do, and a plan interrupted after
   any prefix of its actions still converges when planned again.
5. A path is never acquired for a disk this node cannot serve (no definition), that is stopping, or that
   backs off; and while the target's state is unknown nothing is exported, brought up or released.
6. Fencing (when the fencing plugin requires it): a path whose holder's session ended without releasing it
   (``orphan_of``) is acquired only after the leader recorded a fence of that node newer than the key's
   invalidation; a node whose own previous session ended that way takes nothing (and does not lock its
   node record, which would erase that fact) until it has been fenced.
7. Drained nodes take no free path; the leader moves their paths away, and balances the rest, by
   planned moves (``placement.rebalance``), a few at a time, only towards nodes live for a while, and only
   while no failover is in progress.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from agent.core import placement
from agent.core import keys
from agent.core.model import (Acquire, AcquireLeader, Action, AddressDown, AddressUp, CleanUp, Disk, EndMove,
                              Export,
                              FenceNode, LockNodeRecord, PathKey, PathSpec, Plan, Release, RequestMove, Unexport)
from agent.core.tree import ClusterView


LOCKABLE_EARLY = 0.05    # try an orphan this much before its lock-delay ends by our clock (we saw it late)


@dataclass(frozen=True)
class Snapshot:
    """Everything one node knows at one moment. The planner reads nothing else.

    - ``view``: the decoded keys (disks, path locks, live nodes, move requests).
    - ``session``: our valid session id, or ``None`` (lost, not yet made).
    - ``fenced``: our lease ran out: nothing may be served even though the keys still name our session.
    - ``stopping``: orderly shutdown: take everything down and release every lock.
    - ``definitions``: the disks this node can serve (validated definitions, last good one kept).
    - ``exported``: what the target backend serves now; when ``target_known`` is false (it could not
      tell) this is the last set it reported, and anything held may be exported too.
    - ``addresses``: paths whose floating IP the network backend has up now.
    - ``applied``: the definition each exported path was exported with (a changed one is re-exported).
    - ``now``: the time on the loop's clock; ``backoff``: path -> until when it must not be exported or
      acquired after failures here; ``surrender``: held paths this node gives up (it keeps failing them).
    - ``free_since``: when each free path was first seen free; such a path becomes anyone's after
      ``grace`` (counted from ``settle_until`` at the earliest); before ``settle_until`` (a new session)
      nothing free is taken, so that agents starting together are all registered first.
    """

    node: str
    session: str | None
    view: ClusterView
    definitions: Mapping[str, Disk] = field(default_factory=dict)
    exported: frozenset[PathKey] = frozenset()
    addresses: frozenset[PathKey] = frozenset()
    applied: Mapping[PathKey, Disk] = field(default_factory=dict)
    target_known: bool = True
    fenced: bool = False
    stopping: bool = False
    now: float = 0.0
    backoff: Mapping[PathKey, float] = field(default_factory=dict)
    surrender: frozenset[PathKey] = frozenset()
    free_since: Mapping[PathKey, float] = field(default_factory=dict)
    grace: float = 3.0
    settle_until: float = 0.0
    #: the fencing plugin requires a recorded fence before a failed node's paths are taken over
    fencing_required: bool = False
    #: what this node publishes in its node record: its weight and its fencing identity
    weight: float = 1.0
    identity: Mapping[str, object] = field(default_factory=dict)
    #: Consul's lock-delay: an orphaned path becomes lockable this long after it was first seen free
    lock_delay: float = 0.0
    #: when each node record was first seen orphaned; the leader fences a node once its record has been
    #: orphaned for ``fence_hold`` (so that the node stopped serving by itself first: docs/fencing.md)
    orphan_since: Mapping[str, float] = field(default_factory=dict)
    fence_hold: float = 0.0
    fence_busy: frozenset[str] = frozenset()    # fences in flight or backing off (the leader's worker)
    #: when each node was first seen live (continuously); rebalancing targets nodes live this long
    live_since: Mapping[str, float] = field(default_factory=dict)
    rebalance_after: float = 10.0
    #: when each move request of ours was first seen; one older than ``move_timeout`` is dropped
    move_since: Mapping[PathKey, float] = field(default_factory=dict)
    move_timeout: float = 30.0
    max_moves: int = 4
    #: when each free path was first seen free and not waiting for a fence
    claimable_since: Mapping[PathKey, float] = field(default_factory=dict)
    #: when the leader key was first seen free (its lock-delay runs from before that)
    leader_free_since: float = 0.0
    #: the key prefix (for the leader's clean-up of leftover keys)
    prefix: str = "pathagent"
    #: ModifyIndexes of orphaned keys proven lockable (one of the keys of that invalidation was locked)
    lockable: frozenset[int] = frozenset()

    def held(self) -> frozenset[PathKey]:
        """Path keys locked by our session (none without a session)."""
        return self.view.held_by(self.session)

    def spec(self, path: PathKey) -> PathSpec | None:
        disk = self.definitions.get(path.disk)
        return disk.path(path.index) if disk is not None else None


def must_wait_fence(s: Snapshot) -> bool:
    """Our own previous session ended without an orderly stop and the leader has not fenced us since."""
    rec = s.view.records.get(s.node)
    return (s.fencing_required and rec is not None and rec.orphaned() and rec.session != s.session
            and s.view.fenced.get(s.node, 0) <= rec.modify_index)


def fence_pending(s: Snapshot, path: PathKey) -> bool:
    """``path`` is free because its holder failed, and that node has not been fenced since."""
    st = s.view.paths.get(path)
    if not s.fencing_required or st is None or st.session is not None or st.orphan_of is None:
        return False
    return s.view.fenced.get(st.orphan_of, 0) <= st.modify_index


def blocked(s: Snapshot) -> frozenset[PathKey]:
    """Paths backing off now."""
    return frozenset(p for p, until in s.backoff.items() if until > s.now)


def lockable_at(s: Snapshot, path: PathKey) -> float:
    """When Consul will let anyone lock ``path``: an orphaned key (its holder's session was invalidated)
    only ``lock_delay`` after the invalidation, which is before we first saw it free."""
    st = s.view.paths.get(path)
    if st is None or st.orphan_of is None or st.modify_index in s.lockable:
        return s.now
    return s.free_since.get(path, s.now) + s.lock_delay - LOCKABLE_EARLY


def overdue_at(s: Snapshot, path: PathKey) -> float:
    """When a free path becomes anyone's: the placement grace, counted from when it became lockable (an
    orphaned key only after the lock-delay, and only once its failed holder was fenced: ``claimable_since``)
    and from the end of settling."""
    st = s.view.paths.get(path)
    delay = s.lock_delay if st is not None and st.orphan_of is not None else 0.0
    seen = s.free_since.get(path, s.now)
    base = max(seen + delay, s.claimable_since.get(path, seen))
    return max(base, s.settle_until) + s.grace


def plan(s: Snapshot) -> Plan:
    """The actions for snapshot ``s`` in the order they must run, and when to plan again at the latest."""
    down = [AddressDown(p, s.spec(p)) for p in sorted(s.addresses)]
    if s.session is None or s.fenced:
        return Plan(tuple(down) + tuple(Unexport(p) for p in sorted(s.exported)))

    held = s.held()
    if s.stopping:
        actions: list[Action] = list(down)
        actions += [Unexport(p) for p in sorted(s.exported)]
        if s.target_known:
            actions += [AddressDown(p, s.spec(p)) for p in sorted(held - s.addresses) if s.spec(p) is not None]
            actions += [Release(p) for p in sorted(held)]
        return Plan(tuple(actions))

    view = s.view
    node_of = {sid: node for node, sid in view.nodes.items()}
    node_of[s.session] = s.node
    live = set(node_of.values())
    # a move request counts only while its target is a live node other than the holder
    moves = {p: n for p, n in view.moves.items() if n in live}
    stopping_disks = {d for d, r in view.disks.items() if r.stopping}
    give_up = s.surrender | {p for p in held if (p in moves and moves[p] != s.node)
                             or p.disk in stopping_disks or p.disk not in view.disks}
    no_go = blocked(s)
    serve = frozenset(p for p in held - give_up if s.spec(p) is not None)

    exported = s.exported
    stale = frozenset(p for p in exported & serve if s.applied.get(p) != s.definitions[p.disk])
    # A path given up (a planned move included) loses its address first: its connections go silent rather
    # than closed (nothing can leave the vanished address), and the applier records them in the released
    # key for the next owner to tickle (invariant 3)
    actions = [a for a in down if a.path not in serve or a.path not in exported]
    actions += [Unexport(p) for p in sorted(exported - serve)]
    if s.target_known:
        # an address our backend lost track of may still be up: down() it anyway before the release (it is
        # idempotent and verifies that the IP is gone from the node)
        actions += [AddressDown(p, s.spec(p)) for p in sorted((held & give_up) - s.addresses)
                    if s.spec(p) is not None]
        actions += [Release(p) for p in sorted(held & give_up)]
    waiting = must_wait_fence(s)
    rec = view.records.get(s.node)
    if not waiting and (view.nodes.get(s.node) != s.session or rec is None
                        or rec.weight != s.weight or dict(rec.identity) != dict(s.identity)):
        actions.append(LockNodeRecord())

    # Placement of free paths from facts every node shares (so all nodes compute the same assignment);
    # only then what is local: whether this node can serve the disk and is not backing off.
    counts: dict[str, int] = {}
    owners: dict[PathKey, str] = {}
    for p, st in view.paths.items():
        owner = node_of.get(st.session) if st.session is not None else None
        if owner is not None:
            counts[owner] = counts.get(owner, 0) + 1
            owners[p] = owner
    free = sorted(p for p, st in view.paths.items()
                  if st.session is None and p.disk in view.disks and p.disk not in stopping_disks)
    weights = {n: r.weight for n, r in view.records.items()}
    weights[s.node] = s.weight
    eligible = live - view.drained
    settling = s.now < s.settle_until
    # while settling nothing free is taken and no wake-up depends on who would take what (every grace ends
    # after settle_until): no assignment, which costs 0.6 s per plan with 20 000 free paths (bench-scale)
    assigned = {} if settling else placement.assign(free, eligible, counts, total=len(view.paths), owners=owners,
                                                    weights=weights)
    wake: list[float] = [until for until in s.backoff.values() if until > s.now]
    if settling:
        wake.append(s.settle_until)
    actions += _leader(s, live, owners, weights, wake)
    probed: set[int] = set()
    for p in free:
        if s.spec(p) is None or p in no_go or waiting or s.node in view.drained or fence_pending(s, p):
            continue
        mine = moves.get(p, assigned.get(p)) == s.node
        lockable = lockable_at(s, p)
        if lockable > s.now:
            # maybe still in its lock-delay (we may have seen the invalidation late): try one key of that
            # invalidation (a probe) rather than all of them, and the rest once one was locked
            wake.append(lockable)
            group = view.paths[p].modify_index
            if not mine or group in probed:
                continue
            probed.add(group)
        due = overdue_at(s, p)
        if not mine and due > s.now:
            wake.append(due)
        if not settling and (mine or due <= s.now):
            actions.append(Acquire(p, view.paths[p].modify_index, view.paths[p].peers))

    if s.target_known:
        for p in sorted((serve & exported) - s.addresses - no_go - stale):
            spec = s.spec(p)
            assert spec is not None
            actions.append(AddressUp(p, spec, view.paths[p].peers))
        for p in sorted(serve - no_go):
            if p not in exported or p in stale:
                actions.append(Export(p, s.definitions[p.disk]))
        for p in sorted(((serve & exported) - s.addresses - no_go) & stale):
            spec = s.spec(p)
            assert spec is not None
            actions.append(AddressUp(p, spec, view.paths[p].peers))    # after its re-export
    return Plan(tuple(actions), min(wake) if wake else None)


def _leader(s: Snapshot, live: set[str], owners: Mapping[PathKey, str], weights: Mapping[str, float],
            wake: list[float]) -> list[Action]:
    """The cluster leader's actions: take the leader key when it is free; as the leader, fence failed
    nodes and plan balancing moves; as a former leader, drop the move requests still ours."""
    view = s.view
    out: list[Action] = []
    ours = sorted(p for p, sid in view.move_holders.items() if sid == s.session)
    if view.leader is None:
        # a leader key whose holder failed is in its lock-delay: try once it should be over (by our clock,
        # from when we first saw it free), not every cycle until then
        due = s.leader_free_since + s.lock_delay - LOCKABLE_EARLY if view.leader_orphaned else s.now
        if due <= s.now:
            out.append(AcquireLeader(view.leader_index))
        else:
            wake.append(due)
    if view.leader != s.session:
        return out + [EndMove(p) for p in ours]

    # leftovers: move requests nobody holds any more (a leader's outlive its session: Behavior=release),
    # and path keys of a disk whose record is gone (a `disk stop` interrupted between its transactions)
    out += [CleanUp(keys.move_key(s.prefix, p), mi) for p, mi in sorted(view.stale_moves.items())]
    out += [CleanUp(keys.path_key(s.prefix, p), st.modify_index) for p, st in sorted(view.paths.items())
            if p.disk not in view.disks and st.session is None]

    # fence every failed node once it has been orphaned for fence_hold (it stopped serving by itself)
    failovers = False
    for node, rec in sorted(view.records.items()):
        if not (s.fencing_required and rec.orphaned() and view.fenced.get(node, 0) <= rec.modify_index):
            continue
        failovers = True
        due = s.orphan_since.get(node, s.now) + s.fence_hold
        if node in s.fence_busy:
            continue
        if due > s.now:
            wake.append(due)
            continue
        images = sorted({(view.disks[p.disk].pool, view.disks[p.disk].image) for p, st in view.paths.items()
                         if st.orphan_of == node and p.disk in view.disks and view.disks[p.disk].pool})
        out.append(FenceNode(node, rec.session, rec.identity, tuple(images)))
    failovers = failovers or any(st.session is None and st.orphan_of is not None and p.disk in view.disks
                                 for p, st in view.paths.items())

    # moves: end those done or no longer possible, then plan new ones within the limit
    drained = view.drained
    moving = set(view.moves)
    for p in ours:
        target = view.moves.get(p)
        st = view.paths.get(p)
        started = s.move_since.get(p, s.now)
        if st is None or target not in live or target in drained or owners.get(p) == target \
                or s.now - started >= s.move_timeout:
            out.append(EndMove(p))
            moving.discard(p)
        else:
            wake.append(started + s.move_timeout)
    room = s.max_moves - len(moving)
    if failovers or room <= 0:
        return out
    settled = {n for n in live if s.now - s.live_since.get(n, s.now) >= s.rebalance_after}
    for n in live - settled:
        wake.append(s.live_since.get(n, s.now) + s.rebalance_after)
    held = {p: n for p, n in owners.items() if p.disk in view.disks and not view.disks[p.disk].stopping}
    in_flight = {p: n for p, n in view.moves.items() if p in moving}
    for p, target in placement.rebalance(held, settled - drained, drained & live, weights, in_flight, room):
        out.append(RequestMove(p, target))
    return out
