"""The full iSCSI lab: real gateways serving RBD over iSCSI, for the end-to-end tests, the benchmark and
the demo.

``IscsiLab(workdir)`` builds, and ``close()`` tears down (also as a context manager):

- a ``GatewayLab``: gateway namespaces (default gwa, gwb, gwc) and an initiator namespace ``ini`` on one
  bridge, in a free ``198.18.X.0/24`` (or ``prefixlen``), the root namespace at ``.1``;
- a micro Ceph (``lab.ceph.MicroCeph``) bound to ``.1``; with ``cephx=True`` it requires cephx and has
  exactly the Ceph users that docs/deployment.md tells an admin to create (``guide_users``: parsed from the
  guide's commands, so the guide is what runs), and the agents run as the guide's ``client_id``;
- ``lab.consul.ConsulCluster`` in netns mode: a server in the root namespace on ``.1`` and one client
  agent inside each gateway namespace (node name = gateway name; HTTP on 127.0.0.1:8500 inside it);
- one ``pathagent run`` per gateway namespace (``[target] backend = "tgt"``, ``[network] backend =
  "iproute"``, catalog ``rbd``), which starts its own tgtd there, with its Prometheus metrics on the
  gateway's own address (``[metrics] listen = "IP:9120"``; ``Gateway.metrics()`` scrapes it from the root
  namespace over the bridge and parses it with the Prometheus text parser).

Disks are made the way ``pathagent disk create`` + ``disk start`` make them: an RBD image whose metadata
``pathagent.disk`` holds the definition (``agent.core.schema``), and the Consul keys
``{prefix}/disks/{id}`` and ``{prefix}/disks/{id}/{index}``. Floating path IPs come from ``.100`` up.

Everything started here is stopped by recorded PID (cmdline-checked) in ``close()``: agents (SIGTERM:
they unexport and release), then any tgtd left (by the backend's pid file), Consul, Ceph, namespaces.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

from lab import proc
from lab.ceph import MicroCeph
from lab.agents import start_defined
from lab.consul import ClientSpec, ConsulCluster
from lab.gwtools import RbdImages
from lab.netns import GatewayLab, ip

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
PREFIX = "pathagent"
METRICS_PORT = 9120

#: one scrape: (sample name, its labels sorted) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


GUIDE = REPO / "docs" / "deployment.md"
GUIDE_CLIENT_ID = "pathagent"       # the guide's `[ceph] client_id`


def guide_users(gateways: Iterable[str], guide: Path = GUIDE) -> list[tuple[str, list[str]]]:
    """The Ceph users (entity, caps as ``ceph auth`` takes them) that the deployment guide's
    ``ceph auth get-or-create`` commands create, with ``$gw`` as each of ``gateways``."""
    import re
    import shlex
    text = guide.read_text().replace("\\\n", " ")
    out: list[tuple[str, list[str]]] = []
    for m in re.finditer(r"ceph auth get-or-create (\S+)(.*?)>", text):
        entity, caps = m.group(1), shlex.split(m.group(2))
        names = list(gateways) if "$gw" in entity else [""]
        out += [(entity.replace("$gw", n), caps) for n in names]
    if not out:
        raise AssertionError(f"no `ceph auth get-or-create` command in {guide}")
    return out


def parse_metrics(text: str) -> Samples:
    """A Prometheus text exposition, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(samples: Samples | None, name: str, **labels: str) -> float | None:
    """One sample's value (``None``: not in the scrape, or no scrape)."""
    return None if samples is None else samples.get((name, tuple(sorted(labels.items()))))


def path_exported(samples: Samples | None) -> dict[str, float]:
    """``pathagent_path_exported`` by path ("disk/index")."""
    if samples is None:
        return {}
    return {f"{dict(lb)['disk']}/{dict(lb)['index']}": v for (name, lb), v in samples.items()
            if name == "pathagent_path_exported"}


def path_owners(entries: Iterable[dict[str, Any]], prefix: str = PREFIX) -> dict[str, str | None]:
    """From the entries of ``GET /v1/kv/{prefix}/disks/?recurse``: path "disk/index" -> the node holding its
    lock (None when free)."""
    out: dict[str, str | None] = {}
    for e in entries:
        rest = e["Key"][len(prefix) + len("/disks/"):]
        if rest.count("/") != 1:
            continue
        node = None
        if e.get("Session") and e.get("Value"):
            try:
                node = json.loads(base64.b64decode(e["Value"]))["node"]
            except (ValueError, KeyError):
                node = None
        out[rest] = node
    return out


