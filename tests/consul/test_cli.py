"""`pathagent paths`, `status` and `path move` against real Consul and running agents."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from lab.agents import REPO, AgentProc, Catalog, definition, path_owners, start_disks, wait_for

pytestmark = pytest.mark.consul


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture
def two_agents(consul_cluster_factory: Callable[..., Any], tmp_path: Path) -> Any:
    cluster = consul_cluster_factory(clients=["gwa", "gwb"])
    cat = Catalog(tmp_path / "catalog.json")
    disks = {"d1": 2, "d2": 2, "d3": 2}
    for d, n in disks.items():
        cat.add(d, definition(d, n))
    http = cluster.http_address("gwa")
    start_disks(http, disks)
    agents = {n: AgentProc(n, tmp_path, cluster.http_address(n), cat.path, lock_delay=10.0, fence_after=4.0)
              for n in ("gwa", "gwb")}
    for a in agents.values():
        a.start()
    wait_for(lambda: all(path_owners(http).values()) and
             sum(len(a.exported()) for a in agents.values()) == 6, 15, what="6 paths served")
    yield cluster, agents, http
    for a in agents.values():
        a.stop()


def test_paths_json_and_filters(two_agents: Any) -> None:
    _, agents, _ = two_agents
    r = cli(agents["gwa"].config, "paths", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 6
    assert all(set(row) >= {"disk", "index", "ip", "node", "state"} for row in rows)
    assert {row["disk"]: row["name"] for row in rows} == {d: f"disk-{d}" for d in ("d1", "d2", "d3")}, \
        "the display name beside the id"
    assert {row["node"] for row in rows} <= {"gwa", "gwb"}
    assert all(row["state"] == "held" for row in rows)
    d1 = {row["index"]: row["ip"] for row in rows if row["disk"] == "d1"}
    assert d1 == {p["index"]: p["ip"] for p in definition("d1", 2)["paths"]}
    mine = json.loads(cli(agents["gwa"].config, "--json", "paths", "--mine").stdout)
    assert {f"{r['disk']}/{r['index']}" for r in mine} == agents["gwa"].exported()
    other = json.loads(cli(agents["gwa"].config, "paths", "--node", "gwb", "--json").stdout)
    assert {f"{r['disk']}/{r['index']}" for r in other} == agents["gwb"].exported()
    text = cli(agents["gwa"].config, "paths").stdout
    assert text.splitlines()[0].split() == ["PATH", "NAME", "IP", "NODE", "STATE"] and len(text.splitlines()) == 7
    by_path = {ln.split()[0]: ln.split() for ln in text.splitlines()[1:]}
    assert {p: (cols[1], cols[2], cols[4]) for p, cols in by_path.items()} == \
        {f"{r['disk']}/{r['index']}": (r["name"], r["ip"], r["state"]) for r in rows}, "NAME beside PATH"


def test_status(two_agents: Any) -> None:
    _, agents, _ = two_agents
    r = cli(agents["gwb"].config, "status", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    st = json.loads(r.stdout)
    assert st["node"] == "gwb" and st["health"] == "healthy" and st["agent_running"] and st["degraded"] == []
    assert st["sessions"][0]["id"] == agents["gwb"].session() == st["session"]
    assert st["paths_held"] == len(agents["gwb"].exported()) and st["paths_total"] == 6
    assert set(st["exported_paths"]) == agents["gwb"].exported(), "the local state names the exported paths"
    assert st["pid"] == agents["gwb"].pid and st["fenced"] is False
    assert 0 < st["lease_left"] <= 4.0 and 0 <= st["lease_confirmed_ago"] < 4.0, "fence_after 4"
    assert st["status_age"] is not None and st["status_age"] < 5
    assert st["consul"] == {"reachable": True, "error": None}
    assert st["consul_leader"] and st["live_nodes"] == ["gwa", "gwb"] and st["backend"] == "fake"
    text = cli(agents["gwb"].config, "status")
    assert text.returncode == 0 and "session:" in text.stdout and "(healthy)" in text.stdout.splitlines()[0]
    assert "Consul: the same" in text.stdout


def test_nodes_and_status_warn_of_gateways_on_different_backends(two_agents: Any) -> None:
    import requests
    from agent.core.tree import drain_value, node_value
    _, agents, http = two_agents
    cfg = agents["gwb"].config
    base = f"http://{http}/v1"
    assert "backends:" not in cli(cfg, "status").stdout and "warning" not in cli(cfg, "nodes").stdout
    # a third gateway whose agent runs lio (drained first, so that nobody gives it a path)
    assert requests.put(f"{base}/kv/pathagent/drain/gwx", data=drain_value(time.time()), timeout=5).json()
    sid = requests.put(f"{base}/session/create", json={"Name": "iSCSITarget", "TTL": "60s"}, timeout=5).json()["ID"]
    try:
        assert requests.put(f"{base}/kv/pathagent/nodes/gwx?acquire={sid}",
                            data=node_value("gwx", sid, time.time(), "lio"), timeout=5).json() is True
        table = {r["node"]: r for r in json.loads(cli(cfg, "nodes", "--json").stdout)}
        assert {n: (r["live"], r["backend"]) for n, r in table.items()} == \
            {"gwa": (True, "fake"), "gwb": (True, "fake"), "gwx": (True, "lio")}
        text = cli(cfg, "nodes").stdout.splitlines()
        assert text[0].split() == ["NODE", "LIVE", "DRAINED", "PATHS", "BACKEND", "LEADER"]
        assert text[-1].startswith("warning: the live gateways run different target backends (fake, lio)")
        st = cli(cfg, "status", "--json")
        assert json.loads(st.stdout)["backends"] == {"fake": ["gwa", "gwb"], "lio": ["gwx"]}
        assert st.returncode == 0, "a warning, not degraded"
        line = [ln for ln in cli(cfg, "status").stdout.splitlines() if ln.startswith("backends:")]
        assert line and "fake on gwa, gwb; lio on gwx" in line[0], line
    finally:
        requests.put(f"{base}/session/destroy/{sid}", timeout=5)
        requests.delete(f"{base}/kv/pathagent/nodes/gwx", timeout=5)
        requests.delete(f"{base}/kv/pathagent/drain/gwx", timeout=5)
    assert "backends:" not in cli(cfg, "status").stdout and "warning" not in cli(cfg, "nodes").stdout


def test_status_of_a_stopped_agent_is_degraded(two_agents: Any) -> None:
    _, agents, _ = two_agents
    agents["gwb"].stop()
    r = cli(agents["gwb"].config, "status", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["health"] == "degraded" and not st["agent_running"]
    assert "agent not running" in st["degraded"] and "no session in Consul" in st["degraded"]
    assert st["consul"]["reachable"] and st["sessions"] == []
    text = cli(agents["gwb"].config, "status")
    assert text.returncode == 1 and "agent not running" in text.stdout.splitlines()[0]
    assert "Traceback" not in text.stderr


def test_a_fresh_node_logs_no_error(two_agents: Any) -> None:
    """A clean start (nothing inherited, nothing to fence) logs no ERROR line; and its errors record holds
    nothing worse than the warning for [watchdog] backend none that these agents do not have."""
    _, agents, _ = two_agents
    for a in agents.values():
        text = a.log.read_text()
        assert " ERROR " not in text, text
        errors = json.loads((a.state / "errors.json").read_text())
        assert errors["pid"] == a.pid and all(e["level"] != "ERROR" for e in errors["errors"]), errors


def blocks(text: str) -> list[list[str]]:
    """The tables ``paths --watch`` printed to a pipe: blocks separated by an empty line."""
    return [b.splitlines() for b in text.split("\n\n") if b.strip()]


def test_paths_watch_refreshes_until_sigint(two_agents: Any) -> None:
    import signal
    _, agents, http = two_agents
    out = agents["gwa"].dir / "watch.out"
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "paths", "--watch", "--interval", "0.5",
                              "--config", str(agents["gwa"].config)], stdout=f, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        wait_for(lambda: len(blocks(out.read_text())) >= 2, 15, what="two refreshes")
        first = blocks(out.read_text())[0]
        assert first[0].startswith("6 paths, 6 held, 0 not held at "), first
        assert first[1].split() == ["PATH", "NAME", "IP", "NODE", "STATE"] and len(first) == 8
        path = sorted(agents["gwa"].exported())[0]
        assert cli(agents["gwa"].config, "path", "move", path, "gwb").returncode == 0

        def moved() -> bool:
            last = blocks(out.read_text())[-1]
            return any(ln.split()[0] == path and ln.split()[3] == "gwb" for ln in last[2:] if ln.split())
        wait_for(moved, 15, what="the table to show the move")
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
        assert p.stderr is not None
        err = p.stderr.read()
        assert "Traceback" not in err and err == "", err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_paths_watch_shows_consul_errors_and_goes_on(consul_cluster_factory: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    """Consul going away is shown in the table's header and retried; it comes back on its own."""
    import signal
    cluster = consul_cluster_factory(clients=["gwa"])
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[consul]\naddress = "{cluster.http_address("gwa")}"\ntimeout = 0.5\n[catalog]\nbackend = "fake"\n'
                   f'[catalog.fake]\nfile = "{tmp_path / "none.json"}"\n[target]\nbackend = "fake"\n'
                   '[network]\nbackend = "none"\n')
    start_disks(cluster.http_address("gwa"), {"w1": 1})
    out = tmp_path / "watch.out"
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(cfg), "paths", "--watch",
                              "--interval", "0.3"], stdout=f, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: blocks(out.read_text()) and blocks(out.read_text())[-1][0].startswith("1 paths, 0 held"), 15,
                 what="the first table")
        cluster.kill("gwa")
        wait_for(lambda: "consul: unreachable" in out.read_text(), 15, what="the error in the header")
        last = blocks(out.read_text())[-1]
        assert any(ln.startswith("w1/1") for ln in last), "the last table read stays on screen"
        assert p.poll() is None, "a Consul error is not fatal"
        cluster.restart("gwa")
        wait_for(lambda: "consul: unreachable" not in "\n".join(blocks(out.read_text())[-1]), 30,
                 what="the watch to recover by itself")
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
        assert p.stderr is not None and "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_path_move_is_fast_and_exact(two_agents: Any) -> None:
    _, agents, http = two_agents
    path = sorted(agents["gwa"].exported())[0]
    t0 = time.monotonic()
    r = cli(agents["gwa"].config, "path", "move", path, "gwb", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout)["moved"] is True
    assert path_owners(http)[path] == agents["gwb"].session()
    wait_for(lambda: path in agents["gwb"].exported() and path not in agents["gwa"].exported(), 5,
             what="the export to follow the lock")
    assert took < 10.0, "no lock-delay (10 s) on a planned move"
    # nobody takes it back: it stays on gwb
    time.sleep(3)
    assert path_owners(http)[path] == agents["gwb"].session()
    r = cli(agents["gwa"].config, "path", "move", path, "nosuchnode")
    assert r.returncode == 1 and "no running agent" in r.stderr


