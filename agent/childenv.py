"""The environment for processes the agent or a plugin starts (tgtd, arping, the guard).

Children must not inherit what belongs to the agent process alone: systemd's notification and watchdog
variables (a child that inherits ``NOTIFY_SOCKET`` can send ``READY=1`` or ``WATCHDOG=1`` on the agent's
behalf, which tgtd does) and credentials (the Consul ACL token, Ceph keys handed in the environment).
"""
from __future__ import annotations

import os
from typing import Mapping

#: removed by name
DROP = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                  "INVOCATION_ID", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_AUTH",
                  "CONSUL_CLIENT_KEY", "PATHAGENT_CONSUL_TOKEN"})
#: removed when the name contains one of these (case-insensitive)
DROP_PARTS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "_KEY", "KEYRING")


def scrubbed(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) without the variables above."""
    src = os.environ if env is None else env
    return {k: v for k, v in src.items()
            if k not in DROP and not any(part in k.upper() for part in DROP_PARTS)}


def child_env(**extra: str) -> dict[str, str]:
    """The scrubbed environment plus ``extra``."""
    out = scrubbed()
    out.update(extra)
    return out
