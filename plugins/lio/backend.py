"""``LioBackend``: the ``lio`` target backend: kernel LIO through rtslib-fb, LUNs on krbd-mapped images.

One target per disk (its IQN), one TPG per path (tag = path index), LUN 0 on every TPG, one portal per TPG at
the path IP. Every TPG of a disk exists on a gateway that serves any of its paths, created in tag order
(so the relative port ids, hence the ALUA report, are the same on every gateway) and only the owned ones
are enabled; discovery lists every path. The storage object carries the disk's unit serial (the WWN), so
every gateway presents one LUN identity. docs/backend-lio.md has the whole description.

- ``export``/``unexport`` run under one process-wide lock plus an ``flock`` on the state dir: the only
  writer of LIO state in the process. They are idempotent; ``export`` with a changed definition updates in
  place (an initiator no longer admitted loses its sessions at once, CHAP applies to the next login, a
  larger size is re-read from the image header and reported at once). A disk's image is mapped with a
  fresh kernel client (``noshare``) whenever the disk goes from not served to served here, so a node whose
  client was blocklisted never serves through it again, and never reopens the image until it is asked to
  serve again.
- ``exported``, ``logged_in`` and ``fence`` read and write configfs directly (``plugins.lio.configfs``),
  take no lock and never import rtslib: the guard process fences through them. ``fence`` disables every TPG
  of ours (sessions end, logins are refused) in one bounded pass; the slower teardown (LUNs, storage
  object, unmap) happens at the next ``export``/``unexport``.
- Only what the record names is ever removed: a target, storage object or mapping made by anyone else
  survives every cleanup, whatever its name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Iterator, Mapping

from agent import statefile
from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.core.targetspec import TargetSpec
from agent.errors import BackendError, PermanentBackendError, TransientBackendError
from plugins.lio import configfs
from plugins.lio.krbd import (Krbd, Mapping as KMapping, MapRequest, Monitors, made_by, parse_keyring, parse_mon_host,
                              read_conf_value)
from plugins.lio.record import MappingRef, Owned, Record, RecordFile
from plugins.options import Options

if TYPE_CHECKING:
    from plugins.lio.rts import Identity, Lio

log = logging.getLogger(__name__)

LUN = 0
BACKSTORES = ("block", "user:rbd")

#: one writer of LIO state per process, whatever the number of backend instances
_PROCESS_LOCK = threading.RLock()


def so_name(disk: str) -> str:
    """Our storage objects' names (the record, not the name, decides what is ours)."""
    return f"pathagent-{disk}"


