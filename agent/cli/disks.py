"""The disk lifecycle behind ``pathagent disk …``: create, list, show, start, stop, update, delete.

A disk is an RBD image ``pathagent-<id>`` whose metadata key ``pathagent.disk`` holds its definition
(``agent.core.schema``), plus, while it is started, Consul keys (``agent.core.keys``): the disk key
``{prefix}/disks/{id}`` (``agent.core.tree.disk_value``) and one path key
``{prefix}/disks/{id}/{index}`` per path.

- ``create`` validates everything first, then makes the image (features krbd maps: layering,
  exclusive-lock) and writes the metadata; if writing the metadata fails the image is removed again.
  The new id is 8 random lowercase hex digits, unused in the pool and in Consul.
- ``start`` is one Consul transaction: check that the disk key does not exist, clear anything left under
  ``{prefix}/disks/{id}/`` (unlocked leftovers only: locked ones make it refuse), set the disk key, set
  every path key empty. Refused (``DiskStateError``) when already started or still stopping.
- ``stop`` asks the owners to let go and waits for them (see ``Disks.stop``): no path of a stopped disk
  can be served anywhere when it returns, whatever state its owners were in. Idempotent.
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
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from agent.core import keys
from agent.core import schema
from agent.adapters.ceph import CephClient, CephError, CephNotFound, ImageBusy, ImageNotFound
from agent.config import Config
from agent.adapters.consul_store import ACQUIRE_BATCH, ConsulStore, TxnOps
from agent.cli.clisession import cli_session
from agent.core.model import DiskRecord
from agent.core.store import next_index
from agent.core.tree import decode_disk, disk_value, parse_tree
from agent.errors import AgentError, DefinitionError
from agent.core.model import Chap, Disk, PathKey, PathSpec

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


class Disks:
    """Disk lifecycle operations on one Consul store and one Ceph cluster, as configured by ``cfg``."""

    def __init__(self, cfg: Config, store: ConsulStore, ceph: CephClient) -> None:
        self.cfg = cfg
        self.store = store
        self.ceph = ceph
        self.prefix = store.prefix

    # --- lookups -----------------------------------------------------------------------------------------
    def record(self, disk_id: str) -> DiskRecord | None:
        """The started (or stopping) disk's record, or ``None`` when the disk is not started."""
        e = self.store.get(keys.disk_key(self.prefix, disk_id))
        if e is None:
            return None
        try:
            return decode_disk(disk_id, e.value, e.modify_index)
        except ValueError as err:
            raise DiskError(f"disk {disk_id}: its Consul key {keys.disk_key(self.prefix, disk_id)} is not "
                            f"readable ({err})") from None

    def records(self) -> dict[str, DiskRecord]:
        """Every started disk's record (disk keys that cannot be read are skipped)."""
        index, entries = self.store.read_tree()
        view = parse_tree(self.prefix, entries, index)
        return {d: r for d, r in view.disks.items() if r.pool and r.image}

    def locate(self, disk_id: str, pool: str | None = None) -> tuple[str, str, DiskRecord | None]:
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

    # --- start, stop ---------------------------------------------------------------------------------
    def start(self, disk_id: str, pool: str | None = None) -> Disk:
        """Create the disk key and its path keys in one transaction. Refuses an invalid disk, a started one
        and one that is still stopping (its owners have not all let go)."""
        if not keys.DISK_ID_RE.fullmatch(disk_id):
            raise DiskNotFound(f"{disk_id!r} is not a disk id")
        rec = self.record(disk_id)               # Consul first: a started or stopping disk needs no Ceph call
        if rec is not None:
            if rec.stopping:
                raise DiskStateError(f"disk {disk_id} is still stopping (an owner has not released its paths "
                                     f"yet); run `pathagent disk stop {disk_id}` to finish the stop first")
            raise DiskStateError(f"disk {disk_id} is already started")
        p, image, rec = self.locate(disk_id, pool)
        if rec is not None:
            raise DiskStateError(f"disk {disk_id} is already started")
        disk = self.load(disk_id, p, image)
        dkey = keys.disk_key(self.prefix, disk_id)
        index, entries = self.store.read_tree()
        view = parse_tree(self.prefix, entries, index)
        held = sorted(str(k) for k, st in view.paths.items() if k.disk == disk_id and st.session)
        if held:
            raise DiskStateError(f"disk {disk_id}: path keys {', '.join(held)} are still locked without a disk "
                                 "key (written by something else?); they must be released first")
        ops = (TxnOps().check_not_exists(dkey).delete_tree(keys.paths_prefix(self.prefix, disk_id))
               .set(dkey, disk_value(p, image)))
        for path in disk.paths:
            ops.set(keys.path_key(self.prefix, PathKey(disk_id, path.index)), b"")
        res = self.store.txn(ops)
        if not res.ok:
            raise DiskStateError(f"disk {disk_id} is already started ({res.reason()})")
        return disk

    def stop(self, disk_id: str, timeout: float = 60.0,
             progress: Callable[[str], None] = lambda msg: None) -> bool:
        """Stop a disk with its owners' acknowledgement; returns whether it was started. Idempotent (a stop
        that timed out is finished by running it again).

        1. The disk key is marked ``stopping``: owners take the addresses down, unexport and release their
           paths explicitly, and nobody acquires them any more.
        2. This command locks every path key with its own short-lived session as soon as it is free. A path
           released by its owner is free at once; one whose owner's session was invalidated is free only
           after Consul's lock-delay, by which time that owner has fenced itself. So once all are locked
           here, no node can still serve the disk, and no clock was compared to know it.
        3. The disk key, the path keys and pending moves are deleted in one transaction.

        ``DiskStateError`` (naming the paths and their holders) when owners have not let go within
        ``timeout`` seconds: the disk stays stopping (nobody serves it anew, ``disk start`` refuses)."""
        if not keys.DISK_ID_RE.fullmatch(disk_id):
            raise DiskNotFound(f"{disk_id!r} is not a disk id")
        dkey = keys.disk_key(self.prefix, disk_id)
        rec = self.record(disk_id)
        if rec is None:
            return False
        for _ in range(5):
            if rec.stopping:
                break
            value = disk_value(rec.pool, rec.image, rec.rev + 1, stopping=True)
            if self.store.txn(TxnOps().cas(dkey, value, rec.modify_index)).ok:
                progress(f"disk {disk_id}: asked its owners to let go")
                rec = dataclasses.replace(rec, stopping=True)
                break
            rec = self.record(disk_id)
            if rec is None:
                return False
        if not rec.stopping:
            raise DiskError(f"disk {disk_id}: its Consul key keeps changing; not stopped (run the command again)")
        end = time.monotonic() + timeout
        index = 0
        with cli_session(self.store, f"stop disk {disk_id}") as sid:
            while True:
                got, entries = self.store.read_tree(index, wait=1.0) if index else self.store.read_tree()
                index = next_index(index, got)
                view = parse_tree(self.prefix, entries, got)
                mine = {p: st for p, st in view.paths.items() if p.disk == disk_id}
                free = sorted(p for p, st in mine.items() if st.session is None)
                for i in range(0, len(free), ACQUIRE_BATCH):
                    ops = TxnOps()
                    for p in free[i:i + ACQUIRE_BATCH]:
                        k = keys.path_key(self.prefix, p)
                        ops.check_index(k, mine[p].modify_index).lock(k, b"", sid)
                    self.store.txn(ops)    # refused while in lock-delay, or changed meanwhile: next round
                held = {p: st for p, st in mine.items() if st.session not in (None, sid)}
                if not held and all(st.session == sid for st in mine.values()):
                    break
                if time.monotonic() >= end:
                    names = {s: s_node for s_node, s in view.nodes.items()}
                    who = ", ".join(f"{p} by {st.node or names.get(st.session or '', 'an unknown session')}"
                                    for p, st in sorted(held.items())) or \
                        ", ".join(f"{p} (in its lock-delay)" for p in free)
                    raise DiskStateError(f"disk {disk_id} is stopping, but not every owner has let go within "
                                         f"{timeout:g}s: {who}. A frozen or cut-off owner loses its session "
                                         f"and then the lock-delay runs out; run `pathagent disk stop "
                                         f"{disk_id}` again to finish")
            ops = (TxnOps().delete_tree(keys.paths_prefix(self.prefix, disk_id))
                   .delete_tree(keys.disk_moves_prefix(self.prefix, disk_id)).delete(dkey))
            res = self.store.txn(ops)
            if not res.ok:
                raise DiskError(f"disk {disk_id}: stop failed ({res.reason()})")
        return True

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

    def touch(self, disk_id: str, rec: DiskRecord, attempts: int = 5) -> None:
        """Rewrite the disk key with ``rev`` + 1 (check-and-set), waking every watcher and changing the
        catalog's cache key. ``DiskStateError`` if the disk is stopped meanwhile."""
        dkey = keys.disk_key(self.prefix, disk_id)
        for _ in range(attempts):
            value = disk_value(rec.pool, rec.image, rec.rev + 1, rec.stopping)
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
