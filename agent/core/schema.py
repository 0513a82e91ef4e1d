"""The disk definition document (RBD image metadata key ``pathagent.disk``), version 1.

```json
{"version": 1, "id": "d3f9a0c1", "name": "vmstore", "pool": "rbd", "image": "pathagent-d3f9a0c1",
 "size": 1073741824, "iqn": "iqn.2016-05.io.pathagent:d3f9a0c1",
 "serial": "6f1e07c2-8c84-4e55-9d59-2ad1a0e5b3f1",
 "paths": [{"index": 1, "ip": "198.18.0.100", "prefix": 24, "vlan": null, "role": null}],
 "open": false, "initiators": ["iqn.1993-08.org.debian:01:abc"],
 "chap": {"user": "u", "password": "..."}, "mutual_chap": null}
```

``parse`` validates a document and returns a ``Disk`` or raises ``DefinitionError(disk, field, reason)``
and nothing else, whatever the input. ``dump`` writes the canonical document. Pure.
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from agent.core.keys import DISK_ID_RE
from agent.core.model import Chap, Disk, PathSpec
from agent.errors import DefinitionError

META_KEY = "pathagent.disk"
VERSION = 1
MAX_DOCUMENT = 64 * 1024
MAX_PATHS = 32
MAX_INITIATORS = 256

# RFC 3720 names: iqn.yyyy-mm.reversed.domain[:unique], eui.<16 hex>, naa.<16 or 32 hex>; at most 223 bytes.
IQN_RE = re.compile(r"^(iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
                    r"(:[a-z0-9.:_-]+)?|eui\.[0-9a-f]{16}|naa\.([0-9a-f]{16}|[0-9a-f]{32}))$")
SERIAL_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
POOL_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
CHAP_USER_RE = re.compile(r"^[\x21-\x7e]{1,255}$")       # printable ASCII, no space (LIO and tgt)
CHAP_SECRET_RE = re.compile(r"^[\x21-\x7e]{12,255}$")    # 12..255: the RFC 3720 minimum; LIO's maximum
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

FIELDS = {"version", "id", "name", "pool", "image", "size", "iqn", "serial", "paths", "open",
          "initiators", "chap", "mutual_chap"}
PATH_FIELDS = {"index", "ip", "prefix", "vlan", "role"}


def _fail(disk: str, field: str, reason: str) -> DefinitionError:
    return DefinitionError(disk, field, reason)


def _str(d: dict[str, Any], key: str, disk: str, pattern: re.Pattern[str], what: str,
         field: str | None = None) -> str:
    v = d.get(key)
    f = field or key
    if v is None:
        raise _fail(disk, f, "missing")
    if not isinstance(v, str):
        raise _fail(disk, f, f"must be a string, not {type(v).__name__}")
    if not pattern.fullmatch(v):
        raise _fail(disk, f, f"not a valid {what}")
    return v


def _int(v: Any, disk: str, field: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(disk, field, f"must be an integer, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise _fail(disk, field, f"must be between {lo} and {hi}")
    return int(v)


def _chap(v: Any, disk: str, field: str) -> Chap | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _fail(disk, field, "must be an object with user and password, or null")
    unknown = set(v) - {"user", "password"}
    if unknown:
        raise _fail(disk, f"{field}.{sorted(unknown)[0]}", "unknown field")
    user = _str(v, "user", disk, CHAP_USER_RE, "CHAP user (1-255 printable characters, no space)",
                f"{field}.user")
    pw = v.get("password")
    if not isinstance(pw, str) or not CHAP_SECRET_RE.fullmatch(pw):
        # never echo the secret
        raise _fail(disk, f"{field}.password", "must be 12-255 printable characters without spaces")
    return Chap(user, pw)


def host_address_problem(addr: ipaddress.IPv4Address, prefix: int) -> str:
    """Why ``addr/prefix`` cannot be a floating path address ('' when it can): it must be a unicast host
    address of its subnet, not the subnet's network or broadcast address (except on /31 and /32)."""
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_reserved:
        return f"{addr} is not a usable unicast address"
    net = ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False)
    if prefix <= 30 and addr == net.network_address:
        return f"{addr} is the network address of {net}, not a host address"
    if prefix <= 30 and addr == net.broadcast_address:
        return f"{addr} is the broadcast address of {net}, not a host address"
    return ""


def _path(v: Any, disk: str, i: int) -> PathSpec:
    f = f"paths[{i}]"
    if not isinstance(v, dict):
        raise _fail(disk, f, "must be an object")
    unknown = set(v) - PATH_FIELDS
    if unknown:
        raise _fail(disk, f"{f}.{sorted(unknown)[0]}", "unknown field")
    if "index" not in v:
        raise _fail(disk, f"{f}.index", "missing")
    index = _int(v["index"], disk, f"{f}.index", 1, 65535)
    ip = v.get("ip")
    if not isinstance(ip, str):
        raise _fail(disk, f"{f}.ip", "missing" if ip is None else "must be a string")
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise _fail(disk, f"{f}.ip", "not an IPv4 address") from None
    if "prefix" not in v:
        raise _fail(disk, f"{f}.prefix", "missing")
    prefix = _int(v["prefix"], disk, f"{f}.prefix", 1, 32)
    problem = host_address_problem(addr, prefix)
    if problem:
        raise _fail(disk, f"{f}.ip", problem)
    vlan = v.get("vlan")
    if vlan is not None:
        vlan = _int(vlan, disk, f"{f}.vlan", 1, 4094)
    role = v.get("role")
    if role is not None and (not isinstance(role, str) or not ROLE_RE.fullmatch(role)):
        raise _fail(disk, f"{f}.role", "must be a short lowercase name")
    return PathSpec(index=index, ip=str(addr), prefix=prefix, vlan=vlan, role=role)


