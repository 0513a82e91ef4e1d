"""A userspace iSCSI initiator for tests and the demo: a small ctypes binding of libiscsi (``libiscsi.so.7``,
Debian package ``libiscsi7``, pulled by ``libiscsi-bin``) plus wrappers around the libiscsi-bin CLIs.

``Session`` logs in to one LUN and runs SCSI commands synchronously (INQUIRY, READ CAPACITY(16),
READ(16), WRITE(16), SYNCHRONIZE CACHE(10), TEST UNIT READY). With ``netns``, every libiscsi call runs in a
dedicated thread inside that network namespace (the socket, and libiscsi's automatic reconnects, live
there). Errors raise ``IscsiError`` (login/transport, with libiscsi's message) or ``ScsiError`` (a SCSI
status other than GOOD, with the sense key and ASC/ASCQ).

Facts the offsets rely on (libiscsi 1.19.0, x86_64): ``struct scsi_task`` has ``status`` (int32) at 0,
``sense.key`` at 52, ``sense.ascq`` (ASC<<8|ASCQ) at 56, ``datain.size`` (int32) at 64 and ``datain.data``
(pointer) at 72.
"""
from __future__ import annotations

import ctypes
import re
import struct
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from lab.netns import NetnsThread, exec_argv

T = TypeVar("T")
DEFAULT_INITIATOR = "iqn.2016-05.io.pathagent.test:initiator"
#: the LUN sessions use unless told: tgt serves a disk on LUN 1 (its LUN 0 is the controller), LIO on LUN 0;
#: a test of the LIO backend sets it to 0 for its duration
DEFAULT_LUN = 1

_lib: Any = None


class UnmapDescriptor(ctypes.Structure):
    """libiscsi's ``struct unmap_list``: one (LBA, number of blocks) of an UNMAP."""
    _fields_ = [("lba", ctypes.c_uint64), ("num", ctypes.c_uint32)]


@dataclass(frozen=True)
class Provisioning:
    """Logical block provisioning as the LUN reports it: ``lbpme`` (READ CAPACITY(16): thin provisioned),
    ``lbprz`` (unmapped blocks read as zeros), and from VPD 0xB2 ``lbpu`` (UNMAP supported), ``lbpws``
    (WRITE SAME(16) with UNMAP supported); ``max_unmap`` (VPD 0xB0: blocks per UNMAP, 0 when not reported)."""

    lbpme: bool
    lbprz: bool
    lbpu: bool
    lbpws: bool
    max_unmap: int


def lib() -> Any:
    """libiscsi with the prototypes this module uses (loaded once)."""
    global _lib
    if _lib is not None:
        return _lib
    L = ctypes.CDLL("libiscsi.so.7", use_errno=True)
    vp, cp, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64
    protos: dict[str, tuple[Any, list[Any]]] = {
        "iscsi_create_context": (vp, [cp]),
        "iscsi_destroy_context": (i, [vp]),
        "iscsi_set_targetname": (i, [vp, cp]),
        "iscsi_set_session_type": (i, [vp, i]),
        "iscsi_set_header_digest": (i, [vp, i]),
        "iscsi_set_initiator_username_pwd": (i, [vp, cp, cp]),
        "iscsi_set_target_username_pwd": (i, [vp, cp, cp]),
        "iscsi_set_timeout": (i, [vp, i]),
        "iscsi_set_noautoreconnect": (None, [vp, i]),
        "iscsi_set_reconnect_max_retries": (None, [vp, i]),
        "iscsi_full_connect_sync": (i, [vp, cp, i]),
        "iscsi_logout_sync": (i, [vp]),
        "iscsi_get_error": (cp, [vp]),
        "iscsi_inquiry_sync": (vp, [vp, i, i, i, i]),
        "iscsi_readcapacity16_sync": (vp, [vp, i]),
        "iscsi_read16_sync": (vp, [vp, i, u64, u32, i, i, i, i, i, i]),
        "iscsi_write16_sync": (vp, [vp, i, u64, cp, u32, i, i, i, i, i, i]),
        "iscsi_synchronizecache10_sync": (vp, [vp, i, i, i, i, i]),
        "iscsi_testunitready_sync": (vp, [vp, i]),
        "iscsi_unmap_sync": (vp, [vp, i, i, i, ctypes.POINTER(UnmapDescriptor), i]),
        "scsi_free_scsi_task": (None, [vp]),
        "scsi_create_task": (vp, [i, cp, i, i]),
        "iscsi_scsi_command_sync": (vp, [vp, i, vp, vp]),
    }
    for name, (res, args) in protos.items():
        fn = getattr(L, name)
        fn.restype = res
        fn.argtypes = args
    _lib = L
    return L


