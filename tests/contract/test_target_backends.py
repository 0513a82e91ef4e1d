"""The ``TargetBackend`` contract, one behavioural suite over every target backend.

- ``fake``: runs anywhere.
- ``tgt``: a real tgtd started by the backend inside a gateway network namespace, LUNs on a micro Ceph
  reachable through the lab's root-namespace address, checked with a real userspace initiator
  (libiscsi) from the initiator namespace.
- ``lio``: needs kernel LIO (configfs); skipped with the reason where it cannot run.

The first group holds for every backend (idempotency, ``exported`` after a restart, ``cleanup``); the
second for backends with a data path (I/O, identity, ACL, CHAP); the last for tgt alone (tgtd crash,
Ceph outage, rollback).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import pytest

from agent.backend import PluginContext, TargetBackend
from agent.errors import PermanentBackendError, TransientBackendError
from agent.core.model import Chap, Disk, PathKey, PathSpec
from lab import iscsi
from lab.gwtools import RbdImages, stop_tgtd, tgt_missing
from lab.netns import GatewayLab, NetnsThread, ip

T = TypeVar("T")
_ids = itertools.count(1)
_vips = itertools.count(0)
INI = "iqn.2016-05.io.pathagent.test:ini-a"
OTHER_INI = "iqn.2016-05.io.pathagent.test:ini-b"


@dataclass
class Harness:
    """One backend under test: ``new()`` makes an instance on the same state dir (an agent restart),
    ``call`` runs in the backend's network namespace, ``disk()`` makes a disk it can serve."""

    name: str
    state_dir: str
    make: Callable[[], TargetBackend]
    real: bool = False
    lab: GatewayLab | None = None
    images: RbdImages | None = None
    ns_thread: NetnsThread | None = None
    node: str = "gwa"
    ceph_conf: str = ""
    backends: list[TargetBackend] = field(default_factory=list)
    addresses: list[tuple[str, str]] = field(default_factory=list)   # (namespace, ip/prefix) added by tests

    def new(self) -> TargetBackend:
        b = self.call(self.make)
        self.backends.append(b)
        return b

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.ns_thread.call(fn, *args) if self.ns_thread else fn(*args)

    def disk(self, paths: int = 2, initiators: tuple[str, ...] | None = (INI,), chap: Chap | None = None,
             mutual: Chap | None = None, size: int = 64 << 20) -> Disk:
        n = next(_ids)
        did = f"d{n}{uuid.uuid4().hex[:6]}"
        image = f"img-{did}"
        if self.images is not None:
            self.images.create(image, size)
        specs = tuple(PathSpec(index=i, ip=self.vip(), prefix=24) for i in range(1, paths + 1))
        return Disk(id=did, name=f"disk {did}", iqn=f"iqn.2016-05.io.pathagent:{did}", serial=str(uuid.uuid4()),
                    paths=specs, pool="rbd", image=image, size=size, initiators=initiators, chap=chap,
                    mutual_chap=mutual)

    def vip(self) -> str:
        n = next(_vips)
        return self.lab.vip(n) if self.lab else f"198.18.250.{n % 250 + 1}"


# ------------------------------------------------------------------------------------------------ harnesses

def _fake(tmp: str) -> Iterator[Harness]:
    from plugins.fake import FakeBackend
    ctx = PluginContext(node="gwa", state_dir=tmp)
    yield Harness("fake", tmp, lambda: FakeBackend(ctx))


def _tgt(request: pytest.FixtureRequest, tmp: str) -> Iterator[Harness]:
    reason = tgt_missing()
    if reason:
        pytest.skip(reason)
    lab: GatewayLab = request.getfixturevalue("gw_lab")
    ceph = request.getfixturevalue("ceph")
    images: RbdImages = request.getfixturevalue("images")
    from plugins.tgt import TgtBackend
    ctx = PluginContext(node="gwa", state_dir=tmp, options={"ceph_timeout": 3, "product_rev": "gwa"},
                        ceph={"conf": ceph.conf_path, "client_id": "admin"}, port=3260)
    th = NetnsThread(lab.ns("gwa"))
    h = Harness("tgt", tmp, lambda: TgtBackend(ctx), real=True, lab=lab, images=images, ns_thread=th,
                ceph_conf=ceph.conf_path)
    try:
        yield h
    finally:
        for b in h.backends:
            b.close()
        th.close()
        stop_tgtd(tmp)
        for ns, addr in h.addresses:
            ip("addr", "del", addr, "dev", "eth0", ns=ns, check=False)