class LioBackend(TargetBackend):
    """See the module docstring and docs/backend-lio.md."""

    config_keys: Mapping[str, str] = {
        "backstore": "block (iblock over a krbd mapping made by the agent; default) or user:rbd (tcmu-runner's "
                     "rbd handler as this node's data client; tcmu-runner must be installed and running)",
        "dbroot": "the kernel's LIO metadata directory (persistent reservations, ALUA); created with pr/ and "
                  "alua/ (default: rtslib-fb's own, /etc/rtslib-fb-target with Debian's python3-rtslib-fb)",
        "vendor_id": "SCSI vendor id of every LUN, at most 8 characters (default PATHAGNT); the same on every node",
        "product_id": "SCSI product id, at most 16 characters (default RBD)",
        "revision": "SCSI product revision, at most 4 characters (default 0001)",
        "monitors": "monitor addresses for krbd (IPs, as in ceph.conf's mon host; default: mon host of [ceph] conf)",
        "keyring": "keyring holding the data client's cephx key (default /etc/ceph/ceph.client.<id>.keyring "
                   "when it exists; none with auth none)",
        "map_options": "extra krbd map options, comma-separated (e.g. osd_request_timeout=60); default none",
        "map_timeout": "seconds a krbd map or unmap may take before it is reported (default 30)",
        "unmap": "report the LUNs thin provisioned and accept UNMAP / WRITE SAME with UNMAP, which discard on the "
                 "krbd device and free the RBD space (block backstore; default true); false: fully provisioned",
        "fence_timeout": "seconds the fence's TPG disables may take before fence() reports it could not be "
                         "sure (default 0.25; with network.down_time it must fit target.stop_time)",
    }

    def __init__(self, context: PluginContext) -> None:
        """Reads ``[target.lio]`` (``ConfigError`` listing every bad key). Touches nothing: no configfs, no
        module, no rtslib import (the guard process and check-config construct it too)."""
        o = Options("target.lio", context.options)
        self.backstore = o.text("backstore", "block")
        if self.backstore not in BACKSTORES:
            o.problems.append(("target.lio.backstore", f"must be one of {', '.join(BACKSTORES)}"))
        self.dbroot = o.text("dbroot", "")
        if self.dbroot and not os.path.isabs(self.dbroot):
            o.problems.append(("target.lio.dbroot", "must be an absolute path"))
        vendor = o.text("vendor_id", "PATHAGNT", 8, ",=")
        product = o.text("product_id", "RBD", 16, ",=")
        revision = o.text("revision", "0001", 4, ",=")
        self._monitors_opt = o.text("monitors", "")
        if self._monitors_opt:
            try:
                parse_mon_host(self._monitors_opt)
            except ValueError as e:
                o.problems.append(("target.lio.monitors", str(e)))
        self._keyring_opt = o.text("keyring", "")
        extra = o.text("map_options", "", 1024, " ")
        self._map_options = tuple(x for x in extra.split(",") if x)
        if any(x.split("=", 1)[0] in ("name", "secret", "noshare") for x in self._map_options):
            o.problems.append(("target.lio.map_options", "name, secret and noshare are set by the backend"))
        self.map_timeout = o.number("map_timeout", 30, 1, 600)
        self.fence_timeout = o.number("fence_timeout", 0.25, 0.01, 30)
        self.unmap = o.flag("unmap", True)
        o.done()
        self._ident = (vendor, product, revision)
        self.port = int(context.port)
        self.dir = os.path.join(context.state_dir, "lio")
        self.records = RecordFile(os.path.join(self.dir, "record.json"))
        self.mark_path = os.path.join(self.dir, "fence-mark")
        self._ceph = context.ceph
        self._node = context.current_node
        self._krbd = Krbd(self.map_timeout)
        self._lio: Lio | None = None

    # ------------------------------------------------------------------ reads (no lock, no rtslib)

    def exported(self) -> frozenset[PathKey]:
        """Paths whose TPG is enabled with its LUN, among the disks the record names."""
        rec = self.records.load()
        out = set()
        try:
            for o in rec.disks.values():
                for tag in o.tags:
                    if configfs.enabled(o.iqn, tag) and configfs.has_lun(o.iqn, tag, LUN):
                        out.add(PathKey(o.disk, tag))
        except OSError as e:
            raise TransientBackendError(f"lio: cannot read configfs: {e}", retry_after=1) from None
        return frozenset(out)

    def logged_in(self) -> Mapping[str, frozenset[str]]:
        rec = self.records.load()
        out: dict[str, frozenset[str]] = {}
        try:
            for o in rec.disks.values():
                s = configfs.sessions(o.iqn)
                if s:
                    out[o.disk] = frozenset(s)
        except OSError as e:
            raise TransientBackendError(f"lio: cannot read configfs: {e}", retry_after=1) from None
        return out

    # ------------------------------------------------------------------ fence (no lock, no rtslib)

    def _mark(self) -> int:
        v = statefile.read(self.mark_path, 0) if os.path.exists(self.mark_path) else 0
        return int(v) if isinstance(v, int) else 0

    def fence(self) -> None:
        """Disable every TPG of ours (their sessions end, no login is accepted), each target on its own
        thread, all within ``fence_timeout``. Bumps the fence mark first, so that an export under way fails
        instead of enabling a TPG afterwards. ``TransientBackendError`` when a disable failed or did not
        return in time (the kernel may be waiting for commands stuck in Ceph: the address, taken down
        before, is then what stops the data path)."""
        t0 = time.monotonic()
        problems: list[str] = []
        try:
            statefile.write(self.mark_path, self._mark() + 1)
        except (OSError, ValueError) as e:
            problems.append(f"cannot write the fence mark {self.mark_path}: {e}")
        try:
            rec = self.records.load()
        except TransientBackendError as e:
            raise TransientBackendError(f"lio: fence: {e}", retry_after=0.2) from None
        done: dict[str, str] = {}

        def stop(o: Owned) -> None:
            try:
                for tag in configfs.tpg_tags(o.iqn):
                    if tag in o.tags:
                        configfs.disable(o.iqn, tag)
                done[o.iqn] = ""
            except OSError as e:
                done[o.iqn] = str(e)

        threads = [threading.Thread(target=stop, args=(o,), daemon=True, name=f"lio-fence-{o.disk}")
                   for o in rec.disks.values()]
        for t in threads:
            t.start()
        deadline = t0 + self.fence_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for o in rec.disks.values():
            if o.iqn not in done:
                problems.append(f"disabling {o.iqn} did not return within {self.fence_timeout:g} s")
            elif done[o.iqn]:
                problems.append(f"disabling {o.iqn}: {done[o.iqn]}")
        took = (time.monotonic() - t0) * 1000
        if problems:
            raise TransientBackendError(f"lio: fence: {'; '.join(problems)}", retry_after=0.2)
        log.warning("lio: fenced: disabled the TPGs of %d target(s) in %.1f ms; nothing is served",
                    len(rec.disks), took)

    # ------------------------------------------------------------------ export / unexport

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with _PROCESS_LOCK:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _rts(self) -> "Lio":
        if self._lio is None:
            try:
                from plugins.lio.rts import Lio
            except ImportError as e:
                raise PermanentBackendError(f"lio: rtslib-fb is not installed ({e}); on Debian: apt install "
                                            "python3-rtslib-fb") from None
            self._lio = Lio(self.dbroot)
        return self._lio

    def _identity(self) -> "Identity":
        from plugins.lio.rts import Identity
        return Identity(*self._ident, unmap=self.unmap)

    def _serving(self, o: Owned) -> set[int]:
        return {t for t in o.tags if configfs.enabled(o.iqn, t)}

    def export(self, path: PathKey, disk: Disk) -> None:
        spec_path = disk.path(path.index)
        if spec_path is None:
            raise PermanentBackendError(f"disk {disk.id} has no path {path.index}")
        if path.disk != disk.id:
            raise PermanentBackendError(f"path {path} does not belong to disk {disk.id}")
        if not disk.pool or not disk.image:
            raise PermanentBackendError(f"disk {disk.id} has no pool/image")
        spec = TargetSpec.of(disk, self.port, LUN)
        with self._exclusive():
            mark = self._mark()
            rec = self.records.load()
            for d, other in rec.disks.items():
                if d != disk.id and other.iqn == spec.iqn.lower():
                    raise PermanentBackendError(f"disk {disk.id}: IQN {disk.iqn} is exported for disk {d}")
            rec = self._tidy(rec, keep=disk.id)
            o = rec.disks.get(disk.id)
            before = self._serving(o) if o is not None else set()
            try:
                o = self._export(path, spec, o, before)
            except BackendError:
                self._rollback(path, before)
                raise
            if self._mark() != mark:
                self._rollback(path, set())
                raise TransientBackendError(f"lio: fenced while exporting {path}", retry_after=0.5)
            log.info("lio: exported %s (%s, TPG %d, portal %s)", path, disk.iqn, path.index,
                     spec_path.ip)

    def _export(self, path: PathKey, spec: TargetSpec, o: Owned | None, before: set[int]) -> Owned:
        rts = self._rts()
        rts.root()
        plugin = "user" if self.backstore == "user:rbd" else "block"
        if o is not None and o.iqn != spec.iqn.lower():          # the disk was renamed: drop the old target
            rts.delete_target(o.iqn)
            o = dataclasses.replace(o, iqn=spec.iqn.lower(), tags=())
            before = set()
        if o is None:
            o = Owned(disk=spec.disk, iqn=spec.iqn.lower(), so_plugin=plugin, so_name=so_name(spec.disk))
        o = dataclasses.replace(o, tags=tuple(sorted(set(o.tags) | {t.tag for t in spec.tpgs})))
        self._save(o)                                              # recorded before anything is created
        if plugin == "block":
            m = self._mapping(o, spec, fresh=not before)
            if m.id != (o.mapping.id if o.mapping else -1) or (o.mapping and o.mapping.client_addr != m.client_addr):
                o = dataclasses.replace(o, mapping=MappingRef(m.id, m.pool, m.image, m.client_addr))
                self._save(o)
            if m.size < spec.size:
                size = self._krbd.refresh(m)
                if size < spec.size:
                    raise TransientBackendError(f"lio: {spec.pool}/{spec.image} is {size} bytes, the definition "
                                                f"says {spec.size}: waiting for the resize", retry_after=2)
            why = rts.block(o.so_name, m.device, spec.serial, self._identity())
            if why is not None:
                log.warning("lio: %s: UNMAP stays off on %s (%s); the LUN is served fully provisioned", spec.disk,
                            m.device, why)
        else:
            rts.user_rbd(o.so_name, self._tcmu_config(spec), spec.size, spec.serial, self._identity())
        enable = (before & {t.tag for t in spec.tpgs}) | {path.index}
        dropped = rts.apply(spec, plugin, o.so_name, enable, configfs.sessions(o.iqn))
        if dropped:
            log.info("lio: %s: ended the sessions of %s (no longer admitted)", spec.disk, ", ".join(dropped))
        return o

    def _mapping(self, o: Owned, spec: TargetSpec, fresh: bool) -> KMapping:
        """Our mapping of the disk's image: the recorded one while the disk is served here, else a fresh
        one (a new client instance; the old one, perhaps blocklisted, is removed first)."""
        now = self._krbd.mappings()
        cur = None
        if o.mapping is not None:
            m = now.get(o.mapping.id)
            if m is not None and m.client_addr == o.mapping.client_addr:
                cur = m
        if cur is not None and (cur.pool, cur.image) != (spec.pool, spec.image):
            fresh = True                                           # the disk now lives on another image
        if cur is not None and not fresh:
            return cur
        node = self._node()
        name = self._ceph.data_id(node) if node else self._ceph.client_id
        if cur is not None:
            self._rts().delete_so(o.so_plugin, o.so_name)          # LIO holds the device open
            self._krbd.unmap(cur)
        # a mapping of ours that the record never learnt (the process died between the map and the record):
        # made by this backend's way (client name, noshare), of this image, recorded for no other disk
        known = {x.mapping.id for x in self.records.load().disks.values() if x.mapping is not None}
        for m in now.values():
            if (m.pool, m.image) == (spec.pool, spec.image) and m.id not in known and made_by(m, name) \
                    and (cur is None or m.id != cur.id):
                log.warning("lio: removing /dev/rbd%d (%s/%s as client.%s, %s): mapped by this backend but "
                            "never recorded (an export was interrupted)", m.id, m.pool, m.image, name,
                            m.client_addr)
                self._krbd.unmap(m)
        req = MapRequest(monitors=self._monitors(), name=name, pool=spec.pool, image=spec.image,
                         secret=self._secret(name), options=self._map_options)
        t0 = time.monotonic()
        try:
            m = self._krbd.map(req)
        except TransientBackendError as e:
            if req.secret:
                raise
            # the usual cause: a cephx cluster, and this node's data client has no keyring where we look
            raise TransientBackendError(f"{e}; no cephx key was given: with cephx, client.{name} needs "
                                        f"/etc/ceph/ceph.client.{name}.keyring (or [target.lio] keyring)",
                                        retry_after=e.retry_after) from None
        log.info("lio: mapped %s/%s as client.%s at %s (%s) in %.0f ms", spec.pool, spec.image, name, m.device,
                 m.client_addr, (time.monotonic() - t0) * 1000)
        return m

    def _tcmu_config(self, spec: TargetSpec) -> str:
        """tcmu-runner's rbd handler config: the image, the Ceph conf and this node's data client name (so
        that ``ceph-blocklist`` finds tcmu-runner's client as it finds tgtd's)."""
        node = self._node()
        name = self._ceph.data_id(node) if node else self._ceph.client_id
        for what, v in (("pool", spec.pool), ("image", spec.image), ("[ceph] conf", self._ceph.conf), ("client", name)):
            if not v or any(c in v for c in ";:") or any(c.isspace() for c in v):
                raise PermanentBackendError(f"lio: user:rbd cannot use the {what} {v!r} (empty, or ';', ':' or a space)")
        return f"rbd/{spec.pool}/{spec.image};conf={self._ceph.conf};id={name}"

    def _monitors(self) -> Monitors:
        text = self._monitors_opt
        if not text:
            try:
                with open(self._ceph.conf) as f:
                    text = read_conf_value(f.read(), "mon host") or ""
            except OSError as e:
                raise PermanentBackendError(f"lio: cannot read {self._ceph.conf} for the monitors: {e}") from None
            if not text:
                raise PermanentBackendError(f"lio: {self._ceph.conf} has no mon host; set [target.lio] monitors")
        try:
            return parse_mon_host(text)
        except ValueError as e:
            raise PermanentBackendError(f"lio: monitors: {e}") from None

    def _secret(self, name: str) -> str:
        path = self._keyring_opt or f"/etc/ceph/ceph.client.{name}.keyring"
        try:
            with open(path) as f:
                key = parse_keyring(f.read(), name)
        except FileNotFoundError:
            if self._keyring_opt:
                raise PermanentBackendError(f"lio: keyring {path} does not exist") from None
            return ""
        except OSError as e:
            raise PermanentBackendError(f"lio: cannot read keyring {path}: {e.strerror or e}") from None
        if key is None:
            raise PermanentBackendError(f"lio: keyring {path} has no key for client.{name}")
        return key

    def _save(self, o: Owned) -> None:
        self.records.save(self.records.load().with_disk(o))

    def _rollback(self, path: PathKey, before: set[int]) -> None:
        """After a failed export: the path's TPG disabled unless it was served before; a disk served
        nowhere here is removed entirely."""
        try:
            rec = self.records.load()
            o = rec.disks.get(path.disk)
            if o is None:
                return
            if path.index not in before:
                configfs.disable(o.iqn, path.index)
            if not self._serving(o):
                self._teardown(o)
        except (BackendError, OSError) as e:
            log.warning("lio: cleaning up after the failed export of %s: %s", path, e)

    def _teardown(self, o: Owned) -> None:
        """Remove one disk's target, storage object and mapping (in that order), then its record."""
        rts = self._rts()
        rts.delete_target(o.iqn)
        rts.delete_so(o.so_plugin, o.so_name)
        if o.mapping is not None:
            m = self._krbd.mappings().get(o.mapping.id)
            if m is not None and m.client_addr == o.mapping.client_addr:
                self._krbd.unmap(m)
        self.records.save(self.records.load().without(o.disk))
        log.info("lio: removed target %s, storage object %s%s", o.iqn, o.so_name,
                 f" and /dev/rbd{o.mapping.id}" if o.mapping else "")

    def _tidy(self, rec: Record, keep: str = "") -> Record:
        """Remove the leftovers of disks served nowhere here (after a fence, a crash mid-export)."""
        for d, o in list(rec.disks.items()):
            if d != keep and not self._serving(o):
                try:
                    self._teardown(o)
                except BackendError as e:
                    log.warning("lio: cleaning up disk %s: %s (retried later)", d, e)
        return self.records.load()

    def unexport(self, path: PathKey) -> None:
        """Disable the path's TPG (its sessions end); when no path of the disk is left here, remove its
        target, storage object and mapping. Unknown paths are a no-op."""
        with self._exclusive():
            rec = self.records.load()
            o = rec.disks.get(path.disk)
            if o is None:
                return
            rest = self._serving(o) - {path.index}
            if rest:
                try:
                    configfs.disable(o.iqn, path.index)
                except OSError as e:
                    raise TransientBackendError(f"lio: unexport {path}: {e}", retry_after=1) from None
            else:
                self._teardown(o)
            self._tidy(self.records.load())
            log.info("lio: unexported %s", path)

    def close(self) -> None:
        self._krbd.close()
