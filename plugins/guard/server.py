"""The guard process: the fencer that outlives a frozen, hung or dead agent.

One guard per state directory and config (``python -m plugins.guard --config FILE --state-dir DIR
--hash H``, started by ``GuardWatchdog`` on its first pet). At start it takes ``guard-H.lock``, reads
the config from exactly the bytes whose hash is ``H`` (a file edited since the agent read it is refused),
checks that the config's state directory is ``DIR`` (a guard never acts for another state directory),
builds the configured network and target backends (their constructors touch nothing; building them now
means nothing has to be imported or parsed when it is time to fence), then binds ``guard-H.sock``.

Then it waits on its socket with a timeout equal to the time left to the deadline (``CLOCK_BOOTTIME``),
and:

- ``pet(deadline, session)`` arms it (or re-arms it after a fence) with that deadline, the newest pet
  winning; ``session`` is the agent's Consul session whose confirmation proved it;
- while the agent's pets are late (none for 2 x ``confirm_interval``), it confirms that session by itself
  with the agent's rule (``plugins.guard.confirm``: a consistent read sent at t that succeeds moves the
  deadline to t + ``fence_after``; nothing else does), every ``confirm_interval``, on a thread of its own
  whose outcomes reach this loop through a pipe: the loop that fences never waits on an HTTP call. A read
  that finds the session gone fences at once. A frozen agent's node so keeps serving exactly while its
  session is valid. Each confirmed deadline is also written to a page of shared memory
  (``plugins.guard.shared``) that the agent's fencer reads when it thaws. A pet for another session (or
  without one, from an older agent) drops what the guard proved for the previous one;
- when the deadline passes without a newer pet it fences: ``network.fence()`` first (the floating IPs go,
  so initiators stop reaching this node), then ``target.fence()``, each contained (an error is logged and
  that part retried, 1 s, 2 s, ... 30 s apart, until it succeeds or the guard is pet again); it logs how
  late it acted (*lag*, after the deadline) and how long the fence took (*duration*), adds the event to
  ``guard-events.json``, and stays disarmed until pet again;
- ``disarm`` (the agent stopped in order, nothing is served) and ``retire`` (a guard of the agent's new
  config was pet and took over) make it exit without fencing.

It outlives the agent process that started it (own session, so the agent's signals never reach it): the
last deadline stands after an agent crash or a planned restart, and the next agent process pets the same
guard. SIGUSR2 and SIGHUP are ignored (``RestartKillSignal=SIGUSR2`` reaches every process of the unit's
cgroup); SIGTERM/SIGINT never drop protection: the guard exits at the first moment it is not armed (at
once when disarmed or idle, else after the fence at the deadline, unless pet again). A guard whose socket
file was removed or replaced can no longer be pet: it fences at its deadline if armed, then exits. Neither
a terminated nor such an orphaned guard extends its deadline by its own confirmations any more.

Every wait is capped at ``MAX_WAIT`` seconds: the socket waits count on ``CLOCK_MONOTONIC``, which stops
while the host is suspended, and the cap bounds how late a deadline that passed during a suspend is seen.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import selectors
import signal
import socket
import struct
import sys
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from agent import config as agent_config
from agent import plugins as agent_plugins
from agent import statefile
from agent.backend import NetworkBackend, TargetBackend
from agent.config import ConsulConfig
from agent.errors import ConfigError
from plugins.guard import confirm, protocol, shared

log = logging.getLogger("plugins.guard")

MAX_WAIT = 0.5            # seconds, while armed (see the module docstring)
IDLE_WAIT = 5.0           # seconds, while not armed: how often the socket file is checked
CONN_TIMEOUT = 1.0        # a client connection that sends no full request within this is dropped
LOCK_WAIT = 1.0           # a client probing the lock holds it for microseconds; wait that out
RETRY_MAX = 30.0
#: a fence waits for the GIL at most this long while the confirmer thread runs Python code (default 5 ms)
SWITCH_INTERVAL = 0.001
SESSION_MAX = 128         # a Consul session id is a 36-character UUID

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_LOCKED = 3


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class GuardStartError(Exception):
    """The guard cannot run; ``code`` is its exit status."""

    def __init__(self, message: str, code: int) -> None:
        self.code = code
        super().__init__(message)


@dataclass
class _Conn:
    sock: socket.socket
    expires: float
    buf: bytes = b""


@dataclass
class _Pending:
    """Parts of a fence that failed, retried until they succeed or a pet re-arms the guard."""
    parts: list[str] = field(default_factory=list)
    at: float = 0.0
    delay: float = 1.0


class Guard:
    def __init__(self, state_dir: str, h: str, network: NetworkBackend, target: TargetBackend,
                 clock: Callable[[], float] = now, consul: ConsulConfig | None = None,
                 share: shared.Writer | None = None) -> None:
        self.state_dir = state_dir
        self.hash = h
        self.network = network
        self.target = target
        self.clock = clock
        self.consul = consul                       # None: never confirms by itself
        self.share = share
        self.deadline: float | None = None         # armed while not None: max(pet_deadline, confirmed)
        self.pet_deadline: float | None = None     # the newest pet's
        self.session = ""                          # the agent's session the deadline is about ('' unknown)
        self.last_pet = float("-inf")
        self.confirmed = float("-inf")             # what our own confirmations of ``session`` proved
        self.confirm_sent: float | None = None     # send time of our last good confirmation
        self.confirmations = 0                     # good ones since the pets went late
        self.confirm_error = ""
        self._view: confirm.View = None            # what the confirmer thread reads (one atomic tuple)
        self._confirmer: confirm.Confirmer | None = None
        self._outcomes: deque[confirm.Outcome] = deque()
        self.state = "idle"                        # idle (never pet) | armed | fenced
        self.stopping = ""                         # why the guard exits when it next may
        self.terminate = False                     # SIGTERM/SIGINT: exit when not armed
        self.fences = 0
        self.pending = _Pending()
        self._sel = selectors.DefaultSelector()
        self._listen: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._conns: dict[int, _Conn] = {}
        self._wake_r = -1
        self._orphaned = False
        self._out_r, self._out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._out_r, selectors.EVENT_READ, "outcome")

    # --- socket ------------------------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind ``guard-H.sock`` (replacing a stale file: we hold the lock, so no guard of ``H`` runs)."""
        name = protocol.sock_name(self.hash)
        path = os.path.join(self.state_dir, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            with protocol.sun_path(self.state_dir, name) as addr:
                s.bind(addr)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(64)
        s.setblocking(False)
        st = os.stat(path)
        self._ino = (st.st_dev, st.st_ino)
        self._listen = s
        self._sel.register(s, selectors.EVENT_READ, "listen")

    def _socket_is_ours(self) -> bool:
        try:
            st = os.stat(os.path.join(self.state_dir, protocol.sock_name(self.hash)))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ino

    def _unbind(self) -> None:
        if self._listen is None:
            return
        if self._socket_is_ours():
            try:
                os.unlink(os.path.join(self.state_dir, protocol.sock_name(self.hash)))
            except OSError:
                pass
        self._sel.unregister(self._listen)
        self._listen.close()
        self._listen = None

    def install_signals(self) -> None:
        """SIGTERM/SIGINT set a flag and wake the loop through a pipe; SIGUSR2/SIGHUP are ignored."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r = r
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._sel.register(r, selectors.EVENT_READ, "wake")

        def on_term(signum: int, frame: object) -> None:
            self.terminate = True
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    # --- requests ----------------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self._listen is not None
        while True:
            try:
                c, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept: %s", e)
                return
            if not self._peer_allowed(c):
                c.close()
                continue
            c.setblocking(False)
            self._conns[c.fileno()] = _Conn(c, self.clock() + CONN_TIMEOUT)
            self._sel.register(c, selectors.EVENT_READ, "conn")

    @staticmethod
    def _peer_allowed(c: socket.socket) -> bool:
        try:
            _, uid, _ = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
        except OSError:
            return False
        if uid in (0, os.getuid()):
            return True
        log.warning("refused a connection from uid %d", uid)
        return False

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(protocol.MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.buf += chunk
        if not chunk or len(conn.buf) > protocol.MAX_MESSAGE:
            self._drop(conn)
            return
        if b"\n" not in conn.buf:
            return
        line = conn.buf.split(b"\n", 1)[0]
        try:
            answer = self.handle(protocol.decode(line))
        except ValueError as e:
            answer = {"ok": False, "error": f"bad request: {e}"}
        try:
            conn.sock.send(protocol.encode(answer))   # a few hundred bytes: fits the socket buffer
        except OSError:
            pass
        self._drop(conn)

    def describe(self) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "config": self.hash, "state": self.state,
                "deadline": self.deadline, "now": self.clock(), "fences": self.fences,
                "state_dir": self.state_dir, "session": self.session[:8],
                "pet_deadline": self.pet_deadline, "last_pet": self.last_pet if self.last_pet > -math.inf else None,
                "confirmed": self.confirmed if self.confirmed > -math.inf else None,
                "confirm_sent": self.confirm_sent, "confirmations": self.confirmations,
                "confirming": self._confirmer is not None and self._view is not None and self._late(),
                "confirm_error": self.confirm_error}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Answer one request (see ``plugins.guard.protocol``)."""
        op = msg.get("op")
        if self.stopping and op != "status":
            return {"ok": False, "retry": True, "error": f"exiting ({self.stopping})"}
        if op == "pet":
            d = msg.get("deadline")
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
                return {"ok": False, "error": f"deadline must be a finite number, not {d!r}"}
            t = self.clock()
            if d - t > protocol.MAX_AHEAD:
                return {"ok": False, "error": f"deadline {d - t:.0f}s ahead (at most "
                                              f"{protocol.MAX_AHEAD:g}s): not a CLOCK_BOOTTIME deadline?"}
            sess = msg.get("session") or ""
            if not isinstance(sess, str) or len(sess) > SESSION_MAX or not sess.isprintable():
                return {"ok": False, "error": "session must be a Consul session id"}
            if sess != self.session:
                if self.confirmed > -math.inf:
                    log.info("pet for session %s: what I proved for session %s no longer counts",
                             sess[:8] or "(none)", self.session[:8])
                self.session = sess
                self.confirmed = -math.inf
                self.confirm_sent = None
                if self.share is not None:
                    self.share.clear()
            if self.confirmations or self.confirm_error:
                log.warning("pet again after %.1fs (%d confirmations of session %s by me meanwhile%s)",
                            t - self.last_pet, self.confirmations, self.session[:8],
                            f"; the last failed: {self.confirm_error}" if self.confirm_error else "")
                self.confirmations = 0
                self.confirm_error = ""
            if self.deadline is None:
                log.info("armed: fencing at %.3f (in %.3fs) unless pet again%s", d, d - t,
                         f" (or session {sess[:8]} confirmed)" if sess and self.consul is not None else "")
            self.pet_deadline = float(d)
            self.deadline = max(float(d), self.confirmed)
            self.last_pet = t
            self.state = "armed"
            self.pending = _Pending()
            self._watch(sess)
            return self.describe()
        if op == "status":
            out = self.describe()
            out["events"] = protocol.read_events(self.state_dir)
            return out
        if op in ("disarm", "retire"):
            why = "disarmed: nothing is served" if op == "disarm" else \
                f"retired: the guard of config {str(msg.get('by', '?'))[:12]} took over"
            was = self.state
            self._disarm()
            self.state = "idle"
            self.pending = _Pending()
            self.stopping = why
            out = self.describe()
            out["was"] = was
            return out
        return {"ok": False, "error": f"unknown op {op!r}"}

    # --- our own confirmations --------------------------------------------------------------------------
    def _late(self) -> bool:
        assert self.consul is not None
        return self.clock() - self.last_pet > confirm.LATE_AFTER * self.consul.confirm_interval

    def _winding_down(self) -> bool:
        """Told to terminate, or orphaned (nobody can pet it): such a guard no longer extends anything by
        itself; it fences at its deadline (or at once when the session is gone) and exits."""
        return self.terminate or self._orphaned

    def _watch(self, session: str) -> None:
        """Show the confirmer thread the session to confirm while pets are late (started at the first)."""
        if self.consul is None or not session or self._winding_down():
            self._view = None
            return
        self._view = (session, self.last_pet)
        if self._confirmer is None:
            self._confirmer = confirm.Confirmer(self.consul, lambda: self._view, self._deliver, self.clock)
            self._confirmer.start()

    def _deliver(self, o: confirm.Outcome) -> None:
        """On the confirmer thread: queue the outcome and wake the loop (a deque append and a pipe write:
        neither waits)."""
        self._outcomes.append(o)
        try:
            os.write(self._out_w, b"o")
        except BlockingIOError:
            pass                                   # the loop has wake-ups pending already

    def _disarm(self) -> None:
        self.deadline = None
        self.pet_deadline = None
        self._view = None
        if self.share is not None:
            self.share.clear()

    def _apply(self, o: confirm.Outcome) -> None:
        """One outcome of our confirmer, on the loop. Only for the session we guard, while armed."""
        if self.deadline is None or not self.session or o.session != self.session or self.consul is None:
            return
        c = self.consul
        if o.gone:
            log.error("session %s is gone (my consistent read sent %.3fs after the last pet): fencing now",
                      o.session[:8], o.sent - self.last_pet)
            if self.share is not None:
                self.share.clear()
            self.fence(f"session {o.session[:8]} is gone")
            return
        until = confirm.proved(o, c.fence_after, c.lock_delay)
        if until is not None and self._winding_down():
            return
        if until is None:
            if o.error != self.confirm_error:
                log.warning("session %s not confirmed: %s; fencing at %.3f (in %.3fs) unless pet or confirmed",
                            o.session[:8], o.error, self.deadline, self.deadline - self.clock())
            self.confirm_error = o.error
            return
        if self.confirm_error:
            log.info("session %s confirmed again", o.session[:8])
        self.confirm_error = ""
        self.confirmations += 1
        self.confirm_sent = o.sent if self.confirm_sent is None else max(self.confirm_sent, o.sent)
        if self.confirmations == 1:
            log.warning("no pet for %.1fs: confirmed session %s myself (answered in %.1f ms); serving on until "
                        "%.3f (sent + %gs), confirming every %gs while the agent does not pet", o.sent -
                        self.last_pet, o.session[:8], 1e3 * (o.answered - o.sent), until,
                        until - o.sent, c.confirm_interval)
        if until > self.confirmed:
            self.confirmed = until
            if self.share is not None:
                self.share.publish(until, o.session)
        if until > self.deadline:
            self.deadline = until

    def _drain(self) -> None:
        try:
            os.read(self._out_r, 512)
        except BlockingIOError:
            pass
        while self._outcomes:
            self._apply(self._outcomes.popleft())

    # --- fencing -----------------------------------------------------------------------------------------
    def _part(self, name: str) -> str:
        """Run one fence part; '' on success, else the error."""
        try:
            (self.network.fence if name == "network" else self.target.fence)()
            return ""
        except Exception as e:  # noqa: BLE001 - a failing part must not stop the other one
            log.error("fence: %s backend failed: %s", name, e)
            return f"{type(e).__name__}: {e}"

    def fence(self, reason: str = "") -> dict[str, Any]:
        """Fence now (network first, then target); record and return the event."""
        deadline = self.deadline if self.deadline is not None else self.clock()
        start = self.clock()
        net_err = self._part("network")
        t_net = self.clock()
        tgt_err = self._part("target")
        end = self.clock()
        self._disarm()
        self.state = "fenced"
        self.fences += 1
        failed = [n for n, e in (("network", net_err), ("target", tgt_err)) if e]
        self.pending = _Pending(failed, end + 1.0, 1.0)
        event = {"deadline": round(deadline, 6), "start": round(start, 6), "end": round(end, 6),
                 "lag": round(start - deadline, 6), "duration": round(end - start, 6),
                 "network_duration": round(t_net - start, 6), "target_duration": round(end - t_net, 6),
                 "network_error": net_err, "target_error": tgt_err, "pid": os.getpid(), "config": self.hash,
                 "wall": round(time.time(), 3), "reason": reason or "deadline",
                 "confirmations": self.confirmations, "confirm_error": self.confirm_error}
        (log.error if failed else log.warning)(
            "%s: fenced %.1f ms %s %.3f in %.1f ms (network %.1f ms%s, target %.1f ms%s)",
            reason or "deadline passed without a pet or a confirmation", 1e3 * abs(start - deadline),
            "after the deadline" if start >= deadline else "before the deadline", deadline, 1e3 * (end - start),
            1e3 * (t_net - start), f" FAILED: {net_err}" if net_err else "", 1e3 * (end - t_net),
            f" FAILED: {tgt_err}" if tgt_err else "")
        self._record(event)
        return event

    def _record(self, event: dict[str, Any]) -> None:
        path = os.path.join(self.state_dir, protocol.EVENTS)
        count = protocol.read_events(self.state_dir)["count"]
        try:
            statefile.write(path, {"count": count + 1, "last": event})
        except OSError as e:
            log.warning("cannot record the fence in %s: %s", path, e.strerror)

    def _retry(self) -> None:
        p = self.pending
        failed = [n for n in p.parts if self._part(n)]
        if failed:
            delay = min(p.delay * 2, RETRY_MAX)
            self.pending = _Pending(failed, self.clock() + delay, delay)
            log.error("fence of %s still failing; next try in %.0fs", ", ".join(failed), delay)
        else:
            log.warning("fence of %s done on retry", ", ".join(p.parts))
            self.pending = _Pending()

    # --- loop --------------------------------------------------------------------------------------------
    def _timeout(self) -> float:
        t = self.clock()
        wait = IDLE_WAIT
        if self.deadline is not None:
            wait = min(MAX_WAIT, max(0.0, self.deadline - t))
        if self.pending.parts:
            wait = min(wait, max(0.0, self.pending.at - t))
        for c in self._conns.values():
            wait = min(wait, max(0.0, c.expires - t))
        return wait

    def step(self) -> bool:
        """One wait and what follows it; False when the guard should exit."""
        for key, _ in self._sel.select(self._timeout()):
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            elif key.data == "outcome":
                self._drain()
            else:
                conn = self._conns.get(key.fd)
                if conn is not None:
                    self._read(conn)
        t = self.clock()
        for c in [c for c in self._conns.values() if c.expires <= t]:
            self._drop(c)
        if self._view is not None and self._winding_down():
            log.info("%s: no more confirmations of my own; fencing at %.3f unless pet",
                     "terminated" if self.terminate else "orphaned", self.deadline or t)
            self._view = None
        if self.stopping:
            log.info("%s; exiting", self.stopping)
            return False
        if self.deadline is not None and t >= self.deadline:
            self.fence()
        elif self.pending.parts and t >= self.pending.at:
            self._retry()
        if self.deadline is None:
            if self.terminate:
                log.info("terminated, and not armed: exiting")
                return False
            if not self._socket_is_ours():
                log.warning("%s is gone or replaced and nothing is armed: exiting",
                            protocol.sock_name(self.hash))
                return False
        elif not self._orphaned and not self._socket_is_ours():
            self._orphaned = True
            log.warning("%s is gone or replaced: nobody can pet this guard; fencing at the deadline, "
                        "then exiting", protocol.sock_name(self.hash))
        return True

    def run(self) -> None:
        try:
            while self.step():
                pass
        finally:
            self._view = None
            if self._confirmer is not None:
                self._confirmer.stop()
            if self.share is not None:
                self.share.close()
            self._unbind()
            for c in list(self._conns.values()):
                self._drop(c)
            for b in (self.network, self.target):
                try:
                    b.close()
                except Exception as e:  # noqa: BLE001
                    log.warning("closing %s: %s", type(b).__name__, e)


def take_lock(state_dir: str, h: str) -> int:
    """``flock`` ``guard-H.lock`` and write our pid into it; ``GuardStartError`` when another process
    keeps it for longer than a client's probe."""
    path = os.path.join(state_dir, protocol.lock_name(h))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    until = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= until:
                os.close(fd)
                raw = protocol.lock_holder(state_dir, h)
                raise GuardStartError(f"another guard (pid {raw or '?'}) holds {path}", EXIT_LOCKED) from None
            time.sleep(0.01)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_config(path: str, h: str, state_dir: str) -> agent_config.Config:
    """The config from the bytes whose hash is ``h``, for ``state_dir``; ``GuardStartError`` otherwise."""
    data = protocol.read_config_bytes(path)
    if protocol.config_hash(data) != h:
        raise GuardStartError(f"{path} changed since the agent read it (hash {protocol.config_hash(data)}, "
                              f"the agent's is {h}): the guard cannot run with the agent's config; restart "
                              "the agent", EXIT_CONFIG)
    try:
        cfg = agent_config.parse(tomllib.loads(data.decode("utf-8")), path)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise GuardStartError(f"{path}: not valid TOML: {e}", EXIT_CONFIG) from None
    except ConfigError as e:
        raise GuardStartError(f"{path}: {e}", EXIT_CONFIG) from None
    if os.path.realpath(cfg.state_dir) != os.path.realpath(state_dir):
        raise GuardStartError(f"{path} names state dir {cfg.state_dir}, not {state_dir}: a guard only acts "
                              "for its own state directory", EXIT_CONFIG)
    return cfg


def build(cfg: agent_config.Config) -> tuple[NetworkBackend, TargetBackend]:
    try:
        network = agent_plugins.load_network(cfg.network.backend, agent_plugins.context(cfg, "network"))
        target = agent_plugins.load_target(cfg.target.backend, agent_plugins.context(cfg, "target"))
    except ConfigError as e:
        raise GuardStartError(str(e), EXIT_CONFIG) from None
    except Exception as e:  # noqa: BLE001 - a plugin that cannot be built (abstract method, import error)
        raise GuardStartError(f"cannot build the backends: {type(e).__name__}: {e}", EXIT_CONFIG) from None
    return network, target


def main(config_file: str, state_dir: str, h: str) -> int:
    """The guard process; returns its exit status."""
    handler = logging.StreamHandler()
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d guard[%(process)d] %(levelname)s %(message)s",
                            "%Y-%m-%dT%H:%M:%S")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("stevedore").setLevel(logging.WARNING)
    try:
        os.chdir("/")
        lock_fd = take_lock(state_dir, h)
        cfg = load_config(config_file, h, state_dir)
        root.setLevel(cfg.log_level)
        network, target = build(cfg)
        sys.setswitchinterval(SWITCH_INTERVAL)
        guard = Guard(state_dir, h, network, target, consul=cfg.consul)
        guard.install_signals()
        guard.bind()
        try:
            guard.share = shared.Writer(shared.path(state_dir, h))
        except OSError as e:
            log.warning("no shared deadline for the agent's fencer (%s): a thawed agent fences on its own "
                        "deadline", e)
    except GuardStartError as e:
        log.error("cannot start: %s", e)
        return e.code
    except OSError as e:
        log.error("cannot start: %s", e)
        return EXIT_CONFIG if e.errno in (errno.EACCES, errno.ENOENT, errno.ENOTDIR) else 1
    log.info("guarding %s (config %s, hash %s): network %s, target %s", state_dir, config_file or "(defaults)",
             h, cfg.network.backend, cfg.target.backend)
    try:
        guard.run()
    finally:
        os.close(lock_fd)
    return EXIT_OK
