"""Tier 1: the CLI where no Consul answers: ``--version``, config files that cannot be read (not UTF-8, not
TOML) and bad plugin options (``check-config`` and ``run`` refuse the same). Real subprocesses of
``python -m agent.cli``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import version

REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nobody listens on (bound and released: connect() is refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PATHAGENT_CONFIG"}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def offline_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "pathagent.toml"
    cfg.write_text(f'[consul]\naddress = "127.0.0.1:{closed_port()}"\nagent_check_ttl = 0\nsession_ttl = 0\n'
                   f'[state]\ndir = "{tmp_path / "state"}"\n[target]\nbackend = "fake"\n[network]\nbackend = "fake"\n'
                   f'[catalog]\nbackend = "fake"\n[watchdog]\nbackend = "none"\n{extra}')
    return cfg


# --- version ----------------------------------------------------------------------------------------------

def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout == f"pathagent {version()}\n", r
    from importlib import metadata
    assert version() == metadata.version("iscsi-path-agent")


# --- config files that cannot be read ---------------------------------------------------------------------

COMMANDS = [("check-config",), ("status",), ("paths",), ("run",), ("nodes",), ("disk", "list")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_a_config_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path, command: tuple[str, ...]) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'# caf\xe9 du coin\n[consul]\naddress = "127.0.0.1:1"\n')
    r = cli(*command, "--config", str(bad))
    assert r.returncode == 2, r
    out = (r.stdout + r.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert str(bad) in out and "not UTF-8" in out and "line 1, column 6" in out, out


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_a_config_that_is_not_toml_names_the_file_line_and_column(tmp_path: Path, command: tuple[str, ...]) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('[consul]\naddress = "127.0.0.1:1\n')
    r = cli(*command, "--config", str(bad))
    assert r.returncode == 2, r
    out = (r.stdout + r.stderr).strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert str(bad) in out and "not valid TOML" in out and "line 2" in out and "column" in out, out


def test_a_missing_file_is_named_once(tmp_path: Path) -> None:
    r = cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and r.stdout.strip() == f"{tmp_path / 'nope.toml'}: no such file"


# --- plugin options: check-config and run refuse the same ---------------------------------------------------

def test_check_config_runs_every_configured_plugins_own_checks(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[target.tgt]\nvendor_id = "THISISTOOLONG"\nio_threads = -3\nceph_timeout = 0\nwatch = "yes"\n'
                   '[network.iproute]\ninterfaces = {"10.0.0.0/24" = 3}\npromote_secondaries = "no"\n'
                   '[watchdog]\nbackend = "guard"\n[watchdog.guard]\ntimeout = 99\n'
                   '[fencing.ceph-blocklist]\nparallel = 0\n[consul]\nlock_delay = "x"\n')
    r = cli("check-config", "--config", str(cfg))
    assert r.returncode == 2, r
    lines = r.stdout.splitlines()
    for where in ("[target.tgt] vendor_id", "[target.tgt] io_threads", "[target.tgt] ceph_timeout",
                  "[target.tgt] watch", "[network.iproute] interfaces", "[network.iproute] promote_secondaries",
                  "[watchdog.guard] timeout", "[fencing.ceph-blocklist] parallel", "[consul] lock_delay"):
        assert sum(ln.startswith(f"{cfg}: {where}: ") for ln in lines) == 1, (where, r.stdout)
    assert len(lines) == 9, "each problem once, and nothing else"
    j = json.loads(cli("check-config", "--config", str(cfg), "--json").stdout)
    keys = {p["key"]: p for p in j["problems"]}
    assert keys["target.tgt.ceph_timeout"]["where"] == "[target.tgt] ceph_timeout" and j["ok"] is False
    assert "1-60" in keys["target.tgt.ceph_timeout"]["problem"]


def test_run_refuses_what_check_config_reports(tmp_path: Path) -> None:
    """``run`` builds the plugins before it asks Consul anything, so a bad plugin option ends it at once
    (exit 2, the key named), with Consul unreachable too."""
    cfg = offline_config(tmp_path, "[target.fake]\nexport_delay = -1\n")
    r = cli("check-config", "--config", str(cfg))
    assert r.returncode == 2 and r.stdout.strip() == f"{cfg}: [target.fake] export_delay: must be a number 0-600"
    r = cli("run", "--config", str(cfg), timeout=30)
    assert r.returncode == 2, r
    assert f"pathagent: {cfg}: [target.fake] export_delay: must be a number 0-600" in r.stderr.splitlines()
    assert "Traceback" not in r.stderr


def test_a_good_config_and_a_missing_default_file() -> None:
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PATHAGENT_CONFIG": ""})
    if Path("/etc/pathagent/pathagent.toml").exists():
        pytest.skip("this host has /etc/pathagent/pathagent.toml")
    assert r.returncode == 0 and "not found; every setting at its default: OK" in r.stdout, r
