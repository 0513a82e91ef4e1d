"""The worked example plugin (``examples/pathagent-example-target``, docs/plugins.md), installed the way a site
installs a plugin: ``pip install`` of its own package into a venv that has pathagent, with no change to the
project. Then pathagent lists it, ``check-config`` accepts it and refuses its bad options naming the key,
and a real ``pathagent run`` (against a real Consul agent, fake catalog and network) serves a disk through
it, the watchdog guard process building it too.

The throwaway venv is made from the project venv's interpreter with ``--system-site-packages`` and a
``.pth`` file that adds this checkout and the project venv's site-packages (pathagent and its
dependencies as the project venv has them); the example is then installed into it with ``pip install
--no-index``: it needs nothing from PyPI."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from lab import proc
from lab.agents import REPO, AgentProc, Catalog, definition, start_disks, wait_for
from lab.consul import ConsulCluster, consul_missing

EXAMPLE = REPO / "examples" / "pathagent-example-target"
#: a problem's key as pathagent prints it: ``target.logged.KEY`` or ``[target.logged] KEY``
KEY = r"(target\.logged\.{0}|\[target\.logged\] {0})"


def run(argv: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with pathagent (seen through a .pth file) and the example installed by pip; its python."""
    work = tmp_path_factory.mktemp("plugin-venv")
    venv = work / "venv"
    r = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    if r.returncode != 0:
        pytest.skip(f"cannot create a venv here: {r.stderr.strip()[-500:]}")
    py = venv / "bin" / "python"
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "pathagent-checkout.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")
    src = work / "src"
    shutil.copytree(EXAMPLE, src)                       # the build writes egg-info next to its sources
    t0 = time.monotonic()
    r = run([str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--disable-pip-version-check",
             str(src)], timeout=300)
    assert r.returncode == 0, f"pip install of the example failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"\nexample plugin installed into a throwaway venv in {time.monotonic() - t0:.1f} s")
    yield py


def write_config(path: Path, state: Path, consul: str = "127.0.0.1:1", target: str = "",
                 catalog: Path | None = None) -> Path:
    """An agent config with ``[target] backend = "logged"`` (delegating to ``fake`` unless ``target`` gives
    the ``[target.logged]`` tables), fake network and catalog."""
    target = target or '[target.logged]\ndelegate = "fake"\n'
    path.write_text(f"""
[consul]
address = "{consul}"
lock_delay = 5
fence_after = 2.5
confirm_interval = 0.5
timeout = 0.8
election_stall = 1.0
wait = 10
[state]
dir = "{state}"
[target]
backend = "logged"
stop_time = 0.5
{target}
[network]
backend = "fake"
[catalog]
backend = "fake"
[catalog.fake]
file = "{catalog or state.parent / 'catalog.json'}"
[placement]
settle = 0.5
""")
    return path


