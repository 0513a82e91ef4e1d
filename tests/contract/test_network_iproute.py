"""The ``iproute`` network backend in a real gateway namespace (lab: gwa, gwb, ini on one bridge).

Checks: up/down/idempotency, ``active`` from the kernel after a restart, the gratuitous ARP moving the
initiator's neighbour entry, that it never removes (nor takes over) an address it did not add, interface
choice by subnet and by the ``interfaces`` table."""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Iterator

import pytest

from agent.backend import PluginContext
from agent.errors import PermanentBackendError
from agent.core.model import PathKey, PathSpec
from lab.gwtools import missing_tools
from lab.netns import GatewayLab, NetnsThread, ip, run_in

pytestmark = pytest.mark.lab
_n = itertools.count(60)


@pytest.fixture
def gwa(gw_lab: GatewayLab) -> Iterator[NetnsThread]:
    try:
        import pyroute2  # noqa: F401
    except ImportError as e:
        pytest.skip(f"pyroute2 is not installed: {e}")
    with NetnsThread(gw_lab.ns("gwa")) as t:
        yield t


@pytest.fixture
def net(gw_lab: GatewayLab, gwa: NetnsThread, tmp_path: Any) -> Iterator[Any]:
    from plugins.iproute import IprouteNetwork
    ctx = PluginContext(node="gwa", state_dir=str(tmp_path))
    b = gwa.call(IprouteNetwork, ctx)
    yield b
    gwa.call(b.close)
    # remove whatever a failing test left: every address on gwa's eth0 but the node's own
    own = f"{gw_lab.node_ip('gwa')}/24"
    for a in addrs(gw_lab, "gwa"):
        if a != own:
            ip("addr", "del", a, "dev", "eth0", ns=gw_lab.ns("gwa"), check=False)


def addrs(lab: GatewayLab, node: str) -> dict[str, str]:
    """ip/prefix -> label, for the IPv4 addresses on eth0 of ``node``."""
    out = {}
    for link in json.loads(ip("-4", "-j", "addr", "show", "dev", "eth0", ns=lab.ns(node)).stdout):
        for a in link.get("addr_info", []):
            out[f"{a['local']}/{a['prefixlen']}"] = a.get("label", "")
    return out


def mac(lab: GatewayLab, node: str) -> str:
    return str(json.loads(ip("-j", "link", "show", "eth0", ns=lab.ns(node)).stdout)[0]["address"])


def neigh(lab: GatewayLab, node: str, addr: str) -> str | None:
    for e in json.loads(ip("-j", "neigh", "show", addr, "dev", "eth0", ns=lab.ns(node)).stdout or "[]"):
        return str(e["lladdr"]) if "lladdr" in e else None
    return None


def test_up_down_idempotent_and_labelled(gw_lab: GatewayLab, gwa: NetnsThread, net: Any, tmp_path: Any) -> None:
    vip = gw_lab.vip(next(_n))
    p, spec = PathKey("d1", 1), PathSpec(1, vip, 24)
    own = f"{gw_lab.node_ip('gwa')}/24"
    gwa.call(net.up, p, spec)
    gwa.call(net.up, p, spec)
    a = addrs(gw_lab, "gwa")
    assert a[f"{vip}/24"] == "eth0:pa"
    assert own in a
    assert gwa.call(net.active) == {p}
    assert json.load(open(tmp_path / "iproute.json"))["addresses"]["d1/1"]["ip"] == vip
    # a restarted agent sees the same from the kernel
    from plugins.iproute import IprouteNetwork
    again = gwa.call(IprouteNetwork, PluginContext(node="gwa", state_dir=str(tmp_path)))
    assert gwa.call(again.active) == {p}
    gwa.call(net.down, p, spec)
    gwa.call(net.down, p, spec)
    gwa.call(net.down, p, None)
    a = addrs(gw_lab, "gwa")
    assert f"{vip}/24" not in a and own in a
    assert gwa.call(net.active) == frozenset()
    # promote_secondaries keeps the other floating IPs when the first address of a subnet goes
    assert sysctl(gw_lab, "gwa", "net.ipv4.conf.eth0.promote_secondaries") == "1"


def sysctl(lab: GatewayLab, node: str, key: str) -> str:
    return str(run_in(lab.ns(node), ["sysctl", "-n", key], check=True).stdout).strip()


