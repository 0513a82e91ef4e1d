"""Gateways in LIO guests (tier 4): each ``lab.guest.Guest`` runs what a production gateway runs, its own
Consul client agent and ``pathagent run`` on kernel LIO, against a micro Ceph and a Consul server on the
host side of the lab bridge.

``GuestGatewayLab(lab, workdir)`` on a ``lab.netns.GatewayLab`` (the tier's ``lio_lab``):

- ``start_services()``: a ``lab.ceph.MicroCeph`` and a one-server ``lab.consul.ConsulCluster`` (netns mode),
  both bound to ``lab.host_ip``, where the guests reach them;
- ``add(guest)``: turns a booted guest into a gateway (``GuestGateway``): writes ``/etc/ceph/ceph.conf``
  (the cluster's monitors and its no-auth settings, nothing of the host's paths), the Consul client config
  that ``pathagent consul-config --client`` generates (binary: the checkout's ``.cache/bin/consul``, seen
  through the share) and a ``pathagent.toml`` with ``[target] backend = "lio"``, ``[network] backend =
  "iproute"``, the ``rbd`` catalog and every other key at its default (so fencing is ``ceph-blocklist`` and
  the watchdog ``guard``; no timing key is set); then starts the Consul agent, waits until the server
  sees it alive, and starts ``pathagent run`` (``.venv/bin/pathagent`` of the checkout, at the host's path);
- ``create_disk()``: a disk made the way ``pathagent disk create`` + ``disk start`` make it (an RBD image
  with the definition in its ``pathagent.disk`` metadata, then the Consul keys), path IPs from ``.100`` up;
- ``owners()``, ``session()``, ``registered()``, ``leader()``, ``fenced()``, ``read_image()``, ``blocklist()``:
  what the host sees in Consul and Ceph.

``agent_extra`` (TOML) is appended to every guest's ``pathagent.toml``, for a test that must deviate from
a default (and says why); empty by default.

The guests' Consul agent and pathagent log into the guest's ctl share (``GuestGateway.log_path``), so the
logs of a crashed guest survive it. ``close()`` stops the agents (SIGTERM: unexport, release) of the guests
still running, then Consul and Ceph; the guests themselves belong to whoever booted them.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import subprocess
import time
import urllib.error
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lab.agents import start_defined
from lab.ceph import MicroCeph
from lab.gwtools import RbdImages
from lab.consul import ConsulCluster, consul_binary, http_json
from lab.guest import TOP, Guest, GuestError
from lab.iscsilab import path_owners
from lab.netns import GatewayLab

PREFIX = "pathagent"
SESSION_NAME = "iSCSITarget"
PATHAGENT = str(TOP / ".venv" / "bin" / "pathagent")
GUEST_CONF = "/etc/pathagent/pathagent.toml"
GUEST_CEPH_CONF = "/etc/ceph/ceph.conf"
GUEST_CONSUL_CONF = "/etc/consul.d/consul.json"
GUEST_STATE = "/var/lib/pathagent"
GUEST_CTL = "/mnt/ctl"                     # the guest's ctl share: Guest.ctl on the host


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``pred`` until it is true; the seconds it took (``AssertionError`` after ``timeout``)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def client_ceph_conf(host_conf: str) -> str:
    """A client-only ceph.conf for a guest from the micro cluster's: its ``[global]`` fsid, monitors and
    auth settings and its ``[client]`` timeouts (none of the daemons' host paths)."""
    keep_global = ("fsid", "mon host", "auth cluster required", "auth service required", "auth client required")
    out = ["# client config for a LIO guest gateway (scripts/lab/guestgw.py)", "[global]"]
    client: list[str] = []
    section = ""
    for raw in Path(host_conf).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key = line.split("=", 1)[0].strip()
        if section == "global" and key in keep_global:
            out.append(line)
        elif section == "client":
            client.append(line)
    return "\n".join(out + ["[client]", *client]) + "\n"


@dataclass
class GuestGateway:
    """One gateway in a guest: its Consul client agent and its ``pathagent run`` (guest pids)."""

    guest: Guest
    consul_pid: int | None = None
    agent_pid: int | None = None
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    checked: float = 0.0             # when its processes were last checked (GuestGatewayLab._dead)

    @property
    def name(self) -> str:
        return self.guest.name

    @property
    def ip(self) -> str:
        return self.guest.ip

    def log_path(self, what: str) -> Path:
        """The host path of a guest log (``agent``, ``consul``), in the guest's ctl share."""
        return self.guest.ctl / f"{what}.log"

    def log_text(self, what: str = "agent", tail: int = 6000) -> str:
        try:
            return self.log_path(what).read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def addresses(self) -> set[str]:
        """IPv4 addresses on the guest's eth0 besides its own."""
        r = self.guest.exec(["ip", "-4", "-j", "addr", "show", "dev", "eth0"], timeout=30, check=True)
        out = json.loads(r.stdout or "[]")
        return {a["local"] for link in out for a in link.get("addr_info", []) if a["local"] != self.ip}

    def enabled_tpgs(self, iqn: str) -> list[int]:
        """The tags of the target's TPGs that are enabled in the guest's LIO (configfs)."""
        tags = self.guest.call("plugins.lio.configfs:tpg_tags", iqn)
        return [int(t) for t in tags if self.guest.call("plugins.lio.configfs:enabled", iqn, int(t))]

    def krbd_clients(self) -> list[str]:
        """The client address (``ip:0/nonce``, what a blocklist names) of every krbd mapping in the guest."""
        r = self.guest.exec(["sh", "-c", "cat /sys/bus/rbd/devices/*/client_addr 2>/dev/null"], timeout=30)
        return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]

    def agent_running(self) -> bool:
        if self.agent_pid is None or not self.guest.alive:
            return False
        try:
            return self.guest.wait(self.agent_pid, timeout=0) is None
        except GuestError:
            return False

    def stop_agent(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the agent (orderly: addresses down, unexport, release) and wait; SIGKILL after ``timeout``."""
        if self.agent_pid is None or not self.guest.alive:
            return None
        try:
            if self.guest.wait(self.agent_pid, timeout=0) is not None:
                return self.guest.wait(self.agent_pid, timeout=0)
            self.guest.signal(self.agent_pid, "SIGTERM")
            rc = self.guest.wait(self.agent_pid, timeout=timeout)
            if rc is None:
                self.guest.signal(self.agent_pid, "SIGKILL")
                rc = self.guest.wait(self.agent_pid, timeout=10)
            return rc
        except GuestError:
            return None


class GuestGatewayLab:
    """See the module docstring."""

    def __init__(self, lab: GatewayLab, workdir: str | Path, agent_extra: str = "") -> None:
        self.lab = lab
        self.dir = Path(workdir)
        self.agent_extra = agent_extra
        self.ceph: MicroCeph | None = None
        self.consul: ConsulCluster | None = None
        self.gw: dict[str, GuestGateway] = {}
        self.disks: dict[str, Any] = {}
        self.images: RbdImages | None = None
        self._vip = 0

    # --- host services ----------------------------------------------------------------------------------
    def start_services(self) -> "GuestGatewayLab":
        consul = consul_binary()
        if not Path(consul).resolve().is_relative_to(TOP):
            raise RuntimeError(f"the Consul binary {consul} is not inside the checkout {TOP}: the guests see only "
                               "the checkout (unset $PATHAGENT_CONSUL)")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.ceph = MicroCeph(self.dir / "ceph", ip=self.lab.host_ip).start()
            self.images = RbdImages(self.ceph.conf_path)
            self.consul = ConsulCluster(str(self.dir / "consul"), servers=1, mode="netns", server_ip=self.lab.host_ip)
            self.consul.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def http(self) -> str:
        """The Consul server's HTTP address (root namespace)."""
        assert self.consul is not None
        return self.consul.http_address("s1")

    @property
    def serf_join(self) -> str:
        assert self.consul is not None
        return self.consul.node("s1").serf_lan

    # --- gateways ---------------------------------------------------------------------------------------
    def agent_config(self, g: Guest) -> str:
        """The guest's pathagent.toml: the lio target, iproute, the rbd catalog; every timing at its default."""
        return f"""# a LIO guest gateway (scripts/lab/guestgw.py); every key not set here has its default
[consul]
address = "127.0.0.1:8500"
[ceph]
conf = "{GUEST_CEPH_CONF}"
[state]
dir = "{GUEST_STATE}"
[target]
backend = "lio"
[network]
backend = "iproute"
[catalog]
backend = "rbd"
{self.agent_extra}"""

    def consul_config(self, g: Guest) -> str:
        """What ``pathagent consul-config --client`` writes for this guest (run on the host: the same code)."""
        r = subprocess.run([PATHAGENT, "consul-config", "--client", "--node", g.name, "--bind", g.ip,
                            "--join", self.serf_join, "--data-dir", "/var/lib/consul"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"pathagent consul-config: {r.stderr.strip()}")
        json.loads(r.stdout)
        return r.stdout

    def add(self, *guests: Guest, timeout: float = 180.0) -> list[GuestGateway]:
        """Make gateways of booted guests, all at once: files, Consul agent (until the server sees it
        alive), then ``pathagent run`` (until it holds its node record: it has settled and counts for
        placement, so a disk started next gets its paths spread over the gateways at once)."""
        assert self.ceph is not None
        ceph_conf = client_ceph_conf(self.ceph.conf_path)
        gws = [GuestGateway(g) for g in guests]
        for gw in gws:
            self.gw[gw.name] = gw

        def one(gw: GuestGateway) -> None:
            g = gw.guest
            t0 = time.monotonic()
            g.write_file(GUEST_CEPH_CONF, ceph_conf, mkdir=True)
            g.write_file(GUEST_CONSUL_CONF, self.consul_config(g), mode=0o600, mkdir=True)
            g.write_file(GUEST_CONF, self.agent_config(g), mkdir=True)
            gw.consul_pid = g.spawn([consul_binary(), "agent", f"-config-file={GUEST_CONSUL_CONF}"],
                                    log=f"{GUEST_CTL}/consul.log")
            gw.timings["consul"] = wait_for(lambda: self.member_alive(gw.name) or self._dead(gw), timeout,
                                            f"{gw.name}'s Consul agent alive at the server", 0.2)
            t1 = time.monotonic()
            gw.agent_pid = g.spawn([PATHAGENT, "--config", GUEST_CONF, "run"], log=f"{GUEST_CTL}/agent.log",
                                   cwd=str(TOP))
            gw.started = time.monotonic()
            wait_for(lambda: self.session(gw.name) is not None or self._dead(gw), timeout,
                     f"{gw.name}'s pathagent session", 0.2)
            gw.timings["session"] = time.monotonic() - t1
            wait_for(lambda: self.registered(gw.name) or self._dead(gw), timeout, f"{gw.name}'s node record", 0.2)
            gw.timings["agent"] = time.monotonic() - t1
            gw.timings["total"] = time.monotonic() - t0

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(gws)) as ex:
            for f in [ex.submit(one, gw) for gw in gws]:
                f.result()
        return gws

    def _dead(self, gw: GuestGateway) -> bool:
        """Raise when the guest's Consul agent or pathagent exited (asked at most every 2 s: each question is
        a request the guest's control daemon answers on the guest's one, emulated, vCPU)."""
        now = time.monotonic()
        if now - gw.checked < 2.0:
            return False
        gw.checked = now
        g = gw.guest
        for what, pid in (("consul", gw.consul_pid), ("agent", gw.agent_pid)):
            if pid is not None and g.wait(pid, timeout=0) is not None:
                raise AssertionError(f"{gw.name}: {what} exited:\n{gw.log_text(what)}")
        return False

    # --- Consul -----------------------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 2.0) -> Any:
        try:
            return http_json(self.http, path, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def member_alive(self, node: str) -> bool:
        checks = self._get(f"/v1/health/node/{node}") or []
        return any(c.get("CheckID") == "serfHealth" and c.get("Status") == "passing" for c in checks)

    def session(self, node: str) -> str | None:
        """The id of ``node``'s pathagent session, if it has one."""
        for s in self._get(f"/v1/session/node/{node}") or []:
            if s.get("Name") == SESSION_NAME:
                return str(s["ID"])
        return None

    def registered(self, node: str) -> bool:
        """``node``'s agent holds its node record (it counts for placement: it has settled)."""
        return any(e.get("Session") for e in self._get(f"/v1/kv/{PREFIX}/nodes/{node}") or [])

    def owners(self) -> dict[str, str | None]:
        """path "disk/index" -> node holding its lock (None when free)."""
        return path_owners(self._get(f"/v1/kv/{PREFIX}/disks/?recurse=true") or [], PREFIX)

    def leader(self) -> str | None:
        """The node holding the pathagent leader key, if any."""
        for e in self._get(f"/v1/kv/{PREFIX}/leader") or []:
            if e.get("Session") and e.get("Value"):
                try:
                    return str(json.loads(base64.b64decode(e["Value"])).get("node"))
                except (ValueError, AttributeError):
                    return None
        return None

    def fenced(self, node: str) -> dict[str, Any] | None:
        """The leader's last fence record of ``node`` (``{"node", "session", "since", "summary"}``)."""
        for e in self._get(f"/v1/kv/{PREFIX}/fenced/{node}") or []:
            if e.get("Value"):
                try:
                    rec: dict[str, Any] = json.loads(base64.b64decode(e["Value"]))
                    return rec
                except ValueError:
                    return None
        return None

    # --- disks ------------------------------------------------------------------------------------------
    def vip(self) -> str:
        v = self.lab.vip(self._vip)
        self._vip += 1
        return v

    def create_disk(self, paths: int = 2, size: int = 64 << 20, initiators: tuple[str, ...] | None = None) -> Any:
        """An RBD image with its definition in the metadata, then the Consul keys (``disk start``)."""
        from agent.core.model import Disk, PathSpec
        assert self.images is not None
        did = uuid.uuid4().hex[:12]
        image = f"pathagent-{did}"
        d = Disk(id=did, name=f"lio-{did}", iqn=f"iqn.2016-05.io.pathagent:{did}", serial=str(uuid.uuid4()),
                 paths=tuple(PathSpec(i, self.vip(), self.lab.prefixlen) for i in range(1, paths + 1)),
                 pool="rbd", image=image, size=size, initiators=initiators)
        self.images.define(d)
        self.disks[did] = d
        start_defined(self.http, [d], PREFIX)
        return d

    def read_image(self, d: Any, offset: int, length: int) -> bytes:
        assert self.images is not None
        return self.images.read(d.image, offset, length)

    def blocklist(self) -> list[str]:
        """The addresses in the OSD blocklist (``ceph osd blocklist ls``)."""
        assert self.images is not None
        return self.images.blocklist()

    def served(self, d: Any, by: Iterable[GuestGateway] | None = None) -> dict[str, str]:
        """path "disk/index" -> its owner, for the paths whose owner is one of ``by`` (default: every gateway)
        and has the path IP up."""
        owners = self.owners()
        gws = {g.name: g for g in (by if by is not None else self.gw.values())}
        out: dict[str, str] = {}
        addrs: dict[str, set[str]] = {}
        for p in d.paths:
            o = owners.get(f"{d.id}/{p.index}")
            if o in gws:
                if o not in addrs:
                    addrs[o] = gws[o].addresses()
                if p.ip in addrs[o]:
                    out[f"{d.id}/{p.index}"] = o
        return out

    # --- teardown ---------------------------------------------------------------------------------------
    def close(self) -> None:
        live = [g for g in self.gw.values() if g.guest.alive]
        if live:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(live)) as ex:
                list(ex.map(lambda g: g.stop_agent(), live))
        if self.consul is not None:
            self.consul.teardown()
            self.consul = None
        if self.images is not None:
            self.images.close()
            self.images = None
        if self.ceph is not None:
            self.ceph.stop()
            self.ceph = None

    def __enter__(self) -> "GuestGatewayLab":
        return self.start_services()

    def __exit__(self, *exc: object) -> None:
        self.close()
