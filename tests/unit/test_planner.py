"""Table tests of the pure planner, plus replays of interrupted plans."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from agent.core.model import (Acquire, Action, DiskRecord, Export, PathKey, PathState, Release, Snapshot,
                         Unexport)
from agent.core.planner import plan

ME, OTHER, THIRD = "gwa", "gwb", "gwc"
S_ME, S_OTHER, S_THIRD = "sess-a", "sess-b", "sess-c"
P1, P2, P3, P4 = PathKey("d1", 1), PathKey("d1", 2), PathKey("d2", 1), PathKey("d2", 2)


def snap(held: dict[PathKey, str | None], exported: set[PathKey] = set(), *, session: str | None = S_ME,
         nodes: dict[str, str] | None = None, serviceable: set[str] | None = None, **kw: object) -> Snapshot:
    paths = {p: PathState(p, 10 + i, s) for i, (p, s) in enumerate(sorted(held.items()))}
    disks = {d: DiskRecord(d, "rbd", d) for d in {p.disk for p in held}}
    return Snapshot(node=ME, session=session, paths=paths, disks=disks, exported=frozenset(exported),
                    serviceable=frozenset(disks if serviceable is None else serviceable),
                    nodes={ME: S_ME} if nodes is None else nodes, **kw)  # type: ignore[arg-type]


def apply(s: Snapshot, actions: list[Action]) -> Snapshot:
    """What the world looks like after ``actions`` succeeded (a model of Consul and the backend)."""
    paths = dict(s.paths)
    exported = set(s.exported)
    for a in actions:
        p = a.path
        if isinstance(a, Acquire):
            assert paths[p].session is None and paths[p].modify_index == a.modify_index
            paths[p] = PathState(p, paths[p].modify_index + 1, s.session)
        elif isinstance(a, Release):
            assert p not in exported, "released while still exported"
            paths[p] = PathState(p, paths[p].modify_index + 1, None)
        elif isinstance(a, Export):
            assert paths[p].session == s.session, "exported without holding the lock"
            exported.add(p)
        elif isinstance(a, Unexport):
            exported.discard(p)
    return dataclasses.replace(s, paths=paths, exported=frozenset(exported))


CASES = [
    # (name, snapshot, expected plan)
    ("free path assigned to me is acquired",
     snap({P1: None}), [Acquire(P1, 10)]),
    ("held and not exported is exported",
     snap({P1: S_ME}), [Export(P1)]),
    ("held and exported: nothing to do",
     snap({P1: S_ME}, {P1}), []),
    ("held by another node: left alone",
     snap({P1: S_OTHER}, nodes={ME: S_ME, OTHER: S_OTHER}), []),
    ("exported but held by another: unexport",
     snap({P1: S_OTHER}, {P1}, nodes={ME: S_ME, OTHER: S_OTHER}), [Unexport(P1)]),
    ("exported but the key is gone (disk stopped): unexport",
     snap({}, {P1}), [Unexport(P1)]),
    ("no session: unexport everything, acquire nothing",
     snap({P1: S_ME, P2: None}, {P1}, session=None), [Unexport(P1)]),
    ("fenced: unexport everything even though the keys are ours",
     snap({P1: S_ME, P2: S_ME}, {P1, P2}, fenced=True), [Unexport(P1), Unexport(P2)]),
    ("stopping: unexport then release",
     snap({P1: S_ME, P2: S_ME}, {P1}, stopping=True), [Unexport(P1), Release(P1), Release(P2)]),
    ("disk without a valid definition: neither acquired nor exported",
     snap({P1: None, P3: S_ME}, serviceable=set()), []),
    ("blocked path is not exported nor acquired",
     snap({P1: S_ME, P3: None}, blocked=frozenset({P1, P3})), []),
    ("overdue path assigned elsewhere is taken",
     snap({P1: None, P2: None, P3: None, P4: None}, nodes={ME: S_ME, OTHER: S_OTHER},
          overdue=frozenset({P1, P2, P3, P4})),
     [Acquire(P1, 10), Acquire(P2, 11), Acquire(P3, 12), Acquire(P4, 13)]),
    ("move to another live node: unexport, release",
     snap({P1: S_ME, P2: S_ME}, {P1, P2}, nodes={ME: S_ME, OTHER: S_OTHER}, moves={P1: OTHER}),
     [Unexport(P1), Release(P1)]),
    ("move to a dead node is ignored",
     snap({P1: S_ME}, {P1}, moves={P1: THIRD}), []),
    ("free path moved to me is acquired whatever placement says",
     snap({P1: None}, nodes={ME: S_ME, OTHER: S_OTHER, THIRD: S_THIRD}, moves={P1: ME}), [Acquire(P1, 10)]),
    ("settling: free paths wait, held ones are served",
     snap({P1: None, P2: S_ME}, settling=True), [Export(P2)]),
    ("free path moved to another node is left to it",
     snap({P1: None}, nodes={ME: S_ME, OTHER: S_OTHER}, moves={P1: OTHER}), []),
]


@pytest.mark.parametrize("name,s,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name: str, s: Snapshot, expected: list[Action]) -> None:
    assert plan(s) == expected


def test_surrender_unexports_then_releases() -> None:
    s = snap({P1: S_ME, P2: S_ME}, {P1, P2})
    assert plan(s, surrender=frozenset({P2})) == [Unexport(P2), Release(P2)]


def test_stale_definition_is_re_exported() -> None:
    s = snap({P1: S_ME}, {P1})
    assert plan(s, stale=frozenset({P1})) == [Export(P1)]


def test_order_unexport_release_acquire_export() -> None:
    s = snap({P1: S_OTHER, P2: S_ME, P3: None, P4: S_ME}, {P1, P2},
             nodes={ME: S_ME, OTHER: S_OTHER}, overdue=frozenset({P3}))
    kinds = [type(a) for a in plan(s, surrender=frozenset({P2}))]
    assert kinds == [Unexport, Unexport, Release, Acquire, Export]


def test_balanced_placement_three_nodes() -> None:
    """Each node plans from the same snapshot; together they take every path exactly once, evenly."""
    paths = [PathKey(f"d{i:02d}", j) for i in range(20) for j in (1, 2, 3)]
    nodes = {ME: S_ME, OTHER: S_OTHER, THIRD: S_THIRD}
    taken: dict[PathKey, str] = {}
    for node, sid in nodes.items():
        s = dataclasses.replace(snap({p: None for p in paths}, nodes=nodes), node=node, session=sid)
        for a in plan(s):
            assert isinstance(a, Acquire)
            assert a.path not in taken, f"{a.path} planned by {taken.get(a.path)} and {node}"
            taken[a.path] = node
    assert set(taken) == set(paths)
    counts = sorted(list(taken.values()).count(n) for n in nodes)
    assert counts == [20, 20, 20]


def test_fair_share_counts_existing_holdings() -> None:
    nodes = {ME: S_ME, OTHER: S_OTHER}
    s = snap({P1: S_OTHER, P2: S_OTHER, P3: None, P4: None}, nodes=nodes)
    assert plan(s) == [Acquire(P3, 12), Acquire(P4, 13)]


WORLDS = [
    snap({P1: None, P2: S_ME, P3: S_OTHER, P4: None}, {P2, P3}, nodes={ME: S_ME, OTHER: S_OTHER},
         overdue=frozenset({P1, P4})),
    snap({P1: S_ME, P2: S_ME, P3: S_ME}, {P1, P4}),
    snap({P1: S_ME, P2: S_ME}, {P1, P2}, stopping=True),
    snap({P1: S_ME, P2: None}, {P1, P3}, fenced=True),
    snap({P1: S_ME, P2: S_ME, P3: None}, {P1, P2}, nodes={ME: S_ME, OTHER: S_OTHER}, moves={P1: OTHER}),
]


def converge(s: Snapshot, limit: int = 5) -> Snapshot:
    for _ in range(limit):
        actions = plan(s)
        if not actions:
            return s
        s = apply(s, actions)
    raise AssertionError(f"no convergence: still planning {plan(s)}")


@pytest.mark.parametrize("world", WORLDS)
def test_apply_then_replan_converges(world: Snapshot) -> None:
    final = converge(world)
    assert plan(final) == []
    if final.session is not None and not final.fenced and not final.stopping:
        held = final.held()
        assert final.exported <= held, "exported something we do not hold"
        assert held - final.blocked <= final.exported | {p for p in held if p.disk not in final.serviceable}
    else:
        assert final.exported == frozenset()


@pytest.mark.parametrize("world", WORLDS)
def test_died_after_each_prefix_then_replanned(world: Snapshot) -> None:
    """The process dies after the first k actions; the next process re-plans from the world as left."""
    full = converge(world)
    actions = plan(world)
    for k in range(len(actions) + 1):
        partial = apply(world, actions[:k])
        # invariant holds at every intermediate point: nothing exported without the lock
        if partial.session is not None:
            for p in partial.exported - partial.held():
                assert Unexport(p) in plan(partial)
        again = converge(partial)
        assert (again.held(), again.exported) == (full.held(), full.exported)


def test_every_interleaving_of_two_acquirers_keeps_one_owner() -> None:
    """Two nodes plan the same overdue path; whichever acquire lands first wins, the other is refused
    (the txn's index check) and re-plans to nothing."""
    base = snap({P1: None}, nodes={ME: S_ME, OTHER: S_OTHER}, overdue=frozenset({P1}))
    mine = plan(base)
    theirs = plan(dataclasses.replace(base, node=OTHER, session=S_OTHER))
    assert mine == theirs == [Acquire(P1, 10)]
    for first in itertools.permutations([S_ME, S_OTHER]):
        winner = first[0]
        after = dataclasses.replace(base, paths={P1: PathState(P1, 11, winner)})
        for node, sid in ((ME, S_ME), (OTHER, S_OTHER)):
            s = dataclasses.replace(after, node=node, session=sid)
            expected = [Export(P1)] if sid == winner else []
            assert plan(s) == expected


def test_paths_of_one_disk_go_to_different_nodes() -> None:
    """Multipath needs the paths of a disk on different gateways whenever there are enough nodes."""
    nodes = {ME: S_ME, OTHER: S_OTHER, THIRD: S_THIRD}
    for n_disks, per_disk in ((10, 2), (7, 3), (1, 3), (30, 2)):
        paths = [PathKey(f"x{i:02d}", j) for i in range(n_disks) for j in range(1, per_disk + 1)]
        taken: dict[PathKey, str] = {}
        for node, sid in nodes.items():
            s = dataclasses.replace(snap({p: None for p in paths}, nodes=nodes), node=node, session=sid)
            taken.update({a.path: node for a in plan(s) if isinstance(a, Acquire)})
        assert set(taken) == set(paths)
        for i in range(n_disks):
            owners = [taken[PathKey(f"x{i:02d}", j)] for j in range(1, per_disk + 1)]
            assert len(set(owners)) == per_disk, f"disk x{i:02d} paths on {owners}"


def test_free_path_avoids_the_node_serving_its_sibling() -> None:
    nodes = {ME: S_ME, OTHER: S_OTHER}
    # OTHER serves d1/1; d1/2 is free: it goes to ME whatever the hash says
    s = snap({P1: S_OTHER, P2: None, P3: S_ME, P4: S_OTHER}, {P3}, nodes=nodes)
    assert plan(s) == [Acquire(P2, 11)]
    assert plan(dataclasses.replace(s, node=OTHER, session=S_OTHER, exported=frozenset({P1, P4}))) == []
