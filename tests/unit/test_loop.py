"""Tier 1: the whole node loop (session keeper, fencer, watcher, definitions, applier, planner) on an
in-memory store and a fake clock, driven step by step. Each test names the finding of the safety review
(shared/reviews/safety.md) it pins down."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.core import keys
from agent.core.model import PathKey
from agent.core.tree import decode_peers
from agent.errors import DefinitionError
from agent.runtime.applier import SURRENDER_BLOCK, UNSERVICEABLE_AFTER
from agent.runtime.loop import TARGET_UNKNOWN_FENCE
from agent.runtime.report import label
from agent.runtime.session import CHECK_ID
from agent.runtime.statedir import read_status
from doubles import Node, config, disk, make_node
from memstore import FakeClock, MemoryStore

P1, P2 = PathKey("d1", 1), PathKey("d1", 2)


def one(tmp_path: Path, store: MemoryStore, clock: FakeClock, name: str = "gwa", **kw: object) -> Node:
    n = make_node(tmp_path, store, clock, name, disks={"d1": disk("d1"), "d2": disk("d2")}, **kw)  # type: ignore[arg-type]
    n.start()
    return n


def serve_all(n: Node, rounds: int = 4) -> None:
    for _ in range(rounds):
        n.step()


def test_a_node_takes_exports_and_brings_up_every_path(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    assert n.serving() == {"d1/1", "d1/2"}
    assert set(n.target.served) == {P1, P2}
    assert store.holder(P1) == n.session
    # each address only once its path is exported
    order = [(op, p) for _, op, p in n.target.log]
    for p in ("d1/1", "d1/2"):
        assert order.index(("export", p)) < order.index(("up", p))
    assert n.watchdog.pets and n.watchdog.pets[-1] == n.agent.fencer.serve_until
    assert keys.node_key(store.prefix, "gwa") in store.kv


def test_c1_slow_export_during_a_partition_never_brings_its_address_up(tmp_path: Path, store: MemoryStore,
                                                                       clock: FakeClock) -> None:
    """C1: an export that takes 10 s while the node is cut off: the fencer (its own thread) fences at the
    deadline, and the address of the slow path is never brought up afterwards."""
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    n.agent.keeper.confirm_once()
    n.agent.watcher.poll_once()
    n.agent.cycle()                              # acquires both paths
    n.agent.watcher.poll_once()
    deadline = n.agent.fencer.serve_until

    def slow(path: PathKey) -> None:
        n.agent.store.partitioned = True         # type: ignore[attr-defined]
        clock.advance(10.0)
        n.agent.fencer.check()                   # the fencer thread runs during the export
    n.target.during_export = slow
    for _ in range(4):
        n.agent.cycle()
    assert n.agent.fencer.fenced
    ups_after = [t for t, op, _ in n.network.log if op == "up" and t >= deadline]
    assert ups_after == [], f"an address came up after the deadline {deadline}: {n.network.log}"
    assert n.serving() == set()


def test_c2_fence_needs_no_answer_from_the_target(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    """C2: the target daemon does not answer (exported() fails) when the lease runs out: the addresses
    still go down at the deadline, then the data path is stopped in one step."""
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    assert n.serving() == {"d1/1", "d1/2"}
    n.target.unknown = True
    n.agent.store.partitioned = True             # type: ignore[attr-defined]
    deadline = n.agent.fencer.serve_until
    clock.t = deadline
    n.agent.fencer.check()
    assert n.serving() == set()
    assert n.target.fences == 1
    downs = [t for t, op, _ in n.network.log if op == "down"]
    assert downs and max(downs) <= deadline
    assert [op for _, op, _ in n.target.log][-3:] == ["down", "down", "fence"], "addresses first"
    n.target.unknown = True
    n.agent.cycle()                              # and the loop copes with the silent target
    assert n.agent.report.target_known is False and n.serving() == set()


def test_c2_a_target_that_cannot_tell_for_long_is_fenced_and_its_paths_recovered(
        tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.target.unknown = True
    n.step()
    clock.advance(TARGET_UNKNOWN_FENCE + 0.1)
    n.agent.keeper.confirm_once()
    n.agent.cycle()                              # fences: killing the wedged daemon is what cures it
    assert n.target.fences == 1 and not n.target.unknown
    serve_all(n)
    assert n.serving() == {"d1/1", "d1/2"}, "re-exported once the fenced backend answers again"


def test_c3_a_stopping_disk_is_let_go_only_after_its_address_and_export(tmp_path: Path, store: MemoryStore,
                                                                      clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.target.unexport_fails = {P2}
    store.set(keys.disk_key(store.prefix, "d1"), b'{"pool":"rbd","image":"pathagent-d1","stopping":true}')
    serve_all(n)
    assert store.holder(P1) is None, "released after address down and unexport"
    assert store.holder(P2) == n.session, "kept: its unexport failed, so it may still be served here"
    assert P2 not in n.network.up_paths
    n.target.unexport_fails = set()
    serve_all(n)
    assert store.holder(P2) is None and not n.target.served


def test_c4_the_watchdog_is_pet_only_after_confirmations(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 1)
    n = one(tmp_path, store, clock)
    serve_all(n)
    pets = len(n.watchdog.pets)
    n.agent.store.partitioned = True             # type: ignore[attr-defined]
    for _ in range(10):
        clock.advance(0.5)
        n.step()
    assert len(n.watchdog.pets) == pets, "no pet without a confirmation"
    assert n.watchdog.pets[-1] <= clock.now(), "the last deadline passed: the watchdog acts"
    assert n.serving() == set()


def test_h2_liveness_check_is_registered_passed_while_healthy_and_not_when_fenced(
        tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 1)
    n = one(tmp_path, store, clock)
    serve_all(n)
    sid = n.session
    assert sid is not None and f"gwa:{CHECK_ID}" in store.sessions[sid].checks
    assert store.sessions[sid].ttl == 30.0
    passed = store.checks[f"gwa:{CHECK_ID}"].passed_at
    clock.advance(3.1)                           # passed every fifth of its TTL (15 s)
    n.step()
    assert store.checks[f"gwa:{CHECK_ID}"].passed_at > passed
    # the main loop stalls: confirmations go on, the check is no longer passed, Consul ends the session
    clock.advance(16.0)
    n.agent.keeper.confirm_once()
    store.expire_checks()
    assert sid not in store.sessions, "a stalled agent's session is invalidated by its check"


def test_h3_stray_address_goes_down_and_release_waits_for_it(tmp_path: Path, store: MemoryStore,
                                                             clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.target.served.pop(P1)                      # the target lost P1 (daemon restarted) but its IP is up
    before = len(n.target.log)
    n.step(rounds=1)
    after = [(op, p) for _, op, p in n.target.log[before:]]
    assert after[:2] == [("down", "d1/1"), ("export", "d1/1")], "the address goes down before the re-export"
    serve_all(n)
    assert n.serving() == {"d1/1", "d1/2"}
    # an address that will not go down keeps its path locked here
    n.network.down_fails = {P2}
    store.set(keys.disk_key(store.prefix, "d1"), b'{"pool":"rbd","image":"pathagent-d1","stopping":true}')
    serve_all(n)
    assert store.holder(P2) == n.session
    assert store.holder(P1) is None


def test_h4_adopted_session_with_a_shorter_lock_delay_is_replaced_without_an_outage(
        tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    cfg_old = config(tmp_path / "gwa", lock_delay=5.0, fence_after=3.0)
    n = make_node(tmp_path, store, clock, "gwa", cfg=cfg_old, disks={"d1": disk("d1")})
    n.start()
    serve_all(n)
    old = n.session
    assert old is not None and store.sessions[old].lock_delay == 5.0
    # planned restart with a longer lock-delay: a new process on the same state and data path
    m = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    m.target.served, m.network.up_paths = n.target.served, n.network.up_paths
    n.agent.state.unlock()
    m.start()
    new = m.session
    assert new != old and old not in store.sessions
    assert store.sessions[new].lock_delay == 8.0
    assert store.holder(P1) == new and store.holder(P2) == new, "the locks moved"
    assert store.kv[keys.leader_key(store.prefix)].session == new, "leadership moved too (no lock-delay)"
    assert m.target.fences == 0 and m.serving() == {"d1/1", "d1/2"}, "nothing stopped serving"
    serve_all(m)
    assert m.serving() == {"d1/1", "d1/2"}


def test_adopting_a_matching_session_keeps_everything(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    m = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    m.target.served, m.network.up_paths = n.target.served, n.network.up_paths
    n.agent.state.unlock()
    m.start()
    assert m.session == n.session and m.target.fences == 0
    serve_all(m)
    assert m.serving() == {"d1/1", "d1/2"}


def test_h5_a_poisoned_value_is_skipped_and_everything_else_served(tmp_path: Path, store: MemoryStore,
                                                                    clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    store.set(keys.move_key(store.prefix, PathKey("d1", 1)), b"[" * 100000, session=None)
    store.set(f"{store.prefix}/disks/d2", b"[" * 100000)
    store.set(f"{store.prefix}/disks/d2/1", b"\xff\xfe")
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    serve_all(n)
    assert n.serving() == {"d1/1", "d1/2"}
    view = n.agent.watcher.latest()
    assert view is not None and {k for k, _ in view.skipped} >= {f"{store.prefix}/disks/d2"}
    assert "d2" in n.agent.report.bad_disks and "d2" not in n.agent.definitions.current()[0]


def test_m2_a_held_path_this_node_cannot_serve_is_surrendered(tmp_path: Path, store: MemoryStore,
                                                             clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    del n.catalog.disks["d1"]                   # the definition was never readable by this node...
    n.agent.definitions._defs.clear()           # ...(a fresh process): nothing to keep serving
    n.target.served.clear()
    n.network.up_paths.clear()
    serve_all(n)
    assert store.holder(P1) == n.session
    clock.advance(UNSERVICEABLE_AFTER + 1)
    serve_all(n)
    assert store.holder(P1) is None and store.holder(P2) is None, "given up for another node to serve"
    assert n.agent.backoff.until[P1] > clock.now() + SURRENDER_BLOCK - 2


def test_session_invalidated_fences_at_once_and_starts_over(tmp_path: Path, store: MemoryStore,
                                                          clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    old = n.session
    assert old is not None
    store.invalidate(old)
    n.agent.keeper.confirm_once()
    assert n.serving() == set() and n.target.fences == 1 and n.session is None
    clock.advance(8.1)                           # the lock-delay of the invalidated session
    n.agent.keeper.establish(n.agent.maybe_serving)
    serve_all(n)
    assert n.session not in (None, old) and n.serving() == {"d1/1", "d1/2"}


def test_fenced_node_unfences_only_after_reading_the_keys_again(tmp_path: Path, store: MemoryStore,
                                                               clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    part = n.agent.store
    part.partitioned = True                      # type: ignore[attr-defined]
    clock.advance(4.5)
    n.step()
    assert n.agent.fencer.fenced and n.serving() == set()
    part.partitioned = False                     # type: ignore[attr-defined]
    n.agent.keeper.confirm_once()                # lease valid again...
    part.partitioned = True                      # type: ignore[attr-defined] ...but the keys cannot be read
    n.agent.cycle()
    assert n.agent.fencer.fenced, "no unfence from a view that may predate the partition"
    part.partitioned = False                     # type: ignore[attr-defined]
    serve_all(n)
    assert not n.agent.fencer.fenced and n.serving() == {"d1/1", "d1/2"}


def test_batch_acquire_and_a_rolled_back_batch_falls_back_to_one_by_one(tmp_path: Path, store: MemoryStore,
                                                                        clock: FakeClock) -> None:
    for i in range(20):
        store.start_disk(f"e{i:02d}", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={f"e{i:02d}": disk(f"e{i:02d}") for i in range(20)})
    n.start()
    n.agent.keeper.confirm_once()
    n.agent.watcher.poll_once()
    assert n.agent.fencer.unfence()              # (a cycle would first read the keys afresh)
    store.set(keys.path_key(store.prefix, PathKey("e05", 1)))    # changed since the view: the batch rolls back
    n.agent.cycle()
    held = [p for p in (PathKey(f"e{i:02d}", j) for i in range(20) for j in (1, 2)) if store.holder(p)]
    assert len(held) == 39, "every path but the changed one, the first batch of 32 one by one"
    txns = store.calls.count("txn")
    serve_all(n)
    assert store.holder(PathKey("e05", 1)) == n.session
    assert txns < 45


def _two_serving(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> tuple[Any, Any]:
    """Two nodes serving d1 (two paths): (the owner of path 1, the other)."""
    store.start_disk("d1", 2)
    a = one(tmp_path, store, clock, "gwa")
    b = one(tmp_path, store, clock, "gwb")
    for _ in range(3):
        a.step()
        b.step()
    return (a, b) if store.holder(P1) == a.session else (b, a)


def _request_move(store: MemoryStore, path: PathKey, to: Any) -> None:
    """What `pathagent path move` writes: a move key locked by a CLI session."""
    cli = store.create_session("cli", "pathagent-cli", (), 0.0, 10.0, "delete")
    store._txn([("lock", keys.move_key(store.prefix, path), cli, ('{"node":"%s"}' % to.agent.node).encode())])


def test_move_request_hands_a_path_over(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    owner, other = _two_serving(tmp_path, store, clock)
    _request_move(store, P1, other)
    for _ in range(3):
        owner.step()
        other.step()
    assert store.holder(P1) == other.session
    assert "d1/1" in other.serving() and "d1/1" not in owner.serving()


def test_a_planned_move_goes_silent_and_the_new_owner_tickles_the_old_connections(
        tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    """The holder takes the address down before it unexports (no goodbye can leave: the connections go
    silent), records the connections it saw in the released key, and the new owner tickles exactly those
    once its address is up; an acquire that carries connections keeps them in its lock value."""
    owner, other = _two_serving(tmp_path, store, clock)
    peers = (("198.18.0.50", 40000, 3260),)
    owner.network.conns[P1] = peers
    _request_move(store, P1, other)
    owner.step()
    assert store.holder(P1) is None
    assert decode_peers(store.kv[keys.path_key(store.prefix, P1)].value) == peers
    ops = [op for _, op, p in owner.network.log if p == "d1/1"]
    assert ops[-2:] == ["down", "unexport"], f"the address goes before the export: {owner.network.log}"
    for _ in range(3):
        other.step()
    assert store.holder(P1) == other.session and "d1/1" in other.serving()
    assert decode_peers(store.kv[keys.path_key(store.prefix, P1)].value) == peers
    assert other.network.tickles == [(P1, peers)]
    ops = [op for _, op, p in other.network.log if p == "d1/1"]
    assert ops.index("up") < ops.index("tickle")
    assert owner.network.tickles == [] and P2 not in dict(other.network.tickles)


def test_two_nodes_never_have_the_same_address_up(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    """A node cut off: it fences itself at its deadline; the other takes the paths only after the
    lock-delay; at no step are both serving one path."""
    store.start_disk("d1", 2)
    store.start_disk("d2", 2)
    a = one(tmp_path, store, clock, "gwa")
    b = one(tmp_path, store, clock, "gwb")
    for _ in range(3):
        a.step()
        b.step()
    a.agent.store.partitioned = True             # type: ignore[attr-defined]
    sid = a.session
    assert sid is not None
    store.invalidate(sid)                        # worst case: invalidated right after its last confirmation
    for _ in range(40):
        clock.advance(0.25)
        a.step()
        b.step()
        assert not (a.serving() & b.serving()), f"served twice at {clock.now()}"
    assert b.serving() == {"d1/1", "d1/2", "d2/1", "d2/2"}


def test_orderly_stop_takes_everything_down_releases_and_disarms(tmp_path: Path, store: MemoryStore,
                                                                clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    sid = n.session
    n.agent.shutdown()
    assert n.serving() == set() and not n.target.served
    assert store.holder(P1) is None and sid not in store.sessions
    assert n.watchdog.disarmed


def test_orderly_stop_keeps_the_session_when_the_target_cannot_tell(tmp_path: Path, store: MemoryStore,
                                                                   clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    sid = n.session
    n.target.unknown, n.target.cured_by_fence = True, False
    n.agent.shutdown()
    assert n.serving() == set(), "addresses down anyway"
    assert n.target.fences >= 1, "and the data path stopped in one step"
    assert sid in store.sessions and not n.watchdog.disarmed


def test_new_session_never_vouches_for_what_an_earlier_one_served(tmp_path: Path, store: MemoryStore,
                                                                 clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    store.invalidate(n.session or "")            # while no agent runs
    m = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    m.target.served, m.network.up_paths = dict(n.target.served), set(n.network.up_paths)
    n.agent.state.unlock()
    m.start()
    assert m.target.fences == 1 and m.serving() == set(), "fenced before a new session was made"


def test_inherited_deadline_is_clamped(tmp_path: Path) -> None:
    from agent.runtime.statedir import StateDir
    s = StateDir(str(tmp_path))
    s.record_serve_until(5000.0, "boot-1")
    assert s.serve_until(1000.0, "boot-1", 4.0) == 1004.0, "a deadline in the future is capped"
    assert s.serve_until(6000.0, "boot-1", 4.0) == 6000.0
    assert s.serve_until(1000.0, "boot-2", 4.0) == 1000.0, "another boot: nothing inherited"
    (tmp_path / "lease.json").write_text('{"boot_id": "boot-1", "serve_until": NaN}')
    assert s.serve_until(1000.0, "boot-1", 4.0) == 1000.0


def test_planned_placement_even_with_two_nodes(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    disks_ = {f"e{i}": disk(f"e{i}") for i in range(6)}
    for d in disks_:
        store.start_disk(d, 2)
    cfg = dataclasses.replace(config(tmp_path), placement_settle=1.0)
    a = make_node(tmp_path, store, clock, "gwa", cfg=cfg, disks=disks_)
    b = make_node(tmp_path, store, clock, "gwb", cfg=cfg, disks=disks_)
    a.start()
    b.start()
    a.step()
    b.step()                                     # both register while settling
    clock.advance(1.1)
    for _ in range(4):
        a.step()
        b.step()
    assert len(a.serving()) == len(b.serving()) == 6
    assert not a.serving() & b.serving()


# --- found by the review of this loop ---------------------------------------------------------------------

def test_a_node_whose_watchdog_cannot_be_pet_does_not_serve(tmp_path: Path, store: MemoryStore,
                                                            clock: FakeClock) -> None:
    """A required watchdog: without a working backstop, a frozen agent's data path would outlive the
    liveness hand-over, so a node that cannot pet it serves nothing and stops reporting liveness."""
    from agent.errors import TransientBackendError
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})

    def broken(deadline: float, session: str = "") -> None:
        raise TransientBackendError("guard exited at start")
    n.watchdog.pet = broken                      # type: ignore[method-assign]
    n.start()
    for _ in range(4):
        n.step()
    assert n.serving() == set() and not n.target.served
    assert n.agent.keeper.watchdog_error and "guard exited" in n.agent.keeper.watchdog_error
    passed = store.checks[f"gwa:{CHECK_ID}"].passed_at
    clock.advance(5)
    n.step()
    assert store.checks[f"gwa:{CHECK_ID}"].passed_at == passed, "no liveness without a watchdog"


def test_a_stalled_address_up_neither_blocks_the_fence_nor_comes_up_late(tmp_path: Path, store: MemoryStore,
                                                                          clock: FakeClock) -> None:
    import threading
    store.start_disk("d1", 1)
    n = one(tmp_path, store, clock)
    n.agent.keeper.confirm_once()
    n.agent.watcher.poll_once()
    n.agent.cycle()
    n.agent.watcher.poll_once()
    n.agent.cycle()                              # acquired, exported
    deadline = n.agent.fencer.serve_until
    blocked: list[bool] = []

    def stall(p: PathKey) -> None:               # up() stalls (netlink, a fork) while the lease runs out
        clock.t = deadline + 5.0
        t = threading.Thread(target=n.agent.fencer.check)
        t.start()
        t.join(1.0)
        blocked.append(t.is_alive())
    n.network.during_up = stall
    n.agent.cycle()
    assert blocked == [False], "the fencer did not wait for the address being added"
    assert n.agent.fencer.fenced and n.target.fences == 1
    assert [t for t, op, _ in n.network.log if op == "up"] == [], "no address came up after the deadline"


def test_a_session_replacement_is_not_fenced_by_a_confirmation_in_between(tmp_path: Path, store: MemoryStore,
                                                                          clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.agent.state.unlock()
    m = make_node(tmp_path, store, clock, "gwa", cfg=config(tmp_path / "gwa", lock_delay=9.0),
                  disks={"d1": disk("d1")})
    m.target.served, m.network.up_paths = dict(n.target.served), set(n.network.up_paths)
    real = store.destroy_session

    def destroy(sid: str) -> None:               # the confirmer thread runs right after the old one goes
        real(sid)
        m.agent.keeper.confirm_once()
    store.destroy_session = destroy              # type: ignore[method-assign]
    m.start()
    store.destroy_session = real                 # type: ignore[method-assign]
    assert m.target.fences == 0 and m.serving() == {"d1/1", "d1/2"}


def test_a_failed_read_right_after_adopting_tears_nothing_down(tmp_path: Path, store: MemoryStore,
                                                              clock: FakeClock) -> None:
    from agent.errors import CoordinationError
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.agent.state.unlock()
    m = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    m.target.served, m.network.up_paths = dict(n.target.served), set(n.network.up_paths)
    m.start()                                    # adopted

    def blip() -> None:
        raise CoordinationError("consul kv read: timed out after 1s")
    real, m.agent.watcher.refresh = m.agent.watcher.refresh, blip   # type: ignore[method-assign,assignment]
    m.agent.cycle()
    assert m.serving() == {"d1/1", "d1/2"}, "one failed read does not tear down a planned restart"
    m.agent.watcher.refresh = real               # type: ignore[method-assign]
    serve_all(m)
    assert m.serving() == {"d1/1", "d1/2"} and m.target.fences == 0


def test_a_target_that_never_answers_gives_its_paths_up(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = one(tmp_path, store, clock)
    serve_all(n)
    n.target.unknown, n.target.cured_by_fence = True, False

    def no(path: PathKey) -> None:
        raise RuntimeError("the target daemon does not start")
    n.target.during_export = no
    for _ in range(200):                         # 100 s
        clock.advance(0.5)
        n.step()
        if store.holder(P1) is None and store.holder(P2) is None:
            break
    assert store.holder(P1) is None and store.holder(P2) is None, "surrendered after a completed fence"
    assert n.serving() == set()


def test_a_failed_fence_is_retried_part_by_part_with_backoff(tmp_path: Path, store: MemoryStore,
                                                             clock: FakeClock) -> None:
    store.start_disk("d1", 1)
    n = one(tmp_path, store, clock)
    serve_all(n)
    calls: list[float] = []

    def bad() -> None:
        calls.append(clock.now())
        raise RuntimeError("iproute record unreadable")
    n.network.fence = bad                        # type: ignore[method-assign]
    n.agent.fencer.fence("test")
    for _ in range(40):
        clock.advance(0.5)
        n.agent.fencer.check()
    assert n.target.fences == 1, "the data path is stopped once, not again at every retry"
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert len(calls) >= 4 and gaps[:3] == [1.0, 2.0, 4.0], gaps
    assert n.agent.fencer.events == 1


def test_the_loop_pings_systemd_while_consul_keeps_refusing_a_session(tmp_path: Path, store: MemoryStore,
                                                                      clock: FakeClock) -> None:
    """The loop is healthy when it is Consul that does not answer: no restart by systemd's watchdog."""
    from agent.runtime.notify import Notifier
    store.start_disk("d1", 1)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    sent: list[str] = []
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "20000000"})
    notifier.send = sent.append                  # type: ignore[method-assign]
    n.agent.notifier = notifier
    n.agent.store.partitioned = True             # type: ignore[attr-defined]
    waits = 0

    def wait(t: float) -> bool:
        nonlocal waits
        waits += 1
        clock.advance(t)
        if waits > 12:
            n.agent.stop()
        return False
    n.agent.wakeup.wait = wait                   # type: ignore[method-assign]
    n.agent.start_threads = lambda: None         # type: ignore[method-assign]
    n.agent.shutdown = lambda: None              # type: ignore[method-assign]
    n.agent.run()
    assert sent.count("WATCHDOG=1") >= 10 and "READY=1" not in sent


