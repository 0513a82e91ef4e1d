"""The tgtd daemon of one state directory: found, started, watched, and killed.

``current`` names the running tgtd (our child, or the one in the pid file: pid and /proc start time must
match, a zombie is dead); ``start`` starts one empty and waits until it answers; ``ended`` says how the
last one ended; ``kill`` SIGKILLs it without waiting on anything but the kernel (what ``fence`` uses,
from any thread or process). See docs/backend-tgt.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from agent import childenv, statefile
from agent.core.targetspec import portal_of
from agent.errors import PermanentBackendError, TransientBackendError
from plugins import sysctl
from plugins.tgt.tgtadm import Tgtadm, TgtadmError, parse_portals

log = logging.getLogger(__name__)

_LOG_NOISE = ("RDMA", "oom-killer", "nr_open", "timer_fd", "signalfd")


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (field 3 on), or ``None`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def alive(pid: int) -> bool:
    """PID exists and is not a zombie (PID 1 reaps orphans late, so a zombie counts as dead)."""
    f = stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def start_time(pid: int) -> str:
    f = stat_fields(pid)
    return f[19] if f else ""


@dataclass(frozen=True)
class Tgtd:
    """One tgtd instance: its pid and its start time (clock ticks after boot, from /proc)."""

    pid: int
    start: str

    @property
    def ident(self) -> str:
        return f"{self.pid} {self.start}"


@dataclass(frozen=True)
class TgtdConfig:
    binary: str
    control_port: int
    io_threads: int
    listen: str                 # "" : no fixed portal
    port: int
    ceph_timeout: float
    rbd_cache: bool
    nonlocal_bind: bool


class TgtdSupervisor:
    """The tgtd of ``directory`` (``tgtd.pid``, ``tgtd.log``, ``fence`` mark, control socket)."""

    def __init__(self, directory: str, cfg: TgtdConfig, tgtadm: Tgtadm) -> None:
        self.dir = directory
        self.cfg = cfg
        self.tgtadm = tgtadm
        self.pid_path = os.path.join(directory, "tgtd.pid")
        self.log_path = os.path.join(directory, "tgtd.log")
        self.mark_path = os.path.join(directory, "fence")
        self.lock_path = os.path.join(directory, "tgtd.lock")
        self._child: subprocess.Popen[bytes] | None = None
        self._child_start = ""

    # ---------------------------------------------------------------- finding it

    def _pid_file(self) -> Tgtd | None:
        try:
            with open(self.pid_path, encoding="ascii") as f:
                pid_s, _, start = f.read().strip().partition(" ")
            return Tgtd(int(pid_s), start)
        except (OSError, ValueError):
            return None

    def _candidates(self) -> list[Tgtd]:
        """Our child (while not reaped) and the pid file's tgtd: usually the same one."""
        out = []
        c = self._child
        if c is not None and c.returncode is None:
            out.append(Tgtd(c.pid, self._child_start))
        f = self._pid_file()
        if f is not None and f not in out:
            out.append(f)
        return out

    def current(self) -> Tgtd | None:
        """The running tgtd, or ``None``. Reads /proc and the pid file only."""
        for t in self._candidates():
            if alive(t.pid) and start_time(t.pid) == t.start:
                return t
        return None

    def ended(self) -> str:
        """How the last tgtd ended ("tgtd (pid N) died: killed by signal 9"); ``""`` when none was ever
        started here. Call only when ``current()`` is ``None``; reaps our child."""
        c = self._child
        if c is not None:
            rc = c.poll()
            self._child = None
            if rc is None:       # /proc says dead (or another process) but it is not reaped yet
                return f"tgtd (pid {c.pid}) died"
            return f"tgtd (pid {c.pid}) died: " + (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        f = self._pid_file()
        if f is None:
            return ""
        return (f"tgtd (pid {f.pid}) died: how is unknown (an earlier agent process started it); "
                f"its log ends: {self.log_tail()}")

    # ---------------------------------------------------------------- fencing

    def mark(self) -> str:
        """The fence mark: changed by every ``write_mark`` (a fence), read by an export to notice that a fence
        ran while it was under way."""
        try:
            return str(statefile.read(self.mark_path, ""))
        except (OSError, ValueError):
            return "(unreadable)"

    def write_mark(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        statefile.write(self.mark_path, f"{time.time_ns()} {os.getpid()} {uuid.uuid4().hex}")

    def kill(self) -> dict[int, int]:
        """SIGKILL every tgtd of ours that runs; returns {pid: pidfd} to wait on (``wait_dead``). A pidfd
        pins the process, so a reused pid is never signalled."""
        fds: dict[int, int] = {}
        for t in self._candidates():
            if t.pid in fds:
                continue
            try:
                fd = os.pidfd_open(t.pid)
            except OSError:
                continue                      # gone
            if not alive(t.pid) or start_time(t.pid) != t.start:
                os.close(fd)
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                os.close(fd)
                continue
            fds[t.pid] = fd
        return fds

    @staticmethod
    def wait_dead(fds: dict[int, int], timeout: float) -> list[int]:
        """Wait until every process in ``fds`` has exited (its pidfd reads ready: every thread is gone and
        with them its sockets), at most ``timeout`` s; closes the fds. Returns the pids still alive."""
        end = time.monotonic() + timeout
        left = dict(fds)
        try:
            while left:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                ready = select.select(list(left.values()), [], [], remaining)[0]
                for pid, fd in list(left.items()):
                    if fd in ready:
                        del left[pid]
            return sorted(left)
        finally:
            for fd in fds.values():
                os.close(fd)

    # ---------------------------------------------------------------- watching

    def wait_exit(self, t: Tgtd, stop_fd: int, stop: threading.Event) -> None:
        """Block until ``t`` exits, ``stop_fd`` is readable or ``stop`` is set."""
        try:
            fd = os.pidfd_open(t.pid)
        except OSError:
            return
        try:
            if start_time(t.pid) != t.start:
                return
            while not stop.is_set():
                if select.select([fd, stop_fd], [], [], 5.0)[0]:
                    return
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- starting

    @contextlib.contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        """The state dir's configuration lock (an flock on ``tgtd.lock``), held by whoever changes tgtd or
        the record (export, unexport, a restart) in any process: two instances must not start two tgtd
        (the second would overwrite the pid file and lose the first) nor write the record over each
        other. ``fence`` and ``exported`` never take it. ``TransientBackendError`` after ``timeout``."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            end = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > end:
                        raise TransientBackendError(f"tgt: another process holds {self.lock_path} (it is changing "
                                                    "tgtd)", retry_after=1.0) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    def _set_nonlocal_bind(self) -> None:
        for fam in ("ipv4", "ipv6"):
            path = f"/proc/sys/net/{fam}/ip_nonlocal_bind"
            try:
                if sysctl.ensure_one(path):
                    log.info("tgt: set net.%s.ip_nonlocal_bind=1 in this network namespace "
                             "(portals listen on path IPs before they are up)", fam)
            except FileNotFoundError:
                continue   # no IPv6 in this namespace
            except OSError as e:
                log.warning("tgt: cannot set %s: %s (portals for path IPs that are not up yet will fail)", path, e)

    def env(self) -> dict[str, str]:
        """tgtd's environment: scrubbed, with its control socket and the Ceph timeouts for bs_rbd."""
        env = childenv.child_env(TGT_IPC_SOCKET=self.tgtadm.socket)
        t = str(max(1, int(round(self.cfg.ceph_timeout))))
        env["CEPH_ARGS"] = " ".join(filter(None, [env.get("CEPH_ARGS", ""), f"--client_mount_timeout {t}",
                                                  f"--rados_mon_op_timeout {t}", f"--rados_osd_op_timeout {t}",
                                                  f"--rbd_cache {'true' if self.cfg.rbd_cache else 'false'}"]))
        return env

    def start(self) -> Tgtd:
        """Start tgtd (empty: tgtd keeps no configuration) in its own session, write the pid file, wait
        until it answers, and drop the boot portal unless ``listen``. ``TransientBackendError`` when it
        exits or does not answer; ``PermanentBackendError`` when it cannot be executed."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if self.cfg.nonlocal_bind:
            self._set_nonlocal_bind()
        try:
            if os.path.getsize(self.log_path) > 8 << 20:
                os.replace(self.log_path, self.log_path + ".1")
        except OSError:
            pass
        # a portal on port 0 gets a free port; it is only there because tgtd needs one to start
        boot = portal_of(self.cfg.listen, self.cfg.port) if self.cfg.listen else "127.0.0.1:0"
        argv = [self.cfg.binary, "-f", "-C", str(self.cfg.control_port), "-t", str(self.cfg.io_threads),
                "--iscsi", f"portal={boot}"]
        logf = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True, close_fds=True)
        except OSError as e:
            raise PermanentBackendError(f"cannot start {self.cfg.binary}: {e.strerror or e}") from None
        finally:
            logf.close()
        t = Tgtd(proc.pid, start_time(proc.pid))
        self._child, self._child_start = proc, t.start
        # the pid file first: a tgtd we lose track of would hold the socket lock and block every restart
        tmp = self.pid_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{t.ident}\n")
        os.replace(tmp, self.pid_path)
        end = time.monotonic() + 5.0
        while True:
            if proc.poll() is not None:
                raise TransientBackendError(f"tgtd exited at start (status {proc.returncode}): "
                                            f"{self.log_tail()}", retry_after=5.0)
            try:
                self.tgtadm.run("show system", ["--mode", "sys", "--op", "show"], timeout=1.0)
                break
            except TgtadmError:
                if time.monotonic() > end:
                    raise TransientBackendError(f"tgtd (pid {proc.pid}) does not answer on "
                                                f"{self.tgtadm.socket}") from None
                time.sleep(0.02)
        if not self.cfg.listen:
            for p in parse_portals(self.tgtadm.run("show portals", ["--mode", "portal", "--op", "show"])):
                self.tgtadm.run(f"delete portal {p}", ["--mode", "portal", "--op", "delete", "--param", f"portal={p}"])
        log.info("tgt: started tgtd pid %d (control port %d, socket %s, log %s)", proc.pid, self.cfg.control_port,
                 self.tgtadm.socket, self.log_path)
        return t

    def reap(self) -> None:
        """Collect our child's exit status if it ended (no zombie left behind)."""
        if self._child is not None:
            self._child.poll()

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 600))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(ln for ln in lines[-6:] if not any(n in ln for n in _LOG_NOISE)) or "(no message)"
