"""The definitions cache: every started disk's definition, read through the catalog on its own thread.

Ceph calls can block for ``[ceph] timeout``; keeping them off the main loop means a hung Ceph never delays
the loop (and never the fencer, which does not wait on anything). A disk whose definition cannot be read
now keeps the last good one (what is served keeps being served) and its problem is reported once per
distinct message. Re-read whenever the keys change and at least every half ``[ceph] refresh``.

``label`` names a disk or a path in the agent's log lines with its disk's display name where a definition
is known (``d15c0001/1 (vm)``; ``agent.runtime.report.label``).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping

from agent.backend import Catalog
from agent.core.model import Disk, PathKey
from agent.core.tree import ClusterView
from agent.errors import CatalogError
from agent.runtime.report import label

log = logging.getLogger(__name__)


class DefinitionCache:
    def __init__(self, catalog: Catalog, refresh: float, view: Callable[[], ClusterView | None],
                 wake: Callable[[], None] = lambda: None) -> None:
        self.catalog = catalog
        self.refresh = refresh
        self.view = view
        self.wake = wake
        self._defs: dict[str, Disk] = {}
        self._errors: dict[str, str] = {}
        self._names: Mapping[str, str] = {}      # disk id -> display name, of every definition held
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self.loaded = False           # one pass over a view has completed

    def current(self) -> tuple[Mapping[str, Disk], Mapping[str, str]]:
        """The definitions and the problems (disk id -> message), one consistent pair."""
        with self._lock:
            return dict(self._defs), dict(self._errors)

    def label(self, what: PathKey | str) -> str:
        """``what`` (a path or a disk id) with its disk's display name where a definition is held. Any
        thread; never blocks."""
        return label(what, self._names)       # one reference read: the mapping is replaced, never changed

    def load(self, view: ClusterView) -> bool:
        """Read every started disk of ``view``. Returns whether the set of definitions changed."""
        with self._lock:
            prev, errors = dict(self._defs), dict(self._errors)
        names = {d: x.name for d, x in prev.items()}
        defs: dict[str, Disk] = {}
        for disk_id, rec in sorted(view.disks.items()):
            try:
                disk = self.catalog.get(disk_id, rec.pool, rec.image, rec.modify_index)
            except Exception as e:  # noqa: BLE001 - CatalogError, or a catalog plugin bug: never fatal
                msg = e.message if isinstance(e, CatalogError) else \
                    f"catalog plugin raised {type(e).__name__}: {e}"
                if errors.get(disk_id) != msg:
                    log.error("disk %s skipped: %s%s", label(disk_id, names), msg,
                              " (still serving its last good definition)" if disk_id in prev else "")
                    errors[disk_id] = msg
                if disk_id in prev:
                    defs[disk_id] = prev[disk_id]
                continue
            if disk_id in errors:
                log.info("disk %s: definition readable again", label(disk_id, {disk_id: disk.name}))
                del errors[disk_id]
            defs[disk_id] = disk
        for d in [d for d in errors if d not in view.disks]:
            del errors[d]
        with self._lock:
            self._defs, self._errors = defs, errors
            self._names = {d: x.name for d, x in defs.items()}
            first = not self.loaded
            self.loaded = True
        return defs != prev or first

    def poke(self) -> None:
        """The keys changed: read again now."""
        self._changed.set()

    def run(self, halt: threading.Event) -> None:
        """The catalog thread."""
        interval = max(0.5, self.refresh / 2)
        while not halt.is_set():
            view = self.view()
            if view is not None and self.load(view):
                self.wake()
            self._changed.wait(interval)
            self._changed.clear()
