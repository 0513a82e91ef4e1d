"""``rbd`` catalog: disk definitions from RBD image metadata (key ``pathagent.disk``, see ``agent.core.schema``).

Registered as ``rbd`` in ``pathagent.catalogs``; its settings are the ``[ceph]`` table (``conf``,
``client_id``, ``refresh``, ``timeout``), handed over in ``PluginContext.ceph`` (a ``CephConfig``); it has no table of its own.

Caching. One entry per disk, keyed by ``(version, pool, image)`` where ``version`` is the disk key's
ModifyIndex (the CLI rewrites the disk key on every edit, so an edit through the CLI is a cache miss at
once). An entry older than ``refresh`` seconds is read again, so an edit by other tools is seen within
``refresh``. Invalid documents are cached like valid ones (the same ``DefinitionError`` is raised again
until the document or the version changes, or ``refresh`` passes).

Failures. A missing image or pool is ``CatalogUnavailable`` naming the disk; that answer is remembered for
``NOT_FOUND_RETRY`` seconds for that disk. When Ceph does not answer (monitors unreachable, timeout), the
catalog remembers it for the whole cluster: every ``get`` that needs Ceph fails at once with
``CatalogUnavailable`` until a retry time that doubles from ``RETRY_MIN`` to ``RETRY_MAX`` seconds while
the outage lasts, so a node with many disks pays one ``[ceph] timeout`` per retry, not one per disk. The
first successful read ends the outage. Cached, still-fresh entries keep being served during an outage.

A ``get`` never blocks longer than about ``[ceph] timeout`` (see ``agent.adapters.ceph``).

The ``Disk`` returned has ``pool`` and ``image`` set to where it was read from (the disk record's), whatever
the document says: that is the image the gateways must serve.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from agent.core import schema
from agent.backend import Catalog, PluginContext
from agent.adapters.ceph import CephClient, CephError, CephUnavailable
from agent.errors import CatalogUnavailable, DefinitionError
from agent.core.model import Disk

NOT_FOUND_RETRY = 2.0
RETRY_MIN = 1.0
RETRY_MAX = 10.0


@dataclass
class _Entry:
    key: tuple[int, str, str]          # (version, pool, image)
    read_at: float
    disk: Disk | None = None
    error: DefinitionError | CatalogUnavailable | None = None
    until: float = 0.0                 # for errors: answer from memory until then


class RbdCatalog(Catalog):
    """Disk definitions read from RBD image metadata through one long-lived ``CephClient``."""

    config_keys: Mapping[str, str] = {}

    def __init__(self, context: PluginContext, client: CephClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        ceph = context.ceph
        self.refresh = ceph.refresh
        self.client = client or CephClient(ceph.conf, ceph.client_id, ceph.timeout)
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._down_until = 0.0
        self._down_reason = ""
        self._down_retry = 0.0
        self._pruned_at = clock()

    def get(self, disk_id: str, pool: str, image: str, version: int) -> Disk:
        """The validated definition of ``disk_id`` stored on ``pool/image``. Raises ``DefinitionError``
        (disk, field, reason) or ``CatalogUnavailable`` (disk, reason)."""
        now = self._clock()
        self._prune(now)
        key = (version, pool, image)
        entry = self._cache.get(disk_id)
        if entry is not None and entry.key == key:
            if entry.disk is not None and now - entry.read_at < self.refresh:
                return entry.disk
            if entry.error is not None and now < entry.until:
                raise entry.error
        if now < self._down_until:
            raise CatalogUnavailable(disk_id, f"Ceph unavailable ({self._down_reason}); "
                                              f"next try in {self._down_until - now:.1f}s")
        try:
            document = self.client.get_meta(pool, image, schema.META_KEY)
        except CephUnavailable as e:
            self._down_retry = min(RETRY_MAX, max(RETRY_MIN, self._down_retry * 2))
            self._down_until = self._clock() + self._down_retry
            self._down_reason = str(e)
            raise CatalogUnavailable(disk_id, str(e)) from None
        except CephError as e:  # pool or image missing, permission denied, ...
            self._up()
            err = CatalogUnavailable(disk_id, str(e))
            self._cache[disk_id] = _Entry(key, now, error=err, until=now + NOT_FOUND_RETRY)
            raise err from None
        self._up()
        try:
            if document is None:
                raise DefinitionError(disk_id, "(document)",
                                      f"image {pool}/{image} has no {schema.META_KEY} metadata")
            disk = dataclasses.replace(schema.parse(document, disk_id), pool=pool, image=image)
        except DefinitionError as e:
            self._cache[disk_id] = _Entry(key, now, error=e, until=now + self.refresh)
            raise
        self._cache[disk_id] = _Entry(key, now, disk=disk)
        return disk

    def _prune(self, now: float) -> None:
        """Drop entries nobody asked for lately (disks stopped or deleted); at most once per ``refresh``.
        Every entry in use is younger than ``refresh`` (it is re-read then), so twice that is unused."""
        if now < self._pruned_at + self.refresh:
            return
        self._pruned_at = now
        old = [d for d, e in self._cache.items() if now - e.read_at > 2 * self.refresh + RETRY_MAX]
        for d in old:
            del self._cache[d]

    def _up(self) -> None:
        self._down_until = 0.0
        self._down_retry = 0.0

    def forget(self, disk_id: str) -> None:
        """Drop what is cached for ``disk_id`` (the next ``get`` reads Ceph)."""
        self._cache.pop(disk_id, None)

    def close(self) -> None:
        self.client.close()
