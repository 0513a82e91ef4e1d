"""``agent.core.consulconf`` (the Consul agent configs as data) and ``pathagent consul-config``
(``agent.cli.consulconfig``): the shipped example files are what the generator makes, the tuning is the
same everywhere, every bad argument is named with exit 2 before any file is read, secrets stay out of
messages and out of stdout with ``--out``, and ``--out`` writes atomically with mode 0600. ``consul
validate`` of the generated files runs in tests/consul/test_consul_configs.py."""
from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.cli import consulconfig
from agent.core import consulconf
from agent.core.consulconf import AgentSpec, TlsFiles

REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc" / "consul"
KEY = "Y5x3xeqdOce7MopWOSlR6gN5/3+IrETLYhOjym5spw0="          # 32 bytes, as `consul keygen` prints
TOKEN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
MASTER = "11111111-2222-3333-4444-555555555555"


def spec(**kw: Any) -> AgentSpec:
    base: dict[str, Any] = {"server": False, "node": "gw1", "bind": "10.0.0.11", "join": ("10.0.0.1",)}
    return AgentSpec(**{**base, **kw})


# --- the shipped files and the tuning ---------------------------------------------------------------

@pytest.mark.parametrize("server,name", [(False, "gateway.json"), (True, "server.json")])
def test_the_shipped_files_are_the_generators_template(server: bool, name: str) -> None:
    shipped = json.loads((ETC / name).read_text())
    want = consulconf.template(server)
    assert shipped == want, (f"etc/consul/{name} drifted from agent.core.consulconf; regenerate it:\n"
                             f"{json.dumps(want, indent=2)}")


def test_every_generated_config_carries_the_tuning_of_its_role() -> None:
    for server in (False, True):
        doc = consulconf.render(spec(server=server, node="s1" if server else "gw1"))
        assert doc["gossip_lan"] == dict(consulconf.GOSSIP_LAN), "every agent probes: the same gossip everywhere"
        assert doc["performance"]["rpc_hold_timeout"] == consulconf.RPC_HOLD_TIMEOUT
        assert doc["leave_on_terminate"] is False and doc["skip_leave_on_interrupt"] is True, \
            "neither SIGTERM nor SIGINT (Debian's consul.service) may be a graceful leave"
        assert doc["disable_update_check"] is True
        assert ("raft_multiplier" in doc["performance"]) is server
        assert ("session_ttl_min" in doc) is server
        assert ("bootstrap_expect" in doc) is server
    srv = consulconf.render(spec(server=True, node="s1"))
    assert srv["performance"]["raft_multiplier"] == 1 and srv["session_ttl_min"] == "10s"
    assert srv["bootstrap_expect"] == 3


def test_tuning_returns_a_fresh_copy() -> None:
    t = consulconf.tuning(True)
    t["gossip_lan"]["probe_interval"] = "1s"
    t["performance"]["raft_multiplier"] = 5
    assert consulconf.tuning(True)["gossip_lan"]["probe_interval"] == "300ms"
    assert consulconf.tuning(True)["performance"]["raft_multiplier"] == 1


# --- render ---------------------------------------------------------------------------------------

def test_a_plain_gateway_config() -> None:
    doc = consulconf.render(spec(join=("10.0.0.1", "10.0.0.2:8301", "consul-3.example.net")))
    assert doc["node_name"] == "gw1" and doc["server"] is False
    assert doc["bind_addr"] == doc["advertise_addr"] == "10.0.0.11"
    assert doc["retry_join"] == ["10.0.0.1", "10.0.0.2:8301", "consul-3.example.net"]
    assert doc["client_addr"] == "127.0.0.1" and doc["data_dir"] == "/var/lib/consul"
    assert doc["datacenter"] == "dc1" and doc["retry_interval"] == "5s"
    assert "encrypt" not in doc and "ports" not in doc and "ca_file" not in doc
    assert doc["acl"] == {"enabled": False, "default_policy": "deny", "down_policy": "extend-cache",
                          "enable_token_persistence": True}
    assert "primary_datacenter" not in doc