def cli(py: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([str(py), "-m", "agent.cli", "--config", str(config), *args], timeout=60)


def test_pathagent_lists_the_installed_plugin_and_checks_its_options(plugin_venv: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    good = write_config(tmp_path / "good.toml", state)
    r = cli(plugin_venv, good, "check-config")
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: OK", r.stdout + r.stderr
    # `pathagent plugins` lists it, with the distribution that registers it
    r = cli(plugin_venv, good, "plugins", "--json")
    assert r.returncode == 0, r.stderr
    [logged] = [p for p in json.loads(r.stdout) if p["kind"] == "target" and p["name"] == "logged"]
    assert logged["namespace"] == "pathagent.targets" and logged["distribution"].startswith("pathagent-example")
    r = cli(Path(sys.executable), good, "plugins", "--json")
    assert "logged" not in {p["name"] for p in json.loads(r.stdout)}
    # the list of target backends pathagent offers (its answer to an unknown name) has the example in it
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(good.read_text().replace('backend = "logged"', 'backend = "nosuch"'))
    r = cli(plugin_venv, unknown, "--json", "check-config")
    assert r.returncode == 2
    [problem] = [p for p in json.loads(r.stdout)["problems"] if p["key"] == "target.backend"]
    offered = problem["problem"].split("available: ", 1)[1].split(", ")
    assert "logged" in offered and {"fake", "tgt"} <= set(offered), problem
    # ... and only where it is installed: the project's own venv does not know it
    r = cli(Path(sys.executable), good, "check-config")
    assert r.returncode == 2 and "unknown target plugin 'logged'" in r.stdout, r.stdout + r.stderr
    # its own option checks, with their keys: check-config reports them, run refuses at once (before any
    # Consul call)
    bad = write_config(tmp_path / "bad.toml", state, target='[target.logged]\ndelegate = "logged"\n'
                                                            '[target.logged.delegate_options]\nbogus = 1\n')
    for cmd, out in (("check-config", "stdout"), ("run", "stderr")):
        r = cli(plugin_venv, bad, cmd)
        assert r.returncode == 2 and re.search(KEY.format("delegate") + ": must name another target backend",
                                               getattr(r, out)), (cmd, r.stdout, r.stderr)
    bad.write_text(bad.read_text().replace('delegate = "logged"', 'delegate = "fake"'))
    for cmd, out in (("check-config", "stdout"), ("run", "stderr")):
        r = cli(plugin_venv, bad, cmd)
        assert r.returncode == 2 and re.search(KEY.format(r"delegate_options\.bogus") + ": unknown key",
                                               getattr(r, out)), (cmd, r.stdout, r.stderr)


class PluginAgent(AgentProc):
    """``pathagent run`` from the plugin venv with the example as its target backend (delegating to fake)."""

    def __init__(self, name: str, workdir: Path, consul_http: str, py: Path) -> None:
        self.py = py
        super().__init__(name, workdir, consul_http, workdir / "catalog.json")

    def write_config(self) -> None:
        write_config(self.config, self.state, self.http, catalog=self._catalog)

    def start(self, env: dict[str, str] | None = None, rewrite: bool = True) -> "PluginAgent":
        self.p = proc.spawn([str(self.py), "-m", "agent.cli", "--config", str(self.config), "run"], str(self.log))
        return self

    def journal(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in (self.state / "logged-target.jsonl").read_text().splitlines()]
        except FileNotFoundError:
            return []


def test_a_disk_is_served_through_the_example_plugin(plugin_venv: Path, tmp_path: Path) -> None:
    reason = consul_missing()
    if reason:
        print(f"\nSKIP serving through the example plugin: {reason}")
        pytest.skip(f"real Consul needed: {reason}")
    cluster = ConsulCluster(str(tmp_path / "consul"), servers=1, clients=["gwx"])
    cluster.start()
    agent: PluginAgent | None = None
    try:
        catalog = Catalog(tmp_path / "catalog.json")
        catalog.add("exa1", definition("exa1", paths=1))
        agent = PluginAgent("gwx", tmp_path, cluster.http_address("gwx"), plugin_venv).start()
        wait_for(agent.session, 30, what="the agent's session", alive=[agent])
        start_disks(cluster.http_address("gwx"), {"exa1": 1})
        wait_for(lambda: "exa1/1" in agent.exported() and "exa1/1" in agent.addresses(), 30,
                 what="exa1/1 exported through the example and its address up", alive=[agent])
        [rec] = [e for e in agent.journal() if e["op"] == "export"]
        assert rec["path"] == "exa1/1" and rec["iqn"] == "iqn.2016-05.io.pathagent:exa1" and rec["delegate"] == "fake"
        assert "error" not in rec
        log = agent.log_text()
        assert "target logged" in log and "logged: exported exa1/1" in log, log[-3000:]
        st = json.loads(cli(plugin_venv, agent.config, "--json", "status").stdout)
        assert st["backend"] == "logged" and st["paths_held"] == 1, st
        # the watchdog guard process (the same interpreter) built the same backend from the config
        assert agent.guard_running()
        # an orderly stop unexports through it too
        proc.signal_checked(agent.pid, signal.SIGTERM, "agent.cli")
        assert agent.wait_exit(30) == 0, agent.log_text()[-3000:]
        assert agent.exported() == set()
        assert [e["op"] for e in agent.journal()][-1] == "unexport", agent.journal()
    finally:
        if agent is not None:
            agent.stop()
        cluster.teardown()
