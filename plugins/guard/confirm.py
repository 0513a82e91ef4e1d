"""The guard's own confirmations of the agent's session, while the agent does not pet it.

The rule is the agent's (``agent.runtime.session``, docs/fencing.md): a consistent read of the session
(``GET /v1/session/info/<id>?consistent``) **sent** at *t* that succeeds proves the session existed after
*t*, so no other node can lock its paths before *t* + ``lock_delay``, and this node may serve until
*t* + ``fence_after``. Nothing else ever extends the deadline: not the answer's arrival time, not a
failure, not a retry. A read that says the session does not exist means Consul invalidated it: fence now.

- ``proved``, ``fence_after_for``, ``due``: the arithmetic, pure (``tests/unit/test_guard_confirm.py``).
- ``Confirmer``: the thread inside the guard process that does the HTTP call, through the project's one
  Consul client (``agent.adapters.consul_store.ConsulStore``, with ``[consul] timeout``), and hands each
  outcome to the guard's main loop through ``deliver`` (a queue and a pipe the loop waits on). The main
  loop, which fences, never waits on it: exactly as the agent separates its fencer from its confirmer.

This module is the one place in ``plugins`` allowed to import ``agent.adapters.consul_store`` (an explicit
exception in the import-linter contract "Plugins import only the host's interfaces", setup.cfg): the guard
must read the session exactly as the agent does, and one Consul client is less to get wrong than two.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from agent.config import ConsulConfig
from agent.core.store import SessionInfo
from agent.errors import CoordinationError

if TYPE_CHECKING:
    from agent.adapters.consul_store import ConsulStore  # noqa: F401

log = logging.getLogger("plugins.guard")

#: the agent's pets count as late once none came for this many confirm intervals
LATE_AFTER = 2.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One confirmation: of ``session``, sent at ``sent``, answered at ``answered``. ``valid``: the
    session exists (``lock_delay`` is its own); ``gone``: Consul says it does not; else ``error``."""
    session: str
    sent: float
    answered: float
    valid: bool = False
    gone: bool = False
    lock_delay: float = 0.0
    error: str = ""


def fence_after_for(fence_after: float, lock_delay: float, session_lock_delay: float) -> float:
    """``fence_after`` for a session whose lock-delay is ``session_lock_delay`` when the config says
    ``lock_delay``: shorter by what the session's lock-delay falls short, never longer (the margin of the
    inequality is kept). The agent's ``SessionKeeper.fence_after_for``. Pure."""
    return fence_after - max(0.0, lock_delay - session_lock_delay)


def proved(o: Outcome, fence_after: float, lock_delay: float) -> float | None:
    """The deadline a confirmation proves: its send time plus ``fence_after`` (for the session's own
    lock-delay); ``None`` when it proves nothing (gone, failed). However late the answer came, never
    beyond ``sent + fence_after``. Pure."""
    if not o.valid or o.gone:
        return None
    return o.sent + fence_after_for(fence_after, lock_delay, o.lock_delay)


def due(now: float, last_pet: float, last_sent: float, interval: float) -> bool:
    """Whether the guard confirms now: the agent's pets are late (none for ``LATE_AFTER`` intervals) and
    the last confirmation was sent an interval ago or more. Pure."""
    return now - last_pet > LATE_AFTER * interval and now - last_sent >= interval


#: what the guard's main loop shows the confirmer: (session, time of the last pet), or None (not armed)
View = tuple[str, float] | None


class SessionReader(Protocol):
    def session_info(self, sid: str) -> SessionInfo | None: ...


def consul_store(cfg: ConsulConfig) -> SessionReader:
    """The project's one Consul client. Imported here, on the confirmer thread, at its first use: the
    guard starts (and answers its first pet) without loading ``consul`` and ``requests``."""
    from agent.adapters.consul_store import ConsulStore
    return ConsulStore(cfg)


class Confirmer(threading.Thread):
    """Every ``confirm_interval``, while ``view()`` names a session whose pets are late: one consistent
    read of it, its outcome to ``deliver``. A daemon thread: the guard exits without waiting for it."""

    def __init__(self, cfg: ConsulConfig, view: Callable[[], View], deliver: Callable[[Outcome], None],
                 clock: Callable[[], float],
                 store: Callable[[ConsulConfig], SessionReader] = consul_store) -> None:
        super().__init__(name="guard-confirmer", daemon=True)
        self.cfg = cfg
        self.view = view
        self.deliver = deliver
        self.clock = clock
        self._make_store = store
        self._store: SessionReader | None = None
        self._halt = threading.Event()
        self._last_sent = float("-inf")

    def confirm(self, session: str) -> Outcome:
        """One consistent read of ``session``; its send time is taken before anything else is done."""
        sent = self.clock()
        try:
            if self._store is None:
                self._store = self._make_store(self.cfg)
            info = self._store.session_info(session)
        except CoordinationError as e:
            return Outcome(session, sent, self.clock(), error=str(e))
        except Exception as e:  # noqa: BLE001 - a bug here must not end the thread: it proves nothing
            return Outcome(session, sent, self.clock(), error=f"{type(e).__name__}: {e}")
        if info is None:
            return Outcome(session, sent, self.clock(), gone=True)
        return Outcome(session, sent, self.clock(), valid=True, lock_delay=info.lock_delay)

    def step(self) -> Outcome | None:
        v = self.view()
        if v is None:
            return None
        session, last_pet = v
        if not due(self.clock(), last_pet, self._last_sent, self.cfg.confirm_interval):
            return None
        o = self.confirm(session)
        self._last_sent = o.sent
        self.deliver(o)
        return o

    def run(self) -> None:
        try:
            if self._store is None:
                self._store = self._make_store(self.cfg)    # the import, off the guard's loop
        except Exception as e:  # noqa: BLE001 - retried at the first confirmation (and reported there)
            log.warning("guard confirmer: no Consul client yet: %s", e)
        # a fraction of the interval, so that a confirmation starts soon after the pets become late and
        # follows the previous one by one interval (``due``)
        tick = self.cfg.confirm_interval / 5
        while not self._halt.wait(tick):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("guard confirmer")

    def stop(self) -> None:
        self._halt.set()
