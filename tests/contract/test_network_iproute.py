"""The ``iproute`` network backend in a real gateway namespace (lab: gwa, gwb, ini on one bridge).

Checks: up/down/idempotency, ``active`` from the kernel after a restart, the gratuitous ARPs (three,
counted on the wire at the initiator, from a child with the scrubbed environment) moving the initiator's
neighbour entry, that it never removes (nor takes over) an address it did not add, that ``down`` refuses to
return while the path's IP is still here, interface choice by subnet and by the ``interfaces`` table, and
``fence``: every address of ours and none other, also from a second instance on the same state dir (the
guard process), without the instance's lock, killing running announcements, and undoing an ``up`` it
overlapped; ``connections`` and ``tickle`` resetting a silent connection of the initiator at once; the mirror of the kernel's addresses that ``up``/``down``/``active`` read (it follows every
change at once, also after its notifications overflowed) and one record write per ``up``."""
from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import struct
import subprocess
import threading
import time
from typing import Any, Iterator

import pytest

from agent.backend import PluginContext
from agent.errors import PermanentBackendError, TransientBackendError
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
def ini(gw_lab: GatewayLab) -> Iterator[NetnsThread]:
    with NetnsThread(gw_lab.ns("ini")) as t:
        yield t


@pytest.fixture
def make(gw_lab: GatewayLab, gwa: NetnsThread, tmp_path: Any) -> Iterator[Any]:
    """``make(**options)``: an ``IprouteNetwork`` built in gwa on the test's state dir (every call builds
    another instance on the same dir, as the guard process does)."""
    from plugins.iproute import IprouteNetwork
    made: list[Any] = []

    def build(**options: Any) -> Any:
        b = gwa.call(IprouteNetwork, PluginContext(node="gwa", state_dir=str(tmp_path), options=options))
        made.append(b)
        return b
    yield build
    for b in made:
        try:
            gwa.call(b.fence)      # also stops announcements still running
        finally:
            gwa.call(b.close)
    # remove whatever a failing test left: every address on gwa's eth0 but the node's own
    own = f"{gw_lab.node_ip('gwa')}/24"
    for a in addrs(gw_lab, "gwa"):
        if a != own:
            ip("addr", "del", a, "dev", "eth0", ns=gw_lab.ns("gwa"), check=False)


@pytest.fixture
def net(make: Any) -> Any:
    return make()


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
    # the initiator last saw the VIP on gwb (and nowhere else: the contract suite's other modules use vips of
    # this lab too, so forget any entry an earlier test left)
    ip("neigh", "flush", "to", vip, ns=gw_lab.ns("ini"), check=False)
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


def test_a_silent_connection_is_reset_at_once_by_the_tickle_of_the_next_owner(
        gw_lab: GatewayLab, gwa: NetnsThread, ini: NetnsThread, net: Any, tmp_path: Any) -> None:
    """A planned hand-over on the wire: gwa lists the initiator's connection to the path IP, takes the IP
    down (the connection goes silent: nothing can leave), gwb brings it up and tickles that connection: the
    initiator's socket, which has nothing in flight and would otherwise wait forever, is reset within the
    first tickle round; a tickle of a connection that is gone, and one of a live connection to the new
    owner itself, are harmless."""
    if missing_tools("arping"):
        pytest.skip("arping (iputils-arping) is not installed")
    from plugins.iproute import TCP_TABLE_FOR, TICKLE_AT, IprouteNetwork
    vip = gw_lab.vip(next(_n))
    p, spec = PathKey("d5", 1), PathSpec(1, vip, 24)
    gwa.call(net.up, p, spec)
    srv = gwa.call(socket.create_server, (vip, 3260))
    cli = ini.call(socket.create_connection, (vip, 3260), 2)
    conn, _ = gwa.call(srv.accept)
    try:
        peers = gwa.call(net.connections, p, spec)
        assert peers == ((gw_lab.node_ip("ini"), cli.getsockname()[1], 3260),)
        assert gwa.call(net.connections, PathKey("d5", 2), None) == (), "no record, no spec: nothing"
        gwa.call(net.down, p, spec)
        time.sleep(TCP_TABLE_FOR)
        assert gwa.call(net.connections, p, spec) == peers, "the sockets outlive the address"
        with NetnsThread(gw_lab.ns("gwb")) as gwb:
            new = gwb.call(IprouteNetwork, PluginContext(node="gwb", state_dir=str(tmp_path / "gwb")))
            try:
                gwb.call(new.up, p, spec)
                t0 = time.monotonic()
                gwb.call(new.tickle, p, spec, peers + (("198.18.255.254", 9, 3260),))
                cli.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    cli.recv(1)
                took = time.monotonic() - t0
                print(f"\nthe initiator's silent connection was reset {took:.3f} s after tickle()")
                assert took < TICKLE_AT[1], "reset by the first round"
                # a live connection to the new owner is left alone by a tickle
                srv2 = gwb.call(socket.create_server, (vip, 3261))
                c2 = ini.call(socket.create_connection, (vip, 3261), 2)
                s2, _ = gwb.call(srv2.accept)
                live = gwb.call(new.connections, p, spec)
                assert live == ((gw_lab.node_ip("ini"), c2.getsockname()[1], 3261),)
                gwb.call(new.tickle, p, spec, live)
                time.sleep(TICKLE_AT[0] + 0.1)
                s2.sendall(b"x")
                c2.settimeout(2)
                assert c2.recv(1) == b"x"
                for x in (c2, s2, srv2):
                    x.close()
            finally:
                gwb.call(new.fence)
                gwb.call(new.close)
    finally:
        for x in (cli, conn, srv):
            x.close()


