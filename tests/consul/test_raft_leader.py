"""Issue 8, acceptance 3: killing the Consul Raft leader (3 servers) causes no failover and no fence.

Three Consul servers and two gateway clients on loopback with the shipped gossip and Raft tuning; two
agents with the shipped timing defaults (fence_after, confirm_interval, timeout, lock_delay). The Raft
leader is killed (SIGKILL) three times in a row (each time the killed server is restarted before the
next kill, so the cluster keeps its quorum). Sampled every 50 ms throughout: each agent's session, its
exports and its floating IPs. None may change, and no agent may record a fence event.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from lab.agents import AgentProc, Catalog, definition, path_owners, start_disks, wait_for

pytestmark = pytest.mark.consul

GATEWAYS = ["gwa", "gwb"]


def leader_name(cluster: Any) -> str | None:
    try:
        addr = cluster.leader(via="gwa")
    except Exception:  # noqa: BLE001 - no leader right now
        return None
    for name in cluster.server_names:
        n = cluster.node(name)
        if addr == f"{n.ip}:{n.ports['server']}":
            return str(name)
    return None


def fence_events(a: AgentProc) -> int:
    try:
        return int(json.loads((a.state / "status.json").read_text()).get("fence_events", 0))
    except (FileNotFoundError, ValueError):
        return 0


def test_killing_the_raft_leader_fences_nothing_and_moves_nothing(consul_cluster_factory: Callable[..., Any],
                                                                  tmp_path: Path) -> None:
    cluster = consul_cluster_factory(clients=GATEWAYS, servers=3)
    cat = Catalog(tmp_path / "catalog.json")
    disks = {"d1": 2, "d2": 2}
    for d, n in disks.items():
        cat.add(d, definition(d, n))
    start_disks(cluster.http_address("gwa"), disks)
    agents = {n: AgentProc(n, tmp_path, cluster.http_address(n), cat.path, test_timings=False) for n in GATEWAYS}
    for a in agents.values():
        a.start()
    try:
        wait_for(lambda: all(path_owners(cluster.http_address("gwa")).values())
                 and sum(len(a.addresses()) for a in agents.values()) == 4, 30, what="4 paths served",
                 alive=list(agents.values()))
        base = {n: (a.session(), frozenset(a.exported()), frozenset(a.addresses())) for n, a in agents.items()}
        changes: list[str] = []
        halt = threading.Event()

        def sample() -> None:
            while not halt.is_set():
                for n, a in agents.items():
                    now = (a.session(), frozenset(a.exported()), frozenset(a.addresses()))
                    if now != base[n]:
                        changes.append(f"{time.monotonic():.2f} {n}: {base[n]} -> {now}")
                        base[n] = now
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stalls = []
        for run in range(3):
            old = leader_name(cluster)
            assert old is not None, "no Raft leader before the kill"
            t = time.monotonic()
            cluster.kill(old)
            wait_for(lambda: leader_name(cluster) not in (None, old), 20, what=f"a new Raft leader (run {run})")
            stalls.append(time.monotonic() - t)
            time.sleep(3.0)                     # past fence_after: a stalled confirmation would have fenced
            cluster.restart(old)
            cluster.wait_ready()
        halt.set()
        sampler.join(5)
        print(f"Raft leader kills: new leader after {', '.join(f'{s:.2f}' for s in stalls)} s")
        assert changes == [], "an agent's session, exports or addresses changed:\n" + "\n".join(changes)
        assert all(fence_events(a) == 0 for a in agents.values()), {n: fence_events(a) for n, a in agents.items()}
        assert all(a.running() for a in agents.values())
    finally:
        for a in agents.values():
            a.stop()
        for a in agents.values():
            print(f"----- {a.name} log (tail) -----\n" + "\n".join(a.log_text().splitlines()[-15:]))
