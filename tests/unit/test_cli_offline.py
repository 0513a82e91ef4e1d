"""Tier 1: the CLI where no Consul answers: ``--version``, config files that cannot be read (not UTF-8, not
TOML) and bad plugin options (``check-config`` and ``run`` refuse the same), ``status`` of a node whose
Consul is down (from a fake state directory, and from a real ``pathagent run`` waiting for Consul), the
errors record, and the renderers of ``paths --watch``. Real subprocesses of ``python -m agent.cli``."""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.cli import version
from agent.cli.output import Live, paths_table
from agent.runtime.statedir import ErrorLog, StateDir

REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nobody listens on (bound and released: connect() is refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no PATHAGENT_CONFIG, and none of pytest-cov's COV_CORE_*
    (scripts/test measures tier 1's coverage; its subprocess hook prints its own lines on stderr, which
    these tests read line by line)."""
    env = {k: v for k, v in os.environ.items() if k != "PATHAGENT_CONFIG" and not k.startswith("COV_CORE_")}
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = clean_env()
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
                       cwd=REPO, env=clean_env(PATHAGENT_CONFIG=""))
    if Path("/etc/pathagent/pathagent.toml").exists():
        pytest.skip("this host has /etc/pathagent/pathagent.toml")
    assert r.returncode == 0 and "not found; every setting at its default: OK" in r.stdout, r


# --- status with Consul unreachable --------------------------------------------------------------------------

@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A state directory as a running agent leaves it (this test process holds its lock and is the pid in
    its files), with a config whose Consul is a closed port."""
    cfg = offline_config(tmp_path)
    state = tmp_path / "state"
    sd = StateDir(str(state))
    sd.lock()
    now = time.time()
    sd.record_node("gwa")
    sd.record_status({"node": "gwa", "session": "5e55-1", "fenced": True, "pid": os.getpid(), "lease_left": -3.0,
                      "held": 2, "exported": 1, "exported_paths": ["d1/1"], "updated": now - 1, "backend": "fake",
                      "bad_disks": {"d9": "field 'paths[0].ip': not an IPv4 address"}, "disk_names": {"d9": "vm9"},
                      "last_fence": "no confirmation of our session since the lease ran out (0.00s ago)",
                      "watchdog_error": None, "waiting_fence": False, "fence_error": "", "leader": True,
                      "drained": False})
    (state / "errors.json").write_text(json.dumps({"pid": os.getpid(), "started": now - 60, "errors": [
        {"time": now - 2, "first": now - 30, "count": 12, "level": "WARNING", "logger": "agent.runtime.session",
         "message": "session 5e55-1 not confirmed: consul session/info: cannot connect to 127.0.0.1:1"},
        {"time": now - 1, "first": now - 1, "count": 1, "level": "ERROR", "logger": "agent.runtime.fencer",
         "message": "fencing: no confirmation of our session since the lease ran out (0.00s ago)"}]}))
    try:
        yield cfg, state
    finally:
        sd.unlock()


def test_status_with_consul_down_shows_the_local_state_and_exits_1(fake_agent: tuple[Path, Path]) -> None:
    cfg, _ = fake_agent
    r = cli("status", "--config", str(cfg))
    assert r.returncode == 1, r
    assert r.stderr == "" and "Traceback" not in r.stdout
    lines = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in r.stdout.splitlines() if not ln.startswith(" ")}
    assert lines["node"].startswith("gwa (degraded: ") and "fenced" in lines["node"] and "consul unreachable" in lines["node"]
    assert lines["agent"].startswith(f"running, pid {os.getpid()}; status ")
    assert lines["session"] == "5e55-1"
    assert lines["fenced"].startswith("yes (last fence: no confirmation")
    assert lines["exported"] == "1 paths: d1/1"
    assert lines["consul"].startswith("unreachable (consul agent/self: cannot connect to 127.0.0.1:")
    assert lines["bad disk"] == "d9 (vm9): field 'paths[0].ip': not an IPv4 address"
    assert "ERROR fencing: no confirmation" in r.stdout and "(x12 since " in r.stdout


def test_status_json_with_consul_down(fake_agent: tuple[Path, Path]) -> None:
    cfg, _ = fake_agent
    r = cli("status", "--json", "--config", str(cfg))
    assert r.returncode == 1, r
    st = json.loads(r.stdout)
    assert st["health"] == "degraded" and {"fenced", "consul unreachable"} <= set(st["degraded"])
    assert st["node"] == "gwa" and st["agent_running"] and st["pid"] == os.getpid()
    assert st["consul"]["reachable"] is False and "cannot connect" in st["consul"]["error"]
    assert st["session"] == "5e55-1" and st["fenced"] is True and st["exported_paths"] == ["d1/1"]
    assert st["sessions"] is None and st["paths_total"] is None, "Consul's view: unknown, not zero"
    assert st["is_leader"] is True and st["leader"] == "gwa", "as the agent last recorded it"
    assert [e["level"] for e in st["errors"]] == ["WARNING", "ERROR"] and st["errors_pid"] == os.getpid()


