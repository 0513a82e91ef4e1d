"""Issue 8, acceptance 4 and 5, on the namespace lab (real Consul, micro Ceph, tgtd per gateway, the
shipped defaults): 3 gateways, 30 disks x 2 paths.

One test walks through the phases, since the lab and its 60 paths cost most of the time:

1. start: every path served, no disk with both paths on one gateway, counts within one (20/20/20);
2. the cluster leader's node crashes (link cut, its Consul agent and pathagent SIGKILLed): its paths
   spread over the two survivors (30/30, one path of every disk on each), a survivor becomes the leader
   and runs its start duties (it fences the failed node: ``{prefix}/fenced/{node}`` names its session);
3. it comes back: within 60 s it has its share again (20/20/20), by planned moves, and no path is
   unserved longer than a planned move takes;
4. drain of one gateway: it ends with zero paths, nothing unserved longer than a move; undrain: 20 each.

Throughout, a sampler reads every running agent's status every 100 ms: never two of them leaders.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests

from lab import failover
from lab.iscsilab import PREFIX, IscsiLab

pytestmark = pytest.mark.lab

DISKS = 30
MOVE_BOUND = 3.0        # a planned move leaves a path unserved well under this (measured ~1 s, one at a time)


class Watch(threading.Thread):
    """Every ``interval``: which running agents say they lead (their status.json), and for each path
    whether it is served (locked by a node that has its IP up); records the longest unserved stretch per
    path since ``reset()``."""

    def __init__(self, lab: IscsiLab, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.lab, self.interval = lab, interval
        self.halt = threading.Event()
        self.two_leaders: list[tuple[float, list[str]]] = []
        self.unserved_since: dict[str, float] = {}
        self.longest: dict[str, float] = {}
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.unserved_since.clear()
            self.longest.clear()

    def worst(self) -> tuple[str, float]:
        with self.lock:
            now = time.monotonic()
            spans = dict(self.longest)
            for p, t in self.unserved_since.items():
                spans[p] = max(spans.get(p, 0.0), now - t)
        return max(spans.items(), key=lambda kv: kv[1], default=("-", 0.0))

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                # the status of the agent process running now (a restarted one's file is its predecessor's
                # until its first cycle)
                leaders = [g.name for g in self.lab.gw.values()
                           if g.running() and (st := g.status()).get("leader") and g.p is not None and st.get("pid") == g.p.pid]
                if len(leaders) > 1:
                    self.two_leaders.append((time.monotonic(), leaders))
                owners = self.lab.owners()
                by_ip = self.lab.served_by()
            except (requests.RequestException, OSError, ValueError):
                time.sleep(self.interval)
                continue
            now = time.monotonic()
            with self.lock:
                for d in self.lab.disks.values():
                    for p in d.paths:
                        key = f"{d.id}/{p.index}"
                        node = owners.get(key)
                        ok = node is not None and by_ip.get(p.ip) == node
                        if ok and key in self.unserved_since:
                            span = now - self.unserved_since.pop(key)
                            self.longest[key] = max(self.longest.get(key, 0.0), span)
                        elif not ok:
                            self.unserved_since.setdefault(key, now)
            time.sleep(self.interval)


def counts(lab: IscsiLab) -> Counter[str]:
    return Counter(n for n in lab.owners().values() if n is not None)


def doubled(lab: IscsiLab) -> list[str]:
    owners = lab.owners()
    return [d.id for d in lab.disks.values()
            if owners.get(f"{d.id}/1") is not None and owners.get(f"{d.id}/1") == owners.get(f"{d.id}/2")]


def balanced(lab: IscsiLab, nodes: list[str], per_node: int) -> bool:
    c = counts(lab)
    return lab.all_served() and all(c[n] == per_node for n in nodes) and not doubled(lab)


def leader(lab: IscsiLab) -> str | None:
    r = requests.get(f"http://{lab.http}/v1/kv/{PREFIX}/leader", timeout=5)
    if r.status_code != 200:
        return None
    e = r.json()[0]
    if not e.get("Session"):
        return None
    return str(json.loads(base64.b64decode(e["Value"]))["node"])


def fenced_record(lab: IscsiLab, node: str) -> dict[str, Any] | None:
    r = requests.get(f"http://{lab.http}/v1/kv/{PREFIX}/fenced/{node}", timeout=5)
    if r.status_code != 200:
        return None
    return dict(json.loads(base64.b64decode(r.json()[0]["Value"])))


def test_balance_failover_failback_drain_and_one_leader(placement_lab: IscsiLab) -> None:
    lab = placement_lab
    disks = [lab.create_disk(paths=2, size=16 << 20, start=False) for _ in range(DISKS)]
    lab.start_disks(disks)
    names = sorted(lab.gw)
    watch = Watch(lab)
    watch.start()
    try:
        took = lab.wait(lambda: balanced(lab, names, 2 * DISKS // 3), 180, "60 paths served, 20 per gateway")
        print(f"\nstart: 60 paths served and balanced after {took:.1f} s: {dict(counts(lab))}")

        # 2. the leader's node crashes
        lead = leader(lab)
        assert lead in names, lead
        victim = lab.gw[lead]
        old_session = victim.session()
        crash = failover.Crash(lab, victim)
        t = crash.inject()
        survivors = [n for n in names if n != lead]
        took = lab.wait(lambda: balanced(lab, survivors, DISKS), 90, f"the paths of {lead} spread over {survivors}")
        print(f"crash of the leader {lead}: its paths spread over {survivors} after {time.monotonic() - t:.1f} s: "
              f"{dict(counts(lab))}")
        new = leader(lab)
        assert new in survivors, f"no survivor leads: {new}"
        rec = fenced_record(lab, lead)
        assert rec is not None and rec["session"] == old_session, f"the new leader did not fence {lead}: {rec}"
        assert "now the cluster leader" in lab.gw[new].log_text()

        # 3. it comes back and gets its share by planned moves
        crash.heal()
        watch.reset()
        t = time.monotonic()
        took = lab.wait(lambda: balanced(lab, names, 2 * DISKS // 3), 60, f"{lead} to get its share back")
        path, span = watch.worst()
        print(f"{lead} back: balanced again after {took:.1f} s; longest unserved path {path} {span:.2f} s")
        assert span < MOVE_BOUND, f"{path} was unserved for {span:.2f} s while {lead} got its share back"
        assert "leader: moving" in lab.gw[new].log_text(), "the share came back by other means than planned moves"

        # 4. drain and undrain
        drained = survivors[0]
        watch.reset()
        r = lab.gw[new].cli("node", "drain", drained, "--wait", "--timeout", "60", "--json")
        assert r.returncode == 0, r.stderr
        others = [n for n in names if n != drained]
        lab.wait(lambda: balanced(lab, others, DISKS) and counts(lab)[drained] == 0, 30, f"{drained} drained")
        assert lab.gw[drained].addresses() == set() and lab.gw[drained].targets() == set()
        path, span = watch.worst()
        print(f"drain of {drained}: {dict(counts(lab))}; longest unserved path {path} {span:.2f} s")
        assert span < MOVE_BOUND, f"{path} was unserved for {span:.2f} s during the drain"
        nodes = json.loads(lab.gw[new].cli("nodes", "--json").stdout)
        row = next(x for x in nodes if x["node"] == drained)
        assert row["drained"] and row["paths"] == 0 and row["live"]
        assert lab.gw[new].cli("node", "undrain", drained).returncode == 0
        lab.wait(lambda: balanced(lab, names, 2 * DISKS // 3), 60, f"{drained} to get its share back")
        assert watch.two_leaders == [], f"two agents said they lead at once: {watch.two_leaders[:3]}"
    finally:
        watch.halt.set()
        watch.join(5)
