"""Smoke tests of the real-Consul lab (``lab.consul``): membership, KV across agents, failure detection with
the fast gossip settings, restart, freeze, netns mode, the CLI, and no leaked processes."""
from __future__ import annotations

import base64
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lab import proc
from lab.consul import (MEMBER_ALIVE, MEMBER_FAILED, ClientSpec, ConsulCluster, consul_binary, consul_missing,
                        http_json)

pytestmark = pytest.mark.consul
REPO = Path(__file__).resolve().parents[2]
Factory = Callable[..., ConsulCluster]


def kv_put(http: str, key: str, value: bytes) -> None:
    assert http_json(http, f"/v1/kv/{key}", method="PUT", data=value) is True


def kv_get(http: str, key: str) -> bytes:
    entries: list[dict[str, Any]] = http_json(http, f"/v1/kv/{key}")
    return base64.b64decode(entries[0]["Value"])


def test_one_server_two_clients_members_kv_freeze_and_clean_teardown(consul_cluster_factory: Factory) -> None:
    t0 = time.monotonic()
    c = consul_cluster_factory(clients=["ca", "cb"])
    print(f"1 server + 2 clients ready {time.monotonic() - t0:.2f}s after the call")
    assert c.names == ["s1", "ca", "cb"]
    for via in c.names:
        assert c.members(via=via) == {"s1": MEMBER_ALIVE, "ca": MEMBER_ALIVE, "cb": MEMBER_ALIVE}, via
    assert c.leader() == f"{c.node('s1').ip}:{c.node('s1').ports['server']}"
    assert len({c.http_address(n) for n in c.names}) == 3 and c.server_address == c.http_address("s1")

    kv_put(c.http_address("ca"), "lab/smoke", b"through ca")
    assert kv_get(c.http_address("cb"), "lab/smoke") == b"through ca"

    c.freeze("ca")
    with pytest.raises(OSError):
        http_json(c.http_address("ca"), "/v1/agent/self", timeout=0.3)
    c.thaw("ca")
    assert http_json(c.http_address("ca"), "/v1/agent/self", timeout=2)["Config"]["NodeName"] == "ca"

    pids = [c.pid(n) for n in c.names]
    assert all(p is not None and proc.alive(p) for p in pids)
    c.teardown()
    assert not any(p is not None and proc.alive(p) for p in pids), "teardown left an agent running"
    c.teardown()    # idempotent


def test_killed_client_is_failed_within_six_seconds_and_restarts(consul_cluster_factory: Factory) -> None:
    c = consul_cluster_factory(clients=["ca", "cb"])
    pid = c.pid("cb")
    assert pid is not None
    t0 = time.monotonic()
    c.kill("cb")
    assert not proc.alive(pid) and not c.running("cb")
    took = c.wait_member_status("cb", MEMBER_FAILED, timeout=6.0)
    print(f"killed client marked failed after {time.monotonic() - t0:.2f}s (wait {took:.2f}s)")
    assert c.member_status("cb", via="ca") in (MEMBER_FAILED, MEMBER_ALIVE)    # ca may lag, never "left"
    assert c.member_status("ca") == MEMBER_ALIVE

    took = c.restart("cb")
    print(f"restarted client ready again after {took:.2f}s")
    assert c.pid("cb") != pid and c.member_status("cb") == MEMBER_ALIVE
    assert "start #2 of cb" in c.log_path("cb").read_text()


# --- netns mode: a bridge in the root namespace and one namespace with a client agent --------------------

def _used_networks() -> list[ipaddress.IPv4Network]:
    out: list[ipaddress.IPv4Network] = []
    for argv in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        for line in subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines():
            parts = line.split()
            word = parts[parts.index("inet") + 1] if "inet" in parts else parts[0]
            if word[0].isdigit():
                out.append(ipaddress.IPv4Interface(word if "/" in word else f"{word}/32").network)
    return out


