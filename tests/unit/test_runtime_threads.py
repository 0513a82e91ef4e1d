"""Tier 1 with the agent's real threads: the fencer thread meeting its deadline, a whole ``Agent.run()``
serving, detaching for a planned restart, being adopted and stopping, on the in-memory store; and the
metrics endpoint. Real time, so the waits are short and generous."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.core.model import PathKey
from agent.runtime.fencer import Fencer
from doubles import MemNetwork, MemTarget, config, disk, make_node
from memstore import MemoryStore, RealClock


def until(pred: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_fencer_thread_fences_at_its_deadline_on_its_own() -> None:
    clock = RealClock()
    target, network = MemTarget(clock), MemNetwork(clock)   # type: ignore[arg-type]
    network.up_paths = {PathKey("d1", 1)}
    target.served = {PathKey("d1", 1): disk("d1")}
    f = Fencer(network, target, clock)
    deadline = clock.now() + 0.3
    f.extend(deadline)                                      # a confirmation...
    assert f.unfence() and not f.fenced                     # ...and the main loop unfenced
    t = threading.Thread(target=f.run, daemon=True)
    t.start()
    until(lambda: f.fenced and target.fences == 1, 3, "the fence")
    fenced_at = next(ts for ts, op, _ in target.log if op == "fence")
    print(f"fencer thread acted {1000 * (fenced_at - deadline):.1f} ms after its deadline")
    assert deadline <= fenced_at < deadline + 0.2
    assert not network.up_paths and not target.served
    f.extend(clock.now() + 5)                               # a confirmation again: the main loop unfences
    assert f.unfence() and f.allowed()
    f.stop()
    t.join(3)
    assert not t.is_alive()


def test_agent_run_serves_detaches_is_adopted_and_stops(tmp_path: Path) -> None:
    clock = RealClock()
    store = MemoryStore(clock, block=True)   # type: ignore[arg-type]
    store.start_disk("d1", 2)
    defs = {"d1": disk("d1")}
    cfg = config(tmp_path / "gwa", lock_delay=3.0, fence_after=1.6, confirm_interval=0.2, timeout=0.3,
                 election_stall=0.5, agent_check_ttl=5.0, session_ttl=10.0)
    a = make_node(tmp_path, store, clock, "gwa", cfg=cfg, disks=defs)   # type: ignore[arg-type]
    runner = threading.Thread(target=a.agent.run, daemon=True)
    runner.start()
    until(lambda: a.serving() == {"d1/1", "d1/2"}, 10, "both paths served")
    sid = a.session
    a.agent.detach()
    runner.join(5)
    assert not runner.is_alive()
    assert sid in store.sessions and a.serving() == {"d1/1", "d1/2"}, "a planned restart keeps everything"
    assert not a.watchdog.disarmed
    # the next process: same state directory, same data path
    b = make_node(tmp_path, store, clock, "gwa", cfg=cfg, disks=defs)   # type: ignore[arg-type]
    b.target.served, b.network.up_paths = a.target.served, a.network.up_paths
    runner = threading.Thread(target=b.agent.run, daemon=True)
    runner.start()
    until(lambda: b.agent.report.cycle > 2 and b.session == sid, 10, "the session adopted")
    assert b.target.fences == 0 and b.serving() == {"d1/1", "d1/2"}
    b.agent.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert b.serving() == set() and not b.target.served and sid not in store.sessions
    assert store.holder(PathKey("d1", 1)) is None and b.watchdog.disarmed


def test_agent_run_fences_when_cut_off_and_recovers(tmp_path: Path) -> None:
    clock = RealClock()
    store = MemoryStore(clock, block=True)   # type: ignore[arg-type]
    store.start_disk("d1", 1)
    cfg = config(tmp_path / "gwa", lock_delay=3.0, fence_after=1.2, confirm_interval=0.2, timeout=0.3,
                 election_stall=0.3, agent_check_ttl=0.0, session_ttl=0.0)
    a = make_node(tmp_path, store, clock, "gwa", cfg=cfg, disks={"d1": disk("d1")})   # type: ignore[arg-type]
    runner = threading.Thread(target=a.agent.run, daemon=True)
    runner.start()
    try:
        until(lambda: a.serving() == {"d1/1"}, 10, "served")
        a.agent.store.partitioned = True                   # type: ignore[attr-defined]
        t0 = time.monotonic()
        until(lambda: a.serving() == set() and a.target.fences >= 1, 5, "the fence")
        assert time.monotonic() - t0 < 1.2 + 0.5
        a.agent.store.partitioned = False                  # type: ignore[attr-defined]
        until(lambda: a.serving() == {"d1/1"}, 10, "served again after the partition")
    finally:
        a.agent.stop()
        runner.join(10)


def test_agent_run_publishes_the_logins_on_their_own_thread_and_withdraws_them(tmp_path: Path) -> None:
    from test_logins import KEY, Logins, MemTxn
    clock = RealClock()
    store = MemoryStore(clock, block=True)   # type: ignore[arg-type]
    store.start_disk("d1", 1)
    cfg = config(tmp_path / "gwa", lock_delay=3.0, fence_after=1.6, confirm_interval=0.2, timeout=0.3,
                 election_stall=0.5, agent_check_ttl=5.0, session_ttl=10.0)
    a = make_node(tmp_path, store, clock, "gwa", cfg=cfg, disks={"d1": disk("d1")})   # type: ignore[arg-type]
    a.target.logged_in = Logins({"d1": frozenset({"iqn.1993-08.org.debian:01:aaa"})})  # type: ignore[method-assign]
    a.agent.logins.kv = MemTxn(a.agent.store)
    runner = threading.Thread(target=a.agent.run, daemon=True)
    runner.start()
    try:
        until(lambda: KEY in store.kv and store.kv[KEY].session == a.session is not None, 10,
              "the report, locked by the session")
        assert any(t.name == "logins" for t in threading.enumerate())
    finally:
        a.agent.stop()
        runner.join(10)
    assert not runner.is_alive()
    assert KEY not in store.kv, "an orderly stop deletes the report"
    until(lambda: not any(t.name == "logins" for t in threading.enumerate()), 3, "the logins thread to end")


@pytest.mark.parametrize("stale", ["{not json", '{"boot_id": 1, "id": 7, "node": [], "serve_until": "x"}', "[]",
                                   "[" * 10000])
def test_state_files_that_cannot_be_read_are_ignored(tmp_path: Path, stale: str) -> None:
    from agent.runtime.statedir import StateDir, read_status
    s = StateDir(str(tmp_path))
    for name in ("session.json", "lease.json", "node.json", "status.json"):
        (tmp_path / name).write_text(stale)
    assert s.session() is None and s.node() == ""
    assert s.serve_until(10.0, "b", 4.0) == 10.0
    if not stale.startswith("{\""):
        assert s.status() == {} and read_status(str(tmp_path)) == {}


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from agent.runtime.statedir import StateDir
    a, b = StateDir(str(tmp_path)), StateDir(str(tmp_path))
    a.lock()
    with pytest.raises(ConfigError, match="another pathagent runs"):
        b.lock()
    a.unlock()
    b.lock()


def test_service_builds_every_plugin_offline_and_maps_ceph_errors(tmp_path: Path) -> None:
    """``pathagent run``'s wiring: plugins are built before Consul is asked anything (the fencer must run
    from the first moment), and the host's Ceph probe speaks the backend errors plugins expect."""
    from agent import config as config_mod
    from agent.adapters.ceph import CephNotFound, CephUnavailable
    from agent.errors import PermanentBackendError, TransientBackendError
    from agent.runtime import service
    from agent.runtime.notify import Notifier
    cfg = config_mod.parse({"state": {"dir": str(tmp_path)},
                            "consul": {"address": "127.0.0.1:1", "agent_check_ttl": 0, "session_ttl": 0},
                            "target": {"backend": "fake"}, "network": {"backend": "fake"},
                            "catalog": {"backend": "fake"}, "watchdog": {"backend": "none"},
                            "ceph": {"conf": str(tmp_path / "ceph.conf")}}, str(tmp_path / "x.toml"))
    agent, closers = service.build(cfg, Notifier({}))
    assert type(agent.target).__name__ == "FakeBackend" and type(agent.network).__name__ == "FakeNetwork"
    assert agent.node == "" and agent.fencer.fenced
    for close in closers:
        close()

    class Stub:
        timeout = 3.0

        def __init__(self, e: Exception) -> None:
            self.e = e

        def probe(self, pool: str, image: str) -> None:
            raise self.e
    with pytest.raises(PermanentBackendError):
        service.ceph_probe(Stub(CephNotFound("no image")))("rbd", "x")   # type: ignore[arg-type]
    with pytest.raises(TransientBackendError) as e:
        service.ceph_probe(Stub(CephUnavailable("timed out")))("rbd", "x")   # type: ignore[arg-type]
    assert e.value.retry_after == 3.0
