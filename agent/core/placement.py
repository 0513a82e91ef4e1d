"""Balanced placement of free paths. Pure.

Every node computes the same assignment from the same snapshot, so nodes do not race for the same path:
walk the free paths in a fixed order and give each to the node ranked highest by rendezvous hashing
(HRW) among the live nodes still below the fair share ``ceil(total / live nodes)``, preferring a node
that serves no other path of the same disk. A node acquires only
the free paths assigned to it; a path that stays free longer than the placement grace is "overdue" and
any node may take it (so a frozen or failing node cannot strand a path).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping

from agent.core.model import PathKey


def score(node: str, path: PathKey) -> int:
    """Rendezvous-hash weight of ``node`` for ``path`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.blake2b(f"{node}\0{path}".encode(), digest_size=8).digest(), "big")


def fair_share(total: int, nodes: int) -> int:
    return math.ceil(total / nodes) if nodes else 0


def assign(free: Iterable[PathKey], nodes: Iterable[str], counts: Mapping[str, int],
           total: int, owners: Mapping[PathKey, str] | None = None) -> dict[PathKey, str]:
    """Map each free path to the node that should take it.

    ``counts`` are the paths each node holds now; ``total`` is the number of paths to spread; ``owners``
    says which node holds each held path. Nodes at or above the fair share get nothing while another node
    is below it; among the rest, a node that does not serve another path of the same disk yet comes
    first (the paths of one disk on different gateways is what multipath is for), then the HRW score."""
    live = sorted(set(nodes))
    if not live:
        return {}
    cap = fair_share(total, len(live))
    projected = {n: counts.get(n, 0) for n in live}
    per_disk: dict[str, set[str]] = {}
    for p, n in (owners or {}).items():
        per_disk.setdefault(p.disk, set()).add(n)
    out: dict[PathKey, str] = {}
    for p in sorted(free):
        below = [n for n in live if projected[n] < cap] or live
        taken = per_disk.setdefault(p.disk, set())
        winner = max(below, key=lambda n: (n not in taken, score(n, p), n))
        out[p] = winner
        projected[winner] += 1
        taken.add(winner)
    return out
