"""What Ceph says about its clients, as plain data, and the pure choice of which of them to fence.

This module imports neither ``rados`` nor ``rbd`` (so tier 1 tests it anywhere): ``agent.adapters.ceph``
fills the records, ``agent.adapters.ceph_fencing`` acts on the plan. Nothing here has side effects.

Addresses are librados client addresses in the form the blocklist takes, ``IP:PORT/NONCE``
(``127.0.0.1:0/408718371``, ``[fd00::5]:0/77``). The nonce is random per ``rados.Rados`` instance, so one
address is one librados instance: tgtd's bs_rbd has one per LUN.

Who is whose. A node's data path runs as its own Ceph entity (``client.<data_client_id>``), so every
monitor session with that ``entity_name`` is the failed node's. Image watchers and lock owners carry no
entity, only an address; one of them is counted as the failed node's when its IP is one the node published
and its address is not a current session of any *other* entity (a killed tgtd's mon session is gone at once
while the OSD keeps its watch for ``osd_client_watch_timeout``, 30 s; and two nodes may share an IP, as in
tests on 127.0.0.1, where the other node's live clients are told apart by their sessions).

The invariant ``plan`` keeps, tested in tests/unit/test_ceph_fenceset.py: no address that is a current
session of another entity is ever in ``blocklist``, and no lock is broken whose owner is not blocklisted.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: identity() publishes at most this many source IPs (a node has a handful; the cap keeps the record small)
MAX_IPS = 16
MAX_ENTITY = 128
IDENTITY_VERSION = 1


@dataclass(frozen=True, slots=True)
class MonSession:
    """One session a monitor has open: ``entity`` (``client.pathagent-gwa``, ``osd.0``) and the normalised
    addresses of that client (usually one)."""

    mon: str
    entity: str
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ImageClients:
    """Who has ``pool/image`` open (``watchers``) and who holds its exclusive lock (``owners``: none or
    one), as normalised addresses."""

    pool: str
    image: str
    watchers: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FencePlan:
    """What to do for one failed node.

    - ``blocklist``: every address to blocklist, lock owners first (they are what the next owner waits for),
      then the other openers of the failed node's images, then its remaining sessions;
    - ``by_session`` / ``by_ip``: how each was found (a session of the entity; a watcher or owner from a
      published IP with no session: a lingering watch);
    - ``breaks``: ``(pool, image, owner)`` locks to break, each owner in ``blocklist``;
    - ``spared_owners``: ``(pool, image, owner)`` locks held by a client that is not the failed node's
      (a healthy gateway): left alone and reported;
    - ``spared``: watchers from one of the failed node's IPs left alone because another entity has a
      session at that address.
    """

    blocklist: tuple[str, ...] = ()
    by_session: frozenset[str] = frozenset()
    by_ip: frozenset[str] = frozenset()
    breaks: tuple[tuple[str, str, str], ...] = ()
    spared_owners: tuple[tuple[str, str, str], ...] = ()
    spared: int = 0


def normalize(addr: str) -> str:
    """``IP:PORT/NONCE`` from what librados prints: drops a ``v1:``/``v2:``/``any:`` type prefix and the
    brackets of a one-element address vector. Anything else is returned stripped, unchanged."""
    a = addr.strip()
    if a.startswith("[") and a.endswith("]") and "," not in a and ("v1:" in a or "v2:" in a or "any:" in a):
        a = a[1:-1]
    for prefix in ("v1:", "v2:", "any:"):
        if a.startswith(prefix):
            a = a[len(prefix):]
            break
    return a


def join_addr(addr: str, nonce: int) -> str:
    """The blocklist form of a session's ``addrvec`` entry (``addr`` ``127.0.0.1:0``, ``nonce`` 4711)."""
    return f"{addr}/{nonce}"


