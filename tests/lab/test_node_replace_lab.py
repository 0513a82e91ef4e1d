"""Node replacement (docs/consul.md, "Replacing a gateway"), end to end on the namespace lab: a gateway that
dies and is reinstalled under the same name rejoins cleanly.

Three gateways with the shipped timing and the Ceph-side fence (``ceph-blocklist``), three disks of two
paths. The gateway under test serves at least one path (a pattern is written through it); then it dies
the hard way, as a host that loses power and is reinstalled: its link goes down first, then its agent,
its watchdog guard, its tgtd and its Consul agent are SIGKILLed, its floating IPs vanish, and its state
dir, its Consul data dir and its shared-memory deadline are wiped. It comes back with the same name and
the same address, a new Consul node ID, a fresh state dir and the same Ceph data client name
(``client.pathagent-<node>``), either

- at once: as soon as the servers see its Consul member failed (before the leader fenced it), or
- later: once the others serve all its paths and it has been fenced (a real reinstall; here the
  victim is the cluster leader, so a new leader fences it).

Asserted each time:

1. the servers accept the new node ID under the old name (the catalog has it) and the old session is gone;
2. the leader fences it: the fence record names the old session, the old tgtd's Ceph clients are
   blocklisted;
3. the new agent gets a new session and takes nothing before that fence is recorded (neither its node
   record nor a path), then gets paths by placement (at once: its orphaned paths are placed again; later:
   planned moves give it its share) and serves them;
4. its Ceph data path works although the old instance's blocklist entries (same client name, same IP)
   are still there: the entries are per instance (``IP:PORT/NONCE``) and none names a client of the new
   tgtd; a pattern written through the new gateway reads back through iSCSI and from RBD, and the pattern
   written through the old one before the failure is intact.

The last test replaces a gateway while no other one runs pathagent: it leads, fences its own
predecessor (never its own process's client) and serves every path by itself.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from agent.adapters.ceph import CephClient
from agent.adapters.ceph_clients import addr_ip
from lab import failover, iscsi, proc
from lab.consul import MEMBER_ALIVE, MEMBER_FAILED
from lab.iscsilab import PREFIX, Gateway, IscsiLab
from lab.netns import ip
from plugins.guard import shared

pytestmark = pytest.mark.lab

DISKS = 3


def _conftest() -> Any:
    """tests/lab/conftest.py, as pytest imported it (its ``started_lab`` builds and tears down the lab)."""
    here = str(Path(__file__).with_name("conftest.py"))
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == here)


@pytest.fixture(scope="module")
def replace_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IscsiLab]:
    conf = _conftest()
    fencing = conf.failover_fencing()
    if fencing != "ceph-blocklist":
        pytest.skip("the ceph-blocklist fencing plugin is not registered (setup.cfg entry points)")
    yield from conf.started_lab(tmp_path_factory.mktemp("replace"), shipped_timings=True,
                                agent_extra=f'[fencing]\nbackend = "{fencing}"\n')


def kv(lab: IscsiLab, key: str) -> dict[str, Any] | None:
    """``{prefix}/key``'s entry (``Value`` decoded as JSON, or None), None when absent."""
    r = requests.get(f"http://{lab.http}/v1/kv/{PREFIX}/{key}", timeout=5)
    if r.status_code == 404:
        return None
    e: dict[str, Any] = r.json()[0]
    raw = base64.b64decode(e["Value"]) if e.get("Value") else b""
    e["Value"] = json.loads(raw) if raw else None
    return e


def held_by(lab: IscsiLab, node: str) -> list[str]:
    return sorted(p for p, n in lab.owners().items() if n == node)


def served_by_node(lab: IscsiLab, node: str) -> list[tuple[Any, Any]]:
    """(disk, path spec) of every path ``node`` holds and has the IP of up."""
    owners, by_ip = lab.owners(), lab.served_by()
    return [(d, p) for d in lab.disks.values() for p in d.paths
            if owners.get(f"{d.id}/{p.index}") == node and by_ip.get(p.ip) == node]


