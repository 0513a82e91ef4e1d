"""``tgt`` target backend: one userspace ``tgtd`` per node, driven through ``tgtadm``, LUNs on RBD (``bs_rbd``).

Model (tgt has no TPGs, so a path maps onto a portal):

- one tgt target per disk, named by the disk's IQN; its tid is whatever tgtd has for that IQN (a new
  target gets the smallest free tid), so nothing about tids is remembered;
- LUN 1 on ``--bstype rbd --backing-store pool/image`` (tgt's own controller is LUN 0), with
  ``scsi_sn`` and ``scsi_id`` = the disk's serial, so every gateway reports the same unit serial and
  device identifier (VPD 0x80/0x83) and multipath groups the paths; ``vendor_id`` / ``product_id`` /
  ``product_rev`` come from ``[target.tgt]`` (keep them the same on every node);
- access: ``--initiator-name`` per allowed IQN, ``--initiator-address ALL`` for an open disk, nothing
  for a disk that admits nobody (tgt admits an initiator that matches *any* bound name or address);
- CHAP: a tgt account per user, bound incoming to the target; mutual CHAP is the target's outgoing
  account. tgt accounts are global per tgtd, so two disks exported on one node may share a CHAP user
  only with the same password (otherwise ``PermanentBackendError``);
- path ``disk/N`` is exported while the disk's target exists with LUN 1 on its image **and** tgtd has a
  portal on the path's ``ip:port``. tgtd listens only on its portals, so an initiator reaches a disk
  only through the floating IPs this node serves.

Portals are added in ``export``, before the network plugin brings the IP up (the agent's order: target
first, IP last). A listener on an address that is not local needs ``net.ipv4.ip_nonlocal_bind=1`` (and
``net.ipv6.ip_nonlocal_bind`` for IPv6 paths) in the node's network namespace; with ``nonlocal_bind``
(default true) the backend sets it when it starts tgtd, and logs that it did.

What survives what:

- tgtd keeps no configuration. The backend records every export (the disk definition, CHAP secrets
  included, and the exported path IPs) in ``{state_dir}/tgt/exports.json`` (mode 0600, directory 0700)
  before applying it. ``exported`` still reads tgtd's real state (``tgtadm --op show``) and reports only
  recorded paths that tgtd actually serves, so it is right after an agent restart.
- tgtd is started in its own session (SIGTERM/SIGINT of the agent does not reach it) and is found again
  through ``{state_dir}/tgt/tgtd.pid`` (pid + start time, checked against /proc). An agent restart leaves
  it serving; ``close`` does not stop it.
- Supervision happens at the top of every method, and ``exported`` is called by the agent every cycle:
  if tgtd is gone (a zero-length READ from any initiator makes librbd abort it), it is restarted and
  every recorded export is replayed, with a WARNING saying how tgtd ended. A disk whose replay fails is
  left out of ``exported`` (the agent then re-exports it with its usual backoff).

Ceph: before a LUN is added the backend probes Ceph from the agent process (a long-lived librados handle:
a mon command plus a stat of the image's header object, bounded by ``ceph_timeout`` in a worker thread),
because ``bs_rbd`` connects synchronously inside tgtd's single event loop and would freeze every session
of the node while the mon is unreachable. tgtd itself gets ``CEPH_ARGS`` with ``client_mount_timeout``
and ``rados_mon_op_timeout`` = ``ceph_timeout`` (so a LUN add still cannot stall it longer than that) and
``rbd_cache`` = the ``rbd_cache`` option (default false: a write is acknowledged only once the OSDs have
it, so a path that moves to another gateway reads it back). The given ceph.conf is used unchanged.

Errors: every ``tgtadm`` failure or timeout is a ``TransientBackendError``; a definition this node can
never serve (no such path, IQN taken by another disk, CHAP user clash, image or pool missing) is a
``PermanentBackendError``. ``export`` undoes its own partial work before raising.

Secrets: ``tgtadm --mode account --op new`` takes the CHAP password on its argv, which other local users
can read in /proc for the few milliseconds the command runs; tgt offers no other way. Passwords are
never logged nor put into exception messages; the record file holds them (root only).
"""
from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from agent.backend import PluginContext, TargetBackend
from agent.errors import BackendError, PermanentBackendError, TransientBackendError
from agent.core.model import Chap, Disk, PathKey
from agent import statefile
from plugins import sysctl
from plugins.options import Options

log = logging.getLogger(__name__)

RECORD_VERSION = 1
LUN = 1
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")


# --------------------------------------------------------------------------------------------------
# tgtadm output parsing (pure)

@dataclass
class TgtLun:
    lun: int
    kind: str = ""
    scsi_id: str = ""
    scsi_sn: str = ""
    bstype: str = ""
    path: str = ""


@dataclass
class TgtTarget:
    tid: int
    name: str
    luns: dict[int, TgtLun] = field(default_factory=dict)
    accounts_in: set[str] = field(default_factory=set)
    accounts_out: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)
    sessions: int = 0