def _lio(request: pytest.FixtureRequest, tmp: str) -> Iterator[Harness]:
    from agent.plugins import available
    if "lio" not in available("target"):
        pytest.skip("lio plugin is not installed (no pathagent.targets entry point 'lio')")
    if not os.path.isdir("/sys/kernel/config/target"):
        pytest.skip("no configfs/LIO on this host (tier 4 runs it in a guest)")
    pytest.skip("lio contract runs inside the LIO guest (tier 4), not on the host")
    yield  # pragma: no cover


LAB = pytest.mark.lab


@pytest.fixture(params=["fake", pytest.param("tgt", marks=LAB), pytest.param("lio", marks=pytest.mark.lio)])
def harness(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    yield from {"fake": lambda: _fake(str(tmp_path)), "tgt": lambda: _tgt(request, str(tmp_path)),
                "lio": lambda: _lio(request, str(tmp_path))}[request.param]()


@pytest.fixture(params=[pytest.param("tgt", marks=LAB), pytest.param("lio", marks=pytest.mark.lio)])
def real(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    yield from {"tgt": lambda: _tgt(request, str(tmp_path)), "lio": lambda: _lio(request, str(tmp_path))}[
        request.param]()


@pytest.fixture(params=[pytest.param("tgt", marks=LAB)])
def tgt(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Harness]:
    yield from _tgt(request, str(tmp_path))


# ------------------------------------------------------------------------------------------------ every backend

def test_export_unexport_idempotent(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk()
    p1, p2 = PathKey(d.id, 1), PathKey(d.id, 2)
    assert harness.call(b.exported) == frozenset()
    harness.call(b.export, p1, d)
    harness.call(b.export, p1, d)
    assert harness.call(b.exported) == {p1}
    harness.call(b.export, p2, d)
    assert harness.call(b.exported) == {p1, p2}
    harness.call(b.unexport, p1)
    assert harness.call(b.exported) == {p2}
    harness.call(b.unexport, p1)
    harness.call(b.unexport, p2)
    harness.call(b.unexport, p2)
    harness.call(b.unexport, PathKey("never-exported", 1))
    assert harness.call(b.exported) == frozenset()


def test_exported_survives_agent_restart(harness: Harness) -> None:
    b = harness.new()
    d1, d2 = harness.disk(), harness.disk()
    want = {PathKey(d1.id, 1), PathKey(d1.id, 2), PathKey(d2.id, 2)}
    for p in sorted(want):
        harness.call(b.export, p, d1 if p.disk == d1.id else d2)
    harness.call(b.close)
    again = harness.new()
    assert harness.call(again.exported) == want
    harness.call(again.unexport, PathKey(d2.id, 2))
    assert harness.call(again.exported) == want - {PathKey(d2.id, 2)}


def test_cleanup_keeps_only_keep(harness: Harness) -> None:
    b = harness.new()
    d1, d2 = harness.disk(), harness.disk()
    for d in (d1, d2):
        for i in (1, 2):
            harness.call(b.export, PathKey(d.id, i), d)
    keep = frozenset({PathKey(d1.id, 2)})
    harness.call(b.cleanup, keep)
    assert harness.call(b.exported) == keep
    assert harness.call(harness.new().exported) == keep
    harness.call(b.cleanup, frozenset())
    assert harness.call(b.exported) == frozenset()


def test_export_of_unknown_path_is_permanent(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk(paths=1)
    with pytest.raises(PermanentBackendError):
        harness.call(b.export, PathKey(d.id, 7), d)
    assert harness.call(b.exported) == frozenset()


def test_changed_definition_is_updated_in_place(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk(initiators=(INI,))
    p = PathKey(d.id, 1)
    harness.call(b.export, p, d)
    changed = Disk(**{**{f: getattr(d, f) for f in d.__dataclass_fields__}, "initiators": (INI, OTHER_INI)})
    harness.call(b.export, p, changed)
    assert harness.call(b.exported) == {p}


# ------------------------------------------------------------------------------------------------ data path

def _serve(h: Harness, b: TargetBackend, d: Disk, index: int = 1) -> str:
    """Export path ``index`` and bring its IP up in the gateway namespace (what the network plugin does);
    returns the portal."""
    h.call(b.export, PathKey(d.id, index), d)
    spec = d.path(index)
    assert spec is not None and h.lab is not None
    _add_ip(h, h.lab.ns(h.node), f"{spec.ip}/{spec.prefix}")
    return f"{spec.ip}:3260"


def _add_ip(h: Harness, ns: str, addr: str) -> None:
    ip("addr", "replace", addr, "dev", "eth0", ns=ns)
    h.addresses.append((ns, addr))


def test_initiator_io_and_identity(real: Harness) -> None:
    h = real
    assert h.lab is not None and h.images is not None
    b = h.new()
    d = h.disk()
    portal = _serve(h, b, d)
    pattern = bytes(range(256)) * 16 * 64           # 256 KiB
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=h.lab.ns("ini")) as s:
        blocks, bs = s.capacity()
        assert (blocks * bs, bs) == (d.size, 512)
        inq = s.inquiry()
        assert (inq.vendor, inq.product) == ("PATHAGNT", "RBD")
        assert s.serial() == d.serial
        assert any(d.serial.encode() in x for x in s.device_ids())
        s.write(2048, pattern)
        s.sync()
        assert s.read(2048, len(pattern) // 512) == pattern
    assert h.images.read(d.image, 2048 * 512, len(pattern)) == pattern


def test_acl_unlisted_initiator_refused(real: Harness) -> None:
    h = real
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    listed, open_, closed = h.disk(initiators=(INI,)), h.disk(initiators=None), h.disk(initiators=())
    portals = {d.id: _serve(h, b, d) for d in (listed, open_, closed)}
    assert iscsi.inq(portals[listed.id], listed.iqn, ns, initiator=INI) is not None
    assert iscsi.inq(portals[listed.id], listed.iqn, ns, initiator=OTHER_INI) is None
    with pytest.raises(iscsi.IscsiError):
        iscsi.Session(portals[listed.id], listed.iqn, initiator=OTHER_INI, netns=ns, reconnect=False)
    assert iscsi.inq(portals[open_.id], open_.iqn, ns, initiator=OTHER_INI) is not None
    assert iscsi.inq(portals[closed.id], closed.iqn, ns, initiator=INI) is None
    # access changed in place: admit the other initiator, then nobody
    h.call(b.export, PathKey(listed.id, 1), _with(listed, initiators=(INI, OTHER_INI)))
    assert iscsi.inq(portals[listed.id], listed.iqn, ns, initiator=OTHER_INI) is not None
    h.call(b.export, PathKey(listed.id, 1), _with(listed, initiators=()))
    assert iscsi.inq(portals[listed.id], listed.iqn, ns, initiator=INI) is None


def _with(d: Disk, **kw: Any) -> Disk:
    return Disk(**{**{f: getattr(d, f) for f in d.__dataclass_fields__}, **kw})


def test_chap_and_mutual_chap(real: Harness) -> None:
    h = real
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d = h.disk(chap=Chap("alice", "alice-secret-1"))
    portal = _serve(h, b, d)
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI) is None                               # no CHAP
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI, chap=("alice", "wrong-secret-9")) is None
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI, chap=("alice", "alice-secret-1")) is not None
    # the password changes in place; the old one is refused afterwards
    d2 = _with(d, chap=Chap("alice", "alice-secret-2"), mutual_chap=Chap("target", "target-secret-1"))
    h.call(b.export, PathKey(d.id, 1), d2)
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI, chap=("alice", "alice-secret-1")) is None
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=ns, chap=("alice", "alice-secret-2"),
                       mutual=("target", "target-secret-1")) as s:
        assert s.capacity()[0] > 0
    with pytest.raises(iscsi.IscsiError):     # the target cannot prove a secret it does not have
        iscsi.Session(portal, d.iqn, initiator=INI, netns=ns, chap=("alice", "alice-secret-2"),
                      mutual=("target", "not-the-secret"), reconnect=False)
    # no secret in the backend's own files other than its root-only record
    st = os.stat(os.path.join(h.state_dir, "tgt", "exports.json")) if h.name == "tgt" else None
    if st is not None:
        assert st.st_mode & 0o077 == 0
        log = open(os.path.join(h.state_dir, "tgt", "tgtd.log"), errors="replace").read()
        assert "alice-secret" not in log