def test_metrics_endpoint(consul_cluster_factory: Callable[..., Any], tmp_path: Path) -> None:
    import socket

    import requests
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cluster = consul_cluster_factory(clients=["gwa"])
    cat = Catalog(tmp_path / "catalog.json")
    cat.add("m1", definition("m1", 2))
    http = cluster.http_address("gwa")
    start_disks(http, {"m1": 2})
    a = AgentProc("gwa", tmp_path, http, cat.path, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    a.start()
    try:
        wait_for(lambda: len(a.exported()) == 2, 15, what="2 paths served", alive=[a])

        def scrape() -> dict[str, float]:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                return {}
            return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
        wait_for(lambda: scrape().get("pathagent_paths_exported") == 2, 10, what="metrics to show 2 exports")
        m = scrape()
        assert m["pathagent_session_valid"] == 1 and m["pathagent_fenced"] == 0
        assert m["pathagent_paths_held"] == 2 and m["pathagent_paths_total"] == 2 and m["pathagent_paths_free"] == 0
        assert 0 < m["pathagent_lease_left_seconds"] <= 2.5 and m["pathagent_cycles_total"] >= 1
        assert m["pathagent_addresses_up"] == 2 and m["pathagent_fence_events_total"] == 0
        assert requests.get(f"http://127.0.0.1:{port}/nope", timeout=2).status_code == 404
    finally:
        a.stop()


def test_nodes_drain_and_undrain(two_agents: Any) -> None:
    _, agents, http = two_agents
    cfg = agents["gwa"].config
    r = cli(cfg, "nodes", "--json")
    assert r.returncode == 0, r.stderr
    table = {row["node"]: row for row in json.loads(r.stdout)}
    assert set(table) == {"gwa", "gwb"}
    assert all(set(row) >= {"node", "live", "drained", "paths", "leader"} for row in table.values())
    assert all(row["live"] and not row["drained"] for row in table.values())
    assert sum(row["paths"] for row in table.values()) == 6
    assert sorted(row["leader"] for row in table.values()) == [False, True]
    assert cli(cfg, "nodes").stdout.splitlines()[0].split() == ["NODE", "LIVE", "DRAINED", "PATHS", "BACKEND",
                                                              "LEADER"]

    r = cli(cfg, "node", "drain", "gwb", "--wait", "--timeout", "60", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["paths"] == 0
    wait_for(lambda: agents["gwb"].exported() == set() and len(agents["gwa"].exported()) == 6, 15,
             what="gwb empty, gwa serving all six")
    again = cli(cfg, "node", "drain", "gwb")
    assert again.returncode == 0 and "already" in again.stdout, "drain is idempotent and says so"
    assert cli(cfg, "path", "move", "d1/1", "gwb").returncode == 1, "no move to a drained node"
    unknown = cli(cfg, "node", "drain", "nosuch")
    assert unknown.returncode == 1 and "nosuch" in unknown.stderr

    assert cli(cfg, "node", "undrain", "gwb").returncode == 0
    wait_for(lambda: len(agents["gwb"].exported()) == 3 and len(agents["gwa"].exported()) == 3, 40,
             what="gwb gets its share back by planned moves")
    assert all(path_owners(http).values())
