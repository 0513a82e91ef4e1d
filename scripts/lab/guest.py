"""Host side of the LIO test guest (tier 4; /work/shared/notes/lio-guest.md): a Debian 12 guest under
QEMU TCG whose stock kernel has LIO, built by ``scripts/lio-guest build`` into ``.cache/lio``.

A ``Guest`` sits on a ``GatewayLab``'s bridge through a tap in the bridge namespace (qemu runs in that
namespace), so it shares the L2 segment with the lab's gateway and initiator namespaces and reaches Ceph
and Consul started on the host at ``lab.host_ip``. Its address is ``lab.addr(offset)``.

Control goes over a virtio-serial port (a unix socket on the host; ``scripts/lab/guestd.py`` in the
guest), never over the guest's network, so ``link(False)`` cuts the guest off the segment while ``exec``
and ``call`` still work. Every request runs in its own thread in the guest: a blocked call does not hold
up the others. The guest's root is the built rootfs, read-only, under a tmpfs overlay (every boot starts
clean); the project checkout is mounted at the same absolute path as on the host, and its venv's python
runs the daemon, so ``call("plugins.x:fn", ...)`` runs the checkout's own code in the guest.

TCG runs guest code 7-20x slower than the host: use this tier for functional tests, never for latencies.
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import itertools
import json
import os
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lab import proc
from lab.netns import GatewayLab, exec_argv

TOP = Path(__file__).resolve().parents[2]
LIO_DIR = TOP / ".cache" / "lio"
BUILD_SCRIPT = TOP / "scripts" / "lio-guest"
INIT_SCRIPT = TOP / "scripts" / "lab" / "guest-init.sh"
QEMU = "qemu-system-x86_64"
BUILD_HINT = "run `bash scripts/lio-guest build` (scripts/setup does)"


class GuestError(RuntimeError):
    """The guest failed to boot, died, or did not answer; ``console`` is its console's tail."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(f"{message}\n--- guest console (tail) ---\n{console}" if console else message)
        self.console = console


class GuestTimeout(GuestError):
    """A request got no answer in time, or an ``exec`` overran its timeout (``stdout``/``stderr``: the
    output so far)."""

    def __init__(self, message: str, console: str = "", stdout: str = "", stderr: str = "") -> None:
        super().__init__(message, console)
        self.stdout = stdout
        self.stderr = stderr


