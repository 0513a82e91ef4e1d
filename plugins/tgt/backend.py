"""``TgtBackend``: the ``tgt`` target backend (one userspace tgtd per node, LUNs on RBD through bs_rbd).

Options and orchestration: ``export``/``unexport`` record the intent, then run the ops of
``plugins.tgt.converge`` under one lock; ``exported`` and ``logged_in`` read tgtd without the lock and never
start it; ``fence`` SIGKILLs tgtd without the lock, from any thread or process. A tgtd that died is restarted
empty and the agent is woken to re-export. The full description is docs/backend-tgt.md.

Cost per call (docs/backend-tgt.md, "Cost"): ``export``/``unexport`` plan from a cached view of tgtd's
configuration and of the record (``_View``), kept up to date with the ops that succeeded and read again
from tgtd whenever it cannot be trusted; the record is the base file plus a journal of one line per change
(``RecordStore``), compacted into the base once the journal is as long as the record.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from typing import Iterable, Iterator, Mapping

from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.errors import BackendError, PermanentBackendError, TransientBackendError
from plugins.options import Options
from plugins.tgt import converge
from plugins.tgt.converge import (AddPortal, Call, CloseConnection, DeletePortal, DeleteTarget, NewAccount, Op, Probe,
                                  Settings, additive, apply_ops, configuration, ops_for, prune_ops)
from plugins.tgt.record import Entry, Record, RecordFile, Stored, check_conflicts
from agent.core.targetspec import portal_of
from plugins.tgt.tgtadm import Tgtadm, TgtadmError, TgtState, parse_portals
from plugins.tgt.tgtd import Tgtd, TgtdConfig, TgtdSupervisor

log = logging.getLogger(__name__)

#: how long ``fence`` waits for the killed tgtd to be gone (a SIGKILL takes effect in milliseconds)
FENCE_WAIT = 1.0

#: tgtadm's words for a connection that is already gone (closing it again is fine)
GONE = ("can't find the connection", "can't find the session", "can't find the target")

#: the cached view of tgtd is read again from tgtd at the first export/unexport after this many seconds
VIEW_MAX_AGE = 30.0
#: the journal is compacted into the base record once it has this many lines and as many as the record entries
JOURNAL_MIN = 64


# ------------------------------------------------------------------------------------------------ the record

FileKey = tuple[int, int, int]            # (inode, size, mtime in ns) of a file
Stamp = tuple[FileKey | None, FileKey | None]   # of the base record and of the journal


def file_key(path: str) -> FileKey | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def tag_of(key: FileKey | None) -> str:
    """The name of one version of the base record (a replaced file is a new inode), written into each
    journal line: a line counts only on the base it was appended to."""
    return "" if key is None else "%d:%d:%d" % key


def journal_line(tag: str, tgtd: str, fence: str, disk: str, entry: Entry | None) -> bytes:
    """One journal line: ``disk``'s entry is now ``entry`` (``None``: removed) in tgtd ``tgtd``."""
    return json.dumps({"base": tag, "tgtd": tgtd, "fence": fence, "disk": disk,
                       "entry": None if entry is None else entry.to_json()}, sort_keys=True).encode() + b"\n"


