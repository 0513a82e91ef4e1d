"""``none`` fencing: nothing is done to a failed node before its paths are taken over.

For tests, demos and catalogs without Ceph. Without a Ceph-side fence, a failed gateway's librbd clients
keep the image's exclusive lock until Ceph expires their watch (``osd_client_watch_timeout``, 30 s), so the
next owner's writes wait that long; nothing else changes (see docs/fencing.md).
"""
from __future__ import annotations

from typing import Any, Mapping

from agent.backend import FailedNode, Fencing, PluginContext


class NoFencing(Fencing):
    config_keys: Mapping[str, str] = {}
    required = False

    def __init__(self, context: PluginContext) -> None:
        pass

    def identity(self) -> Mapping[str, Any]:
        return {}

    def fence(self, failed: FailedNode) -> str:
        return f"nothing to do for {failed.node} (fencing backend none)"