def test_never_touches_a_foreign_address(gw_lab: GatewayLab, gwa: NetnsThread, net: Any) -> None:
    vip, other = gw_lab.vip(next(_n)), gw_lab.vip(next(_n))
    ns = gw_lab.ns("gwa")
    ip("addr", "add", f"{vip}/24", "dev", "eth0", ns=ns)                          # someone else's
    ip("addr", "add", f"{other}/24", "dev", "eth0", "label", "eth0:x", ns=ns)    # another tool's label
    p = PathKey("d3", 1)
    with pytest.raises(PermanentBackendError, match="not added by pathagent"):
        gwa.call(net.up, p, PathSpec(1, vip, 24))
    # down() leaves them, and does not return as if the path's IP were gone (the agent would release it)
    with pytest.raises(TransientBackendError, match=f"{vip}/24 is up on eth0.*ip addr del {vip}/24 dev eth0"):
        gwa.call(net.down, p, PathSpec(1, vip, 24))
    with pytest.raises(TransientBackendError, match=f"{other}/24 is up on eth0"):
        gwa.call(net.down, PathKey("d3", 2), PathSpec(2, other, 24))
    a = addrs(gw_lab, "gwa")
    assert f"{vip}/24" in a and a[f"{other}/24"] == "eth0:x"
    assert gwa.call(net.active) == frozenset()
    # once the admin removed it, down() returns
    ip("addr", "del", f"{vip}/24", "dev", "eth0", ns=ns)
    gwa.call(net.down, p, PathSpec(1, vip, 24))


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


def vlan_support(ns: str) -> bool:
    """Whether the kernel makes 802.1Q VLAN interfaces (the 8021q module); probes in namespace ``ns``."""
    r = ip("link", "add", "link", "eth0", "name", "pa-vprobe", "type", "vlan", "id", "4000", ns=ns, check=False)
    ip("link", "del", "pa-vprobe", ns=ns, check=False)
    return r.returncode == 0


