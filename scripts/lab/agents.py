"""Run real ``pathagent run`` processes for tests and benchmarks, with the ``fake`` target and network
backends and the ``fake`` catalog (definitions from a JSON file), against real Consul agents.

``AgentProc.exported()`` and ``addresses()`` read the fake backends' state files from outside the process,
the way a test would look at a kernel target and at the node's interfaces.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import requests

from lab import proc

REPO = Path(__file__).resolve().parents[2]
PATHAGENT = [str(REPO / ".venv" / "bin" / "python"), "-m", "agent.cli"]


def definition(disk_id: str, paths: int, base_ip: int = 100) -> dict[str, Any]:
    return {"version": 1, "id": disk_id, "name": f"disk-{disk_id}", "iqn": f"iqn.2016-05.io.pathagent:{disk_id}",
            "serial": str(uuid.uuid5(uuid.NAMESPACE_DNS, disk_id)), "open": True,
            "paths": [{"index": i, "ip": f"198.18.{(base_ip + i) // 250}.{(base_ip + i) % 250 + 1}", "prefix": 24}
                      for i in range(1, paths + 1)]}


class Catalog:
    """The JSON file read by the ``fake`` catalog plugin."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.docs: dict[str, Any] = {}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.docs))
        os.replace(tmp, self.path)

    def add(self, disk_id: str, doc: Any) -> None:
        self.docs[disk_id] = doc
        self.save()


def txn(http: str, ops: list[dict[str, Any]]) -> requests.Response:
    return requests.put(f"http://{http}/v1/txn", data=json.dumps(ops), timeout=10)


def start_disks(http: str, disk_paths: dict[str, int], prefix: str = "pathagent") -> None:
    """Create disk keys and their path keys (what ``pathagent disk start`` does) for disks named by id, with
    images ``rbd/pathagent-<id>``."""
    start_records(http, [(d, "rbd", f"pathagent-{d}", range(1, n + 1)) for d, n in disk_paths.items()], prefix)


def start_defined(http: str, disks: Iterable[Any], prefix: str = "pathagent") -> None:
    """``start_disks`` for ``agent.core.model.Disk`` definitions (their pool, image and path indexes)."""
    start_records(http, [(d.id, d.pool, d.image, [p.index for p in d.paths]) for d in disks], prefix)


def start_records(http: str, disks: Iterable[tuple[str, str, str, Iterable[int]]], prefix: str = "pathagent") -> None:
    """The disk key ``{"pool", "image"}`` and one empty path key per index for each (id, pool, image,
    indexes), in 64-op transactions."""
    ops: list[dict[str, Any]] = []
    for d, pool, image, indexes in disks:
        rec = json.dumps({"pool": pool, "image": image}).encode()
        ops.append({"KV": {"Verb": "set", "Key": f"{prefix}/disks/{d}", "Value": base64.b64encode(rec).decode()}})
        ops += [{"KV": {"Verb": "set", "Key": f"{prefix}/disks/{d}/{i}", "Value": ""}} for i in indexes]
    for i in range(0, len(ops), 64):
        r = txn(http, ops[i:i + 64])
        r.raise_for_status()


def stop_disk(http: str, disk: str, prefix: str = "pathagent") -> None:
    r = txn(http, [{"KV": {"Verb": "delete-tree", "Key": f"{prefix}/disks/{disk}/"}},
                   {"KV": {"Verb": "delete", "Key": f"{prefix}/disks/{disk}"}}])
    r.raise_for_status()


def path_owners(http: str, prefix: str = "pathagent") -> dict[str, str | None]:
    """path "disk/index" -> holding session id (None when free)."""
    r = requests.get(f"http://{http}/v1/kv/{prefix}/disks/?recurse=true", timeout=10)
    if r.status_code == 404:
        return {}
    r.raise_for_status()
    out = {}
    for e in r.json():
        rest = e["Key"][len(prefix) + len("/disks/"):]
        if rest.count("/") == 1:
            out[rest] = e.get("Session")
    return out


