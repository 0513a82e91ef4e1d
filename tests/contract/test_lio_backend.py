"""The ``lio`` backend in a real kernel (tier 4), beyond the shared contract (test_target_backends.py):

- two paths of one disk: the same unit serial and NAA identity and the same ALUA report at both path IPs,
  one relative port per path, data written through one path read through the other and through RBD;
- two gateways (guests) serving one path each report the same ALUA groups and ports, and discovery at
  either path IP lists both;
- export twice changes nothing, unexport removes exactly what export made (configfs and mappings);
- a target, a storage object and an rbd mapping made by hand survive our exports, fences, cleanups and
  restarts;
- a subset of ``iscsi-test-cu`` (libiscsi's SCSI conformance suite) against a LIO path, counts printed.

Every guest runs the stock Debian kernel under QEMU (``lab.guest``); the initiator and Ceph are on the host.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import shlex
import subprocess
import time
import uuid
from typing import Any, Iterator

import pytest

from agent.backend import PluginContext
from agent.config import CephConfig
from agent.core.model import Disk, PathKey, PathSpec
from lab import iscsi
from lab.gwtools import RbdImages
from lab.liorpc import RemoteBackend
from lab.netns import GatewayLab
from plugins.lio.krbd import parse_keyring, parse_mon_host, read_conf_value

pytestmark = pytest.mark.lio

INI = "iqn.2016-05.io.pathagent.test:ini-a"
_vips = itertools.count(200)          # lio_lab offsets .200-.253: above the lio contract column's vips
                                      # (.100-.199, test_target_backends), so no IP moves between guests


@pytest.fixture(scope="module")
def lio_guest_b(lio_lab: GatewayLab, lio_guest: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A second LIO gateway on the same bridge."""
    from lab.guest import GuestPool
    with GuestPool(lio_lab, tmp_path_factory.mktemp("lio-b")) as pool:
        g, = pool.boot("liob")
        print(f"\nlio guest {g.name} ({g.ip}): boot to ready {g.boot_seconds or 0:.1f} s")
        yield g


@pytest.fixture(autouse=True)
def lun0() -> Iterator[None]:
    old = iscsi.DEFAULT_LUN
    iscsi.DEFAULT_LUN = 0
    yield
    iscsi.DEFAULT_LUN = old


class Gateway:
    """The lio backend in one guest, with the addresses this test put there."""

    def __init__(self, guest: Any, ceph: Any) -> None:
        with open(ceph.conf_path) as f:
            self.monitors = read_conf_value(f.read(), "mon host") or ""
        self.guest = guest
        self.state = f"/run/pa-lio/{uuid.uuid4().hex[:8]}"
        self.backends: list[RemoteBackend] = []
        self.addresses: list[str] = []

    def new(self, conf: str = "/nonexistent", data_client_id: str = "admin", **options: Any) -> RemoteBackend:
        ctx = PluginContext(node=self.guest.name, state_dir=self.state,
                            options={"monitors": self.monitors, "dbroot": "/etc/target", **options},
                            ceph=CephConfig(conf=conf, client_id="admin", data_client_id=data_client_id))
        b = RemoteBackend(self.guest, "lio", ctx)
        self.backends.append(b)
        return b

    def add_ip(self, spec: PathSpec) -> str:
        addr = f"{spec.ip}/{spec.prefix}"
        self.guest.exec(["ip", "addr", "replace", addr, "dev", "eth0"], check=True)
        self.addresses.append(addr)
        return f"{spec.ip}:3260"

    def sh(self, cmd: str, timeout: float = 60) -> str:
        r = self.guest.exec(["sh", "-c", cmd], timeout=timeout)
        assert r.rc == 0, f"{cmd}: {r.stderr}"
        return str(r.stdout)

    def close(self) -> None:
        b = self.new()
        for p in sorted(b.exported()):
            b.unexport(p)
        for x in self.backends:
            with contextlib.suppress(Exception):
                x.close()
        for addr in self.addresses:
            self.guest.exec(["ip", "addr", "del", addr, "dev", "eth0"])


