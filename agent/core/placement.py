"""Balanced placement: who takes a free path (every node), and which held paths move (the leader). Pure.

*Free paths.* Every node computes the same assignment from the same snapshot, so nodes do not race for
the same path: walk the free paths in a fixed order and give each to the node ranked highest by
rendezvous hashing (HRW) among the eligible nodes (live, not drained) still below their share, preferring
a node that serves no other path of the same disk. A node acquires only the free paths assigned to it; a
path that stays free longer than the placement grace is "overdue" and any eligible node may take it (so a
frozen or failing node cannot strand a path).

*Held paths* (``rebalance``, run by the cluster leader only): a drained node's paths, a node holding more
than its share while another holds less than its share, and a disk with two paths on one node while an
eligible node has none of that disk, each give one path to the best target by a planned move. Only nodes
that have been live for a while are targets (hysteresis: a flapping node attracts nothing), and only a few
moves are in flight at once (rate limit), so a join, a return or a drain never causes a storm.

A node's share is ``total * weight / sum of weights`` over the eligible nodes; counts within one of it
(``floor``..``ceil``) are balanced: with equal weights the counts of any two nodes differ by one at most.
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


def shares(total: int, weights: Mapping[str, float]) -> dict[str, float]:
    """Each node's exact share of ``total`` paths by weight."""
    w = sum(weights.values())
    return {n: total * x / w for n, x in weights.items()} if w > 0 else {}


def _caps(total: int, nodes: list[str], weights: Mapping[str, float] | None) -> dict[str, int]:
    ws = {n: (weights or {}).get(n, 1.0) for n in nodes}
    return {n: math.ceil(x - 1e-9) for n, x in shares(total, ws).items()}


def assign(free: Iterable[PathKey], nodes: Iterable[str], counts: Mapping[str, int],
           total: int, owners: Mapping[PathKey, str] | None = None,
           weights: Mapping[str, float] | None = None) -> dict[PathKey, str]:
    """Map each free path to the eligible node (of ``nodes``) that should take it.

    ``counts`` are the paths each node holds now; ``total`` is the number of paths to spread; ``owners``
    says which node holds each held path; ``weights`` the nodes' weights (default 1). Nodes at or above
    their share (rounded up) get nothing while another node is below its own; among the rest, a node that
    does not serve another path of the same disk yet comes first (the paths of one disk on different
    gateways is what multipath is for), then the HRW score."""
    live = sorted(set(nodes))
    if not live:
        return {}
    caps = _caps(total, live, weights)
    projected = {n: counts.get(n, 0) for n in live}
    per_disk: dict[str, set[str]] = {}
    for p, n in (owners or {}).items():
        per_disk.setdefault(p.disk, set()).add(n)
    out: dict[PathKey, str] = {}
    for p in sorted(free):
        below = [n for n in live if projected[n] < caps[n]] or live
        taken = per_disk.setdefault(p.disk, set())
        winner = max(below, key=lambda n: (n not in taken, score(n, p), n))
        out[p] = winner
        projected[winner] += 1
        taken.add(winner)
    return out