def test_gratuitous_arp_moves_the_initiators_neighbour_entry(gw_lab: GatewayLab, gwa: NetnsThread,
                                                             net: Any) -> None:
    if missing_tools("arping"):
        pytest.skip("arping (iputils-arping) is not installed")
    vip = gw_lab.vip(next(_n))
    # the initiator last saw the VIP on gwb
    ip("addr", "add", f"{vip}/24", "dev", "eth0", ns=gw_lab.ns("gwb"))
    try:
        assert run_in(gw_lab.ns("ini"), ["ping", "-c", "1", "-W", "1", vip]).returncode == 0
        assert neigh(gw_lab, "ini", vip) == mac(gw_lab, "gwb")
    finally:
        ip("addr", "del", f"{vip}/24", "dev", "eth0", ns=gw_lab.ns("gwb"))
    t0 = time.monotonic()
    gwa.call(net.up, PathKey("d2", 1), PathSpec(1, vip, 24))
    while neigh(gw_lab, "ini", vip) != mac(gw_lab, "gwa"):
        assert time.monotonic() - t0 < 3, "the initiator still points the VIP at the old gateway"
        time.sleep(0.01)
    print(f"\ninitiator's neighbour entry moved to the new gateway {time.monotonic() - t0:.3f} s after up()")
    gwa.call(net.down, PathKey("d2", 1), None)


def test_never_touches_a_foreign_address(gw_lab: GatewayLab, gwa: NetnsThread, net: Any) -> None:
    vip, other = gw_lab.vip(next(_n)), gw_lab.vip(next(_n))
    ns = gw_lab.ns("gwa")
    ip("addr", "add", f"{vip}/24", "dev", "eth0", ns=ns)                          # someone else's
    ip("addr", "add", f"{other}/24", "dev", "eth0", "label", "eth0:x", ns=ns)    # another tool's label
    p = PathKey("d3", 1)
    with pytest.raises(PermanentBackendError, match="not added by pathagent"):
        gwa.call(net.up, p, PathSpec(1, vip, 24))
    gwa.call(net.down, p, PathSpec(1, vip, 24))
    gwa.call(net.down, PathKey("d3", 2), PathSpec(2, other, 24))
    a = addrs(gw_lab, "gwa")
    assert f"{vip}/24" in a and a[f"{other}/24"] == "eth0:x"
    assert gwa.call(net.active) == frozenset()


def test_interface_choice(gw_lab: GatewayLab, gwa: NetnsThread, tmp_path: Any) -> None:
    from plugins.iproute import IprouteNetwork
    plain = gwa.call(IprouteNetwork, PluginContext(node="gwa", state_dir=str(tmp_path / "a")))
    with pytest.raises(PermanentBackendError, match="no interface"):
        gwa.call(plain.up, PathKey("d4", 1), PathSpec(1, "198.19.251.7", 24))
    mapped = gwa.call(IprouteNetwork, PluginContext(node="gwa", state_dir=str(tmp_path / "b"),
                                                    options={"interfaces": {"198.19.251.0/24": "eth0"}}))
    try:
        gwa.call(mapped.up, PathKey("d4", 1), PathSpec(1, "198.19.251.7", 24))
        assert addrs(gw_lab, "gwa")["198.19.251.7/24"] == "eth0:pa"
        assert gwa.call(mapped.active) == {PathKey("d4", 1)}
    finally:
        gwa.call(mapped.down, PathKey("d4", 1), None)
    assert "198.19.251.7/24" not in addrs(gw_lab, "gwa")
    bad = gwa.call(IprouteNetwork, PluginContext(node="gwa", state_dir=str(tmp_path / "c"),
                                                 options={"interfaces": {"198.19.251.0/24": "nosuch0"}}))
    with pytest.raises(PermanentBackendError, match="does not exist"):
        gwa.call(bad.up, PathKey("d4", 1), PathSpec(1, "198.19.251.7", 24))
    assert not os.path.exists(tmp_path / "c" / "iproute.json") or \
        json.load(open(tmp_path / "c" / "iproute.json"))["addresses"] == {}


def test_bad_options_are_config_errors(tmp_path: Any) -> None:
    from agent.errors import ConfigError
    from plugins.iproute import IprouteNetwork
    with pytest.raises(ConfigError) as e:
        IprouteNetwork(PluginContext(node="n", state_dir=str(tmp_path), options={
            "interfaces": {"198.18.0.0/33": "eth0", "2001:db8::/64": "eth0"}, "label": "bad label!",
            "promote_secondaries": 1}))
    keys = {k for k, _ in e.value.problems}
    assert keys == {"network.iproute.interfaces.198.18.0.0/33", "network.iproute.interfaces.2001:db8::/64",
                    "network.iproute.label", "network.iproute.promote_secondaries"}
