"""The interfaces plugins implement, and what the host hands them.

Plugins import this module, ``agent.core.model``, ``agent.core.schema``, ``agent.errors``,
``agent.config`` (its frozen tables), ``agent.statefile`` and ``agent.childenv``; never the runtime, the
CLI or an adapter. A plugin kind is one ABC plus one stevedore namespace (see ``agent.plugins``):

- ``pathagent.targets``  -> ``TargetBackend``   (``lio``, ``tgt``, ``fake``)
- ``pathagent.network``  -> ``NetworkBackend``  (``iproute``, ``none``)
- ``pathagent.catalogs`` -> ``Catalog``         (``rbd``, ``fake``)
- ``pathagent.watchdog`` -> ``Watchdog``        (``guard``, ``device``, ``none``)
- ``pathagent.fencing``  -> ``Fencing``         (``ceph-blocklist``, ``none``)

Every plugin is constructed as ``Plugin(context)`` with a ``PluginContext`` and must not touch the world
there (no daemon started, no device opened): the guard process and ``check-config`` construct plugins
too. Its own settings are the sub-table of the config named after it (``[target.tgt]``,
``[network.iproute]``, ``[watchdog.device]``); ``config_keys`` lists the keys it accepts.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.config import CephConfig
from agent.core.model import Disk, PathKey, PathSpec, Peer


def _nothing() -> None:
    return None


def _yes() -> bool:
    return True


@dataclass(frozen=True)
class PluginContext:
    """What a plugin gets at construction.

    - ``node``: this node's name when known (empty in the guard process and before Consul answered);
    - ``state_dir``: this node's state directory; put every runtime file under it;
    - ``options``: the plugin's own config sub-table (checked against ``config_keys`` by the host);
    - ``ceph``: the ``[ceph]`` table; ``port``: the iSCSI port of every portal;
    - ``config_file``: the configuration file the agent runs with (the guard process reads it too);
    - ``wake``: call it (from any thread) when something changed that the agent should look at now, for
      example the target daemon died; cheap, never blocks;
    - ``ceph_probe(pool, image)``: checks through the host's one Ceph client that the cluster answers and
      the image exists, within ``[ceph] timeout``; raises ``TransientBackendError`` (Ceph unreachable) or
      ``PermanentBackendError`` (no such pool or image). ``None`` where the host has no Ceph.
    - ``current_node()``: the node name once known (plugins are built before Consul answered, so
      ``node`` may be empty; use this where the name matters, e.g. the per-node Ceph client id);
    - ``may_serve()``: whether this node may start serving right now (its lease is valid and it is not
      fenced); a plugin asks it right before each irrevocable step that starts serving to initiators
      (adding a floating IP, announcing it) and refuses the step when it says no. Cheap, never blocks.
    """

    node: str
    state_dir: str
    options: Mapping[str, Any] = field(default_factory=dict)
    ceph: CephConfig = CephConfig()
    port: int = 3260
    config_file: str = ""
    wake: Callable[[], None] = _nothing
    ceph_probe: Callable[[str, str], None] | None = None
    may_serve: Callable[[], bool] = _yes
    node_name: Callable[[], str] | None = None

    def current_node(self) -> str:
        """This node's name as known now: ``node``, or (when the config does not name the node) the local
        Consul agent's node name once the agent learned it (empty before). Cheap, never blocks."""
        if self.node:
            return self.node
        return self.node_name() if self.node_name is not None else ""


