"""``pathagent path move``: hand one path to a chosen node without lock-delay.

The CLI writes ``{prefix}/moves/{disk}/{index}`` = ``{"node": target}``. The holder's planner sees a move
to another live node, unexports the path and releases it explicitly (so no lock-delay applies); the
target's planner acquires it regardless of placement, while other nodes leave it alone until the
placement grace runs out. The CLI waits for the target to hold the path, then deletes the request.
"""
from __future__ import annotations

import json
import time
from typing import Any

from agent.core import keys
from agent.config import Config
from agent.adapters.consul_store import ConsulStore
from agent.errors import AgentError
from agent.runtime.loop import parse_tree
from agent.core.model import PathKey


class MoveError(AgentError):
    """The move could not be made (unknown path or node, or it timed out)."""


def move(cfg: Config, path: PathKey, node: str, timeout: float) -> dict[str, Any]:
    store = ConsulStore(cfg.consul)
    prefix = cfg.consul.prefix.rstrip("/")
    mkey = keys.move_key(prefix, path)
    try:
        _, entries = store.read_tree()
        tree = parse_tree(prefix, entries)
        if path not in tree.paths:
            raise MoveError(f"path {path} does not exist (is disk {path.disk} started?)")
        if node not in tree.nodes:
            raise MoveError(f"node {node!r} has no running agent; live nodes: {', '.join(sorted(tree.nodes)) or 'none'}")
        if tree.paths[path].session == tree.nodes[node]:
            return {"path": str(path), "node": node, "moved": False, "seconds": 0.0}
        start = time.monotonic()
        store.put(mkey, json.dumps({"node": node, "since": int(time.time())}).encode())
        index = 0
        try:
            while True:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    raise MoveError(f"path {path} did not move to {node} within {timeout:g}s")
                got, entries = store.read_tree(index, wait=min(left, 5.0))
                index = got
                tree = parse_tree(prefix, entries)
                st = tree.paths.get(path)
                if st is None:
                    raise MoveError(f"path {path} disappeared (disk stopped?)")
                if st.session is not None and st.session == tree.nodes.get(node):
                    return {"path": str(path), "node": node, "moved": True,
                            "seconds": round(time.monotonic() - start, 3)}
        finally:
            store.txn_delete(mkey)
    finally:
        store.close()