def test_encryption_acl_and_tls_options() -> None:
    doc = consulconf.render(spec(server=True, node="s1", bind="10.0.0.1", advertise="192.0.2.1", encrypt=KEY,
                                 acl=True, agent_token=TOKEN, master_token=MASTER, datacenter="west",
                                 tls=TlsFiles("/etc/consul.d/ca.pem", "/etc/consul.d/s1.pem", "/etc/consul.d/s1-key.pem"),
                                 bootstrap_expect=5))
    assert doc["advertise_addr"] == "192.0.2.1" and doc["bind_addr"] == "10.0.0.1"
    assert doc["encrypt"] == KEY
    assert doc["acl"]["enabled"] is True and doc["acl"]["default_policy"] == "deny"
    assert doc["acl"]["tokens"] == {"master": MASTER, "agent": TOKEN}
    assert doc["primary_datacenter"] == "west"
    assert (doc["ca_file"], doc["cert_file"], doc["key_file"]) == (
        "/etc/consul.d/ca.pem", "/etc/consul.d/s1.pem", "/etc/consul.d/s1-key.pem")
    assert doc["verify_incoming_rpc"] is doc["verify_outgoing"] is doc["verify_server_hostname"] is True
    assert "verify_incoming_https" not in doc and "ports" not in doc, "RPC TLS leaves the HTTP API alone"
    assert doc["bootstrap_expect"] == 5


def test_https_moves_the_api_to_8501_and_turns_plain_http_off() -> None:
    doc = consulconf.render(spec(tls=TlsFiles("/c/ca.pem", "/c/gw1.pem", "/c/gw1-key.pem", https=True)))
    assert doc["ports"] == {"http": -1, "https": 8501}
    assert doc["verify_incoming_https"] is True


def test_ports_for_several_agents_on_one_host() -> None:
    doc = consulconf.render(spec(ports={"serf_lan": 21001, "http": 21003, "dns": -1, "server": 21000}))
    assert doc["ports"] == {"dns": -1, "http": 21003, "serf_lan": 21001, "server": 21000}
    assert list(doc["ports"]) == ["dns", "http", "serf_lan", "server"], "in PORT_KINDS order"


def test_render_refuses_a_bad_spec_without_secrets_in_the_message() -> None:
    with pytest.raises(ValueError, match="--encrypt-file"):
        consulconf.render(spec(encrypt="not-a-key-but-a-secret"))
    try:
        consulconf.render(spec(encrypt="not-a-key-but-a-secret", acl=True, agent_token="secret-token-xyz"))
    except ValueError as e:
        assert "secret" not in str(e)
    assert all("secret" not in m for _, m in consulconf.problems(
        spec(encrypt="not-a-key-but-a-secret", acl=True, agent_token="secret-token-xyz")))


# --- problems -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,option", [
    ({"node": "GW1"}, "--node"),
    ({"node": "gw_1"}, "--node"),
    ({"node": "-gw"}, "--node"),
    ({"node": "gw/1"}, "--node"),
    ({"node": "g" * 64}, "--node"),
    ({"node": ""}, "--node"),
    ({"bind": "10.0.0.300"}, "--bind"),
    ({"bind": "0.0.0.0"}, "--bind"),
    ({"bind": "::"}, "--bind"),
    ({"bind": "224.0.0.1"}, "--bind"),
    ({"bind": "gw1.example.net"}, "--bind"),
    ({"advertise": "nope"}, "--advertise"),
    ({"join": ()}, "--join"),
    ({"join": ("10.0.0.300",)}, "--join"),
    ({"join": ("10.0.0.1:0",)}, "--join"),
    ({"join": ("10.0.0.1:65536",)}, "--join"),
    ({"join": ("[fd00::1",)}, "--join"),
    ({"join": ("a..b",)}, "--join"),
    ({"join": ("10.0.0.1", "10.0.0.1")}, "--join"),
    ({"datacenter": "DC 1"}, "--datacenter"),
    ({"datacenter": "dc.1"}, "--datacenter"),
    ({"acl": True, "primary_datacenter": "Dc!"}, "--primary-datacenter"),
    ({"data_dir": "var/lib/consul"}, "--data-dir"),
    ({"client_addr": "localhost"}, "--client-addr"),
    ({"client_addr": ""}, "--client-addr"),
    ({"server": True, "bootstrap_expect": 0}, "--bootstrap-expect"),
    ({"retry_interval": "5"}, "--retry-interval"),
    ({"encrypt": "c2hvcnQ="}, "--encrypt-file"),
    ({"agent_token": TOKEN}, "--agent-token-file"),
    ({"acl": True, "agent_token": "root"}, "--agent-token-file"),
    ({"acl": True, "master_token": MASTER}, "--master-token-file"),
    ({"tls": TlsFiles("ca.pem", "/c.pem", "/k.pem")}, "--tls-ca"),
    ({"tls": TlsFiles("/ca.pem", "", "/k.pem")}, "--tls-cert"),
    ({"ports": {"rpc": 8300}}, "--port"),
    ({"ports": {"server": -1}}, "--port"),
    ({"ports": {"http": 70000}}, "--port"),
    ({"ports": {"http": 8500, "https": 8500}}, "--port"),
])
def test_each_bad_value_is_named_by_its_option(kw: dict[str, Any], option: str) -> None:
    found = consulconf.problems(spec(**kw))
    assert [o for o, _ in found] == [option], found