def replay(base: Stored, tag: str, data: bytes) -> tuple[Stored, int, bool]:
    """The record: ``base`` (the base file, version ``tag``) with the journal ``data`` applied in order.
    Returns it, the number of journal lines (all of them, stale ones too) and whether the journal ends in a
    torn line (an append cut short: ignored, and the next write compacts instead of appending after it).
    A line counts only if it names this version of the base and the same tgtd (a line left over from before
    a compaction or a restart is stale: the base already has it, or it describes a tgtd that is gone).
    Pure."""
    disks = dict(base.disks)
    fence = base.fence
    torn = False
    chunks = data.split(b"\n")
    complete, tail = chunks[:-1], chunks[-1]
    lines = 0
    for raw in complete:
        lines += 1
        try:
            d = json.loads(raw)
            if d.get("base") != tag or not tag or d.get("tgtd") != base.tgtd or not base.tgtd:
                continue
            disk = str(d["disk"])
            if d.get("entry") is None:
                disks.pop(disk, None)
            else:
                disks[disk] = Entry.from_json(disk, d["entry"])
            fence = str(d.get("fence", fence))
        except (ValueError, KeyError, TypeError, AttributeError):
            torn = True          # not one of ours (a line merged with a torn one): stop trusting the journal
            break
    if tail:
        torn = True
        lines += 1
    return Stored(tgtd=base.tgtd, fence=fence, disks=disks), lines, torn


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The record as read: ``stored`` (base + journal), the base's ``tag``, the journal's ``lines``, whether
    it ends ``torn``, and the ``stamp`` of both files when read."""

    stored: Stored
    tag: str
    lines: int
    torn: bool
    stamp: Stamp


class RecordStore:
    """The record: the base file (``RecordFile``, ``exports.json``) and its journal (``exports.log``, mode
    0600: entries hold CHAP secrets), one JSON line per changed disk appended by ``append``. ``save``
    replaces the base with the whole record and then removes the journal (a compaction); a journal line
    names the version of the base it extends, so a journal that outlived a compaction (a crash in between)
    is stale, not replayed. Readers (``load``) take no lock: a base replaced under the read is read
    again."""

    def __init__(self, base: RecordFile, journal: str) -> None:
        self.base = base
        self.journal = journal

    def stamp(self) -> Stamp:
        return file_key(self.base.path), file_key(self.journal)

    def load(self) -> Loaded:
        """``PermanentBackendError`` when the base is unreadable; ``TransientBackendError`` when it keeps
        changing under the read."""
        for _ in range(5):
            before = file_key(self.base.path)
            stored = self.base.load()
            try:
                with open(self.journal, "rb") as f:
                    data = f.read()
                    st = os.fstat(f.fileno())
                    jkey: FileKey | None = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                data, jkey = b"", None
            except OSError as e:
                raise TransientBackendError(f"tgt record journal {self.journal}: {e.strerror or e}") from None
            if file_key(self.base.path) == before:
                if jkey is not None and jkey[1] != len(data):     # appended to while we read it: read again
                    continue
                rec, lines, torn = replay(stored, tag_of(before), data)
                return Loaded(rec, tag_of(before), lines, torn, (before, jkey))
        raise TransientBackendError(f"tgt record {self.base.path} keeps changing under the read", retry_after=0.2)

    def save(self, tgtd: str | None, fence: str, disks: Mapping[str, Entry]) -> tuple[Stamp, str]:
        """Replace the base with ``disks`` and remove the journal; returns the new stamp and the base's tag.
        (Under the state dir's lock.)"""
        self.base.save(tgtd, fence, disks)
        key = file_key(self.base.path)
        try:
            os.unlink(self.journal)
        except FileNotFoundError:
            pass
        except OSError as e:           # its lines name the old base: stale, never replayed
            log.warning("tgt: cannot remove the record journal %s: %s", self.journal, e.strerror or e)
        return (key, file_key(self.journal)), tag_of(key)

    def append(self, tag: str, tgtd: str, fence: str, disk: str, entry: Entry | None) -> Stamp:
        """Append one line (``journal_line``) and return the new stamp. (Under the state dir's lock.)"""
        line = journal_line(tag, tgtd, fence, disk, entry)
        try:
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise TransientBackendError(f"tgt record journal {self.journal}: {e.strerror or e}") from None
        return file_key(self.base.path), (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass
class _View:
    """What this instance knows of its tgtd without asking it: tgtd's configuration (``state``, sessions
    left out) and the record, as read from tgtd and the files at ``read_at`` and changed since by the ops
    and writes of this instance that succeeded. Trusted only while tgtd is the same instance (``ident``),
    the fence mark is ``mark``, the record files are as this instance left them (``stamp``), no op failed
    or had an unknown outcome since (a failure forgets the view), ``exported()`` found tgtd as the view
    expects (``doubts``), and for ``VIEW_MAX_AGE`` at most."""

    ident: str
    mark: str
    fence: str                   # the record's fence field
    tag: str                     # the base record's version (journal lines name it)
    stamp: Stamp
    record: Record
    state: TgtState
    lines: int                   # journal lines
    appendable: bool             # the base describes this tgtd and the journal is not torn
    read_at: float
    doubts: int


@dataclasses.dataclass(frozen=True)
class _ExportPlan:
    prev: Entry | None
    entry: Entry
    ops: list[Op]
    reopen: bool
    done: bool                   # tgtd has the entry already: nothing to do
    fast: bool                   # the ops only add to tgtd (``converge.additive``): no fresh show needed


class TgtBackend(TargetBackend):
    """See docs/backend-tgt.md. ``export``/``unexport`` are idempotent and serialised by one lock;
    ``exported``, ``logged_in`` and ``fence`` never take it."""

    config_keys: Mapping[str, str] = {
        "tgtd": "path of the tgtd binary (default: tgtd on PATH, else /usr/sbin/tgtd)",
        "tgtadm": "path of the tgtadm binary (default: tgtadm on PATH, else /usr/sbin/tgtadm)",
        "control_port": "tgtd control port (tgtd -C); the socket is {state_dir}/tgt/socket.<port> (default 0)",
        "listen": "an address tgtd always listens on (port = [target] port), besides the path IPs "
                  "(default: none; not for production: see docs/backend-tgt.md)",
        "io_threads": "I/O threads per LUN (tgtd -t, default 4)",
        "vendor_id": "SCSI vendor id of every LUN, at most 8 characters (default PATHAGNT); "
                     "the same on every node",
        "product_id": "SCSI product id, at most 16 characters (default RBD)",
        "product_rev": "SCSI product revision, at most 4 characters (default 0001)",
        "ceph_timeout": "seconds: tgtd's client_mount_timeout / rados_mon_op_timeout / rados_osd_op_timeout "
                        "for bs_rbd, and the extra time allowed to a LUN add (default 5)",
        "rbd_cache": "librbd cache inside tgtd (default false: writes are acknowledged by the OSDs)",
        "nonlocal_bind": "set net.ipv4/ipv6.ip_nonlocal_bind=1 in this network namespace so that portals can "
                         "listen on a path IP before it is up (default true)",
        "command_timeout": "seconds allowed per tgtadm call (default 10)",
        "show_timeout": "seconds exported() waits for tgtd to answer before it reports an error (default 2)",
        "watch": "restart tgtd (empty) as soon as it exits and wake the agent to re-export (a watcher thread; "
                 "default true); false: at the next export",
    }

    def __init__(self, context: PluginContext) -> None:
        """Reads ``[target.tgt]`` (``ConfigError`` listing every bad key). Starts nothing: the guard process
        and check-config construct it too."""
        o = Options("target.tgt", context.options)
        self.dir = os.path.join(context.state_dir, "tgt")
        self.port = int(context.port)
        tgtd_bin = o.text("tgtd", "") or shutil.which("tgtd") or "/usr/sbin/tgtd"
        tgtadm_bin = o.text("tgtadm", "") or shutil.which("tgtadm") or "/usr/sbin/tgtadm"
        control_port = o.integer("control_port", 0, 0, 65535)
        listen = o.text("listen", "", 45)
        io_threads = o.integer("io_threads", 4, 1, 128)
        vendor_id = o.text("vendor_id", "PATHAGNT", 8, ",=")
        product_id = o.text("product_id", "RBD", 16, ",=")
        product_rev = o.text("product_rev", "0001", 4, ",=")
        self.ceph_timeout = o.number("ceph_timeout", 5, 1, 60)
        rbd_cache = o.flag("rbd_cache", False)
        nonlocal_bind = o.flag("nonlocal_bind", True)
        self.command_timeout = o.number("command_timeout", 10, 1, 300)
        self.show_timeout = o.number("show_timeout", 2, 0.1, 60)
        self.watch = o.flag("watch", True)
        # the data path runs as this node's own Ceph client, [ceph] data_client_id (so that a failed node can
        # be fenced alone: docs/fencing.md); the node name may be known only later (from Consul), so bsopts are
        # made at each export; a process that never exports (the guard, check-config) uses client_id
        conf = context.ceph.conf
        client_id = context.ceph.data_id(context.node) if context.node else context.ceph.client_id
        self._ceph = context.ceph
        self._node = context.current_node
        if any(";" in v for v in (conf, client_id, context.ceph.data_client_id)):
            o.problems.append(("ceph.conf", "the tgt backend needs conf, client_id and data_client_id without ';' "
                                            "(bs_rbd options)"))
        socket = os.path.join(self.dir, "socket")
        if len(socket) + 8 > 107:
            o.problems.append(("state.dir", f"too long for tgtd's unix socket {socket}.N"))
        o.done()
        self.settings = Settings(port=self.port, listen=listen, vendor_id=vendor_id, product_id=product_id,
                                 product_rev=product_rev, bsopts=f"conf={conf};id={client_id}")
        self.tgtadm = Tgtadm(tgtadm_bin, control_port, socket, self.command_timeout)
        self.tgtd = TgtdSupervisor(self.dir, TgtdConfig(tgtd_bin, control_port, io_threads, listen, self.port,
                                                        self.ceph_timeout, rbd_cache, nonlocal_bind), self.tgtadm)
        self.records = RecordFile(os.path.join(self.dir, "exports.json"))
        self.store = RecordStore(self.records, os.path.join(self.dir, "exports.log"))
        self._probe = context.ceph_probe
        self._wake = context.wake
        self._lock = threading.RLock()             # export, unexport and the watcher's restarts
        self._held = False                         # the state dir's lock is held (under _lock)
        self._watcher_lock = threading.Lock()      # starting the watcher (exported() never waits for _lock)
        self._closing = threading.Event()
        self._wakeup: tuple[int, int] | None = None   # pipe that wakes the watcher on close()
        self._watcher: threading.Thread | None = None
        self._view: _View | None = None           # under _lock; read by exported() under _view_lock
        self._view_lock = threading.Lock()         # the view's contents while they change (never held for I/O)
        self._doubts = 0                           # exported() found tgtd other than the view expects
        self._journaled = False                    # this instance appended to the journal (close compacts)

    def _settings_now(self) -> Settings:
        """``settings`` with bs_rbd's ``id`` = this node's data client id, once the node name is known."""
        node = self._node()
        if not node:
            return self.settings
        return dataclasses.replace(self.settings, bsopts=f"conf={self._ceph.conf};id={self._ceph.data_id(node)}")

    # ---------------------------------------------------------------- the ABC

    def exported(self) -> frozenset[PathKey]:
        """Recorded paths that the running tgtd serves (target with LUN 1 on the image, and the path's
        portal). No tgtd: nothing. Never starts tgtd; ``TransientBackendError`` when it does not answer
        within ``show_timeout``."""
        t = self.tgtd.current()
        if t is None:
            return frozenset()
        self._ensure_watcher()
        record = self.store.load().stored.disks_for(t.ident)
        if not record:
            return frozenset()
        try:
            state = self.tgtadm.show(accounts=False, timeout=self.show_timeout)
        except TgtadmError:
            if self.tgtd.current() != t:       # it ended under the call: nothing of it is served
                return frozenset()
            raise
        out = converge.served(record, state, self.port)
        self._check_view(t.ident, out)
        return out

    def logged_in(self) -> Mapping[str, frozenset[str]]:
        """Initiator names with a session on each recorded disk's target of the running tgtd, by disk id
        (one ``tgtadm --op show`` of the targets, without the lock). No tgtd: nobody. Never starts tgtd;
        ``TransientBackendError`` when it does not answer within ``show_timeout``."""
        t = self.tgtd.current()
        if t is None:
            return {}
        record = self.store.load().stored.disks_for(t.ident)
        if not record:
            return {}
        try:
            targets = self.tgtadm.show_targets(timeout=self.show_timeout)
        except TgtadmError:
            if self.tgtd.current() != t:       # it ended under the call: nobody is logged in to it
                return {}
            raise
        return converge.logins(record, targets)

    def export(self, path: PathKey, disk: Disk) -> None:
        """Create or update the disk's target (LUN, identity, ACL, CHAP) and the path's portal; sessions of
        initiators the new ACL does not admit are closed; a changed size re-creates the target (its
        sessions on this node reconnect once). Idempotent; on failure the path is left unexported (and the
        target removed if it was new). Planned from the cached view when its ops only add to tgtd (a new
        target, a new portal: the cost does not grow with the targets tgtd has); from a fresh ``tgtadm
        --op show`` otherwise, and whenever the view would have it do nothing or refuse."""
        spec = disk.path(path.index)
        if spec is None:
            raise PermanentBackendError(f"disk {disk.id} has no path {path.index}")
        if path.disk != disk.id:
            raise PermanentBackendError(f"path {path} does not belong to disk {disk.id}")
        if not disk.pool or not disk.image:
            raise PermanentBackendError(f"disk {disk.id} has no pool/image")
        with self._exclusive():
            mark = self.tgtd.mark()
            t = self._running_tgtd()
            view = self._cached_view(t.ident, mark)
            if view is not None:
                try:
                    plan = self._plan(path, disk, spec.ip, view)
                except PermanentBackendError:
                    plan = None                   # refused from memory: ask tgtd before refusing
                if plan is not None and plan.ops and plan.fast:
                    self._export_fast(t.ident, mark, path, disk, view, plan)
                    return
            view, state = self._read_view(t.ident, mark)
            plan = self._plan(path, disk, spec.ip, view, state)     # with the sessions tgtd has now
            if plan.done:
                return
            if plan.fast:
                self._export_fast(t.ident, mark, path, disk, view, plan)
            else:
                self._export_slow(t.ident, mark, path, disk, view, plan, state)

    def _plan(self, path: PathKey, disk: Disk, ip: str, view: _View, state: TgtState | None = None) -> "_ExportPlan":
        """What exporting ``path`` takes, from ``view`` (its record) and ``state`` (default: the view's
        configuration, which has no sessions)."""
        record = view.record
        prev = record.get(disk.id)
        paths = dict(prev.paths) if prev else {}
        paths[path.index] = ip
        entry = Entry.of(disk, paths)
        check_conflicts(entry, record)
        if state is None:
            state = view.state
        if prev == entry and converge.applied(entry, state, self.port):
            return _ExportPlan(prev, entry, [], False, True, True)
        ops = ops_for(entry, state, prev, collections.ChainMap({disk.id: entry}, record), self._settings_now())
        reopen = prev is not None and converge.needs_reopen(entry, state, prev)
        renamed = prev is not None and prev.iqn != entry.iqn
        return _ExportPlan(prev, entry, ops, reopen, False, additive(ops) and not reopen and not renamed)

    def _export_fast(self, ident: str, mark: str, path: PathKey, disk: Disk, view: _View,
                     plan: "_ExportPlan") -> None:
        """Ops that only add to tgtd: the record's journal line first, then the ops, then the view."""
        before = view.record
        self._record_change(view, ident, mark, disk.id, plan.entry)
        try:
            for op in plan.ops:
                self._run(op)
        except BackendError:
            self._forget()
            self._rollback(ident, mark, path, before)
            raise
        except BaseException:
            self._forget()
            raise
        self._applied(view, plan.ops, disk.id, plan.entry)
        self._check_fence(mark, path)
        spec = disk.path(path.index)
        log.info("tgt: exported %s (%s, portal %s)", path, disk.iqn, portal_of(spec.ip if spec else "?", self.port))

    def _export_slow(self, ident: str, mark: str, path: PathKey, disk: Disk, view: _View,
                     plan: "_ExportPlan", state: TgtState) -> None:
        """Anything that takes away or depends on sessions (an ACL narrowed, a session to close, a CHAP
        password replaced, a new size, a rename), planned from what tgtd showed just before (``state``):
        the whole record is written first, and tgtd is read again at the next call (the view follows no
        session nor the second ``show`` below)."""
        record, prev, entry, ops, reopen = view.record, plan.prev, plan.entry, plan.ops, plan.reopen
        self._forget()
        new = dict(record)
        new[disk.id] = entry
        self.store.save(ident, mark, new)
        t0 = time.monotonic()
        try:
            for op in ops:
                self._run(op)
            if not reopen and converge.narrowed(entry, state):
                # a login that passed the old ACL while it changed and completed after our show
                for op in converge.revoke_ops(entry, self.tgtadm.show_targets().get(entry.iqn)):
                    self._run(op)
            if prev is not None and prev.iqn != entry.iqn:     # the disk was renamed: drop the old target
                for op in prune_ops(self.tgtadm.show(accounts=True), new, self.settings):
                    self._run(op)
        except BackendError:
            self._rollback(ident, mark, path, record)
            raise
        self._check_fence(mark, path)
        if reopen and prev is not None:
            log.info("tgt: %s: re-created target %s for the new size (%d -> %d bytes) in %.0f ms; its "
                     "sessions on this node reconnect", disk.id, disk.iqn, prev.size, entry.size,
                     (time.monotonic() - t0) * 1000)
        dropped = sorted({op.initiator for op in ops if isinstance(op, CloseConnection)})
        if dropped and not reopen:
            log.info("tgt: %s: closed the sessions of %s (no longer admitted)", disk.id, ", ".join(dropped))
        spec = disk.path(path.index)
        log.info("tgt: exported %s (%s, portal %s)", path, disk.iqn, portal_of(spec.ip if spec else "?", self.port))

    def _check_fence(self, mark: str, path: PathKey) -> None:
        if self.tgtd.mark() != mark:
            # a fence ran meanwhile and may have missed this tgtd (it was starting): nothing may stay served
            self._forget()
            self._kill("a fence ran during the export")
            raise TransientBackendError(f"tgt: fenced while exporting {path}", retry_after=0.5)

    def unexport(self, path: PathKey) -> None:
        """Remove the path's portal (unless another recorded path uses the same IP); remove the target,
        dropping its sessions, when no path of the disk is left. Unknown paths are a no-op, and so is
        every path while tgtd cannot be restarted (nothing is served then). Planned from the cached view
        (``prune_ops`` on it), the record written after the ops."""
        with self._exclusive():
            try:
                t = self._running_tgtd()
            except BackendError as e:
                if self.tgtd.current() is None:
                    log.warning("tgt: unexport %s: tgtd is not running and cannot be started (%s); "
                                "nothing is served", path, e)
                    return
                raise
            mark = self.tgtd.mark()
            view = self._cached_view(t.ident, mark) or self._read_view(t.ident, mark)[0]
            entry = view.record.get(path.disk)
            if entry is None or path.index not in entry.paths:
                return
            rest = {i: ip for i, ip in entry.paths.items() if i != path.index}
            new = dict(view.record)
            after = entry.with_paths(rest) if rest else None
            if after is not None:
                new[path.disk] = after
            else:
                del new[path.disk]
            ops = prune_ops(view.state, new, self.settings)
            try:
                for op in ops:
                    self._run(op)
            except BaseException:
                self._forget()
                raise
            self._applied(view, ops, None, None)
            self._record_change(view, t.ident, view.fence, path.disk, after)
            with self._view_lock:
                view.record = new
            log.info("tgt: unexported %s", path)

    # ---------------------------------------------------------------- the cached view (under the lock)

    def _cached_view(self, ident: str, mark: str) -> _View | None:
        """The view, if it can be trusted now (see ``_View``): two stat calls, no tgtadm call."""
        v = self._view
        if v is None or v.ident != ident or v.mark != mark or v.doubts != self._doubts:
            return None
        if time.monotonic() - v.read_at > VIEW_MAX_AGE or self.store.stamp() != v.stamp:
            return None
        return v

    def _read_view(self, ident: str, mark: str) -> tuple[_View, TgtState]:
        """Read the record and tgtd (``tgtadm --op show`` of targets, portals and accounts) afresh: the new
        view, and tgtd's state as shown (with its sessions, for this call's plan)."""
        self._view = None
        doubts = self._doubts
        loaded = self.store.load()
        state = self.tgtadm.show(accounts=True)
        v = _View(ident=ident, mark=mark, fence=loaded.stored.fence, tag=loaded.tag, stamp=loaded.stamp,
                  record=loaded.stored.disks_for(ident), state=configuration(state), lines=loaded.lines,
                  appendable=loaded.stored.tgtd == ident and not loaded.torn, read_at=time.monotonic(),
                  doubts=doubts)
        self._view = v
        return v, state

    def _forget(self) -> None:
        """Nothing this instance knows of tgtd is trusted any more: the next call reads it again."""
        self._view = None

    def _applied(self, view: _View, ops: Iterable[Op], disk: str | None, entry: Entry | None) -> None:
        """``ops`` all succeeded: the view follows them (and records ``disk``'s new ``entry``)."""
        try:
            with self._view_lock:
                apply_ops(view.state, list(ops))
                if disk is not None and entry is not None:
                    view.record[disk] = entry
        except ValueError as e:
            log.debug("tgt: the view cannot follow an op (%s); reading tgtd again next time", e)
            self._forget()

    def _record_change(self, view: _View, ident: str, fence: str, disk: str, entry: Entry | None) -> None:
        """Write the record with ``disk``'s entry now ``entry`` (``None``: removed): one journal line, or the
        whole record (a compaction) when the journal is as long as the record, or the base describes another
        tgtd, or the journal ends torn. The view's stamp follows; its record is changed by the caller once
        the ops succeeded. A failed write forgets the view."""
        try:
            if view.appendable and (view.lines < JOURNAL_MIN or view.lines < len(view.record)):
                view.stamp = self.store.append(view.tag, ident, fence, disk, entry)
                view.lines += 1
                self._journaled = True
            else:
                new = dict(view.record)
                if entry is None:
                    new.pop(disk, None)
                else:
                    new[disk] = entry
                view.stamp, view.tag = self.store.save(ident, fence, new)
                view.lines, view.appendable = 0, True
            view.fence = fence
        except BaseException:
            self._forget()
            raise

    def _check_view(self, ident: str, served: frozenset[PathKey]) -> None:
        """(``exported``, no lock.) tgtd serves other than the view expects: distrust the view."""
        v = self._view
        if v is None or v.ident != ident:
            return
        with self._view_lock:
            expect = converge.served(v.record, v.state, self.port)
        if expect != served:
            self._doubts += 1
            log.info("tgt: tgtd serves %d path(s) the backend did not expect and lacks %d it expected; reading "
                     "tgtd again at the next change", len(served - expect), len(expect - served))

    def fence(self) -> None:
        """SIGKILL tgtd (our child or the pid file's, checked against /proc): every session, listener and
        LUN goes at once. No tgtadm call, no lock; works from any process on the same state dir. The
        record is bound to the killed tgtd, so every export is forgotten with it. ``TransientBackendError``
        only when tgtd is still alive ``FENCE_WAIT`` s after the SIGKILL, or the fence mark cannot be
        written (an export under way might then not notice the fence)."""
        t0 = time.monotonic()
        fds = self.tgtd.kill()
        problem = ""
        try:
            self.tgtd.write_mark()
        except OSError as e:
            problem = f"cannot write the fence mark {self.tgtd.mark_path}: {e.strerror or e}"
        for pid, fd in self.tgtd.kill().items():     # one that was starting while we killed the first
            if pid in fds:
                os.close(fd)
            else:
                fds[pid] = fd
        pids = sorted(fds)
        left = self.tgtd.wait_dead(fds, FENCE_WAIT)
        took = (time.monotonic() - t0) * 1000
        if left:
            raise TransientBackendError(f"tgt: fence: tgtd (pid {left[0]}) is still alive {FENCE_WAIT:g} s after "
                                        "SIGKILL", retry_after=0.2)
        if pids:
            log.warning("tgt: fenced: killed tgtd (pid %s) in %.1f ms; nothing is served",
                        ", ".join(map(str, pids)), took)
        else:
            log.info("tgt: fenced: no tgtd was running (%.1f ms)", took)
        if problem:
            raise TransientBackendError(f"tgt: fence: {problem}", retry_after=0.5)

    def close(self) -> None:
        """Stop the watcher thread, fold the record's journal into the base (so that any reader of the
        base alone, an older agent, sees it all) and reap a dead tgtd child. tgtd keeps running (and
        serving)."""
        self._closing.set()
        if self._journaled:
            self._compact()
        if self._wakeup is not None:
            os.write(self._wakeup[1], b"x")
        w = self._watcher
        if w is not None and w is not threading.current_thread():
            w.join(timeout=5)
        if self._wakeup is not None and (w is None or not w.is_alive()):   # never under a select() of it
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        self.tgtd.reap()

    def _compact(self) -> None:
        """Best effort, within about a second: the record's journal folded into its base."""
        try:
            with self._lock, self.tgtd.exclusive(timeout=1.0):
                loaded = self.store.load()
                if loaded.lines:
                    st = loaded.stored
                    self.store.save(st.tgtd, st.fence, st.disks)
                self._journaled = False
                self._forget()
        except BackendError as e:
            log.info("tgt: record journal left for the next start: %s", e)

    # ---------------------------------------------------------------- tgtd lifecycle (under the lock)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This instance's lock, then the state dir's lock shared with every other instance and process
        (re-entrant within this instance)."""
        with self._lock:
            if self._held:
                yield
                return
            with self.tgtd.exclusive(timeout=2 * self.command_timeout + self.ceph_timeout):
                self._held = True
                try:
                    yield
                finally:
                    self._held = False

    def _running_tgtd(self) -> Tgtd:
        """The running tgtd; one that died is replaced by an empty one first (``_restart``)."""
        t = self.tgtd.current()
        if t is None:
            t = self._restart()
        self._ensure_watcher()
        return t

    def _restart(self) -> Tgtd:
        """(Under ``_exclusive``.) Start tgtd empty with an empty record. After a death: a WARNING saying
        how tgtd ended (INFO when a fence killed it) and a wake-up, so that the agent re-exports what it
        holds."""
        how = self.tgtd.ended()
        self._forget()
        try:
            before: Stored | None = self.store.load().stored
        except BackendError as e:
            log.warning("tgt: %s; starting afresh", e)
            before = None
        self.store.save(None, "", {})             # the exports of the dead tgtd are gone with it
        t = self.tgtd.start()
        mark = self.tgtd.mark()                   # read after the start: a fence writes it just after its kill
        self.store.save(t.ident, mark, {})
        if how:
            if before is not None and before.tgtd is not None and before.fence != mark:
                log.info("tgt: %s (fenced); restarted it (pid %d) empty", how, t.pid)
            else:
                log.warning("tgt: %s; restarted it (pid %d) empty; the agent re-exports what it holds", how, t.pid)
            self._wake()
        return t

    def _kill(self, why: str) -> None:
        left = self.tgtd.wait_dead(self.tgtd.kill(), FENCE_WAIT)
        log.warning("tgt: killed tgtd: %s%s", why, f" (pid {left[0]} still alive)" if left else "")

    def _ensure_watcher(self) -> None:
        if not self.watch or self._closing.is_set():
            return
        w = self._watcher
        if w is not None and w.is_alive():
            return
        with self._watcher_lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            if self._wakeup is None:
                self._wakeup = os.pipe()
            self._watcher = threading.Thread(target=self._watch, name="tgtd-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """The watcher thread: wait for tgtd to exit (a pidfd: an inherited tgtd is watched too), then
        restart it empty at once. It never creates a target."""
        wake_fd = self._wakeup[0] if self._wakeup is not None else -1
        while not self._closing.is_set():
            t = self.tgtd.current()
            if t is not None:
                self.tgtd.wait_exit(t, wake_fd, self._closing)
            try:
                with self._exclusive():
                    if self._closing.is_set():
                        return
                    if self.tgtd.current() is None:       # not restarted by an export or another instance
                        self._restart()
            except BackendError as e:
                log.warning("tgt: cannot restart tgtd: %s", e)
            if self.tgtd.current() is None:
                self._closing.wait(2.0)

    # ---------------------------------------------------------------- running ops

    def _run(self, op: Op) -> None:
        if isinstance(op, Probe):
            if self._probe is None:
                log.debug("tgt: no Ceph probe from the host; adding %s/%s unprobed", op.pool, op.image)
            else:
                self._probe(op.pool, op.image)
        elif isinstance(op, Call):
            self.tgtadm.run(op.what, op.args, self.command_timeout + self.ceph_timeout if op.slow else None)
        elif isinstance(op, NewAccount):
            self.tgtadm.run(op.what, op.args)
        elif isinstance(op, AddPortal):
            try:
                self.tgtadm.run(op.what, op.args)
            except TgtadmError as e:
                raise TgtadmError(op.what, e.rc, f"{e.detail} (is the address local, or net.ipv4.ip_nonlocal_bind=1? "
                                                 f"is {op.portal} used by another listener?)") from None
        elif isinstance(op, DeletePortal):
            try:
                self.tgtadm.run(op.what, op.args)
            except TgtadmError:
                if op.portal in parse_portals(self.tgtadm.run("show portals", ["--mode", "portal", "--op", "show"])):
                    raise
        elif isinstance(op, DeleteTarget):
            self._delete_target(op)
            log.info("tgt: removed target %s (tid %d)", op.name, op.tid)
        elif isinstance(op, CloseConnection):
            try:
                self.tgtadm.run(op.what, op.args)
            except TgtadmError as e:
                if not any(m in e.detail for m in GONE):
                    raise

    def _delete_target(self, op: DeleteTarget) -> None:
        """tgt refuses to delete a target for a moment after I/O ("still active"): retry for up to ~2 s."""
        end = time.monotonic() + 2.0
        while True:
            try:
                self.tgtadm.run(op.what, op.args)
                return
            except TgtadmError as e:
                if "can't find the target" in e.detail:
                    return
                if time.monotonic() >= end:
                    raise
                time.sleep(0.1)

    def _rollback(self, ident: str, mark: str, path: PathKey, record: Record) -> None:
        """Undo a failed export: restore the record as it was and remove what tgtd has beyond it (the new
        portal; the whole target when the disk was not exported before), read afresh from tgtd. Nothing
        to undo when tgtd died."""
        self._forget()
        try:
            self.store.save(ident, mark, record)
            t = self.tgtd.current()
            if t is None or t.ident != ident:
                return
            for op in prune_ops(self.tgtadm.show(accounts=True), record, self.settings):
                self._run(op)
        except BackendError as e:
            log.warning("tgt: could not undo the failed export of %s: %s", path, e)

