"""The shipped Consul agent configs (``etc/consul/gateway.json``, ``etc/consul/server.json``): Consul 1.8.7
accepts them, they agree with each other and with the agent's timing defaults, and the lab's agents run with
exactly their timing (so what the benchmarks measure and the other tests exercise is what is shipped)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import PET_BUDGET, Config, ConsulConfig, fencing_problems
from lab.consul import ConsulCluster, consul_binary, consul_missing, http_json, shipped_config

pytestmark = pytest.mark.consul
REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc" / "consul"
ROLES = ("gateway", "server")


def seconds(go: str) -> float:
    """A Go duration ("500ms", "1s", "1m30s") in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", go)
    assert parts and "".join(n + u for n, u in parts) == go, f"not a Go duration: {go!r}"
    return sum(float(n) * units[u] for n, u in parts)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([consul_binary(), "validate", str(path)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def binary() -> str:
    reason = consul_missing()
    if reason:
        pytest.skip(f"real Consul needed: {reason}")
    return consul_binary()


@pytest.mark.parametrize("role", ROLES)
def test_consul_validate_accepts_the_shipped_config(binary: str, role: str) -> None:
    r = validate(ETC / f"{role}.json")
    assert r.returncode == 0 and "Configuration is valid" in r.stdout, r.stdout + r.stderr


def test_consul_validate_refuses_what_1_8_7_does_not_know(binary: str, tmp_path: Path) -> None:
    """The control for the test above: validation really reads the gossip block (1.8.7 has no
    suspicion_max_timeout_mult) and the performance block (raft_multiplier is 1..10)."""
    for block, key, value, said in (("gossip_lan", "suspicion_max_timeout_mult", 6, "suspicion_max_timeout_mult"),
                                    ("performance", "raft_multiplier", 0, "raft_multiplier")):
        cfg = shipped_config("server")
        cfg[block] = {**cfg.get(block, {}), key: value}
        bad = tmp_path / f"{block}.json"
        bad.write_text(json.dumps(cfg))
        r = validate(bad)
        assert r.returncode != 0 and said in r.stdout + r.stderr, r.stdout + r.stderr


def test_shipped_configs_agree_with_each_other_and_with_the_agent() -> None:
    gw, sv = shipped_config("gateway"), shipped_config("server")
    assert gw["server"] is False and sv["server"] is True
    assert gw["gossip_lan"] == sv["gossip_lan"], "every agent probes: the gossip timing must be the same on all"
    assert gw["leave_on_terminate"] is False, "a SIGTERM of a gateway's Consul agent must not be a leave"
    assert sv["performance"]["raft_multiplier"] == 1, "election_stall was measured with raft_multiplier 1"
    assert gw["performance"]["rpc_hold_timeout"] == sv["performance"]["rpc_hold_timeout"]
    # a held RPC answers an HTTP call only while the call waits: holding far longer than the agent's
    # timeout only delays the answer after an election (the re-check jitter is rpc_hold_timeout / 16)
    assert seconds(sv["performance"]["rpc_hold_timeout"]) <= 2 * ConsulConfig.timeout
    c = ConsulConfig()
    if c.session_ttl > 0:
        assert seconds(sv["session_ttl_min"]) <= c.session_ttl, "the servers would refuse the agent's session"
    assert fencing_problems(Config()) == [], "the shipped defaults satisfy docs/fencing.md's inequalities"
    assert c.fence_after > c.election_stall + c.confirm_interval + PET_BUDGET
    assert gw["client_addr"].split()[0] == c.host, "the agent's default address is the local agent's"


def _camel(key: str) -> str:
    return "".join(w.capitalize() for w in key.split("_"))


def test_lab_agents_run_with_the_shipped_timing(consul_cluster_factory: Callable[..., ConsulCluster]) -> None:
    """Read back from the running agents (``/v1/agent/self`` DebugConfig), not from the lab's own dicts."""
    c = consul_cluster_factory(clients=["gwa"], servers=1)
    for name, role in (("s1", "server"), ("gwa", "gateway")):
        want = shipped_config(role)
        dbg: dict[str, Any] = http_json(c.http_address(name), "/v1/agent/self", timeout=5)["DebugConfig"]
        assert dbg["ServerMode"] is (role == "server")
        for k, v in want["gossip_lan"].items():
            got = dbg[f"GossipLAN{_camel(k)}"]
            assert (seconds(got) if isinstance(v, str) else got) == (seconds(v) if isinstance(v, str) else v), \
                f"{name}: gossip_lan.{k} is {got}, shipped {v}"
        assert seconds(dbg["RPCHoldTimeout"]) == seconds(want["performance"]["rpc_hold_timeout"]), name
        assert dbg["LeaveOnTerm"] is want["leave_on_terminate"], name
        if role == "server":
            mult = want["performance"]["raft_multiplier"]
            assert seconds(dbg["ConsulRaftHeartbeatTimeout"]) == 1.0 * mult, "raft_multiplier not applied"
            assert seconds(dbg["ConsulRaftElectionTimeout"]) == 1.0 * mult
            assert seconds(dbg["SessionTTLMin"]) == seconds(want["session_ttl_min"])
