"""The node agent against real Consul agents (one server, one client per node), each ``pathagent run`` a
separate process with the ``fake`` target and network backends (state files sampled from outside), the
``fake`` catalog and the ``guard`` watchdog. The safety findings of shared/reviews/safety.md that are about
timing and processes are checked here; the decision paths are in tests/unit/test_loop.py."""
from __future__ import annotations

import base64
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from lab.agents import AgentProc, Catalog, definition, path_owners, start_disks, stop_disk, txn, wait_for

pytestmark = pytest.mark.consul

NODES = ["gwa", "gwb", "gwc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Lab:
    def __init__(self, cluster: Any, tmp: Path, nodes: list[str], metrics: bool = False, **agent_kw: Any) -> None:
        """``metrics``: every agent serves ``/metrics`` on a port of its own (``scrape``)."""
        self.cluster = cluster
        self.catalog = Catalog(tmp / "catalog.json")
        self.http = cluster.http_address(nodes[0])
        self.ports = {n: free_port() for n in nodes} if metrics else {}
        extra = agent_kw.pop("extra", "")
        self.agents = {n: AgentProc(n, tmp, cluster.http_address(n), self.catalog.path,
                                    extra=extra + (f'[metrics]\nlisten = "127.0.0.1:{self.ports[n]}"\n'
                                                   if metrics else ""), **agent_kw) for n in nodes}

    def scrape(self, node: str) -> Samples:
        """The agent's ``/metrics``, parsed with the Prometheus text parser (empty when it does not answer)."""
        try:
            text = requests.get(f"http://127.0.0.1:{self.ports[node]}/metrics", timeout=2).text
        except requests.RequestException:
            return {}
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in text_string_to_metric_families(text) for x in fam.samples}

    def add_disks(self, disks: dict[str, int]) -> None:
        for d, n in disks.items():
            self.catalog.add(d, definition(d, n))
        start_disks(self.http, disks)

    def owners(self) -> dict[str, str | None]:
        return path_owners(self.http)

    def sessions(self) -> dict[str, str | None]:
        return {n: a.session() for n, a in self.agents.items()}

    def converged(self, expect_paths: int, nodes: list[str] | None = None) -> bool:
        """Every path locked once, by a live node that exports it and has its address up."""
        owners = self.owners()
        if len(owners) != expect_paths or any(s is None for s in owners.values()):
            return False
        live = nodes or list(self.agents)
        by_session = {self.agents[n].session(): n for n in live}
        for n in live:
            held = {p for p, s in owners.items() if s == self.agents[n].session()}
            if self.agents[n].exported() != held or self.agents[n].addresses() != held:
                return False
        return all(s in by_session for s in owners.values())

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()


