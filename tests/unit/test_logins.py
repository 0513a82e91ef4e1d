"""Tier 1: publishing the initiator logins (``agent.runtime.logins``) on the in-memory store: a change is
written, locked by the agent's session, an unchanged answer is not written again, ``None`` writes nothing
(and deletes a stale report once), a backend error keeps the last report (logged once when it starts and
once when it ends), a new session re-locks it, an orderly stop deletes it."""
from __future__ import annotations

import base64
import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import pytest

from agent.adapters.consul_store import TxnOps
from agent.core import keys
from agent.core.store import TxnResult
from agent.core.tree import KVEntry, decode_logins, logins_by_disk, logins_value
from agent.errors import CoordinationError, TransientBackendError
from agent.runtime.logins import LOGINS_EVERY, LoginsPublisher
from doubles import MemTarget, Node, disk, make_node
from memstore import FakeClock, MemoryStore, RealClock

KEY = "pathagent/logins/gwa"
INI1, INI2 = "iqn.1993-08.org.debian:01:aaa", "iqn.1993-08.org.debian:01:bbb"


class MemTxn:
    """``ConsulStore.txn`` on the in-memory store (what the agent gets as its ``logins_store``): the
    operations a ``TxnOps`` holds, run by the store's own all-or-nothing transaction."""

    def __init__(self, store: Any) -> None:
        self.store = store          # a MemoryStore, or one node's MemoryStoreView (partitions apply)
        self.calls = 0

    def txn(self, ops: TxnOps) -> TxnResult:
        self.calls += 1
        out: list[tuple[str, str, object, object]] = []
        for op in ops.ops:
            kv = op["KV"]
            value = base64.b64decode(kv["Value"]) if "Value" in kv else b""
            if kv["Verb"] in ("lock", "unlock"):
                out.append((kv["Verb"], kv["Key"], kv["Session"], value))
            elif kv["Verb"] == "check-session":
                out.append(("check-session", kv["Key"], kv["Session"], None))
            elif kv["Verb"] == "delete":
                out.append(("delete", kv["Key"], None, None))
            else:
                raise AssertionError(kv["Verb"])
        res: TxnResult = self.store._txn(out)
        return res


class Logins:
    """``TargetBackend.logged_in`` answers for a test: a mapping, ``None``, or an exception to raise."""

    def __init__(self, answer: Mapping[str, frozenset[str]] | None | Exception = None) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> Mapping[str, frozenset[str]] | None:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def node(tmp_path: Path, store: MemoryStore, clock: FakeClock, answer: Any = None) -> tuple[Node, Logins, MemTxn]:
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1"), "d2": disk("d2")})
    logins = Logins(answer)
    n.target.logged_in = logins  # type: ignore[method-assign]
    kv = MemTxn(n.agent.store)
    n.agent.logins.kv = kv
    n.start()
    return n, logins, kv


def report(store: MemoryStore) -> tuple[KVEntry, tuple[str, str, Mapping[str, frozenset[str]]] | None] | None:
    k = store.kv.get(KEY)
    if k is None:
        return None
    e = KVEntry(KEY, k.value, k.modify_index, k.create_index, k.lock_index, k.session)
    return e, decode_logins(k.value)


def later(n: Node, clock: FakeClock, seconds: float = LOGINS_EVERY) -> None:
    clock.advance(seconds)
    n.step()


