"""The one module that talks to Ceph, through Debian's ``rados``/``rbd`` Python bindings (no subprocesses).

``CephClient`` keeps one long-lived ``rados.Rados`` handle per instance (make one per process) and an
``Ioctx`` per pool. Every rados/rbd exception is translated here into a ``CephError``; nothing above this
module imports ``rados`` or ``rbd`` or catches their exceptions:

- ``CephUnavailable``: the cluster could not be reached or did not answer within ``timeout``. Retry later.
- ``PoolNotFound`` / ``ImageNotFound`` (both ``CephNotFound``): the pool or image does not exist.
- ``ImageExists``, ``ImageBusy``: ``create_image`` / ``remove_image`` refused.
- ``CephPermissionDenied``: the client's caps do not allow it.
- ``CephError``: anything else (permission denied, unreadable conf, ...), with librados' reason.

Bounded time: ``client mount timeout``, ``rados mon op timeout`` and ``rados osd op timeout`` are set to
``timeout`` before connecting, so librados gives up on its own (its default is to retry for 300 s). A few
calls ignore those settings (looking up a pool the client does not know waits for the latest OSD map with
no timeout at all), so every call also runs on a worker thread that the caller abandons after
``timeout`` + 1 s: no method blocks its caller much longer than ``timeout``. An abandoned call finishes in
the background when the cluster answers again; a write abandoned that way may still land, which is why the
error says "timed out" and not "failed".

The handle reconnects by itself when monitors come back (librados hunts for a monitor); it is only rebuilt
when connecting failed or the client was shut out (``ESHUTDOWN``, e.g. blocklisted).

Fencing (``agent.adapters.ceph_fencing``) uses the client-side calls at the end: every monitor's sessions,
an image's watchers and lock owner, blocklisting an address with an expiry, breaking a lock. They return the
plain records of ``agent.adapters.ceph_clients``. A monitor command that answers with an error is
``CephError`` naming the command and librados' reason (``permission denied`` names the caps).
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import threading
from typing import Any, Callable, Mapping, TypeVar

import rados
import rbd

from agent.adapters.ceph_clients import ImageClients, MonSession, join_addr, normalize
from agent.errors import AgentError

T = TypeVar("T")

#: ``layering`` + ``exclusive-lock``: what every krbd since 4.x maps, and what tgt's bs_rbd and LIO's
#: ``rbd`` backstore handle. No object-map/fast-diff/deep-flatten (older kernels refuse to map those).
KRBD_FEATURES = rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
WATCHDOG_MARGIN = 1.0


class CephError(AgentError):
    """A Ceph operation failed; the message says which operation and why."""


class CephUnavailable(CephError):
    """The cluster could not be reached, or did not answer in time. Temporary: retry later."""


class CephPermissionDenied(CephError):
    """The client's caps do not allow the operation. Permanent until the caps (or ``client_id``) change."""


class CephNotFound(CephError):
    """The pool or the image does not exist."""


class PoolNotFound(CephNotFound):
    pass


class ImageNotFound(CephNotFound):
    pass


class ImageExists(CephError):
    pass


class ImageBusy(CephError):
    """The image has watchers (a gateway still has it open) or snapshots, so it cannot be removed."""


def _translate(what: str, pool: str, image: str, e: Exception) -> CephError:
    where = f"{pool}/{image}" if image else pool
    if isinstance(e, (rbd.Timeout, rados.TimedOut)):
        return CephUnavailable(f"ceph {what} {where}: timed out")
    if isinstance(e, rbd.ImageNotFound):
        return ImageNotFound(f"ceph {what}: image {where} does not exist")
    if isinstance(e, rbd.ImageExists):
        return ImageExists(f"ceph {what}: image {where} already exists")
    if isinstance(e, (rbd.ImageBusy, rbd.ImageHasSnapshots)):
        return ImageBusy(f"ceph {what}: image {where} is in use (open by a gateway, or has snapshots)")
    if isinstance(e, (rados.PermissionError, rados.PermissionDeniedError, rbd.PermissionError)):
        return CephPermissionDenied(f"ceph {what} {where}: permission denied (check the client's caps)")
    if isinstance(e, rados.ConnectionShutdown):
        return CephUnavailable(f"ceph {what} {where}: connection shut down")
    return CephError(f"ceph {what} {where}: {type(e).__name__}: {e}")


