"""Checking every ``pathagent disk …`` argument before anything is contacted.

Each ``check_*`` takes the text as typed and returns it parsed, or raises ``UsageError`` whose message
names the option (``--path '10.0.0.0/24' (path 1): …``) in the words of the command line, with 1-based path
numbers as the admin typed them. Nothing here touches the network or the cluster: the CLI runs these
checks first and connects to Consul and Ceph only once they passed (exit 2 otherwise). What can only be
checked against the cluster (a name or address used by another disk) is ``agent.core.claims``'s job.

CHAP passwords are read from files and never appear in a message.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Sequence

from agent.core import keys, schema
from agent.core.model import Chap, PathSpec

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
SECTOR = 512
MAX_SIZE = 1 << 60


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def parse_size(text: str, option: str = "--size") -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"1.5G"``, ``"2T"`` (K/M/G/T are powers of 1024); a whole
    number of 512-byte sectors, at most 2**60."""
    m = SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{option} {text!r}: expected a byte count or a number with K, M, G or T")
    size = float(m.group(1)) * UNITS[m.group(2).upper()]
    if size != int(size) or size <= 0 or size % SECTOR:
        raise UsageError(f"{option} {text!r}: must be a positive multiple of {SECTOR} bytes")
    if size > MAX_SIZE:
        raise UsageError(f"{option} {text!r}: larger than the largest disk (1 EiB)")
    return int(size)


def human_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]} {unit}iB"
    return f"{size} B"


def check_name(text: str, option: str = "NAME") -> str:
    if not schema.NAME_RE.fullmatch(text):
        raise UsageError(f"{option} {text!r}: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter "
                         "or digit")
    return text


def check_ref(text: str) -> str:
    """A disk id or a disk name, as every ``disk`` command accepts it."""
    if not (keys.DISK_ID_RE.fullmatch(text) or schema.NAME_RE.fullmatch(text)):
        raise UsageError(f"DISK {text!r}: neither a disk id nor a disk name")
    return text


def check_pool(text: str, option: str = "--pool") -> str:
    if not schema.POOL_RE.fullmatch(text):
        raise UsageError(f"{option} {text!r}: not a valid pool name")
    return text


def check_image_spec(text: str, option: str = "--image") -> tuple[str, str]:
    """``POOL/IMAGE`` -> ``(pool, image)``."""
    pool, sep, image = text.partition("/")
    if not sep or not schema.POOL_RE.fullmatch(pool) or not schema.POOL_RE.fullmatch(image):
        raise UsageError(f"{option} {text!r}: expected POOL/IMAGE, e.g. rbd/vm-disk-1 (letters, digits, . _ -)")
    return pool, image


def check_iqn(text: str, option: str) -> str:
    if not schema.IQN_RE.fullmatch(text) or len(text) > 223:
        hint = " (iSCSI names are lowercase)" if text.lower() != text and schema.IQN_RE.fullmatch(text.lower()) \
            else ""
        raise UsageError(f"{option} {text!r}: not a valid iSCSI name (iqn.yyyy-mm.domain[:id], eui.… or "
                         f"naa.…){hint}")
    return text


def check_serial(text: str, option: str = "--serial") -> str:
    s = text.strip().lower()
    if not schema.SERIAL_RE.fullmatch(s):
        raise UsageError(f"{option} {text!r}: expected the LUN's unit serial in UUID form "
                         "(8-4-4-4-12 hex digits), as LIO, ceph-iscsi and tgt report it")
    return s


#: one ``--path``: the address, its prefix length, the VLAN id and the role (``None``: not given)
PathArg = tuple[str, int, int | None, str | None]


