"""Failover, fencing, leader, balance and drain with several agents on one in-memory store (tier 1).

The agents run step by step on a fake clock (tests/unit/doubles.py); the fencing plugin is an in-memory
double that records each call, so these tests check the *order* the loop promises: a failed node's
paths are taken over only after the leader fenced it, a fence failure makes them wait, exactly one
leader acts, and planned moves rebalance a returning node and empty a drained one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pytest

from agent.core import keys
from agent.core.model import PathKey
from agent.core.tree import drain_value
from agent.errors import TransientBackendError
from doubles import MemFencing, Node, disk, make_node
from memstore import FakeClock, MemoryStore

DISKS = {f"d{i}": disk(f"d{i}", 2, base=10 + 10 * i) for i in range(1, 7)}   # 6 disks x 2 paths


Calls = list[tuple[float, str, str, tuple[tuple[str, str], ...]]]


def cluster(tmp: Path, store: MemoryStore, clock: FakeClock, names: Iterable[str] = ("gwa", "gwb", "gwc"),
            calls: Calls | None = None) -> dict[str, Node]:
    for d in DISKS:
        store.start_disk(d, 2)
    log: Calls = calls if calls is not None else []
    nodes = {n: make_node(tmp, store, clock, n, disks=dict(DISKS), fencing=MemFencing(log, clock, n)) for n in names}
    for n in nodes.values():
        n.start()
    return nodes


def run(nodes: Iterable[Node], seconds: float, clock: FakeClock, dt: float = 0.25) -> None:
    nodes = list(nodes)
    t_end = clock.now() + seconds
    while clock.now() < t_end:
        clock.advance(dt)
        for n in nodes:
            if n.session is None:
                n.agent.keeper.establish(n.agent.maybe_serving)     # what the run loop does
            n.step()


def owners(store: MemoryStore, nodes: dict[str, Node]) -> dict[PathKey, str | None]:
    by_session = {n.session: name for name, n in nodes.items() if n.session}
    out: dict[PathKey, str | None] = {}
    for d in DISKS:
        for i in (1, 2):
            sid = store.holder(PathKey(d, i))
            out[PathKey(d, i)] = by_session.get(sid) if sid else None
    return out


def counts(store: MemoryStore, nodes: dict[str, Node]) -> dict[str, int]:
    own = owners(store, nodes)
    return {name: sum(1 for o in own.values() if o == name) for name in nodes}


def doubled(store: MemoryStore, nodes: dict[str, Node]) -> list[str]:
    own = owners(store, nodes)
    return [d for d in DISKS if own[PathKey(d, 1)] is not None and own[PathKey(d, 1)] == own[PathKey(d, 2)]]


def leaders(store: MemoryStore, nodes: dict[str, Node]) -> list[str]:
    k = store.kv.get(keys.leader_key(store.prefix))
    return [name for name, n in nodes.items() if k is not None and k.session is not None and k.session == n.session]


def test_start_spreads_paths_and_elects_one_leader(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    c = counts(store, nodes)
    assert sorted(c.values()) == [4, 4, 4], c
    assert doubled(store, nodes) == []
    assert len(leaders(store, nodes)) == 1
    assert all(n.serving() for n in nodes.values())


def test_crashed_node_is_fenced_once_before_its_paths_are_taken(tmp_path: Path, store: MemoryStore,
                                                                 clock: FakeClock) -> None:
    calls: Calls = []
    nodes = cluster(tmp_path, store, clock, calls=calls)
    run(nodes.values(), 15, clock)
    lead = leaders(store, nodes)[0]
    victim = next(n for n in nodes if n != lead)
    lost = {p for p, o in owners(store, nodes).items() if o == victim}
    old = nodes[victim].session
    assert old is not None and lost
    store.invalidate(old)                           # serfHealth: the node is gone (it runs no more steps)
    crashed_at = clock.now()
    survivors = {n: x for n, x in nodes.items() if n != victim}
    taken_at: dict[PathKey, float] = {}
    while clock.now() - crashed_at < 20:
        run(survivors.values(), 0.25, clock)
        for p, o in owners(store, nodes).items():
            if p in lost and o is not None:
                taken_at.setdefault(p, clock.now())
    assert [c[1:3] for c in calls] == [(victim, old)], calls
    fenced_at = calls[0][0]
    assert set(taken_at) == lost
    assert min(taken_at.values()) >= fenced_at, "a path of the failed node was taken before its fence"
    assert min(taken_at.values()) >= crashed_at + 8.0, "taken inside the lock-delay"
    assert max(taken_at.values()) <= crashed_at + 8.0 + 1.5, f"slow takeover: {taken_at}"
    images = calls[0][3]
    assert images == tuple(sorted({("rbd", f"pathagent-{p.disk}") for p in lost}))
    c = counts(store, nodes)
    assert c[victim] == 0 and sorted(v for n, v in c.items() if n != victim) == [6, 6], c
    assert doubled(store, nodes) == []


def test_a_failing_fence_makes_the_paths_wait_and_is_named(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    lead = leaders(store, nodes)[0]
    victim = next(n for n in nodes if n != lead)
    lost = {p for p, o in owners(store, nodes).items() if o == victim}
    fencing = nodes[lead].agent.duties.fencing
    assert isinstance(fencing, MemFencing)
    fencing.fail = TransientBackendError("Ceph unreachable: mon timed out")
    old = nodes[victim].session
    assert old is not None
    store.invalidate(old)
    survivors = {n: x for n, x in nodes.items() if n != victim}
    run(survivors.values(), 20, clock)
    assert all(owners(store, nodes)[p] is None for p in lost), "taken over unfenced"
    assert any(f"fencing node {victim}" in r.getMessage() and "Ceph unreachable" in r.getMessage()
               for r in caplog.records)
    fencing.fail = None
    run(survivors.values(), 35, clock)                  # the backoff tops out at 30 s
    assert all(owners(store, nodes)[p] is not None for p in lost)


def test_a_node_back_after_a_crash_waits_for_its_fence_then_gets_its_share(tmp_path: Path, store: MemoryStore,
                                                                           clock: FakeClock) -> None:
    calls: Calls = []
    nodes = cluster(tmp_path, store, clock, calls=calls)
    run(nodes.values(), 15, clock)
    lead = leaders(store, nodes)[0]
    victim = next(n for n in nodes if n != lead)
    old = nodes[victim].session
    assert old is not None
    store.invalidate(old)
    nodes[victim].agent.keeper.confirm_once()           # it learns its session is gone: fenced, no session
    assert nodes[victim].session is None and nodes[victim].serving() == set()
    first_held: float | None = None
    record = keys.node_key(store.prefix, victim)
    relocked: float | None = None
    for _ in range(60):                                  # it makes a new session at once ...
        run(nodes.values(), 0.25, clock)
        if first_held is None and counts(store, nodes)[victim]:
            first_held = clock.now()
        if relocked is None and store.kv[record].session == nodes[victim].session:
            relocked = clock.now()
    assert nodes[victim].session not in (None, old)
    assert [c[1:3] for c in calls] == [(victim, old)]
    # ... but it neither takes a path nor rewrites its node record before its old session is fenced
    assert relocked is not None and relocked >= calls[0][0]
    assert first_held is None or first_held >= calls[0][0]
    run(nodes.values(), 40, clock)                       # rebalance_after 10 s, then planned moves
    c = counts(store, nodes)
    assert sorted(c.values()) == [4, 4, 4], c
    assert doubled(store, nodes) == []
    assert all(o is not None for o in owners(store, nodes).values())
    assert not any(k.startswith(f"{store.prefix}/moves/") for k in store.kv), "move requests left behind"


def test_drain_empties_a_node_by_planned_moves_and_undrain_refills_it(tmp_path: Path, store: MemoryStore,
                                                                     clock: FakeClock) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    store.set(keys.drain_key(store.prefix, "gwc"), drain_value(0))
    unserved_max = 0.0
    gone_since: dict[PathKey, float] = {}
    for _ in range(120):
        run(nodes.values(), 0.25, clock)
        for p, o in owners(store, nodes).items():
            if o is None:
                gone_since.setdefault(p, clock.now())
            elif p in gone_since:
                unserved_max = max(unserved_max, clock.now() - gone_since.pop(p))
    c = counts(store, nodes)
    assert c["gwc"] == 0 and c["gwa"] + c["gwb"] == 12 and abs(c["gwa"] - c["gwb"]) <= 1, c
    assert nodes["gwc"].serving() == set()
    assert unserved_max <= 1.0, f"a path was unserved for {unserved_max}s during the drain"
    assert doubled(store, nodes) == []
    store.delete(keys.drain_key(store.prefix, "gwc"))
    run(nodes.values(), 40, clock)
    assert sorted(counts(store, nodes).values()) == [4, 4, 4]


def test_leader_crash_hands_leadership_over_and_never_two(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    nodes = cluster(tmp_path, store, clock)
    seen: set[int] = set()
    for _ in range(60):
        run(nodes.values(), 0.25, clock)
        seen.add(len(leaders(store, nodes)))
    first = leaders(store, nodes)[0]
    old = nodes[first].session
    assert old is not None
    store.invalidate(old)
    survivors = {n: x for n, x in nodes.items() if n != first}
    for _ in range(60):
        run(survivors.values(), 0.25, clock)
        seen.add(len(leaders(store, nodes)))
    assert max(seen) == 1
    assert len(leaders(store, nodes)) == 1 and leaders(store, nodes)[0] != first
    assert owners(store, nodes) and all(o not in (None, first) for o in owners(store, nodes).values())


def request_move(store: MemoryStore, path: PathKey, target: str) -> str:
    """What `pathagent path move` does: a move request locked by the asker's own session."""
    from agent.core.tree import move_value
    sid = store.create_session("cli", "pathagent-cli", [], 0.0)
    res = store._txn([("lock", keys.move_key(store.prefix, path), sid, move_value(target))])
    assert res.ok
    return sid


