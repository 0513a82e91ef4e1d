"""Kernel RBD mappings through sysfs (``/sys/bus/rbd``), the way the LIO backend maps an image.

No ``rbd`` CLI and no udev: ``map`` writes ``<monitors> <options> <pool> <image> -`` to ``add_single_major``
(the write returns when ``/dev/rbdN`` exists; the kernel gives every failure as EIO and the reason only in
its log), ``unmap`` writes the device id to ``remove_single_major``. Every mapping is made with ``noshare``:
its own libceph client instance (address + nonce), so that a blocklist of this node's client for one disk
never touches another mapping, ours or anyone's. ``mappings`` reads what the kernel has; the parsers are pure
(``parse_mon_host``, ``parse_keyring``, ``map_line``) and unit-tested.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
from dataclasses import dataclass, field

from agent.errors import PermanentBackendError, TransientBackendError

SYSFS = "/sys/bus/rbd"
DEV = "/dev"


@dataclass(frozen=True)
class Monitors:
    """The monitor addresses krbd is given (IPs only: this kernel has no DNS resolver for libceph) and the
    messenger mode they need (``legacy`` = msgr1 on the v1 port; ``prefer-crc`` = msgr2)."""

    addresses: tuple[str, ...]
    ms_mode: str = "legacy"


def _split_addr(a: str) -> tuple[str, str]:
    """``type:ip:port`` (``v1:``/``v2:`` prefix optional) -> (type, ``ip:port``)."""
    kind = ""
    m = re.match(r"^(v1|v2):(.*)$", a)
    if m:
        kind, a = m.group(1), m.group(2)
    return kind, a


def parse_mon_host(text: str) -> Monitors:
    """``mon host`` of a ceph.conf -> what krbd takes. Accepts ``ip``, ``ip:port``, ``[v2:ip:port,v1:ip:port]``
    lists separated by commas or spaces; prefers each monitor's v1 address (msgr1, which krbd
    speaks by default), else its v2 address (then ``ms_mode=prefer-crc``). A bare address gets port 6789.
    Raises ``ValueError`` (naming the entry) for host names, which the kernel cannot resolve."""
    entries: list[list[str]] = []
    s = text.strip()
    i = 0
    while i < len(s):
        c = s[i]
        if c in " ,\t":
            i += 1
            continue
        if c == "[":
            j = s.index("]", i)
            entries.append([x.strip() for x in s[i + 1:j].split(",") if x.strip()])
            i = j + 1
        else:
            j = i
            while j < len(s) and s[j] not in " ,\t":
                j += 1
            entries.append([s[i:j]])
            i = j
    if not entries:
        raise ValueError("no monitor address")
    v1: list[str] = []
    v2: list[str] = []
    for e in entries:
        parsed = [_split_addr(a) for a in e]
        one = [a for k, a in parsed if k in ("v1", "")]
        two = [a for k, a in parsed if k == "v2"]
        for a in one + two:
            host = a.rsplit(":", 1)[0] if re.search(r":\d+$", a) else a
            if not re.fullmatch(r"[0-9.]+", host):
                raise ValueError(f"monitor {a!r}: krbd needs IPv4 addresses (no names)")
        if one:
            a = one[0]
            v1.append(a if re.search(r":\d+$", a) else f"{a}:6789")
        elif two:
            v2.append(two[0])
    if v1 and not v2:
        return Monitors(tuple(v1), "legacy")
    if v2 and not v1:
        return Monitors(tuple(v2), "prefer-crc")
    return Monitors(tuple(v1), "legacy")      # a mix: use the monitors that have a v1 address


def parse_keyring(text: str, name: str) -> str | None:
    """The base64 key of ``client.<name>`` in a keyring file's text (``None`` when absent)."""
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section == f"client.{name}":
            m = re.match(r"key\s*=\s*(\S+)", line)
            if m:
                return m.group(1)
    return None