def check_path(text: str, number: int) -> PathArg:
    """``"198.18.0.10/24"`` -> ``("198.18.0.10", 24, None, None)``: an IPv4 unicast host address of its
    prefix; ``"198.18.0.10/24,vlan=20,role=iscsi-a"`` adds the path's VLAN id and interface role."""
    where = f"--path {text!r} (path {number})"
    addr_s, *extras = text.split(",")
    vlan: int | None = None
    role: str | None = None
    for x in extras:
        k, eq, v = x.partition("=")
        if k == "vlan" and eq and vlan is None and re.fullmatch(r"[0-9]{1,4}", v) and 1 <= int(v) <= 4094:
            vlan = int(v)
        elif k == "role" and eq and role is None and schema.ROLE_RE.fullmatch(v):
            role = v
        else:
            raise UsageError(f"{where}: {x!r} is not vlan=1..4094 or role=NAME (lowercase letters, digits, - _; "
                             "each at most once)")
    ip, sep, prefix_s = addr_s.partition("/")
    if not sep or not re.fullmatch(r"[0-9]{1,2}", prefix_s):
        raise UsageError(f"{where}: expected IP/PREFIX[,vlan=N][,role=NAME], e.g. 198.18.0.10/24")
    prefix = int(prefix_s)
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise UsageError(f"{where}: {ip!r} is not an IPv4 address") from None
    if not 1 <= prefix <= 32:
        raise UsageError(f"{where}: the prefix length must be between 1 and 32")
    reason = schema.host_address_problem(addr, prefix)
    if reason:
        raise UsageError(f"{where}: {reason}")
    return str(addr), prefix, vlan, role


def check_paths(texts: Sequence[str]) -> tuple[PathArg, ...]:
    if len(texts) > schema.MAX_PATHS:
        raise UsageError(f"--path: at most {schema.MAX_PATHS} paths, got {len(texts)}")
    out: list[PathArg] = []
    for n, t in enumerate(texts, 1):
        p = check_path(t, n)
        for m, other in enumerate(out, 1):
            if other[0] == p[0]:
                raise UsageError(f"--path {t!r} (path {n}): the same IP as path {m}")
        out.append(p)
    return tuple(out)


def path_arg(p: PathSpec) -> PathArg:
    return p.ip, p.prefix, p.vlan, p.role


def path_specs(paths: Sequence[PathArg]) -> tuple[PathSpec, ...]:
    return tuple(PathSpec(index=i, ip=ip, prefix=prefix, vlan=vlan, role=role)
                 for i, (ip, prefix, vlan, role) in enumerate(paths, 1))


def check_initiators(texts: Sequence[str], option: str = "--initiator") -> tuple[str, ...]:
    out: list[str] = []
    for t in texts:
        check_iqn(t, option)
        if t not in out:
            out.append(t)
    if len(out) > schema.MAX_INITIATORS:
        raise UsageError(f"{option}: at most {schema.MAX_INITIATORS} initiators")
    return tuple(out)


def read_secret(path: str, option: str) -> str:
    """The first line of ``path`` (a CHAP password file), without its line ending. Never printed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"{option} {path}: {reason}") from None
    lines = data.splitlines()
    secret = lines[0] if lines else ""
    if not schema.CHAP_SECRET_RE.fullmatch(secret):
        raise UsageError(f"{option} {path}: the first line must be a password of 12-255 printable "
                         "characters without spaces")
    return secret


def check_chap(user: str | None, password_file: str | None, kind: str) -> Chap | None:
    """A ``Chap`` from ``--{kind}-user`` and ``--{kind}-password-file``; ``None`` when neither is given."""
    if user is None and password_file is None:
        return None
    if user is None or password_file is None:
        raise UsageError(f"--{kind}-user and --{kind}-password-file go together")
    if not schema.CHAP_USER_RE.fullmatch(user):
        raise UsageError(f"--{kind}-user {user!r}: 1-255 printable characters without spaces")
    return Chap(user, read_secret(password_file, f"--{kind}-password-file"))


@dataclass(frozen=True)
class AccessArgs:
    """Access options of ``create``/``import``: ``initiators`` (``None``: open), CHAP, mutual CHAP."""

    initiators: tuple[str, ...] | None
    chap: Chap | None
    mutual_chap: Chap | None


def check_access(initiators: Sequence[str] | None, open_: bool, chap_user: str | None, chap_file: str | None,
                 mutual_user: str | None, mutual_file: str | None) -> AccessArgs:
    inits = check_initiators(initiators or ())
    if open_ and inits:
        raise UsageError("--open admits any initiator: it takes no --initiator")
    chap = check_chap(chap_user, chap_file, "chap")
    mutual = check_chap(mutual_user, mutual_file, "mutual-chap")
    if mutual is not None and chap is None:
        raise UsageError("--mutual-chap-user needs --chap-user (mutual CHAP is on top of CHAP)")
    return AccessArgs(None if open_ else inits, chap, mutual)


def check_positive(value: float, option: str) -> float:
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{option} {value:g}: must be a positive number of seconds")
    return value
