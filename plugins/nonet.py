"""``none`` network backend: floating IPs are managed elsewhere (or not at all). Does nothing.

``active`` reports what was brought up by this process, so the planner's address bookkeeping stays
consistent; ``fence`` forgets it.
"""
from __future__ import annotations

from typing import Mapping

from agent.backend import NetworkBackend, PluginContext
from agent.core.model import PathKey, PathSpec


class NoNetwork(NetworkBackend):
    config_keys: Mapping[str, str] = {}

    def __init__(self, context: PluginContext) -> None:
        self._up: set[PathKey] = set()

    def up(self, path: PathKey, spec: PathSpec) -> None:
        self._up.add(path)

    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        self._up.discard(path)

    def active(self) -> frozenset[PathKey]:
        return frozenset(self._up)

    def fence(self) -> None:
        self._up.clear()
