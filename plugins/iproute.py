"""``iproute`` network backend: floating path IPs as secondary addresses, through netlink (pyroute2).

Works in the agent's own network namespace (the gateway namespace in the lab; the host's otherwise).

- ``up`` adds ``spec.ip/spec.prefix`` to the interface that carries the path's subnet: the one named for a
  subnet containing the IP in ``[network.iproute] interfaces`` (``{"198.18.0.0/24" = "eth0"}``), else
  the interface with an address (not one of ours) whose subnet contains the IP (longest prefix wins;
  two interfaces with the same prefix are ambiguous: name one in ``interfaces``). The address gets the
  label ``<ifname>:<label>`` (default ``:pa``; only when that fits in 15 characters) and is recorded in
  ``{state_dir}/iproute.json`` *before* it is added. Then it is announced with a gratuitous ARP
  (``arping -q -U -c 1 -I IF IP``, in the background; the child is reaped by later calls and ``close``):
  Linux sends none by itself, and without it initiators keep the old gateway's MAC for up to a minute.
- ``down`` removes the path's address only if it is ours: recorded for that path, or carrying our label.
  An address with the same IP that we did not add is never touched.
- ``active`` reports the recorded paths whose address is present on the recorded interface.

Also, before adding, ``net.ipv4.conf.<if>.promote_secondaries`` is set to 1 on the interface (logged): a
floating IP that happens to be the first address of its subnet on the interface would otherwise take
every other floating IP of that subnet with it when it is removed.

``up`` and ``down`` are idempotent. An IP already present on this node but not added by this backend is
a ``PermanentBackendError`` (two owners of one address); netlink errors are translated into
``TransientBackendError`` (or ``PermanentBackendError`` for missing interfaces and invalid addresses).
IPv6 path addresses are not supported (``PermanentBackendError``).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from agent.backend import NetworkBackend, PluginContext
from agent.errors import PermanentBackendError, TransientBackendError
from agent.core.model import PathKey, PathSpec
from agent import statefile
from plugins import sysctl
from plugins.options import Options

log = logging.getLogger(__name__)

IFNAMSIZ = 15


@dataclass(frozen=True)
class _Addr:
    ip: str
    prefix: int
    index: int
    label: str | None


class IprouteNetwork(NetworkBackend):
    """See the module docstring."""

    config_keys: Mapping[str, str] = {
        "interfaces": 'table subnet -> interface name, e.g. {"198.18.0.0/24" = "eth0"}; a path IP in a listed '
                      "subnet goes on that interface (default: the interface that has an address in the subnet)",
        "label": "suffix of the address label <ifname>:<label> marking our addresses (default pa)",
        "arping": "path of arping (iputils) used for the gratuitous ARP (default arping); empty: no announcement",
        "promote_secondaries": "set net.ipv4.conf.<if>.promote_secondaries=1 before adding (default true)",
        "file": "record of added addresses (default {state_dir}/iproute.json)",
    }

    def __init__(self, context: PluginContext) -> None:
        """Reads ``[network.iproute]`` (``ConfigError`` listing every bad key); touches nothing."""
        o = Options("network.iproute", context.options)
        self.path = o.text("file", "") or os.path.join(context.state_dir, "iproute.json")
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
        self._children: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the ABC

    def up(self, path: PathKey, spec: PathSpec) -> None:
        """Add and announce ``spec.ip/spec.prefix`` for ``path``. Idempotent (no second announcement when
        the address is already ours and present)."""
        ip = self._ipv4(spec.ip)
        if not 0 < spec.prefix <= 32:
            raise PermanentBackendError(f"path {path}: prefix length {spec.prefix} is not valid for IPv4")
        with self._lock:
            self._reap()
            record = self._load()
            with self._ipr() as ipr:
                links = self._links(ipr)
                addrs = self._addrs(ipr)
                ifname = self._choose(path, ip, addrs, links, record)
                index = next(i for i, n in links.items() if n == ifname)
                label = self._label_for(ifname)
                mine = record.get(str(path))
                for a in addrs:
                    if a.ip != ip:
                        continue
                    ours = self._ours(a, links, record)
                    if not ours:
                        raise PermanentBackendError(
                            f"path {path}: {ip} is already configured on {links.get(a.index, a.index)} and was not "
                            "added by pathagent; refusing to take it over")
                    if a.index == index and a.prefix == spec.prefix:
                        if mine is None or mine.get("ip") != ip or mine.get("ifname") != ifname:
                            record[str(path)] = {"ip": ip, "prefix": spec.prefix, "ifname": ifname}
                            self._save(record)
                        return
                    # ours, but on another interface or with another prefix: move it
                    self._del(ipr, a, str(path))
                record[str(path)] = {"ip": ip, "prefix": spec.prefix, "ifname": ifname}
                self._save(record)
                if self.promote:
                    self._promote(ifname)
                try:
                    kw: dict[str, Any] = {"index": index, "address": ip, "prefixlen": spec.prefix}
                    if label is not None:
                        kw["label"] = label
                    ipr.addr("add", **kw)
                except Exception as e:
                    del record[str(path)]
                    self._save(record)
                    raise self._translate(f"add {ip}/{spec.prefix} on {ifname} for {path}", e) from None
            log.info("iproute: %s/%d up on %s for %s", ip, spec.prefix, ifname, path)
            self._announce(ifname, ip)

    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        """Remove the address of ``path`` if it is ours (recorded for the path, or labelled by us). Absent
        addresses are a no-op."""
        with self._lock:
            self._reap()
            record = self._load()
            mine = record.get(str(path))
            ip = str(mine["ip"]) if mine else (self._ipv4(spec.ip) if spec is not None else None)
            if ip is None:
                return
            with self._ipr() as ipr:
                links = self._links(ipr)
                for a in self._addrs(ipr):
                    if a.ip != ip:
                        continue
                    recorded = mine is not None and links.get(a.index) == mine.get("ifname")
                    if recorded or (a.label is not None and a.label == self._label_for(links.get(a.index, ""))):
                        self._del(ipr, a, str(path))
                        log.info("iproute: %s/%d down on %s for %s", ip, a.prefix, links.get(a.index), path)
                    else:
                        log.warning("iproute: %s on %s is not ours; leaving it", ip, links.get(a.index, a.index))
            if mine is not None:
                del record[str(path)]
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

    def close(self) -> None:
        """Reap announcement children (waiting at most ~1.5 s each); addresses stay."""
        with self._lock:
            for p in self._children:
                try:
                    p.wait(timeout=1.5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._children.clear()

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

    def _ours(self, a: _Addr, links: Mapping[int, str], record: Mapping[str, Mapping[str, Any]]) -> bool:
        ifname = links.get(a.index, "")
        if any(v.get("ip") == a.ip and v.get("ifname") == ifname for v in record.values()):
            return True
        return a.label is not None and a.label == self._label_for(ifname)

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
        try:
            from pyroute2 import IPRoute
        except ImportError as e:
            raise PermanentBackendError(f"pyroute2 is not importable: {e}") from None
        try:
            return IPRoute()
        except Exception as e:
            raise self._translate("open a netlink socket", e) from None

    def _links(self, ipr: Any) -> dict[int, str]:
        try:
            return {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
        except Exception as e:
            raise self._translate("list interfaces", e) from None

    def _addrs(self, ipr: Any) -> list[_Addr]:
        try:
            msgs = ipr.get_addr(family=socket.AF_INET)
        except Exception as e:
            raise self._translate("list addresses", e) from None
        out = []
        for m in msgs:
            ip = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            if ip:
                out.append(_Addr(str(ip), int(m["prefixlen"]), int(m["index"]), m.get("IFA_LABEL")))
        return out

    def _del(self, ipr: Any, a: _Addr, what: str) -> None:
        try:
            ipr.addr("del", index=a.index, address=a.ip, prefixlen=a.prefix)
        except Exception as e:
            if getattr(e, "code", None) == 99:   # EADDRNOTAVAIL: already gone
                return
            raise self._translate(f"remove {a.ip}/{a.prefix} for {what}", e) from None

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

    def _announce(self, ifname: str, ip: str) -> None:
        if not self.arping:
            return
        try:
            self._children.append(subprocess.Popen(
                [self.arping, "-q", "-U", "-c", "1", "-I", ifname, ip], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        except OSError as e:
            log.warning("iproute: cannot run %s to announce %s: %s", self.arping, ip, e)

    def _reap(self) -> None:
        still = []
        for p in self._children:
            rc = p.poll()
            if rc is None:
                still.append(p)
            elif rc != 0:
                log.warning("iproute: gratuitous ARP (arping) exited with status %d", rc)
        self._children = still

    def _load(self) -> dict[str, dict[str, Any]]:
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