def test_role_names_the_interface_and_vlan_the_tagged_one(gw_lab: GatewayLab, gwa: NetnsThread,
                                                          tmp_path: Any) -> None:
    """``role`` puts the address on the interface ``roles`` names for it (an unlisted role is an error
    naming the path and the role). ``vlan``: on a kernel without 802.1Q support (this host's) the path
    fails with an error that says so and nothing is added; where the kernel has it, the address goes on the
    VLAN interface (the full check with an initiator across the VLAN runs in the guest tier,
    tests/contract/test_lio_backend.py::test_a_vlan_path_is_reached_only_over_its_vlan)."""
    from plugins.iproute import IprouteNetwork
    gwa_ns = gw_lab.ns("gwa")
    net = gwa.call(IprouteNetwork, PluginContext(
        node="gwa", state_dir=str(tmp_path), options={"interfaces": {"198.19.240.0/20": "eth0"},
                                                      "roles": {"san": "eth0"}, "arping": ""}))
    try:
        gwa.call(net.up, PathKey("r1", 1), PathSpec(1, "198.19.242.10", 24, role="san"))
        assert addrs(gw_lab, "gwa")["198.19.242.10/24"] == "eth0:pa"
        with pytest.raises(PermanentBackendError, match=r"path r2/1: role 'nosuch' is not in .*san"):
            gwa.call(net.up, PathKey("r2", 1), PathSpec(1, "198.19.243.10", 24, role="nosuch"))
        if vlan_support(gwa_ns):
            gwa.call(net.up, PathKey("r3", 1), PathSpec(1, "198.19.244.10", 24, vlan=20))
            on = {x["ifname"]: [i["local"] for i in x.get("addr_info", [])]
                  for x in json.loads(ip("-4", "-j", "addr", "show", ns=gwa_ns).stdout)}
            assert on.get("eth0.20") == ["198.19.244.10"]
            print("\nVLAN: this kernel has 802.1Q; the address went on eth0.20")
        else:
            with pytest.raises(PermanentBackendError, match="no 802.1Q VLAN support"):
                gwa.call(net.up, PathKey("r3", 1), PathSpec(1, "198.19.244.10", 24, vlan=20))
            assert "198.19.244.10/24" not in addrs(gw_lab, "gwa")
            print("\nVLAN: this kernel has no 802.1Q support; a VLAN path is refused with the reason")
        assert gwa.call(net.active) <= {PathKey("r1", 1), PathKey("r3", 1)}
    finally:
        gwa.call(net.fence)
        gwa.call(net.close)
        ip("link", "del", "eth0.20", ns=gwa_ns, check=False)
    assert "198.19.242.10/24" not in addrs(gw_lab, "gwa")


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


# ------------------------------------------------------------------------------------------------ GARP

