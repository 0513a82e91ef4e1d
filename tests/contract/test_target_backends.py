"""The ``TargetBackend`` contract, one behavioural suite over every target backend.

- ``fake``: runs anywhere.
- ``tgt``: a real tgtd started by the backend inside a gateway network namespace, LUNs on a micro Ceph
  reachable through the lab's root-namespace address (probed through the host's Ceph client, as the agent
  does), checked with a real userspace initiator (libiscsi) from the initiator namespace.
- ``lio``: needs kernel LIO (configfs); skipped with the reason where it cannot run.

The first group holds for every backend (idempotency, ``exported`` after a restart, read-only ``exported``,
``fence``: at once, from a second instance and from another process, bounded while the daemon is wedged,
export again afterwards; a changed definition in place: a revoked initiator loses its session and another
keeps its, a larger size is what the LUN reports, ``logged_in`` lists the initiators with a session: for
the fake through its ``login``/``logout``, for real backends with libiscsi sessions); the second for
backends with a data path (I/O, identity, ACL, CHAP, a fence drops the sessions); the last for tgt alone
(tgtd death: restarted empty and the agent woken, the zero-length READ crash, Ceph outage, rollback, the
child environment, a resize under I/O).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import pytest

from agent.backend import PluginContext, TargetBackend
from agent.config import CephConfig
from agent.core.model import Chap, Disk, PathKey, PathSpec
from agent.errors import PermanentBackendError, TransientBackendError
from lab import failover, iscsi
from lab.gwtools import RbdImages, stop_tgtd, tgt_missing
from lab.netns import GatewayLab, NetnsThread, ip

T = TypeVar("T")
_ids = itertools.count(1)
_vips = itertools.count(0)          # lab vip indexes (the session's one lab), below VIP_LIMIT
_fake_vips = itertools.count(0)
_lio_vips = itertools.count(0)      # vip indexes in the lio column's own lab (lio_lab)
VIP_LIMIT = 140                     # test_fencing_tgt's VIP_BASE: its addresses are above
INI = "iqn.2016-05.io.pathagent.test:ini-a"
OTHER_INI = "iqn.2016-05.io.pathagent.test:ini-b"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: what the guard process does: build the backend from the same config and state dir, and fence
GUARD = """
import json, sys, time
from agent.backend import PluginContext
from agent.config import CephConfig
from agent.plugins import plugin_class
a = json.loads(sys.argv[1])
b = plugin_class("target", a["name"])(PluginContext(node="", state_dir=a["state_dir"], options=a["options"],
                                                    ceph=CephConfig(**a["ceph"])))