class TargetBackend(abc.ABC):
    """Exports disk paths as iSCSI targets on this node: one target per disk (the disk's IQN), one TPG per
    path (tag = path index), the LUN backed by the disk's RBD image, portal = the path's floating IP.

    ``export``/``unexport`` are idempotent: exporting an exported path with the same definition, or
    unexporting an absent one, does nothing; ``export`` with a changed definition updates it in place: an
    initiator no longer admitted loses its sessions at once (the others keep theirs), a CHAP change applies
    to the next login, a larger ``size`` is what the LUN reports from then on (a backend that has to reopen
    the LUN for it may cost its sessions one reconnect; it says so in its docs). Failures raise ``TransientBackendError`` (retry after its delay) or ``PermanentBackendError``; no
    method returns an error flag. What is exported survives a restart of the agent process (the data path
    does not depend on the agent), so ``exported`` reads the real state, not a memory of earlier calls.
    """

    #: keys accepted in this backend's config sub-table, with a one-line description each
    config_keys: Mapping[str, str] = {}

    @abc.abstractmethod
    def exported(self) -> frozenset[PathKey]:
        """The paths this node serves now. Read-only and quick: it never starts, restarts or replays
        anything; ``TransientBackendError`` when it cannot tell (the daemon does not answer in time)."""

    @abc.abstractmethod
    def export(self, path: PathKey, disk: Disk) -> None:
        """Serve ``path`` of ``disk`` on this node. On failure nothing of this path is left half-done."""

    @abc.abstractmethod
    def unexport(self, path: PathKey) -> None:
        """Stop serving ``path`` (drop its sessions). Removes the disk's target when no path is left."""

    def logged_in(self) -> Mapping[str, frozenset[str]] | None:
        """The initiator names with a session on this node now, by disk id (disks without one are left
        out); ``None`` when this backend cannot tell (the default). Read-only and quick; safe to call from
        another thread while ``export``/``unexport`` run; ``TransientBackendError`` when it cannot tell now.
        The agent publishes it (``{prefix}/logins/{node}``) so that ``disk stop`` can refuse to cut off
        logged-in initiators without ``--force``."""
        return None

    @abc.abstractmethod
    def fence(self) -> None:
        """Stop serving every path at once, in one bounded step (milliseconds), whatever state the target
        daemon is in: never waits for the daemon to answer, nor for a lock that another method may hold;
        safe to call from any thread while another call runs, and from another process than the one that
        exported (the guard). Afterwards nothing is served and nothing is brought back by itself: every
        export is forgotten until ``export`` is called again. Raises ``BackendError`` only when it could
        not be sure the data path stopped."""

    def close(self) -> None:
        """Release process resources (connections, helper threads). Never stops what it exports."""


class NetworkBackend(abc.ABC):
    """Moves floating path IPs onto and off this node.

    ``up`` adds the address (on the interface that carries its subnet) and announces it; ``down``
    removes it. Both are idempotent. A backend only ever removes addresses it added itself, and ``down``
    raises rather than return while the path's address is still up here. Failures raise
    ``TransientBackendError`` or ``PermanentBackendError``."""

    config_keys: Mapping[str, str] = {}

    @abc.abstractmethod
    def up(self, path: PathKey, spec: PathSpec) -> None:
        """Bring ``spec.ip/spec.prefix`` up on this node for ``path``."""

    @abc.abstractmethod
    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        """Take the address of ``path`` down (``spec`` may be ``None`` when the definition is gone: the
        backend then uses its own record of what it added)."""

    @abc.abstractmethod
    def active(self) -> frozenset[PathKey]:
        """Paths whose address this backend has up now (read from the system, not from memory)."""

    def connections(self, path: PathKey, spec: PathSpec | None) -> tuple[Peer, ...]:
        """The TCP connections open to the path's address on this node now, as ``Peer``s (the default:
        none, the backend cannot tell). Asked right before a ``down`` that a release of the path follows:
        once the address is gone those connections can send nothing more (no reply, no FIN, no RST), and
        the released key records them for the next owner's ``tickle``. Read-only and quick; an error counts
        as none."""
        return ()

    def tickle(self, path: PathKey, spec: PathSpec, peers: tuple[Peer, ...]) -> None:
        """Right after ``up``: make the initiators of ``peers`` (connections the previous owner left open to
        this address, silent since it took the address down) learn at once that they are gone, rather than
        after their own timeout, by sending each one a segment from the address that its TCP must answer
        (a "tickle ACK"): the answer reaches this node, which resets the connection it does not know, and
        the initiator reconnects here at once. Never waits (it may send from a thread of its own for a few
        seconds), never brings anything up, and sends nothing once this node may not serve; harmless to a
        connection that is alive (the answer matches it) or gone. The default does nothing."""

    def fence(self) -> None:
        """Take every address this backend added down now, in one bounded pass; like
        ``TargetBackend.fence`` it must not wait for a lock another call holds. The default takes down
        each active path in turn."""
        for p in sorted(self.active()):
            self.down(p, None)

    def close(self) -> None:
        """Release process resources; addresses stay."""


class Catalog(abc.ABC):
    """Reads disk definitions.

    ``get`` returns the validated ``Disk`` for a started disk, given where its record says it lives;
    it raises ``DefinitionError`` (invalid document: disk, field, reason) or ``CatalogUnavailable``
    (image or pool missing, Ceph unreachable). It may cache; ``version`` is a token (the disk key's
    ModifyIndex) that changes whenever the CLI edits the disk, and a cached entry older than the
    configured refresh interval is re-read."""

    config_keys: Mapping[str, str] = {}

    @abc.abstractmethod
    def get(self, disk_id: str, pool: str, image: str, version: int) -> Disk:
        """The definition of ``disk_id``."""

    def close(self) -> None:
        """Release connections."""