def addr_ip(addr: str) -> str | None:
    """The IP of an address (``127.0.0.1:0/4711`` -> ``127.0.0.1``, ``[fd00::5]:0/7`` -> ``fd00::5``), in
    canonical text; ``None`` when it is not one."""
    a = normalize(addr).split("/", 1)[0]
    if a.startswith("["):
        host = a[1:a.find("]")] if "]" in a else ""
    else:
        host = a.rsplit(":", 1)[0] if a.count(":") == 1 else a
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _canon_ip(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def identity_of(entity: str, own_addrs: Iterable[str], sessions: Iterable[MonSession]) -> dict[str, Any]:
    """What a node publishes: its data entity and the IPs it reaches Ceph from (``own_addrs``: addresses of
    its own clients; plus the IPs of the monitor sessions of ``entity``). Small whatever the number of LUNs:
    IPs, never per-instance addresses; at most ``MAX_IPS``."""
    ips: set[str] = set()
    for a in own_addrs:
        ip = addr_ip(a)
        if ip is not None:
            ips.add(ip)
    for s in sessions:
        if s.entity == entity:
            for a in s.addrs:
                ip = addr_ip(a)
                if ip is not None:
                    ips.add(ip)
    return {"v": IDENTITY_VERSION, "entity": entity, "ips": sorted(ips)[:MAX_IPS]}


def read_identity(identity: Mapping[str, Any], fallback_entity: str) -> tuple[str, frozenset[str], list[str]]:
    """``(entity, ips, problems)`` from a published identity. A missing or malformed ``entity`` gives
    ``fallback_entity`` (may be empty: unknown); malformed IPs are dropped. ``problems`` says what was
    ignored (for the log)."""
    problems: list[str] = []
    entity = fallback_entity
    raw = identity.get("entity")
    if raw is not None:
        if (isinstance(raw, str) and raw.startswith("client.") and len(raw) > len("client.")
                and len(raw) <= MAX_ENTITY and not any(c.isspace() for c in raw)):
            entity = raw
        else:
            problems.append(f"entity {str(raw)[:40]!r} is not a client name")
    ips: set[str] = set()
    raw_ips = identity.get("ips", [])
    if not isinstance(raw_ips, list):
        problems.append("ips is not a list")
        raw_ips = []
    for ip in raw_ips[:MAX_IPS * 4]:
        canon = _canon_ip(ip) if isinstance(ip, str) else None
        if canon is None:
            problems.append(f"ip {str(ip)[:40]!r} is not an IP address")
        else:
            ips.add(canon)
    return entity, frozenset(ips), problems


def plan(entity: str, ips: Iterable[str], sessions: Iterable[MonSession],
         images: Iterable[ImageClients]) -> FencePlan:
    """The fence set of the node whose data path is ``entity`` and whose published source IPs are ``ips``,
    given every monitor's ``sessions`` and the clients of each of its ``images``. Pure.

    - every address of every session of ``entity``;
    - plus each watcher and lock owner of the images whose IP is in ``ips`` and whose address is not a
      session of another entity;
    - a lock is broken only when its owner is in that set; others are reported in ``spared_owners``.
    """
    ipset = {c for c in map(_canon_ip, ips) if c is not None}
    mine: list[str] = []
    others: set[str] = set()
    for s in sessions:
        if s.entity == entity:
            mine.extend(normalize(a) for a in s.addrs)
        else:
            others.update(normalize(a) for a in s.addrs)
    by_session = frozenset(mine)
    by_ip: set[str] = set()
    spared: set[str] = set()

    def ours(addr: str) -> bool:
        if addr in by_session:
            return True
        if addr_ip(addr) not in ipset:
            return False
        if addr in others:
            spared.add(addr)
            return False
        by_ip.add(addr)
        return True

    owners_first: list[str] = []
    openers: list[str] = []
    breaks: list[tuple[str, str, str]] = []
    spared_owners: list[tuple[str, str, str]] = []
    for img in images:
        for o in map(normalize, img.owners):
            if ours(o):
                owners_first.append(o)
                breaks.append((img.pool, img.image, o))
            else:
                spared_owners.append((img.pool, img.image, o))
        openers.extend(w for w in map(normalize, img.watchers) if ours(w))
    order = dict.fromkeys([*owners_first, *openers, *mine])
    return FencePlan(blocklist=tuple(order), by_session=by_session, by_ip=frozenset(by_ip - by_session),
                     breaks=tuple(breaks), spared_owners=tuple(spared_owners), spared=len(spared))
