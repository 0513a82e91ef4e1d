"""The Consul key layout, in one place.

``{prefix}/disks/{disk_id}``            disk record (JSON ``{"pool", "image", ...}``), exists while started
``{prefix}/disks/{disk_id}/{index}``    path lock key, 1-based index = TPG tag; value while held:
                                        ``{"node", "session", "since"}``
``{prefix}/nodes/{node}``               node record, locked by the node's session while its agent runs
                                        (value ``{"node", "session", "since", "backend"}``); the set of
                                        locked node records is the set of live agents used for placement
``{prefix}/moves/{disk_id}/{index}``    a pending move request (value ``{"node": target}``), locked by
                                        the session of whoever asked (the CLI's, or the leader's for
                                        rebalancing and drain) while it is wanted
``{prefix}/leader``                     the cluster leader's lock, held by one agent's session
                                        (value ``{"node", "session", "since"}``)
``{prefix}/drain/{node}``               exists while ``node`` is drained (value ``{"since"}``, informational)
``{prefix}/fenced/{node}``              the last fence of ``node`` by the leader (value ``{"node",
                                        "session", "since", "summary"}``); its ModifyIndex orders it after
                                        the invalidation it answers
``{prefix}/claims/{kind}/{value}``      a disk's claim on a unique value: ``kind`` is ``name`` (lowercased
                                        display name), ``iqn`` or ``ip`` (a path address); value
                                        ``{"disk", "pool", "image"}`` (see ``agent.core.claims``); written
                                        by the CLI only, ignored by agents
``{prefix}/logins/{node}``              the initiators logged in on ``node``, by disk (value ``{"node",
                                        "session", "since", "disks": {id: [iqn, ...]}}``), locked by the
                                        node's session; written by its agent, read by the CLI only

Pure: parsing and formatting only.
"""
from __future__ import annotations

import re

from agent.core.model import PathKey

DISK_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
INDEX_RE = re.compile(r"[1-9][0-9]{0,4}")      # ASCII digits only: str.isdigit() also accepts "²"


def disks_prefix(prefix: str) -> str:
    return f"{prefix}/disks/"


def disk_key(prefix: str, disk_id: str) -> str:
    return f"{prefix}/disks/{disk_id}"


def path_key(prefix: str, path: PathKey) -> str:
    return f"{prefix}/disks/{path.disk}/{path.index}"


def node_key(prefix: str, node: str) -> str:
    return f"{prefix}/nodes/{node}"


def paths_prefix(prefix: str, disk_id: str) -> str:
    """Everything under a disk's key: its path keys."""
    return f"{prefix}/disks/{disk_id}/"


def disk_moves_prefix(prefix: str, disk_id: str) -> str:
    """The move requests for a disk's paths."""
    return f"{prefix}/moves/{disk_id}/"


def move_key(prefix: str, path: PathKey) -> str:
    return f"{prefix}/moves/{path.disk}/{path.index}"


def leader_key(prefix: str) -> str:
    return f"{prefix}/leader"


def drain_key(prefix: str, node: str) -> str:
    return f"{prefix}/drain/{node}"


def fenced_key(prefix: str, node: str) -> str:
    return f"{prefix}/fenced/{node}"


CLAIM_KINDS = ("name", "iqn", "ip")


def claims_prefix(prefix: str) -> str:
    return f"{prefix}/claims/"


def claim_key(prefix: str, kind: str, value: str) -> str:
    """The claim of ``value`` (already normalised: lowercase name, IQN, dotted IPv4) of ``kind``."""
    assert kind in CLAIM_KINDS
    return f"{prefix}/claims/{kind}/{value}"


def parse_claim(prefix: str, key: str) -> tuple[str, str] | None:
    """``(kind, value)`` of a claim key, ``None`` for anything else."""
    head = claims_prefix(prefix)
    if not key.startswith(head):
        return None
    kind, sep, value = key[len(head):].partition("/")
    return (kind, value) if sep and kind in CLAIM_KINDS and value else None


def logins_prefix(prefix: str) -> str:
    return f"{prefix}/logins/"


def logins_key(prefix: str, node: str) -> str:
    return f"{prefix}/logins/{node}"


def parse(prefix: str, key: str) -> tuple[str, str | PathKey] | None:
    """Classify a key under ``prefix``: ``("disk", id)``, ``("path", PathKey)``, ``("node", name)``,
    ``("move", PathKey)``, ``("leader", "")``, ``("drain", name)``, ``("fenced", name)``; ``None`` for
    anything else (it is ignored, never an error; claims and logins are ``None`` here: agents ignore
    them)."""
    head = prefix + "/"
    if not key.startswith(head):
        return None
    parts = key[len(head):].split("/")
    if len(parts) == 2 and parts[0] == "disks" and DISK_ID_RE.fullmatch(parts[1]):
        return ("disk", parts[1])
    if len(parts) == 3 and parts[0] in ("disks", "moves") and DISK_ID_RE.fullmatch(parts[1]):
        if INDEX_RE.fullmatch(parts[2]):
            kind = "path" if parts[0] == "disks" else "move"
            return (kind, PathKey(parts[1], int(parts[2])))
        return None
    if len(parts) == 2 and parts[0] in ("nodes", "drain", "fenced") and parts[1]:
        return ({"nodes": "node", "drain": "drain", "fenced": "fenced"}[parts[0]], parts[1])
    if parts == ["leader"]:
        return ("leader", "")
    return None
