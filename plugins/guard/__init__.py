"""``guard`` watchdog: a small separate process that fences this node when the agent stops petting it.

- ``plugins.guard.client``: ``GuardWatchdog``, the plugin the agent loads (starts and pets the guard);
- ``plugins.guard.server``: the guard process (``python -m plugins.guard``);
- ``plugins.guard.protocol``: the files and the wire format they share, and ``read_events`` (how often a
  guard fenced this node, and the last time) for status and metrics.

See docs/watchdog.md.
"""
from __future__ import annotations

from plugins.guard.client import GuardWatchdog
from plugins.guard.protocol import read_events

__all__ = ["GuardWatchdog", "read_events"]
