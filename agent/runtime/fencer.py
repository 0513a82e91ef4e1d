"""The fencer: stops this node serving at its deadline, whatever the rest of the agent is doing.

It holds ``serve_until``: the send time of the newest successful confirmation of our session plus
``fence_after`` (fed by the session keeper). Its own thread waits for that moment and then fences: every
floating IP down first (``NetworkBackend.fence``: netlink only, no target call), then the data path
stopped by one bounded step (``TargetBackend.fence``: for tgt a SIGKILL of tgtd). It never waits on the
main loop, on a backend call in progress, on Consul or on Ceph. The main loop only finds out afterwards
and unexports what is left at its own pace.

Bringing an address up is the only step that starts serving to initiators, so it goes through
``bring_up``: under the same lock the fence takes, and only while the lease is valid. An export that took
long therefore cannot bring its IP up after the deadline, and a fence cannot miss an address that was
being added while it ran.

Unfencing is the main loop's decision (``unfence``), once a confirmation arrived again *and* it has read
the keys afresh; until then ``bring_up`` refuses.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from agent.backend import NetworkBackend, TargetBackend
from agent.core.model import PathKey, PathSpec
from agent.errors import AgentError
from agent.runtime.clock import Clock

log = logging.getLogger(__name__)


class Fenced(AgentError):
    """Refused: the lease is not valid (fenced, or the deadline passed)."""


class Fencer:
    def __init__(self, network: NetworkBackend, target: TargetBackend, clock: Clock,
                 on_fence: Callable[[], None] = lambda: None) -> None:
        self.network = network
        self.target = target
        self.clock = clock
        self.on_fence = on_fence
        self._gate = threading.Lock()           # held by bring_up and by the fence
        self._cond = threading.Condition(threading.Lock())
        self._serve_until = float("-inf")
        self._fenced = True                     # nothing may be brought up before the first lease
        self._done = False                      # the last fence completed (addresses and data path)
        self._halt = False
        self.events = 0                         # fences carried out (metric)
        self.last_reason = ""

    # --- the lease ---------------------------------------------------------------------------------------
    def extend(self, serve_until: float) -> None:
        """A confirmation proves we may serve until ``serve_until``; deadlines never move backwards."""
        with self._cond:
            if serve_until > self._serve_until:
                self._serve_until = serve_until
                self._cond.notify_all()

    def limit(self, serve_until: float) -> None:
        """Shorten the deadline (for example to an adopted session's shorter lock-delay)."""
        with self._cond:
            if serve_until < self._serve_until:
                self._serve_until = serve_until
                self._cond.notify_all()

    def nothing_served(self) -> None:
        """At start: nothing is served here (the backends said so), so there is nothing to fence until the
        first lease (no fence, no ERROR line on a fresh node)."""
        with self._gate:
            if self._fenced:
                self._done = True

    @property
    def serve_until(self) -> float:
        return self._serve_until

    @property
    def fenced(self) -> bool:
        return self._fenced

    def allowed(self, now: float | None = None) -> bool:
        """Whether serving may start now (not fenced, and the deadline is ahead)."""
        t = self.clock.now() if now is None else now
        return not self._fenced and t < self._serve_until

    def unfence(self) -> bool:
        """The main loop read the keys afresh after a new confirmation: serving may start again (only
        while the deadline is ahead). Returns whether we are unfenced now."""
        with self._gate:
            if self.clock.now() < self._serve_until:
                if self._fenced:
                    log.warning("lease valid again: unfenced")
                self._fenced = False
        return not self._fenced

    # --- bringing addresses up ---------------------------------------------------------------------------
    def bring_up(self, path: PathKey, spec: PathSpec) -> None:
        """``network.up`` under the fence's lock, only while the lease is valid; ``Fenced`` otherwise. The
        lease is checked again once the address is up: if the deadline passed meanwhile (the process was
        frozen inside the call), the address goes down again before the lock is released."""
        with self._gate:
            if not self.allowed():
                raise Fenced(f"not bringing {path} up: the lease is not valid")
            self.network.up(path, spec)
            if not self.allowed():
                try:
                    self.network.down(path, spec)
                finally:
                    raise Fenced(f"the lease ran out while {path} was brought up; taken down again")

    # --- fencing -----------------------------------------------------------------------------------------
    def fence(self, reason: str) -> None:
        """Stop serving now: addresses first, then the data path, each step contained. Idempotent."""
        with self._gate:
            first = not self._fenced or not self._done
            self._fenced = True
            if not first:
                return
            self.events += 1
            self.last_reason = reason
            log.error("fencing: %s; taking every address down, then stopping the data path", reason)
            t0 = self.clock.now()
            ok = True
            try:
                self.network.fence()
            except Exception as e:  # noqa: BLE001 - the data path must still be stopped
                ok = False
                log.error("fencing: taking the addresses down failed: %s: %s", type(e).__name__, e)
            t1 = self.clock.now()
            try:
                self.target.fence()
            except Exception as e:  # noqa: BLE001
                ok = False
                log.error("fencing: stopping the data path failed: %s: %s", type(e).__name__, e)
            self._done = ok
            log.error("fenced in %.3fs (addresses %.3fs, data path %.3fs)%s", self.clock.now() - t0, t1 - t0,
                      self.clock.now() - t1, "" if ok else "; will retry")
        self.on_fence()

    def check(self) -> bool:
        """Fence if the deadline passed (or retry a fence that failed). Returns whether fenced."""
        if self.clock.now() >= self._serve_until and (not self._fenced or not self._done):
            self.fence(f"no confirmation of our session since the lease ran out "
                       f"({self.clock.now() - self._serve_until:.2f}s ago)")
        return self._fenced

    def run(self) -> None:
        """The fencer thread: sleep until the deadline (woken early when it moves), then ``check``."""
        while True:
            with self._cond:
                if self._halt:
                    return
                left = self._serve_until - self.clock.now()
                if left > 0 or (self._fenced and self._done):
                    self._cond.wait(timeout=min(left, 1.0) if left > 0 else 1.0)
                    continue
            self.check()
            if not self._done:
                with self._cond:
                    self._cond.wait(timeout=0.5)   # a fence that failed is retried, not spun on

    def stop(self) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
