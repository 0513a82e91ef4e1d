"""Issue 2 acceptance: the core agent against real Consul agents (one server, one client per node),
each ``pathagent run`` a separate process with the ``fake`` target backend and ``fake`` catalog."""
from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lab.agents import AgentProc, Catalog, definition, path_owners, start_disks, stop_disk, wait_for

pytestmark = pytest.mark.consul

NODES = ["gwa", "gwb", "gwc"]


class Lab:
    def __init__(self, cluster: Any, tmp: Path, nodes: list[str], **agent_kw: Any) -> None:
        self.cluster = cluster
        self.catalog = Catalog(tmp / "catalog.json")
        self.http = cluster.http_address(nodes[0])
        self.agents = {n: AgentProc(n, tmp, cluster.http_address(n), self.catalog.path, **agent_kw) for n in nodes}

    def add_disks(self, disks: dict[str, int]) -> None:
        for d, n in disks.items():
            self.catalog.add(d, definition(d, n))
        start_disks(self.http, disks)

    def owners(self) -> dict[str, str | None]:
        return path_owners(self.http)

    def sessions(self) -> dict[str, str | None]:
        return {n: a.session() for n, a in self.agents.items()}

    def converged(self, expect_paths: int, nodes: list[str] | None = None) -> bool:
        owners = self.owners()
        if len(owners) != expect_paths or any(s is None for s in owners.values()):
            return False
        live = nodes or list(self.agents)
        by_session = {self.agents[n].session(): n for n in live}
        for n in live:
            held = {p for p, s in owners.items() if s == self.agents[n].session()}
            if self.agents[n].exported() != held:
                return False
        return all(s in by_session for s in owners.values())

    def stop(self) -> None:
        for a in self.agents.values():
            a.stop()


