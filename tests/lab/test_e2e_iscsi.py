"""Issue 4 acceptance, end to end: three gateway namespaces, each with its own Consul client agent, tgtd and
``pathagent run`` (tgt backend, iproute network plugin); a micro Ceph and a Consul server in the root
namespace; a userspace initiator (libiscsi) in its own namespace on the same bridge.

1. four disks x two paths: login at every path IP, READ CAPACITY, a pattern written through path 1 reads
   back through path 2 (another gateway when placement put it elsewhere) and equals what rbd reads;
2. kill -9 of one gateway's Consul client agent: that gateway drops its IPs and targets, the others take
   the paths over, and the initiator's next read at the same IP returns the data written before;
3. tgtd killed under an agent: restarted empty, every path re-exported by the agent within seconds, with
   the reason logged;
4. ACL and CHAP;
5. iscsi-test-cu against a served path, suite by suite (the tgt crash cases excluded), pass count printed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Any

import pytest

from lab import iscsi
from lab.iscsilab import IscsiLab
from lab.netns import exec_argv

pytestmark = pytest.mark.lab

INI = iscsi.DEFAULT_INITIATOR
STRANGER = "iqn.2016-05.io.pathagent.test:stranger"


def served_ok(lab: IscsiLab, d: Any) -> bool:
    return lab.all_served([d])


@pytest.fixture(scope="module")
def disks(iscsi_lab: IscsiLab) -> list[Any]:
    lab = iscsi_lab
    ds = [lab.create_disk(paths=2, size=64 << 20) for _ in range(4)]
    took = lab.wait(lambda: lab.all_served(ds), 60, "4 disks x 2 paths served")
    print(f"\n4 disks x 2 paths served {took:.2f} s after disk start; placement: "
          f"{ {k: v for k, v in sorted(lab.owners().items())} }")
    return ds


def test_1_login_everywhere_write_path1_read_path2(iscsi_lab: IscsiLab, disks: list[Any]) -> None:
    lab = iscsi_lab
    owners = lab.owners()
    cross = 0
    for n, d in enumerate(disks):
        p1, p2 = d.paths
        for p in d.paths:
            with iscsi.Session(f"{p.ip}:3260", d.iqn, netns=lab.ini()) as s:
                assert s.capacity() == (d.size // 512, 512)
                assert s.serial() == d.serial
                assert s.inquiry().revision == str(owners[f"{d.id}/{p.index}"])[:4]
        pattern = (f"disk {d.id} pattern {n} ".encode() * 40000)[: 128 * 1024]
        with iscsi.Session(f"{p1.ip}:3260", d.iqn, netns=lab.ini()) as s:
            s.write(256, pattern)
            s.sync()
        with iscsi.Session(f"{p2.ip}:3260", d.iqn, netns=lab.ini()) as s:
            assert s.read(256, len(pattern) // 512) == pattern
        assert lab.read_image(d, 256 * 512, len(pattern)) == pattern
        cross += owners[f"{d.id}/1"] != owners[f"{d.id}/2"]
    print(f"\n{cross} of {len(disks)} disks had their two paths on different gateways")
    assert cross >= 1


def test_2_consul_agent_killed_paths_move_data_intact(iscsi_lab: IscsiLab, disks: list[Any]) -> None:
    lab = iscsi_lab
    owners = lab.owners()
    victim = max(lab.gw.values(), key=lambda g: sum(1 for o in owners.values() if o == g.name))
    moved = [(d, p) for d in disks for p in d.paths if owners[f"{d.id}/{p.index}"] == victim.name]
    assert moved, "placement left the busiest gateway without paths"
    sessions, data = [], {}
    for d, p in moved:
        s = iscsi.Session(f"{p.ip}:3260", d.iqn, netns=lab.ini(), timeout=30)
        sessions.append((s, d, p))
        data[(d.id, p.index)] = os.urandom(64 * 1024)
        s.write(4096 + 256 * p.index, data[(d.id, p.index)])
        s.sync()
    try:
        t0 = time.monotonic()
        assert lab.consul is not None
        lab.consul.kill(victim.name)
        gone = lab.wait(lambda: not victim.addresses() and not victim.targets(), 20,
                        f"{victim.name} to drop its IPs and targets")
        lab.wait(lambda: lab.all_served(disks), 30, "the paths served by the other gateways")
        back = time.monotonic() - t0
        new = lab.owners()
        assert all(new[f"{d.id}/{p.index}"] != victim.name for d, p in moved)
        print(f"\nkill -9 of {victim.name}'s Consul agent: its IPs and targets gone after {gone:.2f} s, "
              f"its {len(moved)} paths served by other gateways {back:.2f} s after the kill")
        for s, d, p in sessions:       # the same sessions: libiscsi reconnects to the same IP
            assert s.read(4096 + 256 * p.index, 128) == data[(d.id, p.index)]
        print(f"first read through the moved paths answered {time.monotonic() - t0:.2f} s after the kill")
        assert "fenc" in victim.log_text().lower()
    finally:
        for s, _, _ in sessions:
            s.close()
        assert lab.consul is not None
        lab.consul.restart(victim.name)
        lab.wait(lambda: victim.session() is not None and victim.running(), 30, f"{victim.name} back in service")


def test_3_tgtd_killed_targets_restored(iscsi_lab: IscsiLab, disks: list[Any]) -> None:
    lab = iscsi_lab
    lab.wait(lambda: lab.all_served(disks), 30, "all paths served")
    owners = lab.owners()
    g = max(lab.gw.values(), key=lambda g: sum(1 for o in owners.values() if o == g.name))
    mine = [(d, p) for d in disks for p in d.paths if owners[f"{d.id}/{p.index}"] == g.name]
    pid = g.tgtd_pid()
    assert pid is not None and mine
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()

    def all_answer() -> bool:
        return all(iscsi.inq(f"{p.ip}:3260", d.iqn, lab.ini(), timeout=1) is not None for d, p in mine)

    took = lab.wait(all_answer, 15, f"{g.name}'s targets restored", interval=0.02)
    print(f"\ntgtd on {g.name} killed: {len(mine)} paths answering again after {took:.2f} s")
    assert g.tgtd_pid() not in (None, pid)
    assert re.search(r"tgtd \(pid %d\) died: killed by signal 9; restarted it \(pid \d+\) empty; the agent "
                     r"re-exports what it holds" % pid, g.log_text())
    assert time.monotonic() - t0 < 15


def test_4_acl_and_chap(iscsi_lab: IscsiLab) -> None:
    lab = iscsi_lab
    listed = lab.create_disk(paths=1, initiators=(INI,))
    chap = lab.create_disk(paths=1, initiators=(INI,), chap=("carol", "carol-secret-42"))
    lab.wait(lambda: lab.all_served([listed, chap]), 30, "ACL disks served")
    p, c = f"{listed.paths[0].ip}:3260", f"{chap.paths[0].ip}:3260"
    assert iscsi.inq(p, listed.iqn, lab.ini(), initiator=INI) is not None
    assert iscsi.inq(p, listed.iqn, lab.ini(), initiator=STRANGER) is None
    assert iscsi.inq(c, chap.iqn, lab.ini(), initiator=INI) is None
    assert iscsi.inq(c, chap.iqn, lab.ini(), initiator=INI, chap=("carol", "wrong-secret-42")) is None
    assert iscsi.inq(c, chap.iqn, lab.ini(), initiator=INI, chap=("carol", "carol-secret-42")) is not None
    for g in lab.gw.values():
        assert "carol-secret" not in g.log_text()


# Excluded from the compliance run, with the reason printed:
# tgt + bs_rbd tests that abort tgtd (a zero-length READ reaches librbd's assert; see docs/backend-tgt.md)
CRASHERS = {"Read10.ZeroBlocks", "Read12.ZeroBlocks", "Read16.ZeroBlocks", "iSCSIResiduals.Read10Invalid",
            "iSCSIResiduals.Read10Residuals", "iSCSIResiduals.Read12Residuals", "iSCSIResiduals.Read16Residuals"}
# tgt executes WRITE SAME as one synchronous 512-byte rbd write per block (the gateway runs with the librbd
# cache off): these whole-LUN WRITE SAME tests take several minutes each here (measured > 40 s on 16 MiB)
SLOW = {"WriteSame10.ZeroBlocks", "WriteSame10.Check", "WriteSame16.ZeroBlocks", "WriteSame16.Check"}


def test_5_iscsi_test_cu(iscsi_lab: IscsiLab) -> None:
    lab = iscsi_lab
    d = lab.create_disk(paths=1, size=16 << 20)
    lab.wait(lambda: lab.all_served([d]), 30, "the compliance disk served")
    url = f"iscsi://{d.paths[0].ip}:3260/{d.iqn}/1"
    listing = subprocess.run(["iscsi-test-cu", "-l"], capture_output=True, text=True, timeout=30).stdout.split()
    suites: dict[str, list[str]] = {}
    for name in listing:
        parts = name.split(".")
        if parts[0] == "ALL" and len(parts) == 3:
            suites.setdefault(parts[1], []).append(parts[2])
    runs = []
    excluded = CRASHERS | SLOW
    for suite, tests in sorted(suites.items()):
        if any(f"{suite}.{t}" in excluded for t in tests):
            runs += [f"ALL.{suite}.{t}" for t in tests if f"{suite}.{t}" not in excluded]
        else:
            runs.append(f"ALL.{suite}")
    total = {"tests": 0, "ran": 0, "passed": 0, "failed": 0}
    failures: list[tuple[str, str]] = []
    crashed: list[str] = []
    t0 = time.monotonic()
    owner = lab.gw[str(lab.owners()[f"{d.id}/1"])]
    for t in runs:
        pid = owner.tgtd_pid()
        r = subprocess.run(exec_argv(lab.ini(), ["timeout", "150", "iscsi-test-cu", "-d", "-n", "-t", t, url]),
                           capture_output=True, text=True, timeout=180)
        m = re.search(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", r.stdout, re.M)
        if m:
            for k, v in zip(("tests", "ran", "passed", "failed"), m.groups()):
                total[k] += int(v)
        failures += re.findall(r"^Suite (\S+), Test (\S+) had failures", r.stdout, re.M)
        if owner.tgtd_pid() != pid or not m:
            crashed.append(t)
            lab.wait(lambda: iscsi.inq(f"{d.paths[0].ip}:3260", d.iqn, lab.ini(), timeout=1) is not None, 20,
                     "the target back after a crash")
    took = time.monotonic() - t0
    print(f"\niscsi-test-cu against {url} (tgt + bs_rbd via pathagent), {len(runs)} runs in {took:.0f} s: "
          f"{total['passed']} passed, {total['failed']} failed of {total['ran']} run "
          f"({total['tests']} selected)")
    print(f"excluded, a zero-length READ aborts tgtd through librbd's assert: {', '.join(sorted(CRASHERS))}")
    print(f"excluded, tgt's block-by-block WRITE SAME takes minutes without the librbd cache: "
          f"{', '.join(sorted(SLOW))}")
    print(f"failed: {', '.join(f'{s}.{t}' for s, t in failures) or 'none'}")
    print(f"runs during which tgtd died or answered nothing: {', '.join(crashed) or 'none'}")
    assert total["passed"] >= 150
    assert not crashed