class _Job:
    """One call handed to a worker: ``state`` goes queued -> running -> done, or queued -> cancelled when
    the caller stopped waiting before a worker picked it up (it then never runs)."""

    def __init__(self, fn: Callable[[], Any] | None) -> None:
        self.fn = fn  # None: the thread that takes it exits
        self.state = "queued"
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Workers:
    """Daemon worker threads for the watchdog: ``run(fn, timeout)`` returns ``fn()``'s result or raises
    its exception, or raises ``TimeoutError`` after ``timeout`` seconds, abandoning the call. Reused
    threads (~30 us per call, against ~0.4 ms to start a thread); another thread is started when none is
    idle, up to ``limit`` (abandoned calls keep theirs until librados returns). Daemon threads: a call stuck
    in librados never holds up the process exit."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self.running = 0

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        job = _Job(fn)
        with self._lock:
            if self._idle == 0 and self._threads < self.limit:
                self._threads += 1
                self._idle += 1
                threading.Thread(target=self._work, name="ceph-worker", daemon=True).start()
        self._queue.put(job)
        if not job.done.wait(timeout):
            with job.lock:
                if job.state == "queued":
                    job.state = "cancelled"
            raise TimeoutError
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Let every thread exit once it is idle (a thread stuck in librados exits when that call returns)."""
        with self._lock:
            n, self._threads = self._threads, 0
        for _ in range(n):
            self._queue.put(_Job(None))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.fn is None:
                return
            with job.lock:
                if job.state == "cancelled":
                    continue
                job.state = "running"
            with self._lock:
                self._idle -= 1
                self.running += 1
            try:
                job.value = job.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                job.error = e
            finally:
                with self._lock:
                    self._idle += 1
                    self.running -= 1
                job.done.set()


