"""Uniqueness claims: what makes a disk's name, IQN and path addresses its own across the cluster. Pure.

Two disks must never share a path IP (two gateways would bring up one address), an IQN (initiators would
mix their LUNs) or a name (the CLI accepts names wherever it accepts ids). The definitions live in RBD
image metadata, which cannot be changed atomically across images, so each unique value is *claimed* by a
Consul key ``{prefix}/claims/{kind}/{value}`` (``agent.core.keys``) whose value names the disk::

    {"disk": "d15c0001", "pool": "rbd", "image": "pathagent-d15c0001", "name": "vm", "op": "create"}

A claim is created with check-and-set on index 0, so of two commands claiming one value at the same
moment exactly one wins. Claims are taken before the image or its metadata is written (``disk create``,
``disk import``, a rename), checked again and completed by ``disk start`` in one transaction, and dropped
by ``disk delete``; they live as long as the disk. The ``name`` claim is the disk's registry entry: it
says where the image is (an imported image is not called ``pathagent-<id>``), and while a create or
import is in progress it is locked by that command's session, so a second command can tell a create that
is running (locked) from one that was interrupted (unlocked, no definition yet: the same command run
again finishes it, ``disk delete`` drops it).

This module computes which keys a disk needs and what stands in the way; the CLI turns that into
transactions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping

from agent.core import keys
from agent.core.model import Disk, PathSpec

#: ``(kind, value)``: kind is one of ``keys.CLAIM_KINDS``; value normalised
Claim = tuple[str, str]

KIND_WORDS = {"name": "name", "iqn": "IQN", "ip": "path IP"}


def name_claim(name: str) -> Claim:
    """Names are unique regardless of case: ``VM`` and ``vm`` would confuse an admin as much as a tool."""
    return ("name", name.lower())


def wanted(name: str, iqn: str, paths: Iterable[PathSpec] | Iterable[str]) -> frozenset[Claim]:
    """The claims of a disk with this name, IQN and path addresses (``PathSpec`` or plain IPs)."""
    ips = {p.ip if isinstance(p, PathSpec) else p for p in paths}
    return frozenset({name_claim(name), ("iqn", iqn), *(("ip", ip) for ip in ips)})


def of_disk(disk: Disk) -> frozenset[Claim]:
    return wanted(disk.name, disk.iqn, disk.paths)


def describe(claim: Claim) -> str:
    """``path IP 198.18.0.10``, ``IQN iqn...``, ``name vm`` (for messages)."""
    return f"{KIND_WORDS[claim[0]]} {claim[1]}"


@dataclass(frozen=True)
class ClaimValue:
    """What a claim key holds. ``op`` (``create``/``import``) and ``name`` matter on the name claim."""

    disk: str
    pool: str
    image: str
    name: str = ""
    op: str = ""

    def encode(self) -> bytes:
        d = {"disk": self.disk, "pool": self.pool, "image": self.image}
        if self.name:
            d["name"] = self.name
        if self.op:
            d["op"] = self.op
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> "ClaimValue | None":
        """``None`` for anything that is not a claim value of ours (never raises)."""
        if not raw or len(raw) > 4096:
            return None
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(d, dict):
            return None
        vals = {k: d.get(k, "") for k in ("disk", "pool", "image", "name", "op")}
        if not all(isinstance(v, str) for v in vals.values()) or not keys.DISK_ID_RE.fullmatch(vals["disk"]):
            return None
        return cls(**vals)


@dataclass(frozen=True)
class Held:
    """A claim key as read: who it names, its ModifyIndex, and the session locking it (if any)."""

    value: ClaimValue | None
    modify_index: int
    session: str | None = None

    @property
    def disk(self) -> str | None:
        return self.value.disk if self.value is not None else None


def read(prefix: str, entries: Iterable[tuple[str, bytes | None, int, str | None]]) -> dict[Claim, Held]:
    """Claim keys from ``(key, value, modify_index, session)`` tuples; other keys are left out."""
    out: dict[Claim, Held] = {}
    for key, value, index, session in entries:
        c = keys.parse_claim(prefix, key)
        if c is not None:
            out[c] = Held(ClaimValue.decode(value), index, session)
    return out


@dataclass(frozen=True)
class Conflict:
    """``claim`` belongs to ``other`` (a disk id), known from ``source``: ``claim`` (its Consul key) or
    ``definition`` (a disk's metadata that nobody claimed, e.g. written by other tools)."""

    claim: Claim
    other: str
    source: str = "claim"

    def message(self) -> str:
        how = "" if self.source == "claim" else " (in its definition)"
        return f"{describe(self.claim)} is already used by disk {self.other}{how}"


def conflicts(disk_id: str, want: Iterable[Claim], held: Mapping[Claim, Held],
              definitions: Mapping[str, frozenset[Claim]] = {}) -> list[Conflict]:
    """Each wanted claim that a key gives to another disk, or that another disk's definition uses. A claim
    key whose value cannot be read counts as taken by ``?``: it is not ours to overwrite."""
    out: list[Conflict] = []
    for c in sorted(set(want)):
        h = held.get(c)
        if h is not None and h.disk != disk_id:
            out.append(Conflict(c, h.disk or "?"))
            continue
        for other, theirs in sorted(definitions.items()):
            if other != disk_id and c in theirs:
                out.append(Conflict(c, other, "definition"))
                break
    return out


@dataclass(frozen=True)
class ClaimPlan:
    """What makes ``disk``'s claim keys exactly ``want``: ``create`` (absent now), ``keep`` (ours
    already, with the index to check), ``drop`` (ours, no longer wanted, with their index)."""

    create: tuple[Claim, ...]
    keep: tuple[tuple[Claim, int], ...]
    drop: tuple[tuple[Claim, int], ...]


def plan(disk_id: str, want: Iterable[Claim], held: Mapping[Claim, Held]) -> ClaimPlan:
    """The changes, once ``conflicts`` found none."""
    w = set(want)
    return ClaimPlan(
        create=tuple(sorted(c for c in w if c not in held)),
        keep=tuple(sorted((c, held[c].modify_index) for c in w if c in held and held[c].disk == disk_id)),
        drop=tuple(sorted((c, h.modify_index) for c, h in held.items() if h.disk == disk_id and c not in w)))


def registry(held: Mapping[Claim, Held]) -> dict[str, tuple[Claim, Held]]:
    """Disk id -> its name claim (the registry entry) for every readable name claim."""
    return {h.value.disk: (c, h) for c, h in held.items() if c[0] == "name" and h.value is not None}


def of_disk_id(disk_id: str, held: Mapping[Claim, Held]) -> frozenset[Claim]:
    return frozenset(c for c, h in held.items() if h.disk == disk_id)
