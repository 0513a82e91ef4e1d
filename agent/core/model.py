"""Immutable values shared by the core, the adapters and the plugins.

Nothing here does I/O. ``Disk`` is a validated disk definition (see ``agent.core.schema``); ``Snapshot`` is
everything the planner may look at; the ``Action`` variants are everything it may ask for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union


@dataclass(frozen=True, slots=True, order=True)
class PathKey:
    """One path of one disk. ``index`` is 1-based and equals the TPG tag."""

    disk: str
    index: int

    def __str__(self) -> str:
        return f"{self.disk}/{self.index}"


@dataclass(frozen=True, slots=True)
class Chap:
    """CHAP credentials. The password never appears in ``repr`` or ``str``."""

    user: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return f"Chap(user={self.user!r}, password=***)"


@dataclass(frozen=True, slots=True)
class PathSpec:
    """Where a path is served: the floating IP with its prefix length, and an optional VLAN/role."""

    index: int
    ip: str
    prefix: int
    vlan: int | None = None
    role: str | None = None


@dataclass(frozen=True, slots=True)
class Disk:
    """A validated disk definition, as stored in the image metadata key ``pathagent.disk``.

    ``initiators`` is ``None`` when the disk is open to any initiator, and an empty tuple when no
    initiator is admitted (the default of ``disk create`` without ``--initiator``)."""

    id: str
    name: str
    iqn: str
    serial: str
    paths: tuple[PathSpec, ...]
    pool: str = ""
    image: str = ""
    size: int = 0
    initiators: tuple[str, ...] | None = ()
    chap: Chap | None = None
    mutual_chap: Chap | None = None
    version: int = 1

    def path(self, index: int) -> PathSpec | None:
        for p in self.paths:
            if p.index == index:
                return p
        return None


@dataclass(frozen=True, slots=True)
class PathState:
    """A path lock key as seen in Consul: its ModifyIndex and the session holding it (or ``None``)."""

    key: PathKey
    modify_index: int
    session: str | None = None
    node: str | None = None


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """The value of ``{prefix}/disks/{disk_id}``: where to find the image."""

    disk_id: str
    pool: str
    image: str
    modify_index: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one node knows at one moment. The planner reads nothing else.

    - ``session``: our valid session id, or ``None`` when we have none (lost, not yet created).
    - ``fenced``: our lease expired (no confirmed contact with the Consul servers for ``fence_after``):
      we must not serve anything even if the keys still name our session.
    - ``stopping``: an orderly shutdown was requested: unexport and release everything.
    - ``paths``: every path key under ``disks/``; ``disks``: every started disk.
    - ``nodes``: live nodes (node name -> session id), from the node records locked by their sessions.
    - ``exported``: what the target backend exports on this node now.
    - ``serviceable``: disks whose definition this node has loaded and validated.
    - ``blocked``: paths backing off after a failure on this node; not exported nor acquired now.
    - ``overdue``: free paths that have stayed free longer than the placement grace; anyone may take them.
    - ``moves``: pending ``path move`` requests (path -> target node).
    - ``settling``: our session is new; other agents starting with us may not have registered yet, so
      free paths are not taken until they can be placed fairly.
    """

    node: str
    session: str | None
    paths: Mapping[PathKey, PathState]
    disks: Mapping[str, DiskRecord]
    exported: frozenset[PathKey]
    serviceable: frozenset[str]
    nodes: Mapping[str, str] = field(default_factory=dict)
    fenced: bool = False
    stopping: bool = False
    blocked: frozenset[PathKey] = frozenset()
    overdue: frozenset[PathKey] = frozenset()
    moves: Mapping[PathKey, str] = field(default_factory=dict)
    settling: bool = False

    def held(self) -> frozenset[PathKey]:
        """Path keys locked by our session (empty when we have no session)."""
        if self.session is None:
            return frozenset()
        return frozenset(k for k, s in self.paths.items() if s.session == self.session)


@dataclass(frozen=True, slots=True)
class Acquire:
    """Lock ``path`` with our session, provided its ModifyIndex is still ``modify_index``."""

    path: PathKey
    modify_index: int


@dataclass(frozen=True, slots=True)
class Export:
    """Make the target backend serve ``path`` (and bring its floating IP up)."""

    path: PathKey


@dataclass(frozen=True, slots=True)
class Unexport:
    """Stop serving ``path`` on this node (floating IP first, then the target)."""

    path: PathKey


@dataclass(frozen=True, slots=True)
class Release:
    """Unlock ``path`` explicitly (no lock-delay for the next owner)."""

    path: PathKey


Action = Union[Acquire, Export, Unexport, Release]
