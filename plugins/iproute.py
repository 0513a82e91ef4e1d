"""``iproute`` network backend: floating path IPs as secondary addresses, through netlink (pyroute2), in
the caller's network namespace. Prose, record format and measurements: ``docs/network-iproute.md``.

- Ours = an address labelled ``<ifname>:<label>``, or recorded in ``{state_dir}/iproute.json`` for the
  interface it is on. Nothing else is ever removed.
- ``up`` records the address, then adds it, then announces it with ``ANNOUNCEMENTS`` gratuitous ARPs from
  one background ``arping``, which is recorded (pid and start time) before it may send. An IP up here
  and not ours, or up for another path, is a ``PermanentBackendError``.
- ``down`` removes the path's address and stops its announcement; it returns only when no address with
  the path's IP is left on this node, and raises ``TransientBackendError`` (address, interface, what to
  do) otherwise.
- ``fence`` takes no lock and may run in another thread or process on the same state dir: one netlink
  dump, every address of ours deleted, then every recorded or running announcement killed (and waited
  for), then the record rewritten. ``up`` that overlapped a ``fence`` of the same instance undoes itself.
- ``active`` reads the kernel. Netlink errors are ``TransientBackendError``, a missing interface or an
  invalid address ``PermanentBackendError``; IPv4 only.
- ``connections`` lists the established TCP connections to a path's IP (``/proc/net/tcp`` of the
  calling thread's namespace), read before a hand-over's ``down``; ``tickle`` sends each of them, from
  the IP just brought up here, a bare ACK (sequence and acknowledgement 0) that its TCP answers with an
  ACK of its own; that answer reaches this node, which resets the connection it does not know, and the
  initiator reconnects here at once. Raw IPv4 socket bound to the path IP (the kernel refuses to send
  from an address that is not here); rounds at ``TICKLE_AT`` on a thread of its own, stopped by a fence,
  by ``may_serve`` turning false, by ``close``, or once the IP is no longer here.
- ``up``/``down``/``active`` cost the same whatever the number of addresses: they read the kernel's
  addresses and interface names from an ``AddressMirror``, which follows the kernel's own rtnetlink
  notifications (drained at each call: a change completed before the call is in it) and dumps only when
  it starts, when it lost notifications, and every ``RESYNC_EVERY`` seconds; the record is read again only
  when its file changed, and written at most once per call. ``fence`` does not use either.
"""
from __future__ import annotations

import errno
import ipaddress
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from agent import statefile
from agent.backend import NetworkBackend, PluginContext
from agent.childenv import child_env
from agent.core.model import PathKey, PathSpec, Peer
from agent.core.schema import ROLE_RE
from agent.errors import BackendError, PermanentBackendError, TransientBackendError
from plugins import sysctl
from plugins.options import Options

log = logging.getLogger(__name__)

IFNAMSIZ = 15
#: gratuitous ARPs per ``up``, one a second (arping's interval); arping exits after ``ANNOUNCEMENTS`` s
ANNOUNCEMENTS = 3
#: how long ``fence``/``down`` wait for a killed announcement to be gone
KILL_WAIT = 0.2
#: the announcement waits on its stdin until its pid is recorded; EOF (the agent died first): no ARP
_GATE = 'read -r go && exec "$@"'

_Record = dict[str, dict[str, Any]]
FileKey = tuple[int, int, int]    # (inode, size, mtime in ns)

#: when ``tickle`` sends its rounds, in seconds after the call: the first once the announcement's first
#: gratuitous ARP has gone out (the initiator's answer must come here, not to the old owner's MAC), then
#: again after the 0.5 s for which Linux answers at most one out-of-window segment per connection
#: (net.ipv4.tcp_invalid_ratelimit), in case the first answer went to the old MAC
TICKLE_AT = (0.02, 0.6, 1.5)

#: the mirror dumps the kernel's addresses again after this many seconds even when no notification was lost
RESYNC_EVERY = 60.0
#: receive buffer of the mirror's netlink socket (a burst of notifications beyond it is a resync, not an error)
MIRROR_RCVBUF = 4 << 20


@dataclass(frozen=True)
class _Addr:
    ip: str
    prefix: int
    index: int
    label: str | None


@dataclass(frozen=True)
class _Child:
    proc: subprocess.Popen[bytes]
    ip: str
    start: int | None     # /proc start time (clock ticks after boot); None: it was gone at once

# ------------------------------------------------------------------------------------------------ the mirror

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
IFLA_IFNAME = 3
_NLMSG = struct.Struct("=IHHII")          # nlmsghdr: len, type, flags, seq, pid
_IFADDR = struct.Struct("=BBBBI")         # ifaddrmsg: family, prefixlen, flags, scope, index
_IFINFO = struct.Struct("=BxHiII")        # ifinfomsg: family, type, index, flags, change
_RTA = struct.Struct("=HH")               # rtattr: len, type


@dataclass(frozen=True)
class NlEvent:
    """One rtnetlink message about an address or an interface: ``new`` (RTM_NEWADDR/NEWLINK, also a dump
    answer) or gone (RTM_DELADDR/DELLINK); ``addr`` for an address (``peer``: its IFA_ADDRESS), ``index``
    and ``name`` for an interface."""

    new: bool
    addr: _Addr | None = None
    peer: str = ""
    index: int = 0
    name: str = ""


def _attrs(data: bytes, off: int, end: int) -> Iterator[tuple[int, bytes]]:
    while off + _RTA.size <= end:
        alen, atype = _RTA.unpack_from(data, off)
        if alen < _RTA.size:
            return
        yield atype & 0x3FFF, data[off + _RTA.size:off + alen]
        off += (alen + 3) & ~3


