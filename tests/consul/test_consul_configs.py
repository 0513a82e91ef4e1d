"""The Consul agent configs: the shipped examples (``etc/consul/gateway.json``, ``etc/consul/server.json``)
and what ``pathagent consul-config`` generates (``agent.core.consulconf``).

- Consul 1.8.7 accepts the shipped files and every generated one (server and client, with and without
  gossip encryption, ACLs, TLS), and refuses what it does not know (the control);
- the shipped configs agree with each other and with the agent's timing defaults;
- the lab's agents (``lab.consul``, which runs generated configs) run with exactly the generated timing,
  read back from the running agents;
- neither SIGTERM nor SIGINT (Debian's ``consul.service`` stops with SIGINT) makes a gateway's agent leave;
- a cluster with gossip encryption, RPC TLS and ACLs (default deny) runs two ``pathagent run`` agents with
  tokens of the shipped policies ``etc/consul/acl/*.hcl`` (created with the commands docs/consul.md
  gives), the CLI works with the CLI policy, each rule of the agent policy is needed, and what the
  policies do not grant is refused;
- a gateway's Consul agent reinstalled under the same name with a new node ID (docs/consul.md, "Replacing
  a gateway"): accepted once the old member is failed, refused by the catalog when it is back before that,
  and the remedy works. (``consul force-leave -prune`` is not part of a replacement: measured in two
  runs, it delayed the new member's ``serfHealth`` by 53-58 s, until the leader's next reconcile.)
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

import pytest
import requests

from agent.cli import consulconfig
from agent.config import PET_BUDGET, Config, ConsulConfig, fencing_problems
from agent.core import consulconf
from agent.core.consulconf import TlsFiles
from lab import proc
from lab.agents import AgentProc, Catalog, definition, wait_for
from lab.consul import (MEMBER_ALIVE, MEMBER_FAILED, MEMBER_LEFT, ConsulCluster, consul_binary, consul_missing,
                        http_json, shipped_config)

pytestmark = pytest.mark.consul
REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc" / "consul"
ACL = ETC / "acl"
ROLES = ("gateway", "server")
Factory = Callable[..., ConsulCluster]


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


def consul_config(argv: list[str]) -> int:
    """``pathagent consul-config ARGV`` in this process (the command's own parser and handler)."""
    parser = argparse.ArgumentParser(prog="pathagent")
    sub = parser.add_subparsers(dest="command", required=True)
    consulconfig.register(sub)
    args = parser.parse_args(["consul-config", *argv])
    code: int = args.func(args, None)
    return code


# --- what Consul accepts --------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_consul_validate_accepts_the_shipped_config(binary: str, role: str) -> None:
    r = validate(ETC / f"{role}.json")
    assert r.returncode == 0 and "Configuration is valid" in r.stdout, r.stdout + r.stderr


OPTION_SETS = {
    "plain": [],
    "encrypted": ["--encrypt-file", "{key}"],
    "acl": ["--acl"],
    "acl-tokens": ["--acl", "--agent-token-file", "{token}"],
    "tls": ["--tls-ca", "/etc/consul.d/tls/ca.pem", "--tls-cert", "/etc/consul.d/tls/agent.pem",
            "--tls-key", "/etc/consul.d/tls/agent-key.pem"],
    "https": ["--tls-ca", "/etc/consul.d/tls/ca.pem", "--tls-cert", "/etc/consul.d/tls/agent.pem",
              "--tls-key", "/etc/consul.d/tls/agent-key.pem", "--https"],
    "everything": ["--encrypt-file", "{key}", "--acl", "--agent-token-file", "{token}", "--datacenter", "west",
                   "--primary-datacenter", "east", "--tls-ca", "/etc/consul.d/tls/ca.pem", "--tls-cert",
                   "/etc/consul.d/tls/agent.pem", "--tls-key", "/etc/consul.d/tls/agent-key.pem", "--https",
                   "--advertise", "192.0.2.11", "--client-addr", "127.0.0.1 10.0.0.11", "--data-dir",
                   "/srv/consul", "--port", "dns=-1"],
}


@pytest.mark.parametrize("options", sorted(OPTION_SETS))
@pytest.mark.parametrize("role", ("client", "server"))
def test_consul_validate_accepts_every_generated_config(binary: str, tmp_path: Path, role: str,
                                                         options: str) -> None:
    key = tmp_path / "gossip.key"
    key.write_text(subprocess.run([binary, "keygen"], capture_output=True, text=True, check=True).stdout)
    token = tmp_path / "agent.token"
    token.write_text(str(uuid.uuid4()) + "\n")
    master = tmp_path / "master.token"
    master.write_text(str(uuid.uuid4()) + "\n")
    extra = [a.format(key=key, token=token) for a in OPTION_SETS[options]]
    if role == "server":
        extra += ["--bootstrap-expect", "3"] + (["--master-token-file", str(master)] if "--acl" in extra else [])
    out = tmp_path / f"{role}-{options}.json"
    node, bind = ("s1", "10.0.0.1") if role == "server" else ("gw1", "10.0.0.11")
    argv = [f"--{role}", "--node", node, "--bind", bind, "--join", "10.0.0.1", "--join", "10.0.0.2:8301",
            "--join", "consul-3.example.net", *extra, "--out", str(out)]
    assert consul_config(argv) == 0
    r = validate(out)
    assert r.returncode == 0 and "Configuration is valid" in r.stdout, r.stdout + r.stderr + out.read_text()
    doc = json.loads(out.read_text())
    assert doc["gossip_lan"] == dict(consulconf.GOSSIP_LAN) and doc["node_name"] == node


def test_consul_validate_refuses_what_1_8_7_does_not_know(binary: str, tmp_path: Path) -> None:
    """The control for the tests above: validation really reads the gossip block (1.8.7 has no
    suspicion_max_timeout_mult), the performance block (raft_multiplier is 1..10) and the key."""
    for block, key, value, said in (("gossip_lan", "suspicion_max_timeout_mult", 6, "suspicion_max_timeout_mult"),
                                    ("performance", "raft_multiplier", 0, "raft_multiplier")):
        cfg = shipped_config("server")
        cfg[block] = {**cfg.get(block, {}), key: value}
        bad = tmp_path / f"{block}.json"
        bad.write_text(json.dumps(cfg))
        r = validate(bad)
        assert r.returncode != 0 and said in r.stdout + r.stderr, r.stdout + r.stderr
    bad = tmp_path / "key.json"
    bad.write_text(json.dumps({**shipped_config("gateway"), "encrypt": "not base64!"}))
    r = validate(bad)
    assert r.returncode != 0 and "encrypt" in r.stdout + r.stderr


def test_shipped_configs_agree_with_each_other_and_with_the_agent() -> None:
    gw, sv = shipped_config("gateway"), shipped_config("server")
    assert gw["server"] is False and sv["server"] is True
    assert gw["gossip_lan"] == sv["gossip_lan"], "every agent probes: the gossip timing must be the same on all"
    assert gw["leave_on_terminate"] is False, "a SIGTERM of a gateway's Consul agent must not be a leave"
    assert gw["skip_leave_on_interrupt"] is True, "nor a SIGINT (Debian's consul.service: KillSignal=SIGINT)"
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


def test_lab_agents_run_generated_configs_with_the_shipped_timing(consul_cluster_factory: Factory) -> None:
    """Read back from the running agents (``/v1/agent/self`` DebugConfig), not from the lab's own dicts;
    and each agent's config file is the generator's document plus the lab's log level."""
    c = consul_cluster_factory(clients=["gwa"], servers=1)
    roles: tuple[tuple[str, Literal["server", "gateway"]], ...] = (("s1", "server"), ("gwa", "gateway"))
    for name, role in roles:
        n = c.node(name)
        written = json.loads(n.config.read_text())
        assert written.pop("log_level") == "INFO"
        assert written == consulconf.render(c.spec(n)), name
        assert validate(n.config).returncode == 0, name
        want = shipped_config(role)
        dbg: dict[str, Any] = http_json(c.http_address(name), "/v1/agent/self", timeout=5)["DebugConfig"]
        assert dbg["ServerMode"] is (role == "server")
        for k, v in want["gossip_lan"].items():
            got = dbg[f"GossipLAN{_camel(k)}"]
            assert (seconds(got) if isinstance(v, str) else got) == (seconds(v) if isinstance(v, str) else v), \
                f"{name}: gossip_lan.{k} is {got}, shipped {v}"
        assert seconds(dbg["RPCHoldTimeout"]) == seconds(want["performance"]["rpc_hold_timeout"]), name
        assert dbg["LeaveOnTerm"] is want["leave_on_terminate"], name
        assert dbg["SkipLeaveOnInt"] is want["skip_leave_on_interrupt"] is True, name
        if role == "server":
            mult = want["performance"]["raft_multiplier"]
            assert seconds(dbg["ConsulRaftHeartbeatTimeout"]) == 1.0 * mult, "raft_multiplier not applied"
            assert seconds(dbg["ConsulRaftElectionTimeout"]) == 1.0 * mult
            assert seconds(dbg["SessionTTLMin"]) == seconds(want["session_ttl_min"])


@pytest.mark.parametrize("skip_leave,status", [(True, MEMBER_FAILED), (False, MEMBER_LEFT)])
def test_sigint_of_a_gateways_agent_is_no_leave(consul_cluster_factory: Factory, skip_leave: bool,
                                                status: int) -> None:
    """``systemctl stop consul`` on Debian sends SIGINT: with the generated config the cluster sees a
    failure (the session survives a restart that is back within the detection time); the control,
    Consul's client default, is a graceful leave (the session and every path would go at once)."""
    extra = {} if skip_leave else {"skip_leave_on_interrupt": False}
    c = consul_cluster_factory(clients=["gwa", "gwb"], extra_config=extra)
    pid = c.pid("gwa")
    assert pid is not None
    proc.signal_checked(pid, signal.SIGINT, c.node("gwa").needle)
    assert proc.wait_dead(pid, 10)
    c.wait_member_status("gwa", status, timeout=10)
    time.sleep(1.0)
    assert c.member_status("gwa") == status


# --- a secure cluster: encryption, TLS, ACLs with the shipped policies -------------------------------------

def _tls(binary: str, d: Path) -> dict[str, TlsFiles]:
    """A CA and one server and one client certificate (``consul tls``), as docs/consul.md makes them."""
    d.mkdir()
    for argv in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"], ["cert", "create", "-client", "-dc", "dc1"]):
        subprocess.run([binary, "tls", *argv], cwd=d, check=True, capture_output=True, timeout=30)
    ca = str(d / "consul-agent-ca.pem")
    return {"server": TlsFiles(ca, str(d / "dc1-server-consul-0.pem"), str(d / "dc1-server-consul-0-key.pem")),
            "client": TlsFiles(ca, str(d / "dc1-client-consul-0.pem"), str(d / "dc1-client-consul-0-key.pem"))}


class Acls:
    """Policies and tokens made with the ``consul acl`` commands of docs/consul.md."""

    def __init__(self, cluster: ConsulCluster, tmp: Path) -> None:
        self.c, self.tmp = cluster, tmp

    def consul(self, *argv: str, http: str | None = None) -> str:
        env = {**self.c.cli_env(), "CONSUL_HTTP_ADDR": f"http://{http or self.c.server_address}"}
        r = subprocess.run([self.c.binary, *argv], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, f"consul {' '.join(argv)}: {r.stdout}{r.stderr}"
        return r.stdout

    def policy(self, name: str, rules: str) -> None:
        f = self.tmp / f"{name}.hcl"
        f.write_text(rules)
        self.consul("acl", "policy", "create", "-name", name, "-rules", f"@{f}")

    def token(self, *argv: str) -> str:
        out = json.loads(self.consul("acl", "token", "create", *argv, "-format=json"))
        return str(out["SecretID"])

    def token_file(self, name: str, secret: str) -> Path:
        f = self.tmp / f"{name}.token"
        f.write_text(secret + "\n")
        f.chmod(0o600)
        return f


def agent_rules(node: str) -> str:
    """The shipped agent policy for ``node`` (the substitution docs/consul.md gives)."""
    return (ACL / "pathagent-agent.hcl").read_text().replace("@NODE@", node)


def _call(http: str, method: str, path: str, token: str, body: Any = None) -> requests.Response:
    return requests.request(method, f"http://{http}{path}", headers={"X-Consul-Token": token}, timeout=5,
                            data=None if body is None else (body if isinstance(body, bytes) else json.dumps(body)))


def test_a_secure_cluster_runs_agents_and_the_cli_with_the_shipped_policies(
        consul_cluster_factory: Factory, binary: str, tmp_path: Path) -> None:
    key = subprocess.run([binary, "keygen"], capture_output=True, text=True, check=True).stdout.strip()
    master = str(uuid.uuid4())
    t0 = time.monotonic()
    c = consul_cluster_factory(clients=["gwa", "gwb"], encrypt=key, acl_master_token=master,
                               tls=_tls(binary, tmp_path / "tls"))
    took = time.monotonic() - t0
    for name in c.names:
        dbg = http_json(c.http_address(name), "/v1/agent/self", timeout=5, token=master)["DebugConfig"]
        assert dbg["ACLsEnabled"] is True and dbg["ACLDefaultPolicy"] == "deny", name
        assert dbg["VerifyOutgoing"] is True and dbg["VerifyIncomingRPC"] is True, name
        assert dbg["VerifyServerHostname"] is True, name
        assert validate(c.node(name).config).returncode == 0, name
    stats = http_json(c.http_address("gwa"), "/v1/agent/self", timeout=5, token=master)["Stats"]
    assert stats["serf_lan"]["encrypted"] == "true"
    print(f"\nencrypted, TLS and ACL cluster (1 server, 2 clients) ready in {took:.1f} s")
    # anonymous: nothing
    anon = _call(c.http_address("gwa"), "GET", "/v1/agent/members", "")
    assert anon.status_code == 403 or anon.json() == [], anon.text
    assert _call(c.http_address("gwa"), "PUT", "/v1/kv/pathagent/x", "", b"1").status_code == 403

    acls = Acls(c, tmp_path)
    # the Consul agents' own tokens: a node identity each, set on the running agent (persisted)
    for n in ("gwa", "gwb"):
        acls.consul("acl", "set-agent-token", "agent", acls.token("-description", f"consul agent {n}",
                                                                  "-node-identity", f"{n}:dc1"),
                    http=c.http_address(n))
    tokens = {}
    for n in ("gwa", "gwb"):
        acls.policy(f"pathagent-agent-{n}", agent_rules(n))
        tokens[n] = acls.token_file(n, acls.token("-description", f"pathagent on {n}", "-policy-name",
                                                  f"pathagent-agent-{n}"))
    acls.policy("pathagent-cli", (ACL / "pathagent-cli.hcl").read_text())
    cli_token = acls.token_file("cli", acls.token("-description", "pathagent CLI", "-policy-name", "pathagent-cli"))

    # two agents, each with its token; three disks started (with the CLI token, as `disk start` would)
    catalog = Catalog(tmp_path / "catalog.json")
    disks = {"d1": 2, "d2": 2, "d3": 2}
    ops: list[dict[str, Any]] = []
    for d, count in disks.items():
        catalog.add(d, definition(d, count))
        rec = base64.b64encode(json.dumps({"pool": "rbd", "image": f"pathagent-{d}"}).encode()).decode()
        ops.append({"KV": {"Verb": "set", "Key": f"pathagent/disks/{d}", "Value": rec}})
        ops += [{"KV": {"Verb": "set", "Key": f"pathagent/disks/{d}/{i}", "Value": ""}} for i in range(1, count + 1)]
    r = _call(c.http_address("gwa"), "PUT", "/v1/txn", cli_token.read_text().strip(), ops)
    assert r.status_code == 200, r.text
    assert _call(c.http_address("gwa"), "GET", "/v1/kv/pathagent/?recurse=true", "").status_code == 404, \
        "an anonymous read sees none of the keys"
    agents = {n: AgentProc(n, tmp_path, c.http_address(n), catalog.path, lock_delay=10.0, fence_after=4.0)
              for n in ("gwa", "gwb")}
    for n, a in agents.items():
        a.extra_consul(f'token_file = "{tokens[n]}"\n')
        a.start()
    try:
        def owners() -> dict[str, str | None]:
            entries = _call(c.server_address, "GET", "/v1/kv/pathagent/disks/?recurse=true", master).json()
            return {e["Key"][len("pathagent/disks/"):]: e.get("Session") for e in entries
                    if e["Key"].count("/") == 3}
        wait_for(lambda: len(owners()) == 6 and all(owners().values())
                 and sum(len(a.exported()) for a in agents.values()) == 6, 30, what="6 paths served under ACLs",
                 alive=list(agents.values()))
        sessions = {n: a.session() for n, a in agents.items()}
        assert set(owners().values()) <= set(sessions.values())
        for n, a in agents.items():
            assert "permission denied" not in a.log_text(), a.log_text()[-2000:]
        checks = {ch["CheckID"]: ch["Status"] for ch in
                  _call(c.server_address, "GET", "/v1/health/node/gwa", master).json()}
        assert checks.get("pathagent-alive") == "passing" and checks.get("serfHealth") == "passing", checks

        # the CLI with the CLI token (its config is the agent's with the other token file)
        cli_cfg = tmp_path / "cli.toml"
        cli_cfg.write_text(agents["gwa"].config.read_text().replace(str(tokens["gwa"]), str(cli_token)))

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*consul_cli(), "--config", str(cli_cfg), *argv], capture_output=True,
                                  text=True, timeout=60, cwd=REPO)
        rows = json.loads(cli("paths", "--json").stdout)
        assert len(rows) == 6 and {x["node"] for x in rows} <= {"gwa", "gwb"} and all(x["state"] == "held" for x in rows)
        nodes = json.loads(cli("nodes", "--json").stdout)
        assert {x["node"]: x["live"] for x in nodes} == {"gwa": True, "gwb": True}
        moved = next(x for x in rows if x["node"] == "gwa")
        mv = cli("path", "move", f"{moved['disk']}/{moved['index']}", "gwb", "--timeout", "30")
        assert mv.returncode == 0, mv.stderr
        assert f"{moved['disk']}/{moved['index']}" in agents["gwb"].exported()
        status = cli("--json", "status")
        assert "permission denied" not in status.stderr and json.loads(status.stdout)["sessions"], status.stderr
        drained = cli("node", "drain", "gwb", "--wait", "--timeout", "40", "--json")
        assert drained.returncode == 0, drained.stderr
        assert len(agents["gwb"].exported()) == 0 and len(agents["gwa"].exported()) == 6
        assert cli("node", "undrain", "gwb").returncode == 0

        # what the policies do not grant
        ta, tc = tokens["gwa"].read_text().strip(), cli_token.read_text().strip()
        gwa = c.http_address("gwa")
        assert _call(gwa, "PUT", "/v1/kv/other/x", ta, b"1").status_code == 403
        assert _call(gwa, "PUT", "/v1/kv/other/x", tc, b"1").status_code == 403
        assert _call(gwa, "PUT", "/v1/session/create", ta, {"Node": "gwb", "Name": "x"}).status_code == 403, \
            "gwa's agent may not make sessions on gwb"
        assert _call(gwa, "PUT", "/v1/session/destroy/" + str(sessions["gwb"]), ta).status_code == 403
        assert _call(c.http_address("gwb"), "GET", "/v1/agent/self", ta).status_code == 403
        assert _call(gwa, "PUT", "/v1/acl/token", tc, {"Description": "x"}).status_code == 403

        # each rule of the agent policy is needed: without it, the call the agent makes is refused
        probes = {
            "key_prefix": ("PUT", "/v1/kv/pathagent/probe", b"1"),
            "session": ("PUT", "/v1/session/create", {"Node": "gwa", "Name": "probe", "Checks": ["serfHealth"]}),
            "node": ("PUT", "/v1/agent/check/register", {"ID": "probe", "Name": "probe", "TTL": "10s"}),
            "agent": ("GET", "/v1/agent/self", None),
        }
        full = agent_rules("gwa")
        blocks = re.findall(r'^(\w+) "[^"]*" \{\n.*?\n\}\n', full, flags=re.M | re.S)
        assert sorted(blocks) == sorted(probes), blocks
        for rule, (method, path, body) in probes.items():
            assert _call(gwa, method, path, ta, body).status_code == 200, f"{rule}: the full policy allows it"
            less = re.sub(rf'^{rule} "[^"]*" \{{\n.*?\n\}}\n', "", full, flags=re.M | re.S)
            acls.policy(f"without-{rule}", less)
            t = acls.token("-policy-name", f"without-{rule}")
            assert _call(gwa, method, path, t, body).status_code == 403, f"{rule} is not needed?"
        _call(gwa, "PUT", "/v1/agent/check/deregister/probe", master)
    finally:
        for a in agents.values():
            a.stop()