@pytest.fixture
def lab_factory(consul_cluster_factory: Callable[..., Any], tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(nodes: list[str] = NODES, **agent_kw: Any) -> Lab:
        cluster = consul_cluster_factory(clients=nodes)
        lab = Lab(cluster, tmp_path, nodes, **agent_kw)
        labs.append(lab)
        return lab
    yield make
    for lab in labs:
        lab.stop()
        for a in lab.agents.values():
            print(f"----- {a.name} log (tail) -----\n" + "\n".join(a.log_text().splitlines()[-25:]))


class ExportSampler(threading.Thread):
    """Samples every agent's exported set; records any path exported by two agents at once."""

    def __init__(self, agents: dict[str, AgentProc], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.agents, self.interval = agents, interval
        self.overlaps: list[tuple[float, str, list[str]]] = []
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            seen: dict[str, list[str]] = {}
            for n, a in self.agents.items():
                for p in a.exported():
                    seen.setdefault(p, []).append(n)
            for p, ns in seen.items():
                if len(ns) > 1:
                    self.overlaps.append((time.monotonic(), p, ns))
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
    took = wait_for(lambda: lab.converged(60), 10, what="60 paths locked once and exported by their holder")
    owners = lab.owners()
    counts = {n: sum(1 for s in owners.values() if s == a.session()) for n, a in lab.agents.items()}
    print(f"converged in {took:.2f}s; paths per node {counts}")
    # Even placement needs every agent registered before the first one settles (2 s); on a loaded
    # machine a late starter finds every path taken (rebalancing is a later issue). The planner's
    # placement itself is tested deterministically in tests/unit/test_planner.py.
    assert sum(counts.values()) == 60
    assert len(set(lab.sessions().values())) == 3


def test_consul_agent_killed_node_fences_itself_others_take_over(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(lock_delay=5.0, fence_after=2.5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(15)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(30), 10, what="initial convergence")
    victim = lab.agents["gwc"]      # lab.http talks to gwa's Consul agent
    victim_paths = set(victim.exported())
    assert victim_paths
    sampler = ExportSampler(lab.agents)
    sampler.start()
    t0 = time.monotonic()
    lab.cluster.kill("gwc")
    fenced = wait_for(lambda: not victim.exported(), 8, what="the cut-off agent to unexport everything")
    survivors = ["gwa", "gwb"]
    taken = wait_for(lambda: lab.converged(30, survivors), 20, what="survivors to take every path")
    sampler.stop()
    print(f"victim fenced after {fenced:.2f}s; survivors serve everything {time.monotonic() - t0:.2f}s "
          f"after the kill; {sampler.samples} samples")
    assert sampler.samples > 50
    assert sampler.overlaps == [], f"paths exported twice at once: {sampler.overlaps[:5]}"
    assert victim.running(), "the agent survives losing its Consul agent"
    assert "fencing" in victim.log_text()
    assert time.monotonic() - t0 >= 5.0, "nobody took over before the lock-delay"


def test_frozen_agent_keeps_its_paths_and_catches_up(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(lock_delay=5.0, fence_after=2.5)
    lab.add_disks({f"d{i:02d}": 2 for i in range(9)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(18), 10, what="initial convergence")
    frozen = lab.agents["gwb"]
    sid = frozen.session()
    before = lab.owners()
    mine = {p for p, s in before.items() if s == sid}
    stopped_disk = sorted(mine)[0].split("/")[0]
    frozen.signal(signal.SIGSTOP)
    try:
        stop_disk(lab.http, stopped_disk)
        lab.catalog.add("z9", definition("z9", 3))
        start_disks(lab.http, {"z9": 3})
        time.sleep(6.0)     # longer than the lock-delay (5 s) and fence_after (2.5 s)
        owners = lab.owners()
        still = {p for p in mine if not p.startswith(stopped_disk + "/")}
        assert {p for p in still if owners.get(p) != sid} == set(), "nothing moved away from the frozen node"
        assert frozen.exported() == mine, "its exports stay while frozen"
    finally:
        frozen.signal(signal.SIGCONT)
    sampler_mine: list[set[str]] = []
    end = time.monotonic() + 4
    while time.monotonic() < end:
        sampler_mine.append(frozen.exported())
        time.sleep(0.02)
    wait_for(lambda: lab.converged(19), 10, what="convergence after SIGCONT")
    assert frozen.session() == sid, "same session after the freeze"
    assert all(still <= s for s in sampler_mine), "no flapping: its other paths were never unexported"
    assert not any(p.startswith(stopped_disk + "/") for p in frozen.exported())
    assert "fencing" not in frozen.log_text()


def test_sigterm_releases_everything_without_lock_delay(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:2], lock_delay=10.0, fence_after=4.0)
    lab.add_disks({f"d{i:02d}": 2 for i in range(10)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(20), 10, what="initial convergence")
    a, b = lab.agents["gwa"], lab.agents["gwb"]
    a_paths, a_session = a.exported(), a.session()
    assert a_paths and a_session
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait_exit(10) == 0
    took = wait_for(lambda: lab.converged(20, ["gwb"]), 8, what="gwb to take every path")
    print(f"gwb serves all 20 paths {took:.2f}s after gwa's SIGTERM (lock-delay 10 s)")
    assert time.monotonic() - t0 < 5.0, "well under the 10 s lock-delay"
    assert a.exported() == set()
    assert a_session not in {s["ID"] for s in lab.cluster.sessions(lab.http)}, "its session was destroyed"


def test_planned_restart_keeps_serving_and_the_session(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:2])
    lab.add_disks({f"d{i:02d}": 2 for i in range(6)})
    for a in lab.agents.values():
        a.start()
    wait_for(lambda: lab.converged(12), 10, what="initial convergence")
    a = lab.agents["gwa"]
    sid, paths, owners = a.session(), a.exported(), lab.owners()
    samples: list[set[str]] = []
    a.signal(signal.SIGUSR2)
    assert a.wait_exit(10) == 0
    samples.append(a.exported())
    a.start()

    def adopted_and_settled() -> bool:
        samples.append(a.exported())
        text = a.log_text()
        return text.count("adopted session") == 1 and "cycle " in text.split("adopted session", 1)[1]
    wait_for(adopted_and_settled, 20, 0.02, "the new process to adopt the session", alive=[a])
    for _ in range(50):
        samples.append(a.exported())
        time.sleep(0.02)
    assert len(samples) > 50
    assert all(s == paths for s in samples), "exported without a gap across the restart"
    assert a.session() == sid
    assert lab.owners() == owners, "no lock changed hands"


def test_bad_items_are_named_and_skipped(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(NODES[:1], extra='[target.fake]\nfail = ["d01/2"]\n')
    lab.add_disks({f"d{i:02d}": 2 for i in range(4)})
    bad = definition("d03", 2)
    bad["paths"][1]["ip"] = "300.1.2.3"
    lab.catalog.add("d03", bad)
    a = lab.agents["gwa"]
    a.start()
    expected = {"d00/1", "d00/2", "d01/1", "d02/1", "d02/2"}
    wait_for(lambda: a.exported() == expected, 10, what="every good path served")
    time.sleep(1.5)
    log = a.log_text()
    assert "disk d03 skipped" in log and "paths[1].ip" in log
    assert "export d01/2 failed" in log
    assert a.running()
    # the catalog is fixed: the disk is picked up without a restart
    lab.catalog.add("d03", definition("d03", 2))
    wait_for(lambda: {"d03/1", "d03/2"} <= a.exported(), 35, what="the fixed disk to be served")


def test_unreachable_consul_and_bad_config(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.json")
    a = AgentProc("lonely", tmp_path, "127.0.0.1:1", cat.path)
    a.start()
    time.sleep(2.0)
    assert a.running(), "the agent waits for Consul instead of dying"
    assert "cannot connect to 127.0.0.1:1" in a.log_text()
    a.stop()
    b = AgentProc("badcfg", tmp_path, "127.0.0.1:1", cat.path, extra="[consul.bogus]\n")
    b.config.write_text(re.sub(r"lock_delay = [0-9.]+", "lock_delay = \"soon\"", b.config.read_text()))
    b.start()
    assert b.wait_exit(10) == 2
    assert "consul.lock_delay" in b.log_text()
