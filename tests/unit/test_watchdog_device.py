"""The ``device`` watchdog's protocol, against a regular file and a FIFO in a temp dir.

No test here ever opens a real watchdog device: opening one arms it, and a test that then failed before
the magic close would reset the host. Every path is under ``tmp_path`` (``_device`` checks it), and the
ioctl is exercised either for real on a file or FIFO (where it fails with ENOTTY) or through a stand-in
for ``fcntl.ioctl`` that records the request.
"""
from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from agent.backend import PluginContext
from agent.errors import ConfigError, PermanentBackendError
from plugins import watchdog_device
from plugins.watchdog_device import WDIOC_SETTIMEOUT, DeviceWatchdog


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _device(tmp_path: Path, path: Path, **options: Any) -> DeviceWatchdog:
    assert str(path).startswith(str(tmp_path)) and not str(path).startswith("/dev"), "never a real device"
    return DeviceWatchdog(PluginContext(node="n1", state_dir=str(tmp_path), options={"path": str(path), **options}))


@pytest.fixture()
def regular(tmp_path: Path) -> Path:
    p = tmp_path / "watchdog"
    p.write_bytes(b"")
    return p


@pytest.fixture()
def fifo(tmp_path: Path) -> Any:
    """A FIFO with its read end open (non-blocking), so the watchdog's open for writing succeeds."""
    p = tmp_path / "watchdog.fifo"
    os.mkfifo(p)
    r = os.open(p, os.O_RDONLY | os.O_NONBLOCK)

    def read() -> bytes:
        try:
            return os.read(r, 4096)
        except BlockingIOError:
            return b""
    yield p, read
    os.close(r)


def test_the_ioctl_on_something_that_is_not_a_watchdog_is_a_clear_error(tmp_path: Path, regular: Path) -> None:
    w = _device(tmp_path, regular, timeout=3)
    with pytest.raises(PermanentBackendError) as e:
        w.pet(now() + 10)
    msg = str(e.value)
    assert str(regular) in msg and "WDIOC_SETTIMEOUT" in msg and "set_timeout = false" in msg
    # a failure after the open stops the device again (magic close) instead of leaving a timer running
    assert regular.read_bytes() == b"V"
    with pytest.raises(PermanentBackendError):       # nothing was kept open: the next pet tries again
        w.pet(now() + 10)
    w.disarm()                                       # nothing open: nothing to do
    assert regular.read_bytes() == b"V"


def test_the_same_on_a_fifo(tmp_path: Path, fifo: Any) -> None:
    path, read = fifo
    w = _device(tmp_path, path)
    with pytest.raises(PermanentBackendError, match="WDIOC_SETTIMEOUT"):
        w.pet(now() + 10)
    assert read() == b"V"


def test_pet_writes_only_while_the_timeout_fits_before_the_deadline(tmp_path: Path, regular: Path) -> None:
    w = _device(tmp_path, regular, timeout=3, set_timeout=False)
    w.pet(now() + 10)                      # opens (arms) and writes
    assert regular.read_bytes() == b"1"
    w.pet(now() + 3.5)                     # now + 3 <= deadline: pet
    assert regular.read_bytes() == b"11"
    w.pet(now() + 2.5)                     # now + 3 > deadline: left to run out (reset before the deadline)
    w.pet(now() + 1)
    assert regular.read_bytes() == b"11"
    w.pet(now() + 4)                       # a new confirmation: pet again
    assert regular.read_bytes() == b"111"
    assert w.writes == 3
    w.disarm()                             # the magic character, then closed
    assert regular.read_bytes() == b"111V"
    w.disarm()                             # idempotent
    assert regular.read_bytes() == b"111V"


def test_fifo_protocol_and_close_leaves_it_armed(tmp_path: Path, fifo: Any) -> None:
    path, read = fifo
    w = _device(tmp_path, path, timeout=2, set_timeout=False)
    w.pet(now() + 5)
    w.pet(now() + 5)
    assert read() == b"11"
    w.close()                              # planned restart: no magic character, the device stays armed
    assert read() == b""
    w2 = _device(tmp_path, path, timeout=2, set_timeout=False)   # the next agent process
    w2.pet(now() + 5)
    w2.disarm()
    assert read() == b"1V"


def test_first_pet_arms_even_when_the_deadline_is_near(tmp_path: Path, regular: Path) -> None:
    """Opening later than the deadline allows is still better than no watchdog at all."""
    w = _device(tmp_path, regular, timeout=3, set_timeout=False)
    w.pet(now() + 1)
    assert regular.read_bytes() == b"1"
    w.close()


def test_set_timeout_request_and_what_the_driver_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ioctl is WDIOC_SETTIMEOUT with an int; the value the driver sets is read back."""
    calls: list[tuple[int, int]] = []
    answer = {"value": 0}

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        assert stat.S_ISREG(os.fstat(fd).st_mode)      # the stand-in only ever sees a temp file
        calls.append((request, struct.unpack("i", arg)[0]))
        return struct.pack("i", answer["value"] or struct.unpack("i", arg)[0])

    monkeypatch.setattr(watchdog_device.fcntl, "ioctl", ioctl)
    files = [tmp_path / f"watchdog{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"")
    w = _device(tmp_path, files[0], timeout=4)
    w.pet(now() + 10)
    assert calls == [(WDIOC_SETTIMEOUT, 4)] and files[0].read_bytes() == b"1"
    w.disarm()
    assert files[0].read_bytes() == b"1V"

    answer["value"] = 2                    # the driver set less: that timeout is used from now on
    w = _device(tmp_path, files[1], timeout=4)
    w.pet(now() + 10)
    assert w.timeout == 2
    w.pet(now() + 2.5)                     # fits 2 s, would not fit 4 s
    assert files[1].read_bytes() == b"11"
    w.disarm()

    answer["value"] = 9                    # longer than asked: the agent could not pet it in time
    w = _device(tmp_path, files[2], timeout=4)
    with pytest.raises(PermanentBackendError, match="driver set 9s"):
        w.pet(now() + 10)
    assert files[2].read_bytes() == b"V"   # stopped again, nothing kept open


def test_missing_device_names_the_path(tmp_path: Path) -> None:
    w = _device(tmp_path, tmp_path / "no-such-watchdog")
    with pytest.raises(PermanentBackendError, match="no-such-watchdog.*cannot open"):
        w.pet(now() + 10)


def test_constructor_touches_nothing(tmp_path: Path) -> None:
    """Built by check-config and the guard: it must not open (arm) anything. The default path is only
    read, never opened, here."""
    w = DeviceWatchdog(PluginContext(node="", state_dir=str(tmp_path), options={}))
    assert w.path == "/dev/watchdog" and w.timeout == 2 and w.set_timeout is True
    w.close()
    w.disarm()                             # never opened: no-op


@pytest.mark.parametrize("options, key", [
    ({"timeout": 2.5}, "watchdog.device.timeout"),
    ({"timeout": 0}, "watchdog.device.timeout"),
    ({"set_timeout": "no"}, "watchdog.device.set_timeout"),
    ({"path": 7}, "watchdog.device.path"),
])
def test_bad_options(tmp_path: Path, options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        DeviceWatchdog(PluginContext(node="", state_dir=str(tmp_path), options=options))
    assert [k for k, _ in e.value.problems] == [key]
    assert set(options) <= set(DeviceWatchdog.config_keys)