# ------------------------------------------------------------------------------------------------ tgt only

def _tgtd_pid(h: Harness) -> int:
    with open(os.path.join(h.state_dir, "tgt", "tgtd.pid")) as f:
        return int(f.read().split()[0])


def test_tgt_same_identity_on_two_gateways(tgt: Harness, tmp_path: Any) -> None:
    """The same disk served by gwa and gwb: same serial and device id, so multipath groups the paths;
    data written through one gateway reads back through the other."""
    h = tgt
    assert h.lab is not None
    from plugins.tgt import TgtBackend
    a = h.new()
    d = h.disk()
    pa = _serve(h, a, d, 1)
    ctx_b = PluginContext(node="gwb", state_dir=str(tmp_path / "gwb"), options={"product_rev": "gwb"},
                          ceph={"conf": h.ceph_conf, "client_id": "admin"}, port=3260)
    with NetnsThread(h.lab.ns("gwb")) as tb:
        b = tb.call(TgtBackend, ctx_b)
        try:
            tb.call(b.export, PathKey(d.id, 2), d)
            spec = d.path(2)
            assert spec is not None
            _add_ip(h, h.lab.ns("gwb"), f"{spec.ip}/24")
            ns = h.lab.ns("ini")
            data = os.urandom(64 * 1024)
            with iscsi.Session(pa, d.iqn, initiator=INI, netns=ns) as s1, \
                    iscsi.Session(f"{spec.ip}:3260", d.iqn, initiator=INI, netns=ns) as s2:
                assert (s1.inquiry().revision, s2.inquiry().revision) == ("gwa", "gwb")
                assert s1.serial() == s2.serial() == d.serial
                assert s1.device_ids() == s2.device_ids()
                s1.write(100, data)
                s1.sync()
                assert s2.read(100, len(data) // 512) == data
        finally:
            tb.call(b.close)
            stop_tgtd(str(tmp_path / "gwb"))


def test_tgt_restart_keeps_tgtd_and_close_does_not_stop_it(tgt: Harness) -> None:
    h = tgt
    b = h.new()
    d = h.disk()
    h.call(b.export, PathKey(d.id, 1), d)
    pid = _tgtd_pid(h)
    h.call(b.close)
    b2 = h.new()
    assert h.call(b2.exported) == {PathKey(d.id, 1)}
    assert _tgtd_pid(h) == pid
    assert open(f"/proc/{pid}/comm").read().strip() == "tgtd"


def test_tgt_restores_targets_after_tgtd_is_killed(tgt: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h = tgt
    assert h.lab is not None and h.images is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d1, d2 = h.disk(chap=Chap("bob", "bob-secret-123")), h.disk(initiators=None)
    p1, p2 = _serve(h, b, d1), _serve(h, b, d2)
    h.call(b.export, PathKey(d1.id, 2), d1)
    before = h.call(b.exported)
    data = os.urandom(32 * 1024)
    with iscsi.Session(p2, d2.iqn, initiator=INI, netns=ns) as s:
        s.write(8, data)
        s.sync()
    pid = _tgtd_pid(h)
    caplog.set_level(logging.WARNING, logger="plugins.tgt")
    os.kill(pid, 9)
    t0 = time.monotonic()
    # the backend's watcher restarts tgtd and replays without waiting for the agent's next call
    while iscsi.inq(p2, d2.iqn, ns, initiator=INI, timeout=1) is None:
        assert time.monotonic() - t0 < 5, "targets not restored within 5 s"
        time.sleep(0.02)
    took = time.monotonic() - t0
    print(f"\ntgtd kill -9 -> {len(before)} paths served again after {took:.3f} s (no agent call)")
    assert h.call(b.exported) == before
    assert _tgtd_pid(h) != pid
    assert any("killed by signal 9" in r.getMessage() and "replaying 2 disk" in r.getMessage()
               for r in caplog.records)
    assert iscsi.inq(p1, d1.iqn, ns, initiator=INI, chap=("bob", "bob-secret-123")) is not None
    assert iscsi.inq(p1, d1.iqn, ns, initiator=INI, chap=("bob", "wrong-secret-1")) is None
    assert iscsi.inq(p1, d1.iqn, ns, initiator=OTHER_INI, chap=("bob", "bob-secret-123")) is None
    with iscsi.Session(p2, d2.iqn, initiator=INI, netns=ns) as s:
        assert s.read(8, len(data) // 512) == data


def test_tgt_recovers_from_the_zero_length_read_crash(tgt: Harness) -> None:
    """A zero-length READ from any logged-in initiator aborts tgtd (librbd assert); supervision in
    ``exported`` brings every target back."""
    h = tgt
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d = h.disk(initiators=None)
    portal = _serve(h, b, d)
    pid = _tgtd_pid(h)
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=ns, reconnect=False, timeout=3) as s:
        s.read_zero_length()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(") ")[1][0] not in "ZX":
        assert time.monotonic() < deadline, "tgtd survived the zero-length READ (tgt fixed?)"
        time.sleep(0.05)
    assert h.call(b.exported) == {PathKey(d.id, 1)}
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI) is not None


def test_tgt_ceph_unreachable_is_transient_and_tgtd_stays_responsive(tgt: Harness, ceph: Any) -> None:
    h = tgt
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    served, new = h.disk(initiators=None), h.disk(initiators=None)
    portal = _serve(h, b, served)
    ceph.freeze()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientBackendError):
            h.call(b.export, PathKey(new.id, 1), new)
        took = time.monotonic() - t0
        assert took < 3 + 1.5
        # the served disk keeps answering, and the failed one left nothing behind
        assert iscsi.inq(portal, served.iqn, ns, initiator=INI, timeout=2) is not None
        t1 = time.monotonic()
        with pytest.raises(TransientBackendError):
            h.call(b.export, PathKey(new.id, 1), new)
        assert time.monotonic() - t1 < 3 + 1.5
        assert h.call(b.exported) == {PathKey(served.id, 1)}
    finally:
        ceph.thaw()
    deadline = time.monotonic() + 30
    while True:
        try:
            h.call(b.export, PathKey(new.id, 1), new)
            break
        except TransientBackendError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert h.call(b.exported) == {PathKey(served.id, 1), PathKey(new.id, 1)}