def read_conf_value(text: str, key: str) -> str | None:
    """A ``[global]`` value of a ceph.conf (``mon host`` == ``mon_host``); ``None`` when absent."""
    want = key.replace("_", " ").strip()
    section = "global"
    for raw in text.splitlines():
        line = re.split(r"[#;]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section != "global" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        if k.strip().replace("_", " ") == want:
            return v.strip()
    return None


@dataclass(frozen=True)
class MapRequest:
    """What to map. ``secret`` (a cephx key; may be empty with auth none) never appears in ``repr``."""

    monitors: Monitors
    name: str
    pool: str
    image: str
    secret: str = field(default="", repr=False)
    options: tuple[str, ...] = ()


def map_line(r: MapRequest) -> str:
    """The line written to ``add_single_major``."""
    for what, v in (("pool", r.pool), ("image", r.image), ("client name", r.name)):
        if not v or any(c.isspace() or c == "," for c in v):
            raise PermanentBackendError(f"krbd: the {what} {v!r} cannot be mapped (empty, or a space or comma)")
    opts = [f"name={r.name}", "noshare"]
    if r.monitors.ms_mode != "legacy":
        opts.append(f"ms_mode={r.monitors.ms_mode}")
    if r.secret:
        opts.append(f"secret={r.secret}")
    opts.extend(r.options)
    return f"{','.join(r.monitors.addresses)} {','.join(opts)} {r.pool} {r.image} -"


@dataclass(frozen=True)
class Mapping:
    """One kernel mapping as sysfs shows it. ``client_addr`` (``ip:0/nonce``) is the client instance:
    the watcher in ``rbd status``, the locker in ``rbd lock ls``, what ``osd blocklist add`` takes."""

    id: int
    pool: str
    image: str
    snap: str
    client_id: str
    client_addr: str
    size: int
    #: the map line's options as the kernel recorded them (``config_info``), without any ``secret=``
    options: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return os.path.join(DEV, f"rbd{self.id}")


def options_of(config_info: str) -> tuple[str, ...]:
    """The options field of a mapping's ``config_info`` (the map line as written), secrets dropped."""
    parts = config_info.split()
    if len(parts) < 2:
        return ()
    return tuple(o for o in parts[1].split(",") if o and not o.startswith(("secret=", "key=")))


def made_by(m: Mapping, name: str) -> bool:
    """``m`` was mapped the way this backend maps: as ``client.<name>`` with ``noshare``."""
    return f"name={name}" in m.options and "noshare" in m.options


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class Krbd:
    """The kernel's rbd interface. ``timeout`` bounds each map/unmap (the sysfs write runs on a worker
    thread; a write still blocked after it is reported and left to finish)."""

    def __init__(self, timeout: float = 30.0, sysfs: str = SYSFS) -> None:
        self.timeout = timeout
        self.sysfs = sysfs
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="krbd")

    def ready(self) -> None:
        """Load the rbd module when its sysfs interface is missing."""
        if os.path.exists(os.path.join(self.sysfs, "add_single_major")):
            return
        r = subprocess.run(["modprobe", "rbd"], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 or not os.path.exists(os.path.join(self.sysfs, "add_single_major")):
            raise PermanentBackendError(f"krbd: cannot load the rbd kernel module: {r.stderr.strip() or 'no '}"
                                        f"{self.sysfs}/add_single_major")

    def mappings(self) -> dict[int, Mapping]:
        """Every mapping of this host (ours and foreign ones), by device id."""
        base = os.path.join(self.sysfs, "devices")
        out: dict[int, Mapping] = {}
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return out
        for n in names:
            if not n.isdigit():
                continue
            d = os.path.join(base, n)
            try:
                out[int(n)] = Mapping(id=int(n), pool=_read(f"{d}/pool"), image=_read(f"{d}/name"),
                                      snap=_read(f"{d}/current_snap"), client_id=_read(f"{d}/client_id"),
                                      client_addr=_read(f"{d}/client_addr"), size=int(_read(f"{d}/size")),
                                      options=options_of(_read(f"{d}/config_info")))
            except (OSError, ValueError):
                continue                      # going away while we looked
        return out

    def _write(self, name: str, text: str, what: str) -> None:
        def write() -> None:
            with open(os.path.join(self.sysfs, name), "w") as f:
                f.write(text)
        fut = self._pool.submit(write)
        try:
            fut.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise TransientBackendError(f"krbd: {what}: no answer within {self.timeout:g} s", retry_after=5) from None
        except OSError as e:
            raise TransientBackendError(f"krbd: {what}: {e.strerror or e} (the kernel log has the reason)",
                                        retry_after=2) from None

    def map(self, r: MapRequest) -> Mapping:
        """Map ``r.pool/r.image``; returns the new mapping (recognised by its fresh client address)."""
        self.ready()
        before = set(self.mappings())
        self._write("add_single_major", map_line(r), f"map {r.pool}/{r.image} as client.{r.name}")
        new = [m for i, m in self.mappings().items() if i not in before and (m.pool, m.image) == (r.pool, r.image)]
        if not new:
            raise TransientBackendError(f"krbd: mapped {r.pool}/{r.image} but its device is not listed",
                                        retry_after=1)
        return max(new, key=lambda m: m.id)

    def unmap(self, m: Mapping) -> None:
        """Remove mapping ``m`` if it is still the same client instance (never another mapping that got its
        id since). Gone already: fine."""
        now = self.mappings().get(m.id)
        if now is None or now.client_addr != m.client_addr:
            return
        self._write("remove_single_major", str(m.id), f"unmap /dev/rbd{m.id} ({m.pool}/{m.image})")

    def refresh(self, m: Mapping) -> int:
        """Re-read the image header (after a resize); returns the size the device has now."""
        self._write(f"devices/{m.id}/refresh", "1", f"refresh /dev/rbd{m.id}")
        return int(_read(os.path.join(self.sysfs, "devices", str(m.id), "size")))

    def close(self) -> None:
        self._pool.shutdown(wait=False)