def entity_addrs(ceph: CephClient, node: str) -> set[str]:
    """Every address of a monitor session of ``node``'s data-path Ceph client."""
    return {a for s in ceph.mon_sessions() if s.entity == f"client.pathagent-{node}" for a in s.addrs}


def die(lab: IscsiLab, g: Gateway) -> None:
    """The host loses power and is reinstalled: nothing of it survives but its name and address."""
    assert lab.consul is not None
    failover.link(g, False)                                  # nothing leaves it any more
    g.signal(signal.SIGKILL)
    if g.p is not None:
        g.p.wait(10)
    for pid in g.guard_pids():
        proc.kill(pid, "plugins.guard")
    tgtd = g.tgtd_pid()
    if tgtd is not None:
        proc.kill(tgtd, "tgtd")
    lab.consul.wipe(g.name)                                  # SIGKILL + a fresh Consul data dir
    addrs = json.loads(ip("-4", "-j", "addr", "show", "dev", "eth0", ns=g.ns).stdout)
    for link in addrs:
        for a in link.get("addr_info", []):
            if a["local"] != g.ip:                           # its floating IPs died with it
                ip("addr", "del", f"{a['local']}/{a['prefixlen']}", "dev", "eth0", ns=g.ns)
    for f in glob.glob(shared.path(str(g.state), "*")):      # /dev/shm is empty after a reboot
        os.unlink(f)
    shutil.rmtree(g.state)


def come_back(lab: IscsiLab, g: Gateway, old_id: str, old_session: str | None) -> tuple[str, str | None]:
    """The reinstalled host starts: link up, Consul (new node ID, which the catalog must take), then
    pathagent with its empty state dir; returns (new node ID, new session) once it has a session."""
    assert lab.consul is not None
    failover.link(g, True)
    lab.consul.restart(g.name, timeout=30)
    new_id = lab.consul.node_id(g.name)
    assert new_id != old_id
    lab.wait(lambda: lab.consul is not None and lab.consul.catalog_node_id(g.name) == new_id, 15,
             f"the catalog to know {g.name} by its new node ID")
    g.start()
    lab.wait(lambda: g.session() not in (None, old_session), 30, f"{g.name}'s new session")
    return new_id, g.session()


def leader_node(lab: IscsiLab) -> str | None:
    e = kv(lab, "leader")
    return str(e["Value"]["node"]) if e and e.get("Session") and e.get("Value") else None


