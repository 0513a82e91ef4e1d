"""The agent's exception tree.

Adapters (Consul, rados/rbd, target and network plugins) translate their library's exceptions into these
at the edge; nothing above an adapter catches a library exception, and no function returns ``False`` to
mean that something broke.

- ``ConfigError``: the configuration is invalid. Fatal at start; carries every problem with its key.
- ``CoordinationError``: Consul could not be reached or answered an error. Retry later.
- ``SessionLost``: our Consul session no longer exists. Fence now, then make a new one.
- ``CatalogError``: a disk definition could not be read. ``DefinitionError`` (the document is invalid:
  permanent until it is edited) and ``CatalogUnavailable`` (Ceph unreachable, image missing: retry).
- ``BackendError``: a target or network plugin failed. ``TransientBackendError`` carries a retry delay;
  ``PermanentBackendError`` means retrying the same call will not help.
"""
from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration has problems; ``problems`` lists ``(key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{k}: {m}" for k, m in self.problems) or "invalid configuration")


class CoordinationError(AgentError):
    """Consul could not be reached, timed out or answered with an error. Temporary: retry."""


class SessionLost(CoordinationError):
    """Our session was invalidated (or never existed). The caller must stop serving at once."""


class CatalogError(AgentError):
    """A disk definition could not be obtained. ``disk`` names the disk."""

    def __init__(self, disk: str, message: str) -> None:
        self.disk = disk
        self.message = message
        super().__init__(f"disk {disk}: {message}")


class DefinitionError(CatalogError):
    """The stored definition is invalid. ``field`` names the offending field (dotted path)."""

    def __init__(self, disk: str, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(disk, f"field {field!r}: {reason}")


class CatalogUnavailable(CatalogError):
    """The definition could not be read now (image or pool missing, Ceph unreachable). Retry later."""


class BackendError(AgentError):
    """A target or network plugin failed."""


class TransientBackendError(BackendError):
    """Worth retrying after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentBackendError(BackendError):
    """Retrying the same call will not help until something changes (config, definition, host)."""
