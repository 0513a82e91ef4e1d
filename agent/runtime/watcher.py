"""The watcher: a recursive blocking query on ``{prefix}/`` (no polling), posting each new ``ClusterView``.

A value it cannot decode is skipped with its key named (once per key and reason), never fatal: one bad
key must not freeze every agent's view (``agent.core.tree``). ``refresh()`` is a fresh read for the
main loop, which takes one before it unfences (the last view may predate a partition).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from agent.core.store import CoordinationStore, next_index
from agent.core.tree import ClusterView, parse_tree
from agent.errors import CoordinationError

log = logging.getLogger(__name__)


class TreeWatcher:
    def __init__(self, store: CoordinationStore, wait: float, wake: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.wait = wait
        self.wake = wake
        self._view: ClusterView | None = None
        self._lock = threading.Lock()
        self._index = 0
        self._error: str | None = None
        self._reported: set[tuple[str, str]] = set()
        self.updates = 0

    def latest(self) -> ClusterView | None:
        """The newest view (``None`` before the first read)."""
        with self._lock:
            return self._view

    def _publish(self, view: ClusterView, force: bool = False) -> None:
        for key, why in view.skipped:
            if (key, why) not in self._reported:
                log.error("ignoring the value of %s: %s", key, why)
        self._reported = set(view.skipped)
        with self._lock:
            if not force and self._view is not None and view.index and view.index < self._view.index:
                return          # an older answer than the one we have (a refresh raced the watch)
            self._view = view
            self.updates += 1
        self.wake()

    def refresh(self) -> ClusterView:
        """Read the tree now (not blocking) and publish it. Raises ``CoordinationError``."""
        index, entries = self.store.read_tree()
        view = parse_tree(self.store.prefix, entries, index)
        self._publish(view)
        return view

    def poll_once(self) -> bool:
        """One blocking read (returns at once the first time). Returns whether the view changed."""
        try:
            got, entries = self.store.read_tree(self._index, self.wait)
        except CoordinationError as e:
            if self._error != str(e):
                log.warning("watch: %s; retrying", e)
            self._error = str(e)
            raise
        if self._error:
            log.info("watch: Consul answers again")
            self._error = None
        new = next_index(self._index, got)
        if new == self._index and self._index != 0 and self._view is not None:
            return False        # the wait ran out with no change
        went_back = new == 0 and self._index != 0          # Consul's index went backwards: start over
        self._index = new
        self._publish(parse_tree(self.store.prefix, entries, got), force=went_back)
        return True

    def run(self, halt: threading.Event) -> None:
        """The watcher thread."""
        delay = 0.5
        while not halt.is_set():
            try:
                self.poll_once()
                delay = 0.5
            except CoordinationError:
                halt.wait(delay)
                delay = min(delay * 2, 5.0)
