"""``ceph-blocklist`` fencing against a real micro Ceph cluster, with gateways as separate processes.

Each "gateway" is a Python process with its own librados client (``client.pathagent-gwa``, ``-gwb``), the image
opened read-write with ``rbd_cache = false`` (what tgtd's bs_rbd does per LUN). Images have
``layering,exclusive-lock``. The leader's fencer is ``CephBlocklistFencing`` loaded through the entry point,
as ``client.admin`` in the test process; the failed node's identity is what ``identity()`` publishes when run
as that node. Everything runs on 127.0.0.1, so the nodes share an IP: their live clients are told apart by
their monitor sessions only.

Without a fence, the next owner's first write waits ``osd_client_watch_timeout`` (30 s) for a frozen or killed
owner; the assertions below (< 2 s) fail then.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator

import pytest
import rados
import rbd

from agent import plugins
from agent.adapters.ceph import CephClient
from agent.adapters.ceph_fencing import CephBlocklistFencing
from agent.backend import FailedNode, Fencing, PluginContext
from agent.config import CephConfig
from agent.errors import PermanentBackendError, TransientBackendError
from lab.ceph import MicroCeph

pytestmark = pytest.mark.ceph

BLOCK = 4096
FAR = 1 << 20           # an offset only the fenced gateway ever tries to write
EXPIRE = 600
ESHUTDOWN = 108

#: one gateway's librbd client: JSON commands on stdin, one JSON answer per line on stdout
GATEWAY = r"""
import json, sys, time
import rados, rbd
conf, name, pool, image = sys.argv[1:5]
r = rados.Rados(conffile=conf, rados_id=name)
r.conf_set("rbd_cache", "false")
r.connect(timeout=5)
img = rbd.Image(r.open_ioctx(pool), image)
print(json.dumps({"ready": True, "addr": r.get_addrs()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    t = time.monotonic()
    try:
        if cmd["op"] == "write":
            img.write(bytes.fromhex(cmd["data"]), cmd["offset"])
            out = {"ok": True}
        elif cmd["op"] == "owner":
            out = {"ok": True, "owner": img.is_exclusive_lock_owner()}
        else:
            out = {"ok": False, "error": "unknown op"}
    except rbd.Error as e:
        out = {"ok": False, "error": type(e).__name__, "errno": getattr(e, "errno", None)}
    out["secs"] = time.monotonic() - t
    print(json.dumps(out), flush=True)
"""


class Gateway:
    """One gateway's data-path client in its own process (``client.pathagent-<node>``)."""

    def __init__(self, ceph: MicroCeph, node: str, image: str) -> None:
        self.node = node
        self.entity = f"client.pathagent-{node}"
        self.proc = subprocess.Popen([sys.executable, "-c", GATEWAY, ceph.conf_path, f"pathagent-{node}",
                                      ceph.pool, image], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._answer(20)
        assert hello.get("ready"), hello
        self.addr = str(hello["addr"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self._lines.get(timeout=timeout)))
        except queue.Empty:
            raise AssertionError(f"gateway {self.node} did not answer within {timeout:g}s") from None

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def write(self, offset: int, fill: bytes, timeout: float = 60) -> dict[str, Any]:
        self.send({"op": "write", "offset": offset, "data": (fill * BLOCK)[:BLOCK].hex()})
        return self._answer(timeout)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.signal(signal.SIGCONT)
        self.proc.wait(10)


def fencer(ceph: MicroCeph, node: str, timeout: float = 5.0, **options: Any) -> Fencing:
    """The ``ceph-blocklist`` plugin as ``node``'s agent builds it (through the entry point)."""
    ctx = PluginContext(node=node, state_dir="/nonexistent", options={"expire": EXPIRE, **options},
                        ceph=CephConfig(conf=ceph.conf_path, client_id="admin", timeout=timeout))
    f = plugins.load_fencing("ceph-blocklist", ctx)
    assert isinstance(f, CephBlocklistFencing)
    return f


class Cluster:
    """The test's own view: an admin client to create images, read data back and inspect the blocklist."""

    def __init__(self, ceph: MicroCeph) -> None:
        self.ceph = ceph
        self.client = CephClient(ceph.conf_path, "admin", 5.0)
        self.n = 0
        self.gateways: list[Gateway] = []

    def image(self) -> str:
        self.n += 1
        name = f"fence-{self.n}-{os.getpid()}"
        self.client.create_image(self.ceph.pool, name, 4 << 20)
        return name

    def gateway(self, node: str, image: str) -> Gateway:
        g = Gateway(self.ceph, node, image)
        self.gateways.append(g)
        return g

    def read(self, image: str, offset: int) -> bytes:
        r = rados.Rados(conffile=self.ceph.conf_path, rados_id="admin")  # a fresh client, not blocklisted
        r.connect(timeout=5)
        try:
            with r.open_ioctx(self.ceph.pool) as io, rbd.Image(io, image, read_only=True) as img:
                return bytes(img.read(offset, BLOCK))
        finally:
            r.shutdown()

    def sessions_of(self, entity: str) -> list[str]:
        return [a for s in self.client.mon_sessions() if s.entity == entity for a in s.addrs]


@pytest.fixture(scope="module")
def cluster(micro_ceph: MicroCeph) -> Iterator[Cluster]:
    c = Cluster(micro_ceph)
    yield c
    c.client.close()


@pytest.fixture
def lab(cluster: Cluster) -> Iterator[Cluster]:
    yield cluster
    for g in cluster.gateways:
        g.kill()
    cluster.gateways.clear()


def failed_node(node: str, identity: Any, *images: str) -> FailedNode:
    return FailedNode(node=node, session="s-" + node, identity=identity, images=tuple(("rbd", i) for i in images))


def until_seconds(until: str) -> float:
    """Seconds from now to a blocklist entry's expiry as the monitors print it."""
    t = datetime.strptime(until, "%Y-%m-%dT%H:%M:%S.%f%z")
    return (t - datetime.now(timezone.utc)).total_seconds()


def test_frozen_owner_is_fenced_and_the_next_write_is_immediate(micro_ceph: MicroCeph, lab: Cluster) -> None:
    image = lab.image()
    a = lab.gateway("gwa", image)
    assert a.write(0, b"A")["ok"]                      # A holds the lock
    b = lab.gateway("gwb", image)
    published = fencer(micro_ceph, "gwa").identity()   # what gwa's agent published while alive
    assert published == {"v": 1, "entity": "client.pathagent-gwa", "ips": ["127.0.0.1"]}
    assert len(json.dumps(published)) < 200
    a.signal(signal.SIGSTOP)

    leader = fencer(micro_ceph, "gwc")
    t0 = time.monotonic()
    summary = leader.fence(failed_node("gwa", published, image))
    fence_secs = time.monotonic() - t0
    print(f"\nfence: {summary} (took {fence_secs * 1000:.0f} ms)")
    assert "blocklisted 1 client(s) of client.pathagent-gwa" in summary and "broke 1 lock(s)" in summary

    listed = lab.client.blocklist_list()
    assert a.addr in listed and b.addr not in listed
    left = until_seconds(listed[a.addr])
    assert EXPIRE - 120 < left <= EXPIRE + 5, (left, listed[a.addr])   # the expiry we asked for reached Ceph

    took = b.write(0, b"B")
    print(f"B's first write after the fence: {took['secs'] * 1000:.1f} ms (30 s without it)")
    assert took["ok"] and took["secs"] < 2.0, took

    a.signal(signal.SIGCONT)
    late_own = a.write(0, b"a", timeout=30)
    late_far = a.write(FAR, b"x", timeout=30)
    for late in (late_own, late_far):
        assert not late["ok"] and late["errno"] == ESHUTDOWN, late
    assert lab.read(image, 0) == b"B" * BLOCK
    assert lab.read(image, FAR) == bytes(BLOCK)
    assert b.write(BLOCK, b"C")["ok"]                  # B keeps the image

    again = leader.fence(failed_node("gwa", published, image))   # idempotent: nothing left to break
    assert "broke 0 lock(s)" in again, again
    leader.close()


def test_a_healthy_lock_holder_on_the_same_ip_is_never_fenced(micro_ceph: MicroCeph, lab: Cluster) -> None:
    image = lab.image()
    a = lab.gateway("gwa", image)
    assert a.write(0, b"A")["ok"]
    b = lab.gateway("gwb", image)
    assert b.write(0, b"B")["ok"]                      # gwb took the lock over cooperatively: gwa is alive
    published = fencer(micro_ceph, "gwa").identity()
    a.signal(signal.SIGSTOP)

    leader = fencer(micro_ceph, "gwc")
    summary = leader.fence(failed_node("gwa", published, image))
    print(f"\nfence: {summary}")
    assert "broke 0 lock(s)" in summary and "1 lock(s) held by other clients left alone" in summary
    listed = lab.client.blocklist_list()
    assert a.addr in listed and b.addr not in listed
    for off, fill in ((BLOCK, b"b"), (0, b"c")):
        took = b.write(off, fill)
        assert took["ok"] and took["secs"] < 2.0, took
    assert lab.read(image, 0) == b"c" * BLOCK
    leader.close()


def test_killed_owner_with_a_lingering_watch_is_found_by_its_published_ip(micro_ceph: MicroCeph,
                                                                         lab: Cluster) -> None:
    image = lab.image()
    a = lab.gateway("gwa", image)
    assert a.write(0, b"A")["ok"]
    b = lab.gateway("gwb", image)
    published = fencer(micro_ceph, "gwa").identity()
    a.kill()                                           # SIGKILL: the mon sees the socket close at once
    end = time.monotonic() + 10
    while lab.sessions_of("client.pathagent-gwa"):
        if time.monotonic() > end:
            pytest.fail("the killed gateway's mon session did not go away within 10 s")
        time.sleep(0.05)
    clients = lab.client.image_clients("rbd", image)
    assert a.addr in clients.watchers and clients.owners == (a.addr,)   # the OSD keeps the watch for 30 s

    leader = fencer(micro_ceph, "gwc")
    summary = leader.fence(failed_node("gwa", published, image))
    print(f"\nfence: {summary}")
    assert "blocklisted 1 client(s)" in summary and "0 with a mon session, 1 lingering" in summary
    assert "broke 1 lock(s)" in summary
    listed = lab.client.blocklist_list()
    assert a.addr in listed and b.addr not in listed   # gwb shares the IP; its session spares it
    took = b.write(0, b"B")
    print(f"B's first write after fencing a killed owner: {took['secs'] * 1000:.1f} ms")
    assert took["ok"] and took["secs"] < 2.0, took
    assert lab.read(image, 0) == b"B" * BLOCK
    leader.close()


def test_a_node_with_nothing_left_and_an_empty_identity(micro_ceph: MicroCeph, lab: Cluster) -> None:
    leader = fencer(micro_ceph, "gwc")
    image = lab.image()
    summary = leader.fence(failed_node("gwz", {}, image, "deleted-image"))
    assert "blocklisted 0 client(s) of client.pathagent-gwz" in summary and "1 image(s) gone" in summary
    # its own predecessor (it came back alone and leads): fenced, but never this process's own client
    summary = leader.fence(failed_node("gwc", {"entity": "client.pathagent-gwc", "ips": ["127.0.0.1"]}, image))
    assert "blocklisted 0 client(s) of client.pathagent-gwc" in summary, summary
    assert "blocklisted 0 client(s) of client.pathagent-gwz" in leader.fence(failed_node("gwz", {}, image))
    with pytest.raises(PermanentBackendError, match="own Ceph client"):   # another node naming our data path
        leader.fence(failed_node("gwz", {"entity": "client.pathagent-gwc", "ips": ["127.0.0.1"]}, image))
    with pytest.raises(PermanentBackendError, match="own Ceph client"):
        leader.fence(failed_node("gwz", {"entity": "client.admin", "ips": ["127.0.0.1"]}, image))
    leader.close()


def test_unreachable_cluster_is_transient_and_bounded(own_ceph: MicroCeph) -> None:
    leader = fencer(own_ceph, "gwc", timeout=2.0)
    me = fencer(own_ceph, "gwa", timeout=2.0)
    assert me.identity()["entity"] == "client.pathagent-gwa"
    own_ceph.freeze()
    try:
        for call in (lambda: leader.fence(failed_node("gwa", {}, "img")),
                     lambda: fencer(own_ceph, "gwb", timeout=2.0).identity()):
            t0 = time.monotonic()
            with pytest.raises(TransientBackendError):
                call()
            assert time.monotonic() - t0 < 10
    finally:
        own_ceph.thaw()
    leader.close()
    me.close()