def test_status_of_a_stale_status_file(fake_agent: tuple[Path, Path]) -> None:
    cfg, state = fake_agent
    st = json.loads((state / "status.json").read_text())
    (state / "status.json").write_text(json.dumps({**st, "fenced": False, "updated": time.time() - 120}))
    r = cli("status", "--json", "--config", str(cfg))
    assert r.returncode == 1 and any(d.startswith("status file 12") for d in json.loads(r.stdout)["degraded"])


def test_status_of_a_node_where_no_agent_ever_ran(tmp_path: Path) -> None:
    r = cli("status", "--config", str(offline_config(tmp_path)))
    assert r.returncode == 1 and r.stderr == "", r
    assert "agent not running" in r.stdout.splitlines()[0] and "no such directory" in r.stdout


def test_status_of_a_real_agent_waiting_for_consul(tmp_path: Path) -> None:
    """A fresh node whose Consul does not answer: ``run`` waits (no ERROR: nothing was inherited), records
    why in errors.json, and ``status`` shows it running, its errors, and exits 1."""
    cfg = offline_config(tmp_path)
    log = tmp_path / "agent.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(cfg), "run"], stdout=f,
                             stderr=subprocess.STDOUT, cwd=REPO, env=clean_env())
    try:
        errors = tmp_path / "state" / "errors.json"
        end = time.monotonic() + 20
        while time.monotonic() < end and not (errors.exists() and "cycle failed" in errors.read_text()):
            time.sleep(0.1)
        r = cli("status", "--json", "--config", str(cfg))
        assert r.returncode == 1, r
        st = json.loads(r.stdout)
        assert st["agent_running"] and st["pid"] == p.pid
        assert {"no status yet (the agent has not completed a cycle)", "consul unreachable"} <= set(st["degraded"])
        assert any("cycle failed: consul agent/self: cannot connect" in e["message"] for e in st["errors"]), st
        text = cli("status", "--config", str(cfg)).stdout
        assert f"running, pid {p.pid}; no status yet" in text and "warnings and errors of this agent" in text
    finally:
        p.terminate()
        assert p.wait(20) == 0
    out = log.read_text()
    assert " ERROR " not in out and "Traceback" not in out, out


# --- the errors record ---------------------------------------------------------------------------------------

def test_error_log_writes_only_while_this_process_holds_the_state_dir(tmp_path: Path) -> None:
    h = ErrorLog.install(str(tmp_path), limit=3)
    log = logging.getLogger("test.errorlog")
    try:
        log.warning("before the lock")
        log.info("not kept")
        time.sleep(0.1)
        assert not (tmp_path / "errors.json").exists(), "nothing written before the lock is held"
        other = StateDir(str(tmp_path))
        other.lock()                          # another agent holds it ...
        mine = StateDir(str(tmp_path))
        from agent.errors import ConfigError
        with pytest.raises(ConfigError):
            mine.lock()                       # ... so this one is refused; but ErrorLog follows StateDir.lock
        other.unlock()
        mine.lock()
        for delay in ("0.5", "1.0", "2.0"):
            log.warning("cycle failed: consul down; retrying in %ss", delay)
        log.error("boom %d", 1)
        log.error("boom %d", 2)
        mine.unlock()                         # writes the last state
        data = json.loads((tmp_path / "errors.json").read_text())
        assert data["pid"] == os.getpid()
        assert [(e["level"], e["message"], e["count"]) for e in data["errors"]] == [
            ("WARNING", "cycle failed: consul down; retrying in 2.0s", 3), ("ERROR", "boom 1", 1),
            ("ERROR", "boom 2", 1)], "the last 3, repeats counted"
    finally:
        h.close()
    assert h not in logging.getLogger().handlers


