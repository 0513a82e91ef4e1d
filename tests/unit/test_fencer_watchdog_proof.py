"""Tier 1: the agent's fencer counts what the watchdog proved by itself for our session (the guard's
confirmations while the agent was frozen), reading it from memory at check time, and nothing else.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from agent.core.model import PathKey
from agent.runtime.fencer import Fencer
from doubles import MemNetwork, MemTarget, disk, make_node
from memstore import FakeClock, MemoryStore
from plugins.guard import shared

SID, OTHER = "3f0c6a4e-0000-4000-8000-000000000001", "3f0c6a4e-0000-4000-8000-000000000002"
F = 4.0


def fencer() -> tuple[Fencer, FakeClock, MemTarget]:
    clock = FakeClock()
    target, network = MemTarget(clock), MemNetwork(clock)
    network.up_paths = {PathKey("d1", 1)}
    target.served = {PathKey("d1", 1): disk("d1")}
    f = Fencer(network, target, clock)
    f.extend(clock.now() + F)
    assert f.unfence()
    return f, clock, target


def test_the_fencer_does_not_fence_while_the_watchdog_proved_our_session() -> None:
    f, clock, target = fencer()
    proved = {"until": -math.inf}
    f.follow(lambda: proved["until"], F)
    clock.advance(F - 0.5)
    proved["until"] = clock.now() + 3.0                  # the guard confirmed while we were frozen
    clock.advance(1.0)                                   # thawed past our own deadline
    assert not f.check() and f.allowed() and target.fences == 0
    assert f.deadline() == proved["until"] and f.serve_until < clock.now()
    clock.advance(2.5)                                   # and past the guard's
    assert f.check() and target.fences == 1


@pytest.mark.parametrize("proof", ["too far ahead", "raises", "nan", "unfollowed"])
def test_the_fencer_counts_no_implausible_or_broken_proof(proof: str) -> None:
    f, clock, target = fencer()

    def broken() -> float:
        raise OSError("unmapped")
    source = {"too far ahead": lambda: clock.now() + F + 0.5, "raises": broken, "nan": lambda: math.nan,
              "unfollowed": lambda: clock.now() + 1.0}[proof]
    f.follow(source, F)
    if proof == "unfollowed":
        f.follow(None)
    clock.advance(F + 0.01)
    assert f.check() and target.fences == 1


def test_the_fencer_reads_the_guards_page_through_the_watchdog(tmp_path: Path) -> None:
    """The real path: the guard's writer, the client's reader (as GuardWatchdog.confirmed reads it)."""
    f, clock, target = fencer()
    w = shared.Writer(shared.path(str(tmp_path), "0123456789ab", base=str(tmp_path)))
    r = shared.Reader(w.file)
    r.refresh()
    try:
        f.follow(lambda: r.read(SID), F)
        clock.advance(F - 0.1)
        w.publish(clock.now() + 2.0, SID)
        clock.advance(1.0)
        assert not f.check()
        w.publish(clock.now() + 2.0, OTHER)              # a proof for another session counts for nothing
        assert f.check() and target.fences == 1
    finally:
        w.close()


def test_the_agent_pets_with_its_session_and_thaws_without_a_fence_while_the_guard_proved_it(
        tmp_path: Path) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    for _ in range(4):
        n.step()
    sid = n.session
    assert sid and n.serving() == {"d1/1", "d1/2"}
    assert n.watchdog.sessions and set(n.watchdog.sessions) == {sid}, "every pet names the session"
    # frozen for 12 s: no confirmation of ours; the guard proved the session meanwhile
    for _ in range(24):
        clock.advance(0.5)
        n.watchdog.proved[sid] = clock.now() + n.agent.keeper.lease.fence_after - 0.5
    assert clock.now() > n.agent.fencer.serve_until
    assert not n.agent.fencer.check(), "fenced although the guard proved our session"
    n.step()                                     # thawed: its own confirmation again
    assert n.serving() == {"d1/1", "d1/2"} and n.target.fences == 0
    # the same thaw without the guard's proof fences
    for _ in range(24):
        clock.advance(0.5)
    n.watchdog.proved.clear()
    assert n.agent.fencer.check() and n.target.fences == 1 and not n.serving()