t = time.monotonic()
b.fence()
print(time.monotonic() - t)
"""


@dataclass
class Harness:
    """One backend under test: ``new()`` makes an instance on the same state dir (an agent restart, or the
    guard), ``call`` runs in the backend's network namespace, ``disk()`` makes a disk it can serve,
    ``wedged()`` makes its daemon stop answering, ``daemons()`` lists the daemon processes it has."""

    name: str
    state_dir: str
    ctx: PluginContext
    make: Callable[[PluginContext], TargetBackend]
    real: bool = False
    lab: GatewayLab | None = None
    images: RbdImages | None = None
    ns_thread: NetnsThread | None = None
    node: str = "gwa"
    wakes: list[float] = field(default_factory=list)
    backends: list[TargetBackend] = field(default_factory=list)
    addresses: list[tuple[str, str]] = field(default_factory=list)   # (namespace, ip/prefix) added by tests
    guest: Any = None                   # lio: the lab.guest.Guest the backend runs in
    ceph_lab: Any = None                # lio: the micro Ceph (frozen to wedge the data path)

    def new(self, **options: Any) -> TargetBackend:
        ctx = dataclasses.replace(self.ctx, options={**self.ctx.options, **options})
        b = self.call(self.make, ctx)
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
        if self.lab is None:
            return f"198.18.250.{next(_fake_vips) % 250 + 1}"
        if self.guest is not None:
            n = next(_lio_vips)
            assert n < 100, "the lio column uses more lio_lab vips than it has (test_lio_backend uses the next ones)"
            return self.lab.vip(n)
        n = next(_vips)
        assert n < VIP_LIMIT, "this module uses more lab vips than it has (test_fencing_tgt uses the next ones)"
        return self.lab.vip(n)

    def up(self, b: TargetBackend, d: Disk, index: int = 1) -> str:
        """Export path ``index``; with a data path bring its IP up too (``_serve``). Returns the portal
        (``""`` for the fake)."""
        if not self.real:
            self.call(b.export, PathKey(d.id, index), d)
            return ""
        return _serve(self, b, d, index)

    @contextlib.contextmanager
    def session(self, b: TargetBackend, d: Disk, initiator: str, portal: str) -> Iterator[Callable[[], bool]]:
        """``initiator`` logged in to ``d`` for the block; yields ``alive()``: whether its session still
        works (fake: ``login``/``logout``; real: a libiscsi session without automatic reconnect, so that a
        dropped session stays dropped, and alive = a TEST UNIT READY answered)."""
        if not self.real:
            from plugins.fake import FakeBackend
            assert isinstance(b, FakeBackend)
            b.login(d.id, initiator)
            try:
                yield lambda: initiator in b.logged_in().get(d.id, frozenset())
            finally:
                b.logout(d.id, initiator)
            return
        assert self.lab is not None
        with iscsi.Session(portal, d.iqn, initiator=initiator, netns=self.lab.ns("ini"), reconnect=False,
                           timeout=2) as s:
            def alive() -> bool:
                try:
                    s.test_unit_ready()
                    return True
                except iscsi.IscsiError:
                    return False
            yield alive

    def can_log_in(self, b: TargetBackend, d: Disk, initiator: str, portal: str) -> bool:
        """Whether a new login of ``initiator`` (not logged in now) to ``d`` is accepted."""
        if not self.real:
            from plugins.fake import FakeBackend, LoginRefused
            assert isinstance(b, FakeBackend)
            try:
                b.login(d.id, initiator)
            except LoginRefused:
                return False
            b.logout(d.id, initiator)
            return True
        assert self.lab is not None
        return iscsi.inq(portal, d.iqn, self.lab.ns("ini"), initiator=initiator, timeout=3) is not None

    def size(self, b: TargetBackend, d: Disk, portal: str) -> int:
        """The size the disk's LUN reports (real: READ CAPACITY(16) through a fresh session)."""
        if not self.real:
            from plugins.fake import FakeBackend
            assert isinstance(b, FakeBackend)
            n = b.reported_size(d.id)
            assert n is not None
            return n
        assert self.lab is not None
        with iscsi.Session(portal, d.iqn, initiator=INI, netns=self.lab.ns("ini"), timeout=5) as s:
            blocks, bs = s.capacity()
        return blocks * bs

    def grow(self, d: Disk) -> None:
        """Resize the disk's image to ``d.size`` (what the CLI does before it edits the definition)."""
        if self.images is None:
            return
        import rbd
        with rbd.Image(self.images.ioctx, d.image) as img:
            img.resize(d.size)

    def woken(self) -> None:
        self.wakes.append(time.monotonic())

    def tgtd(self) -> int | None:
        """tgt: the pid in the backend's pid file when that process is a live tgtd."""
        try:
            with open(os.path.join(self.state_dir, "tgt", "tgtd.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def daemons(self) -> list[int]:
        """Live daemon processes of this state dir (tgt: every tgtd whose TGT_IPC_SOCKET is ours)."""
        if self.name != "tgt":
            return []
        want = f"TGT_IPC_SOCKET={os.path.join(self.state_dir, 'tgt', 'socket')}".encode()
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{d}/comm") as f2:
                    comm = f2.read().strip()
            except OSError:
                continue
            if comm == "tgtd" and want in env and _alive(int(d)):
                out.append(int(d))
        return out

    @contextlib.contextmanager
    def wedged(self) -> Iterator[None]:
        """The daemon stops answering (tgt: SIGSTOP; fake: its stall file) until the block ends."""
        if self.name == "lio":
            self.ceph_lab.freeze()             # the kernel target has no daemon: its data path (Ceph) stops
            try:
                yield
            finally:
                self.ceph_lab.thaw()
        elif self.name == "tgt":
            pid = self.tgtd()
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                yield
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        else:
            stall = self.ctx.options["stall_file"]
            open(stall, "w").close()
            try:
                yield
            finally:
                os.unlink(stall)

    def fence_in_another_process(self) -> float:
        """Run the guard's fence in a fresh Python process; returns how long ``fence()`` took there."""
        arg = json.dumps({"name": self.name, "state_dir": self.state_dir, "options": dict(self.ctx.options),
                          "ceph": dataclasses.asdict(self.ctx.ceph)})
        if self.guest is not None:
            g = self.guest.exec([os.path.join(REPO, ".venv", "bin", "python"), "-c", GUARD, arg], timeout=60,
                                cwd=REPO, env={"PYTHONPATH": REPO})
            assert g.rc == 0, g.stderr
            return float(g.stdout.split()[-1])
        r = subprocess.run([sys.executable, "-c", GUARD, arg], capture_output=True, text=True, timeout=30,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split()[-1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in "ZX"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ harnesses

def _fake(tmp: str) -> Iterator[Harness]:
    from plugins.fake import FakeBackend
    h = Harness("fake", tmp, PluginContext(node="gwa", state_dir=tmp,
                                           options={"stall_file": os.path.join(tmp, "stall")}), FakeBackend)
    h.ctx = dataclasses.replace(h.ctx, wake=h.woken)
    yield h


def _tgt(request: pytest.FixtureRequest, tmp: str) -> Iterator[Harness]:
    reason = tgt_missing()
    if reason:
        pytest.skip(reason)
    lab: GatewayLab = request.getfixturevalue("gw_lab")
    ceph = request.getfixturevalue("ceph")
    images: RbdImages = request.getfixturevalue("images")
    probe = request.getfixturevalue("host_ceph_probe")
    from plugins.tgt import TgtBackend
    th = NetnsThread(lab.ns("gwa"))
    h = Harness("tgt", tmp, PluginContext(node="gwa", state_dir=tmp, options={"ceph_timeout": 3, "product_rev": "gwa"},
                                          ceph=CephConfig(conf=ceph.conf_path, client_id="admin"), port=3260,
                                          ceph_probe=probe),
                TgtBackend, real=True, lab=lab, images=images, ns_thread=th)
    h.ctx = dataclasses.replace(h.ctx, wake=h.woken)
    try:
        yield h
    finally:
        for b in h.backends:
            b.close()
        th.close()
        stop_tgtd(tmp)
        leaked = h.daemons()                   # a tgtd the pid file does not name: the backend lost track of it
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        for ns, addr in h.addresses:
            ip("addr", "del", addr, "dev", "eth0", ns=ns, check=False)
        assert not leaked, f"tgtd processes not in the pid file: {leaked}"


def _lio(request: pytest.FixtureRequest, tmp: str) -> Iterator[Harness]:
    """The lio backend inside a guest with a stock Debian kernel (tier 4, ``lio_guest``) on the same lab
    bridge as the initiator, its LUNs krbd-mapped from the session's micro Ceph; driven through
    ``lab.liorpc.RemoteBackend``."""
    from agent.plugins import available
    if "lio" not in available("target"):
        pytest.skip("lio plugin is not installed (no pathagent.targets entry point 'lio')")
    guest = request.getfixturevalue("lio_guest")
    lab: GatewayLab = request.getfixturevalue("lio_lab")
    ceph = request.getfixturevalue("ceph")
    images: RbdImages = request.getfixturevalue("images")
    from lab.liorpc import RemoteBackend
    from plugins.lio.krbd import read_conf_value
    with open(ceph.conf_path) as f:
        monitors = read_conf_value(f.read(), "mon host") or ""
    state = f"/run/pa-contract/{uuid.uuid4().hex[:8]}"
    ctx = PluginContext(node=guest.name, state_dir=state, options={"monitors": monitors, "dbroot": "/etc/target"},
                        ceph=CephConfig(conf="/nonexistent/ceph.conf", client_id="admin", data_client_id="admin"),
                        port=3260)
    h = Harness("lio", state, ctx, lambda c: RemoteBackend(guest, "lio", c), real=True, lab=lab, images=images,
                node=guest.name)
    h.guest = guest
    h.ceph_lab = ceph
    old_lun = iscsi.DEFAULT_LUN
    iscsi.DEFAULT_LUN = 0
    try:
        yield h
    finally:
        iscsi.DEFAULT_LUN = old_lun
        for b in h.backends:
            with contextlib.suppress(Exception):
                b.fence()
        cleanup = h.new()
        for p in sorted(cleanup.exported()):
            cleanup.unexport(p)
        for b in h.backends:
            with contextlib.suppress(Exception):
                b.close()
        for _, addr in h.addresses:
            guest.exec(["ip", "addr", "del", addr, "dev", "eth0"], timeout=10)


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
    changed = _with(d, initiators=(INI, OTHER_INI))
    harness.call(b.export, p, changed)
    assert harness.call(b.exported) == {p}


@pytest.mark.parametrize("before", [(INI, OTHER_INI), None], ids=["listed", "open"])
def test_a_revoked_initiator_loses_its_session_and_another_keeps_its(harness: Harness,
                                                                      before: tuple[str, ...] | None) -> None:
    b = harness.new()
    d = harness.disk(initiators=before)
    portal = harness.up(b, d)
    p = PathKey(d.id, 1)
    with harness.session(b, d, INI, portal) as ini_alive, harness.session(b, d, OTHER_INI, portal) as other_alive:
        assert harness.call(b.logged_in) == {d.id: frozenset({INI, OTHER_INI})}
        harness.call(b.export, p, _with(d, initiators=(INI,)))
        _wait(lambda: harness.call(b.logged_in).get(d.id) == frozenset({INI}), 5, "the revoked session gone")
        assert not other_alive() and ini_alive()
        assert harness.call(b.logged_in) == {d.id: frozenset({INI})}
        assert not harness.can_log_in(b, d, OTHER_INI, portal)
        assert harness.call(b.exported) == {p}
        harness.call(b.export, p, _with(d, initiators=()))          # nobody: the last session goes too
        _wait(lambda: d.id not in harness.call(b.logged_in), 5, "every session gone")
        assert not ini_alive()
        assert harness.call(b.exported) == {p}


def test_a_chap_change_keeps_the_sessions(harness: Harness) -> None:
    """A CHAP change applies to the next login: a logged-in initiator keeps its session."""
    b = harness.new()
    d = harness.disk(initiators=(INI,))
    portal = harness.up(b, d)
    with harness.session(b, d, INI, portal) as alive:
        harness.call(b.export, PathKey(d.id, 1), _with(d, chap=Chap("carol", "carol-secret-1")))
        time.sleep(0.3)
        assert alive() and harness.call(b.logged_in) == {d.id: frozenset({INI})}
    if harness.real:
        assert not harness.can_log_in(b, d, INI, portal)          # without the new secret: refused


def test_a_larger_size_is_what_the_lun_reports(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk(size=64 << 20)
    portal = harness.up(b, d)
    p1, p2 = PathKey(d.id, 1), PathKey(d.id, 2)
    harness.call(b.export, p2, d)
    assert harness.size(b, d, portal) == 64 << 20
    bigger = _with(d, size=96 << 20)
    harness.grow(bigger)
    harness.call(b.export, p1, bigger)
    assert harness.call(b.exported) == {p1, p2}
    assert harness.size(b, d, portal) == 96 << 20
    harness.call(b.export, p2, bigger)                  # the planner re-exports every path it holds
    assert harness.call(b.exported) == {p1, p2}
    assert harness.size(b, d, portal) == 96 << 20
    again = harness.new()                               # an agent restart keeps it
    assert harness.call(again.exported) == {p1, p2}


def test_logged_in_lists_the_initiators_with_a_session(harness: Harness) -> None:
    b = harness.new()
    assert harness.call(b.logged_in) == {}
    d, quiet = harness.disk(initiators=None), harness.disk()
    portal = harness.up(b, d)
    harness.up(b, quiet)
    assert harness.call(b.logged_in) == {}              # exported, nobody logged in: left out
    with harness.session(b, d, INI, portal):
        assert harness.call(b.logged_in) == {d.id: frozenset({INI})}
        assert harness.call(harness.new().logged_in) == {d.id: frozenset({INI})}   # a second instance too
        # read-only and safe beside export/unexport running in another thread
        errors: list[BaseException] = []
        seen: list[Any] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    seen.append(b.logged_in())
                except BaseException as e:  # handed to the test thread
                    errors.append(e)
                    return
        th = threading.Thread(target=reader)
        th.start()
        try:
            more = harness.disk()
            for _ in range(2):
                harness.call(b.export, PathKey(more.id, 1), more)
                harness.call(b.unexport, PathKey(more.id, 1))
        finally:
            stop.set()
            th.join(10)
        assert not errors and seen and all(x == {d.id: frozenset({INI})} for x in seen), (errors, seen[:3])
    _wait(lambda: harness.call(b.logged_in) == {}, 5, "the logout seen")
    with harness.session(b, d, OTHER_INI, portal):
        b.fence()
        assert harness.call(b.logged_in) == {}          # a fence drops every session


def test_exported_never_starts_a_daemon(harness: Harness) -> None:
    b = harness.new()
    assert harness.call(b.exported) == frozenset()
    assert harness.call(harness.new().exported) == frozenset()
    assert harness.call(b.logged_in) == {}
    time.sleep(0.2)
    assert harness.daemons() == []
    assert not os.path.exists(os.path.join(harness.state_dir, "tgt", "tgtd.pid"))


def test_fence_stops_serving_every_path_and_forgets_them(harness: Harness) -> None:
    b = harness.new()
    d1, d2 = harness.disk(), harness.disk()
    for d in (d1, d2):
        for i in (1, 2):
            harness.call(b.export, PathKey(d.id, i), d)
    assert len(harness.call(b.exported)) == 4
    daemons = harness.daemons()
    b.fence()                                  # from the test's thread: fence needs no namespace nor lock
    assert harness.call(b.exported) == frozenset()
    assert harness.call(harness.new().exported) == frozenset()
    assert not any(_alive(pid) for pid in daemons)
    time.sleep(0.5)                            # nothing comes back by itself
    assert harness.call(b.exported) == frozenset()
    b.fence()                                  # idempotent
    assert harness.call(b.exported) == frozenset()


def test_fence_from_a_second_instance_on_the_same_state_dir(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk()
    harness.call(b.export, PathKey(d.id, 1), d)
    guard = harness.new()                      # what the guard process builds
    guard.fence()
    assert harness.call(b.exported) == frozenset()
    assert harness.call(guard.exported) == frozenset()


def test_fence_from_another_process(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk()
    harness.call(b.export, PathKey(d.id, 1), d)
    harness.call(b.export, PathKey(d.id, 2), d)
    daemons = harness.daemons()
    took = harness.fence_in_another_process()
    print(f"\n{harness.name}: fence() in another process took {took * 1000:.1f} ms")
    assert harness.call(b.exported) == frozenset()
    assert not any(_alive(pid) for pid in daemons)
    assert took < 0.5


def test_fence_is_bounded_while_the_daemon_is_wedged_under_a_call(harness: Harness) -> None:
    b = harness.new()
    d, late = harness.disk(), harness.disk()
    harness.call(b.export, PathKey(d.id, 1), d)
    daemons = harness.daemons()
    errors: list[BaseException] = []

    def stuck_export() -> None:
        try:
            harness.call(b.export, PathKey(late.id, 1), late)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    with harness.wedged():
        th = threading.Thread(target=stuck_export)
        th.start()
        time.sleep(0.3)                        # the export is inside the backend now, holding what it holds
        t0 = time.monotonic()
        b.fence()
        took = time.monotonic() - t0
        print(f"\n{harness.name}: fence() with the daemon wedged under an export took {took * 1000:.1f} ms")
        assert took < 0.5
        assert not any(_alive(pid) for pid in daemons)
    th.join(15)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransientBackendError), errors
    assert harness.call(b.exported) == frozenset()


def test_export_works_again_after_a_fence(harness: Harness) -> None:
    b = harness.new()
    d = harness.disk()
    p = PathKey(d.id, 1)
    harness.call(b.export, p, d)
    b.fence()
    assert harness.call(b.exported) == frozenset()
    harness.call(b.export, p, d)
    assert harness.call(b.exported) == {p}
    harness.call(b.unexport, p)
    assert harness.call(b.exported) == frozenset()


def test_fake_login_api(tmp_path: Any) -> None:
    """The fake's sessions, as tier-1 tests use them: refused like a real target refuses a login, shared
    through the state file with another instance (another process), dropped by a narrower ACL, the last
    unexport and a fence."""
    from plugins.fake import FakeBackend, LoginRefused
    ctx = PluginContext(node="gwa", state_dir=str(tmp_path))
    b, other = FakeBackend(ctx), FakeBackend(ctx)
    d = Disk(id="d1", name="d1", iqn="iqn.2016-05.io.pathagent:d1", serial="s1", size=1 << 30, initiators=(INI,),
             paths=(PathSpec(1, "198.18.250.1", 24), PathSpec(2, "198.18.250.2", 24)))
    with pytest.raises(LoginRefused, match="not exported"):
        b.login("d1", INI)
    assert b.reported_size("d1") is None and b.logged_in() == {}
    b.export(PathKey("d1", 1), d)
    b.export(PathKey("d1", 2), d)
    with pytest.raises(LoginRefused, match="does not admit"):
        b.login("d1", OTHER_INI)
    b.login("d1", INI)
    b.login("d1", INI)                                       # one session per initiator and disk
    assert other.logged_in() == {"d1": frozenset({INI})}     # the state file is shared
    other.logout("d1", INI)
    other.logout("d1", INI)
    assert b.logged_in() == {}
    b.export(PathKey("d1", 1), _with(d, initiators=None))    # a definition is per disk: both paths get it
    b.login("d1", INI)
    b.login("d1", OTHER_INI)
    b.export(PathKey("d1", 2), _with(d, initiators=(OTHER_INI,), size=2 << 30))
    assert b.logged_in() == {"d1": frozenset({OTHER_INI})} and b.reported_size("d1") == 2 << 30
    b.unexport(PathKey("d1", 1))
    assert b.logged_in() == {"d1": frozenset({OTHER_INI})}   # a path is left: the target stays
    b.unexport(PathKey("d1", 2))
    assert b.logged_in() == {} and b.reported_size("d1") is None
    b.export(PathKey("d1", 1), d)
    b.login("d1", INI)
    b.fence()
    assert b.logged_in() == {} and b.exported() == frozenset()


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
    if h.guest is not None:
        r = h.guest.exec(["ip", "addr", "replace", addr, "dev", "eth0"], timeout=10)
        assert r.rc == 0, r.stderr
    else:
        ip("addr", "replace", addr, "dev", "eth0", ns=ns)
    h.addresses.append((ns, addr))


def _with(d: Disk, **kw: Any) -> Disk:
    return Disk(**{**{f: getattr(d, f) for f in d.__dataclass_fields__}, **kw})


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


#: whether a backend's LUNs are thin provisioned (UNMAP accepted) by default. tgt: no, on purpose: tgt 1.0.85's
#: bs_rbd takes librbd's rbd_discard() result (the byte count) for an error, so every UNMAP would fail with
#: HARDWARE ERROR while freeing the space (docs/backend-tgt.md, "UNMAP")
THIN = {"tgt": False, "lio": True}


def test_unmap_frees_the_rbd_space_and_reads_back_zeros(real: Harness) -> None:
    h = real
    assert h.lab is not None and h.images is not None
    b = h.new()
    d = h.disk()
    portal = _serve(h, b, d)
    obj = 4 << 20                                   # one RBD object (the default object size), 4 MiB aligned
    lba = obj // 512
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=h.lab.ns("ini")) as s:
        p = s.provisioning()
        assert (p.lbpme, p.lbpu) == (THIN[h.name], THIN[h.name]), p
        if not THIN[h.name]:
            return                                  # fully provisioned: an initiator sends no UNMAP
        assert p.lbpws and p.max_unmap > 0, p
        chunk = b"\xa5" * (1 << 20)
        for k in range(4):
            s.write(lba + k * len(chunk) // 512, chunk)
        s.write(3 * lba, chunk)                     # a neighbour that must stay
        s.sync()
        before = h.images.allocated(d.image)
        assert before >= obj + len(chunk)
        s.unmap(lba, obj // 512)
        s.sync()
        assert s.read(lba, 8) == bytes(4096) and s.read(lba + obj // 512 - 8, 8) == bytes(4096)
        assert s.read(3 * lba, 8) == chunk[:4096]
    after = h.images.allocated(d.image)
    assert after <= before - obj, f"the object is freed in RBD: {before} -> {after} bytes allocated"
    assert h.images.read(d.image, obj, 4096) == bytes(4096)
    assert h.images.read(d.image, 3 * obj, 4096) == chunk[:4096]
    off = h.new(unmap=False)                        # the option, applied at the next export
    h.call(off.export, PathKey(d.id, 1), d)
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=h.lab.ns("ini")) as s:
        p = s.provisioning()
        assert not (p.lbpme or p.lbpu or p.lbpws), f"unmap = false: fully provisioned: {p}"


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


def test_fence_drops_the_sessions_at_once(real: Harness) -> None:
    h = real
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d1, d2 = h.disk(), h.disk(initiators=None)
    p1, p2 = _serve(h, b, d1), _serve(h, b, d2)
    with iscsi.Session(p1, d1.iqn, initiator=INI, netns=ns, reconnect=False, timeout=2) as s:
        assert s.capacity()[0] > 0
        b.fence()
        with pytest.raises(iscsi.IscsiError):
            s.read(0, 8)
    # the IPs are still up here (the network plugin's business): nothing answers on them
    assert iscsi.inq(p1, d1.iqn, ns, initiator=INI, timeout=2) is None
    assert iscsi.inq(p2, d2.iqn, ns, initiator=INI, timeout=2) is None
    time.sleep(0.5)
    assert iscsi.inq(p2, d2.iqn, ns, initiator=INI, timeout=2) is None      # and nothing comes back
    h.call(b.export, PathKey(d2.id, 1), d2)                                  # until exported again
    assert iscsi.inq(p2, d2.iqn, ns, initiator=INI) is not None


# ------------------------------------------------------------------------------------------------ tgt only

def _tgtd_pid(h: Harness) -> int:
    with open(os.path.join(h.state_dir, "tgt", "tgtd.pid")) as f:
        return int(f.read().split()[0])


def _record(h: Harness) -> dict[str, Any]:
    with open(os.path.join(h.state_dir, "tgt", "exports.json")) as f:
        data: dict[str, Any] = json.load(f)
    return data


def _show(h: Harness, mode: str) -> str:
    r = subprocess.run(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", mode, "--op", "show"],
                       env={**os.environ, "TGT_IPC_SOCKET": os.path.join(h.state_dir, "tgt", "socket")},
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


DIED = (r"tgt: tgtd \(pid %d\) died: killed by signal 9; restarted it \(pid (\d+)\) empty; "
        r"the agent re-exports what it holds")


def test_tgt_same_identity_on_two_gateways(tgt: Harness, tmp_path: Any) -> None:
    """The same disk served by gwa and gwb: same serial and device id, so multipath groups the paths;
    data written through one gateway reads back through the other."""
    h = tgt
    assert h.lab is not None
    from plugins.tgt import TgtBackend
    a = h.new()
    d = h.disk()
    pa = _serve(h, a, d, 1)
    ctx_b = dataclasses.replace(h.ctx, node="gwb", state_dir=str(tmp_path / "gwb"), options={"product_rev": "gwb"})
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


def test_tgt_resize_under_io_costs_one_reconnect_and_loses_nothing(tgt: Harness) -> None:
    """A new size re-creates the disk's target (bs_rbd reads the size only at open): a writer on it loses
    its session once, finds the portal refused while the target is made again, logs in again and goes on;
    every acknowledged write reads back from RBD; another disk's session on the same tgtd is untouched."""
    h = tgt
    assert h.lab is not None and h.images is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d, other = h.disk(initiators=None, size=64 << 20), h.disk(initiators=(INI,))
    portal, other_portal = _serve(h, b, d), _serve(h, b, other)
    w = failover.Writer(portal, d.iqn, ns, slots=64).start()
    try:
        with iscsi.Session(other_portal, other.iqn, initiator=INI, netns=ns, reconnect=False, timeout=2) as s:
            _wait(lambda: w.acked_after(0) >= 20, 30, "the writer going")
            before = _sids(h, d.iqn)
            bigger = _with(d, size=96 << 20)
            h.grow(bigger)
            t0 = time.monotonic()
            h.call(b.export, PathKey(d.id, 1), bigger)
            took = time.monotonic() - t0
            _wait(lambda: w.acked_after(t0 + took) >= 20, 30, "the writer going again")
            after = _sids(h, d.iqn)
            s.test_unit_ready()                      # the other disk kept its session
            assert h.call(b.logged_in) == {d.id: frozenset({failover.WRITER_INITIATOR}), other.id: frozenset({INI})}
        w.stop()
    finally:
        if w.running():
            w.stop()
    assert w.error is None, w.error
    gap = w.gap(t0)
    _, failures, logins = w.snapshot()
    print(f"\ntgt resize under I/O: export took {took * 1000:.0f} ms, the writer's gap {gap.seconds * 1000:.0f} ms "
          f"(sessions {before} -> {after}; {len(failures)} failed write(s), {len(logins) - 1} login(s) by the writer)")
    assert gap.recovered and gap.seconds < 5
    assert len(before) == len(after) == 1 and not before & after     # its one session was replaced
    assert h.size(b, d, portal) == 96 << 20
    images = h.images
    v = failover.judge(w, "rbd", lambda lba, n: images.read(d.image, lba * 512, n * 512))
    assert v.checked > 0 and v.bad == 0, v.summary()
    assert _record(h)["disks"][d.id]["size"] == 96 << 20


def _sids(h: Harness, iqn: str) -> set[int]:
    """tgt's session ids on the target ``iqn`` now."""
    from plugins.tgt.tgtadm import parse_targets
    t = parse_targets(_show(h, "target")).get(iqn)
    return {n.sid for n in t.it_nexus} if t is not None else set()


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


def test_tgt_killed_tgtd_is_restarted_empty_and_the_agent_woken(tgt: Harness,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """No replay (a fenced or session-less agent must not be made to serve again): the watcher restarts
    tgtd empty, forgets the exports and wakes the agent, which re-exports what it holds."""
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
    woken = len(h.wakes)
    os.kill(pid, signal.SIGKILL)
    took = _wait(lambda: len(h.wakes) > woken and h.tgtd() not in (None, pid), 5, "tgtd restarted, agent woken")
    print(f"\ntgtd kill -9 -> restarted empty and the agent woken after {took:.3f} s")
    assert h.call(b.exported) == frozenset()
    assert _record(h)["disks"] == {} and _show(h, "target") == "" and _show(h, "portal") == ""
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    m = [re.fullmatch(DIED % pid, x) for x in msgs]
    assert any(m), msgs
    assert int(next(x for x in m if x).group(1)) == _tgtd_pid(h)
    assert iscsi.inq(p2, d2.iqn, ns, initiator=INI, timeout=1) is None
    # what the agent does when woken: re-export what it holds
    for p in sorted(before):
        h.call(b.export, p, d1 if p.disk == d1.id else d2)
    assert h.call(b.exported) == before
    assert iscsi.inq(p1, d1.iqn, ns, initiator=INI, chap=("bob", "bob-secret-123")) is not None
    assert iscsi.inq(p1, d1.iqn, ns, initiator=INI, chap=("bob", "wrong-secret-1")) is None
    assert iscsi.inq(p1, d1.iqn, ns, initiator=OTHER_INI, chap=("bob", "bob-secret-123")) is None
    with iscsi.Session(p2, d2.iqn, initiator=INI, netns=ns) as s:
        assert s.read(8, len(data) // 512) == data


def test_tgt_two_instances_restart_one_tgtd(tgt: Harness) -> None:
    """Two instances on one state dir (an agent and the next one during a planned restart) both watch
    tgtd; after its death exactly one new tgtd runs and the pid file names it."""
    h = tgt
    a, b = h.new(), h.new()
    d = h.disk()
    h.call(a.export, PathKey(d.id, 1), d)
    assert h.call(b.exported) == {PathKey(d.id, 1)}           # b watches too now
    for _ in range(3):
        pid = _tgtd_pid(h)
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: h.tgtd() not in (None, pid), 5, "tgtd restarted")
        time.sleep(0.3)
        assert h.daemons() == [h.tgtd()]


def test_tgt_an_export_during_a_fence_that_missed_tgtd_fails_and_serves_nothing(tgt: Harness) -> None:
    """A fence that ran while an export was under way but found no tgtd to kill (the export was starting
    it): the export notices the fence mark, kills the tgtd it configured and fails."""
    h = tgt
    probe = h.ctx.ceph_probe
    assert probe is not None
    from plugins.tgt import TgtBackend

    def probe_then_fence_mark(pool: str, image: str) -> None:
        probe(pool, image)
        TgtBackend(h.ctx).tgtd.write_mark()       # the fence's mark, as if its kill had come too early
    b = h.call(TgtBackend, dataclasses.replace(h.ctx, ceph_probe=probe_then_fence_mark))
    h.backends.append(b)
    d = h.disk()
    with pytest.raises(TransientBackendError, match="fenced while exporting"):
        h.call(b.export, PathKey(d.id, 1), d)
    assert h.call(b.exported) == frozenset()
    _wait(lambda: h.tgtd() is not None, 5, "tgtd restarted empty by the watcher")
    assert _show(h, "target") == ""
    b2 = h.new()                                  # the next export is after the fence: it serves
    h.call(b2.export, PathKey(d.id, 1), d)
    assert h.call(b2.exported) == {PathKey(d.id, 1)}


def test_tgt_without_the_watcher_the_next_export_restarts_tgtd(tgt: Harness,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    h = tgt
    b = h.new(watch=False)
    d = h.disk()
    h.call(b.export, PathKey(d.id, 1), d)
    pid = _tgtd_pid(h)
    caplog.set_level(logging.WARNING, logger="plugins.tgt")
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not _alive(pid), 5, "tgtd dead")
    assert h.call(b.exported) == frozenset()
    time.sleep(0.3)
    assert h.daemons() == [] and h.wakes == []             # exported() restarted nothing
    h.call(b.export, PathKey(d.id, 2), d)
    assert h.call(b.exported) == {PathKey(d.id, 2)}        # path 1 went with the old tgtd
    assert len(h.wakes) == 1
    assert any(re.fullmatch(DIED % pid, r.getMessage()) for r in caplog.records)


def test_tgt_recovers_from_the_zero_length_read_crash(tgt: Harness) -> None:
    """A zero-length READ from any logged-in initiator aborts tgtd (librbd assert); the backend restarts it
    empty and wakes the agent, whose re-export brings the target back."""
    h = tgt
    assert h.lab is not None
    ns = h.lab.ns("ini")
    b = h.new()
    d = h.disk(initiators=None)
    portal = _serve(h, b, d)
    pid = _tgtd_pid(h)
    with iscsi.Session(portal, d.iqn, initiator=INI, netns=ns, reconnect=False, timeout=3) as s:
        s.read_zero_length()
    _wait(lambda: not _alive(pid), 5, "tgtd crashed by the zero-length READ (tgt fixed?)")
    _wait(lambda: bool(h.wakes), 5, "agent woken")
    assert h.call(b.exported) == frozenset()
    h.call(b.export, PathKey(d.id, 1), d)
    assert h.call(b.exported) == {PathKey(d.id, 1)}
    assert iscsi.inq(portal, d.iqn, ns, initiator=INI) is not None


def test_tgt_exported_does_not_hang_on_a_stopped_tgtd(tgt: Harness) -> None:
    h = tgt
    b = h.new(show_timeout=0.5)
    d = h.disk()
    h.call(b.export, PathKey(d.id, 1), d)
    with h.wedged():
        t0 = time.monotonic()
        with pytest.raises(TransientBackendError, match="no answer from tgtd"):
            h.call(b.exported)
        assert time.monotonic() - t0 < 0.5 + 0.5
    assert h.call(b.exported) == {PathKey(d.id, 1)}


def test_tgt_fence_with_many_targets(tgt: Harness) -> None:
    h = tgt
    b = h.new()
    n = 20
    disks = [h.disk(paths=1, size=8 << 20) for _ in range(n)]
    for d in disks:
        h.call(b.export, PathKey(d.id, 1), d)
    assert len(h.call(b.exported)) == n
    pid = _tgtd_pid(h)
    t0 = time.monotonic()
    b.fence()
    took = time.monotonic() - t0
    print(f"\nfence() of tgtd with {n} targets (RBD LUNs) took {took * 1000:.1f} ms")
    assert not _alive(pid) and took < 0.5
    assert h.call(b.exported) == frozenset()


def test_tgt_children_get_a_scrubbed_environment(tgt: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = tgt
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "consul-token-secret")
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    b = h.new()
    d = h.disk()
    h.call(b.export, PathKey(d.id, 1), d)
    with open(f"/proc/{_tgtd_pid(h)}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    assert b"NOTIFY_SOCKET" not in env and b"CONSUL_HTTP_TOKEN" not in env and b"WATCHDOG_USEC" not in env
    assert env[b"TGT_IPC_SOCKET"] == os.path.join(h.state_dir, "tgt", "socket").encode()
    ceph_args = env[b"CEPH_ARGS"].decode()
    for opt in ("--client_mount_timeout 3", "--rados_mon_op_timeout 3", "--rados_osd_op_timeout 3",
                "--rbd_cache false"):
        assert opt in ceph_args


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
    assert d.iqn not in _show(h, "target")
    spec = d.path(1)
    assert spec is not None and spec.ip not in _show(h, "portal")
    # an existing path of the disk survives a failed export of another path, whose portal is undone
    h.call(b.export, PathKey(d.id, 1), d)
    with pytest.raises(PermanentBackendError, match="unexport it first"):
        h.call(b.export, PathKey(d.id, 2), gone)
    assert h.call(b.exported) == {PathKey(d.id, 1)}
    spec2 = d.path(2)
    assert spec2 is not None
    portals = _show(h, "portal")
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
            "io_threads": "four", "vendor_id": "LONGER-THAN-8", "rbd_cache": "no", "ceph_timeout": 0,
            "show_timeout": 0}))
    keys = {k for k, _ in e.value.problems}
    assert keys == {"target.tgt.io_threads", "target.tgt.vendor_id", "target.tgt.rbd_cache",
                    "target.tgt.ceph_timeout", "target.tgt.show_timeout"}
    assert not os.path.exists(tmp_path / "tgt")     # the constructor starts nothing
