"""``guard`` watchdog, the agent's side: starts the guard process and pets it over its unix socket.

The guard (``plugins.guard.server``) is a small separate process that fences this node's network and
target backends when the agent stops petting it in time: the fencer that outlives a frozen, hung or dead
agent. This class touches nothing when it is built (``check-config`` builds it too); the first ``pet``
starts the guard when none answers, and so does any later ``pet`` after the guard died.

- ``pet(deadline, session)``: one short request to ``guard-H.sock`` (``H``: hash of the config file, read
  at the first pet) naming the session whose confirmation proved the deadline (the guard confirms it by
  itself while the pets are late); it waits ``timeout`` (0.25 s) for the answer, or ``start_wait`` (2 s)
  when it just started the guard. Then every guard of an earlier config in the state directory is told to retire (exit without
  fencing): the hand-over after a config change has no gap, since the new guard was armed first. While the
  own guard cannot be pet, the earlier ones are pet instead, so they keep protecting meanwhile.
- ``disarm()``: tells the guard to exit without fencing (and every earlier one to retire).
- ``close()``: forgets the guard, which stays armed with the last deadline (crash, planned restart: the
  next agent process pets the same guard).
- ``confirmed(session)``: the deadline the guard proved by itself for ``session``, read from the page of
  shared memory the guard writes (``plugins.guard.shared``), mapped at a pet; a memory read, for the
  agent's fencer at check time.

Failures raise ``TransientBackendError`` (no answer: the guard is frozen, busy or starting; it could not
be started) or ``PermanentBackendError`` (the interpreter cannot be run, the guard refuses the deadline).
No signal is ever sent to a guard: the only way to stop one is its socket, which lives in this state
directory, so a client never acts on another state directory's guard.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

import plugins
from agent.backend import PluginContext, Watchdog
from agent.childenv import child_env
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.guard import protocol, shared
from plugins.options import Options

log = logging.getLogger(__name__)

START_BACKOFF = 5.0        # seconds between attempts to start a guard that exits at start
START_GIVEUP = 60.0        # seconds a guard we started may take to take its lock before it is killed and replaced
EXIT_LOCKED = 3            # the guard's status when another one holds its lock (plugins.guard.server)


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _tail(path: str, limit: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = [x for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][-limit:] if lines else ""


class GuardWatchdog(Watchdog):
    config_keys: Mapping[str, str] = {
        "python": "interpreter that runs the guard process (default: the agent's own)",
        "timeout": "seconds a pet or disarm waits for the guard's answer (default 0.25)",
        "start_wait": "seconds a pet waits for a guard it just started to answer (default 2)",
    }

    def __init__(self, context: PluginContext) -> None:
        o = Options("watchdog.guard", context.options)
        self.python = o.text("python", "") or sys.executable
        self.timeout = o.number("timeout", 0.25, 0.01, 5.0)
        self.start_wait = o.number("start_wait", 2.0, 0.1, 60.0)
        o.done()
        self.state_dir = os.path.abspath(context.state_dir)
        self.config_file = os.path.abspath(context.config_file) if context.config_file else ""
        self._hash: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._lock = threading.Lock()
        self._no_start_until = -math.inf
        self._unanswered: set[str] = set()     # earlier guards that did not answer a retire (logged once)
        self._shared: shared.Reader | None = None
        self._old_guard: int | None = None     # a guard that ignores the session (logged once per pid)
        self.pid: int | None = None            # the guard's pid, as it last answered

    # --- the config hash -----------------------------------------------------------------------------
    @property
    def config_hash(self) -> str:
        """Hash of the config file as this agent found it at its first pet (it loaded it just before)."""
        if self._hash is None:
            try:
                self._hash = protocol.config_hash(protocol.read_config_bytes(self.config_file))
            except OSError as e:
                raise PermanentBackendError(f"guard: cannot read config {self.config_file}: {e.strerror}") from e
        return self._hash

    # --- talking to a guard --------------------------------------------------------------------------
    def _ask(self, h: str, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """The guard's answer; ``ConnectionError``/``FileNotFoundError`` when none listens, ``TimeoutError``,
        ``TransientBackendError`` for any other failure, ``PermanentBackendError`` when it refuses."""
        try:
            ans = protocol.request(self.state_dir, h, msg, self.timeout if timeout is None else timeout)
        except (FileNotFoundError, ConnectionError, TimeoutError):
            raise
        except (OSError, ValueError) as e:
            raise TransientBackendError(f"guard {protocol.sock_name(h)}: {e}", retry_after=0.5) from None
        if ans.get("ok") is not True:
            if ans.get("retry") is True:
                raise TransientBackendError(f"guard {protocol.sock_name(h)}: {ans.get('error')}", retry_after=0.5)
            raise PermanentBackendError(f"guard {protocol.sock_name(h)} refused {msg.get('op')}: "
                                        f"{ans.get('error', ans)}")
        if ans.get("config") != h or os.path.realpath(str(ans.get("state_dir"))) != os.path.realpath(self.state_dir):
            raise PermanentBackendError(f"guard {protocol.sock_name(h)} answers for config {ans.get('config')} "
                                        f"in {ans.get('state_dir')}: not ours")
        pid = ans.get("pid")
        if h == self._hash and isinstance(pid, int):
            self.pid = pid
        return ans

    def _frozen(self, h: str) -> TransientBackendError:
        pid = protocol.lock_holder(self.state_dir, h)
        return TransientBackendError(f"guard (pid {pid or '?'}) did not answer within {self.timeout:g}s "
                                     "(frozen or overloaded?)", retry_after=0.5)

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _starting(self) -> bool:
        """A guard this client started is still running but holds no lock yet (its interpreter is still
        importing: seconds on a loaded node); one stuck longer than ``START_GIVEUP`` is killed and reaped, so
        that the next pet starts a new one."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return False
        if _now() - self._started_at < START_GIVEUP:
            return True
        log.warning("the guard (pid %d) did not take its lock within %gs of its start: killing it and starting "
                    "another", proc.pid, START_GIVEUP)
        proc.kill()
        proc.wait()
        self._proc = None
        return False

    def _start(self, h: str) -> None:
        t = _now()
        if t < self._no_start_until:
            raise TransientBackendError(f"the guard failed to start ({_tail(self._log())}); next attempt in "
                                        f"{self._no_start_until - t:.1f}s", retry_after=self._no_start_until - t)
        root = os.path.dirname(os.path.dirname(os.path.abspath(plugins.__file__)))
        path = os.environ.get("PYTHONPATH", "")
        env = child_env(PYTHONPATH=root + (os.pathsep + path if path else ""))
        argv = [self.python, "-m", "plugins.guard", "--config", self.config_file, "--state-dir", self.state_dir,
                "--hash", h]
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            out = os.open(self._log(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise TransientBackendError(f"guard: cannot open {self._log()}: {e.strerror}") from None
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
                                          env=env, close_fds=True, start_new_session=True)
        except OSError as e:
            raise PermanentBackendError(f"cannot start the guard with {self.python}: {e.strerror}") from None
        finally:
            os.close(out)
        self._started_at = _now()
        log.info("started the guard (pid %d) for %s, config hash %s", self._proc.pid, self.state_dir, h)

    def _log(self) -> str:
        return os.path.join(self.state_dir, protocol.LOG)

    def _try(self, h: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        """``msg`` to guard ``h``: its answer, ``None`` when no guard listens there, ``TransientBackendError``
        when one listens but does not answer in time (frozen)."""
        try:
            return self._ask(h, msg)
        except TimeoutError:
            raise self._frozen(h) from None
        except (FileNotFoundError, ConnectionError):
            return None

    def _ask_own(self, msg: dict[str, Any], start: bool) -> dict[str, Any] | None:
        """Send ``msg`` to our guard, starting it first when ``start`` and none runs; ``None`` when no guard
        runs and ``start`` is false. Waits ``start_wait`` for a guard it just started, else ``timeout``."""
        h = self.config_hash
        self._reap()
        answer = self._try(h, msg)
        if answer is not None:
            return answer
        holder = protocol.lock_holder(self.state_dir, h)
        if holder is None and self._starting():   # ours, still importing before it takes the lock: wait for it
            until = _now() + self.timeout
        elif holder is None:                   # no guard of ours, not even one starting
            if not start:
                return None
            self._start(h)
            until = _now() + self.start_wait
        else:                                  # one is starting (or its socket file was removed)
            until = _now() + self.timeout
        while True:
            answer = self._try(h, msg)
            if answer is not None:
                return answer
            proc = self._proc
            if proc is not None and proc.poll() is not None:
                self._proc = None
                if proc.returncode != EXIT_LOCKED:     # EXIT_LOCKED: another one started at the same moment
                    self._no_start_until = _now() + START_BACKOFF
                    raise TransientBackendError(f"the guard exited at start (status {proc.returncode}): "
                                                f"{_tail(self._log())}", retry_after=START_BACKOFF)
            if _now() >= until:
                pid = protocol.lock_holder(self.state_dir, h)
                raise TransientBackendError(f"the guard (pid {pid or '?'}) does not listen on "
                                            f"{protocol.sock_name(h)} yet (starting, or its socket file was "
                                            "removed)", retry_after=0.5)
            time.sleep(0.01)

    # --- earlier guards (another config) -------------------------------------------------------------
    def _others(self) -> list[str]:
        return protocol.other_guards(self.state_dir, self.config_hash)

    def _remove_stale(self, h: str) -> None:
        """Remove the socket file of guard ``h`` if no guard of ``h`` runs (its lock is free)."""
        lock = os.path.join(self.state_dir, protocol.lock_name(h))
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return                              # starting, or alive and not answering
            try:
                os.unlink(os.path.join(self.state_dir, protocol.sock_name(h)))
            except FileNotFoundError:
                pass
        finally:
            if fd >= 0:
                os.close(fd)

    def _retire_others(self, op: dict[str, Any]) -> None:
        for h in self._others():
            try:
                ans = self._ask(h, op)
                self._unanswered.discard(h)
                log.info("the guard of config %s (pid %s, %s) retired: the guard of config %s took over",
                         h, ans.get("pid"), ans.get("was"), self.config_hash)
            except (FileNotFoundError, ConnectionError):
                self._remove_stale(h)
            except (TimeoutError, TransientBackendError, PermanentBackendError) as e:
                if h not in self._unanswered:
                    self._unanswered.add(h)
                    log.warning("the guard of config %s (pid %s) did not retire: %s; it fences at its own "
                                "deadline if it runs again", h, protocol.lock_holder(self.state_dir, h) or "?",
                                e or "no answer")

    def _bridge(self, msg: dict[str, Any]) -> None:
        """Pet the guards of earlier configs while ours cannot be pet (they keep protecting meanwhile)."""
        for h in self._others():
            try:
                self._ask(h, msg)
            except (OSError, TransientBackendError, PermanentBackendError):
                pass

    def _map_shared(self, answer: dict[str, Any], session: str) -> None:
        """Map (again, when the guard was replaced) the page where the guard publishes what it proved."""
        if self._shared is None:
            self._shared = shared.Reader(shared.path(self.state_dir, self.config_hash))
        self._shared.refresh()
        pid = answer.get("pid")
        if session and "session" not in answer and pid != self._old_guard:
            self._old_guard = pid if isinstance(pid, int) else None
            log.warning("the guard (pid %s) is of an older version: it does not confirm the session by itself "
                        "(a frozen agent is fenced at its deadline); it is replaced when it next exits", pid)

    # --- Watchdog ------------------------------------------------------------------------------------
    def pet(self, deadline: float, session: str = "") -> None:
        msg: dict[str, Any] = {"op": "pet", "deadline": deadline}
        if session:
            msg["session"] = session
        with self._lock:
            try:
                answer = self._ask_own(msg, start=True)
            except (TransientBackendError, PermanentBackendError):
                self._bridge(msg)
                raise
            if answer is not None:
                self._map_shared(answer, session)
            self._retire_others({"op": "retire", "by": self.config_hash})

    def confirmed(self, session: str) -> float:
        """What our guard proved by itself for ``session`` (``-inf``: nothing). A read of mapped memory:
        no lock (a pet may hold ours for seconds), no system call."""
        r = self._shared
        return r.read(session) if r is not None else float("-inf")

    def disarm(self) -> None:
        with self._lock:
            ans = self._ask_own({"op": "disarm"}, start=False)
            if ans is not None:
                log.info("guard (pid %s) disarmed (it was %s)", ans.get("pid"), ans.get("was"))
            self._retire_others({"op": "retire", "by": self.config_hash})
            proc, self._proc = self._proc, None
            if proc is not None:
                try:
                    proc.wait(timeout=self.timeout)     # it exits right after answering: reap it
                except subprocess.TimeoutExpired:
                    pass

    def close(self) -> None:
        """Forget the guard; it stays armed with the last deadline (the next agent process pets it)."""
        with self._lock:
            self._proc = None

    def status(self) -> dict[str, Any] | None:
        """What our guard says about itself (``None`` when none runs); for tests and tools."""
        with self._lock:
            try:
                return self._ask(self.config_hash, {"op": "status"})
            except (FileNotFoundError, ConnectionError):
                return None
            except TimeoutError:
                raise self._frozen(self.config_hash) from None