def test_tgt_failed_export_leaves_nothing(tgt: Harness) -> None:
    h = tgt
    b = h.new()
    d = h.disk()
    gone = _with(d, image="no-such-image")
    with pytest.raises(PermanentBackendError, match="does not exist"):
        h.call(b.export, PathKey(d.id, 1), gone)
    assert h.call(b.exported) == frozenset()
    out = subprocess.run(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "target", "--op", "show"],
                         env={**os.environ, "TGT_IPC_SOCKET": os.path.join(h.state_dir, "tgt", "socket")},
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and d.iqn not in out.stdout
    portals = subprocess.run(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "portal", "--op", "show"],
                             env={**os.environ, "TGT_IPC_SOCKET": os.path.join(h.state_dir, "tgt", "socket")},
                             capture_output=True, text=True, timeout=10).stdout
    spec = d.path(1)
    assert spec is not None and spec.ip not in portals
    # an existing path of the disk survives a failed export of another path, whose portal is undone
    h.call(b.export, PathKey(d.id, 1), d)
    with pytest.raises(PermanentBackendError, match="unexport it first"):
        h.call(b.export, PathKey(d.id, 2), gone)
    assert h.call(b.exported) == {PathKey(d.id, 1)}
    spec2 = d.path(2)
    assert spec2 is not None
    portals = subprocess.run(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "portal", "--op", "show"],
                             env={**os.environ, "TGT_IPC_SOCKET": os.path.join(h.state_dir, "tgt", "socket")},
                             capture_output=True, text=True, timeout=10).stdout
    assert spec2.ip not in portals and spec.ip in portals