@pytest.mark.parametrize("kw", [
    {"node": "gw1"}, {"node": "a"}, {"node": "gw-01"}, {"node": "9" * 63},
    {"bind": "127.0.0.1"}, {"bind": "fd00::11"},
    {"join": ("10.0.0.1", "10.0.0.2:8301", "[fd00::1]:8301", "fd00::2", "[fd00::3]", "consul.example.net:8301",
              "consul-1")},
    {"datacenter": "dc_west-1"}, {"client_addr": "127.0.0.1 10.0.0.11"}, {"client_addr": "0.0.0.0"},
    {"server": True, "bootstrap_expect": 1}, {"retry_interval": "1m30s"},
    {"acl": True, "agent_token": TOKEN.upper()}, {"ports": {"dns": -1, "grpc": -1}},
])
def test_good_values_pass(kw: dict[str, Any]) -> None:
    assert consulconf.problems(spec(**kw)) == []


def test_a_template_may_lack_node_and_address_but_a_command_may_not() -> None:
    bare = AgentSpec(server=False, join=consulconf.PLACEHOLDER_JOIN)
    assert consulconf.problems(bare, template=True) == []
    assert [o for o, _ in consulconf.problems(bare)] == ["--node", "--bind"]


@pytest.mark.parametrize("text,want", [
    ("10.0.0.1", ("10.0.0.1", None)), ("10.0.0.1:8301", ("10.0.0.1", 8301)),
    ("[fd00::1]:8301", ("fd00::1", 8301)), ("fd00::1", ("fd00::1", None)), ("[fd00::1]", ("fd00::1", None)),
    ("consul.example.net", ("consul.example.net", None)), ("consul:1", ("consul", 1)),
])
def test_split_address(text: str, want: tuple[str, int | None]) -> None:
    assert consulconf.split_address(text) == want


@pytest.mark.parametrize("text", ["", ":8301", "10.0.0.1:", "10.0.0.1:x", "[fd00::1]8301", "[zz::1]:1", "1.2.3.4.5",
                                  "a b", "host:1:2x"])
def test_split_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        consulconf.split_address(text)


def test_summary_has_no_secret() -> None:
    s = spec(encrypt=KEY, acl=True, agent_token=TOKEN)
    text = json.dumps(consulconf.summary(s))
    assert KEY not in text and TOKEN not in text
    assert consulconf.summary(s)["encrypt"] is True and consulconf.summary(s)["agent_token"] is True


# --- the command ------------------------------------------------------------------------------------

