"""Immutable values shared by the core, the adapters and the plugins.

Nothing here does I/O. ``Disk`` is a validated disk definition (see ``agent.core.schema``); ``Snapshot`` is
everything the planner may look at; the ``Action`` variants are everything it may ask for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union


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


#: a TCP connection to a path's floating IP, as the node that had the IP up saw it: (remote IPv4 address,
#: remote port, local port). A planned hand-over records them in the released path key, so that the next
#: owner can make those initiators notice at once that the connections are gone (``NetworkBackend.tickle``)
Peer = tuple[str, int, int]


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
    #: a free key whose value still names the node that held it: its session ended without releasing it
    #: (a crash, a partition); the key's ModifyIndex is then the index of that invalidation
    orphan_of: str | None = None
    #: the connections its last holder had open to the path's IP when it released it (a free key), or that
    #: the holder took over with it (a held key): see ``Peer``
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """The value of ``{prefix}/disks/{disk_id}``: where to find the image, the CLI's edit counter ``rev``
    and whether ``disk stop`` asked the owners to let go (``stopping``)."""

    disk_id: str
    pool: str
    image: str
    modify_index: int = 0
    rev: int = 0
    stopping: bool = False


@dataclass(frozen=True)
class NodeRecord:
    """A node record ``{prefix}/nodes/{node}`` as seen in Consul.

    ``holder``: the session locking it now (``None``: no agent runs there); ``session``: the session its
    value names (the last one that locked it; empty after an orderly stop); ``identity``: what the node
    published for fencing it; ``weight``: its share of the paths; ``backend``: the target backend its agent
    runs (empty when not recorded)."""

    node: str
    modify_index: int
    holder: str | None = None
    session: str = ""
    identity: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    backend: str = ""

    def orphaned(self) -> bool:
        """Its session ended without an orderly stop (nothing holds it, the value still names a session)."""
        return self.holder is None and bool(self.session)


@dataclass(frozen=True, slots=True)
class Acquire:
    """Lock ``path`` with our session, provided its ModifyIndex is still ``modify_index``; ``peers`` (from
    the released key) go into our lock value, for the ``AddressUp`` that follows."""

    path: PathKey
    modify_index: int
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True, slots=True)
class Release:
    """Unlock ``path`` explicitly (no lock-delay for the next owner). Only after it is neither exported
    nor has its address up here. The applier writes into the released key the connections the network
    backend saw to the path's IP right before the address-down of the same plan (``Peer``)."""

    path: PathKey


@dataclass(frozen=True, slots=True)
class Export:
    """Make the target backend serve ``path`` of ``disk`` (create, or update to a changed definition)."""

    path: PathKey
    disk: Disk


@dataclass(frozen=True, slots=True)
class Unexport:
    """Make the target backend stop serving ``path``."""

    path: PathKey


@dataclass(frozen=True, slots=True)
class AddressUp:
    """Bring the floating IP of ``path`` up on this node (only for a held, exported path), then tickle
    ``peers``: the connections the previous holder left open to that IP (``NetworkBackend.tickle``)."""

    path: PathKey
    spec: PathSpec
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True, slots=True)
class AddressDown:
    """Take the floating IP of ``path`` down on this node (``spec`` is ``None`` when the definition is
    unknown: the network backend then uses its own record)."""

    path: PathKey
    spec: PathSpec | None


@dataclass(frozen=True, slots=True)
class LockNodeRecord:
    """Lock our node record ``{prefix}/nodes/{node}`` with our session: we count as a live agent."""


@dataclass(frozen=True, slots=True)
class AcquireLeader:
    """Lock ``{prefix}/leader`` with our session (observed free at ``modify_index``)."""

    modify_index: int


@dataclass(frozen=True)
class FenceNode:
    """Leader duty: fence ``node`` (its session ``session`` ended without an orderly stop) through the
    fencing plugin, then record it in ``{prefix}/fenced/{node}``; ``images``: ``(pool, image)`` of the disks
    it held paths of."""

    node: str
    session: str
    identity: Mapping[str, Any] = field(default_factory=dict)
    images: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RequestMove:
    """Leader duty: ask for ``path`` to move to ``node`` (a move key locked by our session)."""

    path: PathKey
    node: str


@dataclass(frozen=True, slots=True)
class EndMove:
    """Leader duty: remove the move request of ``path`` (done, or no longer wanted)."""

    path: PathKey


@dataclass(frozen=True, slots=True)
class CleanUp:
    """Leader duty: delete ``key`` (a leftover: a move request nobody holds, a path key of a disk that is
    gone) if it is still at ``modify_index``."""

    key: str
    modify_index: int


Action = Union[Acquire, Release, Export, Unexport, AddressUp, AddressDown, LockNodeRecord, AcquireLeader,
               FenceNode, RequestMove, EndMove, CleanUp]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do now, in this order, and when to plan again at the latest (``wake_at``, on the
    snapshot's clock; ``None``: only when something changes)."""

    actions: tuple[Action, ...]
    wake_at: float | None = None
