"""systemd's notification protocol against a real datagram socket, the environment children inherit, and
the wake-up pipe signal handlers use."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from agent import childenv
from agent.runtime.notify import Notifier
from agent.runtime.wakeup import Wakeup


def listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    return s


def test_ready_and_watchdog_reach_the_socket(tmp_path: Path) -> None:
    sock = listener(tmp_path / "notify")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000",
                  "WATCHDOG_PID": str(os.getpid())})
    assert n.interval == 4.0
    n.ready("serving as gwa")
    n.watchdog()
    assert sock.recv(100) == b"READY=1\nSTATUS=serving as gwa"
    assert sock.recv(100) == b"WATCHDOG=1"


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert n.interval == 0.0


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"pathagent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
    assert s.recv(100) == b"READY=1"


def test_no_socket_is_a_no_op_and_a_dead_one_is_not_fatal(tmp_path: Path) -> None:
    Notifier({}).ready()
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    n.ready()
    n.watchdog()


def test_children_inherit_no_notify_variables_nor_secrets(monkeypatch: object) -> None:
    env = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "CONSUL_HTTP_TOKEN": "t0k",
           "MY_PASSWORD": "p", "CEPH_ARGS": "--id gw", "HOME": "/root"}
    assert childenv.scrubbed(env) == {"PATH": "/bin", "CEPH_ARGS": "--id gw", "HOME": "/root"}


def test_wakeup_from_a_signal_handler_never_deadlocks() -> None:
    w = Wakeup()
    old = signal.signal(signal.SIGUSR1, lambda s, f: w.wake())
    try:
        t = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        t.start()
        start = time.monotonic()
        assert w.wait(5.0) is True
        assert time.monotonic() - start < 2.0
        for _ in range(100000):          # a full pipe is still just "wake up"
            w.wake()
        assert w.wait(0) is True
        assert w.wait(0.01) is False
    finally:
        signal.signal(signal.SIGUSR1, old)
        w.close()
