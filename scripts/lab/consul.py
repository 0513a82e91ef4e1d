"""A real Consul 1.8.7 cluster for tests, benchmarks and the demo (settings from /work/shared/notes/consul.md).

``ConsulCluster(workdir, servers=1, clients=["gwa", "gwb"])`` runs ``servers`` server agents (``s1``, ``s2`` ...)
and one client agent per entry of ``clients``, each a foreground ``consul agent`` process started through
``lab.proc.spawn``, with its own ``data_dir`` and log file under ``workdir``:

- ``workdir/<name>/agent.json`` (config), ``workdir/<name>/data`` (data_dir), ``workdir/<name>.log`` (stdout+stderr).
- Every agent's ``agent.json`` is what ``pathagent consul-config`` writes for that role: the document of
  ``agent.core.consulconf.render`` (the generator of the command, whose template the shipped
  ``etc/consul/{gateway,server}.json`` are), so the lab measures and tests the generated configs with the
  shipped timing. The lab's own choices go through the generator's options: ``bind`` = ``advertise`` = the
  node's address, ``retry_join`` to every server with ``retry_interval = "1s"``, ``bootstrap_expect =
  servers``, its ports (``dns = -1``, ``grpc = -1``), and optionally gossip encryption (``encrypt``), ACLs
  with a master token that every agent also uses as its agent token (``acl_master_token``; the cluster's
  own HTTP calls send it) and RPC TLS (``tls``). Only ``log_level`` and the caller's ``extra_config`` are
  added outside the generator. Both roles have ``leave_on_terminate = false`` and ``skip_leave_on_interrupt
  = true`` (so SIGTERM and SIGINT look like a crash to the cluster).
- ``reinstall(name)`` stops an agent hard, wipes its data dir and starts it again under the same name with a
  new node ID (a gateway reinstalled: docs/consul.md, "Replacing a gateway").

Modes:

- ``"loopback"`` (default): node i binds ``127.0.0.(2+i)`` (servers first, then clients) with its own block of
  four ports (server, serf_lan, serf_wan, http). The ports come from ``base_port`` if given, otherwise from a
  host-wide allocator: blocks in 20000..32767 (below the ephemeral range) that are bindable (TCP and UDP) on the
  node's address and not reserved by another live cluster (reservations live in
  ``$TMPDIR/pathagent-consul-ports.json``, under a lock, and are dropped by ``teardown`` or when their owner process
  is gone). Two clusters in one run, or two test runs at once, therefore don't collide.
- ``"netns"``: servers run in the root namespace on ``server_ip`` (an address reachable from the namespaces, e.g.
  the root-namespace leg of the lab bridge) with allocated ports; a client given as ``ClientSpec(name, ip, netns)``
  runs as ``ip netns exec NETNS consul agent ...`` bound to ``ip`` with the standard ports (8300/8301/8302, HTTP
  8500) and ``client_addr = "<ip> 127.0.0.1"``, so code inside that namespace can use ``127.0.0.1:8500`` and the
  root namespace uses ``<ip>:8500``. The caller creates and removes the namespaces and the bridge (after
  ``teardown``). A client given as a plain name in netns mode runs in the root namespace on ``server_ip``.

Processes are only ever signalled by their recorded pid after checking that ``/proc/PID/cmdline`` still names
this agent's config file (``lab.proc``); nothing is looked up by process name.

CLI (used by the demo)::

    python -m lab.consul start WORKDIR --clients a,b,c [--servers 1] [--base-port P]
        [--mode netns --server-ip IP --clients name:ip:netns,...]
    python -m lab.consul stop WORKDIR

``start`` stays in the foreground; once the cluster is ready it writes ``WORKDIR/cluster.json`` (atomically;
``to_json()``: addresses, pids, log paths, the owner pid) and prints ``ready``. SIGTERM/SIGINT tear the cluster
down and remove ``cluster.json``. ``stop`` signals that owner and waits for it, and stops any agent left over
if the owner is already gone.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

from agent.core import consulconf
from agent.core.consulconf import AgentSpec, TlsFiles
from lab import proc

REPO = Path(__file__).resolve().parents[2]
ENV_BINARY = "PATHAGENT_CONSUL"

# Serf member status codes as returned by /v1/agent/members.
MEMBER_NONE, MEMBER_ALIVE, MEMBER_LEAVING, MEMBER_LEFT, MEMBER_FAILED = 0, 1, 2, 3, 4

CONSUL_ETC = REPO / "etc" / "consul"
#: The tuned keys of the generated configs (``agent.core.consulconf.tuning``), as the benchmarks name them.
SHIPPED_KEYS = ("gossip_lan", "performance", "leave_on_terminate", "skip_leave_on_interrupt", "session_ttl_min")


def shipped_config(role: Literal["gateway", "server"]) -> dict[str, Any]:
    """``etc/consul/<role>.json``, decoded (the generator's template: tests/unit/test_consulconf.py)."""
    data: dict[str, Any] = json.loads((CONSUL_ETC / f"{role}.json").read_text())
    return data


def shipped_tuning(role: Literal["gateway", "server"]) -> dict[str, Any]:
    """The tuned keys every generated config of that role has: what every lab agent of it runs with."""
    cfg = consulconf.tuning(role == "server")
    return {k: cfg[k] for k in SHIPPED_KEYS if k in cfg}


#: gossip_lan of every agent (servers and gateways alike: every agent probes)
FAST_GOSSIP: dict[str, Any] = dict(consulconf.GOSSIP_LAN)
STANDARD_PORTS: dict[str, int] = {"server": 8300, "serf_lan": 8301, "serf_wan": 8302, "http": 8500}
PORT_KINDS = ("server", "serf_lan", "serf_wan", "http")
PORT_RANGE = (20000, 32768)         # below net.ipv4.ip_local_port_range (32768..60999 here)
POLL = 0.05                         # seconds between readiness polls

Mode = Literal["loopback", "netns"]


class ConsulNotFound(RuntimeError):
    """The consul binary is missing (run scripts/setup)."""


class ClusterError(RuntimeError):
    """A cluster (or one agent) did not reach the expected state; the message carries a log tail."""


def consul_binary() -> str:
    """Path of the consul binary: ``$PATHAGENT_CONSUL``, else ``<repo>/.cache/bin/consul``.

    Raises ConsulNotFound (saying to run scripts/setup) if it is not an executable file."""
    path = os.environ.get(ENV_BINARY) or str(REPO / ".cache" / "bin" / "consul")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        src = f"${ENV_BINARY}" if os.environ.get(ENV_BINARY) else "the default location"
        raise ConsulNotFound(f"no executable Consul binary at {path} ({src}): run `bash scripts/setup` "
                             f"(it installs Consul 1.8.7 into {REPO / '.cache' / 'bin'}), or set {ENV_BINARY}")
    return path


def consul_missing() -> str | None:
    """Why real-Consul tests can't run here (None when the binary is present)."""
    try:
        consul_binary()
    except ConsulNotFound as e:
        return str(e)
    return None


@dataclass(frozen=True)
class ClientSpec:
    """A client agent. ``netns`` (netns mode only) runs it inside that namespace, bound to ``ip``."""

    name: str
    ip: str | None = None
    netns: str | None = None


@dataclass
class Node:
    """One agent of the cluster (read it, don't mutate it)."""

    name: str
    server: bool
    ip: str
    netns: str | None
    ports: dict[str, int]
    dir: Path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    frozen: bool = False
    starts: int = 0

    @property
    def config(self) -> Path:
        return self.dir / "agent.json"

    @property
    def http(self) -> str:
        return f"{self.ip}:{self.ports['http']}"

    @property
    def serf_lan(self) -> str:
        return f"{self.ip}:{self.ports['serf_lan']}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def needle(self) -> str:
        """What the agent's /proc/PID/cmdline must contain before it is signalled."""
        return str(self.config)

    def running(self) -> bool:
        return self.popen is not None and proc.alive(self.popen.pid) and self.needle in proc.cmdline(self.popen.pid)


# --- HTTP -----------------------------------------------------------------------------------------------

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))    # never via an environment proxy