def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pathagent")
    parser.add_argument("--json", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    consulconfig.register(sub)
    args = parser.parse_args(argv)
    assert args.func is consulconfig.handler and args.no_config is True
    code: int = args.func(args, None)
    return code


GW = ["consul-config", "--client", "--node", "gw1", "--bind", "10.0.0.11", "--join", "10.0.0.1",
      "--join", "10.0.0.2", "--join", "10.0.0.3"]


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, value in (("key", KEY), ("token", TOKEN), ("master", MASTER)):
        p = tmp_path / name
        p.write_text(value + "\n")
        p.chmod(0o600)
        out[name] = p
    return out


def test_stdout_gets_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(GW) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == consulconf.render(spec(join=("10.0.0.1", "10.0.0.2", "10.0.0.3")))
    assert "for a lab only" in err


def test_out_writes_0600_atomically_and_prints_no_secret(tmp_path: Path, secrets: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "consul.d" / "consul.json"
    out.parent.mkdir()
    out.write_text("old\n")
    out.chmod(0o644)
    argv = GW + ["--encrypt-file", str(secrets["key"]), "--acl", "--agent-token-file", str(secrets["token"]),
                 "--out", str(out)]
    assert run(argv) == 0
    printed, err = capsys.readouterr()
    assert KEY not in printed + err and TOKEN not in printed + err
    assert printed.startswith(f"wrote {out}: gateway Consul client agent gw1") and "gossip encryption on" in printed
    assert err == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = json.loads(out.read_text())
    assert doc == consulconf.render(spec(join=("10.0.0.1", "10.0.0.2", "10.0.0.3"), encrypt=KEY, acl=True,
                                         agent_token=TOKEN))
    assert sorted(p.name for p in out.parent.iterdir()) == ["consul.json"], "no temporary file left"


def test_out_json_summary(tmp_path: Path, secrets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s1.json"
    argv = ["--json", "consul-config", "--server", "--node", "s1", "--bind", "10.0.0.1", "--join", "10.0.0.1",
            "--join", "10.0.0.2", "--join", "10.0.0.3", "--encrypt-file", str(secrets["key"]), "--acl",
            "--master-token-file", str(secrets["master"]), "--out", str(out)]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(printed)
    assert data["file"] == str(out) and data["role"] == "server" and data["master_token"] is True
    assert MASTER not in printed and KEY not in printed
    assert json.loads(out.read_text())["acl"]["tokens"] == {"master": MASTER}


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_out_keeps_the_owner_of_the_file_it_replaces(tmp_path: Path) -> None:
    out = tmp_path / "consul.json"
    out.write_text("{}")
    os.chown(out, 65534, 65534)
    assert run(GW + ["--out", str(out)]) == 0
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534) and stat.S_IMODE(st.st_mode) == 0o600


def test_a_failed_write_is_exit_1_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(GW + ["--out", str(tmp_path / "missing" / "consul.json")]) == 1
    assert "cannot write" in capsys.readouterr().err
    target = tmp_path / "adir"
    target.mkdir()
    assert run(GW + ["--out", str(target)]) == 1
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_bad_arguments_are_exit_2_one_line_each_and_read_no_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.json"
    argv = ["consul-config", "--client", "--node", "GW1", "--bind", "10.0.0.300", "--join", "x..y",
            "--encrypt-file", str(tmp_path / "missing-key"), "--out", str(out)]
    assert run(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[1].strip() for ln in err] == ["--node", "--bind", "--join"], err
    assert all(ln.startswith("pathagent consul-config: ") for ln in err)
    assert not out.exists()


@pytest.mark.parametrize("extra,option", [
    (["--bootstrap-expect", "3"], "--bootstrap-expect"),
    (["--tls-ca", "/ca.pem"], "--tls-ca"),
    (["--https"], "--https"),
    (["--primary-datacenter", "dc1"], "--primary-datacenter"),
    (["--port", "http"], "--port"),
    (["--port", "http=x"], "--port"),
    (["--port", "https=8500", "--port", "http=8500"], "--port"),
    (["--advertise", "0.0.0.0"], "--advertise"),
])
def test_option_combinations(extra: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(GW + extra) == 2
    err = capsys.readouterr().err
    assert f"pathagent consul-config: {option}: " in err, err


@pytest.mark.parametrize("content,said", [
    (None, "cannot read"), ("", "is empty"), ("\n\n", "is empty"), ("a\nb\n", "more than one line"),
    (b"\xff\xfe", "is not text"), ("c2hvcnQ=\n", "decodes to 5 bytes"),
])
def test_a_bad_key_file_is_exit_2_naming_the_file_never_the_content(
        tmp_path: Path, content: str | bytes | None, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "gossip.key"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    assert run(GW + ["--encrypt-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "--encrypt-file" in err and said in err, err
    if content in ("a\nb\n",):
        assert "a\nb" not in err
    if said == "cannot read" or said == "is empty":
        assert str(f) in err


def test_token_files_need_acl_and_a_uuid(tmp_path: Path, secrets: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run(GW + ["--agent-token-file", str(secrets["token"])]) == 2
    assert "--agent-token-file: needs --acl" in capsys.readouterr().err
    bad = tmp_path / "bad-token"
    bad.write_text("hunter2\n")
    assert run(GW + ["--acl", "--agent-token-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a token SecretID" in err and "hunter2" not in err
    assert run(GW + ["--acl", "--master-token-file", str(secrets["master"])]) == 2
    assert "only servers take the master token" in capsys.readouterr().err