def parse_netlink(data: bytes, seq: int) -> tuple[list[NlEvent], bool, int]:
    """The address (IPv4) and interface messages in one netlink datagram, in order; whether it holds the
    end of dump ``seq`` (NLMSG_DONE), and the errno of an error answer to ``seq`` (0: none). Interface
    messages of another family than AF_UNSPEC (a bridge port's, AF_BRIDGE) are not about the interface
    itself and are left out. Pure."""
    out: list[NlEvent] = []
    done, err = False, 0
    off = 0
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            break
        body = off + _NLMSG.size
        end = off + length
        if mtype == NLMSG_DONE and mseq == seq:
            done = True
        elif mtype == NLMSG_ERROR and mseq == seq and end - body >= 4:
            code = -struct.unpack_from("=i", data, body)[0]
            if code:
                err = code
        elif mtype in (RTM_NEWADDR, RTM_DELADDR) and end - body >= _IFADDR.size:
            family, prefix, _fl, _scope, index = _IFADDR.unpack_from(data, body)
            if family == socket.AF_INET:
                local = address = label = None
                for atype, value in _attrs(data, body + _IFADDR.size, end):
                    if atype == IFA_LOCAL and len(value) == 4:
                        local = socket.inet_ntoa(value)
                    elif atype == IFA_ADDRESS and len(value) == 4:
                        address = socket.inet_ntoa(value)
                    elif atype == IFA_LABEL:
                        label = value.split(b"\0", 1)[0].decode(errors="replace")
                ip = local or address
                if ip:
                    out.append(NlEvent(mtype == RTM_NEWADDR, _Addr(ip, prefix, index, label), peer=address or ""))
        elif mtype in (RTM_NEWLINK, RTM_DELLINK) and end - body >= _IFINFO.size:
            family, _type, index, _fl, _change = _IFINFO.unpack_from(data, body)
            if family == socket.AF_UNSPEC:
                name = ""
                for atype, value in _attrs(data, body + _IFINFO.size, end):
                    if atype == IFLA_IFNAME:
                        name = value.split(b"\0", 1)[0].decode(errors="replace")
                out.append(NlEvent(mtype == RTM_NEWLINK, index=index, name=name))
        off += (length + 3) & ~3
    return out, done, err


_Key = tuple[str, str, int, int]          # (local, peer, prefix, index): one kernel address


def _net(ip: str, prefix: int) -> tuple[int, int]:
    n = int(ipaddress.IPv4Address(ip))
    return (n & ~((1 << (32 - prefix)) - 1) & 0xFFFFFFFF if prefix else 0), prefix


class AddressState:
    """The IPv4 addresses and interface names of one network namespace as ``NlEvent``s describe them,
    indexed for the questions the backend asks: the addresses with a given IP (``at``), those whose subnet
    contains an IP and that do not carry ``<their interface>:<label>`` (``candidates``: what ``_choose``
    looks at), whether an IP is on an interface (``present``). Pure (no I/O)."""

    def __init__(self, label: str) -> None:
        self.suffix = f":{label}"
        self.links: dict[int, str] = {}
        self.addrs: dict[_Key, _Addr] = {}
        self._by_ip: dict[str, set[_Key]] = {}
        self._plain: dict[tuple[int, int], set[_Key]] = {}    # subnet -> addresses not labelled ours

    def clear(self) -> None:
        self.links.clear()
        self.addrs.clear()
        self._by_ip.clear()
        self._plain.clear()

    def _labelled(self, a: _Addr) -> bool:
        return a.label is not None and a.label == f"{self.links.get(a.index, '')}{self.suffix}"

    def apply(self, events: Iterable[NlEvent]) -> None:
        relabel = False
        for e in events:
            if e.addr is None:
                if e.new:
                    relabel |= self.links.get(e.index) != e.name
                    self.links[e.index] = e.name
                elif self.links.pop(e.index, None) is not None:
                    relabel = True
                continue
            a = e.addr
            k = (a.ip, e.peer, a.prefix, a.index)
            self._drop(k)
            if e.new:
                self.addrs[k] = a
                self._by_ip.setdefault(a.ip, set()).add(k)
                if not self._labelled(a):
                    self._plain.setdefault(_net(a.ip, a.prefix), set()).add(k)
        if relabel:                       # an interface came, went or was renamed: "ours by label" changed
            self._plain.clear()
            for k, a in self.addrs.items():
                if not self._labelled(a):
                    self._plain.setdefault(_net(a.ip, a.prefix), set()).add(k)

    def _drop(self, k: _Key) -> None:
        a = self.addrs.pop(k, None)
        if a is None:
            return
        _discard(self._by_ip, a.ip, k)
        _discard(self._plain, _net(a.ip, a.prefix), k)

    def at(self, ip: str) -> list[_Addr]:
        return [self.addrs[k] for k in sorted(self._by_ip.get(ip, ()))]

    def present(self, ip: str, ifname: str) -> bool:
        return any(self.links.get(k[3]) == ifname for k in self._by_ip.get(ip, ()))

    def candidates(self, ip: str) -> list[_Addr]:
        """Addresses whose subnet contains ``ip``, but for those labelled ``<their interface>:<label>``."""
        out = []
        for prefix in range(33):
            for k in sorted(self._plain.get(_net(ip, prefix), ())):
                out.append(self.addrs[k])
        return out


def _discard(index: dict[Any, set[_Key]], key: Any, k: _Key) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(k)
        if not bucket:
            del index[key]


