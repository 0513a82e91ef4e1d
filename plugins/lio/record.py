"""The LIO backend's record of what it created: which targets, storage objects and kernel mappings are ours.

LIO's configuration lives in the kernel (configfs), so the record is not the intent (the kernel state is
read back every time) but the *ownership*: the agent removes only what is listed here, and recognises a
mapping as its own only by the client instance it recorded (device id *and* client address), so a foreign
target, storage object or mapping created by hand is never touched, whatever its name. The file
(``{state_dir}/lio/record.json``) is written atomically before the kernel object it names is created, and
dropped after it is removed, so a crash in between leaves at most a record of something that does not exist
(harmless: removal of a missing object is a no-op). No secrets in it (CHAP lives in configfs only).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from agent import statefile
from agent.errors import TransientBackendError

VERSION = 1


@dataclass(frozen=True)
class MappingRef:
    """A kernel mapping we made: its device id, image and client instance (``ip:0/nonce``)."""

    id: int
    pool: str
    image: str
    client_addr: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "MappingRef":
        return cls(id=int(d["id"]), pool=str(d["pool"]), image=str(d["image"]), client_addr=str(d["client_addr"]))


@dataclass(frozen=True)
class Owned:
    """One disk's objects: its target (``iqn``), its storage object (``so``: backstore plugin and name),
    its mapping (``None`` before it is made, or for a ``user:rbd`` backstore), the TPG tags we created."""

    disk: str
    iqn: str
    so_plugin: str
    so_name: str
    mapping: MappingRef | None = None
    tags: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"iqn": self.iqn, "so_plugin": self.so_plugin, "so_name": self.so_name,
                "mapping": None if self.mapping is None else self.mapping.to_json(), "tags": list(self.tags)}

    @classmethod
    def from_json(cls, disk: str, d: Mapping[str, Any]) -> "Owned":
        m = d.get("mapping")
        return cls(disk=disk, iqn=str(d["iqn"]), so_plugin=str(d["so_plugin"]), so_name=str(d["so_name"]),
                   mapping=None if m is None else MappingRef.from_json(m),
                   tags=tuple(int(t) for t in d.get("tags", ())))


@dataclass(frozen=True)
class Record:
    disks: Mapping[str, Owned] = field(default_factory=dict)

    def with_disk(self, o: Owned) -> "Record":
        return Record({**self.disks, o.disk: o})

    def without(self, disk: str) -> "Record":
        return Record({d: o for d, o in self.disks.items() if d != disk})


class RecordFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Record:
        """The record; an absent file is an empty record; an unreadable one is a ``TransientBackendError``
        (never guessed: an empty guess would make us forget what to fence and clean up)."""
        try:
            data = statefile.read(self.path, None)
        except (OSError, ValueError) as e:
            raise TransientBackendError(f"lio: cannot read the record {self.path}: {e}", retry_after=5) from None
        if data is None:
            return Record()
        try:
            if int(data.get("version", 0)) != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            return Record({str(k): Owned.from_json(str(k), v) for k, v in data.get("disks", {}).items()})
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise TransientBackendError(f"lio: the record {self.path} is damaged ({e}); fix or remove it",
                                        retry_after=30) from None

    def save(self, r: Record) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            statefile.write(self.path, {"version": VERSION,
                                        "disks": {d: o.to_json() for d, o in sorted(r.disks.items())}}, durable=True)
        except OSError as e:
            raise TransientBackendError(f"lio: cannot write the record {self.path}: {e}", retry_after=2) from None