@pytest.fixture
def gw(lio_guest: Any, ceph: Any) -> Iterator[Gateway]:
    g = Gateway(lio_guest, ceph)
    yield g
    g.close()


def _offset() -> int:
    n = next(_vips)
    assert n < 254, "test_lio_backend uses more lio_lab addresses than it has"
    return n


def _disk(lab: GatewayLab, images: RbdImages, paths: int = 2, initiators: tuple[str, ...] | None = (INI,),
          size: int = 64 << 20) -> Disk:
    did = f"l{uuid.uuid4().hex[:8]}"
    images.create(f"img-{did}", size)
    specs = tuple(PathSpec(index=i, ip=lab.addr(_offset()), prefix=24) for i in range(1, paths + 1))
    return Disk(id=did, name=did, iqn=f"iqn.2016-05.io.pathagent:{did}", serial=str(uuid.uuid4()), paths=specs,
                pool="rbd", image=f"img-{did}", size=size, initiators=initiators)


def _rbd_write(images: RbdImages, image: str, offset: int, data: bytes) -> None:
    import rbd
    with rbd.Image(images.ioctx, image) as img:
        img.write(data, offset)
        img.flush()


def _identity(s: iscsi.Session) -> tuple[str, list[bytes]]:
    """The unit serial and the NAA designators (type 3): the LUN's identity."""
    return s.serial(), sorted(v for t, v in s.designators() if t == 3)