@dataclass
class Gateway:
    name: str
    ns: str
    ip: str
    dir: Path
    config: Path
    p: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    def start(self) -> None:
        self.p = proc.spawn([PYTHON, "-m", "agent.cli", "--config", str(self.config), "run"], str(self.log),
                            env=self.env, netns=self.ns)

    def running(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def signal(self, sig: int) -> None:
        if self.p is not None:
            proc.signal_checked(self.p.pid, sig, "agent.cli")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (orderly stop: unexport, release) and wait; SIGKILL after ``timeout``."""
        if self.p is None or self.p.poll() is not None:
            return None if self.p is None else self.p.returncode
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.p.wait(5)
            return None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ip}:{METRICS_PORT}/metrics"

    def metrics(self, timeout: float = 2.0) -> Samples | None:
        """The agent's ``/metrics``, parsed (``None`` when it does not answer: the agent or its link is down)."""
        try:
            r = requests.get(self.metrics_url, timeout=timeout)
            r.raise_for_status()
        except requests.RequestException:
            return None
        return parse_metrics(r.text)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
        """A ``pathagent`` command run on this gateway (its namespace, its config, its Consul agent)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, PYTHON, "-m", "agent.cli", "--config", str(self.config),
                               *args], capture_output=True, text=True, timeout=timeout, env=self.env)

    def guard_pids(self) -> list[int]:
        return proc.guard_pids(self.state)

    def status(self) -> dict[str, Any]:
        """The agent's ``status.json`` (empty when absent)."""
        try:
            data: dict[str, Any] = json.loads((self.state / "status.json").read_text())
            return data
        except (OSError, ValueError):
            return {}

    def session(self) -> str | None:
        s = self.status().get("session")
        return str(s) if s else None

    def tgtd_pid(self) -> int | None:
        try:
            pid = int((self.state / "tgt" / "tgtd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if proc.alive(pid) and "tgtd" in proc.cmdline(pid) else None

    def addresses(self) -> set[str]:
        """IPv4 addresses on the gateway's eth0 besides its own."""
        out = json.loads(ip("-4", "-j", "addr", "show", "dev", "eth0", ns=self.ns).stdout)
        return {a["local"] for link in out for a in link.get("addr_info", []) if a["local"] != self.ip}

    def targets(self) -> set[str]:
        """IQNs of the targets this gateway's tgtd serves (empty when tgtd is down)."""
        env = dict(os.environ, TGT_IPC_SOCKET=str(self.state / "tgt" / "socket"))
        r = subprocess.run(["tgtadm", "-C", "0", "--lld", "iscsi", "--mode", "target", "--op", "show"], env=env,
                           capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return set()
        return {ln.split(": ", 1)[1].strip() for ln in r.stdout.splitlines() if ln.startswith("Target ")}


class IscsiLab:
    """See the module docstring. ``agent_extra`` is appended to every agent's config (TOML), ``tgt_extra``
    to its ``[target.tgt]`` table, ``consul_extra`` to its ``[consul]`` table. The Consul timings satisfy the
    agent's fencing inequality (``fence_after + stop_time < lock_delay``, ``fence_after > election_stall
    1.0 + confirm_interval 0.5 + timeout 0.8``); ``stop_time`` bounds the fence (every address down, then
    a SIGKILL of tgtd). ``shipped_timings`` leaves all of those out of the agents' configs instead, so they
    run with the defaults of ``agent/config.py`` (what a site gets; the benchmarks measure those); the
    attributes ``lock_delay``, ``fence_after`` and ``stop_time`` then hold the defaults."""

    def __init__(self, workdir: str | os.PathLike[str], gateways: Iterable[str] = ("gwa", "gwb", "gwc"),
                 agent_extra: str = "", catalog: str = "rbd", lock_delay: float = 5.5,
                 fence_after: float = 2.5, stop_time: float = 1.0, prefixlen: int = 24,
                 tgt_extra: str = "", consul_extra: str = "", shipped_timings: bool = False,
                 placement_extra: str = "", cephx: bool = False) -> None:
        self.dir = Path(workdir)
        self.cephx = cephx
        self.client_id = "admin"
        self.names = list(gateways)
        self.agent_extra = agent_extra
        self.placement_extra = placement_extra      # keys added to every agent's [placement] table
        self.tgt_extra = tgt_extra
        self.consul_extra = consul_extra
        self.catalog = catalog
        self.lock_delay = lock_delay
        self.fence_after = fence_after
        self.stop_time = stop_time
        self.shipped_timings = shipped_timings
        if shipped_timings:
            from agent.config import Config, ConsulConfig
            c = ConsulConfig()
            self.lock_delay, self.fence_after = c.lock_delay, c.fence_after
            self.stop_time = Config.stop_time
        self.net = GatewayLab(gateways=self.names, initiators=("ini",), prefixlen=prefixlen)
        self.ceph: MicroCeph | None = None
        self.consul: ConsulCluster | None = None
        self.gw: dict[str, Gateway] = {}
        self.disks: dict[str, Any] = {}       # id -> agent.core.model.Disk
        self.images: RbdImages | None = None    # the lab's own librados handle (client.admin)
        self._vip = 0

    # --- build ----------------------------------------------------------------------------------------
    def start(self, agents: bool = True) -> "IscsiLab":
        try:
            self._start(agents)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, agents: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.net.up()
        self.ceph = MicroCeph(self.dir / "ceph", ip=self.net.host_ip, cephx=self.cephx).start()
        if self.cephx:
            for entity, caps in guide_users(self.names):
                self.ceph.add_user(entity, caps)
            self.client_id = GUIDE_CLIENT_ID
        self.images = RbdImages(self.ceph.conf_path)
        self.consul = ConsulCluster(str(self.dir / "consul"), servers=1, mode="netns", server_ip=self.net.host_ip,
                                    clients=[ClientSpec(n, self.net.node_ip(n), self.net.ns(n)) for n in self.names])
        self.consul.start()
        for n in self.names:
            gdir = self.dir / n
            g = Gateway(n, self.net.ns(n), self.net.node_ip(n), gdir, gdir / "pathagent.toml",
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                            filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))))
            gdir.mkdir(parents=True, exist_ok=True)
            g.config.write_text(self._agent_config(g))
            self.gw[n] = g
        if agents:
            self.start_agents()

    def start_agents(self, timeout: float = 30) -> float:
        """Start every gateway's agent; returns once each has a Consul session (seconds it took)."""
        for g in self.gw.values():
            g.start()
        return self.wait(lambda: all(g.session() for g in self.gw.values()) or self._dead_agent(), timeout,
                         "every agent's session")

    def _dead_agent(self) -> bool:
        for g in self.gw.values():
            if not g.running():
                raise AssertionError(f"agent {g.name} exited:\n{g.log_text()[-3000:]}")
        return False

    def _agent_config(self, g: Gateway) -> str:
        assert self.ceph is not None
        catalog = ("[catalog]\nbackend = \"rbd\"\n" if self.catalog == "rbd" else
                   f"[catalog]\nbackend = \"fake\"\n[catalog.fake]\nfile = \"{self.dir / 'catalog.json'}\"\n")
        timings = "" if self.shipped_timings else (
            f"lock_delay = {self.lock_delay}\nfence_after = {self.fence_after}\nconfirm_interval = 0.5\n"
            "timeout = 0.8\nelection_stall = 1.0\n")
        stop_time = "" if self.shipped_timings else f"stop_time = {self.stop_time}\n"
        return f"""
[consul]
address = "127.0.0.1:8500"
{timings}wait = 10
{self.consul_extra}
[ceph]
conf = "{self.ceph.conf_path}"
client_id = "{self.client_id}"
pool = "rbd"
refresh = 5
timeout = 5
[state]
dir = "{g.state}"
[target]
backend = "tgt"
port = 3260
{stop_time}[target.tgt]
product_rev = "{g.name[:4]}"
ceph_timeout = 3
{self.tgt_extra}
[network]
backend = "iproute"
{catalog}
[placement]
grace = 2
{self.placement_extra}[metrics]
listen = "{g.ip}:{METRICS_PORT}"
[log]
level = "INFO"
{self.agent_extra}
"""

    @staticmethod
    def wait(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> float:
        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)
        return time.monotonic() - t0

    @property
    def http(self) -> str:
        """The Consul server's HTTP address (root namespace)."""
        assert self.consul is not None
        return self.consul.http_address("s1")

    # --- disks ----------------------------------------------------------------------------------------
    def vip(self) -> str:
        v = self.net.vip(self._vip)
        self._vip += 1
        return v

    def create_disk(self, paths: int = 2, size: int = 64 << 20, initiators: tuple[str, ...] | None = None,
                    chap: tuple[str, str] | None = None, mutual: tuple[str, str] | None = None,
                    start: bool = True) -> Any:
        """An RBD image with its definition in the metadata; ``start`` also creates the Consul keys."""
        from agent.core import schema
        from agent.core.model import Chap, Disk, PathSpec
        assert self.images is not None
        did = uuid.uuid4().hex[:12]
        image = f"pathagent-{did}"            # the CLI's naming: `pathagent disk start|stop ID` find it
        d = Disk(id=did, name=f"lab-{did}", iqn=f"iqn.2016-05.io.pathagent:{did}", serial=str(uuid.uuid4()),
                 paths=tuple(PathSpec(i, self.vip(), self.net.prefixlen) for i in range(1, paths + 1)), pool="rbd", image=image,
                 size=size, initiators=initiators, chap=Chap(*chap) if chap else None,
                 mutual_chap=Chap(*mutual) if mutual else None)
        self.images.define(d)
        self.disks[did] = d
        if self.catalog != "rbd":
            cat = self.dir / "catalog.json"
            docs = json.loads(cat.read_text()) if cat.exists() else {}
            docs[did] = schema.to_dict(d)
            tmp = cat.with_suffix(".tmp")
            tmp.write_text(json.dumps(docs))
            os.replace(tmp, cat)
        if start:
            self.start_disks([d])
        return d

    def start_disks(self, disks: Iterable[Any]) -> None:
        start_defined(self.http, disks, PREFIX)

    def read_image(self, d: Any, offset: int, length: int) -> bytes:
        assert self.images is not None
        return self.images.read(d.image, offset, length)

    def write_image(self, d: Any, offset: int, data: bytes) -> None:
        """Write straight into the disk's image (tests that must show a check can fail)."""
        assert self.images is not None
        self.images.write(d.image, offset, data)

    # --- observation ----------------------------------------------------------------------------------
    def owners(self) -> dict[str, str | None]:
        """path "disk/index" -> node holding its lock (None when free)."""
        r = requests.get(f"http://{self.http}/v1/kv/{PREFIX}/disks/?recurse=true", timeout=5)
        if r.status_code == 404:
            return {}
        return path_owners(r.json())

    def served_by(self) -> dict[str, str]:
        """path IP -> gateway that has it up."""
        return {a: g.name for g in self.gw.values() for a in g.addresses()}

    def all_served(self, disks: Iterable[Any] | None = None) -> bool:
        """Every path of ``disks`` (default: all) is locked by a node that has its IP up."""
        owners = self.owners()
        by_ip = self.served_by()
        for d in disks if disks is not None else self.disks.values():
            for p in d.paths:
                node = owners.get(f"{d.id}/{p.index}")
                if node is None or by_ip.get(p.ip) != node:
                    return False
        return True

    def ini(self) -> str:
        return self.net.ns("ini")

    # --- teardown -------------------------------------------------------------------------------------
    def close(self) -> None:
        for g in self.gw.values():
            try:
                g.stop(timeout=30)
            except Exception as e:  # keep tearing down
                print(f"iscsilab: stopping agent {g.name}: {e}", file=sys.stderr)
        for g in self.gw.values():
            for guard in g.guard_pids():   # a guard outlives a killed agent by design
                proc.stop(guard, "plugins.guard")
            tgtd = g.tgtd_pid()
            if tgtd is not None:
                proc.kill(tgtd, "tgtd")
        if self.consul is not None:
            self.consul.teardown()
            self.consul = None
        if self.images is not None:
            self.images.close()
            self.images = None
        if self.ceph is not None:
            self.ceph.stop()
            self.ceph = None
        self.net.down()

    def __enter__(self) -> "IscsiLab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
