"""The one module that talks to Ceph, through Debian's ``rados``/``rbd`` Python bindings (no subprocesses).

``CephClient`` keeps one long-lived ``rados.Rados`` handle per instance (make one per process) and an
``Ioctx`` per pool. Every rados/rbd exception is translated here into a ``CephError``; nothing above this
module imports ``rados`` or ``rbd`` or catches their exceptions:

- ``CephUnavailable``: the cluster could not be reached or did not answer within ``timeout``. Retry later.
- ``PoolNotFound`` / ``ImageNotFound`` (both ``CephNotFound``): the pool or image does not exist.
- ``ImageExists``, ``ImageBusy``: ``create_image`` / ``remove_image`` refused.
- ``CephError``: anything else (permission denied, unreadable conf, ...), with librados' reason.

Bounded time: ``client mount timeout``, ``rados mon op timeout`` and ``rados osd op timeout`` are set to
``timeout`` before connecting, so librados gives up on its own (its default is to retry for 300 s). A few
calls ignore those settings (looking up a pool the client does not know waits for the latest OSD map with
no timeout at all), so every call also runs in a short-lived worker thread that the caller abandons after
``timeout`` + 1 s: no method blocks its caller much longer than ``timeout``. An abandoned call finishes in
the background when the cluster answers again; a write abandoned that way may still land, which is why the
error says "timed out" and not "failed".

The handle reconnects by itself when monitors come back (librados hunts for a monitor); it is only rebuilt
when connecting failed or the client was shut out (``ESHUTDOWN``, e.g. blocklisted).
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Callable, TypeVar

import rados
import rbd

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
        return CephError(f"ceph {what} {where}: permission denied (check the client's caps)")
    if isinstance(e, rados.ConnectionShutdown):
        return CephUnavailable(f"ceph {what} {where}: connection shut down")
    return CephError(f"ceph {what} {where}: {type(e).__name__}: {e}")


class CephClient:
    """A connection to one Ceph cluster as ``client.<client_id>``, with the image and metadata operations
    the catalog and the CLI need. Thread-safe. Connects lazily on first use; ``close()`` releases it."""

    def __init__(self, conf: str, client_id: str = "admin", timeout: float = 10.0) -> None:
        self.conf = conf
        self.client_id = client_id
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._rados: rados.Rados | None = None
        self._ioctx: dict[str, tuple[int, rados.Ioctx]] = {}
        self._inflight = 0
        self._inflight_lock = threading.Lock()

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
        """Run ``fn`` in a worker thread; wait at most ``timeout`` + a margin; translate its exceptions."""
        box: dict[str, Any] = {}

        def run() -> None:
            with self._inflight_lock:
                self._inflight += 1
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                box["error"] = e
            finally:
                with self._inflight_lock:
                    self._inflight -= 1

        t = threading.Thread(target=run, name=f"ceph-{what}", daemon=True)
        t.start()
        t.join(self.timeout + WATCHDOG_MARGIN)
        if t.is_alive():
            where = f"{pool}/{image}" if image else pool
            raise CephUnavailable(f"ceph {what} {where}: no answer within {self.timeout:g}s")
        if "error" in box:
            e = box["error"]
            if isinstance(e, CephError):
                raise e
            if isinstance(e, rados.ConnectionShutdown):
                self._reset()
            if isinstance(e, (rados.Error, rbd.Error)):
                raise _translate(what, pool, image, e) from None
            raise e
        return box["value"]  # type: ignore[no-any-return]

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

    def remove_image(self, pool: str, image: str) -> None:
        """Remove the image and its data. ``ImageBusy`` while a gateway has it open, ``ImageNotFound``."""
        self._call("remove image", pool, image, lambda: rbd.RBD().remove(self._pool(pool), image))

    # --- image metadata ---------------------------------------------------------------------------------
    def get_meta(self, pool: str, image: str, key: str) -> str | None:
        """The value of metadata ``key`` on the image, or ``None`` when the key is not set."""
        def op() -> str | None:
            with rbd.Image(self._pool(pool), image, read_only=True) as img:
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

    def close(self) -> None:
        """Release the handle, unless a call abandoned by the watchdog still uses it (then the process
        exit releases it). Idempotent."""
        with self._inflight_lock:
            busy = self._inflight > 0
        if busy:
            self._rados = None
            self._ioctx = {}
            return
        with self._lock:
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
