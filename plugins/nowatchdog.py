"""``none`` watchdog: nothing stops the data path of a frozen, hung or dead agent.

For tests, demos and nodes whose data path is fenced by other means. ``check-config`` refuses it together
with ``[consul] agent_check_ttl`` or ``session_ttl`` (a liveness check hands a frozen agent's paths to
other nodes, which is safe only when a watchdog stops this node's data path first); see docs/watchdog.md.
"""
from __future__ import annotations

from typing import Mapping

from agent.backend import PluginContext, Watchdog


class NoWatchdog(Watchdog):
    config_keys: Mapping[str, str] = {}

    def __init__(self, context: PluginContext) -> None:
        pass

    def pet(self, deadline: float, session: str = "") -> None:
        pass

    def disarm(self) -> None:
        pass