def test_a_stop_during_a_slow_write_still_writes_the_last_state(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from agent import statefile
    writing, go_on = threading.Event(), threading.Event()
    real = statefile.write

    def slow_first(path: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if path.endswith("errors.json") and not writing.is_set():
            writing.set()
            assert go_on.wait(10)
        real(path, value, *args, **kwargs)
    monkeypatch.setattr(statefile, "write", slow_first)
    h = ErrorLog.install(str(tmp_path), limit=3)
    log = logging.getLogger("test.errorlog.slow")
    try:
        log.warning("early")
        sd = StateDir(str(tmp_path))
        sd.lock()
        assert writing.wait(10), "the writer thread started its first write"
        log.error("late")                     # logged while the first write (of "early" only) is under way
        stopper = threading.Thread(target=sd.unlock)
        stopper.start()
        time.sleep(0.1)                       # the stop is asked for before the slow write ends
        go_on.set()
        stopper.join(10)
        data = json.loads((tmp_path / "errors.json").read_text())
        assert [e["message"] for e in data["errors"]] == ["early", "late"]
    finally:
        go_on.set()
        h.close()


# --- the audit trail ---------------------------------------------------------------------------------------

def _audit_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "log.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s, path


def test_changing_commands_leave_one_audit_line_each_whatever_their_outcome(tmp_path: Path) -> None:
    import pwd
    sock, path = _audit_socket(tmp_path)
    cfg = offline_config(tmp_path, f'[log]\naudit = "{path}"\n')
    try:
        r = cli("node", "drain", "gw9", "--config", str(cfg))              # Consul is down: exit 1
        assert r.returncode == 1, r
        msg = sock.recv(4096).decode()
        me = pwd.getpwuid(os.getuid()).pw_name
        assert msg.startswith(f"<85>pathagent-cli[") and f"]: user={me} (uid {os.getuid()}) exit=1 " in msg, msg
        assert msg.endswith(f"node drain gw9 --config {cfg}"), msg
        assert cli("nodes", "--config", str(cfg)).returncode == 1
        assert cli("disk", "list", "--config", str(cfg)).returncode == 1
        r = cli("disk", "delete", "vm1", "--config", str(cfg))
        assert r.returncode == 1, r
        assert sock.recv(4096).decode().endswith(f"exit=1 disk delete vm1 --config {cfg}"), \
            "read-only commands (nodes, disk list) leave nothing; the next line is the delete's"
    finally:
        sock.close()
    for sub in ("off", "gone"):
        (tmp_path / sub).mkdir()
    off = offline_config(tmp_path / "off", '[log]\naudit = ""\n')
    assert cli("node", "drain", "gw9", "--config", str(off)).returncode == 1, "audit off"
    gone = offline_config(tmp_path / "gone", f'[log]\naudit = "{tmp_path / "nosuch.sock"}"\n')
    r = cli("node", "drain", "gw9", "--config", str(gone))
    assert r.returncode == 1 and "audit" not in r.stderr and "Traceback" not in r.stderr, \
        "no syslog socket: the command's outcome and output are the same"


def test_audit_lines_mask_secret_options_and_name_the_sudo_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.cli import audit
    assert audit.redacted(["disk", "update", "vm", "--chap-password", "s3cr3t", "--consul-token=abc",
                           "--chap-password-file", "/etc/pw", "--name", "x"]) == \
        ["disk", "update", "vm", "--chap-password", "***", "--consul-token=***", "--chap-password-file", "/etc/pw",
         "--name", "x"]
    monkeypatch.setenv("SUDO_USER", "alice")
    text = audit.line(["disk", "stop", "vm"], 0)
    assert text.startswith("user=alice (uid ") and text.endswith("via sudo) exit=0 disk stop vm"), text
    assert audit.send("", ["x"], 0) is False


# --- renderers -----------------------------------------------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {"disk": "d15c0001", "index": 1, "name": "vm", "ip": "198.18.100.100", "node": "gateway-01.storage.example.com",
     "state": "held"},
    {"disk": "d15c0001", "index": 2, "name": None, "ip": None, "node": None, "state": "invalid", "error": "bad"}]


def test_paths_table_columns_fit_long_node_names() -> None:
    lines = paths_table(ROWS).splitlines()
    assert lines[0].split() == ["PATH", "NAME", "IP", "NODE", "STATE"]
    col = lines[0].index("STATE")
    assert lines[1][col:] == "held" and lines[2][col:] == "invalid (bad)", lines
    assert lines[2].split()[:4] == ["d15c0001/2", "-", "-", "-"]


def test_live_redraws_in_place_on_a_terminal_and_appends_elsewhere() -> None:
    pipe = io.StringIO()
    live = Live(pipe, tty=False)
    live.show("a\nb")
    live.show("c")
    assert pipe.getvalue() == "a\nb\n\nc\n\n"
    term = io.StringIO()
    live = Live(term, tty=True)
    live.show("a\nb")
    live.show("c")
    assert term.getvalue() == "\ra\x1b[K\nb\x1b[K\n\x1b[J" + "\x1b[2Fc\x1b[K\n\x1b[J"
