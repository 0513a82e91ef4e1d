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
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from agent import statefile
from agent.backend import NetworkBackend, PluginContext
from agent.childenv import child_env
from agent.core.model import PathKey, PathSpec
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


class IprouteNetwork(NetworkBackend):
    """See the module docstring."""

    config_keys: Mapping[str, str] = {
        "interfaces": 'table subnet -> interface name, e.g. {"198.18.0.0/24" = "eth0"}; a path IP in a listed '
                      "subnet goes on that interface (default: the interface that has an address in the subnet)",
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
        o.done()
        self.interfaces.sort(key=lambda x: -x[0].prefixlen)
        self._children: list[_Child] = []
        self._lock = threading.Lock()            # up/down/active/close; never taken by fence
        self._fence_count = itertools.count(1)
        self._fences = 0                         # changes at the start and at the end of every fence
        self._fencing: set[object] = set()       # the fences running now
        try:
            from pyroute2 import IPRoute
            self._iproute: Any = IPRoute
        except ImportError as e:
            self._iproute = None
            self._import_error = str(e)

    # ---------------------------------------------------------------- the ABC

    def up(self, path: PathKey, spec: PathSpec) -> None:
        """Add and announce ``spec.ip/spec.prefix`` for ``path``. Idempotent (no second announcement when
        the address is already ours and present)."""
        ip = self._ipv4(spec.ip)
        if not 0 < spec.prefix <= 32:
            raise PermanentBackendError(f"path {path}: prefix length {spec.prefix} is not valid for IPv4")
        key = str(path)
        with self._lock:
            since = (self._fences, bool(self._fencing))
            self._reap()
            record = self._load()
            with self._ipr() as ipr:
                links = self._links(ipr)
                addrs = self._addrs(ipr)
                ifname = self._choose(path, ip, addrs, links, record)
                index = next(i for i, n in links.items() if n == ifname)
                label = self._label_for(ifname)
                mine = record.get(key)
                for a in addrs:
                    if a.ip != ip:
                        continue
                    on = links.get(a.index, str(a.index))
                    if not self._ours(a, links, record):
                        raise PermanentBackendError(
                            f"path {path}: {ip} is already configured on {on} and was not "
                            "added by pathagent; refusing to take it over")
                    others = self._sharing(record, key, ip, on)
                    if others:
                        raise PermanentBackendError(
                            f"path {path}: {ip} is already up on {on} for path {others[0]}; two paths cannot "
                            "share one IP (fix the disk definitions)")
                    if a.index == index and a.prefix == spec.prefix:
                        if mine is None or mine.get("ip") != ip or mine.get("ifname") != ifname:
                            record[key] = {"ip": ip, "prefix": spec.prefix, "ifname": ifname}
                            self._save(record)
                        if self._fenced_since(since):
                            raise TransientBackendError(f"path {path}: a fence ran while {ip} was being "
                                                        f"brought up on {ifname}")
                        return
                    # ours, but on another interface or with another prefix: move it
                    self._del(ipr, a, key)
                    self._stop_announcements(ip, [mine] if mine else [])
                record[key] = {"ip": ip, "prefix": spec.prefix, "ifname": ifname}
                self._save(record)
                if self.promote:
                    self._promote(ifname)
                if not self.may_serve():         # the host's lease, right before the address goes up
                    del record[key]
                    self._save(record)
                    raise TransientBackendError(f"path {path}: not bringing {ip} up: this node may not serve now")
                try:
                    kw: dict[str, Any] = {"index": index, "address": ip, "prefixlen": spec.prefix}
                    if label is not None:
                        kw["label"] = label
                    ipr.addr("add", **kw)
                except Exception as e:
                    del record[key]
                    self._save(record)
                    raise self._translate(f"add {ip}/{spec.prefix} on {ifname} for {path}", e) from None
            log.info("iproute: %s/%d up on %s for %s", ip, spec.prefix, ifname, path)
            self._announce(key, ifname, ip, record, since)
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
            record = self._load()
            mine = record.get(key)
            ip = str(mine["ip"]) if mine else (self._ipv4(spec.ip) if spec is not None else None)
            if ip is None:
                return
            left: list[str] = []
            shared = False
            with self._ipr() as ipr:
                links = self._links(ipr)
                for a in self._addrs(ipr):
                    if a.ip != ip:
                        continue
                    on = links.get(a.index, str(a.index))
                    others = self._sharing(record, key, ip, on)
                    if others:
                        shared = True
                        left.append(f"{ip}/{a.prefix} on {on} is also the address of path {others[0]} on this "
                                    f"node (two paths with one IP): take {others[0]} down first")
                    elif (mine is not None and mine.get("ifname") == on) or self._labelled(a, on):
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
                del record[key]
                self._save(record)

    def active(self) -> frozenset[PathKey]:
        """Recorded paths whose address is present on the recorded interface (read from the kernel)."""
        with self._lock:
            self._reap()
            record = self._load()
            if not record:
                return frozenset()
            with self._ipr() as ipr:
                links = self._links(ipr)
                present = {(a.ip, links.get(a.index)) for a in self._addrs(ipr)}
            out = set()
            for k, v in record.items():
                if (v.get("ip"), v.get("ifname")) in present:
                    disk, _, idx = k.rpartition("/")
                    out.add(PathKey(disk, int(idx)))
            return frozenset(out)

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
        with self._lock:
            self._reap()

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

    @staticmethod
    def _sharing(record: Mapping[str, Mapping[str, Any]], key: str, ip: str, ifname: str) -> list[str]:
        """Other recorded paths whose address is ``ip`` on ``ifname``."""
        return sorted(k for k, v in record.items() if k != key and v.get("ip") == ip and v.get("ifname") == ifname)

    def _choose(self, path: PathKey, ip: str, addrs: list[_Addr], links: Mapping[int, str],
                record: Mapping[str, Mapping[str, Any]]) -> str:
        addr = ipaddress.IPv4Address(ip)
        for net, ifname in self.interfaces:
            if addr in net:
                if ifname not in links.values():
                    raise PermanentBackendError(f"path {path}: interface {ifname} (for {net}) does not exist")
                return ifname
        best: dict[str, int] = {}
        for a in addrs:
            if a.ip == ip or self._ours(a, links, record) or a.index not in links:
                continue
            if addr in ipaddress.IPv4Network(f"{a.ip}/{a.prefix}", strict=False):
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
        record = self._load()
        if record.pop(key, None) is not None:
            self._save(record)

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

    def _announce(self, key: str, ifname: str, ip: str, record: _Record, since: tuple[int, bool]) -> None:
        """Start the gratuitous ARPs for ``ip``: the child is gated on its stdin, recorded under ``key``,
        and only then let go (unless a fence ran meanwhile)."""
        if not self.arping:
            return
        exe = shutil.which(self.arping)
        if exe is None:
            log.warning("iproute: %s not found: %s is up but not announced", self.arping, ip)
            return
        argv = ["/bin/sh", "-c", _GATE, "pathagent-arping", exe, "-q", "-U", "-c", str(ANNOUNCEMENTS),
                "-w", str(ANNOUNCEMENTS), "-I", ifname, ip]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True, env=child_env())
        except OSError as e:
            log.warning("iproute: cannot start %s to announce %s: %s", self.arping, ip, e)
            return
        child = _Child(proc, ip, _starttime(proc.pid))
        self._children.append(child)
        go = child.start is not None
        if go:
            record[key] = dict(record[key], arping={"pid": proc.pid, "start": child.start})
            try:
                self._save(record)
            except BackendError as e:
                log.error("iproute: %s is up but not announced: cannot record the announcement: %s", ip, e)
                go = False
        go = go and not self._fenced_since(since) and self.may_serve()
        assert proc.stdin is not None
        try:
            if go:
                proc.stdin.write(b"go\n")
            proc.stdin.close()
        except OSError as e:   # it died already
            log.warning("iproute: announcement of %s did not start: %s", ip, e)
        if not go:
            _kill({proc.pid: child.start} if child.start is not None else {}, KILL_WAIT)

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

    # ---------------------------------------------------------------- the record

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