def parse(document: str | bytes, disk_id: str) -> Disk:
    """Validate ``document`` (the metadata value) for ``disk_id``. Raises only ``DefinitionError``."""
    try:
        if isinstance(document, bytes):
            document = document.decode("utf-8")
        if len(document) > MAX_DOCUMENT:
            raise _fail(disk_id, "(document)", f"larger than {MAX_DOCUMENT} bytes")
        doc = json.loads(document)
    except DefinitionError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _fail(disk_id, "(document)", f"not valid JSON: {type(e).__name__}") from None
    return from_dict(doc, disk_id)


def from_dict(doc: Any, disk_id: str) -> Disk:
    """Validate an already decoded document. Raises only ``DefinitionError``."""
    if not isinstance(doc, dict):
        raise _fail(disk_id, "(document)", "must be a JSON object")
    if "version" not in doc:
        raise _fail(disk_id, "version", "missing")
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(disk_id, "version", "must be an integer")
    if version != VERSION:
        raise _fail(disk_id, "version", f"unsupported version {version} (this agent reads version {VERSION}); "
                                        "upgrade the agent")
    unknown = set(doc) - FIELDS
    if unknown:
        raise _fail(disk_id, str(sorted(unknown)[0])[:64], "unknown field")
    did = _str(doc, "id", disk_id, DISK_ID_RE, "disk id")
    if did != disk_id:
        raise _fail(disk_id, "id", "does not match the disk id it is stored for")
    name = _str(doc, "name", disk_id, NAME_RE, "name (1-64 of A-Z a-z 0-9 . _ -)")
    pool = _str(doc, "pool", disk_id, POOL_RE, "pool name") if "pool" in doc else ""
    image = _str(doc, "image", disk_id, POOL_RE, "image name") if "image" in doc else ""
    size = _int(doc.get("size", 0), disk_id, "size", 0, 1 << 60)
    iqn = _str(doc, "iqn", disk_id, IQN_RE, "iSCSI name (iqn./eui./naa., lowercase)")
    if len(iqn) > 223:
        raise _fail(disk_id, "iqn", "longer than 223 bytes")
    serial = _str(doc, "serial", disk_id, SERIAL_RE, "unit serial (lowercase UUID form)")
    paths_v = doc.get("paths")
    if not isinstance(paths_v, list) or not paths_v:
        raise _fail(disk_id, "paths", "must be a non-empty list")
    if len(paths_v) > MAX_PATHS:
        raise _fail(disk_id, "paths", f"more than {MAX_PATHS} paths")
    paths = tuple(_path(p, disk_id, i) for i, p in enumerate(paths_v))
    seen: set[int] = set()
    ips: set[str] = set()
    for i, p in enumerate(paths):
        if p.index in seen:
            raise _fail(disk_id, f"paths[{i}].index", f"duplicate index {p.index}")
        if p.ip in ips:
            raise _fail(disk_id, f"paths[{i}].ip", f"duplicate IP {p.ip}")
        seen.add(p.index)
        ips.add(p.ip)
    open_ = doc.get("open", False)
    if not isinstance(open_, bool):
        raise _fail(disk_id, "open", "must be true or false")
    inits_v = doc.get("initiators", [])
    if not isinstance(inits_v, list):
        raise _fail(disk_id, "initiators", "must be a list of IQNs")
    if len(inits_v) > MAX_INITIATORS:
        raise _fail(disk_id, "initiators", f"more than {MAX_INITIATORS} entries")
    inits: list[str] = []
    for i, v in enumerate(inits_v):
        if not isinstance(v, str) or not IQN_RE.fullmatch(v) or len(v) > 223:
            raise _fail(disk_id, f"initiators[{i}]", "not a valid iSCSI name")
        if v not in inits:
            inits.append(v)
    if open_ and inits:
        raise _fail(disk_id, "open", "an open disk takes no initiator list")
    chap = _chap(doc.get("chap"), disk_id, "chap")
    mutual = _chap(doc.get("mutual_chap"), disk_id, "mutual_chap")
    if mutual is not None and chap is None:
        raise _fail(disk_id, "mutual_chap", "needs chap")
    return Disk(id=did, name=name, iqn=iqn, serial=serial, paths=tuple(sorted(paths, key=lambda p: p.index)),
                pool=pool, image=image, size=size, initiators=None if open_ else tuple(inits),
                chap=chap, mutual_chap=mutual, version=version)


def to_dict(disk: Disk) -> dict[str, Any]:
    """The canonical document for ``disk`` (includes secrets: only for storage, never for display)."""
    def chap(c: Chap | None) -> dict[str, str] | None:
        return None if c is None else {"user": c.user, "password": c.password}
    doc: dict[str, Any] = {
        "version": VERSION, "id": disk.id, "name": disk.name,
        **({"pool": disk.pool} if disk.pool else {}), **({"image": disk.image} if disk.image else {}),
        "size": disk.size, "iqn": disk.iqn, "serial": disk.serial,
        "paths": [{"index": p.index, "ip": p.ip, "prefix": p.prefix, "vlan": p.vlan, "role": p.role}
                  for p in disk.paths],
        "open": disk.initiators is None, "initiators": list(disk.initiators or ()),
        "chap": chap(disk.chap), "mutual_chap": chap(disk.mutual_chap),
    }
    return doc


def dump(disk: Disk) -> str:
    return json.dumps(to_dict(disk), sort_keys=True, separators=(",", ":"))


def public_dict(disk: Disk) -> dict[str, Any]:
    """``to_dict`` with secrets replaced: what the CLI and logs may show."""
    d = to_dict(disk)
    for k in ("chap", "mutual_chap"):
        if d[k] is not None:
            d[k] = {"user": d[k]["user"], "password": "***"}
    return d