def test_tgt_chap_user_clash_between_disks(tgt: Harness) -> None:
    h = tgt
    b = h.new()
    d1 = h.disk(chap=Chap("shared", "password-one-1"))
    d2 = h.disk(chap=Chap("shared", "password-two-2"))
    d3 = h.disk(chap=Chap("shared", "password-one-1"))
    h.call(b.export, PathKey(d1.id, 1), d1)
    with pytest.raises(PermanentBackendError, match="shared"):
        h.call(b.export, PathKey(d2.id, 1), d2)
    h.call(b.export, PathKey(d3.id, 1), d3)
    h.call(b.unexport, PathKey(d1.id, 1))
    assert h.call(b.exported) == {PathKey(d3.id, 1)}
    assert h.lab is not None
    portal = _serve(h, b, d3)
    assert iscsi.inq(portal, d3.iqn, h.lab.ns("ini"), initiator=INI, chap=("shared", "password-one-1")) is not None


def test_tgt_bad_options_are_config_errors(tmp_path: Any) -> None:
    from agent.errors import ConfigError
    from plugins.tgt import TgtBackend
    with pytest.raises(ConfigError) as e:
        TgtBackend(PluginContext(node="n", state_dir=str(tmp_path), options={
            "io_threads": "four", "vendor_id": "LONGER-THAN-8", "rbd_cache": "no", "ceph_timeout": 0}))
    keys = {k for k, _ in e.value.problems}
    assert keys == {"target.tgt.io_threads", "target.tgt.vendor_id", "target.tgt.rbd_cache",
                    "target.tgt.ceph_timeout"}
    assert not os.path.exists(tmp_path / "tgt")     # the constructor starts nothing
