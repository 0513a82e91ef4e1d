"""Tier 1: the guard's own confirmations of the agent's session (``plugins.guard.confirm``), the page it
shares with the agent's fencer (``plugins.guard.shared``).

The arithmetic is the agent's rule: a confirmation sent at t proves t + fence_after, whenever it is
answered, and nothing else extends a deadline. The guard's loop is driven in-process on a fake clock with
outcomes handed to it as its confirmer thread would (no HTTP here: the real Consul is in
tests/contract/test_watchdog_guard.py)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import pytest

from agent.config import ConsulConfig
from agent.core.model import PathKey
from doubles import MemNetwork, MemTarget, disk
from memstore import FakeClock
from plugins.guard import confirm, shared
from plugins.guard.confirm import Outcome
from plugins.guard.server import Guard

SID, OTHER = "3f0c6a4e-0000-4000-8000-000000000001", "3f0c6a4e-0000-4000-8000-000000000002"
F, L, I = 4.0, 8.0, 0.5


# --- the arithmetic ------------------------------------------------------------------------------------

@pytest.mark.parametrize("answered_after", [0.001, 1.0, 3.9, 4.0, 10.0, 100.0])
def test_a_confirmation_proves_its_send_time_plus_fence_after_however_late_the_answer(answered_after: float) -> None:
    o = Outcome(SID, sent=100.0, answered=100.0 + answered_after, valid=True, lock_delay=L)
    assert confirm.proved(o, F, L) == 100.0 + F


@pytest.mark.parametrize("session_lock_delay, fence_after", [(8.0, 4.0), (10.0, 4.0), (7.0, 3.0), (5.5, 1.5)])
def test_a_session_with_a_shorter_lock_delay_proves_less(session_lock_delay: float, fence_after: float) -> None:
    o = Outcome(SID, sent=50.0, answered=50.1, valid=True, lock_delay=session_lock_delay)
    assert confirm.proved(o, F, L) == pytest.approx(50.0 + fence_after)


@pytest.mark.parametrize("o", [Outcome(SID, 1.0, 1.1, gone=True), Outcome(SID, 1.0, 2.0, error="timed out"),
                               Outcome(SID, 1.0, 1.1)])
def test_a_failed_or_negative_confirmation_proves_nothing(o: Outcome) -> None:
    assert confirm.proved(o, F, L) is None


@pytest.mark.parametrize("now, last_pet, last_sent, want", [
    (10.0, 9.5, -math.inf, False),      # pets on time
    (10.0, 9.0, -math.inf, False),      # exactly 2 intervals: not yet late
    (10.0, 8.9, -math.inf, True),       # late, never confirmed
    (10.0, 5.0, 9.7, False),            # late, confirmed 0.3 s ago
    (10.0, 5.0, 9.5, True),             # late, confirmed one interval ago
])
def test_the_guard_confirms_only_while_pets_are_late_every_interval(now: float, last_pet: float,
                                                                    last_sent: float, want: bool) -> None:
    assert confirm.due(now, last_pet, last_sent, I) is want


# --- the shared page -----------------------------------------------------------------------------------

def test_a_record_names_its_session_and_boot_and_detects_tearing() -> None:
    raw = shared.pack(123.5, SID, "boot-a")
    assert len(raw) == shared.RECORD
    assert shared.unpack(raw, SID, "boot-a") == 123.5
    assert shared.unpack(raw, OTHER, "boot-a") == -math.inf
    assert shared.unpack(raw, SID, "boot-b") == -math.inf
    assert shared.unpack(raw, "", "boot-a") == -math.inf
    assert shared.unpack(bytes(shared.RECORD), SID, "boot-a") == -math.inf
    other = shared.pack(999.0, SID, "boot-a")
    for cut in range(4, shared.RECORD, 4):       # half old, half new record: refused
        torn = other[:cut] + raw[cut:]
        if torn not in (raw, other):
            assert shared.unpack(torn, SID, "boot-a") == -math.inf, cut


def test_writer_and_reader_share_one_page(tmp_path: Path) -> None:
    f = shared.path(str(tmp_path), "0123456789ab", base=str(tmp_path))
    r = shared.Reader(f)
    assert r.read(SID) == -math.inf              # nothing mapped yet
    w = shared.Writer(f)
    r.refresh()
    assert r.read(SID) == -math.inf              # mapped, nothing published
    w.publish(77.25, SID)
    assert r.read(SID) == 77.25 and r.read(OTHER) == -math.inf
    w.publish(78.0, SID)                         # the same mapping sees every later write
    assert r.read(SID) == 78.0
    w.clear()
    assert r.read(SID) == -math.inf
    w.publish(79.0, SID)
    w.close()                                    # the guard exits: cleared and removed
    assert not os.path.exists(f) and r.read(SID) == -math.inf
    r.refresh()
    assert r.read(SID) == -math.inf


def test_a_reader_refuses_a_page_others_may_write(tmp_path: Path) -> None:
    f = shared.path(str(tmp_path), "0123456789ab", base=str(tmp_path))
    w = shared.Writer(f)
    w.publish(5000.0, SID)
    os.chmod(f, 0o622)
    r = shared.Reader(f)
    r.refresh()
    assert r.read(SID) == -math.inf
    os.chmod(f, 0o600)
    r.refresh()
    assert r.read(SID) == 5000.0
    w.close()


# --- the guard's loop, in-process on a fake clock ------------------------------------------------------

class Node:
    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock()
        self.target, self.network = MemTarget(self.clock), MemNetwork(self.clock)
        self.network.up_paths = {PathKey("d1", 1)}
        self.target.served = {PathKey("d1", 1): disk("d1")}
        self.share = shared.Writer(shared.path(str(tmp), "0123456789ab", base=str(tmp)))
        self.reader = shared.Reader(self.share.file)
        self.reader.refresh()
        cfg = ConsulConfig(fence_after=F, lock_delay=L, confirm_interval=I)
        self.guard = Guard(str(tmp), "0123456789ab", self.network, self.target, clock=self.clock.now,
                           consul=cfg, share=self.share)
        self.guard._watch = lambda session: None        # type: ignore[method-assign]  # no thread here

    def pet(self, deadline: float, session: str = SID) -> None:
        msg: dict[str, object] = {"op": "pet", "deadline": deadline}
        if session:
            msg["session"] = session
        assert self.guard.handle(msg)["ok"]

    def outcome(self, o: Outcome) -> None:
        self.guard._apply(o)

    def fenced(self) -> bool:
        return self.target.fences > 0 and not self.network.up_paths


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.share.close()


def test_confirmations_move_the_deadline_to_sent_plus_fence_after_and_publish_it(node: Node) -> None:
    t = node.clock.now()
    node.pet(t + F)
    node.clock.advance(1.5)                              # the agent froze; the guard confirms
    sent = node.clock.now()
    node.clock.advance(0.9)                              # a slow answer
    node.outcome(Outcome(SID, sent, node.clock.now(), valid=True, lock_delay=L))
    assert node.guard.deadline == sent + F and node.guard.confirmed == sent + F
    assert node.reader.read(SID) == sent + F
    # an answer that took longer than fence_after proves a deadline already past: no extension
    node.clock.advance(0.1)
    late_sent = node.clock.now()
    node.clock.advance(F + 1)
    node.outcome(Outcome(SID, late_sent, node.clock.now(), valid=True, lock_delay=L))
    assert node.guard.deadline == late_sent + F < node.clock.now()
    assert not node.fenced()                             # the loop's step fences, not _apply
    # a failure proves nothing and moves nothing
    node.outcome(Outcome(SID, node.clock.now(), node.clock.now(), error="timed out"))
    assert node.guard.deadline == late_sent + F


def test_a_confirmation_that_finds_the_session_gone_fences_at_once(node: Node) -> None:
    t = node.clock.now()
    node.pet(t + F)
    node.clock.advance(1.2)
    node.outcome(Outcome(SID, node.clock.now(), node.clock.now(), valid=True, lock_delay=L))
    assert node.reader.read(SID) > node.clock.now()
    node.clock.advance(0.5)
    node.outcome(Outcome(SID, node.clock.now(), node.clock.now(), gone=True))
    assert node.fenced() and node.guard.deadline is None and node.guard.state == "fenced"
    assert node.reader.read(SID) == -math.inf, "the agent's fencer must not count a gone session"


def test_outcomes_for_another_session_or_after_a_fence_count_for_nothing(node: Node) -> None:
    t = node.clock.now()
    node.pet(t + F)
    node.outcome(Outcome(OTHER, t, t, gone=True))
    node.outcome(Outcome(OTHER, t + 0.1, t + 0.1, valid=True, lock_delay=L))
    assert not node.fenced() and node.guard.deadline == t + F
    # a pet for another session drops what was proved for the old one
    node.clock.advance(1.5)
    node.outcome(Outcome(SID, node.clock.now(), node.clock.now(), valid=True, lock_delay=L))
    assert node.guard.deadline == node.clock.now() + F
    node.pet(node.clock.now() + 1.0, OTHER)
    assert node.guard.deadline == node.clock.now() + 1.0 and node.guard.confirmed == -math.inf
    assert node.reader.read(SID) == -math.inf and node.reader.read(OTHER) == -math.inf
    node.outcome(Outcome(SID, node.clock.now(), node.clock.now(), gone=True))   # the old one: not ours now
    assert not node.fenced()
    # once fenced, a late success does not re-arm it (only a pet does)
    node.clock.advance(1.5)
    node.guard.fence("test")
    node.outcome(Outcome(OTHER, node.clock.now(), node.clock.now(), valid=True, lock_delay=L))
    assert node.guard.deadline is None and node.guard.state == "fenced"


def test_an_older_agents_pet_without_a_session_keeps_the_old_behaviour(node: Node) -> None:
    t = node.clock.now()
    node.pet(t + 3.0, session="")
    assert node.guard.session == "" and node.guard._view is None
    node.outcome(Outcome("", t + 1, t + 1, valid=True, lock_delay=L))
    node.pet(t + 2.0, session="")                        # the newest pet sets the deadline, even an earlier one
    assert node.guard.deadline == t + 2.0


def test_a_pet_for_the_same_session_never_lowers_what_the_guard_proved(node: Node) -> None:
    t = node.clock.now()
    node.pet(t + F)
    node.clock.advance(1.5)
    sent = node.clock.now()
    node.outcome(Outcome(SID, sent, sent, valid=True, lock_delay=L))
    node.pet(sent - 1.0 + F)                             # an agent confirmation sent before ours
    assert node.guard.deadline == sent + F
