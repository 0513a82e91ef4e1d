"""The guard's confirmed deadline, shared with the agent's fencer through one page of memory.

While the agent does not pet it, the guard confirms the agent's session by itself (``plugins.guard.confirm``)
and moves its own deadline. When the agent thaws, its fencer thread must see that deadline before it
fences on its own (older) one, and it must see it without waiting on anything: the fencer waits on no call
that can block (docs/fencing.md). So the guard writes its confirmed deadline into a small file on a
memory-backed file system (``/dev/shm``), and the agent maps that file read-only once (on its confirmer
thread, at a pet); the fencer then reads the mapped page at check time: a memory read, no system call, no
lock, nothing that waits on a disk or another process.

The file: ``/dev/shm/pathagent-guard-S-H`` (``S``: hash of the state directory's real path, ``H``: the
config hash, so each guard has its own), one page, mode 0600, owned by the guard's uid. The guard keeps the
same inode for its whole life (a reader's mapping never goes stale while the guard runs) and removes the
file when it exits. A record (40 bytes at offset 0)::

    magic "PAGD" | version u32 | deadline f64 (CLOCK_BOOTTIME) | digest(session) 8 | digest(boot id) 8 | check 8

``check`` is a BLAKE2b digest of the 32 bytes before it: a torn read (the guard writing while the agent
reads) or garbage fails it and reads as "nothing proved" (``-inf``), which can only make the agent fence
sooner, never later. The session digest ties the deadline to one session (a deadline proved for another
session is worthless), the boot id to this boot (``CLOCK_BOOTTIME`` starts again at a reboot). A reader
refuses a file that is not a regular file owned by root or its own uid, or that others may write.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct

SHM_DIR = "/dev/shm"
SIZE = mmap.PAGESIZE
MAGIC = b"PAGD"
VERSION = 1
_HEAD = struct.Struct("<4sId8s8s")
RECORD = _HEAD.size + 8
NONE = float("-inf")


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def path(state_dir: str, h: str, base: str = SHM_DIR) -> str:
    """The shared-deadline file of the guard of config hash ``h`` for ``state_dir``."""
    s = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:12]
    return os.path.join(base, f"pathagent-guard-{s}-{h}")


def pack(deadline: float, session: str, boot: str) -> bytes:
    """A record saying: ``session`` is proved until ``deadline`` on boot ``boot``. Pure."""
    head = _HEAD.pack(MAGIC, VERSION, deadline, digest(session), digest(boot))
    return head + hashlib.blake2b(head, digest_size=8).digest()


def unpack(raw: bytes, session: str, boot: str) -> float:
    """The deadline a record proves for ``session`` on boot ``boot``; ``-inf`` for anything else (no
    record, a torn or foreign one, another session, another boot). Pure."""
    if len(raw) < RECORD or not session:
        return NONE
    head, check = raw[:_HEAD.size], raw[_HEAD.size:RECORD]
    if hashlib.blake2b(head, digest_size=8).digest() != check:
        return NONE
    magic, version, deadline, sd, bd = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or sd != digest(session) or bd != digest(boot):
        return NONE
    return float(deadline)


class Writer:
    """The guard's side: creates the file, maps it read-write, publishes and clears the record."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.boot = boot_id()
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError(f"{file} is not a regular file of uid {os.getuid()}")
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._ino = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self.clear()

    def publish(self, deadline: float, session: str) -> None:
        """A memory write of one record (no system call)."""
        self._map[:RECORD] = pack(deadline, session, self.boot)

    def clear(self) -> None:
        self._map[:RECORD] = bytes(RECORD)

    def close(self) -> None:
        """Clear the record and remove the file (if it is still ours)."""
        try:
            self.clear()
            self._map.close()
        except (ValueError, OSError):
            pass
        try:
            st = os.stat(self.file, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.file)
        except OSError:
            pass


class Reader:
    """The agent's side: ``refresh()`` (maps the file; may make system calls: call it off the fence path)
    and ``read(session)`` (a memory read only, safe at any time from any thread)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.boot = boot_id()
        self._map: mmap.mmap | None = None
        self._ino: tuple[int, int] | None = None

    def refresh(self) -> None:
        """Map the file, or map it again when the guard was replaced (another inode); unmap when it is gone
        or not trustworthy."""
        try:
            fd = os.open(self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self._drop()
            return
        try:
            st = os.fstat(fd)
            ok = (stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.getuid()) and not st.st_mode & 0o022
                  and st.st_size >= RECORD)
            if not ok:
                self._drop()
                return
            if (st.st_dev, st.st_ino) == self._ino and self._map is not None:
                return
            m = mmap.mmap(fd, SIZE if st.st_size >= SIZE else RECORD, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            self._drop()
            return
        finally:
            os.close(fd)
        # the old mapping is not closed: a concurrent read() may hold it; it goes with its last reference
        self._map, self._ino = m, (st.st_dev, st.st_ino)

    def _drop(self) -> None:
        self._map, self._ino = None, None

    def read(self, session: str) -> float:
        """The guard's confirmed deadline for ``session`` (``-inf`` when none). Tries a torn read again
        twice; never waits."""
        m = self._map
        if m is None:
            return NONE
        for _ in range(3):
            raw = m[:RECORD]
            v = unpack(raw, session, self.boot)
            if v != NONE or raw[:4] != MAGIC:
                return v
        return NONE