class Watchdog(abc.ABC):
    """Stops this node's data path when the agent stops proving in time that it may serve: the backstop
    for an agent process that is frozen, hung or dead while the data path (a target daemon, the kernel)
    keeps serving without it.

    Deadlines are on ``CLOCK_BOOTTIME`` (``time.clock_gettime(time.CLOCK_BOOTTIME)``), the same in every
    process of the host and running on through a suspend. The agent calls ``pet(deadline)`` after each
    confirmation of its session, with the time by which serving must have stopped unless it pets again
    (the first pet arms it); ``disarm()`` only after an orderly shutdown left nothing served; ``close()``
    when the process exits otherwise (a planned restart: the watchdog stays armed and the next process
    pets it). None of these may block for long: a watchdog that cannot be reached raises
    ``BackendError`` and the agent reports it.
    """

    config_keys: Mapping[str, str] = {}

    @abc.abstractmethod
    def pet(self, deadline: float, session: str = "") -> None:
        """Stop the data path at ``deadline`` at the latest unless ``pet`` is called again before. (A
        device that takes only a timeout T is pet only while now + T <= deadline, else left to run out.)
        ``session`` is the Consul session whose confirmation proved ``deadline`` ('' when unknown); a
        watchdog that can confirm it by itself (the guard) may extend the deadline with exactly the
        agent's rule while the agent does not pet, and only for that session."""

    @abc.abstractmethod
    def disarm(self) -> None:
        """Nothing is served any more: stand down (an armed watchdog would otherwise act)."""

    def confirmed(self, session: str) -> float:
        """The deadline the watchdog proved by itself for ``session`` (``CLOCK_BOOTTIME``; ``-inf`` when
        none): a confirmation of that session it sent at t, answered, gives t + ``fence_after``. The
        agent's fencer calls it at check time, so it reads memory only: no lock, no I/O, no wait."""
        return float("-inf")

    def close(self) -> None:
        """Release process resources, staying armed."""


@dataclass(frozen=True)
class FailedNode:
    """A node whose session ended without an orderly release, as the cluster leader sees it.

    - ``node``: its name; ``session``: the session that ended (the one its node record names);
    - ``identity``: what that node last published of itself (``Fencing.identity()`` run there, stored in
      its node record); may be empty (it never published, or its record was unreadable);
    - ``images``: ``(pool, image)`` of every started disk with a path that node held when its session ended.
    """

    node: str
    session: str
    identity: Mapping[str, Any] = field(default_factory=dict)
    images: tuple[tuple[str, str], ...] = ()


class Fencing(abc.ABC):
    """What is done, once per failed node, before its paths are taken over (``pathagent.fencing``).

    The cluster leader calls ``fence`` for a node whose session ended while it held paths (a crash, a
    partition, a lost session: anything but an orderly release); no other node exports a path that node
    held until the leader has recorded that the fence succeeded (when ``required``). Every node calls
    ``identity`` now and then and publishes the result in its node record, so that the leader can find
    that node's clients after it died.

    ``fence`` is idempotent (fencing a node twice, or a node that has nothing left, is fine) and must fence
    nothing that belongs to another node (a healthy gateway is never fenced). It may block up to its own
    timeouts; it runs on a worker thread of the leader, never on the fencing path of ``docs/fencing.md``.
    Failures raise ``TransientBackendError`` (retried; the paths wait) or ``PermanentBackendError`` (named
    in the log and ``status``; retried more slowly; the paths still wait: nothing is exported unfenced).
    """

    config_keys: Mapping[str, str] = {}

    #: False when fencing does nothing (``none``): the paths of a failed node are then taken over without
    #: waiting for the leader.
    required: bool = True

    @abc.abstractmethod
    def identity(self) -> Mapping[str, Any]:
        """What others need to fence this node later: a small JSON-able mapping (well under 4 KiB; e.g.
        its Ceph client name and source addresses). Called on this node outside the fencing path; may
        block up to the plugin's timeouts; raises ``TransientBackendError`` when it cannot tell now."""

    @abc.abstractmethod
    def fence(self, failed: FailedNode) -> str:
        """Make sure nothing ``failed`` still has open can change data any more; return a one-line summary
        of what was done (logged and recorded; no secrets)."""

    def close(self) -> None:
        """Release connections."""
