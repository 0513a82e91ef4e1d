"""Tier 4 smoke tests of the LIO guest itself (``lab.guest``): the stock Debian kernel, the project's venv
in the guest, the lab network both ways, the control channel (values, remote exceptions, concurrency),
cutting the link, a crash, a clean poweroff. Boot times are printed (``-s``/``-rP``); no latency is
asserted (TCG)."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Callable

import pytest

from lab.guest import TOP, Guest, GuestCallError, GuestError, build_info
from lab.netns import GatewayLab, run_in
from lab import proc

pytestmark = pytest.mark.lio

VENV_PY = str(TOP / ".venv" / "bin" / "python")


def ping_from_ns(lab: GatewayLab, ns: str, ip: str, wait: float = 2) -> int:
    return run_in(lab.ns(ns), ["ping", "-n", "-c", "1", "-W", str(int(wait)), ip], timeout=wait + 10).returncode


def eventually(fn: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(0.2)
    return fn()


def test_runs_the_built_stock_debian_kernel_without_lio_loaded(lio_guest: Guest) -> None:
    info = build_info()
    assert lio_guest.exec(["uname", "-r"], check=True).stdout.strip() == info["kver"]
    assert info["kernel_version"] in lio_guest.exec(["uname", "-v"]).stdout      # "#1 SMP ... Debian 6.1.x-y"
    assert lio_guest.exec(["hostname"]).stdout.strip() == lio_guest.name
    # PID 1 left LIO alone: the plugin under test loads the modules and mounts configfs itself
    mounts = lio_guest.read_text("/proc/mounts")
    assert "configfs" not in mounts
    assert lio_guest.exec(["test", "-e", "/sys/module/target_core_mod"]).rc == 1
    assert " / overlay " in mounts                     # read-only 9p root under a tmpfs overlay
    assert f" {TOP} 9p " in mounts                      # the checkout, at the host's path


def test_the_venv_python_imports_the_project_and_the_bindings(lio_guest: Guest) -> None:
    code = ("import json, sys, agent, plugins, consul, stevedore, pyroute2, rtslib_fb, rados, rbd; "
            "print(json.dumps({'exe': sys.executable, 'agent': agent.__file__, 'rtslib': rtslib_fb.__file__}))")
    r = lio_guest.exec([VENV_PY, "-c", code], timeout=300)
    assert r.rc == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["exe"] == VENV_PY
    assert got["agent"] == str(TOP / "agent" / "__init__.py")
    assert got["rtslib"].startswith("/usr/lib/python3/dist-packages/")


def test_the_guest_is_on_the_lab_segment(lio_lab: GatewayLab, lio_guest: Guest) -> None:
    r = lio_guest.exec(["ping", "-n", "-c", "1", "-W", "5", lio_lab.host_ip])
    assert r.rc == 0, r.stdout + r.stderr
    assert ping_from_ns(lio_lab, "ini", lio_guest.ip, wait=5) == 0
    route = lio_guest.exec(["ip", "-4", "route", "show", "default"]).stdout
    assert f"via {lio_lab.host_ip}" in route


def test_call_returns_values_keeps_state_and_raises_typed_errors(lio_guest: Guest) -> None:
    assert lio_guest.call("os.path:join", "a", "b") == "a/b"
    assert lio_guest.call("json:loads", '{"k": [1, 2]}') == {"k": [1, 2]}
    assert lio_guest.call("lab.netns:exec_argv", "x", ["y"]) == ["ip", "netns", "exec", "x", "y"]  # scripts/ on sys.path
    # the daemon's process lives on between calls
    lio_guest.call("os:environ.__setitem__", "PATHAGENT_LIO_PROBE", "kept")
    assert lio_guest.call("os:getenv", "PATHAGENT_LIO_PROBE") == "kept"

    with pytest.raises(GuestCallError) as e:
        lio_guest.call("json:loads", "{")
    assert e.value.type == "json.decoder.JSONDecodeError" and e.value.attrs["pos"] == 1
    with pytest.raises(GuestCallError) as e:
        lio_guest.call("subprocess:check_call", ["false"])
    assert e.value.type == "subprocess.CalledProcessError" and e.value.attrs["returncode"] == 1
    with pytest.raises(GuestCallError) as e:
        lio_guest.call("os:stat", "/no/such/file")
    assert e.value.type == "FileNotFoundError" and e.value.attrs["errno"] == 2
    with pytest.raises(GuestCallError) as e:
        lio_guest.call("no_such_module_here:fn")
    assert e.value.type == "ModuleNotFoundError"


def test_a_blocked_call_does_not_block_the_next(lio_guest: Guest) -> None:
    done: list[str] = []
    errors: list[BaseException] = []

    def run(tag: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            done.append(tag)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    slow = threading.Thread(target=run, args=("slow", lambda: lio_guest.call("time:sleep", 6)))
    slow.start()
    time.sleep(0.5)
    fast = threading.Thread(target=run, args=("fast", lambda: lio_guest.exec(["true"], check=True)))
    fast.start()
    fast.join(60)
    slow.join(60)
    assert not errors
    assert done == ["fast", "slow"]


def test_exec_spawn_signal_and_files(lio_guest: Guest) -> None:
    r = lio_guest.exec(["sh", "-c", 'read x; echo "$x $PROBE" ; echo err >&2; exit 3'], input="hello\n",
                       env={"PROBE": "env"}, cwd="/tmp")
    assert (r.rc, r.stdout, r.stderr) == (3, "hello env\n", "err\n")
    lio_guest.write_file("/tmp/lio/probe.txt", "content\n", mkdir=True)
    assert lio_guest.read_file("/tmp/lio/probe.txt") == b"content\n"
    pid = lio_guest.spawn(["sh", "-c", "echo started; exec sleep 600"], log="/tmp/lio/spawn.log")
    assert lio_guest.wait(pid, timeout=0.5) is None
    lio_guest.signal(pid, "SIGTERM")
    assert lio_guest.wait(pid, timeout=30) == -15
    assert lio_guest.read_text("/tmp/lio/spawn.log") == "started\n"


def test_link_down_cuts_the_network_not_the_control(lio_lab: GatewayLab, lio_guest: Guest) -> None:
    assert ping_from_ns(lio_lab, "ini", lio_guest.ip, wait=5) == 0
    lio_guest.link(False)
    try:
        assert ping_from_ns(lio_lab, "ini", lio_guest.ip, wait=2) != 0
        assert lio_guest.exec(["ping", "-n", "-c", "1", "-W", "2", lio_lab.host_ip]).rc != 0
        assert lio_guest.exec(["echo", "still here"]).stdout == "still here\n"     # the control channel
    finally:
        lio_guest.link(True)
    assert eventually(lambda: ping_from_ns(lio_lab, "ini", lio_guest.ip, wait=2) == 0, 30)


def test_two_more_guests_at_once_crash_one_power_off_the_other(
        lio_lab: GatewayLab, lio_guest: Guest, boot_guests: Callable[..., list[Guest]]) -> None:
    b, c = boot_guests("lio-b", "lio-c")
    assert len({lio_guest.ip, b.ip, c.ip}) == 3 and len({lio_guest.mac, b.mac, c.mac}) == 3
    assert b.exec(["ping", "-n", "-c", "1", "-W", "5", c.ip]).rc == 0                # guest to guest, one L2
    # the module closure is complete: the whole LIO + krbd set loads (crc32c for rbd included)
    r = b.exec(["modprobe", "-a", "target_core_mod", "target_core_iblock", "target_core_file", "target_core_pscsi",
                "target_core_user", "tcm_loop", "iscsi_target_mod", "loop", "rbd", "softdog"], timeout=300)
    assert r.rc == 0, r.stderr
    assert b.exec(["test", "-d", "/sys/module/iscsi_target_mod"]).rc == 0

    pid = b.pid
    assert pid is not None
    b.crash()
    assert not b.alive and not proc.alive(pid)
    with pytest.raises(GuestError):
        b.exec(["true"])
    assert ping_from_ns(lio_lab, "ini", b.ip, wait=2) != 0
    assert b.tap not in subprocess.run(["ip", "-n", lio_lab.bridge_ns, "-o", "link"], capture_output=True,
                                       text=True).stdout
    assert lio_guest.exec(["true"]).rc == 0 and c.exec(["true"]).rc == 0                # the others live on

    t0 = time.monotonic()
    c.stop()
    print(f"\nlio guest {c.name}: poweroff in {time.monotonic() - t0:.1f} s")
    assert not c.alive
    assert "Power down" in c.console_tail(10)