@pytest.mark.parametrize("dies", ["target", "source", "source-before-release"])
def test_a_planned_move_survives_the_death_of_either_node(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                          dies: str) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    own = owners(store, nodes)
    lead = leaders(store, nodes)[0]
    src = next(n for n in nodes if n != lead)
    dst = next(n for n in nodes if n not in (lead, src))
    path = next(p for p, o in own.items() if o == src)
    request_move(store, path, dst)
    if dies != "source-before-release":
        nodes[src].step()                               # the source lets go: address down, unexport, release
        assert owners(store, nodes)[path] is None and str(path) not in nodes[src].serving()
    victim = dst if dies == "target" else src
    sid = nodes[victim].session
    assert sid is not None
    store.invalidate(sid)
    survivors = [x for n, x in nodes.items() if n != victim]
    run(survivors, 20, clock)
    holder = owners(store, nodes)[path]
    assert holder is not None and holder != victim, f"{path} unserved after the {dies} died mid-move"
    assert any(str(path) in n.serving() for n in survivors)


def test_the_leader_removes_leftover_keys_only(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    stale_move = keys.move_key(store.prefix, PathKey("d1", 1))
    store.set(stale_move, b'{"node":"gwb"}')                          # nobody holds it: its asker is gone
    stray = keys.path_key(store.prefix, PathKey("gone", 1))
    store.set(stray)                                                  # a path key of a disk that is gone
    held_stray = keys.path_key(store.prefix, PathKey("gone", 2))
    sid = store.create_session("cli", "pathagent-cli", [], 0.0)
    assert store._txn([("lock", held_stray, sid, b"")]).ok          # `disk stop` holding it: not a leftover
    live_move = keys.move_key(store.prefix, PathKey("d2", 1))
    assert store._txn([("lock", live_move, sid, b'{"node":"gwc"}')]).ok
    run(nodes.values(), 2, clock)
    assert stale_move not in store.kv and stray not in store.kv
    assert held_stray in store.kv and live_move in store.kv
    assert all(o is not None for o in owners(store, nodes).values())


def test_an_orderly_stop_hands_leadership_over_without_a_lock_delay(tmp_path: Path, store: MemoryStore,
                                                                     clock: FakeClock) -> None:
    nodes = cluster(tmp_path, store, clock)
    run(nodes.values(), 15, clock)
    first = leaders(store, nodes)[0]
    nodes[first].agent.shutdown()                   # SIGTERM: everything released, the session destroyed
    survivors = [x for n, x in nodes.items() if n != first]
    run(survivors, 1.0, clock)                      # well inside the 8 s lock-delay of the test config
    assert len(leaders(store, nodes)) == 1 and leaders(store, nodes)[0] != first
