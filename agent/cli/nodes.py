"""``pathagent nodes`` and ``pathagent node drain|undrain``: the gateways as the cluster sees them.

A gateway is known by its node record ``{prefix}/nodes/{node}`` (written by its agent; locked while the
agent runs: *live*) or by its drain flag ``{prefix}/drain/{node}``. Draining writes the flag; the
cluster leader then moves the node's paths to others by planned moves and no node gives it a path until
the flag is removed (``undrain``). Both are idempotent. ``drain --wait`` returns once the node holds no
path (or fails after ``--timeout``).
"""
from __future__ import annotations

import time
from typing import Any

from agent.adapters.consul_store import ConsulStore
from agent.config import Config
from agent.core import keys
from agent.core.tree import ClusterView, drain_value, parse_tree
from agent.errors import AgentError


class NodeError(AgentError):
    """Unknown node, or a drain that did not finish in time."""


def _view(store: ConsulStore) -> ClusterView:
    index, entries = store.read_tree()
    return parse_tree(store.prefix, entries, index)


def rows(view: ClusterView) -> list[dict[str, Any]]:
    """One row per known gateway: ``node``, ``live``, ``drained``, ``paths`` (held now), ``leader``, and
    ``backend`` (the target backend its agent recorded; ``None`` when its record names none)."""
    names = set(view.records) | set(view.drained)
    node_of = {sid: n for n, sid in view.nodes.items()}
    held: dict[str, int] = {}
    for st in view.paths.values():
        owner = node_of.get(st.session) if st.session else None
        if owner is not None:
            held[owner] = held.get(owner, 0) + 1
    leader = view.leader_node()
    out = []
    for n in sorted(names):
        rec = view.records.get(n)
        row: dict[str, Any] = {"node": n, "live": n in view.nodes, "drained": n in view.drained,
                               "paths": held.get(n, 0), "leader": n == leader,
                               "backend": (rec.backend or None) if rec is not None else None}
        if rec is not None and rec.weight != 1.0:
            row["weight"] = rec.weight
        if rec is not None and rec.orphaned():
            row["failed"] = True        # its agent's session ended without an orderly stop
            row["fenced"] = view.fenced.get(n, 0) > rec.modify_index
        out.append(row)
    return out


def list_nodes(cfg: Config) -> list[dict[str, Any]]:
    store = ConsulStore(cfg.consul)
    try:
        return rows(_view(store))
    finally:
        store.close()


def text(table: list[dict[str, Any]]) -> str:
    """The table of ``pathagent nodes``; a last line warns when the live agents run different backends."""
    width = max([len(r["node"]) for r in table] + [19])
    lines = [f"{'NODE':<{width}} {'LIVE':<5} {'DRAINED':<8} {'PATHS':>5}  {'BACKEND':<8} LEADER"]
    for r in table:
        note = " (failed, fenced)" if r.get("fenced") else " (failed, not fenced yet)" if r.get("failed") else ""
        lines.append(f"{r['node']:<{width}} {'yes' if r['live'] else 'no':<5} {'yes' if r['drained'] else 'no':<8} "
                     f"{r['paths']:>5}  {r.get('backend') or '-':<8} {'yes' if r['leader'] else ''}{note}")
    live = sorted({r["backend"] for r in table if r["live"] and r.get("backend")})
    if len(live) > 1:
        lines.append(f"warning: the live gateways run different target backends ({', '.join(live)}); "
                     "run one backend on every gateway (docs/deployment.md)")
    return "\n".join(lines)


def drain(cfg: Config, node: str, on: bool, wait: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """Set (``on``) or clear the drain flag of ``node``; with ``wait``, until it holds no path."""
    store = ConsulStore(cfg.consul)
    key = keys.drain_key(store.prefix, node)
    try:
        view = _view(store)
        if on and node not in view.records and node not in view.drained:
            known = ", ".join(sorted(view.records)) or "none"
            raise NodeError(f"no gateway named {node!r} is known to the cluster (known: {known})")
        was = node in view.drained
        if on and not was:
            store.put(key, drain_value(time.time()))
        elif not on and was:
            store.txn_delete(key)
        deadline = time.monotonic() + timeout
        while True:
            row = next((r for r in rows(_view(store)) if r["node"] == node),
                       {"node": node, "live": False, "drained": on, "paths": 0, "leader": False})
            if not (on and wait) or row["paths"] == 0:
                break
            if time.monotonic() > deadline:
                raise NodeError(f"node {node!r} still holds {row['paths']} paths after {timeout:g}s of draining "
                                "(is a cluster leader running? see `pathagent nodes`)")
            time.sleep(0.5)
        return {**row, "changed": on != was}
    finally:
        store.close()
