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
3. Order: addresses down, then unexports, then releases, then acquires, then exports, then addresses up.
   So when a node stops serving, its IPs go first; a path is released only after both are down (every
   release is preceded by an address-down of its path, even when the network backend does not list it, and
   the applier skips a release whose address-down or unexport failed in the same run); a path acquired now is
   exported by a later plan, and brought up by the one after that.
4. Convergence: applying a plan and planning again gives nothing to do, and a plan interrupted after
   any prefix of its actions still converges when planned again.
5. A path is never acquired for a disk this node cannot serve (no definition), that is stopping, or that
   backs off; and while the target's state is unknown nothing is exported, brought up or released.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from agent.core import placement
from agent.core.model import (Acquire, Action, AddressDown, AddressUp, Disk, Export, LockNodeRecord, PathKey,
                              PathSpec, Plan, Release, Unexport)
from agent.core.tree import ClusterView


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

    def held(self) -> frozenset[PathKey]:
        """Path keys locked by our session (none without a session)."""
        return self.view.held_by(self.session)

    def spec(self, path: PathKey) -> PathSpec | None:
        disk = self.definitions.get(path.disk)
        return disk.path(path.index) if disk is not None else None


def blocked(s: Snapshot) -> frozenset[PathKey]:
    """Paths backing off now."""
    return frozenset(p for p, until in s.backoff.items() if until > s.now)


def overdue_at(s: Snapshot, path: PathKey) -> float:
    """When a free path becomes anyone's (the placement grace, counted from the end of settling)."""
    return max(s.free_since.get(path, s.now), s.settle_until) + s.grace


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
    actions = [a for a in down if a.path not in serve or a.path not in exported]
    actions += [Unexport(p) for p in sorted(exported - serve)]
    if s.target_known:
        # an address our backend lost track of may still be up: down() it anyway before the release (it is
        # idempotent and verifies that the IP is gone from the node)
        actions += [AddressDown(p, s.spec(p)) for p in sorted((held & give_up) - s.addresses)
                    if s.spec(p) is not None]
        actions += [Release(p) for p in sorted(held & give_up)]
    if view.nodes.get(s.node) != s.session:
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
    assigned = placement.assign(free, live, counts, total=len(view.paths), owners=owners)
    settling = s.now < s.settle_until
    wake: list[float] = [until for until in s.backoff.values() if until > s.now]
    if settling:
        wake.append(s.settle_until)
    for p in free:
        if s.spec(p) is None or p in no_go:
            continue
        mine = moves.get(p, assigned.get(p)) == s.node
        due = overdue_at(s, p)
        if not mine and due > s.now:
            wake.append(due)
        if not settling and (mine or due <= s.now):
            actions.append(Acquire(p, view.paths[p].modify_index))

    if s.target_known:
        for p in sorted(serve - no_go):
            if p not in exported or p in stale:
                actions.append(Export(p, s.definitions[p.disk]))
        for p in sorted((serve & exported) - s.addresses - no_go):
            spec = s.spec(p)
            assert spec is not None
            actions.append(AddressUp(p, spec))
    return Plan(tuple(actions), min(wake) if wake else None)
