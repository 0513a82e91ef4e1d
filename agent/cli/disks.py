"""The disk lifecycle behind ``pathagent disk …``: create, import, list, show, start, stop, update, resize,
delete.

A disk is an RBD image whose metadata key ``pathagent.disk`` holds its definition (``agent.core.schema``):
``pathagent-<id>`` when ``create`` made it, any image for ``import``. Its name, IQN and path addresses are
claimed in Consul (``agent.core.claims``: ``{prefix}/claims/…``) so that no two disks share them. While it
is started it also has the disk key ``{prefix}/disks/{id}`` (``agent.core.tree.disk_value``) and one path
key ``{prefix}/disks/{id}/{index}`` per path (``agent.core.keys``).

Every command takes the disk's id or its name (``resolve``). Each one is a sequence of steps, each of them
atomic, ordered so that a command killed between two steps leaves nothing that the same command run again
does not finish (or ``disk delete`` remove); ``agent.cli.failpoints`` names the steps so the tests kill
the command at each of them:

- ``create``: claim (the name claim locked by this command's session) → create the image → write the
  definition → unlock. An unlocked name claim without a definition is an interrupted create: running the
  same create again adopts its id and finishes; running it when it has finished says so (exit 0) or, with
  another definition, refuses.
- ``import``: claim → write the definition on the existing image (its data is not touched) → unlock.
- ``start``: claim again (atomically: a value another disk holds refuses the start) → one transaction
  that creates the disk key and the path keys.
- ``stop``: mark the disk key ``stopping`` → wait until the owners let go (see ``stop``) → delete the keys.
  Refused while initiators are logged in (as the agents report them) unless ``force``.
- ``delete``: remove the image (``create``d disks) or the definition (``import``ed ones keep their image)
  → drop the claims. Refused while started unless ``force`` (which stops it first).
- ``update`` and ``resize``: claim (a new name) / grow the image → write the definition → touch the disk
  key (``rev`` + 1, check-and-set) so the owners apply it without a stop.

Secrets (CHAP passwords) are held in ``Chap`` objects, which never print them; nothing here logs.
"""
from __future__ import annotations

import builtins
import dataclasses
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from agent.adapters.ceph import CephClient, CephError, CephNotFound, ImageBusy, ImageExists, ImageNotFound
from agent.adapters.consul_store import ACQUIRE_BATCH, ConsulStore, TxnOps
from agent.cli import failpoints
from agent.cli.clisession import TTL, cli_session, holder_is_gone
from agent.cli.diskargs import AccessArgs, PathArg, human_size, path_arg, path_specs
from agent.config import Config
from agent.core import claims, keys, schema
from agent.core.claims import Claim, ClaimValue, Held
from agent.core.model import Chap, Disk, DiskRecord, PathKey
from agent.core.store import MAX_TXN_OPS, next_index
from agent.core.tree import decode_disk, disk_value, logins_by_disk, parse_tree
from agent.errors import AgentError, DefinitionError

IMAGE_PREFIX = "pathagent-"
DEFAULT_IQN_BASE = "iqn.2016-05.io.pathagent"
LIST_WORKERS = 8
CLAIM_ATTEMPTS = 4


class DiskError(AgentError):
    """A disk operation was refused or failed; the message says why (exit 1)."""


class DiskNotFound(DiskError):
    pass


class DiskStateError(DiskError):
    """The disk is in the wrong state for the operation (started / not started / unfinished)."""


class DiskConflict(DiskError):
    """A name, IQN or path IP is another disk's."""


class DiskBusy(DiskError):
    """Another command works on the disk right now, or initiators use it."""


class NeedsFlag(DiskError):
    """The change does more than the options say; the message names the flag that confirms it."""


def image_name(disk_id: str) -> str:
    return IMAGE_PREFIX + disk_id


def default_iqn(disk_id: str) -> str:
    return f"{DEFAULT_IQN_BASE}:{disk_id}"


def validated(disk: Disk) -> Disk:
    """``disk`` after a round trip through the schema: raises ``DefinitionError`` if it is not valid."""
    return dataclasses.replace(schema.from_dict(schema.to_dict(disk), disk.id), pool=disk.pool, image=disk.image)


def label(disk_id: str, name: str | None) -> str:
    return f"{disk_id} ({name})" if name else disk_id


def access_text(disk: Disk) -> str:
    """One line an admin reads after every access change."""
    if disk.initiators is None:
        who = "any initiator"
    elif disk.initiators:
        who = "only " + ", ".join(disk.initiators)
    else:
        who = "no initiator (locked)"
    if disk.chap is None:
        auth = "no CHAP"
    else:
        auth = f"CHAP user {disk.chap.user}" + (f", mutual CHAP user {disk.mutual_chap.user}"
                                               if disk.mutual_chap else "")
    return f"access: {who}; {auth}"