class AgentProc:
    """One ``pathagent run`` process bound to one Consul agent."""

    def __init__(self, name: str, workdir: Path, consul_http: str, catalog: Path,
                 extra: str = "", lock_delay: float = 5.0, fence_after: float = 2.5,
                 test_timings: bool = True, ceph_conf: str | None = None) -> None:
        """``test_timings`` shortens confirmation interval, HTTP timeout and watch wait for tests;
        without it the agent runs with the production defaults (as the benchmark does). With
        ``ceph_conf`` the agent reads definitions from RBD image metadata (the ``rbd`` catalog) of that
        cluster instead of the JSON file ``catalog``."""
        self.name = name
        self.http = consul_http
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = self.dir / "state"
        self.config = self.dir / "pathagent.toml"
        self.log = self.dir / "agent.log"
        self._lock_delay, self._fence_after, self._test_timings = lock_delay, fence_after, test_timings
        self._extra, self._ceph_conf, self._catalog = extra, ceph_conf, catalog
        self._consul_extra = ""
        self._target_extra = ""
        self.write_config()
        self.p: subprocess.Popen[bytes] | None = None

    def extra_consul(self, toml: str) -> None:
        """More ``[consul]`` keys (applied at the next ``start``)."""
        self._consul_extra += toml

    def extra_target(self, toml: str) -> None:
        """More ``[target.fake]`` keys (applied at the next ``start``)."""
        self._target_extra += toml

    def write_config(self) -> None:
        timings = (f"lock_delay = {self._lock_delay}\nfence_after = {self._fence_after}\nconfirm_interval = 0.5\n"
                   "timeout = 0.8\nelection_stall = 1.0\nwait = 10\n") if self._test_timings else ""
        if self._ceph_conf:
            catalog_toml = (f'[catalog]\nbackend = "rbd"\n[ceph]\nconf = "{self._ceph_conf}"\nrefresh = 5\n'
                            'timeout = 3\n')
        else:
            catalog_toml = f'[catalog]\nbackend = "fake"\n[catalog.fake]\nfile = "{self._catalog}"\n'
        extra = self._extra
        if self._target_extra:
            if "[target.fake]\n" in extra:
                extra = extra.replace("[target.fake]\n", "[target.fake]\n" + self._target_extra, 1)
            else:
                extra += "[target.fake]\n" + self._target_extra
        self.config.write_text(f"""
[consul]
address = "{self.http}"
{timings}{self._consul_extra}[state]
dir = "{self.state}"
[target]
backend = "fake"
stop_time = 0.5
[network]
backend = "fake"
{catalog_toml}[placement]
grace = 2
rebalance_after = 2
[log]
level = "INFO"
{extra}
""")

    def start(self, env: dict[str, str] | None = None, rewrite: bool = True) -> "AgentProc":
        """Start ``pathagent run`` (the config is written afresh unless ``rewrite`` is false); ``env`` is
        added to the environment (e.g. ``NOTIFY_SOCKET``)."""
        if rewrite and self._dirty():
            self.write_config()
        full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.p = proc.spawn([*PATHAGENT, "--config", str(self.config), "run"], str(self.log), env=full)
        return self

    def _dirty(self) -> bool:
        """Whether ``extra_consul``/``extra_target`` added keys the written config lacks."""
        text = self.config.read_text() if self.config.exists() else ""
        return (self._consul_extra and self._consul_extra not in text) or \
            (self._target_extra and self._target_extra not in text) or False

    def cli(self, *args: str, timeout: float = 90) -> "subprocess.CompletedProcess[str]":
        """Run a ``pathagent`` command with this agent's config."""
        return subprocess.run([*PATHAGENT, "--config", str(self.config), *args], capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ, PYTHONPATH=str(REPO)))

    def guard_running(self) -> bool:
        """Whether this agent's watchdog guard process is alive."""
        return bool(proc.guard_pids(self.state))

    @property
    def pid(self) -> int:
        assert self.p is not None
        return self.p.pid

    def signal(self, sig: int) -> None:
        proc.signal_checked(self.pid, sig, "agent.cli")

    def wait_exit(self, timeout: float) -> int | None:
        assert self.p is not None
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def running(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def exported(self) -> set[str]:
        try:
            data = json.loads((self.state / "fake-targets.json").read_text())
        except FileNotFoundError:
            return set()
        except ValueError:
            return set()
        return set(data.get("paths", {}))

    def addresses(self) -> set[str]:
        """Paths whose floating IP this node has up (the fake network backend's record)."""
        try:
            data = json.loads((self.state / "fake-addresses.json").read_text())
        except (FileNotFoundError, ValueError):
            return set()
        return set(data.get("addresses", {}))

    def session(self) -> str | None:
        try:
            sid = json.loads((self.state / "session.json").read_text()).get("id")
        except (FileNotFoundError, ValueError, AttributeError):
            return None
        return sid if isinstance(sid, str) and sid else None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (an orderly stop: the agent disarms its guard), then make sure no guard of this state
        directory outlives the test (an agent that was killed leaves its guard behind by design)."""
        if self.p is not None and self.p.poll() is None:
            proc.signal_checked(self.pid, signal.SIGCONT, "agent.cli")
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        for pid in proc.guard_pids(self.state):
            proc.stop(pid, "plugins.guard")


def wait_for(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition",
             alive: "list[AgentProc] | None" = None) -> float:
    """Wait until ``pred()`` is truthy; returns the seconds it took, or raises AssertionError (also as
    soon as one of the ``alive`` agents has exited)."""
    start = time.monotonic()
    while True:
        for a in alive or ():
            if not a.running():
                raise AssertionError(f"agent {a.name} exited while waiting for {what}:\n{a.log_text()[-3000:]}")
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


if __name__ == "__main__":  # pragma: no cover
    print("import lab.agents from tests and benchmarks", file=sys.stderr)