@contextlib.contextmanager
def bridge_with_namespace() -> Iterator[tuple[str, str, str]]:
    """A root-namespace bridge at 198.19.X.1/24 (X from 77 up, free on this host) and one namespace whose
    eth0 is 198.19.X.11; yields (bridge ip, namespace, namespace ip); everything is removed afterwards."""
    tag = f"cs{os.getpid() % 100000}"
    bridge, veth, ns = f"{tag}br", f"{tag}c1", f"{tag}-c1"
    created: list[list[str]] = []

    def ip(*args: str, undo: list[str] | None = None) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)
        if undo:
            created.append(undo)

    with open("/run/pathagent-lab.lock", "a") as lk:         # the host-wide lab lock (also lab.netns)
        fcntl.flock(lk, fcntl.LOCK_EX)
        used = _used_networks()
        net = next(n for x in range(77, 256) if not any((n := ipaddress.ip_network(f"198.19.{x}.0/24")).overlaps(u)
                                                        for u in used))
        host_ip, ns_ip = str(net.network_address + 1), str(net.network_address + 11)
        try:
            ip("link", "add", bridge, "type", "bridge", undo=["link", "del", bridge])
            ip("addr", "add", f"{host_ip}/24", "dev", bridge)
            ip("link", "set", bridge, "up")
            ip("netns", "add", ns, undo=["netns", "del", ns])
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns, undo=["link", "del", veth])
            ip("link", "set", veth, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            for undo in reversed(created):
                subprocess.run(["ip", *undo], capture_output=True)
            raise
    try:
        yield host_ip, ns, ns_ip
    finally:
        for undo in reversed(created):
            subprocess.run(["ip", *undo], capture_output=True, timeout=10)


def test_netns_mode_client_in_its_own_namespace(consul_cluster_factory: Factory) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("netns mode needs root and iproute2 (ip netns)")
    with bridge_with_namespace() as (host_ip, ns, ns_ip):
        c = consul_cluster_factory(clients=[ClientSpec("gwa", ns_ip, ns)], mode="netns", server_ip=host_ip)
        try:
            assert c.http_address("gwa") == f"{ns_ip}:8500"
            assert c.server_address.startswith(f"{host_ip}:")
            assert c.members(via="gwa") == {"s1": MEMBER_ALIVE, "gwa": MEMBER_ALIVE}
            kv_put(c.http_address("gwa"), "lab/netns", b"from the namespace")
            assert kv_get(c.server_address, "lab/netns") == b"from the namespace"
            # inside the namespace the agent also answers on 127.0.0.1:8500
            r = subprocess.run(["ip", "netns", "exec", ns, consul_binary(), "kv", "get",
                                "-http-addr=http://127.0.0.1:8500", "lab/netns"], capture_output=True, text=True,
                               timeout=10)
            assert r.stdout.strip() == "from the namespace", r.stderr
            pid = c.pid("gwa")
            assert pid is not None
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino, "agent not in the ns"
            c.kill("gwa")
            c.wait_member_status("gwa", MEMBER_FAILED, timeout=6.0)
        finally:
            c.teardown()        # before the namespace goes


def test_cli_start_writes_cluster_json_and_stop_ends_everything(tmp_path: Path) -> None:
    reason = consul_missing()
    if reason:
        pytest.skip(f"real Consul needed: {reason}")
    env = dict(os.environ, PYTHONPATH=str(REPO / "scripts"))
    wd = tmp_path / "cli"
    owner = subprocess.Popen([sys.executable, "-m", "lab.consul", "start", str(wd), "--clients", "ca,cb"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = wd / "cluster.json"
    pids: list[int] = []
    try:
        end = time.monotonic() + 20
        while not state.exists() and owner.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert state.exists(), f"no cluster.json; rc={owner.poll()}"
        info = json.loads(state.read_text())
        assert info["owner_pid"] == owner.pid and set(info["nodes"]) == {"s1", "ca", "cb"}
        pids = [n["pid"] for n in info["nodes"].values()]
        members = http_json(info["nodes"]["ca"]["http"], "/v1/agent/members")
        assert {m["Name"]: m["Status"] for m in members} == {"s1": 1, "ca": 1, "cb": 1}
        r = subprocess.run([sys.executable, "-m", "lab.consul", "stop", str(wd)], env=env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert owner.wait(5) == 0
        assert not state.exists()
        assert not any(proc.alive(p) for p in pids), "an agent survived `lab.consul stop`"
    finally:
        if owner.poll() is None:
            owner.send_signal(signal.SIGTERM)
            owner.wait(10)
        out, err = owner.communicate()
        print(out, err)