@dataclass(frozen=True)
class NewDisk:
    """What ``create`` and ``import`` were asked for (already checked by ``agent.cli.diskargs``)."""

    name: str
    paths: tuple[PathArg, ...]
    access: AccessArgs
    size: int = 0                      # create only
    pool: str | None = None            # create only (default ``[ceph] pool``)
    image: tuple[str, str] | None = None   # import only: (pool, image)
    iqn: str | None = None
    serial: str | None = None          # import only

    @property
    def op(self) -> str:
        return "import" if self.image is not None else "create"


@dataclass(frozen=True)
class AccessChange:
    """``disk update``'s access options. ``open_``: True (``--open``), False (``--closed``) or None."""

    initiators: tuple[str, ...] | None = None
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    open_: bool | None = None
    admit_none: bool = False
    chap: Chap | None | bool = True            # a Chap sets it, None removes it, True keeps it
    mutual_chap: Chap | None | bool = True


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
    name: str = ""                     # from its name claim, when the definition cannot tell
    undefined: bool = False            # the image has no definition at all (or is gone)


@dataclass(frozen=True)
class Located:
    """Where a disk is: its image, its record while started, its name claim (``None`` for disks made
    before claims existed, or by other tools)."""

    id: str
    pool: str
    image: str
    record: DiskRecord | None
    claim: Held | None

    @property
    def imported(self) -> bool:
        return self.image != image_name(self.id)


