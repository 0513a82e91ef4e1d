"""Issue 3 acceptance, end to end: disks created and started through the real `pathagent` CLI on a micro
Ceph cluster, served by three `pathagent run` processes (fake target backend) that read every definition
from RBD image metadata. Real Consul (one server, a client agent per node), real Ceph."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import rados
import rbd

from lab.agents import REPO, AgentProc, path_owners, start_disks, wait_for
from lab.ceph import MicroCeph
from lab.consul import ConsulCluster

pytestmark = [pytest.mark.ceph, pytest.mark.consul]
NODES = ["gwa", "gwb", "gwc"]
SECRET = "Chap-S3cret-value-42"


class World:
    def __init__(self, ceph: MicroCeph, cluster: ConsulCluster, tmp: Path, nodes: list[str] = NODES) -> None:
        self.ceph, self.cluster = ceph, cluster
        self.http = cluster.http_address("gwa")
        self.agents = {n: AgentProc(n, tmp, cluster.http_address(n), tmp / "unused.json",
                                    ceph_conf=ceph.conf_path) for n in nodes}
        self.cfg = self.agents["gwa"].config
        self.outputs: list[str] = []
        self.disks = 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        self.outputs += [r.stdout, r.stderr]
        if check:
            assert r.returncode == 0, f"pathagent {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def create(self, name: str, *extra: str) -> str:
        """A disk with two path IPs of its own (path IPs are unique across disks)."""
        self.disks += 1
        n = self.disks
        r = self.cli("disk", "create", name, "--size", "8M", "--path", f"198.18.{n}.100/24",
                     "--path", f"198.18.{n}.101/24", "--open", *extra)
        return r.stdout.strip().splitlines()[-1]

    def served(self) -> dict[str, str]:
        out = {}
        for n, a in self.agents.items():
            for p in a.exported():
                assert p not in out, f"{p} exported by {out[p]} and {n}"
                out[p] = n
        return out

    def consistent(self, expect: set[str]) -> bool:
        owners = path_owners(self.http)
        if set(owners) != expect or any(s is None for s in owners.values()):
            return False
        sessions = {a.session(): n for n, a in self.agents.items()}
        served = self.served()
        return set(served) == expect and all(sessions.get(owners[p]) == served[p] for p in expect)

    def set_meta(self, disk_id: str, value: str) -> None:
        with rados.Rados(conffile=self.ceph.conf_path) as r, r.open_ioctx("rbd") as io, \
                rbd.Image(io, f"pathagent-{disk_id}") as img:
            img.metadata_set("pathagent.disk", value)

    def get_meta(self, disk_id: str) -> str:
        with rados.Rados(conffile=self.ceph.conf_path) as r, r.open_ioctx("rbd") as io, \
                rbd.Image(io, f"pathagent-{disk_id}", read_only=True) as img:
            return str(img.metadata_get("pathagent.disk"))


@pytest.fixture
def world(micro_ceph: MicroCeph, tmp_path: Path) -> Iterator[World]:
    cluster = ConsulCluster(str(tmp_path / "consul"), clients=NODES)
    cluster.start()
    w = World(micro_ceph, cluster, tmp_path)
    try:
        yield w
    finally:
        for a in w.agents.values():
            a.stop()
        logs = "".join(a.log_text() for a in w.agents.values()) + "".join(w.outputs)
        cluster.teardown()
        assert SECRET not in logs, "a CHAP secret leaked into a log or CLI output"
        for a in w.agents.values():
            print(f"----- {a.name} -----\n" + "\n".join(a.log_text().splitlines()[-15:]))


def test_twenty_disks_from_rbd_served_by_three_agents(world: World) -> None:
    ids = [world.create(f"vm{i:02d}") for i in range(19)]
    secret_file = world.agents["gwa"].dir / "chap"
    secret_file.write_text(SECRET + "\n")
    ids.append(world.create("chapdisk", "--chap-user", "alice", "--chap-password-file", str(secret_file)))
    for d in ids:
        world.cli("disk", "start", d)
    expect = {f"{d}/{i}" for d in ids for i in (1, 2)}
    for a in world.agents.values():
        a.start()
    took = wait_for(lambda: world.consistent(expect), 30, 0.1, "40 paths served once, by their lock holders",
                    alive=list(world.agents.values()))
    print(f"20 disks / 40 paths served {took:.2f}s after the agents started")
    listing = json.loads(world.cli("disk", "list", "--json").stdout)
    assert {d["id"] for d in listing} >= set(ids)
    shown = world.cli("disk", "show", ids[-1], "--json").stdout
    assert "alice" in shown and SECRET not in shown

    # metadata corrupted under a served disk: it keeps being served with the last good definition,
    # and the problem is named (disk, field) in the log
    bad = ids[0]
    good_doc = world.get_meta(bad)
    doc = json.loads(good_doc)
    doc["paths"][0]["ip"] = "999.0.0.1"
    world.set_meta(bad, json.dumps(doc))
    wait_for(lambda: re.search(rf"disk {bad} \([^)]*\) skipped", "".join(a.log_text() for a in world.agents.values())),
             15, 0.2,
             "the corrupt definition to be reported (within [ceph] refresh)")
    assert "paths[0].ip" in "".join(a.log_text() for a in world.agents.values())
    assert world.consistent(expect), "a corrupt edit loses nothing already served"
    r = world.cli("disk", "show", bad, check=False)
    assert r.returncode == 1 and bad in r.stderr and "paths[0].ip" in r.stderr

    # started (by another tool) while its metadata is corrupt: skipped, the rest served
    world.cli("disk", "stop", bad)
    wait_for(lambda: not any(p.startswith(bad + "/") for p in world.served()), 10, what="stopped disk unexported")
    r = world.cli("disk", "start", bad, check=False)
    assert r.returncode == 1 and "paths[0].ip" in r.stderr, "the CLI refuses to start an invalid disk"
    start_disks(world.http, {bad: 2})
    time.sleep(2)
    bad_paths = {f"{bad}/1", f"{bad}/2"}
    assert not bad_paths & set(world.served())
    assert all(path_owners(world.http)[p] is None for p in bad_paths), "nobody takes a path it cannot serve"
    assert expect - bad_paths <= set(world.served())
    # repaired by another tool: picked up within [ceph] refresh (5 s here) without a restart
    world.set_meta(bad, good_doc)
    wait_for(lambda: world.consistent(expect), 20, 0.1, "the repaired disk to be served")

    # stop, start again, delete refused while started
    r = world.cli("disk", "delete", ids[1], check=False)
    assert r.returncode == 1 and "started" in r.stderr, "delete of a started disk is refused"
    world.cli("disk", "stop", ids[1])
    assert not any(k.startswith(ids[1] + "/") for k in path_owners(world.http)), "stop removed the keys"
    wait_for(lambda: not any(p.startswith(ids[1] + "/") for p in world.served()), 10, what="owners unexport")
    world.cli("disk", "start", ids[1])
    wait_for(lambda: world.consistent(expect), 10, 0.1, "served again after start")

    # the image is deleted under a started disk: named and skipped, the rest keeps being served
    victim = ids[2]
    world.cli("disk", "stop", victim)
    world.cli("disk", "delete", victim)
    start_disks(world.http, {victim: 2})
    gone = {f"{victim}/1", f"{victim}/2"}
    wait_for(lambda: f"disk {victim} skipped" in "".join(a.log_text() for a in world.agents.values()), 10,
             0.2, "the missing image to be reported")
    assert expect - gone <= set(world.served())
    assert not gone & set(world.served())


def test_ceph_outage_loses_nothing_and_recovers(own_ceph: MicroCeph, tmp_path: Path) -> None:
    cluster = ConsulCluster(str(tmp_path / "consul"), clients=NODES[:2])
    cluster.start()
    w = World(own_ceph, cluster, tmp_path, NODES[:2])
    try:
        ids = [w.create(f"o{i}") for i in range(4)]
        for d in ids:
            w.cli("disk", "start", d)
        for a in w.agents.values():
            a.start()
        expect = {f"{d}/{i}" for d in ids for i in (1, 2)}
        wait_for(lambda: w.consistent(expect), 30, 0.1, "initial service")
        own_ceph.freeze()                      # monitors and OSD unreachable
        try:
            start_disks(w.http, {"zz00": 2})   # a disk started during the outage: no definition readable
            time.sleep(8)                      # > [ceph] refresh (5 s): definitions are re-read and fail
            assert expect <= set(w.served()), "nothing already served stops being served"
            assert all(a.running() for a in w.agents.values())
            logs = "".join(a.log_text() for a in w.agents.values())
            assert "disk zz00 skipped" in logs
        finally:
            own_ceph.thaw()
        wait_for(lambda: expect <= set(w.served()), 20, 0.1, "service after Ceph came back")
    finally:
        for a in w.agents.values():
            a.stop()
        cluster.teardown()