class GuestCallError(GuestError):
    """An exception raised in the guest: ``type`` is its qualified class name (``FileNotFoundError``,
    ``json.decoder.JSONDecodeError``, ``agent.backend.TargetError``), ``attrs`` its JSON-able attributes
    (``retry_after``, ``errno`` ...), ``remote_traceback`` the guest's traceback. The caller maps it."""

    def __init__(self, type_name: str, message: str, attrs: Mapping[str, Any] | None = None,
                 remote_traceback: str = "") -> None:
        RuntimeError.__init__(self, f"{type_name}: {message}")
        self.console = ""
        self.type = type_name
        self.message = message
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.remote_traceback = remote_traceback

    @property
    def short_type(self) -> str:
        return self.type.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class GuestResult:
    rc: int
    stdout: str
    stderr: str

    def check(self) -> "GuestResult":
        if self.rc != 0:
            raise GuestError(f"rc {self.rc}: {self.stderr.strip() or self.stdout.strip()}")
        return self


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_info() -> dict[str, str]:
    """The stamp of the last successful build (``kernel_pkg``, ``kernel_version``, ``kver`` = the guest's
    ``uname -r``, ``build_sha``, ``init_sha``), empty when there is none."""
    try:
        text = (LIO_DIR / "stamp").read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def lio_missing() -> str | None:
    """Why the LIO guest tier cannot run here (None when it can). "Stale" means that the build script or
    the PID-1 script changed since the build; a newer Debian kernel is picked up by the next build."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (qemu's tap device)"
    for tool in (QEMU, "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed: {BUILD_HINT}"
    if not os.access(TOP / ".venv" / "bin" / "python", os.X_OK):
        return "no .venv (the guest runs the project venv's python): run `bash scripts/setup`"
    info = build_info()
    built = bool(info) and all((LIO_DIR / f).exists() for f in ("vmlinux", "initrd.cpio.gz",
                                                                "rootfs/sbin/pathagent-init"))
    fresh = built and info.get("build_sha") == _sha16(BUILD_SCRIPT) and info.get("init_sha") == _sha16(INIT_SCRIPT)
    if fresh:
        return None
    try:
        failed = (LIO_DIR / "build-failed").read_text().strip()
    except OSError:
        failed = ""
    if failed:
        return f"the LIO guest build failed: {failed} ({BUILD_HINT})"
    if not built:
        return f"the LIO guest is not built: {BUILD_HINT}"
    return f"the LIO guest build is stale (scripts/lio-guest or scripts/lab/guest-init.sh changed): {BUILD_HINT}"


def _qemu_path(p: Path | str) -> str:
    return str(p).replace(",", ",,")


class Guest:
    """One LIO guest on ``lab``'s bridge at ``lab.addr(offset)`` (``offset=None``: a free one).

    ``start`` boots it and waits for its control daemon; ``stop`` powers it off (SIGKILL after a
    timeout); ``crash`` SIGKILLs qemu (a gateway crash). Use as a context manager (starts if needed, and
    stops). The tap is removed whatever happens, and the lab's ``down`` kills a guest left running.
    """

    def __init__(self, lab: GatewayLab, name: str, offset: int | None, workdir: str | os.PathLike[str],
                 memory_mb: int = 384, accel: str = "tcg", gateway: str | None = None,
                 extra_append: str = "") -> None:
        self.lab = lab
        self.name = name
        self.offset = lab.claim_guest_offset(offset)
        self.ip = lab.addr(self.offset)
        self.prefix = lab.prefixlen
        self.gateway = lab.host_ip if gateway is None else gateway
        self.memory_mb = memory_mb
        self.accel = accel
        self.extra_append = extra_append
        self.workdir = Path(workdir)
        self.ctl = self.workdir / "ctl"                      # shared with the guest (/mnt/ctl)
        self.console_path = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.pidfile = self.workdir / "qemu.pid"
        self._sockdir: str | None = None
        self.sock_path = self.workdir / "guestd.sock"
        if len(str(self.sock_path)) > 100:                   # sun_path is 108 bytes
            self._sockdir = tempfile.mkdtemp(prefix="lio-", dir="/tmp")
            self.sock_path = Path(self._sockdir) / "guestd.sock"
        net = lab.network
        assert net is not None, "lab not up"
        b = net.network_address.packed
        self.mac = f"52:54:00:{b[1]:02x}:{b[2]:02x}:{self.offset:02x}"
        self.tap = f"{lab.prefix}t{self.offset}"[:15]
        self.boot_seconds: float | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._closed = True
        self._released = False
        self.call_timeout = 300.0

    # --- life cycle ------------------------------------------------------------------------------------
    def qemu_argv(self) -> list[str]:
        append = " ".join(x for x in (
            "console=ttyS0 quiet panic=-1 mitigations=off", f"pa.hostname={self.name}",
            f"pa.ip={self.ip}/{self.prefix}", f"pa.gw={self.gateway}" if self.gateway else "",
            f"pa.share={TOP}", self.extra_append) if x)
        accel = (["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm"
                 else ["-accel", "tcg,tb-size=64", "-cpu", "max"])
        return [
            QEMU, *accel, "-M", "pc", "-m", str(self.memory_mb), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-name", f"pathagent-lio-{self.name}", "-pidfile", str(self.pidfile),
            "-kernel", str(LIO_DIR / "vmlinux"), "-initrd", str(LIO_DIR / "initrd.cpio.gz"), "-append", append,
            "-serial", f"file:{self.console_path}",
            "-fsdev", f"local,id=fsroot,path={_qemu_path(LIO_DIR / 'rootfs')},security_model=passthrough,readonly=on",
            "-device", "virtio-9p-pci,fsdev=fsroot,mount_tag=rootfs",
            "-fsdev", f"local,id=fsctl,path={_qemu_path(self.ctl)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=fsctl,mount_tag=ctl",
            "-fsdev", f"local,id=fsshare,path={_qemu_path(TOP)},security_model=none",
            "-device", "virtio-9p-pci,fsdev=fsshare,mount_tag=share",
            "-device", "virtio-rng-pci",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl0,path={_qemu_path(self.sock_path)},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl0,name=pathagent.ctl",
        ]

    def start(self, timeout: float = 240.0) -> "Guest":
        """Boot and wait until the control daemon answers; ``GuestError`` (with the console's tail) if
        qemu exits or ``timeout`` passes first."""
        if self.alive:
            return self
        if self._released:
            raise GuestError(f"guest {self.name} was closed; make a new Guest")
        for f in ("vmlinux", "initrd.cpio.gz", "rootfs/sbin/pathagent-init"):
            if not (LIO_DIR / f).exists():
                raise GuestError(f"{LIO_DIR / f} missing: {BUILD_HINT}")
        self.ctl.mkdir(parents=True, exist_ok=True)
        for p in (self.ctl / "ready", self.ctl / "guestd.log", self.console_path, self.pidfile, self.sock_path):
            p.unlink(missing_ok=True)
        t0 = time.monotonic()
        self.lab.add_tap(self.tap)
        self.lab.add_cleanup(f"guest-{self.name}-{self.offset}", self._kill_quietly)
        with open(self.qemu_log, "wb") as log:
            self._popen = subprocess.Popen(exec_argv(self.lab.bridge_ns, self.qemu_argv()), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(t0, timeout)
            self._connect()
            self._request("ping", wait_s=max(10.0, timeout - (time.monotonic() - t0)))
        except BaseException:
            self._kill_quietly()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float, timeout: float) -> None:
        while not (self.ctl / "ready").exists():
            assert self._popen is not None
            if self._popen.poll() is not None:
                raise GuestError(f"guest {self.name}: qemu exited (rc {self._popen.returncode}) before ready: "
                                 f"{self._qemu_log_tail()}", self.console_tail())
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"guest {self.name}: not ready after {timeout:.0f} s", self.console_tail())
            time.sleep(0.1)

    def _qemu_log_tail(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """Power off (the guest's daemon exits, PID 1 powers off, qemu ends); SIGKILL after ``timeout``."""
        if self.alive and not self._closed:
            try:
                self._request("poweroff", wait_s=min(10.0, timeout))
            except GuestError:
                pass
        if self._popen is not None:
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_quietly()

    def crash(self) -> None:
        """SIGKILL qemu: the guest dies at once, as a crashed gateway would (its tap goes too)."""
        self._kill_quietly()

    def close(self) -> None:
        """Stop (if running) and give the address back to the lab."""
        self.stop()
        self._release()

    def _kill_quietly(self) -> None:
        p = self._popen
        if p is not None and p.poll() is None:
            proc.kill(p.pid, QEMU)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._disconnect()
        self.lab.del_tap(self.tap)
        self.lab.remove_cleanup(f"guest-{self.name}-{self.offset}")

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.lab.release_guest_offset(self.offset)
            if self._sockdir:
                shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def console_tail(self, n: int = 40) -> str:
        try:
            lines = self.console_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def rss_kb(self) -> int:
        """qemu's resident set (kB), 0 when it is not running."""
        if not self.alive or self.pid is None:
            return 0
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    # --- network ---------------------------------------------------------------------------------------
    def link(self, up: bool) -> None:
        """Cut (``False``) or restore the guest's link: its tap goes down/up in the bridge namespace. The
        control channel is not on the network and keeps working."""
        self.lab.set_tap(self.tap, up)

    # --- control channel -------------------------------------------------------------------------------
    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock_path))
        self._sock = s
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, args=(s,), daemon=True,
                                        name=f"guest-{self.name}-reader")
        self._reader.start()

    def _disconnect(self) -> None:
        s, self._sock = self._sock, None
        self._closed = True
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._fail_pending()

    def _fail_pending(self) -> None:
        with self._plock:
            pending = list(self._pending.values())
            self._pending.clear()
        for ev, _slot in pending:
            ev.set()

    def _read_loop(self, s: socket.socket) -> None:
        buf = b""
        try:
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    with self._plock:
                        entry = self._pending.pop(msg.get("id"), None)
                    if entry is not None:
                        entry[1].append(msg)
                        entry[0].set()
        except OSError:
            pass
        self._closed = True
        self._fail_pending()

    def _request(self, op: str, wait_s: float, **fields: Any) -> Any:
        if self._closed or self._sock is None:
            raise GuestError(f"guest {self.name} is not running", self.console_tail())
        rid = next(self._ids)
        ev: threading.Event = threading.Event()
        slot: list[dict[str, Any]] = []
        with self._plock:
            self._pending[rid] = (ev, slot)
        data = (json.dumps({"id": rid, "op": op, **fields}) + "\n").encode()
        try:
            with self._wlock:
                self._sock.sendall(data)
        except (OSError, AttributeError) as e:
            with self._plock:
                self._pending.pop(rid, None)
            raise GuestError(f"guest {self.name}: {op}: control channel: {e}", self.console_tail()) from e
        if not ev.wait(wait_s):
            with self._plock:
                self._pending.pop(rid, None)
            raise GuestTimeout(f"guest {self.name}: {op} got no answer in {wait_s:.0f} s", self.console_tail())
        if not slot:
            raise GuestError(f"guest {self.name}: {op}: the guest went away (qemu "
                             f"{'running' if self.alive else 'gone'})", self.console_tail())
        msg = slot[0]
        if not msg.get("ok"):
            err = msg.get("error") or {}
            raise GuestCallError(str(err.get("type", "Exception")), str(err.get("message", "")),
                                 err.get("attrs") or {}, str(err.get("traceback", "")))
        return msg.get("result")

    def ping(self, timeout: float = 30.0) -> dict[str, Any]:
        r: dict[str, Any] = self._request("ping", wait_s=timeout)
        return r

    def exec(self, argv: Sequence[str], timeout: float = 120.0, env: Mapping[str, str | None] | None = None,
             input: str | None = None, cwd: str | None = None, check: bool = False) -> GuestResult:
        """Run ``argv`` in the guest and wait (``env`` is added to the daemon's environment; a None value
        unsets). ``GuestTimeout`` when it overruns ``timeout`` (its process group is killed)."""
        r = self._request("exec", wait_s=timeout + 60, argv=list(argv), env=dict(env or {}), stdin=input,
                          cwd=cwd, timeout=timeout)
        if r["timed_out"]:
            raise GuestTimeout(f"guest {self.name}: {list(argv)} overran {timeout:.0f} s",
                               stdout=r["stdout"], stderr=r["stderr"])
        res = GuestResult(int(r["rc"]), str(r["stdout"]), str(r["stderr"]))
        return res.check() if check else res

    def spawn(self, argv: Sequence[str], log: str = "/dev/null", env: Mapping[str, str | None] | None = None,
              cwd: str | None = None) -> int:
        """Start ``argv`` in the background in the guest (own session, stdout+stderr appended to the
        guest path ``log``); returns its guest pid."""
        r = self._request("spawn", wait_s=60, argv=list(argv), log=log, env=dict(env or {}), cwd=cwd)
        return int(r["pid"])

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """A spawned process's exit code, or None if it still runs after ``timeout``."""
        r = self._request("wait", wait_s=timeout + 60 if timeout is not None else 86400.0,
                          pid=pid, timeout=timeout)
        rc = r["rc"]
        return None if rc is None else int(rc)

    def signal(self, pid: int, sig: int | str = _signal.SIGTERM, group: bool = False) -> None:
        """Send ``sig`` (a number or a name such as ``"SIGSTOP"``) to a guest pid (its group with ``group``)."""
        self._request("signal", wait_s=60, pid=pid, sig=int(sig) if isinstance(sig, int) else sig, group=group)

    def call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """``fn`` (``"pkg.module:function"`` or ``"module:Class.method"``) called in the guest daemon's
        process with JSON ``args``/``kwargs``; its JSON result. A remote exception raises
        ``GuestCallError`` (type name, message, attrs). Waits up to ``call_timeout``."""
        return self.call_with(fn, args, kwargs, timeout=self.call_timeout)

    def call_with(self, fn: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  timeout: float = 300.0) -> Any:
        return self._request("call", wait_s=timeout, fn=fn, args=list(args), kwargs=dict(kwargs or {}))

    def read_file(self, path: str) -> bytes:
        r = self._request("read_file", wait_s=120, path=path)
        return base64.b64decode(r["data"])

    def read_text(self, path: str) -> str:
        return self.read_file(path).decode(errors="replace")

    def write_file(self, path: str, data: bytes | str, mode: int | None = None, append: bool = False,
                   mkdir: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._request("write_file", wait_s=120, path=path, data=base64.b64encode(raw).decode(), mode=mode,
                      append=append, mkdir=mkdir)


class GuestPool:
    """Guests on one lab, in per-guest directories under ``workdir``; ``boot`` several at once (they boot
    in parallel, one vCPU each); ``close`` stops every guest still running."""

    def __init__(self, lab: GatewayLab, workdir: str | os.PathLike[str], memory_mb: int = 384) -> None:
        self.lab = lab
        self.workdir = Path(workdir)
        self.memory_mb = memory_mb
        self.guests: list[Guest] = []
        self._n = itertools.count(1)

    def new(self, name: str | None = None, offset: int | None = None, **kw: Any) -> Guest:
        name = name or f"lio{next(self._n)}"
        kw.setdefault("memory_mb", self.memory_mb)
        g = Guest(self.lab, name, offset, self.workdir / name, **kw)
        self.guests.append(g)
        return g

    def boot(self, *names: str, timeout: float = 240.0, **kw: Any) -> list[Guest]:
        """Boot guests named ``names`` (one unnamed guest when none), concurrently."""
        guests = [self.new(n, **kw) for n in names] if names else [self.new(**kw)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(guests)) as ex:
            futs = [ex.submit(g.start, timeout) for g in guests]
            errors = [f.exception() for f in futs]
        failed = [e for e in errors if e is not None]
        if failed:
            for g in guests:
                g.close()
            raise failed[0]
        return guests

    def close(self) -> None:
        guests, self.guests = self.guests, []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(guests))) as ex:
            list(ex.map(lambda g: g.close(), guests))

    def __enter__(self) -> "GuestPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