def consul_cli() -> list[str]:
    return [str(REPO / ".venv" / "bin" / "python"), "-m", "agent.cli"]


# --- a gateway's Consul agent reinstalled under its name -------------------------------------------------

def _session(c: ConsulCluster, node: str) -> str:
    body = json.dumps({"Name": "iSCSITarget", "Node": node, "Checks": ["serfHealth"], "LockDelay": "1s"}).encode()
    return str(http_json(c.http_address(node), "/v1/session/create", method="PUT", data=body, timeout=5)["ID"])


def test_a_reinstalled_gateways_consul_agent_rejoins_under_its_name(consul_cluster_factory: Factory) -> None:
    """The procedure of docs/consul.md: the old agent is gone (and seen failed) before the new one starts.
    The new agent has a new node ID (fresh data dir); the servers accept it under the old name, the old
    member's sessions are gone, and the new node can hold a session at once."""
    c = consul_cluster_factory(clients=["gwa", "gwb"])
    old_id = c.node_id("gwa")
    old_session = _session(c, "gwa")
    t0 = time.monotonic()
    c.wipe("gwa")                                    # kill -9 + a fresh data dir: a reinstalled host
    c.wait_member_status("gwa", MEMBER_FAILED, timeout=10)
    failed = time.monotonic() - t0
    wait_for(lambda: old_session not in {s["ID"] for s in c.sessions()}, 5, what="the old session invalidated")
    took = c.restart("gwa", timeout=30)
    new_id = c.node_id("gwa")
    assert new_id != old_id, "a wiped data dir must give a new node ID"
    wait_for(lambda: c.catalog_node_id("gwa") == new_id, 10, what="the catalog to take the new node ID")
    assert c.member_status("gwa") == MEMBER_ALIVE
    assert "is reserved by node" not in c.log_tail("s1", 200)
    new_session = _session(c, "gwa")
    assert {s["ID"] for s in c.sessions() if s["Node"] == "gwa"} == {new_session}
    print(f"\nold member failed {failed:.2f} s after the kill; the reinstalled agent was ready {took:.2f} s after "
          f"its start, catalog ID {old_id[:8]} -> {new_id[:8]}")


