"""``ceph-blocklist`` against real tgtd gateways: the tgt backend opens each LUN as the node's own Ceph client
(``client.pathagent-<node>``), so the leader finds a frozen gateway's bs_rbd clients by their monitor sessions,
blocklists them, and the initiator's writes through the next gateway go through at once.

Gateways gwa and gwb are tgt backends in their own network namespaces (each its own source IP), a micro Ceph
on the lab's root-namespace address, a libiscsi initiator in the initiator namespace (tier 3, ``lab``).
Without the fence the write through gwb waits for gwa's watch to time out (29.9 s measured here).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent import plugins
from agent.adapters.ceph import CephClient
from agent.backend import FailedNode, PluginContext, TargetBackend
from agent.config import CephConfig
from agent.core.model import Disk, PathKey, PathSpec
from lab import iscsi
from lab.gwtools import RbdImages, stop_tgtd, tgt_missing
from lab.netns import GatewayLab, NetnsThread, ip

pytestmark = pytest.mark.lab

INI = "iqn.2016-05.io.pathagent.test:ini-fence"
VIP_BASE = 140          # vip indexes of this module, at the top of a /24 (the contract suite counts up from 0)


@dataclasses.dataclass
class Gateway:
    node: str
    state_dir: str
    thread: NetnsThread
    backend: TargetBackend
    ns: str
    addresses: list[str] = dataclasses.field(default_factory=list)

    def add_ip(self, addr: str) -> None:
        ip("addr", "replace", addr, "dev", "eth0", ns=self.ns)
        self.addresses.append(addr)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.thread.call(fn, *args)

    def tgtd(self) -> int:
        with open(os.path.join(self.state_dir, "tgt", "tgtd.pid")) as f:
            return int(f.read().split()[0])


@pytest.fixture
def gateways(gw_lab: GatewayLab, ceph: Any, host_ceph_probe: Callable[[str, str], None],
             tmp_path: Path) -> Iterator[dict[str, Gateway]]:
    reason = tgt_missing()
    if reason:
        pytest.skip(reason)
    from plugins.tgt import TgtBackend
    made: dict[str, Gateway] = {}
    try:
        for node in ("gwa", "gwb"):
            state = str(tmp_path / node)
            ctx = PluginContext(node="", node_name=lambda node=node: node,    # the name comes from Consul later
                                state_dir=state, options={"ceph_timeout": 3, "product_rev": node},
                                ceph=CephConfig(conf=ceph.conf_path, client_id="admin", timeout=3.0),
                                ceph_probe=host_ceph_probe)
            th = NetnsThread(gw_lab.ns(node))
            made[node] = Gateway(node, state, th, th.call(TgtBackend, ctx), gw_lab.ns(node))
        yield made
    finally:
        for g in made.values():
            try:
                os.kill(g.tgtd(), signal.SIGCONT)
            except (OSError, ValueError):
                pass
            g.call(g.backend.close)
            g.thread.close()
            stop_tgtd(g.state_dir)
            for addr in g.addresses:
                ip("addr", "del", addr, "dev", "eth0", ns=g.ns, check=False)


def fencing(ceph: Any, node: str) -> Any:
    return plugins.load_fencing("ceph-blocklist", PluginContext(
        node=node, state_dir="/nonexistent", options={"expire": 600},
        ceph=CephConfig(conf=ceph.conf_path, client_id="admin", timeout=5.0)))


def test_a_frozen_tgtd_is_fenced_and_the_next_gateway_writes_at_once(gw_lab: GatewayLab, ceph: Any,
                                                                      images: RbdImages,
                                                                      gateways: dict[str, Gateway]) -> None:
    did = f"f{uuid.uuid4().hex[:8]}"
    image = images.create(f"img-{did}", 64 << 20)
    paths = tuple(PathSpec(index=i, ip=gw_lab.vip(VIP_BASE + i), prefix=24) for i in (1, 2))
    disk = Disk(id=did, name=f"disk {did}", iqn=f"iqn.2016-05.io.pathagent:{did}", serial=str(uuid.uuid4()),
                paths=paths, pool="rbd", image=image, size=64 << 20, initiators=None)
    a, b = gateways["gwa"], gateways["gwb"]
    for g, index in ((a, 1), (b, 2)):
        g.call(g.backend.export, PathKey(did, index), disk)
        g.add_ip(f"{paths[index - 1].ip}/24")

    published = a.call(lambda: fencing(ceph, "gwa").identity())        # gwa's agent, in gwa's namespace
    assert published == {"v": 1, "entity": "client.pathagent-gwa", "ips": [gw_lab.node_ip("gwa")]}
    view = CephClient(ceph.conf_path, "admin", 5.0)
    try:
        tgtd_a = [x for s in view.mon_sessions() if s.entity == "client.pathagent-gwa" for x in s.addrs]
        tgtd_b = [x for s in view.mon_sessions() if s.entity == "client.pathagent-gwb" for x in s.addrs]
        assert tgtd_a and tgtd_b, "bs_rbd did not open the LUNs as the nodes' own clients"

        ns = gw_lab.ns("ini")
        first, second = os.urandom(8192), os.urandom(8192)
        with iscsi.Session(f"{paths[0].ip}:3260", disk.iqn, initiator=INI, netns=ns, reconnect=False,
                           timeout=5) as sa, \
                iscsi.Session(f"{paths[1].ip}:3260", disk.iqn, initiator=INI, netns=ns, reconnect=False,
                              timeout=60) as sb:
            sa.write(100, first)
            sa.sync()                                                   # tgtd A holds the lock
            assert view.image_clients("rbd", image).owners[0] in tgtd_a
            os.kill(a.tgtd(), signal.SIGSTOP)

            summary = fencing(ceph, "gwc").fence(FailedNode("gwa", "s-gwa", published, (("rbd", image),)))
            print(f"\nfence: {summary}")
            listed = view.blocklist_list()
            assert set(tgtd_a) <= set(listed) and not set(tgtd_b) & set(listed)
            assert "broke 1 lock(s)" in summary

            t0 = time.monotonic()
            sb.write(100, second)
            sb.sync()
            took = time.monotonic() - t0
            print(f"initiator WRITE + SYNC CACHE through gwb after the fence: {took * 1000:.1f} ms "
                  f"(~30 s without it)")
            assert took < 2.0

            os.kill(a.tgtd(), signal.SIGCONT)
            with pytest.raises(iscsi.IscsiError):
                sa.write(100, first)                                    # the thawed gateway cannot write
            assert sb.read(100, len(second) // 512) == second
    finally:
        view.close()
