"""Network-namespace labs (see /work/shared/notes/netns.md) and running Python code inside a namespace.

``GatewayLab`` builds one L2 segment: a bridge in its own namespace, one namespace per gateway and per
initiator (each with ``eth0`` on the bridge), and a root-namespace veth leg at ``.1`` so that Ceph and
Consul started in the root namespace are reachable from every namespace. Addresses come from
198.18.0.0/15 only: a free ``198.18.X.0/24`` (or larger) is chosen per lab (checked against the root namespace's
addresses, under a host-wide lock), names carry a per-run prefix, and ``down`` removes everything
(also from ``__exit__``), so parallel runs do not collide.

``NetnsThread`` runs callables in a dedicated thread that has ``setns``-ed into a namespace: sockets and
netlink handles it opens, and subprocesses it forks, live in that namespace. (``os.setns`` needs Python
3.12; this uses ctypes. setns only affects the calling thread, hence the dedicated thread.)
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import ipaddress
import os
import subprocess
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``ns`` (``ip netns exec`` execs, so the pid is the command's own)."""
    return ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str, argv: Sequence[str], timeout: float = 10, check: bool = False,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(exec_argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=check,
                          env=env)


def setns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name``."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({name}): {os.strerror(e)}")
    finally:
        os.close(fd)