def test_a_gateway_back_before_its_old_member_failed_is_refused_until_restarted(
        consul_cluster_factory: Factory) -> None:
    """Faster than failure detection (~1.5 s): the new agent takes over the old member (same name and
    address), so the old one never fails and the catalog keeps the old node ID: every sync of the new
    agent is refused ("Node name gwa is reserved by node <old ID>"), so its checks never reach the servers.
    The remedy of docs/consul.md: stop it until the member shows failed, then start it again."""
    c = consul_cluster_factory(clients=["gwa", "gwb"])
    old_id = c.node_id("gwa")
    c.wipe("gwa")
    c.restart("gwa", timeout=30)                     # at once: before the servers noticed
    new_id = c.node_id("gwa")
    assert new_id != old_id
    wait_for(lambda: "is reserved by node" in c.log_tail("gwa", 200), 15,
             what="the servers to refuse the new node ID")
    assert c.catalog_node_id("gwa") == old_id
    time.sleep(3.0)
    assert c.catalog_node_id("gwa") == old_id, "refused for good, not only at the first sync"
    # the remedy
    c.stop("gwa")
    c.wait_member_status("gwa", MEMBER_FAILED, timeout=10)
    c.restart("gwa", timeout=30)
    wait_for(lambda: c.catalog_node_id("gwa") == new_id, 15, what="the catalog to take the new node ID")
    assert c.member_status("gwa") == MEMBER_ALIVE
    _session(c, "gwa")
