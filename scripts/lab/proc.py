"""Process hygiene for lab daemons on a host whose PID 1 reaps orphans late.

- ``alive(pid)`` treats zombies (state Z) as dead; ``kill -0`` would not.
- ``stop(pid, needle)`` signals only a process whose cmdline still contains ``needle`` (PIDs get reused),
  SIGTERM first, SIGKILL after ``grace`` seconds. Never by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Sequence


def state(pid: int) -> str | None:
    """The process state letter from /proc/PID/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].split(b" ", 1)[0].decode()


def alive(pid: int) -> bool:
    s = state(pid)
    return s is not None and s not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_dead(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    return not alive(pid)


def signal_checked(pid: int, sig: int, needle: str) -> bool:
    """Send ``sig`` to ``pid`` if it is alive and its cmdline contains ``needle``."""
    if not alive(pid) or needle not in cmdline(pid):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop(pid: int, needle: str, grace: float = 2.0) -> None:
    if signal_checked(pid, signal.SIGTERM, needle) and not wait_dead(pid, grace):
        signal_checked(pid, signal.SIGCONT, needle)
        signal_checked(pid, signal.SIGKILL, needle)
        wait_dead(pid, 5.0)


def kill(pid: int, needle: str) -> None:
    if signal_checked(pid, signal.SIGKILL, needle):
        wait_dead(pid, 5.0)


def spawn(argv: Sequence[str], log_path: str, env: dict[str, str] | None = None,
          netns: str | None = None) -> subprocess.Popen[bytes]:
    """Start a foreground daemon with stdout+stderr to ``log_path``; in ``netns`` via ``ip netns exec``
    (which execs, so the Popen pid is the daemon's own)."""
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    finally:
        log.close()


def guard_pids(state_dir: "os.PathLike[str] | str") -> list[int]:
    """The live watchdog guard processes of an agent's state directory (each writes its pid into the lock
    file it holds, ``guard-<hash>.lock``); a guard outlives a killed agent by design, so labs stop these."""
    out = []
    for name in sorted(os.listdir(state_dir)) if os.path.isdir(state_dir) else []:
        if not (name.startswith("guard-") and name.endswith(".lock")):
            continue
        try:
            with open(os.path.join(state_dir, name), encoding="ascii") as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if alive(pid) and "plugins.guard" in cmdline(pid):
            out.append(pid)
    return out