@dataclass
class TgtState:
    """tgtd's configuration as ``tgtadm --op show`` reports it."""

    targets: dict[str, TgtTarget]          # by IQN
    portals: set[str]                       # "ip:port" / "[ip6]:port"
    accounts: set[str] | None = None        # global account names; None when not read

    def free_tid(self) -> int:
        used = {t.tid for t in self.targets.values()}
        tid = 1
        while tid in used:
            tid += 1
        return tid


def parse_targets(text: str) -> dict[str, TgtTarget]:
    """Parse ``tgtadm --mode target --op show``."""
    targets: dict[str, TgtTarget] = {}
    cur: TgtTarget | None = None
    section = ""
    lun: TgtLun | None = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        if indent == 0 and line.startswith("Target ") and ":" in line:
            head, _, name = line.partition(":")
            cur = TgtTarget(tid=int(head.split()[1]), name=name.strip())
            targets[cur.name] = cur
            section, lun = "", None
            continue
        if cur is None:
            continue
        if indent == 4:
            section, lun = line.rstrip(":"), None
            continue
        if section == "LUN information":
            if indent == 8 and line.startswith("LUN:"):
                lun = TgtLun(lun=int(line.split(":", 1)[1]))
                cur.luns[lun.lun] = lun
            elif lun is not None and ":" in line:
                k, _, v = line.partition(":")
                v = v.strip()
                if k == "Type":
                    lun.kind = v
                elif k == "SCSI ID":
                    lun.scsi_id = v
                elif k == "SCSI SN":
                    lun.scsi_sn = v
                elif k == "Backing store type":
                    lun.bstype = v
                elif k == "Backing store path":
                    lun.path = v
        elif section == "Account information" and indent == 8:
            if line.endswith(" (outgoing)"):
                cur.accounts_out.add(line[: -len(" (outgoing)")])
            else:
                cur.accounts_in.add(line)
        elif section == "ACL information" and indent == 8:
            cur.acl.add(line)
        elif section == "I_T nexus information" and indent == 8 and line.startswith("I_T nexus:"):
            cur.sessions += 1
    return targets


def parse_portals(text: str) -> set[str]:
    """Parse ``tgtadm --mode portal --op show`` (``Portal: 1.2.3.4:3260,1``) into ``ip:port`` strings."""
    out = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Portal:"):
            out.add(line.split(":", 1)[1].strip().rsplit(",", 1)[0])
    return out


def parse_accounts(text: str) -> set[str]:
    """Parse ``tgtadm --mode account --op show``."""
    return {line.strip() for line in text.splitlines()[1:] if line.strip()}