class AddressMirror:
    """``AddressState`` kept current from the kernel: a netlink socket of this network namespace that
    receives every address and interface notification (RTMGRP_IPV4_IFADDR, RTMGRP_LINK). The kernel
    queues a notification before it acknowledges the change, so draining the socket at the start of a
    call (``refresh``) gives the state after every change completed before it. A dump (interfaces, then
    addresses) on the same socket starts it over: when it opens, after the receive buffer overflowed
    (ENOBUFS: notifications were lost), in another network namespace than before, and every
    ``RESYNC_EVERY`` seconds. Used under the backend's lock only; ``close`` releases the socket."""

    def __init__(self, label: str) -> None:
        self.state = AddressState(label)
        self._sock: socket.socket | None = None
        self._netns: tuple[int, int] | None = None
        self._synced = 0.0
        self._seq = itertools.count(1)
        self.resyncs = 0

    @staticmethod
    def _namespace() -> tuple[int, int]:
        st = os.stat("/proc/thread-self/ns/net")
        return st.st_dev, st.st_ino

    def refresh(self) -> AddressState:
        """The state now. ``OSError`` when netlink fails (the caller translates it)."""
        ns = self._namespace()
        if self._sock is None or ns != self._netns:
            self.close()
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                              NETLINK_ROUTE)
            try:
                for opt in (33, socket.SO_RCVBUF):          # SO_RCVBUFFORCE (root), else what is allowed
                    try:
                        s.setsockopt(socket.SOL_SOCKET, opt, MIRROR_RCVBUF)
                        break
                    except OSError:
                        continue
                s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
            except BaseException:
                s.close()
                raise
            self._sock, self._netns = s, ns
            self._resync()
        elif time.monotonic() - self._synced > RESYNC_EVERY:
            self._resync()
        else:
            try:
                self._drain()
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                log.info("iproute: address notifications were lost (the receive buffer overflowed); dumping again")
                self._resync()
        return self.state

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            self.state.apply(parse_netlink(data, -1)[0])

    def _resync(self) -> None:
        """Start over: throw away what is queued (older than the dump, and incomplete after an overflow),
        then dump interfaces and addresses, applying notifications that arrive meanwhile in order."""
        assert self._sock is not None
        for attempt in range(3):
            try:
                while True:
                    try:
                        self._sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno != errno.ENOBUFS:
                            raise
                self.state.clear()
                self._dump(RTM_GETLINK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0))
                self._dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0))
                self._synced = time.monotonic()
                self.resyncs += 1
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS or attempt == 2:
                    raise

    def _dump(self, mtype: int, body: bytes, timeout: float = 2.0) -> None:
        """Ask for a dump and apply everything the socket receives until its end (notifications that
        arrive in between are applied in the order they came)."""
        assert self._sock is not None
        seq = next(self._seq)
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        end = time.monotonic() + timeout
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                left = end - time.monotonic()
                if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                    raise OSError(errno.ETIMEDOUT, "no answer to a netlink dump") from None
                continue
            events, done, err = parse_netlink(data, seq)
            self.state.apply(events)
            if err:
                raise OSError(err, os.strerror(err))
            if done:
                return

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.state.clear()


#: this thread's network namespace's TCP sockets (``/proc/net`` is the process's, whatever the thread's)
TCP_TABLE = "/proc/thread-self/net/tcp"
#: ``connections`` reads that table again only after this many seconds (a stop of every path reads it once)
TCP_TABLE_FOR = 0.1