def replace(lab: IscsiLab, victim: Gateway, at_once: bool) -> str:
    """Kill ``victim`` as a dead host, bring it back reinstalled (``at_once``: as soon as its Consul member
    failed; else once the others serve all its paths and it was fenced), check 1-4 of the module
    docstring; returns the line to print."""
    assert lab.consul is not None and lab.ceph is not None
    name = victim.name
    others = [n for n in lab.gw if n != name]
    ceph = CephClient(lab.ceph.conf_path, "admin", 10.0)
    try:
        d0, p0 = served_by_node(lab, name)[0]
        before = (f"written through {name} before it died ".encode() * 2000)[:64 * 1024]
        with iscsi.Session(f"{p0.ip}:3260", d0.iqn, netns=lab.ini()) as s:
            s.write(64, before)
            s.sync()
        old_session = victim.session()
        old_id = lab.consul.node_id(name)
        old_clients = entity_addrs(ceph, name)
        assert old_clients, f"no Ceph client of {name}'s tgtd (client.pathagent-{name})"
        old_record = kv(lab, f"nodes/{name}")
        assert old_record is not None and old_record.get("Session") == old_session
        was_leader = leader_node(lab) == name

        # --- it dies ------------------------------------------------------------------------------------
        t0 = time.monotonic()
        die(lab, victim)
        lab.consul.wait_member_status(name, MEMBER_FAILED, timeout=15)
        failed_at = time.monotonic() - t0

        def fenced() -> bool:
            fence = kv(lab, f"fenced/{name}")
            return fence is not None and fence["ModifyIndex"] > old_record["ModifyIndex"]
        if not at_once:
            lab.wait(lambda: fenced() and lab.all_served() and not held_by(lab, name), 90,
                     f"{name}'s paths served by {others}")
            new_leader = leader_node(lab)
            assert new_leader in others, new_leader
        down_for = time.monotonic() - t0

        # --- it comes back: same name and address, new node ID, nothing else --------------------------
        new_id, new_session = come_back(lab, victim, old_id, old_session)
        back_at = time.monotonic() - t0
        assert lab.consul.member_status(name) == MEMBER_ALIVE
        sessions = {s["ID"] for s in lab.consul.sessions() if s["Node"] == name}
        assert sessions == {new_session}, f"the old session {old_session} is still there: {sessions}"

        # --- nothing before the fence of its predecessor, then paths ------------------------------------
        waited = False
        early: list[str] = []

        def fenced_and_serving() -> bool:
            nonlocal waited
            done = fenced()
            waited = waited or bool(victim.status().get("waiting_fence"))
            rec = kv(lab, f"nodes/{name}")
            if not done and (held_by(lab, name) or (rec is not None and rec.get("Session") == new_session)):
                early.append(f"{time.monotonic() - t0:.2f}s: holds {held_by(lab, name)}, record {rec}")
            return done and bool(served_by_node(lab, name))
        lab.wait(fenced_and_serving, 90, f"{name} fenced and then serving paths again", interval=0.1)
        took_at = time.monotonic() - t0
        assert early == [], f"{name} took something before its predecessor was fenced: {early[:3]}"
        assert waited == at_once, f"waiting for the fence: {waited}"
        fence = kv(lab, f"fenced/{name}")
        assert fence is not None and fence["Value"]["session"] == old_session, fence
        summary = fence["Value"].get("summary", "")
        assert f"client(s) of client.pathagent-{name}" in summary and "blocklisted 0 " not in summary, summary
        share = len(lab.owners()) // len(lab.gw)
        lab.wait(lambda: lab.all_served() and all(len(held_by(lab, n)) == share for n in lab.gw), 90,
                 f"every path served, {share} on each gateway")
        balanced_at = time.monotonic() - t0
        if not at_once:
            assert "leader: moving" in lab.gw[str(leader_node(lab))].log_text(), \
                "its share came back by other means than planned moves"
        record = kv(lab, f"nodes/{name}")
        assert record is not None and record.get("Session") == new_session
        nodes = json.loads(lab.gw[others[0]].cli("nodes", "--json").stdout)
        row = next(r for r in nodes if r["node"] == name)
        assert row["live"] and not row.get("failed") and row["paths"] == share, row

        # --- its Ceph data path works although the old instance is blocklisted -------------------------
        blocklist = ceph.blocklist_list()
        old_listed = old_clients & set(blocklist)
        assert old_listed, f"none of the old tgtd's clients {sorted(old_clients)} is blocklisted: {sorted(blocklist)}"
        new_clients = entity_addrs(ceph, name)
        assert new_clients, f"the new tgtd has no Ceph client as client.pathagent-{name}"
        assert not new_clients & set(blocklist), f"a client of the new tgtd is blocklisted: {new_clients & set(blocklist)}"
        assert {addr_ip(a) for a in new_clients} == {victim.ip} == {addr_ip(a) for a in old_listed}, \
            "the same client name from the same IP: only the instance (the nonce) differs"
        d1, p1 = served_by_node(lab, name)[0]
        after = (f"written through the reinstalled {name} ".encode() * 2000)[:64 * 1024]
        with iscsi.Session(f"{p1.ip}:3260", d1.iqn, netns=lab.ini()) as s:
            s.write(512, after)
            s.sync()
            assert s.read(512, len(after) // 512) == after
            if d1.id == d0.id:
                assert s.read(64, len(before) // 512) == before
        assert lab.read_image(d1, 512 * 512, len(after)) == after
        assert lab.read_image(d0, 64 * 512, len(before)) == before, "the data written before the failure"
        return (f"{name}{' (the leader)' if was_leader else ''}, {len(old_clients)} Ceph client(s), node ID "
                f"{old_id[:8]}: member failed {failed_at:.1f} s after the kill; down for {down_for:.1f} s; back "
                f"with node ID {new_id[:8]} and a new session at {back_at:.1f} s; "
                f"{'waited for' if waited else 'found'} the fence of its predecessor; serving at {took_at:.1f} s, "
                f"its share ({share}) at {balanced_at:.1f} s; {len(old_listed)} old client(s) blocklisted, its "
                f"{len(new_clients)} new one(s) not; fence: {summary}")
    finally:
        ceph.close()


@pytest.fixture(scope="module")
def disks(replace_lab: IscsiLab) -> list[Any]:
    lab = replace_lab
    ds = [lab.create_disk(paths=2, size=16 << 20, start=False) for _ in range(DISKS)]
    lab.start_disks(ds)
    share = 2 * DISKS // len(lab.gw)
    lab.wait(lambda: lab.all_served() and all(len(held_by(lab, n)) == share for n in lab.gw), 90,
             f"every path served, {share} on each gateway")
    return ds


def test_reinstalled_at_once_waits_for_the_fence_then_serves(replace_lab: IscsiLab, disks: list[Any]) -> None:
    lab = replace_lab
    leader = leader_node(lab)
    victim = next(g for n, g in sorted(lab.gw.items()) if n != leader)
    print("\n" + replace(lab, victim, at_once=True))


def test_reinstalled_after_its_paths_moved_gets_its_share_back(replace_lab: IscsiLab, disks: list[Any]) -> None:
    lab = replace_lab
    leader = leader_node(lab)
    assert leader is not None
    print("\n" + replace(lab, lab.gw[leader], at_once=False))


def fenced_since(lab: IscsiLab, node: str, record: dict[str, Any]) -> bool:
    fence = kv(lab, f"fenced/{node}")
    return fence is not None and fence["ModifyIndex"] > record["ModifyIndex"]


def test_a_lone_gateway_reinstalled_fences_its_predecessor_and_serves(replace_lab: IscsiLab,
                                                                       disks: list[Any]) -> None:
    """No other gateway runs pathagent when the victim comes back: it becomes the leader and fences its
    own predecessor (its data client's sessions, never its own process's client), then serves every path
    by itself; the others coming back get their share."""
    lab = replace_lab
    assert lab.consul is not None
    names = sorted(lab.gw)
    victim, helper = lab.gw[names[0]], lab.gw[names[1]]
    rest = [lab.gw[n] for n in names[2:]]
    for g in [helper, *rest]:
        g.stop()                                            # orderly: the victim serves every path
    lab.wait(lambda: lab.all_served() and len(held_by(lab, victim.name)) == len(lab.owners()), 60,
             f"{victim.name} serving every path")
    old_session, old_id = victim.session(), lab.consul.node_id(victim.name)
    record = kv(lab, f"nodes/{victim.name}")
    assert record is not None and record.get("Session") == old_session
    die(lab, victim)
    lab.consul.wait_member_status(victim.name, MEMBER_FAILED, timeout=15)
    t0 = time.monotonic()
    come_back(lab, victim, old_id, old_session)
    bound = lab.lock_delay + lab.fence_after + 15.0         # the leader key's lock-delay, the fence hold, margin
    took = lab.wait(lambda: lab.all_served(), bound, f"{victim.name}, alone, serving every path again")
    assert leader_node(lab) == victim.name and fenced_since(lab, victim.name, record)
    assert not victim.status().get("fence_error"), victim.status()
    print(f"\nlone {victim.name} reinstalled: fenced its predecessor and served every path "
          f"{time.monotonic() - t0:.1f} s after it started again ({took:.1f} s of waiting)")
    for g in [helper, *rest]:
        g.start()
    share = len(lab.owners()) // len(lab.gw)
    lab.wait(lambda: lab.all_served() and all(len(held_by(lab, n)) == share for n in lab.gw), 90,
             f"every path served, {share} on each gateway")
    d, p = served_by_node(lab, victim.name)[0]
    with iscsi.Session(f"{p.ip}:3260", d.iqn, netns=lab.ini()) as s:
        s.write(2048, b"x" * 4096)
        s.sync()
        assert s.read(2048, 8) == b"x" * 4096