def portal_of(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --------------------------------------------------------------------------------------------------
# the record of what we export (intent); tgtd holds the reality

@dataclass(frozen=True)
class Entry:
    """One recorded disk: what its target must look like and which of its paths are exported here."""

    disk: str
    iqn: str
    pool: str
    image: str
    serial: str
    initiators: tuple[str, ...] | None
    chap: Chap | None
    mutual_chap: Chap | None
    paths: Mapping[int, str]   # index -> ip

    @classmethod
    def of(cls, disk: Disk, paths: Mapping[int, str]) -> "Entry":
        return cls(disk=disk.id, iqn=disk.iqn, pool=disk.pool, image=disk.image, serial=disk.serial,
                   initiators=disk.initiators, chap=disk.chap, mutual_chap=disk.mutual_chap,
                   paths=dict(paths))

    def with_paths(self, paths: Mapping[int, str]) -> "Entry":
        return Entry(self.disk, self.iqn, self.pool, self.image, self.serial, self.initiators, self.chap,
                     self.mutual_chap, dict(paths))

    def to_json(self) -> dict[str, Any]:
        def chap(c: Chap | None) -> dict[str, str] | None:
            return None if c is None else {"user": c.user, "password": c.password}
        return {"iqn": self.iqn, "pool": self.pool, "image": self.image, "serial": self.serial,
                "initiators": None if self.initiators is None else list(self.initiators),
                "chap": chap(self.chap), "mutual_chap": chap(self.mutual_chap),
                "paths": {str(i): ip for i, ip in sorted(self.paths.items())}}

    @classmethod
    def from_json(cls, disk: str, d: Mapping[str, Any]) -> "Entry":
        def chap(c: Any) -> Chap | None:
            return None if c is None else Chap(str(c["user"]), str(c["password"]))
        inits = d.get("initiators")
        return cls(disk=disk, iqn=str(d["iqn"]), pool=str(d["pool"]), image=str(d["image"]),
                   serial=str(d["serial"]), initiators=None if inits is None else tuple(str(i) for i in inits),
                   chap=chap(d.get("chap")), mutual_chap=chap(d.get("mutual_chap")),
                   paths={int(i): str(ip) for i, ip in d.get("paths", {}).items()})

    def accounts(self) -> list[tuple[Chap, bool]]:
        """(credentials, outgoing) pairs this target binds."""
        out = []
        if self.chap is not None:
            out.append((self.chap, False))
        if self.mutual_chap is not None:
            out.append((self.mutual_chap, True))
        return out

    def acl(self) -> set[str]:
        return {"ALL"} if self.initiators is None else set(self.initiators)


Record = dict[str, Entry]


def _passwords(record: Mapping[str, Entry]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in record.values():
        for c, _ in e.accounts():
            out.setdefault(c.user, c.password)
    return out


# --------------------------------------------------------------------------------------------------
# process helpers (/proc; PID 1 reaps orphans late, so a zombie counts as dead)

def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def _start_time(pid: int) -> str:
    f = _stat_fields(pid)
    return f[19] if f else ""


class _TgtadmError(TransientBackendError):
    """A ``tgtadm`` call failed: ``rc`` and tgtadm's own message (never the argv: it may hold a secret)."""

    def __init__(self, what: str, rc: int, detail: str, retry_after: float = 2.0) -> None:
        self.rc = rc
        self.detail = detail
        super().__init__(f"tgtadm {what}: {detail or f'exit {rc}'}", retry_after)


# --------------------------------------------------------------------------------------------------
# Ceph reachability probe

class CephProbe:
    """Checks that Ceph answers (a mon command) and that ``pool/image`` exists (stat of its header object)
    through one long-lived librados handle, each check bounded by ``timeout`` seconds in a worker thread.

    ``check`` raises ``TransientBackendError`` when Ceph does not answer in time or fails, and
    ``PermanentBackendError`` when the pool or the image does not exist. While an earlier check is still
    stuck in librados, later checks fail at once instead of piling up threads."""

    def __init__(self, conf: str, client_id: str, timeout: float) -> None:
        self.conf = conf
        self.client_id = client_id
        self.timeout = timeout
        self._cluster: Any = None
        self._stuck: threading.Thread | None = None
        self._lock = threading.Lock()

    def check(self, pool: str, image: str) -> None:
        if self._stuck is not None and self._stuck.is_alive():
            raise TransientBackendError("Ceph unreachable: an earlier probe is still waiting for it",
                                        retry_after=self.timeout)
        self._stuck = None
        result: list[BaseException | None] = []

        def job() -> None:
            try:
                with self._lock:
                    self._probe(pool, image)
                result.append(None)
            except BaseException as e:  # handed to the caller's thread
                result.append(e)

        t = threading.Thread(target=job, name="tgt-ceph-probe", daemon=True)
        t.start()
        t.join(self.timeout + 0.5)
        if t.is_alive():
            self._stuck = t
            raise TransientBackendError(f"Ceph did not answer within {self.timeout:g} s "
                                        f"(probing {pool}/{image})", retry_after=self.timeout)
        err = result[0] if result else None
        if err is not None:
            if isinstance(err, BackendError):
                raise err
            raise TransientBackendError(f"Ceph probe of {pool}/{image} failed: {err}") from err

    def _probe(self, pool: str, image: str) -> None:
        try:
            import rados
        except ImportError as e:
            raise PermanentBackendError(f"the rados Python binding is not importable: {e}") from e
        try:
            if self._cluster is None:
                c = rados.Rados(conffile=self.conf, rados_id=self.client_id)
                t = str(max(1, int(round(self.timeout))))
                for k in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
                    c.conf_set(k, t)
                try:
                    c.connect()
                except BaseException:
                    c.shutdown()
                    raise
                self._cluster = c
            ret, _, outs = self._cluster.mon_command(json.dumps({"prefix": "mon stat"}), b"")
            if ret != 0:
                raise TransientBackendError(f"Ceph mon answered {ret}: {outs}")
            try:
                ioctx = self._cluster.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise PermanentBackendError(f"Ceph pool {pool!r} does not exist") from None
            try:
                for obj in (f"rbd_id.{image}", f"{image}.rbd"):
                    try:
                        ioctx.stat(obj)
                        return
                    except rados.ObjectNotFound:
                        continue
                raise PermanentBackendError(f"RBD image {pool}/{image} does not exist")
            finally:
                ioctx.close()
        except (rados.Error, OSError) as e:
            self._drop()
            raise TransientBackendError(f"Ceph unreachable: {type(e).__name__}: {e}") from e

    def _drop(self) -> None:
        c, self._cluster = self._cluster, None
        if c is not None:
            try:
                c.shutdown()
            except Exception:  # best effort
                pass

    def close(self) -> None:
        if self._stuck is None or not self._stuck.is_alive():
            with self._lock:
                self._drop()


# --------------------------------------------------------------------------------------------------

class TgtBackend(TargetBackend):
    """See the module docstring. Every method is idempotent and supervises tgtd first."""

    config_keys: Mapping[str, str] = {
        "tgtd": "path of the tgtd binary (default: tgtd on PATH, else /usr/sbin/tgtd)",
        "tgtadm": "path of the tgtadm binary (default: tgtadm on PATH, else /usr/sbin/tgtadm)",
        "control_port": "tgtd control port (tgtd -C); the socket is {state_dir}/tgt/socket.<port> (default 0)",
        "listen": "an address tgtd always listens on (port = [target] port), besides the path IPs "
                  "(default: none)",
        "io_threads": "I/O threads per LUN (tgtd -t, default 4)",
        "vendor_id": "SCSI vendor id of every LUN, at most 8 characters (default PATHAGNT); "
                     "the same on every node",
        "product_id": "SCSI product id, at most 16 characters (default RBD)",
        "product_rev": "SCSI product revision, at most 4 characters (default 0001)",
        "ceph_timeout": "seconds: bound of the Ceph probe before a LUN is added, and tgtd's "
                        "client_mount_timeout / rados_mon_op_timeout (default 5)",
        "rbd_cache": "librbd cache inside tgtd (default false: writes are acknowledged by the OSDs)",
        "nonlocal_bind": "set net.ipv4/ipv6.ip_nonlocal_bind=1 in this network namespace so that portals can "
                         "listen on a path IP before it is up (default true)",
        "command_timeout": "seconds allowed per tgtadm call (default 10)",
        "watch": "restart tgtd and replay the exports as soon as it exits (a watcher thread; default true); "
                 "false: at the agent's next call",
    }

    def __init__(self, context: PluginContext) -> None:
        """Reads ``[target.tgt]`` (``ConfigError`` listing every bad key). Starts nothing: tgtd is started
        or found at the first call."""
        o = Options("target.tgt", context.options)
        self.dir = os.path.join(context.state_dir, "tgt")
        self.port = int(context.port)
        self.tgtd_bin = o.text("tgtd", "") or shutil.which("tgtd") or "/usr/sbin/tgtd"
        self.tgtadm_bin = o.text("tgtadm", "") or shutil.which("tgtadm") or "/usr/sbin/tgtadm"
        self.control_port = o.integer("control_port", 0, 0, 65535)
        self.listen = o.text("listen", "", 45)
        self.io_threads = o.integer("io_threads", 4, 1, 128)
        self.vendor_id = o.text("vendor_id", "PATHAGNT", 8, ",=")
        self.product_id = o.text("product_id", "RBD", 16, ",=")
        self.product_rev = o.text("product_rev", "0001", 4, ",=")
        self.ceph_timeout = o.number("ceph_timeout", 5, 1, 60)
        self.rbd_cache = o.flag("rbd_cache", False)
        self.nonlocal_bind = o.flag("nonlocal_bind", True)
        self.command_timeout = o.number("command_timeout", 10, 1, 300)
        self.watch = o.flag("watch", True)
        self.ceph_conf = str(context.ceph.get("conf") or "/etc/ceph/ceph.conf")
        self.ceph_id = str(context.ceph.get("client_id") or "admin")
        if ";" in self.ceph_conf or ";" in self.ceph_id:
            o.problems.append(("ceph.conf", "the tgt backend needs conf and client_id without ';' (bs_rbd options)"))
        self.socket = os.path.join(self.dir, "socket")
        if len(self.socket) + 8 > 107:
            o.problems.append(("state.dir", f"too long for tgtd's unix socket {self.socket}.N"))
        o.done()
        self.record_path = os.path.join(self.dir, "exports.json")
        self.pid_path = os.path.join(self.dir, "tgtd.pid")
        self.log_path = os.path.join(self.dir, "tgtd.log")
        self.probe = CephProbe(self.ceph_conf, self.ceph_id, self.ceph_timeout)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._wakeup: tuple[int, int] | None = None   # pipe that wakes the watcher on close()
        self._watcher: threading.Thread | None = None
        self.restarts = 0   # tgtd restarts after a death (observable by tests and metrics)

    # ---------------------------------------------------------------- the ABC

    def exported(self) -> frozenset[PathKey]:
        """Recorded paths that tgtd serves now (target with LUN 1 on the image, and the path's portal).
        Restarts and replays tgtd first if it died."""
        with self._lock:
            self._supervise()
            return self._served(self._load(), self._state(accounts=False))

    def export(self, path: PathKey, disk: Disk) -> None:
        """Create or update the disk's target (LUN, identity, ACL, CHAP) and the path's portal.
        Idempotent; on failure the path is left unexported (and the target removed if it was new)."""
        spec = disk.path(path.index)
        if spec is None:
            raise PermanentBackendError(f"disk {disk.id} has no path {path.index}")
        if path.disk != disk.id:
            raise PermanentBackendError(f"path {path} does not belong to disk {disk.id}")
        if not disk.pool or not disk.image:
            raise PermanentBackendError(f"disk {disk.id} has no pool/image")
        with self._lock:
            self._supervise()
            record = self._load()
            prev = record.get(disk.id)
            paths = dict(prev.paths) if prev else {}
            paths[path.index] = spec.ip
            entry = Entry.of(disk, paths)
            self._check_conflicts(entry, record)
            state = self._state(accounts=True)
            if prev == entry and self._applied(entry, state):
                return
            new = dict(record)
            new[disk.id] = entry
            self._save(new)
            try:
                self._converge(entry, state, prev, new)
            except BackendError:
                self._rollback(disk.id, path.index, prev, record)
                raise
            if prev is not None and prev.iqn != entry.iqn:     # the disk was renamed: drop the old target
                self._prune(self._state(accounts=True), new)
            log.info("tgt: exported %s (%s, portal %s)", path, disk.iqn, portal_of(spec.ip, self.port))

    def unexport(self, path: PathKey) -> None:
        """Remove the path's portal (unless another recorded path uses the same IP); remove the target,
        dropping its sessions, when no path of the disk is left. Unknown paths are a no-op."""
        with self._lock:
            self._supervise()
            record = self._load()
            entry = record.get(path.disk)
            if entry is None or path.index not in entry.paths:
                return
            rest = {i: ip for i, ip in entry.paths.items() if i != path.index}
            new = dict(record)
            if rest:
                new[path.disk] = entry.with_paths(rest)
            else:
                del new[path.disk]
            state = self._state(accounts=True)
            self._prune(state, new)
            self._save(new)
            log.info("tgt: unexported %s", path)

    def cleanup(self, keep: frozenset[PathKey]) -> None:
        """Forget every recorded path not in ``keep`` and remove from tgtd every target, portal and account
        that the remaining record does not need (tgtd is ours alone)."""
        with self._lock:
            self._supervise()
            record = self._load()
            new: Record = {}
            for d, e in record.items():
                paths = {i: ip for i, ip in e.paths.items() if PathKey(d, i) in keep}
                if paths:
                    new[d] = e.with_paths(paths)
            state = self._state(accounts=True)
            self._prune(state, new)
            if new != record:
                self._save(new)

    def close(self) -> None:
        """Stop the watcher thread, reap a dead tgtd child and drop the Ceph probe's connection. tgtd keeps
        running (and serving)."""
        self._closing.set()
        if self._wakeup is not None:
            os.write(self._wakeup[1], b"x")
        w = self._watcher
        if w is not None and w is not threading.current_thread():
            w.join(timeout=5)
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        if self._proc is not None:
            self._proc.poll()
        self.probe.close()

    # ---------------------------------------------------------------- tgtadm

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TGT_IPC_SOCKET"] = self.socket
        return env

    def _tgtadm(self, what: str, args: Sequence[str], timeout: float | None = None) -> str:
        argv = [self.tgtadm_bin, "-C", str(self.control_port), "--lld", "iscsi", *args]
        try:
            r = subprocess.run(argv, env=self._env(), stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout or self.command_timeout)
        except subprocess.TimeoutExpired:
            raise _TgtadmError(what, -1, f"no answer from tgtd within {timeout or self.command_timeout:g} s") \
                from None
        except OSError as e:
            raise PermanentBackendError(f"cannot run {self.tgtadm_bin}: {e}") from None
        if r.returncode != 0:
            detail = r.stderr.decode(errors="replace").strip().removeprefix("tgtadm:").strip()
            raise _TgtadmError(what, r.returncode, detail)
        return r.stdout.decode(errors="replace")

    def _state(self, accounts: bool) -> TgtState:
        """tgtd's state. If tgtd dies under the call (its socket resets), supervise again and retry once."""
        try:
            return self._read_state(accounts)
        except _TgtadmError:
            end = time.monotonic() + 0.5
            while self._running() and time.monotonic() < end:
                time.sleep(0.02)
            if self._running():
                raise
        self._supervise()
        return self._read_state(accounts)

    def _read_state(self, accounts: bool) -> TgtState:
        st = TgtState(targets=parse_targets(self._tgtadm("show targets", ["--mode", "target", "--op", "show"])),
                      portals=parse_portals(self._tgtadm("show portals", ["--mode", "portal", "--op", "show"])))
        if accounts:
            st.accounts = parse_accounts(self._tgtadm("show accounts", ["--mode", "account", "--op", "show"]))
        return st

    # ---------------------------------------------------------------- record

    def _load(self) -> Record:
        try:
            data = statefile.read(self.record_path, {})
            return {d: Entry.from_json(d, e) for d, e in data.get("disks", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PermanentBackendError(f"tgt record {self.record_path} is unreadable: {e}") from e

    def _save(self, record: Mapping[str, Entry]) -> None:
        try:
            statefile.write(self.record_path, {"version": RECORD_VERSION,
                                               "disks": {d: e.to_json() for d, e in sorted(record.items())}})
        except OSError as e:
            raise TransientBackendError(f"tgt record {self.record_path}: {e}") from e

    # ---------------------------------------------------------------- reality vs record

    def _wanted_portals(self, record: Mapping[str, Entry]) -> set[str]:
        out = {portal_of(ip, self.port) for e in record.values() for ip in e.paths.values()}
        if self.listen:
            out.add(portal_of(self.listen, self.port))
        return out

    def _lun_ok(self, entry: Entry, t: TgtTarget | None) -> bool:
        lun = t.luns.get(LUN) if t else None
        return lun is not None and lun.bstype == "rbd" and lun.path == f"{entry.pool}/{entry.image}"

    def _served(self, record: Mapping[str, Entry], state: TgtState) -> frozenset[PathKey]:
        out: set[PathKey] = set()
        for d, e in record.items():
            if self._lun_ok(e, state.targets.get(e.iqn)):
                out.update(PathKey(d, i) for i, ip in e.paths.items()
                           if portal_of(ip, self.port) in state.portals)
        return frozenset(out)

    def _applied(self, entry: Entry, state: TgtState) -> bool:
        """Whether tgtd already has ``entry`` exactly (secrets are trusted to the record)."""
        t = state.targets.get(entry.iqn)
        if t is None or not self._lun_ok(entry, t):
            return False
        lun = t.luns[LUN]
        return (lun.scsi_sn == entry.serial and lun.scsi_id == entry.serial and t.acl == entry.acl()
                and t.accounts_in == {c.user for c, out in entry.accounts() if not out}
                and t.accounts_out == {c.user for c, out in entry.accounts() if out}
                and all(portal_of(ip, self.port) in state.portals for ip in entry.paths.values()))

    def _check_conflicts(self, entry: Entry, record: Mapping[str, Entry]) -> None:
        for d, e in record.items():
            if d != entry.disk and e.iqn == entry.iqn:
                raise PermanentBackendError(f"disk {entry.disk}: IQN {entry.iqn} is already exported for disk {d}")
        others = _passwords({d: e for d, e in record.items() if d != entry.disk})
        mine: dict[str, str] = {}
        for c, _ in entry.accounts():
            if mine.setdefault(c.user, c.password) != c.password or others.get(c.user, c.password) != c.password:
                raise PermanentBackendError(
                    f"disk {entry.disk}: CHAP user {c.user!r} is used with another password by a disk exported "
                    "on this node (tgt accounts are per node)")

    def _converge(self, entry: Entry, state: TgtState, prev: Entry | None, record: Mapping[str, Entry]) -> None:
        """Make tgtd's target for ``entry`` match it. ``state`` is tgtd's state before; ``prev`` the entry
        the record held before (it tells whether a CHAP password changed)."""
        t = state.targets.get(entry.iqn)
        if t is None or LUN not in t.luns:
            # before anything else: bs_rbd would block tgtd's event loop while Ceph does not answer
            self.probe.check(entry.pool, entry.image)
        if t is None:
            new_tid = state.free_tid()
            self._tgtadm(f"create target {entry.iqn}", ["--mode", "target", "--op", "new", "--tid", str(new_tid),
                                                         "--targetname", entry.iqn])
            t = TgtTarget(tid=new_tid, name=entry.iqn)
            state.targets[entry.iqn] = t
        tid = str(t.tid)
        lun = t.luns.get(LUN)
        if lun is not None and not self._lun_ok(entry, t):
            raise PermanentBackendError(f"disk {entry.disk}: target {entry.iqn} serves {lun.path or lun.kind} "
                                        f"as LUN {LUN}, not {entry.pool}/{entry.image}; unexport it first")
        if lun is None:
            bsopts = f"conf={self.ceph_conf};id={self.ceph_id}"
            self._tgtadm(f"add LUN {entry.pool}/{entry.image} to {entry.iqn}",
                         ["--mode", "logicalunit", "--op", "new", "--tid", tid, "--lun", str(LUN),
                          "--bstype", "rbd", "--backing-store", f"{entry.pool}/{entry.image}", "--bsopts", bsopts],
                         timeout=self.command_timeout + self.ceph_timeout)
            lun = TgtLun(lun=LUN, bstype="rbd", path=f"{entry.pool}/{entry.image}")
            t.luns[LUN] = lun
        if lun.scsi_sn != entry.serial or lun.scsi_id != entry.serial:
            params = (f"vendor_id={self.vendor_id},product_id={self.product_id},product_rev={self.product_rev},"
                      f"scsi_sn={entry.serial},scsi_id={entry.serial}")
            self._tgtadm(f"set identity of {entry.iqn}",
                         ["--mode", "logicalunit", "--op", "update", "--tid", tid, "--lun", str(LUN),
                          "--params", params])
        # access: bind what is missing first, then unbind what is no longer allowed
        want = entry.acl()
        for who in sorted(want - t.acl):
            kind = "--initiator-address" if who == "ALL" or not who.startswith(_NAME_PREFIXES) else "--initiator-name"
            self._tgtadm(f"allow {who} on {entry.iqn}", ["--mode", "target", "--op", "bind", "--tid", tid, kind, who])
        for who in sorted(t.acl - want):
            kind = "--initiator-address" if who == "ALL" or not who.startswith(_NAME_PREFIXES) else "--initiator-name"
            self._tgtadm(f"disallow {who} on {entry.iqn}",
                         ["--mode", "target", "--op", "unbind", "--tid", tid, kind, who])
        t.acl = set(want)
        self._converge_accounts(entry, t, state, prev, record)
        for ip in sorted(set(entry.paths.values())):
            p = portal_of(ip, self.port)
            if p not in state.portals:
                self._add_portal(p)
                state.portals.add(p)

    def _converge_accounts(self, entry: Entry, t: TgtTarget, state: TgtState, prev: Entry | None,
                           record: Mapping[str, Entry]) -> None:
        known = _passwords({d: e for d, e in record.items() if d != entry.disk})
        if prev is not None:
            known.update({c.user: c.password for c, _ in prev.accounts()})
        accounts = state.accounts if state.accounts is not None else set()
        tid = str(t.tid)
        for c, outgoing in entry.accounts():
            if c.user in accounts and known.get(c.user) != c.password:
                # password changed (or unknown): recreate; deleting an account unbinds it everywhere
                self._tgtadm(f"replace CHAP account {c.user!r}", ["--mode", "account", "--op", "delete",
                                                                   "--user", c.user])
                accounts.discard(c.user)
                for tt in state.targets.values():
                    tt.accounts_in.discard(c.user)
                    tt.accounts_out.discard(c.user)
            if c.user not in accounts:
                self._tgtadm(f"create CHAP account {c.user!r}", ["--mode", "account", "--op", "new",
                                                                  "--user", c.user, "--password", c.password])
                accounts.add(c.user)
                # re-bind the account to other recorded targets that use it
                for e in record.values():
                    other = state.targets.get(e.iqn)
                    if e.disk == entry.disk or other is None:
                        continue
                    for oc, oout in e.accounts():
                        if oc.user == c.user:
                            self._bind_account(other, oc.user, oout)
            self._bind_account(t, c.user, outgoing)
        want_in = {c.user for c, out in entry.accounts() if not out}
        want_out = {c.user for c, out in entry.accounts() if out}
        for user in sorted(t.accounts_in - want_in):
            self._tgtadm(f"unbind CHAP account {user!r}", ["--mode", "account", "--op", "unbind", "--tid", tid,
                                                           "--user", user])
            t.accounts_in.discard(user)
        for user in sorted(t.accounts_out - want_out):
            self._tgtadm(f"unbind CHAP account {user!r}", ["--mode", "account", "--op", "unbind", "--tid", tid,
                                                           "--user", user, "--outgoing"])
            t.accounts_out.discard(user)
        state.accounts = accounts

    def _bind_account(self, t: TgtTarget, user: str, outgoing: bool) -> None:
        have = t.accounts_out if outgoing else t.accounts_in
        if user in have:
            return
        if outgoing and t.accounts_out:   # tgt allows one outgoing account per target
            for old in sorted(t.accounts_out):
                self._tgtadm(f"unbind CHAP account {old!r}", ["--mode", "account", "--op", "unbind",
                                                              "--tid", str(t.tid), "--user", old, "--outgoing"])
            t.accounts_out.clear()
        self._tgtadm(f"bind CHAP account {user!r} to {t.name}",
                     ["--mode", "account", "--op", "bind", "--tid", str(t.tid), "--user", user]
                     + (["--outgoing"] if outgoing else []))
        have.add(user)

    def _add_portal(self, portal: str) -> None:
        try:
            self._tgtadm(f"add portal {portal}", ["--mode", "portal", "--op", "new", "--param", f"portal={portal}"])
        except _TgtadmError as e:
            raise _TgtadmError(f"add portal {portal}", e.rc,
                               f"{e.detail} (is the address local, or net.ipv4.ip_nonlocal_bind=1? "
                               f"is {portal} used by another listener?)") from None

    def _delete_target(self, t: TgtTarget) -> None:
        """Delete a target with ``--force`` (drops its sessions); tgt refuses for a moment after I/O
        ("still active"), so retry for up to ~2 s."""
        end = time.monotonic() + 2.0
        while True:
            try:
                self._tgtadm(f"delete target {t.name}", ["--mode", "target", "--op", "delete", "--force",
                                                         "--tid", str(t.tid)])
                return
            except _TgtadmError as e:
                if "can't find the target" in e.detail:
                    return
                if time.monotonic() >= end:
                    raise
                time.sleep(0.1)

    def _prune(self, state: TgtState, record: Mapping[str, Entry]) -> None:
        """Remove from tgtd what ``record`` does not need: targets, then portals, then accounts."""
        iqns = {e.iqn for e in record.values()}
        for name, t in sorted(state.targets.items()):
            if name not in iqns:
                self._delete_target(t)
                log.info("tgt: removed target %s (tid %d)", name, t.tid)
        want = self._wanted_portals(record)
        for p in sorted(state.portals - want):
            try:
                self._tgtadm(f"delete portal {p}", ["--mode", "portal", "--op", "delete", "--param", f"portal={p}"])
            except _TgtadmError as e:
                if p in parse_portals(self._tgtadm("show portals", ["--mode", "portal", "--op", "show"])):
                    raise e
        users = set(_passwords(record))
        for user in sorted((state.accounts or set()) - users):
            self._tgtadm(f"delete CHAP account {user!r}", ["--mode", "account", "--op", "delete", "--user", user])

    def _rollback(self, disk_id: str, index: int, prev: Entry | None, record: Record) -> None:
        """Undo a failed export of ``disk_id/index``: restore the record as it was and remove what tgtd has
        beyond it (the new portal; the whole target when the disk was not exported before)."""
        try:
            self._save(record)
            self._prune(self._state(accounts=True), record)
        except BackendError as e:
            log.warning("tgt: could not undo the failed export of %s/%d: %s", disk_id, index, e)

    # ---------------------------------------------------------------- tgtd supervision

    def _pid(self) -> int | None:
        """The pid of our running tgtd: from the pid file, checked against /proc (start time, not a zombie)."""
        try:
            with open(self.pid_path, encoding="ascii") as f:
                pid_s, _, start = f.read().strip().partition(" ")
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        if not _alive(pid) or _start_time(pid) != start:
            return None
        return pid

    def _running(self) -> bool:
        """Our child tgtd is alive, or the one named by the pid file (started by an earlier agent)."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        return self._pid() is not None

    def _supervise(self) -> None:
        """Start tgtd when it is not running; after a death, restart it and replay the record."""
        if self.watch and not self._closing.is_set() and (self._watcher is None or not self._watcher.is_alive()):
            if self._wakeup is None:
                self._wakeup = os.pipe()
            self._watcher = threading.Thread(target=self._watch, name="tgtd-watch", daemon=True)
            self._watcher.start()
        if self._running():
            return
        record = self._load()
        how = self._death_reason()
        self._start()
        if not record:
            if how:
                log.warning("tgt: tgtd %s; restarted it (pid %d), nothing to replay", how, self._proc_pid())
            return
        self.restarts += 1
        log.warning("tgt: tgtd %s; restarted it (pid %d) and replaying %d disk(s)", how or "was not running",
                    self._proc_pid(), len(record))
        t0 = time.monotonic()
        state = self._read_state(accounts=True)
        failed = 0
        for d, e in sorted(record.items()):
            try:
                self._converge(e, state, e, record)
            except BackendError as err:
                failed += 1
                log.warning("tgt: replay of disk %s (%s) failed: %s", d, e.iqn, err)
        log.warning("tgt: replayed %d disk(s) in %.2f s, %d failed", len(record) - failed,
                    time.monotonic() - t0, failed)

    def _watch(self) -> None:
        """The watcher thread: wait for tgtd to exit (a pidfd, so a tgtd inherited from an earlier agent is
        watched too) and restart + replay at once, instead of at the agent's next cycle."""
        while not self._closing.is_set():
            pid = self._proc.pid if self._proc is not None and self._proc.poll() is None else self._pid()
            if pid is not None:
                self._wait_exit(pid)
            with self._lock:
                if self._closing.is_set():
                    return
                try:
                    self._supervise()
                except BackendError as e:
                    log.warning("tgt: cannot restart tgtd: %s", e)
                    self._closing.wait(2.0)

    def _wait_exit(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:   # already gone
            return
        try:
            wake = [self._wakeup[0]] if self._wakeup is not None else []
            while not self._closing.is_set():
                if select.select([fd, *wake], [], [], 5.0)[0]:
                    return
        finally:
            os.close(fd)

    def _proc_pid(self) -> int:
        return self._proc.pid if self._proc is not None else -1

    def _death_reason(self) -> str:
        p = self._proc
        if p is not None and p.returncode is not None:
            rc = p.returncode
            self._proc = None
            return f"(pid {p.pid}) died: " + (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        try:
            with open(self.pid_path, encoding="ascii") as f:
                pid = f.read().split()[0]
            return f"(pid {pid} from {self.pid_path}) is gone"
        except (OSError, IndexError):
            return ""

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

    def _start(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if self.nonlocal_bind:
            self._set_nonlocal_bind()
        try:
            if os.path.getsize(self.log_path) > 8 << 20:
                os.replace(self.log_path, self.log_path + ".1")
        except OSError:
            pass
        # a portal on port 0 gets a free port; it is only there because tgtd needs one to start
        boot = portal_of(self.listen, self.port) if self.listen else "127.0.0.1:0"
        argv = [self.tgtd_bin, "-f", "-C", str(self.control_port), "-t", str(self.io_threads),
                "--iscsi", f"portal={boot}"]
        env = self._env()
        t = str(max(1, int(round(self.ceph_timeout))))
        env["CEPH_ARGS"] = " ".join(filter(None, [env.get("CEPH_ARGS", ""), f"--client_mount_timeout {t}",
                                                  f"--rados_mon_op_timeout {t}",
                                                  f"--rbd_cache {'true' if self.rbd_cache else 'false'}"]))
        logf = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            raise PermanentBackendError(f"cannot start {self.tgtd_bin}: {e}") from None
        finally:
            logf.close()
        self._proc = proc
        # the pid file first: a tgtd we lose track of would hold the socket lock and block every restart
        tmp = self.pid_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{proc.pid} {_start_time(proc.pid)}\n")
        os.replace(tmp, self.pid_path)
        end = time.monotonic() + 5.0
        while True:
            if proc.poll() is not None:
                raise TransientBackendError(f"tgtd exited at start (status {proc.returncode}): "
                                            f"{self._log_tail()}", retry_after=5.0)
            try:
                self._tgtadm("show system", ["--mode", "sys", "--op", "show"], timeout=1.0)
                break
            except _TgtadmError:
                if time.monotonic() > end:
                    raise TransientBackendError(f"tgtd (pid {proc.pid}) does not answer on {self.socket}") from None
                time.sleep(0.02)
        if not self.listen:
            for p in parse_portals(self._tgtadm("show portals", ["--mode", "portal", "--op", "show"])):
                self._tgtadm(f"delete portal {p}", ["--mode", "portal", "--op", "delete", "--param", f"portal={p}"])
        log.info("tgt: started tgtd pid %d (control port %d, socket %s, log %s)", proc.pid, self.control_port,
                 self.socket, self.log_path)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 600))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        noise = ("RDMA", "oom-killer", "nr_open", "timer_fd", "signalfd")
        return " | ".join(ln for ln in lines[-6:] if not any(n in ln for n in noise)) or "(no message)"