def tcp_connections(table: str = TCP_TABLE) -> dict[str, tuple[Peer, ...]]:
    """Local IP -> (remote IP, remote port, local port) of its established TCP connections, sorted, from
    ``table`` (``/proc/net/tcp``: addresses as the kernel's native-endian hex words)."""
    out: dict[str, set[Peer]] = {}
    with open(table, encoding="ascii") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "01":          # TCP_ESTABLISHED
                continue
            try:
                (lh, lp), (rh, rp) = fields[1].split(":"), fields[2].split(":")
                local = socket.inet_ntoa(struct.pack("=I", int(lh, 16)))
                out.setdefault(local, set()).add(
                    (socket.inet_ntoa(struct.pack("=I", int(rh, 16))), int(rp, 16), int(lp, 16)))
            except (ValueError, struct.error):
                continue
    return {ip: tuple(sorted(v)) for ip, v in out.items()}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tickle_segment(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A bare TCP ACK from ``src:sport`` to ``dst:dport`` with sequence and acknowledgement 0 (no options,
    window 1024, checksum over the pseudo-header): outside any window, so a live connection answers it with
    an ACK carrying its real numbers (RFC 793/5961), and a closed port with a reset. Pure."""
    head = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x10, 1024, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(head))
    return head[:16] + struct.pack("!H", _checksum(pseudo + head)) + head[18:]


def record_text(fragments: Mapping[str, str]) -> str:
    """The record file's text from each path's entry already encoded (``json.dumps(entry, sort_keys=True)``):
    the same text as ``json.dumps({"addresses": entries}, sort_keys=True)``, without encoding every entry
    again at each write. Pure."""
    return '{"addresses": {' + ", ".join(f"{json.dumps(k)}: {fragments[k]}" for k in sorted(fragments)) + "}}"


def _write_text(path: str, text: str) -> FileKey:
    """Replace ``path`` atomically with ``text`` (what ``statefile.write`` does) and return the new file's
    key, taken from the file written (so a later replace by another writer is told apart)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return st.st_ino, st.st_size, st.st_mtime_ns


def _file_key(path: str) -> FileKey | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class IprouteNetwork(NetworkBackend):
    """See the module docstring."""

    config_keys: Mapping[str, str] = {
        "interfaces": 'table subnet -> interface name, e.g. {"198.18.0.0/24" = "eth0"}; a path IP in a listed '
                      "subnet goes on that interface (default: the interface that has an address in the subnet)",
        "roles": 'table role -> interface name, e.g. {"iscsi-a" = "eth1"}: a path with that role in its '
                 "definition goes on that interface (before its vlan, if any); a role not listed is an error",
        "label": "suffix of the address label <ifname>:<label> marking our addresses (default pa)",
        "arping": "path of arping (iputils) used for the gratuitous ARPs (default arping); empty: no announcement",
        "promote_secondaries": "set net.ipv4.conf.<if>.promote_secondaries=1 before adding (default true)",
        "file": "record of added addresses (default {state_dir}/iproute.json)",
    }

    def __init__(self, context: PluginContext) -> None:
        """Reads ``[network.iproute]`` (``ConfigError`` listing every bad key); touches nothing. Imports
        pyroute2 now (when it is installed), so that a later ``fence`` does not pay for the import."""
        o = Options("network.iproute", context.options)
        self.path = o.text("file", "") or os.path.join(context.state_dir, "iproute.json")
        self.may_serve = context.may_serve
        self.label = o.text("label", "pa", 8)
        if not self.label.replace("-", "").replace("_", "").isalnum():
            o.problems.append(("network.iproute.label", "1-8 letters, digits, '-' or '_'"))
        self.arping = o.text("arping", "arping")
        self.promote = o.flag("promote_secondaries", True)
        self.interfaces: list[tuple[ipaddress.IPv4Network, str]] = []
        for net, ifname in o.str_table("interfaces").items():
            try:
                n = ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                o.problems.append((f"network.iproute.interfaces.{net}", str(e)))
                continue
            if not isinstance(n, ipaddress.IPv4Network) or len(ifname) > IFNAMSIZ:
                o.problems.append((f"network.iproute.interfaces.{net}", "an IPv4 subnet -> an interface name"))
                continue
            self.interfaces.append((n, ifname))
        self.roles: dict[str, str] = {}
        for role, ifname in o.str_table("roles").items():
            if not ROLE_RE.fullmatch(role) or len(ifname) > IFNAMSIZ:
                o.problems.append((f"network.iproute.roles.{role}", "a role (lowercase, as in disk definitions) -> "
                                                                   "an interface name"))
                continue
            self.roles[role] = ifname
        o.done()
        self.interfaces.sort(key=lambda x: -x[0].prefixlen)
        self._children: list[_Child] = []
        self._closed = threading.Event()         # set by close: tickle threads stop
        self._tcp: tuple[float, dict[str, tuple[Peer, ...]]] | None = None   # (when read, tcp_connections())
        self._lock = threading.Lock()            # up/down/active/close; never taken by fence
        self._fence_count = itertools.count(1)
        self._fences = 0                         # changes at the start and at the end of every fence
        self._fencing: set[object] = set()       # the fences running now
        self._mirror = AddressMirror(self.label)  # opened at the first up/down/active (never by fence)
        self._rec: _Record | None = None         # the record as last read or written by up/down (under _lock)
        self._rec_key: FileKey | None = None     # ... and the file it came from
        self._by_ipif: dict[tuple[str, str], set[str]] = {}   # (ip, ifname) -> recorded paths
        self._frags: dict[str, str] = {}         # path -> its entry as JSON (what _commit writes)
        try:
            from pyroute2 import IPRoute
            self._iproute: Any = IPRoute
        except ImportError as e:
            self._iproute = None
            self._import_error = str(e)

    # ---------------------------------------------------------------- the ABC

    def up(self, path: PathKey, spec: PathSpec) -> None:
        """Add and announce ``spec.ip/spec.prefix`` for ``path``. Idempotent (no second announcement when
        the address is already ours and present). The record (with the announcement, started gated) is
        written once, before the address is added."""
        ip = self._ipv4(spec.ip)
        if not 0 < spec.prefix <= 32:
            raise PermanentBackendError(f"path {path}: prefix length {spec.prefix} is not valid for IPv4")
        key = str(path)
        with self._lock:
            since = (self._fences, bool(self._fencing))
            self._reap()
            record = self._records()
            kernel = self._kernel()
            links = kernel.links
            ifname, index = self._place(path, spec, ip, kernel, links)
            label = self._label_for(ifname)
            mine = record.get(key)
            for a in kernel.at(ip):
                on = links.get(a.index, str(a.index))
                if not self._ours_now(a, links):
                    raise PermanentBackendError(
                        f"path {path}: {ip} is already configured on {on} and was not "
                        "added by pathagent; refusing to take it over")
                others = self._sharing_now(key, ip, on)
                if others:
                    raise PermanentBackendError(
                        f"path {path}: {ip} is already up on {on} for path {others[0]}; two paths cannot "
                        "share one IP (fix the disk definitions)")
                if a.index == index and a.prefix == spec.prefix:
                    if mine is None or mine.get("ip") != ip or mine.get("ifname") != ifname:
                        self._rec_set(key, {"ip": ip, "prefix": spec.prefix, "ifname": ifname})
                        self._commit()
                    if self._fenced_since(since):
                        raise TransientBackendError(f"path {path}: a fence ran while {ip} was being "
                                                    f"brought up on {ifname}")
                    return
                # ours, but on another interface or with another prefix: move it
                with self._ipr() as ipr:
                    self._del(ipr, a, key)
                self._stop_announcements(ip, [mine] if mine else [])
            child = self._spawn_announcement(ifname, ip)
            entry: dict[str, Any] = {"ip": ip, "prefix": spec.prefix, "ifname": ifname}
            if child is not None and child.start is not None:
                entry["arping"] = {"pid": child.proc.pid, "start": child.start}
            try:
                self._rec_set(key, entry)
                self._commit()
                if self.promote:
                    self._promote(ifname)
                if not self.may_serve():         # the host's lease, right before the address goes up
                    raise TransientBackendError(f"path {path}: not bringing {ip} up: this node may not serve now")
                try:
                    kw: dict[str, Any] = {"index": index, "address": ip, "prefixlen": spec.prefix}
                    if label is not None:
                        kw["label"] = label
                    with self._ipr() as ipr:
                        ipr.addr("add", **kw)
                except BackendError:
                    raise
                except Exception as e:
                    raise self._translate(f"add {ip}/{spec.prefix} on {ifname} for {path}", e) from None
            except BaseException:
                self._let_go(child, False)
                self._forget_entry(key)
                raise
            log.info("iproute: %s/%d up on %s for %s", ip, spec.prefix, ifname, path)
            self._let_go(child, not self._fenced_since(since) and self.may_serve())
            if self._fenced_since(since):
                self._undo(key, _Addr(ip, spec.prefix, index, label))
                raise TransientBackendError(
                    f"path {path}: a fence ran while {ip} was being brought up on {ifname}; taken down again")

    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        """Remove the address of ``path`` (ours: recorded for the path, or labelled by us) and stop its
        announcement. Returns only when no address with the path's IP is left here; raises
        ``TransientBackendError`` while one is (not ours, or still the address of another recorded path).
        With neither a record for the path nor ``spec`` there is no IP to look for: a no-op."""
        key = str(path)
        with self._lock:
            self._reap()
            record = self._records()
            mine = record.get(key)
            ip = str(mine["ip"]) if mine else (self._ipv4(spec.ip) if spec is not None else None)
            if ip is None:
                return
            left: list[str] = []
            shared = False
            kernel = self._kernel()
            links = kernel.links
            for a in kernel.at(ip):
                on = links.get(a.index, str(a.index))
                others = self._sharing_now(key, ip, on)
                if others:
                    shared = True
                    left.append(f"{ip}/{a.prefix} on {on} is also the address of path {others[0]} on this "
                                f"node (two paths with one IP): take {others[0]} down first")
                elif (mine is not None and mine.get("ifname") == on) or self._labelled(a, on):
                    with self._ipr() as ipr:
                        self._del(ipr, a, key)
                    log.info("iproute: %s/%d down on %s for %s", ip, a.prefix, on, path)
                else:
                    left.append(
                        f"{ip}/{a.prefix} is up on {on} but pathagent does not know it as its own (no record "
                        f"in {self.path}, no label {self._label_for(on) or '(none fits)'}); the path stays "
                        f"held until it is gone: if pathagent added it (record lost), remove it with "
                        f"'ip addr del {ip}/{a.prefix} dev {on}', otherwise free {ip} from whatever uses it")
            if not shared:
                self._stop_announcements(ip, [mine] if mine else [])
            if left:
                raise TransientBackendError(f"path {path}: cannot take {ip} down: " + "; ".join(left),
                                            retry_after=5.0)
            if mine is not None:
                self._rec_del(key)
                self._commit()

    def active(self) -> frozenset[PathKey]:
        """Recorded paths whose address is present on the recorded interface (read from the kernel, through
        the mirror of its notifications)."""
        with self._lock:
            self._reap()
            record = self._records()
            if not record:
                return frozenset()
            kernel = self._kernel()
            out = set()
            for k, v in record.items():
                if kernel.present(str(v.get("ip")), str(v.get("ifname"))):
                    disk, _, idx = k.rpartition("/")
                    out.add(PathKey(disk, int(idx)))
            return frozenset(out)

    def connections(self, path: PathKey, spec: PathSpec | None) -> tuple[Peer, ...]:
        """Established TCP connections to the path's IP here (recorded IP, else ``spec``'s; none without
        either), from ``TCP_TABLE``."""
        with self._lock:
            mine = self._records().get(str(path))
        ip = str(mine["ip"]) if mine else (self._ipv4(spec.ip) if spec is not None else None)
        if ip is None:
            return ()
        now = time.monotonic()
        if self._tcp is None or now - self._tcp[0] > TCP_TABLE_FOR:
            try:
                self._tcp = (now, tcp_connections())
            except OSError as e:
                raise TransientBackendError(f"path {path}: cannot read {TCP_TABLE}: {e}") from None
        return self._tcp[1].get(ip, ())

    def tickle(self, path: PathKey, spec: PathSpec, peers: tuple[Peer, ...]) -> None:
        """Send ``peers`` their tickle ACKs from ``spec.ip`` at ``TICKLE_AT`` (see the module docstring), on a
        daemon thread; returns at once."""
        ip = self._ipv4(spec.ip)
        todo = [(r, rp, lp) for r, rp, lp in peers if r != ip]
        if not todo:
            return
        since = (self._fences, bool(self._fencing))
        t = threading.Thread(target=self._tickle, args=(path, ip, todo, since), daemon=True,
                             name=f"tickle-{ip}")
        t.start()

    def _tickle(self, path: PathKey, ip: str, peers: list[Peer], since: tuple[int, bool]) -> None:
        start = time.monotonic()
        for i, at in enumerate(TICKLE_AT):
            if self._closed.wait(max(0.0, start + at - time.monotonic())):
                return
            if self._fenced_since(since) or not self.may_serve():
                return
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
                    # once the IP is no longer here: EADDRNOTAVAIL from bind, or, when ip_nonlocal_bind let
                    # the bind pass, ENETUNREACH (EINVAL) from sendto: the route lookup wants a local source
                    s.bind((ip, 0))
                    for remote, rport, lport in peers:
                        s.sendto(tickle_segment(ip, remote, lport, rport), (remote, 0))
            except OSError as e:
                gone = e.errno in (errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EINVAL)
                (log.info if gone else log.warning)("iproute: tickle of %d connection(s) to %s for %s stopped: %s",
                                                    len(peers), ip, path, e)
                return
            log.debug("iproute: tickled %d connection(s) to %s for %s (round %d)", len(peers), ip, path, i + 1)

    def fence(self) -> None:
        """Every address of ours down, then every announcement stopped, then the record rewritten without
        the removed addresses. Takes no lock (its own netlink socket), so it runs while another thread is
        inside ``up``/``down``/``active`` and from another process on the same state dir. Raises
        ``TransientBackendError`` (after doing all it could) when an address could not be removed, the
        record could not be read (labelled addresses are still removed), or an announcement did not die."""
        token = object()
        self._fencing.add(token)
        self._fences = next(self._fence_count)
        try:
            self._fence()
        finally:
            self._fences = next(self._fence_count)
            self._fencing.discard(token)

    def _fence(self) -> None:
        t0 = time.monotonic()
        problems: list[str] = []
        try:
            record = self._load()
        except BackendError as e:
            problems.append(f"{e}; removed the labelled addresses only")
            record = {}
        removed: set[tuple[str, str]] = set()
        try:
            with self._ipr() as ipr:
                links = self._links(ipr)
                for a in self._addrs(ipr):
                    if not self._ours(a, links, record):
                        continue
                    try:
                        self._del(ipr, a, "the fence")
                        removed.add((a.ip, links.get(a.index, "")))
                    except BackendError as e:
                        problems.append(str(e))
        except BackendError as e:
            problems.append(str(e))
        t1 = time.monotonic()
        # announcements next: ours in memory, and those recorded (by this or another process) since
        try:
            now = self._load()
        except BackendError:
            now = record
        alive = _kill(self._announcers(None, now.values()), KILL_WAIT)
        if alive:
            problems.append(f"announcement (arping) pid {', '.join(map(str, alive))} did not exit after SIGKILL")
        t2 = time.monotonic()
        # the record last, and only when the addresses are gone
        keep = {k: v for k, v in now.items() if (v.get("ip"), v.get("ifname")) not in removed}
        if keep != now:
            try:
                self._save(keep)
            except BackendError as e:   # harmless: active() reads the kernel; later calls tidy it
                log.warning("iproute: fence: %s", e)
        log.warning("iproute: fenced: %d address(es) removed in %.1f ms, announcements stopped in %.1f ms, "
                    "%.1f ms in all%s", len(removed), (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                    (time.monotonic() - t0) * 1e3, "" if not problems else "; " + "; ".join(problems))
        if problems:
            raise TransientBackendError("iproute: fence incomplete: " + "; ".join(problems), retry_after=0.5)

    def close(self) -> None:
        """Reap the announcements that finished. Running ones are left to finish (their pids are recorded,
        so a later fence, in this process or another, still stops them); addresses stay."""
        self._closed.set()                       # no more tickles
        with self._lock:
            self._reap()
            self._mirror.close()

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _ipv4(ip: str) -> str:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            raise PermanentBackendError(f"{ip!r} is not an IP address") from None
        if not isinstance(a, ipaddress.IPv4Address):
            raise PermanentBackendError(f"{ip}: the iproute backend supports IPv4 path addresses only")
        return str(a)

    def _label_for(self, ifname: str) -> str | None:
        label = f"{ifname}:{self.label}"
        return label if len(label) <= IFNAMSIZ else None

    def _labelled(self, a: _Addr, ifname: str) -> bool:
        return a.label is not None and a.label == self._label_for(ifname)

    def _ours(self, a: _Addr, links: Mapping[int, str], record: Mapping[str, Mapping[str, Any]]) -> bool:
        ifname = links.get(a.index, "")
        if any(v.get("ip") == a.ip and v.get("ifname") == ifname for v in record.values()):
            return True
        return self._labelled(a, ifname)

    def _place(self, path: PathKey, spec: PathSpec, ip: str, kernel: AddressState,
               links: Mapping[int, str]) -> tuple[str, int]:
        """The interface (name, index) the address of ``path`` goes on: the one ``roles`` names for
        ``spec.role``, else the one for its subnet (``_choose``); with ``spec.vlan``, the VLAN interface with
        that id on it (created as ``<interface>.<vlan>`` when there is none; never removed)."""
        if spec.role is not None:
            base = self.roles.get(spec.role)
            if base is None:
                raise PermanentBackendError(f"path {path}: role {spec.role!r} is not in [network.iproute] roles "
                                            f"({', '.join(sorted(self.roles)) or 'none configured'})")
            if base not in links.values():
                raise PermanentBackendError(f"path {path}: interface {base} (role {spec.role}) does not exist")
        else:
            base = self._choose(path, ip, kernel, links)
        index = next(i for i, n in links.items() if n == base)
        if spec.vlan is None:
            return base, index
        return self._vlan(path, base, index, spec.vlan)

    def _vlan(self, path: PathKey, base: str, index: int, vid: int) -> tuple[str, int]:
        """The VLAN interface with id ``vid`` on ``base`` (``base`` itself when it is one), brought up;
        created as ``<base>.<vid>`` when none exists."""
        with self._ipr() as ipr:
            try:
                for m in ipr.get_links():
                    info = m.get_attr("IFLA_LINKINFO")
                    if info is None or info.get_attr("IFLA_INFO_KIND") != "vlan":
                        continue
                    data = info.get_attr("IFLA_INFO_DATA")
                    if data is None or data.get_attr("IFLA_VLAN_ID") != vid:
                        continue
                    if int(m["index"]) == index or m.get_attr("IFLA_LINK") == index:
                        name, found = str(m.get_attr("IFLA_IFNAME")), int(m["index"])
                        if not int(m["flags"]) & 1:              # IFF_UP
                            ipr.link("set", index=found, state="up")
                        return name, found
                name = f"{base}.{vid}"
                if len(name) > IFNAMSIZ:
                    raise PermanentBackendError(f"path {path}: VLAN interface name {name} is longer than "
                                                f"{IFNAMSIZ} characters; create the VLAN {vid} interface on "
                                                f"{base} yourself (any name)")
                if ipr.link_lookup(ifname=name):
                    raise PermanentBackendError(f"path {path}: {name} exists but is not VLAN {vid} on {base}")
                try:
                    ipr.link("add", ifname=name, kind="vlan", link=index, vlan_id=vid)
                except Exception as e:
                    if getattr(e, "code", None) == errno.EOPNOTSUPP:
                        raise PermanentBackendError(f"path {path}: this kernel has no 802.1Q VLAN support "
                                                    f"(load the 8021q module) for VLAN {vid} on {base}") from None
                    raise
                new = int(ipr.link_lookup(ifname=name)[0])
                ipr.link("set", index=new, state="up")
            except BackendError:
                raise
            except Exception as e:
                raise self._translate(f"VLAN {vid} on {base} for {path}", e) from None
        log.info("iproute: created VLAN interface %s (VLAN %d on %s) for %s", name, vid, base, path)
        return name, new

    def _choose(self, path: PathKey, ip: str, kernel: AddressState, links: Mapping[int, str]) -> str:
        addr = ipaddress.IPv4Address(ip)
        for net, ifname in self.interfaces:
            if addr in net:
                if ifname not in links.values():
                    raise PermanentBackendError(f"path {path}: interface {ifname} (for {net}) does not exist")
                return ifname
        best: dict[str, int] = {}
        for a in kernel.candidates(ip):      # every address whose subnet has ip, but those labelled ours
            if a.ip == ip or self._ours_now(a, links) or a.index not in links:
                continue
            name = links[a.index]
            best[name] = max(best.get(name, -1), a.prefix)
        if not best:
            raise PermanentBackendError(f"path {path}: no interface has an address in a subnet containing {ip}; "
                                        "name one in [network.iproute] interfaces")
        top = max(best.values())
        names = sorted(n for n, p in best.items() if p == top)
        if len(names) > 1:
            raise PermanentBackendError(f"path {path}: {ip} fits the subnets of {', '.join(names)}; "
                                        "name one in [network.iproute] interfaces")
        return names[0]

    def _ipr(self) -> Any:
        if self._iproute is None:
            raise PermanentBackendError(f"pyroute2 is not importable: {self._import_error}")
        try:
            return self._iproute()
        except Exception as e:
            raise self._translate("open a netlink socket", e) from None

    def _links(self, ipr: Any) -> dict[int, str]:
        try:
            return {int(m["index"]): str(m.get_attr("IFLA_IFNAME")) for m in ipr.get_links()}
        except Exception as e:
            raise self._translate("list interfaces", e) from None

    def _addrs(self, ipr: Any) -> list[_Addr]:
        try:
            msgs = list(ipr.get_addr(family=socket.AF_INET))
        except Exception as e:
            raise self._translate("list addresses", e) from None
        out = []
        for m in msgs:
            # get_attr, not get: pyroute2 0.7.2 (Debian 12) answers None to m.get("IFA_LOCAL")
            ip = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if ip:
                out.append(_Addr(str(ip), int(m["prefixlen"]), int(m["index"]), m.get_attr("IFA_LABEL")))
        return out

    def _del(self, ipr: Any, a: _Addr, what: str) -> None:
        try:
            ipr.addr("del", index=a.index, address=a.ip, prefixlen=a.prefix)
        except Exception as e:
            if getattr(e, "code", None) == 99:   # EADDRNOTAVAIL: already gone
                return
            raise self._translate(f"remove {a.ip}/{a.prefix} for {what}", e) from None

    def _undo(self, key: str, a: _Addr) -> None:
        """``up`` overlapped a fence: take this path's address and announcement down again."""
        self._stop_announcements(a.ip, [])
        with self._ipr() as ipr:
            self._del(ipr, a, key)
        self._forget_entry(key)

    @staticmethod
    def _translate(what: str, e: Exception) -> Exception:
        code = getattr(e, "code", None)
        if code in (19, 22):   # ENODEV, EINVAL
            return PermanentBackendError(f"iproute: cannot {what}: {e}")
        return TransientBackendError(f"iproute: cannot {what}: {e}")

    def _promote(self, ifname: str) -> None:
        p = f"/proc/sys/net/ipv4/conf/{ifname}/promote_secondaries"
        try:
            if sysctl.ensure_one(p):
                log.info("iproute: set net.ipv4.conf.%s.promote_secondaries=1", ifname)
        except OSError as e:
            log.warning("iproute: cannot set %s: %s", p, e)

    # ---------------------------------------------------------------- announcements

    def _fenced_since(self, since: tuple[int, bool]) -> bool:
        """Whether a fence of this instance overlapped the time since ``since`` was taken (``(self._fences,
        bool(self._fencing))``): one was running then or is now, or one started or ended in between."""
        return since[1] or bool(self._fencing) or self._fences != since[0]

    def _spawn_announcement(self, ifname: str, ip: str) -> _Child | None:
        """Start the gratuitous ARPs for ``ip``, gated: the child waits on its stdin (``_let_go``) and is
        recorded by the caller before it may send. ``None`` without arping."""
        if not self.arping:
            return None
        exe = shutil.which(self.arping)
        if exe is None:
            log.warning("iproute: %s not found: %s is up but not announced", self.arping, ip)
            return None
        argv = ["/bin/sh", "-c", _GATE, "pathagent-arping", exe, "-q", "-U", "-c", str(ANNOUNCEMENTS),
                "-w", str(ANNOUNCEMENTS), "-I", ifname, ip]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, env=child_env())
        except OSError as e:
            log.warning("iproute: cannot start %s to announce %s: %s", self.arping, ip, e)
            return None
        child = _Child(proc, ip, _starttime(proc.pid))
        self._children.append(child)
        return child

    def _let_go(self, child: _Child | None, go: bool) -> None:
        """Tell the gated announcement to send (``go``: the address is up, no fence overlapped, the lease
        holds), or close its stdin unread and kill it. A child already gone at its start is never let go."""
        if child is None:
            return
        go = go and child.start is not None
        assert child.proc.stdin is not None
        try:
            if go:
                child.proc.stdin.write(b"go\n")
            child.proc.stdin.close()
        except OSError as e:   # it died already
            log.warning("iproute: announcement of %s did not start: %s", child.ip, e)
        if not go:
            _kill({child.proc.pid: child.start} if child.start is not None else {}, KILL_WAIT)

    def _announcers(self, ip: str | None, entries: Any) -> dict[int, int]:
        """pid -> start time of the announcements of ``ip`` (every IP when ``None``): those this
        instance started, and those recorded in ``entries`` (record entries)."""
        out = {c.proc.pid: c.start for c in list(self._children)
               if c.start is not None and (ip is None or c.ip == ip)}
        for v in entries:
            a = v.get("arping") if isinstance(v, Mapping) else None
            if isinstance(a, Mapping) and (ip is None or v.get("ip") == ip):
                pid, start = a.get("pid"), a.get("start")
                if isinstance(pid, int) and isinstance(start, int) and pid > 0:
                    out.setdefault(pid, start)
        return out

    def _stop_announcements(self, ip: str, entries: list[Mapping[str, Any]]) -> None:
        alive = _kill(self._announcers(ip, entries), KILL_WAIT)
        if alive:
            log.error("iproute: announcement of %s (pid %s) did not exit after SIGKILL", ip, alive)

    def _reap(self) -> None:
        still = []
        for c in self._children:
            rc = c.proc.poll()
            if rc is None:
                still.append(c)
            elif rc == -signal.SIGKILL:
                log.debug("iproute: announcement of %s stopped", c.ip)
            elif rc != 0:
                log.warning("iproute: gratuitous ARP for %s (arping) exited with status %d", c.ip, rc)
        self._children = still

    # ---------------------------------------------------------------- the record (cached, under _lock)

    def _records(self) -> _Record:
        """The record, read again only when its file is not the one this instance last read or wrote
        (a fence, another process). Do not change it but through ``_rec_set``/``_rec_del``."""
        k = _file_key(self.path)
        if self._rec is None or k != self._rec_key:
            self._rec = self._load()
            self._rec_key = k
            self._by_ipif = {}
            self._frags = {p: json.dumps(v, sort_keys=True) for p, v in self._rec.items()}
            for p, v in self._rec.items():
                self._by_ipif.setdefault((str(v.get("ip")), str(v.get("ifname"))), set()).add(p)
        return self._rec

    def _rec_set(self, key: str, value: dict[str, Any]) -> None:
        rec = self._records()
        self._rec_del(key)
        rec[key] = value
        self._frags[key] = json.dumps(value, sort_keys=True)
        self._by_ipif.setdefault((str(value.get("ip")), str(value.get("ifname"))), set()).add(key)

    def _rec_del(self, key: str) -> None:
        rec = self._records()
        old = rec.pop(key, None)
        self._frags.pop(key, None)
        if old is not None:
            ix = (str(old.get("ip")), str(old.get("ifname")))
            self._by_ipif.get(ix, set()).discard(key)
            if not self._by_ipif.get(ix, True):
                del self._by_ipif[ix]

    def _commit(self) -> None:
        """Write the record (one atomic replace, of the entries' cached JSON); a failure leaves the cache to
        be read again."""
        self._records()
        try:
            self._rec_key = _write_text(self.path, record_text(self._frags))
        except OSError as e:
            self._rec = None
            raise TransientBackendError(f"iproute record {self.path}: {e}") from e

    def _forget_entry(self, key: str) -> None:
        """Take ``key`` out of the record again (an ``up`` that did not happen or was undone)."""
        if key in self._records():
            self._rec_del(key)
            self._commit()

    def _kernel(self) -> AddressState:
        try:
            return self._mirror.refresh()
        except OSError as e:
            self._mirror.close()
            raise self._translate("read the addresses", e) from None

    def _ours_now(self, a: _Addr, links: Mapping[int, str]) -> bool:
        """``_ours`` against the cached record (its (ip, ifname) index, no scan)."""
        ifname = links.get(a.index, "")
        return bool(self._by_ipif.get((a.ip, ifname))) or self._labelled(a, ifname)

    def _sharing_now(self, key: str, ip: str, ifname: str) -> list[str]:
        """Other recorded paths whose address is ``ip`` on ``ifname`` (the cached record's index)."""
        return sorted(k for k in self._by_ipif.get((ip, ifname), ()) if k != key)

    def _load(self) -> _Record:
        try:
            data = statefile.read(self.path, {})
            return {str(k): dict(v) for k, v in data.get("addresses", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise PermanentBackendError(f"iproute record {self.path} is unreadable: {e}") from e

    def _save(self, record: Mapping[str, Mapping[str, Any]]) -> None:
        try:
            statefile.write(self.path, {"addresses": {k: dict(v) for k, v in sorted(record.items())}})
        except OSError as e:
            raise TransientBackendError(f"iproute record {self.path}: {e}") from e


def _starttime(pid: int) -> int | None:
    """The start time of process ``pid`` (``/proc/PID/stat`` field 22), ``None`` if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _kill(procs: Mapping[int, int], timeout: float) -> list[int]:
    """SIGKILL each ``pid`` whose start time is still the recorded one (so never a reused pid), through a
    pidfd, and wait up to ``timeout`` for them to exit. Returns the pids still running then."""
    fds: dict[int, int] = {}
    plain: dict[int, int] = {}        # no pidfd (Linux < 5.3): a plain kill after the same check
    for pid, start in procs.items():
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:
            if _starttime(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                    plain[pid] = start
                except OSError:
                    pass
            continue
        if _starttime(pid) != start:
            os.close(fd)              # gone, a zombie, or another process has the pid now
            continue
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            fds[fd] = pid
        except OSError:
            os.close(fd)
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)   # readable once the process has exited
        pending = dict(fds)
        end = time.monotonic() + timeout
        while pending or plain:
            plain = {p: s for p, s in plain.items() if _starttime(p) == s}
            left = end - time.monotonic()
            if left <= 0 or not (pending or plain):
                break
            for fd, _ in poller.poll(min(left, 0.01) * 1000 if plain else left * 1000):
                poller.unregister(fd)
                pending.pop(fd, None)
        return sorted([*pending.values(), *plain])
    finally:
        for fd in fds:
            os.close(fd)