class IscsiError(Exception):
    """Login or transport failure (libiscsi's own message)."""


class ScsiError(IscsiError):
    """A SCSI command completed with a status other than GOOD."""

    def __init__(self, what: str, status: int, sense_key: int, ascq: int) -> None:
        self.status, self.sense_key, self.ascq = status, sense_key, ascq
        super().__init__(f"{what}: SCSI status 0x{status:02x} sense key 0x{sense_key:x} ASC/ASCQ 0x{ascq:04x}")


@dataclass(frozen=True)
class Inquiry:
    vendor: str
    product: str
    revision: str


class Session:
    """One logged-in iSCSI session to ``iqn`` LUN ``lun`` at ``portal`` (``ip:port``).

    ``chap`` = (user, password) for CHAP; ``mutual`` = (user, password) the target must prove (mutual
    CHAP). ``timeout`` bounds each command. Use as a context manager (logs out and frees the context)."""

    def __init__(self, portal: str, iqn: str, lun: int | None = None, initiator: str = DEFAULT_INITIATOR,
                 chap: tuple[str, str] | None = None, mutual: tuple[str, str] | None = None,
                 netns: str | None = None, timeout: int = 10, reconnect: bool = True) -> None:
        self.portal, self.iqn, self.lun = portal, iqn, DEFAULT_LUN if lun is None else lun
        self._thread = NetnsThread(netns) if netns else None
        self._ctx: int | None = None
        try:
            self._run(self._connect, initiator, chap, mutual, timeout, reconnect)
        except BaseException:
            self.close()
            raise

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._thread.call(fn, *args) if self._thread else fn(*args)

    def _connect(self, initiator: str, chap: tuple[str, str] | None, mutual: tuple[str, str] | None,
                 timeout: int, reconnect: bool) -> None:
        L = lib()
        ctx = L.iscsi_create_context(initiator.encode())
        if not ctx:
            raise IscsiError("iscsi_create_context failed")
        self._ctx = ctx
        L.iscsi_set_targetname(ctx, self.iqn.encode())
        L.iscsi_set_session_type(ctx, 2)     # ISCSI_SESSION_NORMAL
        L.iscsi_set_header_digest(ctx, 0)    # ISCSI_HEADER_DIGEST_NONE
        L.iscsi_set_timeout(ctx, timeout)
        if not reconnect:
            L.iscsi_set_noautoreconnect(ctx, 1)
        else:
            L.iscsi_set_reconnect_max_retries(ctx, 20)
        if chap:
            L.iscsi_set_initiator_username_pwd(ctx, chap[0].encode(), chap[1].encode())
        if mutual:
            L.iscsi_set_target_username_pwd(ctx, mutual[0].encode(), mutual[1].encode())
        if L.iscsi_full_connect_sync(ctx, self.portal.encode(), self.lun) != 0:
            raise IscsiError(f"login to {self.iqn} at {self.portal} failed: {self._error()}")

    def _error(self) -> str:
        if self._ctx is None:
            return "no context"
        msg = lib().iscsi_get_error(self._ctx)
        return msg.decode(errors="replace") if msg else "unknown error"

    def _task(self, what: str, fn: Callable[[], int | None]) -> bytes:
        """Run one command; a UNIT ATTENTION (e.g. 29/00 after a reconnect to another gateway) is retried,
        as the kernel's SCSI layer does."""
        for attempt in range(4):
            try:
                return self._task_once(what, fn)
            except ScsiError as e:
                if e.sense_key != 0x6 or attempt == 3:
                    raise
        raise AssertionError("unreachable")

    def _task_once(self, what: str, fn: Callable[[], int | None]) -> bytes:
        task = fn()
        if not task:
            raise IscsiError(f"{what}: {self._error()}")
        try:
            status = ctypes.c_int32.from_address(task).value
            if status != 0:
                key = ctypes.c_int32.from_address(task + 52).value
                ascq = ctypes.c_int32.from_address(task + 56).value
                raise ScsiError(what, status, key, ascq)
            size = ctypes.c_int32.from_address(task + 64).value
            data = ctypes.c_void_p.from_address(task + 72).value
            return ctypes.string_at(data, size) if data and size > 0 else b""
        finally:
            lib().scsi_free_scsi_task(task)

    # SCSI commands -----------------------------------------------------------------------------

    def inquiry(self) -> Inquiry:
        d = self._run(self._task, "INQUIRY", lambda: lib().iscsi_inquiry_sync(self._ctx, self.lun, 0, 0, 255))
        def s(b: bytes) -> str:
            return b.decode("ascii", "replace").strip()
        return Inquiry(vendor=s(d[8:16]), product=s(d[16:32]), revision=s(d[32:36]))

    def serial(self) -> str:
        """VPD page 0x80 (unit serial number)."""
        d = self._run(self._task, "INQUIRY VPD 0x80",
                      lambda: lib().iscsi_inquiry_sync(self._ctx, self.lun, 1, 0x80, 255))
        n = struct.unpack(">H", d[2:4])[0]
        return d[4:4 + n].decode("ascii", "replace").strip().rstrip("\0")     # LIO pads it with NULs

    def device_ids(self) -> list[bytes]:
        """VPD page 0x83 designators (raw identifier bytes)."""
        return [v for _, v in self.designators()]

    def designators(self) -> list[tuple[int, bytes]]:
        """VPD page 0x83 designators as (designator type, identifier): 1 T10 vendor, 3 NAA, 4 relative
        target port, 5 target port group, 8 SCSI name."""
        d = self._run(self._task, "INQUIRY VPD 0x83",
                      lambda: lib().iscsi_inquiry_sync(self._ctx, self.lun, 1, 0x83, 1024))
        end = 4 + struct.unpack(">H", d[2:4])[0]
        out, i = [], 4
        while i + 4 <= end:
            n = d[i + 3]
            out.append((d[i + 1] & 0x0F, d[i + 4:i + 4 + n]))
            i += 4 + n
        return out

    def relative_port(self) -> int | None:
        """The relative target port id of the port this session is on (VPD 0x83 type 4)."""
        for t, v in self.designators():
            if t == 4 and len(v) == 4:
                return int(struct.unpack(">I", v)[0] & 0xFFFF)
        return None

    def report_target_port_groups(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0x0A): per group (asymmetric access
        state, group id, relative port ids)."""
        n = 1024
        cdb = bytes([0xA3, 0x0A, 0, 0, 0, 0]) + struct.pack(">I", n) + bytes([0, 0])

        def run() -> int | None:
            L = lib()
            task = L.scsi_create_task(len(cdb), cdb, 1, n)           # SCSI_XFER_READ
            if not task:
                return None
            return L.iscsi_scsi_command_sync(self._ctx, self.lun, task, None)  # type: ignore[no-any-return]
        d = self._run(self._task, "REPORT TARGET PORT GROUPS", run)
        end = 4 + struct.unpack(">I", d[:4])[0]
        out, i = [], 4
        while i + 8 <= end:
            state, gid, count = d[i] & 0x0F, struct.unpack(">H", d[i + 2:i + 4])[0], d[i + 7]
            ports = tuple(struct.unpack(">H", d[i + 8 + 4 * k + 2:i + 8 + 4 * k + 4])[0] for k in range(count))
            out.append((state, gid, ports))
            i += 8 + 4 * count
        return out

    def capacity(self) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(16)."""
        d = self._run(self._task, "READ CAPACITY(16)", lambda: lib().iscsi_readcapacity16_sync(self._ctx, self.lun))
        last, bs = struct.unpack(">QI", d[:12])
        return last + 1, bs

    def read(self, lba: int, blocks: int, block_size: int = 512) -> bytes:
        n = blocks * block_size
        if n <= 0:
            raise ValueError("refusing a zero-length READ (it crashes tgtd)")
        return self._run(self._task, f"READ(16) lba {lba}",
                         lambda: lib().iscsi_read16_sync(self._ctx, self.lun, lba, n, block_size, 0, 0, 0, 0, 0))

    def read_zero_length(self) -> None:
        """READ(16) with transfer length 0: a valid command that makes tgt + bs_rbd abort (librbd assert).
        For tests of the gateway's recovery only."""
        try:
            self._run(self._task, "zero-length READ(16)",
                      lambda: lib().iscsi_read16_sync(self._ctx, self.lun, 0, 0, 512, 0, 0, 0, 0, 0))
        except IscsiError:
            pass

    def write(self, lba: int, data: bytes, block_size: int = 512, fua: bool = False) -> None:
        """WRITE(16); ``fua`` sets Force Unit Access (the target acknowledges only once the data is stable)."""
        if not data or len(data) % block_size:
            raise ValueError("data must be a non-empty multiple of the block size")
        self._run(self._task, f"WRITE(16) lba {lba}",
                  lambda: lib().iscsi_write16_sync(self._ctx, self.lun, lba, data, len(data), block_size,
                                                   0, 0, int(fua), 0, 0))

    def unmap(self, lba: int, blocks: int) -> None:
        """UNMAP(10) of ``blocks`` blocks from ``lba`` (one descriptor)."""
        desc = (UnmapDescriptor * 1)(UnmapDescriptor(lba, blocks))
        self._run(self._task, f"UNMAP lba {lba}+{blocks}",
                  lambda: lib().iscsi_unmap_sync(self._ctx, self.lun, 0, 0, desc, 1))

    def provisioning(self) -> Provisioning:
        rc = self._run(self._task, "READ CAPACITY(16)",
                       lambda: lib().iscsi_readcapacity16_sync(self._ctx, self.lun))
        vpd = self._run(self._task, "INQUIRY VPD 0xB2",
                        lambda: lib().iscsi_inquiry_sync(self._ctx, self.lun, 1, 0xB2, 255))
        try:
            limits = self._run(self._task, "INQUIRY VPD 0xB0",
                               lambda: lib().iscsi_inquiry_sync(self._ctx, self.lun, 1, 0xB0, 255))
        except ScsiError:
            limits = b""
        return Provisioning(lbpme=bool(rc[14] & 0x80), lbprz=bool(rc[14] & 0x40), lbpu=bool(vpd[5] & 0x80),
                            lbpws=bool(vpd[5] & 0x40),
                            max_unmap=struct.unpack(">I", limits[20:24])[0] if len(limits) >= 24 else 0)

    def sync(self) -> None:
        self._run(self._task, "SYNCHRONIZE CACHE(10)",
                  lambda: lib().iscsi_synchronizecache10_sync(self._ctx, self.lun, 0, 0, 0, 0))

    def test_unit_ready(self) -> None:
        self._run(self._task, "TEST UNIT READY", lambda: lib().iscsi_testunitready_sync(self._ctx, self.lun))

    def set_timeout(self, seconds: int) -> None:
        """The timeout of the commands sent from now on (libiscsi's ``iscsi_set_timeout``)."""
        self._run(lambda: lib().iscsi_set_timeout(self._ctx, seconds))

    # teardown -----------------------------------------------------------------------------------

    def _close(self, logout: bool) -> None:
        if self._ctx:
            L = lib()
            L.iscsi_set_noautoreconnect(self._ctx, 1)
            if logout:
                L.iscsi_logout_sync(self._ctx)
            L.iscsi_destroy_context(self._ctx)
            self._ctx = None

    def close(self, logout: bool = True) -> None:
        """Log out (unless ``logout`` is false: after a failure, when the target may never answer) and free
        the context (which closes the connection)."""
        try:
            if self._ctx:
                self._run(self._close, logout)
        finally:
            if self._thread:
                self._thread.close()
                self._thread = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# libiscsi-bin CLIs ------------------------------------------------------------------------------