def http_json(addr: str, path: str, timeout: float = 1.0, method: str = "GET", data: bytes | None = None,
              token: str = "") -> Any:
    """``method`` ``http://addr/path`` (with ``token`` as ``X-Consul-Token`` when given) and decode the JSON
    body (None for an empty body). Raises OSError (URLError, timeouts, refused) or urllib.error.HTTPError."""
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method,
                                 headers={"X-Consul-Token": token} if token else {})
    with _opener.open(req, timeout=timeout) as r:
        body = r.read()
    return json.loads(body) if body.strip() else None


# Log lines caused by our own readiness polling; left out of the tails in error messages.
POLL_NOISE = ("agent.http: Request error: method=GET url=/v1/status/leader",
              "agent.router.manager: No servers available")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, without the noise of the readiness polling."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 1024 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    kept = [ln for ln in text.splitlines() if not any(n in ln for n in POLL_NOISE)]
    return "\n".join(kept[-lines:])


def _why(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            body = e.read().decode(errors="replace").strip()
        except OSError:
            body = ""
        return f"HTTP {e.code}: {body or e.reason}"
    return str(e)


# --- port allocation --------------------------------------------------------------------------------------

def _registry_paths() -> tuple[Path, Path]:
    d = Path(tempfile.gettempdir())
    return d / "pathagent-consul-ports.json", d / "pathagent-consul-ports.lock"


def _bindable(ip: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((ip, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


class PortReservation:
    """A host-wide reservation of ``[lo, hi)`` for this process; ``release`` drops it (idempotent)."""

    def __init__(self, lo: int, hi: int, key: str) -> None:
        self.lo, self.hi, self.key = lo, hi, key

    @staticmethod
    def _locked(update: Callable[[dict[str, Any]], None]) -> None:
        reg, lock = _registry_paths()
        with open(lock, "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                entries: dict[str, Any] = json.loads(reg.read_text())
            except (OSError, ValueError):
                entries = {}
            entries = {k: v for k, v in entries.items() if proc.alive(int(v.get("pid", 0)))}
            update(entries)
            tmp = reg.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, reg)

    @classmethod
    def allocate(cls, ips: Sequence[str], key: str, base: int | None = None) -> "PortReservation":
        """Reserve ``4 * len(ips)`` consecutive ports; block i (server, serf_lan, serf_wan, http) must be
        bindable on ``ips[i]``. With ``base`` only that block is tried (ClusterError if busy)."""
        size = 4 * len(ips)
        got: list[int] = []

        def free(b: int, taken: list[tuple[int, int]]) -> bool:
            if any(b < hi and lo < b + size for lo, hi in taken):
                return False
            return all(_bindable(ips[i // 4], b + i) for i in range(size))

        def update(entries: dict[str, Any]) -> None:
            taken = [(int(v["lo"]), int(v["hi"])) for v in entries.values()]
            if base is not None:
                candidates: Iterator[int] = iter([base])
            else:
                lo, hi = PORT_RANGE
                slots = (hi - lo) // size
                first = (os.getpid() * 7 + len(entries)) % slots
                candidates = (lo + ((first + k) % slots) * size for k in range(slots))
            for b in candidates:
                if free(b, taken):
                    entries[key] = {"pid": os.getpid(), "lo": b, "hi": b + size}
                    got.append(b)
                    return

        cls._locked(update)
        if not got:
            where = f"ports {base}..{base + size - 1}" if base is not None else f"a free block of {size} ports"
            raise ClusterError(f"no {where} on {sorted(set(ips))} (busy or reserved by another cluster)")
        return cls(got[0], got[0] + size, key)

    def release(self) -> None:
        if self.key:
            key, self.key = self.key, ""
            self._locked(lambda entries: entries.pop(key, None))


# --- the cluster ------------------------------------------------------------------------------------------

class ConsulCluster:
    """A real Consul cluster of ``servers`` servers (``s1``..) and the given client agents.

    Contract: ``start()`` returns once there is a Raft leader and every agent knows the leader, is a live serf
    member seen from a server, and has a passing ``serfHealth`` check in the catalog (so a session with
    ``node=<agent>`` can be created at once); ``teardown()`` stops every process this object started (by pid,
    cmdline-checked), is idempotent, and also runs from ``__exit__`` (``__enter__`` starts the cluster).
    Fault injection acts on one agent by node name: ``kill`` (SIGKILL), ``stop`` (SIGTERM; a crash to the
    cluster since ``leave_on_terminate = false``), ``leave`` (graceful), ``freeze``/``thaw`` (SIGSTOP/SIGCONT),
    ``restart`` (same config and data dir, waits until it is a live member again).
    """

    def __init__(self, workdir: str, servers: int = 1, clients: Sequence[str | ClientSpec] = (),
                 mode: Mode = "loopback", base_port: int | None = None, server_ip: str | None = None,
                 extra_config: Mapping[str, Any] | None = None, binary: str | None = None,
                 encrypt: str = "", acl_master_token: str = "",
                 tls: Mapping[str, TlsFiles] | None = None) -> None:
        """``extra_config`` is shallow-merged into every agent's JSON config (e.g. ``{"log_level": "DEBUG"}``).
        ``encrypt``: the gossip key of every agent. ``acl_master_token``: ACLs on (default deny) with this
        master token on the servers, also every agent's agent token and the token of this object's own
        calls (``token``). ``tls``: ``{"server": ..., "client": ...}`` files for RPC TLS by role.
        Raises ValueError for a bad topology and ConsulNotFound when there is no binary."""
        if servers < 1:
            raise ValueError("a cluster needs at least one server")
        if mode not in ("loopback", "netns"):
            raise ValueError(f"mode must be 'loopback' or 'netns', not {mode!r}")
        if mode == "netns" and not server_ip:
            raise ValueError("netns mode needs server_ip (a root-namespace address reachable from the namespaces)")
        self.binary = binary or consul_binary()
        self.workdir = Path(workdir).resolve()
        self.mode: Mode = mode
        self.extra_config = dict(extra_config or {})
        self.encrypt = encrypt
        self.token = acl_master_token
        self.tls = dict(tls or {})
        if self.tls and set(self.tls) != {"server", "client"}:
            raise ValueError("tls needs the files of both roles: {'server': TlsFiles, 'client': TlsFiles}")
        self._base_port = base_port
        self._server_ip = server_ip
        self._reservation: PortReservation | None = None
        self._started = False
        specs = [c if isinstance(c, ClientSpec) else ClientSpec(c) for c in clients]
        names = [f"s{i + 1}" for i in range(servers)] + [c.name for c in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique (servers are s1..s{servers}): {names}")
        netnses = [c.netns for c in specs if c.netns]
        if len(set(netnses)) != len(netnses):
            raise ValueError("at most one client agent per network namespace (they use the standard ports)")
        for c in specs:
            if c.netns and mode != "netns":
                raise ValueError(f"client {c.name}: a netns is only allowed in netns mode")
            if c.netns and not c.ip:
                raise ValueError(f"client {c.name}: a client in a netns needs its ip")
        self._specs = specs
        self.nodes: dict[str, Node] = {}
        self.server_names = names[:servers]
        self.client_names = [c.name for c in specs]

    # --- addresses --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.server_names + self.client_names

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in this cluster (nodes: {self.names}; "
                           f"started: {self._started})") from None

    def http_address(self, name: str) -> str:
        """``"ip:port"`` of ``name``'s HTTP API, reachable from the root namespace."""
        return self.node(name).http

    @property
    def server_address(self) -> str:
        """HTTP ``"ip:port"`` of the first server."""
        return self.http_address(self.server_names[0])

    def pid(self, name: str) -> int | None:
        return self.node(name).pid

    def log_path(self, name: str) -> Path:
        return self.node(name).log

    def log_tail(self, name: str, lines: int = 30) -> str:
        return tail(self.node(name).log, lines)

    def running(self, name: str) -> bool:
        """The agent's process exists and is not a zombie (a frozen agent counts as running)."""
        return self.node(name).running()

    # --- lifecycle ----------------------------------------------------------------------------------------
    def _layout(self) -> None:
        loopback = [f"127.0.0.{2 + i}" for i in range(len(self.names))]
        root_ns: list[str] = []            # nodes in the root namespace: they get allocated ports
        ips: dict[str, str] = {}
        specs = {c.name: c for c in self._specs}
        for i, name in enumerate(self.names):
            spec = specs.get(name)
            if spec is not None and spec.netns:
                assert spec.ip is not None
                ips[name] = spec.ip
                continue
            if self.mode == "netns":
                assert self._server_ip is not None
                ips[name] = self._server_ip
            else:
                ips[name] = spec.ip if spec is not None and spec.ip else loopback[i]
            root_ns.append(name)
        if len(self.names) > 250 and self.mode == "loopback":
            raise ValueError("at most 250 nodes in loopback mode")
        key = f"{os.getpid()}-{id(self)}-{self.workdir}"
        self._reservation = PortReservation.allocate([ips[n] for n in root_ns], key, self._base_port)
        for name in self.names:
            spec = specs.get(name)
            if name in root_ns:
                b = self._reservation.lo + 4 * root_ns.index(name)
                ports = {k: b + j for j, k in enumerate(PORT_KINDS)}
            else:
                ports = dict(STANDARD_PORTS)
            self.nodes[name] = Node(name=name, server=name in self.server_names, ip=ips[name],
                                    netns=spec.netns if spec is not None else None, ports=ports,
                                    dir=self.workdir / name, log=self.workdir / f"{name}.log")

    def spec(self, n: Node) -> AgentSpec:
        """What ``pathagent consul-config`` is asked for this agent (see the module docstring)."""
        return AgentSpec(
            server=n.server, node=n.name, bind=n.ip,
            join=tuple(self.nodes[s].serf_lan for s in self.server_names),
            data_dir=str(n.dir / "data"), client_addr=f"{n.ip} 127.0.0.1" if n.netns else n.ip,
            bootstrap_expect=len(self.server_names), retry_interval="1s",
            ports={**n.ports, "dns": -1, "grpc": -1}, encrypt=self.encrypt, acl=bool(self.token),
            agent_token=self.token, master_token=self.token if n.server else "",
            tls=self.tls.get("server" if n.server else "client"))

    def _config(self, n: Node) -> dict[str, Any]:
        cfg = consulconf.render(self.spec(n))
        cfg["log_level"] = "INFO"
        cfg.update(self.extra_config)
        return cfg

    def _spawn(self, n: Node) -> None:
        n.dir.mkdir(parents=True, exist_ok=True)
        n.config.write_text(json.dumps(self._config(n), indent=2) + "\n")
        n.starts += 1
        with open(n.log, "a") as f:
            f.write(f"==== lab.consul: start #{n.starts} of {n.name} at {time.strftime('%H:%M:%S')} ====\n")
        n.popen = proc.spawn([self.binary, "agent", f"-config-file={n.config}"], str(n.log), netns=n.netns)
        n.frozen = False

    def start(self, timeout: float = 30.0) -> float:
        """Start every agent and wait until the cluster is ready (see the class contract); returns the seconds
        it took. On failure everything started is torn down and ClusterError (with log tails) is raised."""
        if self._started:
            raise RuntimeError("cluster already started")
        self._started = True
        t0 = time.monotonic()
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._layout()
            for s in self.server_names:
                self._spawn(self.nodes[s])
            # Clients join at once if the servers' serf ports already listen (else their first retry is 1 s later).
            self._wait(lambda: all(self._http_up(s) for s in self.server_names), min(timeout, 10.0),
                       "the servers' HTTP APIs", self.server_names)
            for c in self.client_names:
                self._spawn(self.nodes[c])
            self.wait_ready(self.names, timeout - (time.monotonic() - t0))
        except BaseException:
            self.teardown()
            raise
        return time.monotonic() - t0

    def teardown(self, grace: float = 2.0) -> None:
        """Stop every agent this object started: SIGCONT+SIGTERM to all at once, SIGKILL after ``grace`` s,
        reap them, release the port reservation. Idempotent; safe after a partial start."""
        nodes = [n for n in self.nodes.values() if n.popen is not None]
        for n in nodes:
            assert n.pid is not None
            proc.signal_checked(n.pid, signal.SIGCONT, n.needle)
            proc.signal_checked(n.pid, signal.SIGTERM, n.needle)
        end = time.monotonic() + grace
        for n in nodes:
            assert n.pid is not None
            if not proc.wait_dead(n.pid, max(0.0, end - time.monotonic())):
                proc.kill(n.pid, n.needle)
        for n in nodes:
            self._reap(n)
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def __enter__(self) -> "ConsulCluster":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    @staticmethod
    def _reap(n: Node) -> None:
        if n.popen is not None:
            try:
                n.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
            n.frozen = False

    # --- readiness ----------------------------------------------------------------------------------------
    def _http_up(self, name: str) -> bool:
        try:
            http_json(self.nodes[name].http, "/v1/agent/self", timeout=0.5, token=self.token)
            return True
        except (OSError, ValueError):
            return False

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str, blame: Sequence[str]) -> float:
        t0 = time.monotonic()
        while True:
            for name in blame:
                n = self.nodes[name]
                if n.popen is not None and n.popen.poll() is not None:
                    raise ClusterError(f"consul agent {name} exited with code {n.popen.returncode} while waiting "
                                       f"for {what}; {n.log} (tail):\n{tail(n.log)}")
            if pred():
                return time.monotonic() - t0
            waited = time.monotonic() - t0
            if waited > timeout:
                logs = "\n".join(f"--- {b}: {self.nodes[b].log} (tail) ---\n{tail(self.nodes[b].log, 20)}"
                                 for b in blame)
                raise ClusterError(f"timed out after {timeout:.1f} s waiting for {what}\n{logs}")
            time.sleep(POLL if waited < 3.0 else 4 * POLL)

    def _reference_server(self, exclude: str | None = None) -> str | None:
        """A running, unfrozen server (other than ``exclude`` if possible) to ask about membership."""
        live = [s for s in self.server_names if not self.nodes[s].frozen and self.nodes[s].running()]
        others = [s for s in live if s != exclude]
        pick = others or live
        return pick[0] if pick else None

    def _not_ready(self, names: Sequence[str]) -> dict[str, str]:
        """name -> why it is not ready yet (absent when ready)."""
        why: dict[str, str] = {}
        members: dict[str, dict[str, int]] = {}
        health: dict[str, dict[str, str]] = {}
        for name in names:
            n = self.nodes[name]
            try:
                leader = http_json(n.http, "/v1/status/leader", token=self.token)
            except (OSError, ValueError) as e:
                why[name] = f"/v1/status/leader failed ({_why(e)})"
                continue
            if not leader:
                why[name] = "no leader known"
                continue
            ref = self._reference_server(exclude=name) or name
            if ref not in members:
                try:
                    members[ref] = self.members(via=ref)
                except (OSError, ValueError) as e:
                    why[name] = f"member list of {ref} unavailable ({_why(e)})"
                    continue
            status = members[ref].get(name, MEMBER_NONE)
            if status != MEMBER_ALIVE:
                why[name] = f"member status {status} as seen by {ref}"
                continue
            if ref not in health:
                try:
                    checks = http_json(self.nodes[ref].http, "/v1/health/state/any", token=self.token)
                    health[ref] = {c["Node"]: c["Status"] for c in checks if c.get("CheckID") == "serfHealth"}
                except (OSError, ValueError) as e:
                    why[name] = f"health checks of {ref} unavailable ({_why(e)})"
                    continue
            check = health[ref].get(name, "not registered")
            if check != "passing":
                why[name] = f"catalog serfHealth {check}"
        return why

    def wait_ready(self, names: Sequence[str] | None = None, timeout: float = 30.0) -> float:
        """Wait until each of ``names`` (default: all) knows the leader, is a live member as seen from a server
        and has a passing ``serfHealth`` catalog check; returns the seconds waited. ClusterError (with the
        log tails of the laggards) on timeout."""
        todo = list(names if names is not None else self.names)
        last: dict[str, str] = {}

        def ready() -> bool:
            last.clear()
            last.update(self._not_ready(todo))
            return not last

        t0 = time.monotonic()
        try:
            return self._wait(ready, timeout, f"leader + live membership of {todo}", todo)
        except ClusterError as e:
            if "timed out" not in str(e):
                raise
            lag = list(last) or todo
            if any("no leader" in w for w in last.values()):
                lag = list(dict.fromkeys(self.server_names + lag))
            detail = "; ".join(f"{k}: {v}" for k, v in last.items())
            logs = "\n".join(f"--- {b}: {self.nodes[b].log} (tail) ---\n{tail(self.nodes[b].log, 25)}" for b in lag)
            took = time.monotonic() - t0
            raise ClusterError(f"Consul cluster not ready after {took:.1f} s: {detail}\n{logs}") from None

    # --- queries ------------------------------------------------------------------------------------------
    def members(self, via: str | None = None) -> dict[str, int]:
        """node name -> serf status (1 alive, 2 leaving, 3 left, 4 failed) from ``via``'s
        ``/v1/agent/members`` (default: a running server)."""
        ref = via or self._reference_server()
        if ref is None:
            raise ClusterError("no running server to ask for members")
        return {m["Name"]: int(m["Status"])
                for m in http_json(self.nodes[ref].http, "/v1/agent/members", token=self.token)}

    def member_status(self, name: str, via: str | None = None) -> int:
        """``name``'s serf status seen by ``via`` (MEMBER_NONE if it is not listed)."""
        return self.members(via).get(name, MEMBER_NONE)

    def wait_member_status(self, name: str, status: int, timeout: float = 10.0, via: str | None = None) -> float:
        """Wait until ``member_status(name, via) == status``; returns the seconds waited (ClusterError on timeout)."""
        def pred() -> bool:
            try:
                return self.member_status(name, via) == status
            except (OSError, ValueError, ClusterError):
                return False
        return self._wait(pred, timeout, f"member {name} to reach status {status}", [])

    def leader(self, via: str | None = None) -> str:
        """Raft leader ``"ip:server_port"`` as seen by ``via`` (default: a running server); "" if none."""
        ref = via or self._reference_server()
        if ref is None:
            return ""
        return str(http_json(self.nodes[ref].http, "/v1/status/leader", token=self.token) or "")

    def sessions(self, http: str | None = None) -> list[dict[str, Any]]:
        """``/v1/session/list`` through ``http`` (default: the first server)."""
        return list(http_json(http or self.server_address, "/v1/session/list", token=self.token) or [])

    # --- fault injection ----------------------------------------------------------------------------------
    def _live(self, name: str) -> Node:
        n = self.node(name)
        if not n.running():
            raise ClusterError(f"consul agent {name} is not running")
        return n

    def kill(self, name: str) -> None:
        """SIGKILL ``name``'s agent and reap it (returns once it is dead)."""
        n = self._live(name)
        assert n.pid is not None
        proc.kill(n.pid, n.needle)
        self._reap(n)

    def stop(self, name: str, grace: float = 5.0) -> None:
        """SIGTERM (SIGKILL after ``grace`` s) and reap. With ``leave_on_terminate = false`` the cluster sees
        a failure, not a leave."""
        n = self._live(name)
        assert n.pid is not None
        if n.frozen:
            proc.signal_checked(n.pid, signal.SIGCONT, n.needle)
        proc.stop(n.pid, n.needle, grace)
        self._reap(n)

    def leave(self, name: str, timeout: float = 15.0) -> None:
        """Graceful leave (``consul leave``): the node's status becomes left (3); waits for the process to exit."""
        n = self._live(name)
        r = subprocess.run([self.binary, "leave", f"-http-addr=http://{n.http}"], capture_output=True, text=True,
                           timeout=timeout, env=self.cli_env())
        if r.returncode != 0:
            raise ClusterError(f"consul leave {name}: {r.stdout}{r.stderr}")
        assert n.pid is not None
        if not proc.wait_dead(n.pid, timeout):
            proc.kill(n.pid, n.needle)
        self._reap(n)

    @staticmethod
    def _wait_threads(pid: int, stopped: bool, timeout: float = 5.0) -> None:
        """Wait until every thread of ``pid`` is (or no longer is) in state T: signal delivery is asynchronous."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                states = [proc.state(int(t)) for t in os.listdir(f"/proc/{pid}/task")]
            except FileNotFoundError:
                return
            if all((s == "T") == stopped for s in states if s is not None):
                return
            time.sleep(0.005)
        raise ClusterError(f"pid {pid}: threads still {'running' if stopped else 'stopped'} after {timeout} s")

    def freeze(self, name: str) -> None:
        """SIGSTOP the agent and return once all its threads are stopped (it answers neither gossip nor HTTP)."""
        n = self._live(name)
        assert n.pid is not None
        if proc.signal_checked(n.pid, signal.SIGSTOP, n.needle):
            n.frozen = True
            self._wait_threads(n.pid, stopped=True)

    def thaw(self, name: str) -> None:
        """SIGCONT a frozen agent and return once its threads run again."""
        n = self._live(name)
        assert n.pid is not None
        if proc.signal_checked(n.pid, signal.SIGCONT, n.needle):
            n.frozen = False
            self._wait_threads(n.pid, stopped=False)

    def restart(self, name: str, timeout: float = 30.0) -> float:
        """Start ``name`` again with the same config and data dir (stopping it first if it still runs) and wait
        until it is ready again (``wait_ready``: knows the leader, live member, ``serfHealth`` passing);
        returns the seconds that took."""
        n = self.node(name)
        if n.running():
            self.stop(name)
        t0 = time.monotonic()
        self._spawn(n)
        self.wait_ready([name], timeout)
        return time.monotonic() - t0

    def wipe(self, name: str) -> None:
        """A host reinstalled: SIGKILL ``name``'s agent if it runs and remove its data dir, so that the next
        ``restart`` starts it under the same name with a new node ID and no state (config, log and ports
        stay)."""
        n = self.node(name)
        if n.running():
            self.kill(name)
        shutil.rmtree(n.dir / "data", ignore_errors=True)

    def node_id(self, name: str) -> str:
        """``name``'s node ID as its own agent says (``/v1/agent/self``)."""
        return str(http_json(self.node(name).http, "/v1/agent/self", timeout=2, token=self.token)["Config"]["NodeID"])

    def catalog_node_id(self, name: str, via: str | None = None) -> str | None:
        """The node ID the servers' catalog has for the node named ``name`` (None: not registered)."""
        ref = via or self._reference_server()
        if ref is None:
            raise ClusterError("no running server to ask for the catalog")
        data = http_json(self.nodes[ref].http, f"/v1/catalog/node/{name}", timeout=2, token=self.token)
        return str(data["Node"]["ID"]) if data and data.get("Node") else None

    def cli_env(self) -> dict[str, str]:
        """The environment for a ``consul`` command against this cluster (its token, not on the command line)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP_")}
        if self.token:
            env["CONSUL_HTTP_TOKEN"] = self.token
        return env

    # --- description ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Addresses, pids and log paths (what the CLI writes to ``cluster.json``)."""
        return {
            "mode": self.mode,
            "workdir": str(self.workdir),
            "owner_pid": os.getpid(),
            "server_address": self.server_address,
            "servers": self.server_names,
            "clients": self.client_names,
            "nodes": {n.name: {"server": n.server, "ip": n.ip, "netns": n.netns, "http": n.http,
                               "serf_lan": n.serf_lan, "ports": n.ports, "pid": n.pid, "log": str(n.log),
                               "config": str(n.config)}
                      for n in self.nodes.values()},
        }


# --- CLI --------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _parse_clients(text: str) -> list[str | ClientSpec]:
    out: list[str | ClientSpec] = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        if len(parts) == 1:
            out.append(item)
        elif len(parts) == 3:
            out.append(ClientSpec(parts[0], parts[1], parts[2]))
        else:
            raise SystemExit(f"bad client {item!r}: use NAME or NAME:IP:NETNS")
    return out


def _cmd_start(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    state = workdir / "cluster.json"
    if state.exists():
        print(f"{state} exists: is a cluster already running? (python -m lab.consul stop {workdir})", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = ConsulCluster(str(workdir), servers=args.servers, clients=_parse_clients(args.clients),
                            mode=args.mode, base_port=args.base_port, server_ip=args.server_ip)
    try:
        took = cluster.start(args.timeout)
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(cluster.to_json(), indent=2) + "\n")
        os.replace(tmp, state)
        print(f"ready in {took:.2f}s: {state}", flush=True)
        while True:
            time.sleep(3600)
    except _Stop:
        return 0
    except ClusterError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.teardown()
        state.unlink(missing_ok=True)


def _cmd_stop(args: argparse.Namespace) -> int:
    state = Path(args.workdir).resolve() / "cluster.json"
    try:
        info = json.loads(state.read_text())
    except FileNotFoundError:
        print(f"no {state}: nothing to stop", file=sys.stderr)
        return 0
    owner = int(info["owner_pid"])
    if proc.signal_checked(owner, signal.SIGTERM, "lab.consul") and not proc.wait_dead(owner, args.timeout):
        print(f"owner {owner} did not exit within {args.timeout} s", file=sys.stderr)
        return 1
    for name, n in info["nodes"].items():      # the owner died without tearing down (e.g. SIGKILL)
        if n.get("pid"):
            proc.signal_checked(int(n["pid"]), signal.SIGCONT, n["config"])
            proc.stop(int(n["pid"]), n["config"])
    state.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.consul", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start a cluster and stay in the foreground until SIGTERM/SIGINT")
    st.add_argument("workdir")
    st.add_argument("--clients", default="", help="NAME[,NAME...] or, in netns mode, NAME:IP:NETNS[,...]")
    st.add_argument("--servers", type=int, default=1)
    st.add_argument("--mode", choices=("loopback", "netns"), default="loopback")
    st.add_argument("--server-ip", default=None, help="netns mode: root-namespace address the servers bind")
    st.add_argument("--base-port", type=int, default=None)
    st.add_argument("--timeout", type=float, default=60.0)
    sp = sub.add_parser("stop", help="stop the cluster started in WORKDIR")
    sp.add_argument("workdir")
    sp.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args(argv)
    try:
        return _cmd_start(args) if args.cmd == "start" else _cmd_stop(args)
    except (ConsulNotFound, ValueError) as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
