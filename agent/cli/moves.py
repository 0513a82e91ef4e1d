"""``pathagent path move``: hand one path to a chosen node without lock-delay.

The CLI locks ``{prefix}/moves/{disk}/{index}`` = ``{"node": target}`` with its own short-lived session
(``agent.cli.clisession``), so the request exists exactly as long as the CLI waits for it. The holder's
planner sees a move to another live node, takes the address down, unexports the path and releases it
explicitly (no lock-delay); the target's planner acquires it regardless of placement, while other nodes
leave it alone until the placement grace runs out. The CLI waits for the target to hold the path, then
deletes the request.
"""
from __future__ import annotations

import time
from typing import Any

from agent.adapters.consul_store import ConsulStore, TxnOps
from agent.cli.clisession import cli_session
from agent.config import Config
from agent.core import keys
from agent.core.model import PathKey
from agent.core.store import next_index
from agent.core.tree import move_value, parse_tree
from agent.errors import AgentError


class MoveError(AgentError):
    """The move could not be made (unknown path or node, or it timed out)."""


def move(cfg: Config, path: PathKey, node: str, timeout: float) -> dict[str, Any]:
    store = ConsulStore(cfg.consul)
    prefix = store.prefix
    mkey = keys.move_key(prefix, path)
    try:
        index, entries = store.read_tree()
        view = parse_tree(prefix, entries, index)
        if path not in view.paths:
            raise MoveError(f"path {path} does not exist (is disk {path.disk} started?)")
        if node not in view.nodes:
            raise MoveError(f"node {node!r} has no running agent; live nodes: {', '.join(sorted(view.nodes)) or 'none'}")
        if node in view.drained:
            raise MoveError(f"node {node!r} is drained (`pathagent node undrain {node}` first)")
        if view.paths[path].session == view.nodes[node]:
            return {"path": str(path), "node": node, "moved": False, "seconds": 0.0}
        start = time.monotonic()
        with cli_session(store, f"move {path} to {node}") as sid:
            res = store.txn(TxnOps().lock(mkey, move_value(node), sid))
            if not res.ok:
                raise MoveError(f"another move of {path} is under way ({res.reason()})")
            try:
                while True:
                    left = timeout - (time.monotonic() - start)
                    if left <= 0:
                        raise MoveError(f"path {path} did not move to {node} within {timeout:g}s")
                    got, entries = store.read_tree(index, wait=min(left, 5.0))
                    index = next_index(index, got)
                    view = parse_tree(prefix, entries, got)
                    st = view.paths.get(path)
                    if st is None:
                        raise MoveError(f"path {path} disappeared (disk stopped?)")
                    if st.session is not None and st.session == view.nodes.get(node):
                        return {"path": str(path), "node": node, "moved": True,
                                "seconds": round(time.monotonic() - start, 3)}
                    if node not in view.nodes:
                        raise MoveError(f"node {node!r} stopped running an agent during the move")
            finally:
                store.txn(TxnOps().delete(mkey))
    finally:
        store.close()