class CephClient:
    """A connection to one Ceph cluster as ``client.<client_id>``, with the image and metadata operations
    the catalog and the CLI need. Thread-safe. Connects lazily on first use; ``close()`` releases it."""

    def __init__(self, conf: str, client_id: str = "admin", timeout: float = 10.0,
                 settings: Mapping[str, str] | None = None, threads: int = 16) -> None:
        """``settings``: librados/librbd options set on the handle before it connects (after the timeouts);
        ``threads``: how many calls may run at once (callers that issue calls from several threads of
        their own, like fencing, raise it so that their calls do not wait for a worker)."""
        self.conf = conf
        self.client_id = client_id
        self.timeout = float(timeout)
        self.settings = dict(settings or {})
        self._lock = threading.Lock()
        self._rados: rados.Rados | None = None
        self._ioctx: dict[str, tuple[int, rados.Ioctx]] = {}
        self._threads = max(1, threads)
        self._workers = _Workers(self._threads)

    # --- plumbing --------------------------------------------------------------------------------------
    def _connect(self) -> rados.Rados:
        """The connected handle (connecting if needed). Runs in a worker thread, under ``_lock``."""
        if self._rados is not None:
            return self._rados
        if not os.path.isfile(self.conf):
            raise CephError(f"ceph conf {self.conf}: no such file")
        secs = str(max(1, math.ceil(self.timeout)))
        try:
            r = rados.Rados(conffile=self.conf, rados_id=self.client_id)
        except rados.Error as e:
            raise CephError(f"ceph conf {self.conf}: cannot be read: {type(e).__name__}") from None
        try:
            for key in ("client_mount_timeout", "rados_mon_op_timeout", "rados_osd_op_timeout"):
                r.conf_set(key, secs)
            for key, value in self.settings.items():
                r.conf_set(key, value)
            r.connect(timeout=int(secs))
        except rados.Error as e:
            r.shutdown()
            if isinstance(e, rados.TimedOut):
                raise CephUnavailable(f"ceph: cannot reach the monitors of {self.conf} "
                                      f"within {self.timeout:g}s") from None
            raise _translate("connect", self.conf, "", e) from None
        self._rados = r
        return r

    def _pool(self, pool: str) -> rados.Ioctx:
        """The ``Ioctx`` of ``pool``; ``PoolNotFound`` if it does not exist (now: a pool deleted, or
        deleted and created again, since its ``Ioctx`` was opened is noticed)."""
        with self._lock:
            r = self._connect()
        # ``pool_lookup``/``open_ioctx`` of a pool missing from the client's OSD map wait for the newest
        # map with no timeout (the watchdog bounds that); ``list_pools`` reads the local map (~0.1 ms).
        # Outside the lock, so that such a wait does not hold up calls on other pools.
        if pool not in r.list_pools() and not r.pool_exists(pool):
            raise PoolNotFound(f"ceph: pool {pool} does not exist")
        pool_id = r.pool_lookup(pool)
        with self._lock:
            cached = self._ioctx.get(pool)
            if cached is not None and cached[0] == pool_id:
                return cached[1]
            io = r.open_ioctx(pool)
            self._ioctx[pool] = (pool_id, io)  # a replaced Ioctx is left open: an abandoned call may use it
            return io

    def _reset(self) -> None:
        """Forget the handle so that the next call connects afresh (the old one is left to the process exit:
        a worker abandoned by the watchdog may still be using it)."""
        with self._lock:
            self._rados = None
            self._ioctx = {}

    def _call(self, what: str, pool: str, image: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a worker; wait at most ``timeout`` + a margin; translate its exceptions."""
        try:
            return self._workers.run(fn, self.timeout + WATCHDOG_MARGIN)
        except TimeoutError:
            where = f"{pool}/{image}" if image else pool
            raise CephUnavailable(f"ceph {what} {where}: no answer within {self.timeout:g}s") from None
        except CephError:
            raise
        except (rados.Error, rbd.Error) as e:
            if isinstance(e, rados.ConnectionShutdown):
                self._reset()
            raise _translate(what, pool, image, e) from None

    # --- pools and images -------------------------------------------------------------------------------
    def list_pools(self) -> list[str]:
        """The names of every pool."""
        def op() -> list[str]:
            with self._lock:
                return list(self._connect().list_pools())
        return self._call("list pools", "", "", op)

    def list_images(self, pool: str) -> list[str]:
        """The names of the images in ``pool``. ``PoolNotFound`` if it does not exist."""
        return self._call("list images", pool, "", lambda: list(rbd.RBD().list(self._pool(pool))))

    def image_exists(self, pool: str, image: str) -> bool:
        def op() -> bool:
            try:
                with rbd.Image(self._pool(pool), image, read_only=True):
                    return True
            except rbd.ImageNotFound:
                return False
        return self._call("open image", pool, image, op)

    def image_size(self, pool: str, image: str) -> int:
        def op() -> int:
            with rbd.Image(self._pool(pool), image, read_only=True) as img:
                return int(img.size())
        return self._call("stat image", pool, image, op)

    def create_image(self, pool: str, image: str, size: int) -> None:
        """Create a format-2 image of ``size`` bytes with ``KRBD_FEATURES`` only. ``ImageExists`` if taken."""
        def op() -> None:
            rbd.RBD().create(self._pool(pool), image, size, old_format=False, features=KRBD_FEATURES)
        self._call("create image", pool, image, op)

    def grow_image(self, pool: str, image: str, size: int) -> None:
        """Grow the image to ``size`` bytes; librbd refuses to shrink it (``CephError``). Its data is kept;
        clients that have it open see the new size (librbd's header watch)."""
        def op() -> None:
            with rbd.Image(self._pool(pool), image) as img:
                img.resize(size, allow_shrink=False)
        self._call("resize image", pool, image, op)

    def remove_image(self, pool: str, image: str) -> None:
        """Remove the image and its data. ``ImageBusy`` while a gateway has it open, ``ImageNotFound``."""
        self._call("remove image", pool, image, lambda: rbd.RBD().remove(self._pool(pool), image))

    def probe(self, pool: str, image: str) -> None:
        """Prove that the cluster answers (a monitor command) and that ``pool/image`` exists (a stat of its
        id or header object), within ``timeout``: what the tgt backend checks before ``bs_rbd`` would block
        tgtd's event loop on an unreachable cluster. ``CephUnavailable``, ``PoolNotFound``,
        ``ImageNotFound``."""
        def op() -> None:
            with self._lock:
                r = self._connect()
            ret, _, outs = r.mon_command(json.dumps({"prefix": "mon stat"}), b"", timeout=max(1, math.ceil(self.timeout)))
            if ret != 0:
                raise CephUnavailable(f"ceph: the monitors answered {ret}: {outs}")
            io = self._pool(pool)
            for obj in (f"rbd_id.{image}", f"{image}.rbd"):
                try:
                    io.stat(obj)
                    return
                except rados.ObjectNotFound:
                    continue
            raise ImageNotFound(f"ceph: image {pool}/{image} does not exist")
        self._call("probe", pool, image, op)

    # --- image metadata ---------------------------------------------------------------------------------
    def get_meta(self, pool: str, image: str, key: str) -> str | None:
        """The value of metadata ``key`` on the image, or ``None`` when the key is not set.

        Fast path, two object reads (~0.3 ms each) instead of an image open (~3-10 ms, about six reads):
        the format-2 layout librbd's own ``metadata_get`` uses, namely the image id in object
        ``rbd_id.<name>`` and the value in omap key ``metadata_<key>`` of object ``rbd_header.<id>``.
        The name is resolved on every call, so a deleted, re-created or trashed image is never read by a
        stale id. Anything unexpected (no ``rbd_id`` object: a missing or format-1 image) takes the librbd
        path, which gives the authoritative answer and error."""
        def op() -> str | None:
            io = self._pool(pool)
            try:
                raw = io.read(f"rbd_id.{image}")
                n = int.from_bytes(raw[:4], "little")
                image_id = raw[4:4 + n].decode("ascii")
                if n == 0 or len(raw) != 4 + n:
                    raise ValueError("unexpected rbd_id content")
                with rados.ReadOpCtx() as read:
                    values, _ = io.get_omap_vals_by_keys(read, (f"metadata_{key}",))
                    io.operate_read_op(read, f"rbd_header.{image_id}")
                    found = dict(values)
                value = found.get(f"metadata_{key}")
                return None if value is None else bytes(value).decode("utf-8", errors="replace")
            except (rados.ObjectNotFound, ValueError, UnicodeDecodeError):
                pass
            with rbd.Image(io, image, read_only=True) as img:
                try:
                    return str(img.metadata_get(key))
                except KeyError:
                    return None
        return self._call("read metadata of", pool, image, op)

    def set_meta(self, pool: str, image: str, key: str, value: str) -> None:
        def op() -> None:
            with rbd.Image(self._pool(pool), image) as img:
                img.metadata_set(key, value)
        self._call("write metadata of", pool, image, op)

    def remove_meta(self, pool: str, image: str, key: str) -> None:
        """Remove metadata ``key`` (nothing happens when it is not set)."""
        def op() -> None:
            with rbd.Image(self._pool(pool), image) as img:
                try:
                    img.metadata_remove(key)
                except KeyError:
                    pass
        self._call("remove metadata of", pool, image, op)

    # --- clients, for fencing ----------------------------------------------------------------------------
    def _mon(self, r: rados.Rados, cmd: dict[str, Any], target: str | None = None) -> bytes:
        """Run a monitor command on ``r``; its output, or ``CephError``/``CephUnavailable`` with the reason."""
        ret, out, outs = r.mon_command(json.dumps(cmd), b"", timeout=max(1, math.ceil(self.timeout)),
                                       target=target)
        if ret == 0:
            return bytes(out)
        what = f"mon command {cmd['prefix']!r}" + (f" on mon.{target}" if target else "")
        if -ret in (errno.EPERM, errno.EACCES):
            raise CephPermissionDenied(f"ceph {what}: permission denied "
                                       f"(check the caps of client.{self.client_id})")
        reason = f"ceph {what}: {errno.errorcode.get(-ret, ret)} {outs}".rstrip()
        if -ret in (errno.ETIMEDOUT, errno.EAGAIN, errno.ENOENT, errno.ENXIO, errno.ESHUTDOWN, errno.ECONNREFUSED):
            raise CephUnavailable(reason)   # ENOENT/ENXIO: that monitor left the map meanwhile
        raise CephError(reason)

    @staticmethod
    def _json(out: bytes, what: str) -> Any:
        try:
            return json.loads(out)
        except ValueError:
            raise CephError(f"ceph {what}: the monitor's answer is not JSON") from None

    def _handle(self) -> rados.Rados:
        with self._lock:
            return self._connect()

    def address(self) -> str:
        """This client's own address (``IP:PORT/NONCE``), as the cluster sees it."""
        return self._call("read address of", "client", "", lambda: normalize(str(self._handle().get_addrs())))

    def monitors(self) -> list[str]:
        """The names of the monitors in quorum."""
        def op() -> list[str]:
            status = self._json(self._mon(self._handle(), {"prefix": "quorum_status", "format": "json"}),
                                "quorum_status")
            names = status.get("quorum_names") if isinstance(status, dict) else None
            if not isinstance(names, list) or not names:
                raise CephUnavailable("ceph quorum_status: no monitor in quorum")
            return [str(n) for n in names]
        return self._call("list monitors of", "cluster", "", op)

    def mon_sessions(self) -> list[MonSession]:
        """Every session of every monitor in quorum (each monitor lists only its own, so all are asked, one
        after the other: up to ``timeout`` each). A monitor that does not answer is ``CephUnavailable``:
        the answer would be incomplete."""
        sessions: list[MonSession] = []
        for mon in self.monitors():
            def op(mon: str = mon) -> list[MonSession]:
                raw = self._json(self._mon(self._handle(), {"prefix": "sessions", "format": "json"}, target=mon),
                                 f"sessions of mon.{mon}")
                if not isinstance(raw, list):
                    raise CephError(f"ceph sessions of mon.{mon}: unexpected answer")
                found = []
                for s in raw:
                    if not isinstance(s, dict):
                        continue
                    entity = str(s.get("entity_name") or "")
                    vec = (s.get("addrs") or {}).get("addrvec") or []
                    addrs = tuple(dict.fromkeys(join_addr(str(a.get("addr", "")), int(a.get("nonce", 0)))
                                                for a in vec if isinstance(a, dict)))
                    if entity and addrs:
                        found.append(MonSession(mon=mon, entity=entity, addrs=addrs))
                return found
            sessions.extend(self._call("list sessions of", f"mon.{mon}", "", op))
        return sessions

    def image_clients(self, pool: str, image: str) -> ImageClients:
        """Who has the image open (its header's watchers) and who holds its exclusive lock. Opens the image
        read-write (librbd lists lock owners only then; the open takes no lock) and closes it again.
        ``ImageNotFound``/``PoolNotFound`` when it is gone."""
        def op() -> ImageClients:
            with rbd.Image(self._pool(pool), image) as img:
                watchers = tuple(normalize(str(w["addr"])) for w in img.watchers_list())
                owners = tuple(normalize(str(o["owner"])) for o in img.lock_get_owners())
            return ImageClients(pool=pool, image=image, watchers=watchers, owners=owners)
        return self._call("list clients of", pool, image, op)

    def blocklist_add(self, addr: str, expire: float) -> None:
        """Blocklist the client at ``addr`` (``IP:PORT/NONCE``) on every OSD for ``expire`` seconds (adding
        it again renews the expiry). Returns once the monitors committed it (one OSD map epoch; the
        monitors batch the commands that arrive together, one batch per ``paxos_propose_interval``)."""
        def op() -> None:
            self._mon(self._handle(), {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr,
                                       "expire": float(expire)})
        self._call("blocklist", addr, "", op)

    def blocklist_list(self) -> dict[str, str]:
        """The blocklist: address -> the UTC time its entry expires (as the monitors print it)."""
        def op() -> dict[str, str]:
            out = self._mon(self._handle(), {"prefix": "osd blocklist ls", "format": "json"}).decode()
            # 16.2 prints two JSON lists back to back: the addresses, then the ranges
            found: dict[str, str] = {}
            decoder, i = json.JSONDecoder(), 0
            while i < len(out):
                if out[i].isspace():
                    i += 1
                    continue
                try:
                    part, i = decoder.raw_decode(out, i)
                except ValueError:
                    raise CephError("ceph osd blocklist ls: the monitor's answer is not JSON") from None
                for e in part if isinstance(part, list) else []:
                    if isinstance(e, dict) and "addr" in e:
                        found[normalize(str(e["addr"]))] = str(e.get("until", ""))
            return found
        return self._call("list blocklist of", "cluster", "", op)

    def wait_for_latest_osdmap(self) -> None:
        """Block until this client has the newest OSD map (what librbd does between blocklisting a lock
        owner and breaking its lock: operations sent afterwards carry that epoch, so an OSD applies the
        blocklist before it handles them)."""
        self._call("wait for the OSD map of", "cluster", "", lambda: self._handle().wait_for_latest_osdmap())

    def break_lock(self, pool: str, image: str, owner: str) -> bool:
        """Break the image's exclusive lock if ``owner`` still holds it: True when broken, False when the
        lock is free or held by someone else now. Whether librbd also blocklists the owner is the handle's
        ``rbd_blocklist_on_break_lock`` setting."""
        def op() -> bool:
            with rbd.Image(self._pool(pool), image) as img:
                try:
                    img.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, owner)
                except rbd.ImageBusy:        # EBUSY: another client holds it now
                    return False
                except rbd.ImageNotFound:    # ENOENT from lock_break: no lock any more
                    return False
                return True
        return self._call("break the lock of", pool, image, op)

    def close(self) -> None:
        """Release the handle and the worker threads, unless a call abandoned by the watchdog still uses
        the handle (then the process exit releases it). Idempotent; the client connects again if used."""
        workers, self._workers = self._workers, _Workers(self._threads)
        workers.stop()
        with self._lock:
            if workers.running > 0:
                self._rados = None
                self._ioctx = {}
                return
            for _, io in self._ioctx.values():
                io.close()
            self._ioctx = {}
            if self._rados is not None:
                self._rados.shutdown()
                self._rados = None

    def __enter__(self) -> "CephClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