def test_two_paths_one_identity_one_alua_report_and_the_same_data(gw: Gateway, lio_lab: GatewayLab,
                                                                  images: RbdImages) -> None:
    ns = lio_lab.ns("ini")
    b = gw.new()
    d = _disk(lio_lab, images)
    for i in (1, 2):
        b.export(PathKey(d.id, i), d)
    p1, p2 = (gw.add_ip(s) for s in d.paths)
    mapped = gw.sh("ls /sys/bus/rbd/devices").split()
    assert len(mapped) == 1, "one krbd mapping serves both paths"
    before = bytes([0x5A]) * 65536
    _rbd_write(images, d.image, 1 << 20, before)                     # through RBD directly, before any login
    with iscsi.Session(p1, d.iqn, initiator=INI, netns=ns) as a, \
            iscsi.Session(p2, d.iqn, initiator=INI, netns=ns) as c:
        ida, idc = _identity(a), _identity(c)
        assert ida == idc and ida[0] == d.serial and ida[1], (ida, idc)
        ra, rc = a.report_target_port_groups(), c.report_target_port_groups()
        ports = (a.relative_port(), c.relative_port())
        print(f"\nALUA report at both path IPs: {ra}; relative ports path 1/2: {ports}")
        assert ra == rc and ra
        assert ports[0] != ports[1] and all(ports)
        assert {p for _, _, ps in ra for p in ps} >= set(ports)
        assert c.read((1 << 20) // 512, len(before) // 512) == before
        pattern = bytes(range(256)) * 256                       # 64 KiB
        a.write(4096, pattern)
        a.sync()
        assert c.read(4096, len(pattern) // 512) == pattern
    assert images.read(d.image, 4096 * 512, len(pattern)) == pattern


def test_two_gateways_report_the_same_alua_and_discovery(gw: Gateway, lio_guest_b: Any, ceph: Any,
                                                         lio_lab: GatewayLab, images: RbdImages) -> None:
    ns = lio_lab.ns("ini")
    other = Gateway(lio_guest_b, ceph)
    try:
        d = _disk(lio_lab, images, initiators=None)
        a, b = gw.new(), other.new()
        a.export(PathKey(d.id, 1), d)
        b.export(PathKey(d.id, 2), d)
        assert a.exported() == {PathKey(d.id, 1)} and b.exported() == {PathKey(d.id, 2)}
        p1, p2 = gw.add_ip(d.paths[0]), other.add_ip(d.paths[1])
        with iscsi.Session(p1, d.iqn, initiator=INI, netns=ns) as s1, \
                iscsi.Session(p2, d.iqn, initiator=INI, netns=ns) as s2:
            assert _identity(s1) == _identity(s2)
            r1, r2 = s1.report_target_port_groups(), s2.report_target_port_groups()
            ports = (s1.relative_port(), s2.relative_port())
            print(f"\ngateway {gw.guest.name} path 1 and {other.guest.name} path 2: ALUA {r1} / {r2}; "
                  f"relative ports {ports}")
            assert r1 == r2 and ports[0] != ports[1]
            pattern = bytes([0xC3]) * 32768
            s1.write(100, pattern)
            s1.sync()
            assert s2.read(100, len(pattern) // 512) == pattern     # one image behind both gateways
        for portal in (p1, p2):
            found = iscsi.discover(portal, ns, initiator=INI)
            assert {(d.iqn, f"{s.ip}:3260,{s.index}") for s in d.paths} <= set(found), (portal, found)
    finally:
        other.close()


def _tree(gw: Gateway) -> tuple[list[str], list[str]]:
    """Our view of the kernel: every configfs path under target/ (without attribute files) and the rbd
    mappings."""
    dirs = gw.sh("find /sys/kernel/config/target -type d -o -type l | sort").split()
    maps = gw.sh("ls /sys/bus/rbd/devices 2>/dev/null || true").split()
    return dirs, maps


def test_unexport_removes_exactly_what_export_made(gw: Gateway, lio_lab: GatewayLab, images: RbdImages) -> None:
    b = gw.new()
    warm = _disk(lio_lab, images, paths=1)
    b.export(PathKey(warm.id, 1), warm)                          # LIO started, modules loaded
    b.unexport(PathKey(warm.id, 1))
    empty = _tree(gw)
    d = _disk(lio_lab, images)
    b.export(PathKey(d.id, 1), d)
    b.export(PathKey(d.id, 2), d)
    full = _tree(gw)
    b.export(PathKey(d.id, 1), d)                                # twice: a no-op
    b.export(PathKey(d.id, 2), d)
    assert _tree(gw) == full
    made = sorted(set(full[0]) - set(empty[0]))
    assert any(f"tpgt_1" in x for x in made) and any(f"tpgt_2" in x for x in made)
    assert any(x.endswith("/lun/lun_0") for x in made) and len(full[1]) == len(empty[1]) + 1
    b.unexport(PathKey(d.id, 2))
    assert b.exported() == {PathKey(d.id, 1)}
    b.unexport(PathKey(d.id, 1))
    assert _tree(gw) == empty, sorted(set(_tree(gw)[0]) ^ set(empty[0]))


FOREIGN = """
import sys
import os
from rtslib_fb import FabricModule, FileIOStorageObject, LUN, NetworkPortal, RTSRoot, TPG, Target
os.makedirs("/etc/rtslib-fb-target", exist_ok=True)     # what Debian's rtslib-fb-targetctl.service does
RTSRoot()
if sys.argv[1] == "make":
    so = FileIOStorageObject("handmade", "/run/handmade.img", size=8 << 20)
    t = Target(FabricModule("iscsi"), "iqn.2003-01.org.example:handmade")
    tpg = TPG(t, 1)
    LUN(tpg, 0, so)
    tpg.enable = True
else:
    for t in RTSRoot().targets:
        if t.wwn == "iqn.2003-01.org.example:handmade":
            t.delete()
    for so in RTSRoot().storage_objects:
        if so.name == "handmade":
            so.delete()
"""


def test_foreign_objects_survive_exports_fences_cleanups_and_restarts(gw: Gateway, lio_lab: GatewayLab,
                                                                      images: RbdImages) -> None:
    img = f"handmade-{uuid.uuid4().hex[:6]}"
    images.create(img, 16 << 20)
    gw.guest.write_file("/run/handmade.py", FOREIGN)
    gw.sh("python3 /run/handmade.py make", timeout=120)
    line = f"{parse_mon_host(gw.monitors).addresses[0]} name=admin rbd {img} -"
    gw.sh(f"modprobe rbd && echo {shlex.quote(line)} > /sys/bus/rbd/add_single_major")
    try:
        def foreign() -> tuple[bool, bool, list[str]]:
            t = gw.sh("cat /sys/kernel/config/target/iscsi/iqn.2003-01.org.example:handmade/tpgt_1/enable "
                      "2>/dev/null || echo gone").strip()
            so = gw.sh("ls -d /sys/kernel/config/target/core/fileio_*/handmade 2>/dev/null || true").strip()
            maps = [m for m in gw.sh("cat /sys/bus/rbd/devices/*/name 2>/dev/null || true").split()
                    if m == img]
            return t == "1", bool(so), maps
        assert foreign() == (True, True, [img])
        b = gw.new()
        d = _disk(lio_lab, images)
        b.export(PathKey(d.id, 1), d)
        b.export(PathKey(d.id, 2), d)
        b.fence()
        assert b.exported() == frozenset()
        assert foreign() == (True, True, [img]), "a fence touches only our TPGs"
        again = gw.new()                                          # a restart, then the cleanup of leftovers
        other = _disk(lio_lab, images, paths=1)
        again.export(PathKey(other.id, 1), other)                 # tidies the fenced disk away
        assert gw.sh(f"ls /sys/kernel/config/target/iscsi | grep -c {d.id} || true").strip() == "0"
        again.unexport(PathKey(other.id, 1))
        assert again.exported() == frozenset()
        assert foreign() == (True, True, [img]), "cleanup removes only what the record names"
    finally:
        gw.sh("python3 /run/handmade.py remove", timeout=120)
        for n in gw.sh(f"grep -l {img} /sys/bus/rbd/devices/*/name 2>/dev/null || true").split():
            gw.sh(f"echo {n.split('/')[-2]} > /sys/bus/rbd/remove_single_major")


SUITES = ["SCSI.TestUnitReady", "SCSI.Inquiry", "SCSI.ReadCapacity10", "SCSI.ReadCapacity16", "SCSI.Read10",
          "SCSI.Write10", "SCSI.Read16", "SCSI.Write16", "SCSI.ProutRegister", "SCSI.PrinReadKeys",
          "iSCSI.iSCSITMF"]


def test_iscsi_test_cu_subset_passes(gw: Gateway, lio_lab: GatewayLab, images: RbdImages) -> None:
    d = _disk(lio_lab, images, paths=1, initiators=None)
    b = gw.new()
    b.export(PathKey(d.id, 1), d)
    portal = gw.add_ip(d.paths[0])
    url = f"iscsi://{portal}/{d.iqn}/0"
    counts = {"run": 0, "passed": 0, "failed": 0}
    failures: list[str] = []
    for suite in SUITES:
        r = subprocess.run(["ip", "netns", "exec", lio_lab.ns("ini"), "iscsi-test-cu", "-i", INI,
                            "-I", "iqn.2016-05.io.pathagent.test:ini-b", "-d", "-s", "-t", suite, url],
                           capture_output=True, text=True, timeout=300)
        m = re.search(r"tests\s+\d+\s+(\d+)\s+(\d+)\s+(\d+)", r.stdout)
        assert m, f"{suite}: no CUnit summary (rc {r.returncode}): {r.stdout[-800:]} {r.stderr[-400:]}"
        run, passed, failed = map(int, m.groups())
        counts["run"] += run
        counts["passed"] += passed
        counts["failed"] += failed
        if failed:
            failures.append(f"{suite}: {failed} failed\n{r.stdout[-1500:]}")
    print(f"\niscsi-test-cu against LIO (iblock on krbd), {len(SUITES)} suites: {counts}")
    assert counts["run"] > 0 and not failures, "\n".join(failures)


def test_a_mapping_an_interrupted_export_left_behind_is_removed(gw: Gateway, lio_lab: GatewayLab,
                                                                images: RbdImages) -> None:
    """The process died between the map and the record: the next export of the disk finds the mapping (this
    backend's client name with noshare, this image, recorded for no disk), removes it and maps afresh."""
    d = _disk(lio_lab, images, paths=1)
    line = f"{parse_mon_host(gw.monitors).addresses[0]} name=admin,noshare rbd {d.image} -"
    gw.sh(f"modprobe rbd && echo {shlex.quote(line)} > /sys/bus/rbd/add_single_major")

    def maps() -> list[str]:
        return [n for n in gw.sh("cat /sys/bus/rbd/devices/*/name 2>/dev/null || true").split() if n == d.image]
    def clients() -> list[str]:
        return gw.sh(f"for d in $(grep -l {d.image} /sys/bus/rbd/devices/*/name 2>/dev/null); do "
                     "cat $(dirname $d)/client_addr; done").split()
    orphan = clients()
    assert len(orphan) == 1
    b = gw.new()
    b.export(PathKey(d.id, 1), d)
    now = clients()
    assert len(now) == 1 and now != orphan, (orphan, now)
    b.unexport(PathKey(d.id, 1))
    assert maps() == [], "the fresh mapping is recorded, so unexport removed it"


def test_user_rbd_backstore_through_tcmu_runner(gw: Gateway, lio_lab: GatewayLab, images: RbdImages,
                                                ceph: Any) -> None:
    """``backstore = "user:rbd"``: the LUN on tcmu-runner's rbd handler (librbd in userspace, the node's data
    client name), no krbd mapping; the same identity and data as the block backstore."""
    g = gw.guest
    assert g.exec(["test", "-x", "/usr/bin/tcmu-runner"]).rc == 0, "the guest image has no tcmu-runner"
    g.write_file("/etc/ceph/ceph.conf", f"[global]\nmon host = {gw.monitors}\nauth cluster required = none\n"
                 "auth service required = none\nauth client required = none\n", mkdir=True)
    gw.sh("mkdir -p /run/dbus && (pidof dbus-daemon || dbus-daemon --system --fork) >/dev/null; modprobe target_core_user")
    runner = g.spawn(["/usr/bin/tcmu-runner", "--debug"], log="/run/tcmu-runner.log")
    try:
        # tcmu-runner is ready once it owns its D-Bus name (it loaded its handlers and listens to the kernel)
        t0 = time.monotonic()
        while "acquired" not in gw.sh("cat /var/log/tcmu-runner.log 2>/dev/null || true"):
            assert time.monotonic() - t0 < 60, "tcmu-runner did not get ready: " + \
                gw.sh("tail -5 /var/log/tcmu-runner.log 2>/dev/null || true")
            time.sleep(0.2)
        print(f"\ntcmu-runner ready {time.monotonic() - t0:.1f} s after its start")
        ns = lio_lab.ns("ini")
        d = _disk(lio_lab, images, paths=1)
        b = gw.new(conf="/etc/ceph/ceph.conf", backstore="user:rbd")
        before = gw.sh("ls /sys/bus/rbd/devices 2>/dev/null || true").split()
        b.export(PathKey(d.id, 1), d)
        assert b.exported() == {PathKey(d.id, 1)}
        assert gw.sh("ls /sys/bus/rbd/devices 2>/dev/null || true").split() == before, "no krbd mapping"
        portal = gw.add_ip(d.paths[0])
        pattern = bytes(range(256)) * 128
        with iscsi.Session(portal, d.iqn, initiator=INI, netns=ns) as s:
            assert s.serial() == d.serial and s.capacity() == (d.size // 512, 512)
            s.write(64, pattern)
            s.sync()
            assert s.read(64, len(pattern) // 512) == pattern
            p = s.provisioning()        # tcmu-runner's rbd handler answers it and handles UNMAP itself
            assert p.lbpme and p.lbpu, p
            obj = 4 << 20
            for k in range(4):
                s.write(obj // 512 + k * 2048, b"\x5a" * (1 << 20))
            s.sync()
            full = images.allocated(d.image)
            s.unmap(obj // 512, obj // 512)
            assert s.read(obj // 512, 8) == bytes(4096)
        assert images.read(d.image, 64 * 512, len(pattern)) == pattern
        assert images.allocated(d.image) <= full - obj, "UNMAP freed the object in RBD"
        b.unexport(PathKey(d.id, 1))
        assert b.exported() == frozenset()
        assert gw.sh("ls -d /sys/kernel/config/target/core/user_*/pathagent-* 2>/dev/null || true").strip() == ""
    finally:
        g.signal(runner)
        print("\ntcmu-runner log tail:\n" + gw.sh("tail -c 1500 /var/log/tcmu-runner.log 2>/dev/null || true"))


def test_block_backstore_on_cephx_with_the_guides_data_client_caps(gw: Gateway, lio_lab: GatewayLab,
                                                                   gw_lab: GatewayLab, tmp_path: Any) -> None:
    """krbd as the gateway's data client on a cephx cluster, with exactly the caps docs/deployment.md gives
    it (parsed from the guide): the map authenticates with the key from the default keyring path, the LUN
    serves I/O that RBD reads back, the key appears in no record and no log, and unexport unmaps."""
    from lab.ceph import MicroCeph
    from lab.iscsilab import guide_users
    node = gw.guest.name
    data = f"pathagent-{node}"
    with MicroCeph(tmp_path / "cephx", ip=gw_lab.host_ip, cephx=True) as cx:
        (entity, caps), = [(e, c) for e, c in guide_users([node]) if e == f"client.{data}"]
        with open(cx.add_user(entity, caps)) as f:
            keyring = f.read()
        key = parse_keyring(keyring, data)
        assert key
        with open(cx.conf_path) as f:
            monitors = read_conf_value(f.read(), "mon host") or ""
        images = RbdImages(cx.conf_path)            # client.admin, from the cluster's keys
        try:
            d = _disk(lio_lab, images, paths=1)
            b = gw.new(data_client_id=data, monitors=monitors)
            with pytest.raises(Exception) as no_key:       # no keyring on the gateway yet
                b.export(PathKey(d.id, 1), d)
            print(f"\nwithout its keyring: {type(no_key.value).__name__}: {no_key.value}")
            assert f"/etc/ceph/ceph.client.{data}.keyring" in str(no_key.value), "the error says what is missing"
            assert b.exported() == frozenset()
            gw.guest.write_file(f"/etc/ceph/ceph.client.{data}.keyring", keyring, mode=0o600, mkdir=True)
            b.export(PathKey(d.id, 1), d)
            assert b.exported() == {PathKey(d.id, 1)}
            dev = gw.sh("grep -l 'name=" + data + ",' /sys/bus/rbd/devices/*/config_info || true").split()
            assert len(dev) == 1, "one krbd mapping, as the data client"
            portal = gw.add_ip(d.paths[0])
            pattern = bytes(range(256)) * 256
            with iscsi.Session(portal, d.iqn, initiator=INI, netns=lio_lab.ns("ini")) as s:
                s.write(128, pattern)
                s.sync()
                assert s.read(128, len(pattern) // 512) == pattern
            assert images.read(d.image, 128 * 512, len(pattern)) == pattern
            leaked = gw.sh(f"grep -rl -F '{key}' {gw.state} /run /var/log 2>/dev/null || true").split()
            assert leaked == [], f"the cephx key is in {leaked}"
            b.unexport(PathKey(d.id, 1))
            assert gw.sh("grep -l 'name=" + data + ",' /sys/bus/rbd/devices/*/config_info 2>/dev/null || true"
                         ).split() == [], "unexport unmapped it"
        finally:
            gw.guest.exec(["rm", "-f", f"/etc/ceph/ceph.client.{data}.keyring"])
            images.close()


_VLAN_SCRIPT = """
import json, sys
from agent.backend import PluginContext
from agent.core.model import PathKey, PathSpec
from plugins.iproute import IprouteNetwork
op, state, vlan = sys.argv[1], sys.argv[2], int(sys.argv[3])
net = IprouteNetwork(PluginContext(node="g", state_dir=state,
                                   options={"interfaces": {"198.19.250.0/24": "eth0"}, "arping": ""}))
p, spec = PathKey("vl", 1), PathSpec(1, "198.19.250.10", 24, vlan=vlan)
net.up(p, spec) if op == "up" else net.down(p, spec)
print(json.dumps(sorted(str(x) for x in net.active())))
net.close()
"""


def test_a_vlan_path_is_reached_over_its_vlan(lio_guest: Any, lio_guest_b: Any) -> None:
    """The ``iproute`` network backend in a stock kernel (802.1Q): a path with ``vlan = 20`` goes on
    ``eth0.20``, made by the backend on the interface of its subnet; another host on the same bridge reaches
    it over its own VLAN 20 interface, nothing of it is untagged, and ``down`` takes it away (the VLAN
    interface stays)."""
    from lab.guest import TOP
    a, b = lio_guest, lio_guest_b
    state = f"/run/pa-vlan-{uuid.uuid4().hex[:6]}"

    def run(op: str) -> list[str]:
        r = a.exec([str(TOP / ".venv" / "bin" / "python"), "-c", _VLAN_SCRIPT, op, state, "20"], cwd=str(TOP),
                   env={"PYTHONPATH": str(TOP)}, timeout=60)
        assert r.rc == 0, r.stderr
        return list(json.loads(r.stdout.strip().splitlines()[-1]))

    def sh(g: Any, cmd: str) -> str:
        r = g.exec(["sh", "-c", cmd], timeout=30)
        assert r.rc == 0, f"{cmd}: {r.stderr}"
        return str(r.stdout)
    try:
        assert run("up") == ["vl/1"]
        link = json.loads(sh(a, "ip -d -j link show eth0.20"))[0]
        assert link["linkinfo"]["info_kind"] == "vlan" and link["linkinfo"]["info_data"]["id"] == 20
        assert link["link"] == "eth0" and "UP" in link["flags"]
        assert "198.19.250.10" in sh(a, "ip -4 -o addr show dev eth0.20")
        assert "198.19.250.10" not in sh(a, "ip -4 -o addr show dev eth0"), "nothing untagged"
        sh(b, "ip link add link eth0 name eth0.20 type vlan id 20 && ip addr add 198.19.250.2/24 dev eth0.20 "
              "&& ip link set eth0.20 up")
        t0 = time.monotonic()
        while b.exec(["ping", "-c", "1", "-W", "1", "198.19.250.10"], timeout=10).rc != 0:
            assert time.monotonic() - t0 < 10, "the path IP is not reachable over VLAN 20"
        sh(b, "ip link set eth0.20 down")
        assert b.exec(["ping", "-c", "1", "-W", "1", "198.19.250.10"], timeout=10).rc != 0, \
            "not reachable once the other host leaves VLAN 20"
        assert run("down") == []
        assert "198.19.250.10" not in sh(a, "ip -4 -o addr show")
        assert sh(a, "ip -o link show eth0.20").strip(), "the VLAN interface stays"
    finally:
        for g in (a, b):
            g.exec(["ip", "link", "del", "eth0.20"], timeout=10)