class Disks:
    """Disk lifecycle operations on one Consul store and one Ceph cluster, as configured by ``cfg``."""

    def __init__(self, cfg: Config, store: ConsulStore, ceph: CephClient,
                 step: Callable[[str], None] = failpoints.reached) -> None:
        self.cfg = cfg
        self.store = store
        self.ceph = ceph
        self.prefix = store.prefix
        self.step = step

    # --- Consul reads ---------------------------------------------------------------------------------
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

    def claims(self) -> dict[Claim, Held]:
        entries = self.store.read_under(keys.claims_prefix(self.prefix))
        return claims.read(self.prefix, ((e.key, e.value, e.modify_index, e.session) for e in entries))

    def logins(self, disk_id: str) -> dict[str, frozenset[str]]:
        """Node -> initiators logged in on it to ``disk_id``, as the live agents last reported (every few
        seconds; see docs/disks.md)."""
        entries = self.store.read_under(keys.logins_prefix(self.prefix))
        return dict(logins_by_disk(self.prefix, entries).get(disk_id, {}))

    # --- finding a disk ---------------------------------------------------------------------------------
    def resolve(self, ref: str, pool: str | None = None, held: Mapping[Claim, Held] | None = None) -> Located:
        """The disk ``ref`` names, by id or by name. By id: its disk key, its name claim, or the image
        ``pathagent-<id>`` in ``pool`` (default ``[ceph] pool``). By name: its name claim, else (disks
        without claims) a scan of the definitions. ``DiskNotFound`` when nothing matches; ``DiskError``
        when ``ref`` is the name of one disk and the id of another."""
        held = self.claims() if held is None else held
        reg = claims.registry(held)
        by_name = held.get(claims.name_claim(ref))
        name_id = by_name.disk if by_name is not None else None
        by_id = self._locate_id(ref, pool, reg) if keys.DISK_ID_RE.fullmatch(ref) else None
        if by_id is not None and name_id is not None and name_id != ref:
            raise DiskError(f"{ref!r} is the id of one disk and the name of disk {name_id}; give the id "
                            f"{name_id} for the latter")
        if by_id is not None:
            return by_id
        if name_id is not None:
            found = self._locate_id(name_id, None, reg)
            if found is not None:
                return found
        matches = [i for i in self.list(() if pool is None else (pool,)) if i.disk is not None
                   and i.disk.name.lower() == ref.lower()]
        if len(matches) > 1:
            raise DiskError(f"several disks are named {ref!r} ({', '.join(i.id for i in matches)}); give the id")
        if matches:
            m = matches[0]
            return Located(m.id, m.pool, m.image, self.record(m.id), None)
        raise DiskNotFound(f"no disk {ref!r}: no disk has that id or name")

    def _locate_id(self, disk_id: str, pool: str | None,
                   reg: Mapping[str, tuple[Claim, Held]]) -> Located | None:
        rec = self.record(disk_id)
        entry = reg.get(disk_id)
        held = entry[1] if entry is not None else None
        if rec is not None:
            return Located(disk_id, rec.pool, rec.image, rec, held)
        if held is not None and held.value is not None:
            return Located(disk_id, held.value.pool, held.value.image, None, held)
        p = pool or self.cfg.ceph.pool
        if self.ceph.image_exists(p, image_name(disk_id)):
            return Located(disk_id, p, image_name(disk_id), None, None)
        return None

    def _document(self, pool: str, image: str) -> str | None:
        try:
            return self.ceph.get_meta(pool, image, schema.META_KEY)
        except CephNotFound:
            return None

    def load(self, loc: Located) -> Disk:
        """The validated definition of a located disk: ``DefinitionError`` when it is invalid,
        ``DiskStateError`` when it was never finished (an interrupted create or import)."""
        info = self._info(loc.id, loc.pool, loc.image, loc.record is not None, self._document(loc.pool, loc.image))
        if info.disk is not None:
            return info.disk
        if info.undefined and loc.claim is not None and loc.record is None:
            raise DiskStateError(self._unfinished(loc.id, loc.claim))
        assert info.error is not None
        raise info.error

    def _unfinished(self, disk_id: str, held: Held) -> str:
        v = held.value
        assert v is not None
        return (f"disk {label(disk_id, v.name)} is unfinished: its `disk {v.op or 'create'}` was interrupted "
                f"before {v.pool}/{v.image} got its definition; run the same command again to finish it, "
                f"or `pathagent disk delete {disk_id}` to drop it")

    def show(self, ref: str, pool: str | None = None) -> DiskInfo:
        loc = self.resolve(ref, pool)
        info = self._info(loc.id, loc.pool, loc.image, loc.record is not None, self._document(loc.pool, loc.image))
        if info.undefined and loc.claim is not None and loc.claim.value is not None and loc.record is None:
            return dataclasses.replace(info, error=DefinitionError(loc.id, "(document)",
                                                                   self._unfinished(loc.id, loc.claim)),
                                       name=loc.claim.value.name)
        return info

    def list(self, pools: Sequence[str] = (), held: Mapping[Claim, Held] | None = None) -> list[DiskInfo]:
        """Every disk: the images carrying ``pathagent.disk`` in ``pools`` (default: ``[ceph] pool``, the
        pools of started disks and of claimed ones), started disks whose image is gone, and unfinished
        disks (claims without a definition), each with its error."""
        recs = self.records()
        held = self.claims() if held is None else held
        reg = claims.registry(held)
        asked = list(pools) or [self.cfg.ceph.pool]
        scan = list(dict.fromkeys([*asked, *(r.pool for r in recs.values()),
                                   *(() if pools else (h.value.pool for _, h in reg.values() if h.value))]))
        located: dict[tuple[str, str], str] = {(r.pool, r.image): d for d, r in recs.items()}
        located.update({(h.value.pool, h.value.image): d for d, (_, h) in reg.items() if h.value})
        images: list[tuple[str, str]] = []
        for p in scan:
            try:
                images += [(p, i) for i in self.ceph.list_images(p)]
            except CephError:
                if p in asked:
                    raise

        with ThreadPoolExecutor(LIST_WORKERS) as ex:
            docs = list(ex.map(lambda pi: self._document(*pi), images))
        out: dict[str, DiskInfo] = {}
        for (p, image), doc in zip(images, docs):
            disk_id = located.get((p, image)) or (_id_of(image, doc) if doc is not None else None)
            if disk_id is None or (doc is None and (p, image) not in located):
                continue
            info = self._info(disk_id, p, image, disk_id in recs, doc)
            if disk_id not in out or info.started:
                out[disk_id] = info
        for disk_id, r in recs.items():
            if disk_id not in out:
                out[disk_id] = DiskInfo(disk_id, r.pool, r.image, True, error=DefinitionError(
                    disk_id, "(document)", f"started, but image {r.pool}/{r.image} does not exist"))
        for disk_id, (_, h) in reg.items():
            v = h.value
            assert v is not None
            if (pools and v.pool not in pools) or (disk_id in out and not out[disk_id].undefined):
                continue
            sess = self.store.session_info(h.session) if h.session is not None else None
            if sess is not None and not holder_is_gone(sess):
                why = f"being {'imported' if v.op == 'import' else 'created'} by another command"
            else:
                why = self._unfinished(disk_id, h)
            out[disk_id] = DiskInfo(disk_id, v.pool, v.image, disk_id in recs, name=v.name,
                                    error=DefinitionError(disk_id, "(document)", why))
        return [out[d] for d in sorted(out)]

    @staticmethod
    def _info(disk_id: str, pool: str, image: str, started: bool, doc: str | None) -> DiskInfo:
        """``DiskInfo`` of a stored document (``None``: the image has no definition)."""
        if doc is None:
            return DiskInfo(disk_id, pool, image, started, undefined=True, error=DefinitionError(
                disk_id, "(document)", f"image {pool}/{image} has no {schema.META_KEY} metadata"))
        try:
            disk = dataclasses.replace(schema.parse(doc, disk_id), pool=pool, image=image)
            return DiskInfo(disk_id, pool, image, started, disk=disk)
        except DefinitionError as e:
            return DiskInfo(disk_id, pool, image, started, error=e)

    # --- claims -------------------------------------------------------------------------------------------
    def _definitions(self, held: Mapping[Claim, Held]) -> dict[str, frozenset[Claim]]:
        """The claims every valid definition implies (disks without claim keys included)."""
        return {i.id: claims.of_disk(i.disk) for i in self.list(held=held) if i.disk is not None}

    def _claim(self, disk_id: str, want: frozenset[Claim], value: ClaimValue, held: Mapping[Claim, Held],
               name: str, lock: str | None = None, definitions: Mapping[str, frozenset[Claim]] = {}) -> None:
        """Make ``disk_id``'s claim keys exactly ``want``, all or nothing (the drops, ours anyway, in a
        second transaction). The name claim carries ``value``'s name and op and is locked by ``lock``
        when given. ``DiskConflict`` naming every value another disk holds."""
        for _ in range(CLAIM_ATTEMPTS):
            found = claims.conflicts(disk_id, want, held, definitions)
            if found:
                raise DiskConflict(f"disk {label(disk_id, name)}: " + "; ".join(c.message() for c in found))
            plan = claims.plan(disk_id, want, held)
            name_c = claims.name_claim(name)
            plain = dataclasses.replace(value, name="", op="").encode()
            ops = TxnOps()
            for c, index in [*((c, 0) for c in plan.create), *plan.keep]:
                k = keys.claim_key(self.prefix, *c)
                if c == name_c:
                    if lock is not None:
                        (ops.check_not_exists(k) if index == 0 else ops.check_index(k, index)).lock(
                            k, value.encode(), lock)
                    else:
                        ops.cas(k, value.encode(), index)
                elif index == 0 or (held[c].value != dataclasses.replace(value, name="", op="")):
                    ops.cas(k, plain, index)
                else:
                    ops.check_index(k, index)
            if len(ops.ops) > MAX_TXN_OPS:
                raise DiskError(f"disk {disk_id}: too many values to claim in one transaction")
            if not ops.ops or self.store.txn(ops).ok:
                drops = TxnOps()
                for c, index in plan.drop:
                    drops.delete_cas(keys.claim_key(self.prefix, *c), index)
                for i in range(0, len(drops.ops), MAX_TXN_OPS):
                    self.store.txn(TxnOps(drops.ops[i:i + MAX_TXN_OPS]))   # ours: a refusal is a later change
                return
            held = self.claims()     # something changed meanwhile: look again
        raise DiskError(f"disk {disk_id}: its claims keep changing; run the command again")

    def _release(self, disk_id: str, held: Mapping[Claim, Held]) -> None:
        ops = TxnOps()
        for c, h in sorted(held.items()):
            if h.disk == disk_id:
                ops.delete_cas(keys.claim_key(self.prefix, *c), h.modify_index)
        for i in range(0, len(ops.ops), MAX_TXN_OPS):
            self.store.txn(TxnOps(ops.ops[i:i + MAX_TXN_OPS]))

    def _unlock(self, disk_id: str, name: str, value: ClaimValue, sid: str) -> None:
        k = keys.claim_key(self.prefix, *claims.name_claim(name))
        self.store.txn(TxnOps().unlock(k, value.encode(), sid))  # refused only if no longer ours: fine

    def _wait_free(self, h: Held, name: str) -> None:
        """The name claim ``h`` is locked: refuse while its command runs; end the session of a command
        on this host that was killed (it would hold the claim for up to twice its TTL)."""
        assert h.session is not None
        info = self.store.session_info(h.session)
        if info is not None and holder_is_gone(info):
            self.store.destroy_session(h.session)
            return
        if info is not None:
            v = h.value
            raise DiskBusy(f"disk {label(h.disk or '?', name)} is being {'imported' if v and v.op == 'import' else 'created'} "
                           f"by another pathagent command ({info.name.partition(': ')[2] or info.id}); if that "
                           f"command was killed on another host, its session ends within {2 * TTL:g}s: run "
                           "this again then")

    # --- create, import ------------------------------------------------------------------------------------
    def new_id(self, pool: str, held: Mapping[Claim, Held]) -> str:
        """8 random lowercase hex digits naming no image in ``pool``, no started disk and no claimed one."""
        taken = set(self.ceph.list_images(pool))
        reg = claims.registry(held)
        for _ in range(20):
            disk_id = secrets.token_hex(4)
            if image_name(disk_id) not in taken and disk_id not in reg and self.record(disk_id) is None:
                return disk_id
        raise DiskError("could not find an unused disk id")

    def _build(self, req: NewDisk, disk_id: str, pool: str, image: str, size: int,
               serial: str | None = None) -> Disk:
        a = req.access
        return validated(Disk(
            id=disk_id, name=req.name, iqn=req.iqn or default_iqn(disk_id),
            serial=req.serial or serial or str(uuid.uuid4()), paths=path_specs(req.paths), pool=pool, image=image,
            size=size, initiators=a.initiators, chap=a.chap, mutual_chap=a.mutual_chap))

    @staticmethod
    def _same(req: NewDisk, disk: Disk) -> builtins.list[str]:
        """The fields where ``disk`` differs from what ``req`` asks for ([] = the same disk)."""
        a = req.access
        diff = []
        if req.op == "create" and disk.size != req.size:
            diff.append(f"size {human_size(disk.size)}")
        if req.op == "create" and req.pool and disk.pool != req.pool:
            diff.append(f"pool {disk.pool}")
        if tuple(path_arg(p) for p in disk.paths) != req.paths:
            diff.append("paths " + " ".join(f"{p.ip}/{p.prefix}" for p in disk.paths))
        if req.iqn and disk.iqn != req.iqn:
            diff.append(f"iqn {disk.iqn}")
        if req.serial and disk.serial != req.serial:
            diff.append(f"serial {disk.serial}")
        if (disk.initiators is None) != (a.initiators is None) or set(disk.initiators or ()) != set(a.initiators or ()):
            diff.append("initiators")
        if disk.chap != a.chap or disk.mutual_chap != a.mutual_chap:
            diff.append("CHAP")
        return diff

    def _existing(self, req: NewDisk, held: Mapping[Claim, Held]) -> tuple[str | None, Disk | None]:
        """What the name claim of ``req.name`` says: ``(None, None)`` free; ``(id, disk)`` a finished disk
        with that name; ``(id, None)`` an interrupted ``req.op`` of the same target this command finishes.
        Raises when the name is another disk's or another command's."""
        h = held.get(claims.name_claim(req.name))
        if h is None:
            return None, None
        if h.value is None:
            raise DiskConflict(f"the name {req.name} is claimed by an unreadable key "
                               f"{keys.claim_key(self.prefix, *claims.name_claim(req.name))}")
        if h.session is not None:
            self._wait_free(h, req.name)
        v = h.value
        doc = self._document(v.pool, v.image)
        if doc is not None:
            info = self._info(v.disk, v.pool, v.image, False, doc)
            if info.disk is None:
                raise DiskConflict(f"the name {req.name} is disk {v.disk}'s (its definition is invalid: "
                                   f"{info.error})")
            return v.disk, info.disk
        want = req.image if req.image is not None else (req.pool or self.cfg.ceph.pool, image_name(v.disk))
        if (v.op or "create") != req.op or (v.pool, v.image) != want:
            raise DiskConflict(self._unfinished(v.disk, h) + f"; it is not this {req.op}")
        return v.disk, None

    def _claim_new(self, disk: Disk, value: ClaimValue, held: Mapping[Claim, Held], sid: str) -> bool:
        """Claim a new disk's values, its name claim locked by ``sid`` (``create``, ``import``). False when
        the name was free in ``held`` but another command took it meanwhile (the caller looks again);
        ``DiskConflict`` for anything else another disk holds."""
        try:
            self._claim(disk.id, claims.of_disk(disk), value, held, disk.name, sid, self._definitions(held))
        except DiskConflict:
            name = claims.name_claim(disk.name)
            if name in self.claims() and name not in held:
                return False
            raise
        return True

    def create(self, req: NewDisk) -> tuple[Disk, bool]:
        """Create the image and its definition. Returns ``(disk, False)``, or ``(disk, True)`` when a disk
        with this name and this definition exists already (nothing changed). ``DiskConflict`` when the
        name, IQN or an IP is another disk's; ``DefinitionError`` cannot happen for checked arguments."""
        pool = req.pool or self.cfg.ceph.pool
        for _ in range(CLAIM_ATTEMPTS):
            held = self.claims()
            disk_id, done = self._existing(req, held)
            if done is not None:
                diff = self._same(req, done)
                if diff:
                    raise DiskConflict(f"a disk named {req.name} exists already ({done.id}), with another "
                                       f"definition ({', '.join(diff)})")
                return done, True
            disk_id = disk_id or self.new_id(pool, held)
            image = image_name(disk_id)
            disk = self._build(req, disk_id, pool, image, req.size)
            value = ClaimValue(disk_id, pool, image, req.name, "create")
            with cli_session(self.store, f"create disk {req.name}", behavior="release") as sid:
                if not self._claim_new(disk, value, held, sid):
                    continue        # another command took the name meanwhile: look at it again
                self.step("create:claimed")
                self._make_image(pool, image, req.size)
                self.step("create:image")
                self.ceph.set_meta(pool, image, schema.META_KEY, schema.dump(disk))
                self.step("create:defined")
                self._unlock(disk_id, req.name, value, sid)
            return disk, False
        raise DiskError(f"the name {req.name} keeps changing hands; run the command again")

    def _make_image(self, pool: str, image: str, size: int) -> None:
        """Create ``pool/image`` of ``size``; one left by an interrupted create (no definition, so never
        served) of another size is made again."""
        try:
            self.ceph.create_image(pool, image, size)
            return
        except ImageExists:
            pass
        if self.ceph.image_size(pool, image) != size:
            self.ceph.remove_image(pool, image)
            self.ceph.create_image(pool, image, size)

    def import_(self, req: NewDisk) -> tuple[Disk, bool]:
        """Make the existing image ``req.image`` a disk: its definition is written as metadata, its data is
        not touched, its size is what it is. ``(disk, True)`` when it is this disk already."""
        assert req.image is not None
        pool, image = req.image
        if not self.ceph.image_exists(pool, image):
            raise DiskNotFound(f"--image {pool}/{image}: no such image")
        for _ in range(CLAIM_ATTEMPTS):
            held = self.claims()
            mine = held.get(claims.name_claim(req.name))
            if mine is not None and mine.session is not None:
                self._wait_free(mine, req.name)      # a killed import of ours: end its session first
            doc = self._document(pool, image)
            if doc is not None:
                other = _id_of(image, doc)
                info = self._info(other, pool, image, False, doc) if other else None
                if info is None or info.disk is None:
                    raise DiskStateError(f"image {pool}/{image} carries a {schema.META_KEY} definition that is "
                                         f"not valid ({info.error if info else 'no disk id'}); remove it first "
                                         f"(rbd image-meta remove {pool}/{image} {schema.META_KEY})")
                diff = self._same(req, info.disk)
                if info.disk.name != req.name or diff:
                    raise DiskStateError(f"image {pool}/{image} is disk {label(info.disk.id, info.disk.name)} "
                                         f"already" + (f" (differing in {', '.join(diff)})" if diff else ""))
                return info.disk, True
            for c, h in held.items():
                if h.value is not None and (h.value.pool, h.value.image) == (pool, image) and c[0] == "name" \
                        and c != claims.name_claim(req.name):
                    raise DiskConflict(f"image {pool}/{image} is being imported as disk "
                                       f"{label(h.value.disk, h.value.name)}: " + self._unfinished(h.value.disk, h))
            disk_id, done = self._existing(req, held)
            if done is not None:
                raise DiskConflict(f"a disk named {req.name} exists already ({done.id}, {done.pool}/{done.image})")
            disk_id = disk_id or self.new_id(pool, held)
            disk = self._build(req, disk_id, pool, image, self.ceph.image_size(pool, image))
            value = ClaimValue(disk_id, pool, image, req.name, "import")
            with cli_session(self.store, f"import disk {req.name}", behavior="release") as sid:
                if not self._claim_new(disk, value, held, sid):
                    continue        # another command took the name meanwhile: look at it again
                self.step("import:claimed")
                self.ceph.set_meta(pool, image, schema.META_KEY, schema.dump(disk))
                self.step("import:defined")
                self._unlock(disk_id, req.name, value, sid)
            return disk, False
        raise DiskError(f"the name {req.name} keeps changing hands; run the command again")

    # --- delete -------------------------------------------------------------------------------------------
    def delete(self, ref: str, pool: str | None = None, wait: float = 10.0, force: bool = False,
               timeout: float = 60.0, progress: Callable[[str], None] = lambda msg: None) -> tuple[Located, str]:
        """Remove the disk: the image and its data for a disk ``create`` made; only the definition for an
        imported image (its data stays). Then its claims. Refused while started, unless ``force`` (then it
        is stopped first, cutting off its initiators). Retries for up to ``wait`` seconds while a gateway
        still has the image open. Returns where it was and what was removed."""
        held = self.claims()
        loc = self.resolve(ref, pool, held)
        if loc.claim is not None and loc.claim.session is not None:
            self._wait_free(loc.claim, loc.claim.value.name if loc.claim.value else ref)   # a create still running
        if loc.record is not None:
            if not force:
                raise DiskStateError(f"disk {loc.id} is started; stop it first (pathagent disk stop {loc.id}), "
                                     "or add --force to stop and delete it")
            self.stop(loc.id, timeout=timeout, force=True, progress=progress)
        if loc.imported:
            try:
                self.ceph.remove_meta(loc.pool, loc.image, schema.META_KEY)
                what = f"definition removed from {loc.pool}/{loc.image}; the image and its data are kept"
            except ImageNotFound:
                what = f"image {loc.pool}/{loc.image} was gone already"
        else:
            what = self._remove_image(loc, wait)
        self.step("delete:removed")
        self._release(loc.id, self.claims())
        return loc, what

    def _remove_image(self, loc: Located, wait: float) -> str:
        end = time.monotonic() + wait
        while True:
            try:
                self.ceph.remove_image(loc.pool, loc.image)
                return f"{loc.pool}/{loc.image} removed"
            except ImageNotFound:
                if loc.claim is None:
                    raise DiskNotFound(f"no disk {loc.id}: image {loc.pool}/{loc.image} is gone") from None
                return f"image {loc.pool}/{loc.image} was gone already"
            except ImageBusy:
                if time.monotonic() >= end:
                    raise
                time.sleep(0.5)

    # --- start, stop ---------------------------------------------------------------------------------
    def start(self, ref: str, pool: str | None = None) -> Disk:
        """Claim the disk's values again (refused when another disk holds one), then create the disk key
        and its path keys in one transaction. Refuses an invalid or unfinished disk, a started one and one
        that is still stopping (its owners have not all let go)."""
        held = self.claims()
        loc = self.resolve(ref, pool, held)
        disk_id, rec = loc.id, loc.record
        if rec is not None:
            if rec.stopping:
                raise DiskStateError(f"disk {disk_id} is still stopping (an owner has not released its paths "
                                     f"yet); run `pathagent disk stop {disk_id}` to finish the stop first")
            raise DiskStateError(f"disk {disk_id} is already started")
        disk = self.load(loc)
        if loc.claim is not None and loc.claim.session is not None:
            self._wait_free(loc.claim, disk.name)
        self._claim(disk_id, claims.of_disk(disk), ClaimValue(disk_id, loc.pool, loc.image, disk.name,
                                                              loc.claim.value.op if loc.claim and loc.claim.value
                                                              else ""), held, disk.name)
        self.step("start:claimed")
        dkey = keys.disk_key(self.prefix, disk_id)
        index, entries = self.store.read_tree()
        view = parse_tree(self.prefix, entries, index)
        locked = sorted(str(k) for k, st in view.paths.items() if k.disk == disk_id and st.session)
        if locked:
            raise DiskStateError(f"disk {disk_id}: path keys {', '.join(locked)} are still locked without a "
                                 "disk key (written by something else?); they must be released first")
        ops = (TxnOps().check_not_exists(dkey).delete_tree(keys.paths_prefix(self.prefix, disk_id))
               .set(dkey, disk_value(loc.pool, loc.image)))
        for path in disk.paths:
            ops.set(keys.path_key(self.prefix, PathKey(disk_id, path.index)), b"")
        res = self.store.txn(ops)
        if not res.ok:
            raise DiskStateError(f"disk {disk_id} is already started ({res.reason()})")
        return disk

    def stop(self, ref: str, timeout: float = 60.0, force: bool = False,
             progress: Callable[[str], None] = lambda msg: None) -> tuple[str, bool]:
        """Stop a disk with its owners' acknowledgement; returns ``(id, whether it was started)``.
        Idempotent (a stop that timed out is finished by running it again). Refused (``DiskBusy``) while
        the owners report initiators logged in to it, unless ``force``.

        1. The disk key is marked ``stopping``: owners take the addresses down, unexport and release their
           paths explicitly, and nobody acquires them any more.
        2. This command locks every path key with its own short-lived session as soon as it is free. A path
           released by its owner is free at once; one whose owner's session was invalidated is free only
           after Consul's lock-delay, by which time that owner has fenced itself. So once all are locked
           here, no node can still serve the disk, and no clock was compared to know it.
        3. The disk key, the path keys and pending moves are deleted in one transaction.

        ``DiskStateError`` (naming the paths and their holders) when owners have not let go within
        ``timeout`` seconds: the disk stays stopping (nobody serves it anew, ``disk start`` refuses)."""
        disk_id = ref
        rec = self.record(ref) if keys.DISK_ID_RE.fullmatch(ref) else None
        if rec is None:
            loc = self.resolve(ref)
            disk_id, rec = loc.id, loc.record
        if rec is None:
            return disk_id, False
        dkey = keys.disk_key(self.prefix, disk_id)
        if not rec.stopping and not force:
            who = self.logins(disk_id)
            if who:
                where = "; ".join(f"{', '.join(sorted(inits))} on {node}" for node, inits in sorted(who.items()))
                n = len({i for inits in who.values() for i in inits})
                raise DiskBusy(f"disk {disk_id}: {n} initiator(s) logged in ({where}); stopping cuts them off "
                               "mid-I/O: log them out first, or add --force")
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
                return disk_id, False
        if not rec.stopping:
            raise DiskError(f"disk {disk_id}: its Consul key keeps changing; not stopped (run the command again)")
        self.step("stop:marked")
        end = time.monotonic() + timeout
        index = 0
        checked: set[str] = set()
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
                self._end_dead_stops({st.session for st in held.values() if st.session} - set(view.nodes.values()),
                                     checked)
                if time.monotonic() >= end:
                    names = {s: s_node for s_node, s in view.nodes.items()}
                    who_ = ", ".join(f"{p} by {st.node or names.get(st.session or '', 'an unknown session')}"
                                     for p, st in sorted(held.items())) or \
                        ", ".join(f"{p} (in its lock-delay)" for p in free)
                    raise DiskStateError(f"disk {disk_id} is stopping, but not every owner has let go within "
                                         f"{timeout:g}s: {who_}. A frozen or cut-off owner loses its session "
                                         f"and then the lock-delay runs out; run `pathagent disk stop "
                                         f"{disk_id}` again to finish")
            self.step("stop:locked")
            ops = (TxnOps().delete_tree(keys.paths_prefix(self.prefix, disk_id))
                   .delete_tree(keys.disk_moves_prefix(self.prefix, disk_id)).delete(dkey))
            res = self.store.txn(ops)
            if not res.ok:
                raise DiskError(f"disk {disk_id}: stop failed ({res.reason()})")
        return disk_id, True

    def _end_dead_stops(self, sessions: set[str], checked: set[str]) -> None:
        """Path keys locked by a session that is no agent's: an earlier ``disk stop`` of this disk. If
        that command was killed on this host, end its session now (``Behavior=delete``: its path keys go,
        which is what it was about to do) rather than wait up to twice its TTL."""
        for s in sorted(sessions - checked):
            checked.add(s)
            info = self.store.session_info(s)
            if info is not None and holder_is_gone(info):
                self.store.destroy_session(s)

    # --- update, resize ------------------------------------------------------------------------------
    def update(self, ref: str, pool: str | None = None, name: str | None = None,
               access: AccessChange = AccessChange(),
               paths: Sequence[PathArg] | None = None) -> tuple[Disk, builtins.list[str]]:
        """Change a disk's name or access, started or not, or its paths (``paths`` replaces them all; only
        while stopped: ``DiskStateError`` otherwise, as its gateways hold and serve them); returns the new
        definition and notes for the admin. A change of access that does more than its options say needs
        its flag (``NeedsFlag``): closing an open disk (``--closed``), leaving no initiator admitted
        (``--admit-none``). A started disk's owners apply the change at once (the disk key is touched). The
        claims follow the new definition (new name and addresses claimed first, the old ones dropped)."""
        held = self.claims()
        loc = self.resolve(ref, pool, held)
        old = self.load(loc)
        notes: builtins.list[str] = []
        new_paths = old.paths
        if paths is not None:
            new_paths = path_specs(paths)
            if new_paths != old.paths and loc.record is not None:
                raise DiskStateError(f"disk {label(old.id, old.name)} is started: its gateways hold and serve its "
                                     "paths; stop it first (`pathagent disk stop`), change the paths, start it")
            if new_paths != old.paths:
                notes.append("paths were " + " ".join(f"{p.ip}/{p.prefix}" for p in old.paths))
        was_open = old.initiators is None
        current = list(old.initiators or ())
        if access.initiators is not None:
            current = list(access.initiators)
        for i in access.add:
            if i in current:
                notes.append(f"{i} was admitted already")
            else:
                current.append(i)
        for i in access.remove:
            if i in current:
                current.remove(i)
            else:
                notes.append(f"{i} was not admitted; nothing to remove")
        listed = access.initiators is not None or bool(access.add)
        if access.open_ is True:
            is_open = True
            if current and not was_open:
                notes.append(f"the list of {len(old.initiators or ())} initiator(s) is dropped: any initiator "
                             "may log in now")
        elif access.open_ is False:
            is_open = False
        elif was_open and listed:
            raise NeedsFlag(f"disk {label(old.id, old.name)} admits any initiator; admitting a list closes it to "
                            "every other initiator: add --closed to confirm")
        else:
            is_open = was_open
        if not is_open and not current and not (not was_open and not old.initiators):
            if not access.admit_none:
                raise NeedsFlag(f"disk {label(old.id, old.name)}: this leaves no initiator admitted (every "
                                "initiator is locked out): add --admit-none to confirm")
        new = validated(dataclasses.replace(
            old, name=name if name is not None else old.name, paths=new_paths,
            initiators=None if is_open else tuple(current),
            chap=old.chap if access.chap is True else (access.chap or None),
            mutual_chap=old.mutual_chap if access.mutual_chap is True else (access.mutual_chap or None)))
        if claims.of_disk(new) != claims.of_disk(old):
            self._claim(old.id, claims.of_disk(new), ClaimValue(old.id, loc.pool, loc.image, new.name,
                                                                loc.claim.value.op if loc.claim and
                                                                loc.claim.value else ""),
                        held, new.name, definitions=self._definitions(held))
            self.step("update:claimed")
        if new == old:
            notes.append("nothing changed")
            return new, notes
        self.ceph.set_meta(loc.pool, loc.image, schema.META_KEY, schema.dump(new))
        self.step("update:defined")
        if loc.record is not None:
            self.touch(old.id, loc.record)
        return new, notes

    def resize(self, ref: str, size: int, pool: str | None = None) -> tuple[Disk, int]:
        """Grow the disk to ``size`` bytes: the image first, then its definition, then the owners are woken
        (they make the LUN report the new size). Shrinking is refused (``DiskStateError``): the end of the
        disk would be lost under a filesystem that still uses it. Returns ``(disk, old size)``; the same
        size again changes nothing."""
        loc = self.resolve(ref, pool)
        old = self.load(loc)
        actual = self.ceph.image_size(loc.pool, loc.image)
        was = max(old.size, actual)
        if size < was:
            raise DiskStateError(f"disk {label(old.id, old.name)} is {human_size(was)}; shrinking it to "
                                 f"{human_size(size)} is refused (the data past the new end would be lost)")
        if actual < size:
            self.ceph.grow_image(loc.pool, loc.image, size)
            self.step("resize:grown")
        new = dataclasses.replace(old, size=size)
        if new != old:
            self.ceph.set_meta(loc.pool, loc.image, schema.META_KEY, schema.dump(new))
            self.step("resize:defined")
            if loc.record is not None:
                self.touch(old.id, loc.record)
        return new, old.size

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
    document's ``id`` (images named otherwise: imported, or created by other tools)."""
    if image.startswith(IMAGE_PREFIX) and keys.DISK_ID_RE.fullmatch(image[len(IMAGE_PREFIX):]):
        return image[len(IMAGE_PREFIX):]
    try:
        d = json.loads(doc)
    except (ValueError, RecursionError):
        return None
    v = d.get("id") if isinstance(d, dict) else None
    return v if isinstance(v, str) and keys.DISK_ID_RE.fullmatch(v) else None
