"""The fencer: stops this node serving at its deadline, whatever the rest of the agent is doing.

It holds ``serve_until``: the send time of the newest successful confirmation of our session plus
``fence_after`` (fed by the session keeper, and only as far as the watchdog accepted). Its own thread waits
for that moment and then fences: every floating IP down first (``NetworkBackend.fence``: netlink only, no
target call), then the data path stopped by one bounded step (``TargetBackend.fence``: for tgt a SIGKILL
of tgtd). It takes no lock another part holds for longer than a few assignments: it never waits on the
main loop, on a backend call in progress (an address being added included), on Consul or on Ceph. The
main loop only finds out afterwards and unexports what is left at its own pace. A part of a fence that
failed is retried alone, after 1, 2, 4 ... 30 s.

Bringing an address up is the only step that starts serving to initiators: ``bring_up`` checks the lease
before; the network backend asks ``may_serve`` (this fencer's ``allowed``, handed to plugins through
``PluginContext.may_serve``) right before each irrevocable step (adding the address, announcing it); and
``bring_up`` checks again afterwards and takes the address down if the deadline passed meanwhile. A fence
that runs while an address is being added is seen by that ``up`` (the backend undoes it).

Unfencing is the main loop's decision (``unfence``), once a confirmation arrived again *and* it has read
the keys afresh; until then ``bring_up`` refuses.

**The watchdog's proof.** While the agent process is frozen its own confirmations stop, but the guard
watchdog confirms the same session by itself, with the same rule (docs/watchdog.md). So that the fencer,
when the process thaws, does not fence a node whose session the guard kept proving, the session keeper
points it at the watchdog's ``confirmed(session)`` (``follow``); the deadline it acts on is then
max(its own, the watchdog's for our session). That call reads a page of mapped memory (no lock, no system
call), so the fencer still waits on nothing; a value further ahead than ``fence_after`` (no confirmation can
prove that) or an error counts as nothing, which can only make it fence sooner.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable

from agent.backend import NetworkBackend, TargetBackend
from agent.core.model import PathKey, PathSpec
from agent.errors import AgentError
from agent.runtime.clock import Clock

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 1.0, 30.0


class Fenced(AgentError):
    """Refused: the lease is not valid (fenced, or the deadline passed)."""


class Fencer:
    def __init__(self, network: NetworkBackend, target: TargetBackend, clock: Clock,
                 on_fence: Callable[[], None] = lambda: None) -> None:
        self.network = network
        self.target = target
        self.clock = clock
        self.on_fence = on_fence
        self._cond = threading.Condition(threading.Lock())   # guards the fields below; held only briefly
        self._fencing = threading.Lock()         # one fence at a time (a second caller returns at once)
        self._serve_until = float("-inf")
        self._fenced = True                      # nothing may be brought up before the first lease
        self._pending = {"addresses", "data path"}   # parts of the current fence still to do
        self._inherited = True                   # what an earlier process left served: fenced at its deadline
        self._retry_at = float("inf")
        self._retry_delay = RETRY_MIN
        self._halt = False
        self._outside: Callable[[], float] | None = None   # the watchdog's proof for our session
        self._outside_ahead = 0.0
        self.events = 0                          # fences carried out (metric)
        self.last_reason = ""

    # --- the lease ---------------------------------------------------------------------------------------
    def extend(self, serve_until: float) -> None:
        """A confirmation proves we may serve until ``serve_until``; deadlines never move backwards."""
        with self._cond:
            if serve_until > self._serve_until:
                self._serve_until = serve_until
                self._cond.notify_all()

    def follow(self, proved: Callable[[], float] | None, ahead: float = 0.0) -> None:
        """Also count what ``proved()`` says our session was proved until by someone else (the watchdog),
        never more than ``ahead`` (``fence_after``) from now; ``None``: only our own confirmations count
        (no session, or another one). ``proved`` must read memory only: it is called at check time."""
        with self._cond:
            self._outside = proved
            self._outside_ahead = ahead
            self._cond.notify_all()

    def outside_until(self, now: float | None = None) -> float:
        """The watchdog's proof for our session as it stands now (``-inf``: none or implausible)."""
        src = self._outside
        if src is None:
            return -math.inf
        t = self.clock.now() if now is None else now
        try:
            v = float(src())
        except Exception:  # noqa: BLE001 - a broken proof is no proof
            return -math.inf
        return v if math.isfinite(v) and v <= t + self._outside_ahead else -math.inf

    def deadline(self, now: float | None = None) -> float:
        """The deadline the fencer acts on: max(our own, the watchdog's proof for our session)."""
        return max(self._serve_until, self.outside_until(now))

    def nothing_served(self) -> None:
        """At start: nothing is served here (the backends said so), so there is nothing to fence until the
        first lease (no fence, no ERROR line on a fresh node)."""
        with self._cond:
            if self._fenced:
                self._pending = set()
            self._inherited = False

    @property
    def serve_until(self) -> float:
        return self._serve_until

    @property
    def fenced(self) -> bool:
        return self._fenced

    @property
    def done(self) -> bool:
        """The last fence completed (every address down and the data path stopped)."""
        return not self._pending

    def allowed(self, now: float | None = None) -> bool:
        """Whether serving may start now (not fenced, and the deadline is ahead)."""
        t = self.clock.now() if now is None else now
        return not self._fenced and t < self.deadline(t)

    def unfence(self) -> bool:
        """The main loop read the keys afresh after a new confirmation: serving may start again (only
        while the deadline is ahead and no fence is still unfinished). Returns whether we are unfenced."""
        with self._cond:
            if self.clock.now() < self._serve_until and (not self._pending or self._inherited):
                if self._fenced and not self._inherited:
                    if self.events:
                        log.warning("lease valid again: unfenced")
                    else:                 # the first lease of this process: nothing was ever fenced
                        log.info("first lease: serving may start")
                self._fenced = False
                self._inherited = False
                self._pending = set()
            return not self._fenced

    # --- bringing addresses up ---------------------------------------------------------------------------
    def bring_up(self, path: PathKey, spec: PathSpec) -> None:
        """``network.up`` only while the lease is valid; ``Fenced`` otherwise. Checked again once the
        address is up: if the deadline passed meanwhile (the process was frozen inside the call), the
        address goes down again."""
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
        """Stop serving now: addresses first, then the data path, each step contained. Idempotent; while
        another fence runs it returns at once (that one does the work)."""
        with self._cond:
            starting = not self._fenced or self._inherited
            self._fenced = True
            self._inherited = False
            if starting:
                self._pending = {"addresses", "data path"}
                self._retry_delay = RETRY_MIN
            pending = set(self._pending)
        if not pending or not self._fencing.acquire(blocking=False):
            return
        try:
            self.events += int(starting)
            if starting:
                self.last_reason = reason
                log.error("fencing: %s; taking every address down, then stopping the data path", reason)
            t0 = self.clock.now()
            failed: set[str] = set()
            for part, call in (("addresses", self.network.fence), ("data path", self.target.fence)):
                if part not in pending:
                    continue
                try:
                    call()
                except Exception as e:  # noqa: BLE001 - the other part must still run
                    failed.add(part)
                    log.error("fencing: %s: %s: %s", "taking the addresses down" if part == "addresses"
                              else "stopping the data path", type(e).__name__, e)
            took = self.clock.now() - t0
            with self._cond:
                if self._fenced:                 # (not unfenced meanwhile)
                    self._pending = failed
                    self._retry_at = self.clock.now() + self._retry_delay
                    delay = self._retry_delay
                    self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            if failed:
                log.error("fence incomplete after %.3fs (%s failed); retrying that in %.0fs", took,
                          " and ".join(sorted(failed)), delay)
            else:
                log.error("fenced in %.3fs", took)
        finally:
            self._fencing.release()
        self.on_fence()

    def check(self) -> bool:
        """Fence if the deadline passed, or retry the failed part of a fence once its delay is over.
        Returns whether fenced."""
        now = self.clock.now()
        deadline = self.deadline(now)
        if now >= deadline and (not self._fenced or self._inherited):
            self.fence(f"no confirmation of our session since the lease ran out ({now - deadline:.2f}s ago)"
                       if not self._inherited else "what the previous agent process served outlived its lease, "
                       "and no session was adopted in time")
        elif self._fenced and self._pending and now >= self._retry_at:
            self.fence(self.last_reason or "the lease ran out")
        return self._fenced

    def run(self) -> None:
        """The fencer thread: sleep until the deadline or the next retry (woken early when the deadline
        moves), then ``check``."""
        while True:
            with self._cond:
                if self._halt:
                    return
                now = self.clock.now()
                due = (self.deadline(now) if (not self._fenced or self._inherited) else
                       self._retry_at if self._pending else float("inf"))
                if due > now:
                    self._cond.wait(timeout=min(due - now, 1.0))
                    continue
            self.check()

    def stop(self) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
