"""What this node should change now. Pure: no I/O, no clock, no logging; the same snapshot gives the
same plan.

Invariants (tested in tests/unit/test_planner.py):

1. A path is exported only while our session holds its lock and we are not fenced: ``Export`` is only
   planned for held paths, and without a valid unfenced session every exported path is unexported.
2. Unexport comes before release; acquire comes before export (a path acquired in this plan is exported
   by the next plan, once the acquire is confirmed).
3. Applying a plan and planning again on the resulting state gives nothing to do (convergence), and a
   plan interrupted after any prefix of its actions still converges when re-planned.
4. Nothing is released while it is still exported, and a path is never acquired when our node cannot
   serve its disk (no valid definition) or backs off from it.
"""
from __future__ import annotations

from agent.core import placement
from agent.core.model import Acquire, Action, Export, PathKey, Release, Snapshot, Unexport


def plan(s: Snapshot, stale: frozenset[PathKey] = frozenset(),
         surrender: frozenset[PathKey] = frozenset()) -> list[Action]:
    """The actions for snapshot ``s``, in the order they must run.

    ``stale``: exported paths whose definition changed since they were exported (re-export updates them).
    ``surrender``: held paths this node gives up (it keeps failing to serve them): unexport, release.
    """
    if s.session is None or s.fenced:
        return list[Action](Unexport(p) for p in sorted(s.exported))

    held = s.held()
    if s.stopping:
        out: list[Action] = [Unexport(p) for p in sorted(s.exported)]
        return out + [Release(p) for p in sorted(held)]

    node_of = {sid: node for node, sid in s.nodes.items()}
    node_of[s.session] = s.node
    live = set(node_of.values())
    # a move request counts only while its target is a live node other than the holder
    moves = {p: n for p, n in s.moves.items() if n in live}
    moving_away = frozenset(p for p in held if p in moves and moves[p] != s.node)
    give_up = surrender | moving_away

    unexport = sorted(s.exported - held) + sorted(s.exported & held & give_up)
    release = sorted(held & give_up)
    keep = held - give_up
    export = sorted(p for p in keep if p.disk in s.serviceable and p not in s.blocked
                    and (p not in s.exported or p in stale))

    # placement of free paths; a path with a pending move goes to the move's target
    counts: dict[str, int] = {}
    owners: dict[PathKey, str] = {}
    for p, st in s.paths.items():
        if st.session is not None:
            owner = node_of.get(st.session)
            if owner is not None:
                counts[owner] = counts.get(owner, 0) + 1
                owners[p] = owner
    # Assign every free path from facts all nodes share (so all nodes compute the same assignment);
    # only then apply what is local: whether this node can serve the disk and is not backing off.
    free = [p for p, st in s.paths.items() if st.session is None and p.disk in s.disks]
    assigned = placement.assign(free, live, counts, total=len(s.paths), owners=owners)
    acquire: list[Action] = [] if s.settling else [
        Acquire(p, s.paths[p].modify_index) for p in sorted(free)
        if p.disk in s.serviceable and p not in s.blocked
        and (p in s.overdue or moves.get(p, assigned.get(p)) == s.node)]

    actions: list[Action] = [Unexport(p) for p in unexport]
    actions += [Release(p) for p in release]
    actions += acquire
    actions += [Export(p) for p in export]
    return actions