class NetnsThread:
    """A worker thread living in network namespace ``name``; ``call(fn, ...)`` runs ``fn`` there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{name}",
                                                           initializer=setns, initargs=(name,))

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return self._pool.submit(fn, *args, **kw).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "NetnsThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LOCK_PATH = "/run/pathagent-lab.lock"


def _used_networks() -> list[ipaddress.IPv4Network]:
    """198.18.0.0/15 networks in use in the root namespace (addresses and routes)."""
    lab = ipaddress.IPv4Network("198.18.0.0/15")
    out: list[ipaddress.IPv4Network] = []
    for line in ip("-4", "-o", "addr").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            out.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in ip("-4", "route").stdout.splitlines():
        dst = line.split()[0]
        if dst[0].isdigit():
            out.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return [n for n in out if n.overlaps(lab)]


def _used_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


class GatewayLab:
    """The gateway lab: ``gateways`` (``.11``, ``.12`` ...) and ``initiators`` (``.50`` ...) on one bridge,
    plus the root-namespace leg ``.1`` (``host_ip``), in a free ``198.18.X.0/prefixlen`` (default /24;
    a /22 leaves room for 900 floating IPs).

    Namespace names are ``{prefix}{name}`` (``ns(name)``); every one has ``lo`` up and ``eth0`` on the
    bridge. Floating path IPs: ``vip(n)`` = network address + 100 + n. Use as a context manager, or call
    ``up``/``down``.
    """

    def __init__(self, gateways: Sequence[str] = ("gwa", "gwb", "gwc"), initiators: Sequence[str] = ("ini",),
                 prefix: str | None = None, network: str | None = None, prefixlen: int = 24) -> None:
        self.gateways = list(gateways)
        self.initiators = list(initiators)
        self.prefix = prefix
        self.network = ipaddress.ip_network(network) if network else None
        self.prefixlen = self.network.prefixlen if self.network else prefixlen
        self.created: list[str] = []
        self.host_if = ""
        self.taps: list[str] = []                              # qemu guests' taps (lab.guest)
        self.guest_offsets: set[int] = set()                   # addresses claimed by guests
        self._cleanups: dict[str, Callable[[], None]] = {}     # run first by down()

    # addresses
    @property
    def subnet(self) -> str:
        return str(self.network)

    def addr(self, offset: int) -> str:
        assert self.network is not None, "lab not up"
        return str(self.network.network_address + offset)

    @property
    def host_ip(self) -> str:
        return self.addr(1)

    def node_ip(self, name: str) -> str:
        if name in self.gateways:
            return self.addr(11 + self.gateways.index(name))
        return self.addr(50 + self.initiators.index(name))

    def vip(self, n: int) -> str:
        assert self.network is not None, "lab not up"
        if not 0 <= n < self.network.num_addresses - 102:
            raise ValueError(f"vip index 0..{self.network.num_addresses - 103} in {self.network}")
        return self.addr(100 + n)

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # qemu guests on the bridge (lab.guest): an address, a tap, a cleanup hook
    GUEST_OFFSETS = (*range(30, 50), *range(20, 30))

    def claim_guest_offset(self, offset: int | None = None) -> int:
        """Claim a host offset for a guest: ``offset`` if given (checked free), else the first free one
        of ``GUEST_OFFSETS`` (between the gateways' ``.11+`` and the initiators' ``.50+``)."""
        taken = {1, *self.guest_offsets, *(11 + i for i in range(len(self.gateways))),
                 *(50 + i for i in range(len(self.initiators)))}
        if offset is None:
            offset = next((o for o in self.GUEST_OFFSETS if o not in taken), None)
            if offset is None:
                raise RuntimeError("no free guest address in the lab")
        elif offset in taken or offset >= 100:
            raise ValueError(f"offset {offset} is taken (or in the floating-IP range)")
        self.guest_offsets.add(offset)
        return offset

    def release_guest_offset(self, offset: int) -> None:
        self.guest_offsets.discard(offset)

    def add_tap(self, tap: str) -> None:
        """A tap device on the bridge (in the bridge namespace), up; qemu run there attaches to it."""
        assert len(tap) <= 15, tap
        self.del_tap(tap)
        ip("tuntap", "add", "dev", tap, "mode", "tap", ns=self.bridge_ns)
        self.taps.append(tap)
        ip("link", "set", tap, "master", "br0", "up", ns=self.bridge_ns)

    def set_tap(self, tap: str, up: bool) -> None:
        ip("link", "set", tap, "up" if up else "down", ns=self.bridge_ns)

    def del_tap(self, tap: str) -> None:
        if tap in self.taps:
            self.taps.remove(tap)
        if self.bridge_ns in self.created:
            ip("link", "del", tap, ns=self.bridge_ns, check=False)

    def add_cleanup(self, key: str, fn: Callable[[], None]) -> None:
        """``fn`` runs at the start of ``down`` (e.g. kill a guest's qemu) unless removed before."""
        self._cleanups[key] = fn

    def remove_cleanup(self, key: str) -> None:
        self._cleanups.pop(key, None)

    @property
    def bridge_ns(self) -> str:
        return self.ns("br")

    def up(self) -> "GatewayLab":
        with open(_LOCK_PATH, "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            if self.prefix is None:
                names = _used_names()
                n = os.getpid() % 1000
                while any(x.startswith(f"pl{n}-") for x in names):
                    n = (n + 1) % 1000
                self.prefix = f"pl{n}-"
            if self.network is None:
                used = _used_networks()
                self.network = next((n for n in ipaddress.ip_network("198.18.0.0/16").subnets(new_prefix=self.prefixlen)
                                     if n.network_address.packed[2] >= 2 and not any(n.overlaps(u) for u in used)),
                                    None)
                if self.network is None:
                    raise RuntimeError(f"no free /{self.prefixlen} in 198.18.0.0/16 for a lab")
            try:
                self._build()
            except BaseException:
                self.down()
                raise
        return self

    def _add_ns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("link", "set", "lo", "up", ns=name)

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        ip("link", "add", "br0", "type", "bridge", ns=br)
        ip("link", "set", "br0", "up", ns=br)
        for name in self.gateways + self.initiators:
            n = self.ns(name)
            self._add_ns(n)
            ip("link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", n, ns=br)
            ip("link", "set", name, "master", "br0", "up", ns=br)
            ip("addr", "add", f"{self.node_ip(name)}/{self.prefixlen}", "dev", "eth0", ns=n)
            ip("link", "set", "eth0", "up", ns=n)
        self.host_if = f"{self.prefix}h"[:15]
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", "host", "netns", br)
        ip("link", "set", "host", "master", "br0", "up", ns=br)
        ip("addr", "add", f"{self.host_ip}/{self.prefixlen}", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")

    def down(self) -> None:
        """Remove the root-namespace leg and every namespace this lab created (idempotent). Processes
        still running inside them must be stopped by whoever started them."""
        if self.host_if:
            ip("link", "del", self.host_if, check=False)
            self.host_if = ""
        for name in reversed(self.created):
            ip("netns", "del", name, check=False)
        self.created.clear()

    def __enter__(self) -> "GatewayLab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def all_ns(self) -> Iterator[str]:
        yield from self.created