@pytest.fixture
def lab_factory(consul_cluster_factory: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(nodes: list[str] = NODES, check_ttl: float | None = None, metrics: bool = False,
             **agent_kw: Any) -> Lab:
        """``check_ttl``: a short liveness TTL, so that a frozen or dead agent loses its session fast."""
        cluster = consul_cluster_factory(clients=nodes)
        lab = Lab(cluster, tmp_path, nodes, metrics=metrics, **agent_kw)
        if check_ttl is not None:
            for a in lab.agents.values():
                a.extra_consul(f"agent_check_ttl = {check_ttl:g}\n")
        labs.append(lab)
        return lab
    yield make
    for lab in labs:
        lab.stop()
        for a in lab.agents.values():
            print(f"----- {a.name} log (tail) -----\n" + "\n".join(a.log_text().splitlines()[-25:]))


class Sampler(threading.Thread):
    """Samples every agent's addresses (what initiators reach) and exports every ``interval``; records any
    path whose address is up on two nodes at once, and when each node last had each path up."""

    def __init__(self, agents: dict[str, AgentProc], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.agents, self.interval = agents, interval
        self.overlaps: list[tuple[float, str, list[str]]] = []
        self.last_up: dict[tuple[str, str], float] = {}
        self.first_up: dict[tuple[str, str], float] = {}
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            seen: dict[str, list[str]] = {}
            now = time.monotonic()
            for n, a in self.agents.items():
                for p in a.addresses():
                    seen.setdefault(p, []).append(n)
                    self.last_up[(n, p)] = now
                    self.first_up.setdefault((n, p), now)
            for p, ns in seen.items():
                if len(ns) > 1:
                    self.overlaps.append((now, p, ns))
            self.samples += 1
            time.sleep(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def test_three_agents_take_sixty_paths_once_each(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    lab.add_disks({f"d{i:02d}": 3 for i in range(20)})
    for a in lab.agents.values():
        a.start()
    took = wait_for(lambda: lab.converged(60), 15, what="60 paths locked once, exported and up on their holder")
    owners = lab.owners()
    counts = {n: sum(1 for s in owners.values() if s == a.session()) for n, a in lab.agents.items()}
    print(f"converged in {took:.2f}s; paths per node {counts}")
    assert sum(counts.values()) == 60
    assert len(set(lab.sessions().values())) == 3


def served(samples: Samples) -> set[str]:
    """The paths ("disk/index") whose ``pathagent_path_exported`` is 1 in a scrape."""
    return {f"{dict(lb)['disk']}/{dict(lb)['index']}" for (name, lb), v in samples.items()
            if name == "pathagent_path_exported" and v == 1}


def test_consul_agent_killed_node_fences_itself_others_take_over(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(lock_delay=5.0, fence_after=2.5, metrics=True)
    lab.add_disks({f"d{i:02d}": 2 for i in range(15)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(30), 15, what="initial convergence")
    victim = lab.agents["gwc"]      # lab.http talks to gwa's Consul agent
    assert victim.addresses()
    wait_for(lambda: served(lab.scrape("gwc")) == victim.addresses(), 5, what="the victim's metrics")
    before = {n: lab.scrape(n) for n in lab.agents}
    sampler = Sampler(lab.agents)
    sampler.start()
    t0 = time.monotonic()
    lab.cluster.kill("gwc")
    fenced = wait_for(lambda: not victim.addresses() and not victim.exported(), 8,
                      what="the cut-off agent to take its addresses down and stop its data path")
    taken = wait_for(lambda: lab.converged(30, ["gwa", "gwb"]), 25, what="survivors to take every path")
    sampler.stop()
    print(f"victim fenced after {fenced:.2f}s; survivors serve everything {time.monotonic() - t0:.2f}s "
          f"after the kill; {sampler.samples} samples")
    assert sampler.samples > 50
    assert sampler.overlaps == [], f"an address up on two nodes: {sampler.overlaps[:5]}"
    assert victim.running(), "the agent survives losing its Consul agent"
    assert "fencing" in victim.log_text()
    assert time.monotonic() - t0 >= 5.0, "nobody took over before the lock-delay"
    # the metrics tell the same story (a scrape answers while the agent is cut off from Consul)
    lost = served(before["gwc"])
    wait_for(lambda: set.union(*(served(lab.scrape(n)) for n in ("gwa", "gwb"))) == set(lab.owners()), 5,
             what="the survivors' metrics to show every path served")
    after = {n: lab.scrape(n) for n in lab.agents}
    v = after["gwc"]
    assert v[("pathagent_fenced", ())] == 1 and v[("pathagent_lease_left_seconds", ())] == 0
    assert v[("pathagent_fence_events_total", ())] >= 1 and served(v) == set()
    assert not served(after["gwa"]) & served(after["gwb"])
    took = {n: after[n][("pathagent_takeovers_total", ())] - before[n][("pathagent_takeovers_total", ())]
            for n in ("gwa", "gwb")}
    failovers = {n: after[n][("pathagent_failover_seconds_count", ())] for n in ("gwa", "gwb")}
    assert sum(took.values()) == len(lost) == sum(failovers.values()), (took, failovers, lost)
    leader = [n for n in after if after[n].get(("pathagent_leader", ())) == 1]
    assert len(leader) == 1 and leader[0] != "gwc"
    held = {k for k, x in after[leader[0]].items() if k[0] == "pathagent_cluster_path_held" and x == 1}
    assert len(held) == 30
    last = {n: after[n].get(("pathagent_last_failover_seconds", ()), -1.0) for n in ("gwa", "gwb")}
    print(f"metrics: {len(lost)} paths exported on gwc -> gwa +{took['gwa']:g}, gwb +{took['gwb']:g} takeovers; "
          f"last failover gwa {last['gwa']:.2f} s, gwb {last['gwb']:.2f} s")


def test_short_freeze_changes_nothing(lab_factory: Callable[..., Lab]) -> None:
    """A stall shorter than the bound (here 1 s, fence_after 2.5 s): no fence, no movement, no flapping."""
    lab = lab_factory(NODES[:2], lock_delay=5.0, fence_after=2.5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(6)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(12), 15, what="initial convergence")
    frozen = lab.agents["gwb"]
    mine, owners = frozen.addresses(), lab.owners()
    frozen.signal(signal.SIGSTOP)
    samples = []
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            samples.append(frozen.addresses())
            time.sleep(0.02)
    finally:
        frozen.signal(signal.SIGCONT)
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        samples.append(frozen.addresses())
        time.sleep(0.02)
    assert all(s == mine for s in samples), "no flapping"
    assert lab.owners() == owners and "fencing" not in frozen.log_text()


def test_frozen_agent_is_fenced_by_the_guard_before_anyone_takes_over(lab_factory: Callable[..., Lab]) -> None:
    """C4 + H2: an agent frozen (SIGSTOP) longer than the bound: its guard fences the node at the lease
    deadline; its liveness check then lapses, Consul invalidates its session, and the others take its paths
    after the lock-delay. At no moment is an address up on two nodes. When it resumes it starts over."""
    lab = lab_factory(lock_delay=5.0, fence_after=2.5, check_ttl=5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(9)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(18), 15, what="initial convergence")
    frozen = lab.agents["gwb"]
    sid = frozen.session()
    assert frozen.addresses()
    sampler = Sampler(lab.agents)
    sampler.start()
    t0 = time.monotonic()
    frozen.signal(signal.SIGSTOP)
    try:
        guard = wait_for(lambda: not frozen.addresses() and not frozen.exported(), 6,
                         what="the guard to fence the frozen agent's node")
        wait_for(lambda: lab.converged(18, ["gwa", "gwc"]), 30, what="the others to take every path")
        took = time.monotonic() - t0
    finally:
        frozen.signal(signal.SIGCONT)
    wait_for(lambda: frozen.session() not in (None, sid), 20, what="the resumed agent to start over", alive=[frozen])
    time.sleep(1.0)
    sampler.stop()
    print(f"frozen: guard fenced after {guard:.2f}s; others serve everything {took:.2f}s after the freeze")
    assert sampler.overlaps == [], f"an address up on two nodes: {sampler.overlaps[:5]}"
    last_frozen = max(t for (n, _), t in sampler.last_up.items() if n == "gwb" and t <= t0 + took)
    first_other = min(t for (n, p), t in sampler.first_up.items() if n != "gwb" and t > t0)
    assert last_frozen < first_other, "the frozen node stopped serving before any takeover"
    assert re.search(r"guard.*fenc", (frozen.state / "guard.log").read_text(errors="replace"), re.I | re.S)
    assert sid not in {s["ID"] for s in lab.cluster.sessions(lab.http)}, "its liveness check ended the session"


def test_slow_export_while_cut_off_never_brings_an_address_up_late(lab_factory: Callable[..., Lab]) -> None:
    """C1: a node whose exports take 6 s each is cut off while it exports: its fencer (a thread of its own)
    takes its addresses down at the deadline, and the slow export's address never comes up afterwards."""
    lab = lab_factory(NODES[:2], lock_delay=5.0, fence_after=2.5)
    slow = lab.agents["gwb"]
    lab.agents["gwa"].start()
    lab.add_disks({"d00": 2, "d01": 2})
    wait_for(lambda: lab.converged(4, ["gwa"]), 15, what="gwa serving everything")
    slow.extra_target("export_delay = 6\n")
    slow.start()
    wait_for(lambda: slow.session() is not None, 10, what="gwb's session", alive=[slow])
    # gwb takes a path by a planned move, then is cut off while its 6 s export runs
    path = sorted(lab.agents["gwa"].addresses())[0]
    mover = threading.Thread(target=lambda: lab.agents["gwa"].cli("path", "move", path, "gwb", "--timeout", "20"))
    mover.start()
    wait_for(lambda: lab.owners().get(path) == slow.session(), 10, what="gwb to lock the moved path")
    sampler = Sampler(lab.agents)
    sampler.start()
    t_cut = time.monotonic()
    lab.cluster.kill("gwb")
    mover.join(30)
    wait_for(lambda: lab.owners().get(path) == lab.agents["gwa"].session(), 25, what="gwa to take the path back")
    time.sleep(7.0)                              # past the end of the slow export
    sampler.stop()
    assert sampler.overlaps == []
    ups = [t for (n, p), t in sampler.first_up.items() if n == "gwb"]
    assert all(t < t_cut + 2.5 for t in ups), "no address came up on the cut-off node after its deadline"
    assert path not in slow.addresses()


def test_wedged_target_still_fenced_in_time(lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    """C2: the target does not answer at all (every call blocks) when the node is cut off: the addresses
    still go down at the deadline, before another node takes the paths."""
    stall = tmp_path / "stall"
    lab = lab_factory(NODES[:2], lock_delay=5.0, fence_after=2.5, extra=f'[target.fake]\nstall_file = "{stall}"\n')
    lab.add_disks({f"d{i:02d}": 2 for i in range(4)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(8), 15, what="initial convergence")
    victim = lab.agents["gwb"]
    assert victim.addresses()
    sampler = Sampler(lab.agents)
    sampler.start()
    stall.touch()                                # gwb's target (and gwa's) now blocks every call...
    try:
        t0 = time.monotonic()
        lab.cluster.kill("gwb")                  # ... and gwb is cut off
        fenced = wait_for(lambda: not victim.addresses(), 6, what="gwb's addresses down despite its wedged target")
    finally:
        stall.unlink()
    wait_for(lambda: lab.converged(8, ["gwa"]), 25, what="gwa to take every path")
    sampler.stop()
    print(f"wedged target: addresses down {fenced:.2f}s after the cut")
    assert fenced < 2.5 + 1.5 and sampler.overlaps == []


def test_disk_stop_with_a_frozen_owner_then_start_never_serves_twice(lab_factory: Callable[..., Lab]) -> None:
    """C3: the owner of a disk is frozen; `disk stop` cannot finish until that owner has let go or lost its
    session and the lock-delay ran out; `disk start` is refused meanwhile; at no moment is a path of the
    disk up on two nodes."""
    lab = lab_factory(NODES[:2], lock_delay=5.0, fence_after=2.5, check_ttl=5)
    lab.add_disks({"d00": 2, "d01": 2, "d02": 2})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(6), 15, what="initial convergence")
    frozen = lab.agents["gwb"]
    disk = sorted(frozen.addresses())[0].split("/")[0]
    sampler = Sampler(lab.agents)
    sampler.start()
    frozen.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = lab.agents["gwa"].cli("disk", "stop", disk, "--timeout", "2")
        assert r.returncode == 1 and "not every owner has let go" in r.stderr, r.stderr
        r = lab.agents["gwa"].cli("disk", "start", disk)
        assert r.returncode == 1 and "still stopping" in r.stderr, r.stderr
        r = lab.agents["gwa"].cli("disk", "stop", disk, "--timeout", "40")
        assert r.returncode == 0, r.stderr
        stopped = time.monotonic() - t0
        assert disk not in {p.split("/")[0] for p in lab.owners()}, "every key of the stopped disk is gone"
        start_disks(lab.http, {disk: 2})         # what `disk start` writes (it needs Ceph for the rest)
        wait_for(lambda: {f"{disk}/1", f"{disk}/2"} <= lab.agents["gwa"].addresses(), 15,
                 what="the restarted disk served by gwa")
    finally:
        frozen.signal(signal.SIGCONT)
    time.sleep(2.0)
    sampler.stop()
    print(f"disk stop with a frozen owner finished after {stopped:.1f}s")
    assert sampler.overlaps == [], f"an address up on two nodes: {sampler.overlaps[:5]}"
    assert stopped >= 5.0, "not before the frozen owner's session was gone and its lock-delay over"


def test_sigterm_releases_everything_without_lock_delay(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:2], lock_delay=10.0, fence_after=4.0)
    lab.add_disks({f"d{i:02d}": 2 for i in range(10)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(20), 15, what="initial convergence")
    a, b = lab.agents["gwa"], lab.agents["gwb"]
    a_session = a.session()
    assert a.exported() and a_session
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait_exit(10) == 0
    took = wait_for(lambda: lab.converged(20, ["gwb"]), 8, what="gwb to take every path")
    print(f"gwb serves all 20 paths {took:.2f}s after gwa's SIGTERM (lock-delay 10 s)")
    assert time.monotonic() - t0 < 5.0, "well under the 10 s lock-delay"
    assert a.exported() == set() and a.addresses() == set()
    assert a_session not in {s["ID"] for s in lab.cluster.sessions(lab.http)}, "its session was destroyed"
    assert not a.guard_running(), "the guard was disarmed and exited"


def test_planned_restart_keeps_serving_and_the_session(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:2])
    lab.add_disks({f"d{i:02d}": 2 for i in range(6)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(12), 15, what="initial convergence")
    a = lab.agents["gwa"]
    sid, paths, owners = a.session(), a.addresses(), lab.owners()
    samples: list[set[str]] = []
    a.signal(signal.SIGUSR2)
    assert a.wait_exit(10) == 0
    samples.append(a.addresses())
    a.start()

    def adopted_and_settled() -> bool:
        samples.append(a.addresses())
        text = a.log_text()
        return text.count("adopted session") == 1 and "cycle " in text.split("adopted session", 1)[1]
    wait_for(adopted_and_settled, 20, 0.02, "the new process to adopt the session", alive=[a])
    for _ in range(50):
        samples.append(a.addresses())
        time.sleep(0.02)
    assert len(samples) > 50
    assert all(s == paths for s in samples), "served without a gap across the restart"
    assert a.session() == sid
    assert lab.owners() == owners, "no lock changed hands"
    assert "fencing" not in a.log_text()


def test_restart_with_a_longer_lock_delay_replaces_the_session_without_an_outage(
        lab_factory: Callable[..., Lab]) -> None:
    """H4: the admin raises lock_delay and restarts: the adopted session (old lock-delay) is replaced by
    one with the new lock-delay, its locks moved in transactions, nothing stops being served."""
    lab = lab_factory(NODES[:1], lock_delay=5.0, fence_after=2.5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(4)})
    a = lab.agents["gwa"]
    a.start()
    wait_for(lambda: lab.converged(8), 15, what="initial convergence")
    old, paths = a.session(), a.addresses()
    a.signal(signal.SIGUSR2)
    assert a.wait_exit(10) == 0
    a.config.write_text(a.config.read_text().replace("lock_delay = 5.0", "lock_delay = 7.0"))
    samples: list[set[str]] = []
    a.start()
    wait_for(lambda: a.session() not in (None, old) and (samples.append(a.addresses()) or True), 15, 0.02,
             "the session to be replaced", alive=[a])
    wait_for(lambda: lab.converged(8), 10, what="everything served by the new session")
    # the old session goes last, after its locks moved and its node record was let go
    wait_for(lambda: old not in {s["ID"] for s in lab.cluster.sessions(lab.http)}, 10, what="the old session gone")
    sessions = {s["ID"]: s for s in lab.cluster.sessions(lab.http)}
    assert sessions[a.session()]["LockDelay"] == 7 * 10**9
    assert all(s == paths for s in samples), "no outage"
    assert "moving its locks to a new session" in a.log_text()


def test_poisoned_key_wedges_no_watcher(lab_factory: Callable[..., Lab]) -> None:
    """H5: a deeply nested JSON value under the prefix: every agent logs the key once and keeps seeing
    changes; a disk started afterwards is served."""
    lab = lab_factory(NODES[:2])
    lab.add_disks({"d00": 2})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(2), 15, what="initial convergence")
    for key in ("pathagent/moves/d00/1", "pathagent/disks/zz"):
        requests.put(f"http://{lab.http}/v1/kv/{key}", data=b"[" * 100000, timeout=5).raise_for_status()
    lab.add_disks({"d01": 2})
    wait_for(lambda: lab.converged(4), 15, what="the disk started after the poison served")
    for a in lab.agents.values():
        assert "ignoring the value of pathagent/disks/zz" in a.log_text()
        assert "Traceback" not in a.log_text()
        assert a.running()


def test_agent_killed_its_guard_fences_and_its_paths_move(lab_factory: Callable[..., Lab]) -> None:
    """H1/H2: the agent process dies (kill -9) and does not come back: the guard stops the data path at the
    deadline, the liveness check lapses, and the other node takes over."""
    lab = lab_factory(NODES[:2], lock_delay=5.0, fence_after=2.5, check_ttl=5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(4)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(8), 15, what="initial convergence")
    dead = lab.agents["gwb"]
    sampler = Sampler(lab.agents)
    sampler.start()
    t0 = time.monotonic()
    dead.signal(signal.SIGKILL)
    gone = wait_for(lambda: not dead.addresses() and not dead.exported(), 6, what="the guard to fence")
    wait_for(lambda: lab.converged(8, ["gwa"]), 30, what="gwa to take every path")
    sampler.stop()
    print(f"agent killed: guard fenced after {gone:.2f}s, gwa serves everything after {time.monotonic() - t0:.2f}s")
    assert sampler.overlaps == []


def test_systemd_notify_ready_and_watchdog_stop_when_the_loop_stalls(lab_factory: Callable[..., Lab],
                                                                    tmp_path: Path) -> None:
    """Acceptance 3: under a NOTIFY_SOCKET the agent sends READY=1 and periodic WATCHDOG=1 from its main
    loop; the pings stop while the loop is stalled (a target call that does not return) and resume."""
    stall = tmp_path / "stall"
    lab = lab_factory(NODES[:1], extra=f'[target.fake]\nstall_file = "{stall}"\n')
    lab.add_disks({"d00": 1})
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    a = lab.agents["gwa"]
    a.start(env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
    got: list[tuple[float, bytes]] = []

    def collect(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                got.append((time.monotonic(), sock.recv(1000)))
            except socket.timeout:
                pass
    collect(4.0)
    ready = [t for t, m in got if m.startswith(b"READY=1")]
    pings = [t for t, m in got if m == b"WATCHDOG=1"]
    assert len(ready) == 1 and len(pings) >= 3, got
    assert max(b - a_ for a_, b in zip(pings, pings[1:])) <= 1.2, "at least every half WatchdogSec"
    stall.touch()
    t_stall = time.monotonic()
    collect(4.0)
    during = [t for t, m in got if m == b"WATCHDOG=1" and t > t_stall + 1.2]
    stall.unlink()
    t_go = time.monotonic()
    collect(3.0)
    after = [t for t, m in got if m == b"WATCHDOG=1" and t > t_go]
    assert during == [], "no ping while the main loop is stalled"
    assert after, "pings resume once the loop runs again"
    # the agent's children must not be able to notify for it (tgtd does when it inherits NOTIFY_SOCKET)
    from lab import proc
    guards = proc.guard_pids(a.state)
    assert guards, "the guard runs"
    environ = Path(f"/proc/{guards[0]}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_USEC="))]


def test_bad_items_are_named_and_skipped(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:1], extra='[target.fake]\nfail = ["d01/2"]\n')
    stale = {"KV": {"Verb": "set", "Key": "pathagent/logins/gwa", "Value": base64.b64encode(b"stale").decode()}}
    txn(lab.http, [stale]).raise_for_status()        # an earlier process's report, unlocked
    lab.add_disks({f"d{i:02d}": 2 for i in range(4)})
    bad = definition("d03", 2)
    bad["paths"][1]["ip"] = "300.1.2.3"
    lab.catalog.add("d03", bad)
    a = lab.agents["gwa"]
    a.start()
    expected = {"d00/1", "d00/2", "d01/1", "d02/1", "d02/2"}
    wait_for(lambda: a.addresses() == expected, 15, what="every good path served")
    time.sleep(1.5)
    log = a.log_text()
    assert "disk d03 skipped" in log and "paths[1].ip" in log, "no definition was ever read: the id alone"
    assert "export d01/2 (disk-d01) failed" in log, "a path is named with its disk's display name"
    assert "exported d00/1 (disk-d00) as iqn.2016-05.io.pathagent:d00" in log
    assert a.running()

    def report() -> Any:
        r = requests.get(f"http://{lab.http}/v1/kv/pathagent/logins/gwa", timeout=5)
        return None if r.status_code == 404 else r.json()[0]
    # the stale report is deleted (a backend that cannot tell) or replaced by one locked by the session
    wait_for(lambda: report() is None or report().get("Session") == a.session(), 10,
             what="the stale logins report to go")
    # the catalog is fixed: the disk is picked up without a restart
    lab.catalog.add("d03", definition("d03", 2))
    wait_for(lambda: {"d03/1", "d03/2"} <= a.addresses(), 35, what="the fixed disk to be served")
    # a served disk's definition goes bad: named with the name of its last good definition, in the log
    # and in `pathagent status`
    broken = definition("d00", 2)
    broken["paths"][0]["ip"] = "300.1.2.3"
    lab.catalog.add("d00", broken)
    edit = json.dumps({"pool": "rbd", "image": "pathagent-d00", "rev": 1}).encode()   # what a CLI edit does
    txn(lab.http, [{"KV": {"Verb": "set", "Key": "pathagent/disks/d00", "Value": base64.b64encode(edit).decode()}}]
        ).raise_for_status()                         # the watchers wake: the agent reads it again now
    wait_for(lambda: "disk d00 (disk-d00) skipped" in a.log_text(), 10, what="the bad definition named")

    def status() -> Any:
        st = a.cli("status", "--json")
        assert st.returncode == 0, st.stderr
        return json.loads(st.stdout)
    wait_for(lambda: "d00" in status()["bad_disks"], 10, what="status to name the bad disk")
    assert status()["disk_names"] == {"d00": "disk-d00"}
    assert "bad disk:  d00 (disk-d00): " in a.cli("status").stdout


def test_logins_report_is_locked_by_the_agent_session(consul_cluster_factory: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    """The publisher against real Consul: the report is locked by the session (``ConsulStore.txn``),
    ``logins_by_disk`` counts it; once the session is gone it is unlocked and counts for nothing; an
    orderly stop deletes it."""
    from agent import config
    from agent.adapters.consul_store import ConsulStore
    from agent.core import keys
    from agent.core.tree import logins_by_disk
    from agent.runtime.clock import SystemClock
    from agent.backend import TargetBackend
    from agent.runtime.logins import LoginsPublisher

    class Answering(TargetBackend):
        def exported(self) -> Any:
            return frozenset()

        def export(self, path: Any, disk: Any) -> None: ...

        def unexport(self, path: Any) -> None: ...

        def fence(self) -> None: ...

        def logged_in(self) -> Any:
            return answer

    cluster = consul_cluster_factory(clients=["gwa"])
    cfg = config.parse({"consul": {"address": cluster.http_address("gwa"), "agent_check_ttl": 0,
                                   "session_ttl": 0}, "state": {"dir": str(tmp_path / "state")}})
    store = ConsulStore(cfg.consul)
    try:
        sid = store.create_session("gwa", "iSCSITarget", ["serfHealth"], 1.0)
        answer = {"d1": frozenset({"iqn.1993-08.org.debian:01:aaa"})}
        pub = LoginsPublisher(Answering(), store, store.prefix, SystemClock(), node=lambda: "gwa",
                              session=lambda: sid)
        pub.poll()
        key = keys.logins_key(store.prefix, "gwa")
        e = store.get(key)
        assert e is not None and e.session == sid
        _, entries = store.read_tree()
        assert logins_by_disk(store.prefix, entries) == {"d1": {"gwa": answer["d1"]}}
        index = e.modify_index
        pub.poll()
        again = store.get(key)
        assert again is not None and again.modify_index == index, "unchanged: not written again"
        store.destroy_session(sid)
        gone = store.get(key)
        assert gone is not None and gone.session is None
        _, entries = store.read_tree()
        assert logins_by_disk(store.prefix, entries) == {}, "an unlocked report says nothing"
        pub.withdraw()
        assert store.get(key) is None
    finally:
        store.close()


def test_unreachable_consul_and_bad_config(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.json")
    a = AgentProc("lonely", tmp_path, "127.0.0.1:1", cat.path)
    a.start()
    time.sleep(2.0)
    assert a.running(), "the agent waits for Consul instead of dying"
    assert "cannot connect to 127.0.0.1:1" in a.log_text()
    a.stop()
    b = AgentProc("badcfg", tmp_path, "127.0.0.1:1", cat.path, extra="[consul.bogus]\n")
    b.write_config()
    b.config.write_text(re.sub(r"lock_delay = [0-9.]+", "lock_delay = \"soon\"", b.config.read_text()))
    b.start(rewrite=False)
    assert b.wait_exit(10) == 2
    assert "[consul] lock_delay" in b.log_text()     # the key as check-config names it