def url(portal: str, iqn: str, lun: int = 1, chap: tuple[str, str] | None = None) -> str:
    """An ``iscsi://`` URL. With ``chap`` it contains the password: never log it."""
    cred = f"{chap[0]}%{chap[1]}@" if chap else ""
    return f"iscsi://{cred}{portal}/{iqn}/{lun}"


def cli(tool: str, *args: str, netns: str | None = None, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    argv = ["timeout", str(timeout), tool, *args]
    return subprocess.run(exec_argv(netns, argv) if netns else argv, capture_output=True, text=True,
                          timeout=timeout + 5)


def inq(portal: str, iqn: str, netns: str | None = None, initiator: str = DEFAULT_INITIATOR,
        chap: tuple[str, str] | None = None, timeout: float = 5, lun: int | None = None) -> Inquiry | None:
    """``iscsi-inq``: the standard INQUIRY of the LUN (``DEFAULT_LUN``), or None when the login or command
    failed."""
    r = cli("iscsi-inq", "-i", initiator, url(portal, iqn, DEFAULT_LUN if lun is None else lun, chap),
            netns=netns, timeout=timeout)
    if r.returncode != 0:
        return None
    f = dict(re.findall(r"^(Vendor|Product|Revision):(.*)$", r.stdout, re.M))
    return Inquiry(f.get("Vendor", "").strip(), f.get("Product", "").strip(), f.get("Revision", "").strip())


def discover(portal: str, netns: str | None = None, initiator: str = DEFAULT_INITIATOR,
             timeout: float = 5) -> list[tuple[str, str]]:
    """``iscsi-ls``: (target IQN, portal) pairs that SendTargets discovery at ``portal`` returns."""
    r = cli("iscsi-ls", "-i", initiator, f"iscsi://{portal}", netns=netns, timeout=timeout)
    return re.findall(r"^Target:(\S+) Portal:(\S+)", r.stdout, re.M)
