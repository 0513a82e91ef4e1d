"""The disk lifecycle behind ``pathagent disk …``: create, list, show, start, stop, update, delete.

A disk is an RBD image ``pathagent-<id>`` whose metadata key ``pathagent.disk`` holds its definition
(``agent.core.schema``), plus, while it is started, Consul keys (``agent.core.keys``): the disk key
``{prefix}/disks/{id}`` (JSON ``{"pool", "image"[, "rev"]}``) and one path key
``{prefix}/disks/{id}/{index}`` per path.

- ``create`` validates everything first, then makes the image (features krbd maps: layering,
  exclusive-lock) and writes the metadata; if writing the metadata fails the image is removed again.
  The new id is 8 random lowercase hex digits, unused in the pool and in Consul.
- ``start`` is one Consul transaction: check that the disk key does not exist, clear anything left under
  ``{prefix}/disks/{id}/`` (path keys cannot exist without the disk key except through foreign writes;
  per-key check-not-exists would need 2 operations per path, and 32 paths would not fit Consul's 64),
  set the disk key, set every path key empty. Refused (``DiskStateError``) when already started.
- ``stop`` is one transaction deleting the path keys (and pending move requests) and the disk key:
  owners unexport. Idempotent.
- ``delete`` refuses a started disk, then removes the image (retrying while a gateway still has it open,
  which it may for a moment after ``stop``).
- ``update`` rewrites the metadata, then, if the disk is started, rewrites the disk key with ``rev``
  incremented (check-and-set): the watchers wake at once and the catalog's cache key (the disk key's
  ModifyIndex) changes, so owners apply the new ACL/CHAP without a stop.

Finding a disk by id: a started disk's key names its pool and image. Otherwise the image
``pathagent-<id>`` is looked up in the configured pool (``[ceph] pool``) or the pool given explicitly.

Secrets (CHAP passwords) are held in ``Chap`` objects, which never print them; nothing here logs.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from agent.core import keys
from agent.core import schema
from agent.adapters.ceph import CephClient, CephError, CephNotFound, ImageBusy, ImageNotFound
from agent.config import Config
from agent.adapters.consul_store import ConsulStore, TxnOps
from agent.errors import AgentError, DefinitionError
from agent.core.model import Chap, Disk, PathSpec

IMAGE_PREFIX = "pathagent-"
DEFAULT_IQN_BASE = "iqn.2016-05.io.pathagent"
SECTOR = 512
LIST_WORKERS = 8


class DiskError(AgentError):
    """A disk operation was refused or failed; the message says why."""


class DiskNotFound(DiskError):
    pass


class DiskStateError(DiskError):
    """The disk is in the wrong state for the operation (started / not started)."""


def image_name(disk_id: str) -> str:
    return IMAGE_PREFIX + disk_id


def default_iqn(disk_id: str) -> str:
    return f"{DEFAULT_IQN_BASE}:{disk_id}"


def validated(disk: Disk) -> Disk:
    """``disk`` after a round trip through the schema: raises ``DefinitionError`` if it is not valid."""
    return dataclasses.replace(schema.from_dict(schema.to_dict(disk), disk.id), pool=disk.pool, image=disk.image)


@dataclass(frozen=True)
class DiskInfo:
    """One disk as ``list``/``show`` see it: where it lives, whether it is started, and its definition or
    the reason it is invalid."""

    id: str
    pool: str
    image: str
    started: bool
    disk: Disk | None = None
    error: DefinitionError | None = None


@dataclass(frozen=True)
class Record:
    """A started disk's key: where its image is, and the key's ModifyIndex and ``rev``."""

    pool: str
    image: str
    modify_index: int
    rev: int


class Disks:
    """Disk lifecycle operations on one Consul store and one Ceph cluster, as configured by ``cfg``."""

    def __init__(self, cfg: Config, store: ConsulStore, ceph: CephClient) -> None:
        self.cfg = cfg
        self.store = store
        self.ceph = ceph
        self.prefix = store.prefix

    # --- lookups -----------------------------------------------------------------------------------------
    def record(self, disk_id: str) -> Record | None:
        """The started disk's record, or ``None`` when the disk is not started."""
        e = self.store.get(keys.disk_key(self.prefix, disk_id))
        if e is None:
            return None
        return self._record(disk_id, e.value, e.modify_index)

    def _record(self, disk_id: str, value: bytes | None, modify_index: int) -> Record:
        try:
            d = json.loads(value or b"")
            return Record(str(d["pool"]), str(d["image"]), modify_index, int(d.get("rev", 0)))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DiskError(f"disk {disk_id}: its Consul key {keys.disk_key(self.prefix, disk_id)} is not "
                            "valid JSON with pool and image") from None

    def records(self) -> dict[str, Record]:
        """Every started disk's record (disk keys that cannot be read are skipped)."""
        _, entries = self.store.read_tree()
        out = {}
        for e in entries:
            kind = keys.parse(self.prefix, e.key)
            if kind is not None and kind[0] == "disk" and isinstance(kind[1], str):
                try:
                    out[kind[1]] = self._record(kind[1], e.value, e.modify_index)
                except DiskError:
                    continue
        return out

    def locate(self, disk_id: str, pool: str | None = None) -> tuple[str, str, Record | None]:
        """``(pool, image, record)`` of ``disk_id``: from its disk key when started, else the image
        ``pathagent-<id>`` in ``pool`` (default ``[ceph] pool``). ``DiskNotFound`` if neither exists."""
        if not keys.DISK_ID_RE.fullmatch(disk_id):
            raise DiskNotFound(f"{disk_id!r} is not a disk id")
        rec = self.record(disk_id)
        if rec is not None:
            return rec.pool, rec.image, rec
        p = pool or self.cfg.ceph.pool
        image = image_name(disk_id)
        if not self.ceph.image_exists(p, image):
            raise DiskNotFound(f"no disk {disk_id}: no image {p}/{image} and it is not started")
        return p, image, None

    def load(self, disk_id: str, pool: str, image: str) -> Disk:
        """The validated definition stored on ``pool/image``; ``DefinitionError`` when invalid or absent."""
        info = self._info(disk_id, pool, image, False, self.ceph.get_meta(pool, image, schema.META_KEY))
        if info.disk is None:
            assert info.error is not None
            raise info.error
        return info.disk

    def show(self, disk_id: str, pool: str | None = None) -> DiskInfo:
        p, image, rec = self.locate(disk_id, pool)
        return self._info(disk_id, p, image, rec is not None, self.ceph.get_meta(p, image, schema.META_KEY))

    def list(self, pools: Sequence[str] = ()) -> list[DiskInfo]:
        """Every disk: the images carrying ``pathagent.disk`` in ``pools`` (default ``[ceph] pool``) and
        in the pools of started disks, plus started disks whose image is gone (with the error)."""
        recs = self.records()
        scan = list(dict.fromkeys([*(pools or [self.cfg.ceph.pool]), *(r.pool for r in recs.values())]))
        located: dict[tuple[str, str], str] = {(r.pool, r.image): d for d, r in recs.items()}
        images: list[tuple[str, str]] = []
        for p in scan:
            try:
                images += [(p, i) for i in self.ceph.list_images(p)]
            except CephError:
                if p in (pools or [self.cfg.ceph.pool]):
                    raise

        def read(pool_image: tuple[str, str]) -> str | None:
            try:
                return self.ceph.get_meta(*pool_image, schema.META_KEY)
            except CephNotFound:  # removed since it was listed
                return None

        with ThreadPoolExecutor(LIST_WORKERS) as ex:
            docs = list(ex.map(read, images))
        out: dict[str, DiskInfo] = {}
        for (p, image), doc in zip(images, docs):
            disk_id = located.get((p, image)) or (_id_of(image, doc) if doc is not None else None)
            if disk_id is None:
                continue
            info = self._info(disk_id, p, image, (p, image) in located, doc)
            if disk_id not in out or info.started:
                out[disk_id] = info
        for disk_id, r in recs.items():
            if disk_id not in out:
                out[disk_id] = DiskInfo(disk_id, r.pool, r.image, True, error=DefinitionError(
                    disk_id, "(document)", f"started, but image {r.pool}/{r.image} does not exist"))
        return [out[d] for d in sorted(out)]

    @staticmethod
    def _info(disk_id: str, pool: str, image: str, started: bool, doc: str | None) -> DiskInfo:
        """``DiskInfo`` of a stored document (``None``: the image has no definition)."""
        if doc is None:
            return DiskInfo(disk_id, pool, image, started, error=DefinitionError(
                disk_id, "(document)", f"image {pool}/{image} has no {schema.META_KEY} metadata"))
        try:
            disk = dataclasses.replace(schema.parse(doc, disk_id), pool=pool, image=image)
            return DiskInfo(disk_id, pool, image, started, disk=disk)
        except DefinitionError as e:
            return DiskInfo(disk_id, pool, image, started, error=e)

    # --- create, delete ----------------------------------------------------------------------------------
    def new_id(self, pool: str) -> str:
        """8 random lowercase hex digits naming neither an image in ``pool`` nor a started disk."""
        taken = set(self.ceph.list_images(pool))
        for _ in range(20):
            disk_id = secrets.token_hex(4)
            if image_name(disk_id) not in taken and self.record(disk_id) is None:
                return disk_id
        raise DiskError("could not find an unused disk id")

    def create(self, name: str, size: int, paths: Sequence[tuple[str, int]], pool: str | None = None,
               iqn: str | None = None, initiators: Sequence[str] = (), open_: bool = False,
               chap: Chap | None = None, mutual_chap: Chap | None = None) -> Disk:
        """Create the image and its definition; returns the new ``Disk``. Raises ``DefinitionError`` for an
        invalid definition (nothing is created then), ``DiskError`` for an unusable size."""
        if size <= 0 or size % SECTOR:
            raise DiskError(f"size {size}: must be a positive multiple of {SECTOR} bytes")
        p = pool or self.cfg.ceph.pool
        disk_id = self.new_id(p)
        if open_ and initiators:
            raise DefinitionError(disk_id, "open", "an open disk takes no initiator list")
        disk = validated(Disk(
            id=disk_id, name=name, iqn=iqn or default_iqn(disk_id), serial=str(uuid.uuid4()),
            paths=tuple(PathSpec(index=i, ip=ip, prefix=prefix) for i, (ip, prefix) in enumerate(paths, 1)),
            pool=p, image=image_name(disk_id), size=size,
            initiators=None if open_ else tuple(initiators), chap=chap, mutual_chap=mutual_chap))
        self.ceph.create_image(p, disk.image, size)
        try:
            self.ceph.set_meta(p, disk.image, schema.META_KEY, schema.dump(disk))
        except BaseException:
            try:
                self.ceph.remove_image(p, disk.image)
            except CephError:
                pass
            raise
        return disk

    def delete(self, disk_id: str, pool: str | None = None, wait: float = 10.0) -> tuple[str, str]:
        """Remove the disk's image. Refused while the disk is started. Retries for up to ``wait`` seconds
        while a gateway still has the image open. Returns ``(pool, image)``."""
        p, image, rec = self.locate(disk_id, pool)
        if rec is not None:
            raise DiskStateError(f"disk {disk_id} is started; stop it first (pathagent disk stop {disk_id})")
        end = time.monotonic() + wait
        while True:
            try:
                self.ceph.remove_image(p, image)
                return p, image
            except ImageNotFound:
                raise DiskNotFound(f"no disk {disk_id}: image {p}/{image} is gone") from None
            except ImageBusy:
                if time.monotonic() >= end:
                    raise
                time.sleep(0.5)

    # --- start, stop -----------------------------------------------------------------------------------
    def start(self, disk_id: str, pool: str | None = None) -> Disk:
        """Create the disk key and its path keys in one transaction. Refuses an invalid or started disk."""
        p, image, rec = self.locate(disk_id, pool)
        if rec is not None:
            raise DiskStateError(f"disk {disk_id} is already started")
        disk = self.load(disk_id, p, image)
        dkey = keys.disk_key(self.prefix, disk_id)
        skey = keys.stopped_key(self.prefix, disk_id)
        self._wait_after_stop(disk_id, skey)
        ops = (TxnOps().check_not_exists(dkey).delete_tree(dkey + "/").delete(skey)
               .set(dkey, json.dumps({"pool": p, "image": image}).encode()))
        for path in disk.paths:
            ops.set(f"{dkey}/{path.index}", b"")
        res = self.store.txn(ops)
        if not res.ok:
            raise DiskStateError(f"disk {disk_id} is already started ({res.reason()})")
        return disk

    def _wait_after_stop(self, disk_id: str, skey: str) -> None:
        """A stopped disk's old owners unexport when they see the stop; one that is slow to see it (a
        stalled watch) is bounded like any failed owner, by the lock-delay. So a restart of the disk
        waits until ``lock_delay`` after the stop before recreating free path keys."""
        entry = self.store.get(skey)
        if entry is None or not entry.value:
            return
        try:
            at = float(json.loads(entry.value).get("at", 0))
        except (ValueError, AttributeError, TypeError):
            return
        wait = at + self.cfg.consul.lock_delay - time.time()
        if wait > 0:
            print(f"pathagent: disk {disk_id} was stopped {self.cfg.consul.lock_delay - wait:.1f}s ago; "
                  f"waiting {wait:.1f}s (the lock-delay) before starting it again", file=sys.stderr)
            time.sleep(min(wait, self.cfg.consul.lock_delay))

    def stop(self, disk_id: str) -> bool:
        """Delete the disk key, its path keys and pending moves in one transaction. Idempotent; returns
        whether the disk was started."""
        if not keys.DISK_ID_RE.fullmatch(disk_id):
            raise DiskNotFound(f"{disk_id!r} is not a disk id")
        dkey = keys.disk_key(self.prefix, disk_id)
        was = self.store.get(dkey) is not None
        ops = (TxnOps().delete_tree(dkey + "/").delete_tree(f"{self.prefix}/moves/{disk_id}/").delete(dkey))
        if was:
            ops.set(keys.stopped_key(self.prefix, disk_id), json.dumps({"at": time.time()}).encode())
        res = self.store.txn(ops)
        if not res.ok:
            raise DiskError(f"disk {disk_id}: stop failed ({res.reason()})")
        return was

    # --- update ----------------------------------------------------------------------------------------
    def update(self, disk_id: str, pool: str | None = None, name: str | None = None,
               initiators: Sequence[str] | None = None, add_initiators: Sequence[str] = (),
               remove_initiators: Sequence[str] = (), open_: bool | None = None,
               chap: Chap | None | bool = True, mutual_chap: Chap | None | bool = True) -> Disk:
        """Change the name or access control of a disk, started or not. ``initiators`` replaces the list;
        ``open_=True`` admits any initiator, ``False`` only the list. ``chap``/``mutual_chap``: a ``Chap``
        sets it, ``None`` removes it, ``True`` (default) keeps it. A started disk's owners apply the change
        without a stop (the disk key is touched)."""
        p, image, rec = self.locate(disk_id, pool)
        old = self.load(disk_id, p, image)
        current = list(old.initiators or ())
        if initiators is not None:
            current = list(initiators)
        current += [i for i in add_initiators if i not in current]
        current = [i for i in current if i not in set(remove_initiators)]
        was_open = old.initiators is None
        is_open = was_open if open_ is None else open_
        if is_open and (initiators or add_initiators):
            if open_:
                raise DefinitionError(disk_id, "open", "an open disk takes no initiator list")
            is_open = False  # giving initiators to an open disk closes it to everyone else
        new = validated(dataclasses.replace(
            old, name=name if name is not None else old.name,
            initiators=None if is_open else tuple(current),
            chap=old.chap if chap is True else (chap or None),
            mutual_chap=old.mutual_chap if mutual_chap is True else (mutual_chap or None)))
        if new != old:
            self.ceph.set_meta(p, image, schema.META_KEY, schema.dump(new))
        if rec is not None:
            self.touch(disk_id, rec)
        return new

    def touch(self, disk_id: str, rec: Record, attempts: int = 5) -> None:
        """Rewrite the disk key with ``rev`` + 1 (check-and-set), waking every watcher and changing the
        catalog's cache key. ``DiskStateError`` if the disk is stopped meanwhile."""
        dkey = keys.disk_key(self.prefix, disk_id)
        for _ in range(attempts):
            value = json.dumps({"pool": rec.pool, "image": rec.image, "rev": rec.rev + 1}).encode()
            if self.store.txn(TxnOps().cas(dkey, value, rec.modify_index)).ok:
                return
            current = self.record(disk_id)
            if current is None:
                raise DiskStateError(f"disk {disk_id} was stopped during the update; the new definition "
                                     "is stored and applies at the next start")
            rec = current
        raise DiskError(f"disk {disk_id}: its key keeps changing; the update is stored and owners will "
                        f"pick it up within [ceph] refresh")


def _id_of(image: str, doc: str) -> str | None:
    """The disk id of an image carrying a definition: from the image name ``pathagent-<id>``, else from the
    document's ``id`` (images named otherwise, e.g. created by other tools)."""
    if image.startswith(IMAGE_PREFIX) and keys.DISK_ID_RE.fullmatch(image[len(IMAGE_PREFIX):]):
        return image[len(IMAGE_PREFIX):]
    try:
        d = json.loads(doc)
    except (ValueError, RecursionError):
        return None
    v = d.get("id") if isinstance(d, dict) else None
    return v if isinstance(v, str) and keys.DISK_ID_RE.fullmatch(v) else None