class GarpWatch:
    """The gratuitous ARPs for ``addr`` (requests whose sender and target address are ``addr``) arriving
    on eth0 of the namespace of ``ns_thread``, with their arrival times (``time.monotonic``)."""

    def __init__(self, ns_thread: NetnsThread, addr: str) -> None:
        self.addr = socket.inet_aton(addr)
        self.sock = ns_thread.call(self._open)    # a socket stays in the namespace it was made in
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        s.bind(("eth0", 0))
        s.settimeout(0.05)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                f = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            # Ethernet header 14 bytes; ARP op at 20, sender IP at 28, target IP at 38
            if len(f) >= 42 and struct.unpack("!H", f[20:22])[0] == 1 and f[28:32] == self.addr == f[38:42]:
                self.times.append(time.monotonic())

    def wait(self, n: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while len(self.times) < n:
            assert time.monotonic() < end, f"saw {len(self.times)} gratuitous ARPs, waited for {n}"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def need_arping() -> None:
    if missing_tools("arping"):
        pytest.skip("arping (iputils-arping) is not installed")


def test_three_gratuitous_arps_on_the_wire(gw_lab: GatewayLab, gwa: NetnsThread, ini: NetnsThread,
                                           net: Any) -> None:
    need_arping()
    vip = gw_lab.vip(next(_n))
    w = GarpWatch(ini, vip)
    try:
        t0 = time.monotonic()
        gwa.call(net.up, PathKey("g1", 1), PathSpec(1, vip, 24))
        time.sleep(3.5)                       # arping -c 3 -w 3 has exited by then
    finally:
        w.close()
    assert len(w.times) == 3, w.times
    assert w.times[0] - t0 < 0.5
    gaps = [b - a for a, b in zip(w.times, w.times[1:])]
    assert all(0.8 < g < 1.2 for g in gaps), gaps
    gwa.call(net.down, PathKey("g1", 1), None)


def test_announcement_argv_and_scrubbed_environment(gw_lab: GatewayLab, gwa: NetnsThread, make: Any,
                                                    tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = tmp_path / "arping-stub"
    out = tmp_path / "stub-out"
    stub.write_text(f'#!/bin/sh\nenv > {out}.env\nprintf "%s\\n" "$@" > {out}.tmp && mv {out}.tmp {out}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret-token")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    net = make(arping=str(stub))
    vip = gw_lab.vip(next(_n))
    gwa.call(net.up, PathKey("g2", 1), PathSpec(1, vip, 24))
    t0 = time.monotonic()
    while not out.exists():
        assert time.monotonic() - t0 < 3, "the announcement did not run"
        time.sleep(0.01)
    assert out.read_text().split() == ["-q", "-U", "-c", "3", "-w", "3", "-I", "eth0", vip]
    env = (tmp_path / "stub-out.env").read_text()
    assert "s3cret-token" not in env and "NOTIFY_SOCKET" not in env
    gwa.call(net.down, PathKey("g2", 1), None)


# ------------------------------------------------------------------------------------------------ fence

LONG_IF = "pathagentlong0"     # "<ifname>:pa" does not fit in 15 characters: addresses here carry no label
LONG_PEER = "pathagentlong1"
LONG_NET = "198.19.252"        # only ever inside gwa's namespace


@pytest.fixture
def long_if(gw_lab: GatewayLab, gwa: NetnsThread) -> Iterator[str]:
    ns = gw_lab.ns("gwa")
    ip("link", "add", LONG_IF, "type", "veth", "peer", "name", LONG_PEER, ns=ns)
    try:
        ip("link", "set", LONG_PEER, "up", ns=ns)
        ip("link", "set", LONG_IF, "up", ns=ns)
        yield LONG_IF
    finally:
        ip("link", "del", LONG_IF, ns=ns, check=False)


def if_addrs(lab: GatewayLab, node: str, ifname: str) -> set[str]:
    out = set()
    for link in json.loads(ip("-4", "-j", "addr", "show", "dev", ifname, ns=lab.ns(node)).stdout):
        out |= {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: the test process reaps its children lazily)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def announcer_pids(state_dir: Any) -> dict[str, int]:
    """path -> pid of its announcement, from the record."""
    rec = json.load(open(state_dir / "iproute.json"))["addresses"]
    return {k: int(v["arping"]["pid"]) for k, v in rec.items() if "arping" in v}


def test_fence_removes_ours_and_nothing_else_also_from_a_second_instance(
        gw_lab: GatewayLab, gwa: NetnsThread, make: Any, long_if: str, tmp_path: Any) -> None:
    ns = gw_lab.ns("gwa")
    opts = {"interfaces": {f"{LONG_NET}.0/24": LONG_IF}, "arping": "" if missing_tools("arping") else "arping"}
    agent = make(**opts)
    v1, v3, v4, v5 = (gw_lab.vip(next(_n)) for _ in range(4))
    v2 = f"{LONG_NET}.7"
    gwa.call(agent.up, PathKey("f1", 1), PathSpec(1, v1, 24))     # labelled eth0:pa and recorded
    gwa.call(agent.up, PathKey("f1", 2), PathSpec(2, v2, 24))     # recorded only (no label fits)
    ip("addr", "add", f"{v3}/24", "dev", "eth0", ns=ns)                        # someone else's
    ip("addr", "add", f"{v4}/24", "dev", "eth0", "label", "eth0:x", ns=ns)    # another tool's label
    ip("addr", "add", f"{v5}/24", "dev", "eth0", "label", "eth0:pa", ns=ns)   # ours by label, record lost
    assert f"{v2}/24" in if_addrs(gw_lab, "gwa", LONG_IF)
    pids = announcer_pids(tmp_path)
    if opts["arping"]:
        assert set(pids) == {"f1/1", "f1/2"} and all(running(p) for p in pids.values())
    # the guard: its own instance on the same state dir, no memory of what the agent did
    guard = make(**opts)
    gwa.call(guard.fence)
    a = addrs(gw_lab, "gwa")
    assert f"{v1}/24" not in a and f"{v5}/24" not in a
    assert f"{v3}/24" in a and a[f"{v4}/24"] == "eth0:x" and f"{gw_lab.node_ip('gwa')}/24" in a
    assert f"{v2}/24" not in if_addrs(gw_lab, "gwa", LONG_IF)
    assert not any(running(p) for p in pids.values()), "the agent's announcements outlived the guard's fence"
    assert json.load(open(tmp_path / "iproute.json"))["addresses"] == {}
    assert gwa.call(agent.active) == frozenset() and gwa.call(guard.active) == frozenset()
    # nothing comes back by itself; the agent can bring a path up again and down cleanly
    gwa.call(agent.down, PathKey("f1", 1), PathSpec(1, v1, 24))
    gwa.call(agent.up, PathKey("f1", 1), PathSpec(1, v1, 24))
    assert gwa.call(agent.active) == {PathKey("f1", 1)}
    gwa.call(agent.fence)
    assert f"{v1}/24" not in addrs(gw_lab, "gwa")


def test_fence_does_not_wait_for_the_instance_lock(gw_lab: GatewayLab, gwa: NetnsThread, net: Any) -> None:
    vips = [gw_lab.vip(next(_n)) for _ in range(3)]
    for i, v in enumerate(vips, 1):
        gwa.call(net.up, PathKey("f2", i), PathSpec(i, v, 24))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:          # stands for the main thread inside up()/down()/active()
        with net._lock:
            held.set()
            release.wait(5)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(2)
        t0 = time.monotonic()
        gwa.call(net.fence)
        took = time.monotonic() - t0
    finally:
        release.set()
        holder.join()
    assert took < 0.5, f"fence took {took:.3f} s while the lock was held"
    assert not any(f"{v}/24" in addrs(gw_lab, "gwa") for v in vips)
    print(f"\nfence of 3 addresses with the lock held elsewhere: {took * 1e3:.1f} ms")


def test_fence_kills_a_running_announcement(gw_lab: GatewayLab, gwa: NetnsThread, ini: NetnsThread, net: Any,
                                            tmp_path: Any) -> None:
    need_arping()
    vip = gw_lab.vip(next(_n))
    w = GarpWatch(ini, vip)
    try:
        gwa.call(net.up, PathKey("f3", 1), PathSpec(1, vip, 24))
        w.wait(1, 1.0)                        # the first of three went out
        pid = announcer_pids(tmp_path)["f3/1"]
        assert running(pid)
        gwa.call(net.fence)
        done = time.monotonic()
        assert not running(pid)
        time.sleep(1.6)                       # the second would have gone out ~1 s after the first
    finally:
        w.close()
    assert [t for t in w.times if t > done + 0.3] == [], "an announcement went out after the fence"
    assert len(w.times) == 1
    assert f"{vip}/24" not in addrs(gw_lab, "gwa")


def test_up_overlapping_a_fence_undoes_itself(gw_lab: GatewayLab, gwa: NetnsThread, net: Any, tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    vip = gw_lab.vip(next(_n))
    # the fence runs inside up(), after the record was written and before the address is added
    monkeypatch.setattr(net, "_promote", lambda ifname: net.fence())
    with pytest.raises(TransientBackendError, match="a fence ran"):
        gwa.call(net.up, PathKey("f4", 1), PathSpec(1, vip, 24))
    assert f"{vip}/24" not in addrs(gw_lab, "gwa")
    assert "f4/1" not in json.load(open(tmp_path / "iproute.json"))["addresses"]
    assert gwa.call(net.active) == frozenset()


# ------------------------------------------------------------------------------------------------ down

def test_down_raises_while_an_address_it_cannot_recognise_is_up(gw_lab: GatewayLab, gwa: NetnsThread, make: Any,
                                                                long_if: str, tmp_path: Any) -> None:
    ns = gw_lab.ns("gwa")
    net = make(interfaces={f"{LONG_NET}.0/24": LONG_IF}, arping="")
    p, spec = PathKey("r1", 1), PathSpec(1, f"{LONG_NET}.9", 24)
    gwa.call(net.up, p, spec)                 # unlabelled: the record is all that makes it ours
    os.remove(tmp_path / "iproute.json")      # record lost
    with pytest.raises(TransientBackendError,
                       match=rf"{spec.ip}/24 is up on {LONG_IF}.*ip addr del {spec.ip}/24 dev {LONG_IF}"):
        gwa.call(net.down, p, spec)
    assert f"{spec.ip}/24" in if_addrs(gw_lab, "gwa", LONG_IF)
    ip("addr", "del", f"{spec.ip}/24", "dev", LONG_IF, ns=ns)      # what the message tells the admin
    gwa.call(net.down, p, spec)


def test_two_paths_cannot_share_an_ip(gw_lab: GatewayLab, gwa: NetnsThread, net: Any) -> None:
    vip = gw_lab.vip(next(_n))
    gwa.call(net.up, PathKey("s1", 1), PathSpec(1, vip, 24))
    with pytest.raises(PermanentBackendError, match="for path s1/1; two paths cannot share one IP"):
        gwa.call(net.up, PathKey("s2", 1), PathSpec(1, vip, 24))
    gwa.call(net.down, PathKey("s2", 1), None)          # never up for s2: nothing to do, s1 keeps it
    assert f"{vip}/24" in addrs(gw_lab, "gwa")
    gwa.call(net.down, PathKey("s1", 1), None)
    assert f"{vip}/24" not in addrs(gw_lab, "gwa")


# ------------------------------------------------------------------------------------------------ the mirror

MIRROR_NET = "198.19.253"      # only ever inside gwa's namespace


def kernel_addrs(gwa: NetnsThread) -> set[tuple[str, int, int, str | None]]:
    """Every IPv4 address of gwa's namespace, from a pyroute2 dump (what the backend read before the mirror)."""
    def dump() -> set[tuple[str, int, int, str | None]]:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            return {(str(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")), int(m["prefixlen"]), int(m["index"]),
                     m.get_attr("IFA_LABEL")) for m in ipr.get_addr(family=socket.AF_INET)}
    return gwa.call(dump)


def mirrored(state: Any) -> set[tuple[str, int, int, str | None]]:
    return {(a.ip, a.prefix, a.index, a.label) for a in state.addrs.values()}


def batch(ns: str, lines: list[str]) -> None:
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True, timeout=30)


def test_the_mirror_follows_the_kernel_and_dumps_again_after_an_overflow(
        gw_lab: GatewayLab, gwa: NetnsThread, monkeypatch: pytest.MonkeyPatch) -> None:
    import plugins.iproute as iproute
    monkeypatch.setattr(iproute, "MIRROR_RCVBUF", 4096)       # the smallest buffer: a burst overflows it
    ns = gw_lab.ns("gwa")
    mirror = iproute.AddressMirror("pa")
    try:
        state = gwa.call(mirror.refresh)
        assert mirror.resyncs == 1 and mirrored(state) == kernel_addrs(gwa)
        ip("addr", "add", f"{MIRROR_NET}.1/24", "dev", "eth0", "label", "eth0:pa", ns=ns)
        state = gwa.call(mirror.refresh)
        assert mirror.resyncs == 1 and (f"{MIRROR_NET}.1", 24) in {(a.ip, a.prefix) for a in state.addrs.values()}
        batch(ns, [f"addr add {MIRROR_NET}.{i}/24 dev eth0 label eth0:pa" for i in range(2, 202)])
        state = gwa.call(mirror.refresh)
        assert mirror.resyncs == 2, "200 notifications fit a 4 KiB buffer?"
        assert mirrored(state) == kernel_addrs(gwa)
        ip("addr", "del", f"{MIRROR_NET}.7/24", "dev", "eth0", ns=ns)
        batch(ns, [f"addr del {MIRROR_NET}.{i}/24 dev eth0" for i in range(150, 160)])
        state = gwa.call(mirror.refresh)
        assert mirrored(state) == kernel_addrs(gwa)
        assert not state.present(f"{MIRROR_NET}.7", "eth0") and state.present(f"{MIRROR_NET}.8", "eth0")
    finally:
        gwa.call(mirror.close)
        batch(ns, [f"addr del {MIRROR_NET}.{i}/24 dev eth0" for i in range(1, 202)
                   if f"{MIRROR_NET}.{i}/24" in addrs(gw_lab, "gwa")])


def test_up_writes_the_record_once_and_sees_what_others_changed_at_once(
        gw_lab: GatewayLab, gwa: NetnsThread, net: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import plugins.iproute as iproute
    writes: list[str] = []
    real = iproute._write_text
    monkeypatch.setattr(iproute, "_write_text", lambda path, text: writes.append(path) or real(path, text))
    ns = gw_lab.ns("gwa")
    vip = gw_lab.vip(next(_n))
    p, spec = PathKey("m1", 1), PathSpec(1, vip, 24)
    gwa.call(net.up, p, spec)
    assert len(writes) == 1
    rec = json.load(open(tmp_path / "iproute.json"))["addresses"]["m1/1"]
    assert rec["ip"] == vip and ("arping" in rec) is (not missing_tools("arping"))
    gwa.call(net.up, p, spec)
    assert len(writes) == 1                                        # idempotent: nothing written
    ip("addr", "del", f"{vip}/24", "dev", "eth0", ns=ns)           # an admin takes it away
    assert gwa.call(net.active) == frozenset()
    gwa.call(net.up, p, spec)
    assert gwa.call(net.active) == {p} and len(writes) == 2
    other = gw_lab.vip(next(_n))
    ip("addr", "add", f"{other}/24", "dev", "eth0", ns=ns)         # someone else's, just added
    with pytest.raises(PermanentBackendError, match="not added by pathagent"):
        gwa.call(net.up, PathKey("m2", 1), PathSpec(1, other, 24))
    assert len(writes) == 2
    ip("addr", "del", f"{other}/24", "dev", "eth0", ns=ns)
    gwa.call(net.down, p, spec)
    assert len(writes) == 3 and gwa.call(net.active) == frozenset()