def test_a_change_is_written_locked_by_the_agents_session(tmp_path: Path, store: MemoryStore,
                                                          clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n, logins, _ = node(tmp_path, store, clock, {"d1": frozenset({INI2, INI1})})
    n.step()
    got = report(store)
    assert got is not None
    e, decoded = got
    assert e.session == n.session is not None, "locked by the agent's own session"
    assert decoded == ("gwa", n.session, {"d1": frozenset({INI1, INI2})})
    assert b'"disks":{"d1":["%s","%s"]}' % (INI1.encode(), INI2.encode()) in (e.value or b""), "sorted IQNs"
    assert logins_by_disk(store.prefix, [e]) == {"d1": {"gwa": frozenset({INI1, INI2})}}
    logins.answer = {"d1": frozenset({INI1}), "d2": frozenset({INI2}), "d3": frozenset()}
    later(n, clock)
    got = report(store)
    assert got is not None and got[1] is not None
    assert got[1][2] == {"d1": frozenset({INI1}), "d2": frozenset({INI2})}, "a disk without a login is left out"


def test_an_unchanged_answer_is_not_written_again(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    n, logins, kv = node(tmp_path, store, clock, {"d1": frozenset({INI1})})
    n.step()
    first = store.kv[KEY].modify_index
    writes = n.agent.logins.writes
    assert writes == 1
    for _ in range(5):
        logins.answer = {"d1": frozenset({INI1}), "d2": frozenset()}   # the same report
        later(n, clock)
    assert logins.calls >= 5, "it keeps looking"
    assert store.kv[KEY].modify_index == first and n.agent.logins.writes == writes and kv.calls == 1


def test_the_backend_is_asked_every_logins_every_seconds(tmp_path: Path, store: MemoryStore,
                                                         clock: FakeClock) -> None:
    n, logins, _ = node(tmp_path, store, clock, {})
    n.step()
    calls = logins.calls
    for _ in range(3):
        clock.advance(LOGINS_EVERY / 4)
        n.step()
    assert logins.calls == calls, "not more often than LOGINS_EVERY"
    clock.advance(LOGINS_EVERY / 4)
    n.step()
    assert logins.calls == calls + 1


def test_none_writes_nothing_and_deletes_a_stale_report_once(tmp_path: Path, store: MemoryStore,
                                                             clock: FakeClock) -> None:
    store.set(KEY, logins_value("gwa", "old-session", 1.0, {"d1": [INI1]}))    # an earlier process's
    n, logins, kv = node(tmp_path, store, clock, None)
    n.step()
    assert KEY not in store.kv, "the stale report is gone"
    assert kv.calls == 1
    store.set(KEY, b"somebody else's")
    for _ in range(3):
        later(n, clock)
    assert kv.calls == 1 and store.kv[KEY].value == b"somebody else's", "deleted once, then nothing written"
    # the backend can tell again: written; it cannot any more: deleted (once) again
    logins.answer = {"d1": frozenset({INI1})}
    later(n, clock)
    got = report(store)
    assert got is not None and got[0].session == n.session
    logins.answer = None
    later(n, clock)
    later(n, clock)
    assert KEY not in store.kv and kv.calls == 3


def test_a_backend_error_keeps_the_last_report_and_is_logged_once_each_way(
        tmp_path: Path, store: MemoryStore, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    n, logins, kv = node(tmp_path, store, clock, {"d1": frozenset({INI1})})
    n.step()
    before = store.kv[KEY].modify_index
    caplog.set_level(logging.INFO, "agent.runtime.logins")
    logins.answer = TransientBackendError("tgtadm did not answer within 2 s")
    for _ in range(4):
        later(n, clock)
    assert store.kv[KEY].modify_index == before and store.kv[KEY].session == n.session, "the last report stands"
    unknown = [r for r in caplog.records if "logins unknown" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0].levelno == logging.WARNING
    assert "tgtadm did not answer" in unknown[0].getMessage()
    logins.answer = {"d1": frozenset({INI1})}
    later(n, clock)
    later(n, clock)
    known = [r for r in caplog.records if "logins known again" in r.getMessage()]
    assert len(known) == 1 and known[0].levelno == logging.WARNING
    assert store.kv[KEY].modify_index == before, "the same answer as before the error: nothing to write"
    # a plugin bug is contained the same way
    logins.answer = RuntimeError("boom")
    later(n, clock)
    assert store.kv[KEY].modify_index == before and n.agent.cycles > 0
    assert any("plugin bug" in r.getMessage() for r in caplog.records)


def test_an_error_from_the_start_publishes_nothing(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    n, _, kv = node(tmp_path, store, clock, TransientBackendError("no answer"))
    for _ in range(3):
        later(n, clock)
    assert KEY not in store.kv and kv.calls == 0


def test_a_new_session_locks_the_report_again(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    n, logins, _ = node(tmp_path, store, clock, {"d1": frozenset({INI1})})
    n.step()
    old = n.session
    assert old is not None
    store.invalidate(old)                                   # Consul unlocks it (with the lock-delay)
    assert store.kv[KEY].session is None
    got = report(store)
    assert got is not None and logins_by_disk(store.prefix, [got[0]]) == {}, "an unlocked report says nothing"
    n.step()                                                # the loss is noticed: fenced
    n.agent.keeper.establish(n.agent.maybe_serving)
    assert n.session not in (None, old)
    caplog.set_level(logging.INFO, "agent.runtime.logins")
    logins.answer = TransientBackendError("slow")           # and the backend is slow just then
    later(n, clock)
    assert store.kv[KEY].session is None, "in its lock-delay: refused"
    assert len([r for r in caplog.records if "not locked" in r.getMessage()]) == 1
    later(n, clock, n.agent.cfg.consul.lock_delay)
    got = report(store)
    assert got is not None and got[0].session == n.session, "the last answer, locked by the new session"
    assert got[1] is not None and got[1][1] == n.session and got[1][2] == {"d1": frozenset({INI1})}
    assert any("written again" in r.getMessage() for r in caplog.records)


def test_consul_not_answering_is_retried(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                         caplog: pytest.LogCaptureFixture) -> None:
    n, logins, _ = node(tmp_path, store, clock, {})
    n.step()
    caplog.set_level(logging.INFO, "agent.runtime.logins")
    logins.answer = {"d2": frozenset({INI2})}
    store.down = True
    n.agent.logins.poll()
    n.agent.logins.poll()
    assert len([r for r in caplog.records if "not written" in r.getMessage()]) == 1
    store.down = False
    n.agent.logins.poll()
    got = report(store)
    assert got is not None and got[1] is not None and got[1][2] == {"d2": frozenset({INI2})}


def test_an_orderly_stop_deletes_the_report(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n, logins, _ = node(tmp_path, store, clock, {"d1": frozenset({INI1})})
    n.step()
    n.step()
    assert KEY in store.kv
    n.agent.shutdown()
    assert KEY not in store.kv
    assert not n.target.served and n.session is None
    n.agent.logins.poll()
    assert KEY not in store.kv, "nothing is published after the stop"


def test_without_a_logins_store_nothing_is_asked_or_written(tmp_path: Path, store: MemoryStore,
                                                           clock: FakeClock) -> None:
    n = make_node(tmp_path, store, clock, "gwa")
    logins = Logins({"d1": frozenset({INI1})})
    n.target.logged_in = logins  # type: ignore[method-assign]
    n.start()
    for _ in range(3):
        later(n, clock)
    assert logins.calls == 0 and KEY not in store.kv


def test_the_logins_thread_publishes_and_stops(tmp_path: Path) -> None:
    clock = RealClock()
    store = MemoryStore(clock)  # type: ignore[arg-type]
    sid = store.create_session("gwa", "iSCSITarget", ["serfHealth"], 1.0)
    target = MemTarget(clock)  # type: ignore[arg-type]
    target.logged_in = Logins({"d1": frozenset({INI1})})  # type: ignore[method-assign]
    pub = LoginsPublisher(target, MemTxn(store), store.prefix, clock, node=lambda: "gwa", session=lambda: sid)
    halt = threading.Event()
    t = threading.Thread(target=pub.run, args=(halt,), daemon=True)
    t.start()
    end = time.monotonic() + 3
    while KEY not in store.kv and time.monotonic() < end:
        time.sleep(0.01)
    assert store.kv[KEY].session == sid
    halt.set()
    t.join(2)
    assert not t.is_alive()


def test_the_memtxn_double_refuses_like_the_store(store: MemoryStore) -> None:
    kv = MemTxn(store)
    assert not kv.txn(TxnOps().lock(KEY, b"x", "no-such-session")).ok
    store.down = True
    with pytest.raises(CoordinationError):
        kv.txn(TxnOps().delete(KEY))