def rebalance(owners: Mapping[PathKey, str], eligible: Iterable[str], drained: Iterable[str],
              weights: Mapping[str, float] | None = None, moving: Mapping[PathKey, str] | None = None,
              limit: int = 4) -> list[tuple[PathKey, str]]:
    """Planned moves (path, target) that bring the held paths closer to balance, at most ``limit``.

    ``owners``: held path -> node; ``eligible``: nodes that may receive paths (live long enough, not
    drained); ``drained``: nodes that must give everything away; ``moving``: paths with a move in flight
    (path -> target; counted at the target already, never moved again). Deterministic: the same input gives the same moves. The
    result converges: applying the moves and asking again eventually gives nothing."""
    targets = sorted(set(eligible) - set(drained))
    if not targets or limit <= 0:
        return []
    drained_set = set(drained)
    busy = set(moving or {})
    counts: dict[str, int] = {n: 0 for n in targets}
    per_disk: dict[str, dict[str, int]] = {}
    where_now = dict(owners)
    for p, n in (moving or {}).items():
        if p in where_now:
            where_now[p] = n            # as good as there: the move is under way
    held_by: dict[str, list[PathKey]] = {}      # node -> its paths, disk -> its paths: no pass over every
    disk_paths: dict[str, list[PathKey]] = {}   # path per candidate (O(paths^2) at 20 000: bench-scale)
    for p, n in where_now.items():
        counts[n] = counts.get(n, 0) + 1
        per_disk.setdefault(p.disk, {}).setdefault(n, 0)
        per_disk[p.disk][n] += 1
        held_by.setdefault(n, []).append(p)
        disk_paths.setdefault(p.disk, []).append(p)
    total = sum(counts.values())
    ws = {n: (weights or {}).get(n, 1.0) for n in targets}
    share = shares(total, ws)
    hi = {n: math.ceil(share[n] - 1e-9) for n in targets}
    lo = {n: math.floor(share[n] + 1e-9) for n in targets}
    out: list[tuple[PathKey, str]] = []

    def best_target(p: PathKey, src: str, need_below: bool) -> str | None:
        disk = per_disk.get(p.disk, {})
        cands = [n for n in targets if n != src and (counts[n] < lo[n] if need_below else counts[n] < hi[n])]
        if not cands:
            return None
        return max(cands, key=lambda n: (disk.get(n, 0) == 0, hi[n] - counts[n], score(n, p), n))

    def move(p: PathKey, src: str, dst: str) -> None:
        sorted_candidates.clear()
        out.append((p, dst))
        busy.add(p)
        counts[src] -= 1
        counts[dst] += 1
        d = per_disk.setdefault(p.disk, {})
        d[src] -= 1
        d[dst] = d.get(dst, 0) + 1

    sorted_candidates: dict[str, list[PathKey]] = {}     # until the next move

    def candidates(src: str) -> list[PathKey]:
        # paths of a doubled-up disk first, then a stable order
        if src not in sorted_candidates:
            mine = [p for p in held_by.get(src, ()) if p not in busy]
            sorted_candidates[src] = sorted(mine, key=lambda p: (-per_disk[p.disk].get(src, 0), -score(src, p), p))
        return sorted_candidates[src]

    # 1. drained nodes give everything away (to anyone below its ceiling: a drain may overfill slightly)
    for src in sorted(n for n in counts if n in drained_set):
        for p in candidates(src):
            if len(out) >= limit:
                return out
            dst = best_target(p, src, need_below=False) or (max(targets, key=lambda n: (-counts[n], score(n, p)))
                                                             if targets else None)
            if dst is not None and dst != src:
                move(p, src, dst)
    # 2. over the ceiling -> someone under the floor (counts within one of the share are balanced); the
    #    path moved is one whose disk the target does not have yet, where there is one. When only one side
    #    exists (8 nodes at their ceiling 223 and a new one at 216, of 2000: bench-scale), a node above its
    #    floor gives to the one under it, or the one over its ceiling to one below its ceiling
    def pick(src: str, dst: str, spread: bool) -> PathKey | None:
        mine = candidates(src)
        return next((p for p in mine if per_disk[p.disk].get(dst, 0) == 0), None if spread or not mine else mine[0])

    while len(out) < limit:
        over = [n for n in targets if counts[n] > hi[n]]
        under = [n for n in targets if counts[n] < lo[n]]
        if over and not under:
            under = [n for n in targets if counts[n] < hi[n]]
        elif under and not over:
            over = [n for n in targets if counts[n] > lo[n]]
        over.sort(key=lambda n: (hi[n] - counts[n], n))
        under.sort(key=lambda n: (counts[n] - lo[n], n))
        # a pair whose move keeps the disks spread first; one that doubles a disk up only when none does
        step = next(((src, dst, q) for spread in (True, False) for src in over for dst in under
                     if (q := pick(src, dst, spread)) is not None), None)
        if step is None:
            break
        move(step[2], step[0], step[1])
    # 3. two paths of one disk on one node while an eligible node has none of that disk: move one there
    #    if it has room; if it is full, move it anyway when that leaves the two within two of their
    #    shares: step 2 of a later round then gives the target's surplus back, picking a path of a disk
    #    the source does not have (a swap in two planned moves)
    def swappable(full: str, src: str) -> bool:
        # the swap completes only if ``full`` has a path of a disk that ``src`` does not have to give back;
        # otherwise step 2 would return the same path and the two would trade it for ever
        return any(per_disk[q.disk].get(src, 0) == 0 for q in held_by.get(full, ()) if q not in busy)

    for disk, where in sorted(per_disk.items()):
        for src, k in sorted(where.items()):
            if k < 2 or src in drained_set or len(out) >= limit:
                continue
            free_nodes = [n for n in targets if n != src and where.get(n, 0) == 0]
            floor = lo.get(src, 0)
            roomy = [n for n in free_nodes if counts[n] < hi[n] and (counts[src] > floor or swappable(n, src))] or \
                    [n for n in free_nodes if counts[n] <= hi[n] and counts[src] >= floor and swappable(n, src)]
            if not roomy:
                continue
            # the first of candidates(src) on this disk, without sorting all of src's paths per disk
            doubled = min((q for q in disk_paths[disk] if where_now[q] == src and q not in busy),
                          key=lambda q: (-score(src, q), q), default=None)
            if doubled is not None:
                dq = doubled
                move(dq, src, max(roomy, key=lambda n: (hi[n] - counts[n], score(n, dq), n)))
    return out
