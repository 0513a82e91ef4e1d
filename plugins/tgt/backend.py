"""``TgtBackend``: the ``tgt`` target backend (one userspace tgtd per node, LUNs on RBD through bs_rbd).

Options and orchestration: ``export``/``unexport`` record the intent, then run the ops of
``plugins.tgt.converge`` under one lock; ``exported`` and ``logged_in`` read tgtd without the lock and never
start it; ``fence`` SIGKILLs tgtd without the lock, from any thread or process. A tgtd that died is restarted
empty and the agent is woken to re-export. The full description is docs/backend-tgt.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from typing import Iterator, Mapping

from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.errors import BackendError, PermanentBackendError, TransientBackendError
from plugins.options import Options
from plugins.tgt import converge
from plugins.tgt.converge import (AddPortal, Call, CloseConnection, DeletePortal, DeleteTarget, NewAccount, Op, Probe,
                                  Settings, ops_for, prune_ops)
from plugins.tgt.record import Entry, Record, RecordFile, check_conflicts
from plugins.tgt.tgtadm import Tgtadm, TgtadmError, parse_portals, portal_of
from plugins.tgt.tgtd import Tgtd, TgtdConfig, TgtdSupervisor

log = logging.getLogger(__name__)

#: how long ``fence`` waits for the killed tgtd to be gone (a SIGKILL takes effect in milliseconds)
FENCE_WAIT = 1.0

#: tgtadm's words for a connection that is already gone (closing it again is fine)
GONE = ("can't find the connection", "can't find the session", "can't find the target")


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
        self._probe = context.ceph_probe
        self._wake = context.wake
        self._lock = threading.RLock()             # export, unexport and the watcher's restarts
        self._held = False                         # the state dir's lock is held (under _lock)
        self._watcher_lock = threading.Lock()      # starting the watcher (exported() never waits for _lock)
        self._closing = threading.Event()
        self._wakeup: tuple[int, int] | None = None   # pipe that wakes the watcher on close()
        self._watcher: threading.Thread | None = None

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
        record = self.records.load().disks_for(t.ident)
        if not record:
            return frozenset()
        try:
            state = self.tgtadm.show(accounts=False, timeout=self.show_timeout)
        except TgtadmError:
            if self.tgtd.current() != t:       # it ended under the call: nothing of it is served
                return frozenset()
            raise
        return converge.served(record, state, self.port)

    def logged_in(self) -> Mapping[str, frozenset[str]]:
        """Initiator names with a session on each recorded disk's target of the running tgtd, by disk id
        (one ``tgtadm --op show`` of the targets, without the lock). No tgtd: nobody. Never starts tgtd;
        ``TransientBackendError`` when it does not answer within ``show_timeout``."""
        t = self.tgtd.current()
        if t is None:
            return {}
        record = self.records.load().disks_for(t.ident)
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
        target removed if it was new)."""
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
            record = self.records.load().disks_for(t.ident)
            prev = record.get(disk.id)
            paths = dict(prev.paths) if prev else {}
            paths[path.index] = spec.ip
            entry = Entry.of(disk, paths)
            check_conflicts(entry, record)
            state = self.tgtadm.show(accounts=True)
            if prev == entry and converge.applied(entry, state, self.port):
                return
            new = dict(record)
            new[disk.id] = entry
            ops = ops_for(entry, state, prev, new, self._settings_now())
            reopen = prev is not None and converge.needs_reopen(entry, state, prev)
            self.records.save(t.ident, mark, new)
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
                self._rollback(t, mark, path, record)
                raise
            if self.tgtd.mark() != mark:
                # a fence ran meanwhile and may have missed this tgtd (it was starting): nothing may stay served
                self._kill("a fence ran during the export")
                raise TransientBackendError(f"tgt: fenced while exporting {path}", retry_after=0.5)
            if reopen and prev is not None:
                log.info("tgt: %s: re-created target %s for the new size (%d -> %d bytes) in %.0f ms; its "
                         "sessions on this node reconnect", disk.id, disk.iqn, prev.size, entry.size,
                         (time.monotonic() - t0) * 1000)
            dropped = sorted({op.initiator for op in ops if isinstance(op, CloseConnection)})
            if dropped and not reopen:
                log.info("tgt: %s: closed the sessions of %s (no longer admitted)", disk.id, ", ".join(dropped))
            log.info("tgt: exported %s (%s, portal %s)", path, disk.iqn, portal_of(spec.ip, self.port))

    def unexport(self, path: PathKey) -> None:
        """Remove the path's portal (unless another recorded path uses the same IP); remove the target,
        dropping its sessions, when no path of the disk is left. Unknown paths are a no-op, and so is
        every path while tgtd cannot be restarted (nothing is served then)."""
        with self._exclusive():
            try:
                t = self._running_tgtd()
            except BackendError as e:
                if self.tgtd.current() is None:
                    log.warning("tgt: unexport %s: tgtd is not running and cannot be started (%s); "
                                "nothing is served", path, e)
                    return
                raise
            stored = self.records.load()
            record = stored.disks_for(t.ident)
            entry = record.get(path.disk)
            if entry is None or path.index not in entry.paths:
                return
            rest = {i: ip for i, ip in entry.paths.items() if i != path.index}
            new = dict(record)
            if rest:
                new[path.disk] = entry.with_paths(rest)
            else:
                del new[path.disk]
            for op in prune_ops(self.tgtadm.show(accounts=True), new, self.settings):
                self._run(op)
            self.records.save(t.ident, stored.fence, new)
            log.info("tgt: unexported %s", path)

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
        """Stop the watcher thread and reap a dead tgtd child. tgtd keeps running (and serving)."""
        self._closing.set()
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
        try:
            before = self.records.load()
        except PermanentBackendError as e:
            log.warning("tgt: %s; starting afresh", e)
            before = None
        self.records.save(None, "", {})           # the exports of the dead tgtd are gone with it
        t = self.tgtd.start()
        mark = self.tgtd.mark()                   # read after the start: a fence writes it just after its kill
        self.records.save(t.ident, mark, {})
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

    def _rollback(self, t: Tgtd, mark: str, path: PathKey, record: Record) -> None:
        """Undo a failed export: restore the record as it was and remove what tgtd has beyond it (the new
        portal; the whole target when the disk was not exported before). Nothing to undo when tgtd died."""
        try:
            self.records.save(t.ident, mark, record)
            if self.tgtd.current() != t:
                return
            for op in prune_ops(self.tgtadm.show(accounts=True), record, self.settings):
                self._run(op)
        except BackendError as e:
            log.warning("tgt: could not undo the failed export of %s: %s", path, e)

