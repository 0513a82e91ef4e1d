"""The record of what this node exports through tgt: the intent, since tgtd keeps no configuration.

``Entry`` is one disk's target as it must be (from a ``Disk``) plus its exported path IPs. The record file
(``exports.json``, mode 0600: it holds CHAP secrets) is bound to one tgtd instance (its pid and start
time): the exports of a tgtd that ended are gone with it. ``check_conflicts`` rejects what one tgtd
cannot hold. Pure except ``RecordFile``. See docs/backend-tgt.md.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from agent import statefile
from agent.core.model import Chap, Disk
from agent.core.targetspec import TargetSpec, chap_accounts
from agent.errors import PermanentBackendError, TransientBackendError

RECORD_VERSION = 2

#: tgt's LUN 0 is its controller: the disk is LUN 1 (LIO puts it on LUN 0)
LUN = 1


@dataclass(frozen=True)
class Entry:
    """One recorded disk: what its target must look like and which of its paths are exported here.
    ``size``: the disk's size in bytes when its LUN was (last) opened; 0 = unknown (a record written before
    sizes were recorded)."""

    disk: str
    iqn: str
    pool: str
    image: str
    serial: str
    initiators: tuple[str, ...] | None
    chap: Chap | None
    mutual_chap: Chap | None
    paths: Mapping[int, str]   # index -> ip
    size: int = 0

    @classmethod
    def of(cls, disk: Disk, paths: Mapping[int, str]) -> "Entry":
        """The entry for ``disk`` with ``paths`` exported, from the host's backend-neutral spec."""
        return cls.of_spec(TargetSpec.of(disk, lun=LUN), paths)

    @classmethod
    def of_spec(cls, spec: TargetSpec, paths: Mapping[int, str]) -> "Entry":
        return cls(disk=spec.disk, iqn=spec.iqn, pool=spec.pool, image=spec.image, serial=spec.serial,
                   initiators=spec.initiators, chap=spec.chap, mutual_chap=spec.mutual_chap,
                   paths=dict(paths), size=spec.size)

    def with_paths(self, paths: Mapping[int, str]) -> "Entry":
        return dataclasses.replace(self, paths=dict(paths))

    def to_json(self) -> dict[str, Any]:
        def chap(c: Chap | None) -> dict[str, str] | None:
            return None if c is None else {"user": c.user, "password": c.password}
        return {"iqn": self.iqn, "pool": self.pool, "image": self.image, "serial": self.serial,
                "initiators": None if self.initiators is None else list(self.initiators),
                "chap": chap(self.chap), "mutual_chap": chap(self.mutual_chap),
                "paths": {str(i): ip for i, ip in sorted(self.paths.items())}, "size": self.size}

    @classmethod
    def from_json(cls, disk: str, d: Mapping[str, Any]) -> "Entry":
        def chap(c: Any) -> Chap | None:
            return None if c is None else Chap(str(c["user"]), str(c["password"]))
        inits = d.get("initiators")
        return cls(disk=disk, iqn=str(d["iqn"]), pool=str(d["pool"]), image=str(d["image"]),
                   serial=str(d["serial"]), initiators=None if inits is None else tuple(str(i) for i in inits),
                   chap=chap(d.get("chap")), mutual_chap=chap(d.get("mutual_chap")),
                   paths={int(i): str(ip) for i, ip in d.get("paths", {}).items()}, size=int(d.get("size") or 0))

    def accounts(self) -> list[tuple[Chap, bool]]:
        """(credentials, outgoing) pairs this target binds."""
        return chap_accounts(self.chap, self.mutual_chap)

    def acl(self) -> set[str]:
        return {"ALL"} if self.initiators is None else set(self.initiators)


Record = dict[str, Entry]


def passwords(record: Mapping[str, Entry]) -> dict[str, str]:
    """CHAP user -> password over every recorded disk (the first one wins; conflicts are rejected before)."""
    out: dict[str, str] = {}
    for e in record.values():
        for c, _ in e.accounts():
            out.setdefault(c.user, c.password)
    return out


def check_conflicts(entry: Entry, record: Mapping[str, Entry]) -> None:
    """``PermanentBackendError`` when ``entry`` cannot live beside the other recorded disks in one tgtd:
    its IQN is exported for another disk, or a CHAP user it binds has another password there (tgt accounts
    are global per tgtd). Never names a password."""
    for d, e in record.items():
        if d != entry.disk and e.iqn == entry.iqn:
            raise PermanentBackendError(f"disk {entry.disk}: IQN {entry.iqn} is already exported for disk {d}")
    others = passwords({d: e for d, e in record.items() if d != entry.disk})
    mine: dict[str, str] = {}
    for c, _ in entry.accounts():
        if mine.setdefault(c.user, c.password) != c.password or others.get(c.user, c.password) != c.password:
            raise PermanentBackendError(
                f"disk {entry.disk}: CHAP user {c.user!r} is used with another password by a disk exported "
                "on this node (tgt accounts are per node)")


@dataclass(frozen=True)
class Stored:
    """The record file's content: ``disks`` as configured in the tgtd ``tgtd`` ("pid starttime"; ``None``:
    no tgtd; ``""``: a version-1 record, which names none) while the fence mark read ``fence``."""

    tgtd: str | None = None
    fence: str = ""
    disks: Mapping[str, Entry] = field(default_factory=dict)

    def disks_for(self, tgtd: str) -> Record:
        """The exports that live in tgtd ``tgtd``: none when the record describes another instance."""
        return dict(self.disks) if self.tgtd in ("", tgtd) else {}


class RecordFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Stored:
        """``PermanentBackendError`` when the file is unreadable (a missing file is an empty record)."""
        try:
            data = statefile.read(self.path, None)
            if data is None:
                return Stored()
            disks = {d: Entry.from_json(d, e) for d, e in data.get("disks", {}).items()}
            if int(data.get("version", 1)) < 2:
                return Stored(tgtd="", disks=disks)
            tgtd = data.get("tgtd")
            return Stored(tgtd=None if tgtd is None else str(tgtd), fence=str(data.get("fence", "")), disks=disks)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PermanentBackendError(f"tgt record {self.path} is unreadable: {e}") from None

    def save(self, tgtd: str | None, fence: str, disks: Mapping[str, Entry]) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            statefile.write(self.path, {"version": RECORD_VERSION, "tgtd": tgtd, "fence": fence,
                                        "disks": {d: e.to_json() for d, e in sorted(disks.items())}})
        except OSError as e:
            raise TransientBackendError(f"tgt record {self.path}: {e.strerror or e}") from None