# --- names beside ids: every log line about a disk or a path, and the status ------------------------------

def test_label_names_the_disk_where_known() -> None:
    names = {"d15c0001": "vm"}
    assert label(PathKey("d15c0001", 1), names) == "d15c0001/1 (vm)"
    assert label("d15c0001", names) == "d15c0001 (vm)"
    assert label(PathKey("other", 2), names) == "other/2"
    assert label("other", {}) == "other"


def test_log_lines_about_a_path_carry_the_disk_name(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store.start_disk("d1", 1)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": dataclasses.replace(disk("d1", 1), name="vm")})
    n.start()
    for _ in range(3):
        n.step()
    text = [r.getMessage() for r in caplog.records]
    for what in ("acquired d1/1 (vm)", "exported d1/1 (vm) as iqn.2016-05.io.pathagent:d1",
                 "address of d1/1 (vm) up: "):
        assert any(line.startswith(what) for line in text), (what, text)


def test_a_bad_disk_is_named_in_the_log_and_the_status(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store.start_disk("d1", 1)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": dataclasses.replace(disk("d1", 1), name="vm")})
    n.start()
    n.step()
    caplog.set_level(logging.INFO)
    good = n.catalog.get

    def bad(disk_id: str, pool: str, image: str, version: int) -> Any:
        raise DefinitionError(disk_id, "paths[0].ip", "not an IPv4 address")
    n.catalog.get = bad  # type: ignore[method-assign]
    n.step()
    assert any(r.getMessage().startswith("disk d1 (vm) skipped: field 'paths[0].ip'") for r in caplog.records)
    st = read_status(n.agent.cfg.state_dir)
    assert st["bad_disks"] == {"d1": "field 'paths[0].ip': not an IPv4 address"} and st["disk_names"] == {"d1": "vm"}
    n.catalog.get = good  # type: ignore[method-assign]
    n.step()
    assert any(r.getMessage() == "disk d1 (vm): definition readable again" for r in caplog.records)
    assert read_status(n.agent.cfg.state_dir)["disk_names"] == {}


def test_gateways_on_different_backends_are_warned_of_once(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from agent.core.tree import node_value
    n = make_node(tmp_path, store, clock, "gwa")
    n.start()
    n.step()
    caplog.set_level(logging.INFO)
    sid = store.create_session("gwx", "iSCSITarget", (), 15.0)
    store.set(keys.node_key(store.prefix, "gwx"), node_value("gwx", sid, clock.wall(), "lio"), session=sid)
    for _ in range(3):
        n.step()
    warned = [r.getMessage() for r in caplog.records if "different target backends" in r.getMessage()]
    assert warned == ["the live gateways run different target backends (fake on gwa; lio on gwx): initiators "
                      "see the paths of a disk on different LUNs; run one backend on every gateway "
                      "(docs/upgrades.md)"], "once, not every cycle"
    store.invalidate(sid)
    n.step()
    assert any(r.getMessage() == "the live gateways run one target backend again (fake)" for r in caplog.records)


def test_no_session_while_the_catalog_has_this_name_under_another_node_id(tmp_path: Path, store: MemoryStore,
                                                                        clock: FakeClock) -> None:
    """A host reinstalled under its old name comes back before its old Consul member failed: the servers
    keep the old node ID and refuse the new agent's registration, so its health checks never reach them.
    A session made then would outlive a frozen or cut-off agent: none is made until the catalog agrees."""
    from agent.errors import CoordinationError
    store.start_disk("d1", 2)
    store.catalog_ok = False
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    with pytest.raises(CoordinationError, match="another node ID"):
        n.start()
    assert n.session is None and not store.sessions and n.serving() == set()
    store.catalog_ok = None                      # cannot tell (no permission to read the catalog): go on
    n.agent.keeper.establish(n.agent.maybe_serving)
    serve_all(n)
    assert n.session is not None and n.serving() == {"d1/1", "d1/2"}
