"""The interfaces plugins implement. Plugins import this module, ``agent.core.model`` and ``agent.errors`` only.

A plugin kind is one ABC plus one stevedore namespace (see ``agent.plugins``):

- ``pathagent.targets``  -> ``TargetBackend``   (``lio``, ``tgt``, ``fake``)
- ``pathagent.network``  -> ``NetworkBackend``  (``iproute``, ``none``)
- ``pathagent.catalogs`` -> ``Catalog``         (``rbd``, ``fake``)

Every plugin is constructed as ``Plugin(context)`` with a ``PluginContext``; its own settings are the
sub-table of the config named after it (``[target.tgt]``, ``[network.iproute]``, ``[catalog.fake]``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

from agent.core.model import Disk, PathKey, PathSpec


@dataclass(frozen=True)
class PluginContext:
    """What a plugin gets at construction: the node name, this node's state directory (put every runtime
    file under it), its own config sub-table (already checked against ``config_keys``), and the shared
    ``[ceph]`` and ``[target]`` settings it may need (Ceph conf path, client id, iSCSI port)."""

    node: str
    state_dir: str
    options: Mapping[str, Any] = field(default_factory=dict)
    ceph: Mapping[str, Any] = field(default_factory=dict)
    port: int = 3260


class TargetBackend(abc.ABC):
    """Exports disk paths as iSCSI targets on this node: one target per disk (the disk's IQN), one TPG per
    path (tag = path index), the LUN backed by the disk's RBD image, portal = the path's floating IP.

    Every method is idempotent: exporting an exported path (with the same definition) or unexporting an
    absent one does nothing. ``export`` with a changed definition (ACL, CHAP) updates it in place.
    Failures raise ``TransientBackendError`` (retry after its delay) or ``PermanentBackendError``; no method
    returns an error flag. What is exported must survive a restart of the agent process (the data path
    does not depend on the agent), so ``exported`` reads the real state, not a memory of earlier calls.
    """

    #: keys accepted in this backend's config sub-table, with a one-line description each
    config_keys: Mapping[str, str] = {}

    @abc.abstractmethod
    def exported(self) -> frozenset[PathKey]:
        """The paths this node serves now (enabled TPGs of our targets)."""

    @abc.abstractmethod
    def export(self, path: PathKey, disk: Disk) -> None:
        """Serve ``path`` of ``disk`` on this node. On failure nothing of this path is left half-done."""

    @abc.abstractmethod
    def unexport(self, path: PathKey) -> None:
        """Stop serving ``path`` (drop its sessions). Removes the disk's target when no path is left."""

    @abc.abstractmethod
    def cleanup(self, keep: frozenset[PathKey]) -> None:
        """Remove every leftover of ours that is not in ``keep`` (targets, LUNs, state files)."""

    def close(self) -> None:
        """Release process resources (connections, child processes the plugin does not need to outlive
        the agent). Never stops what it exports."""


class NetworkBackend(abc.ABC):
    """Moves floating path IPs onto and off this node.

    ``up`` adds the address (on the interface that carries its subnet) and announces it; ``down``
    removes it. Both are idempotent. A backend only ever removes addresses it added itself.
    Failures raise ``TransientBackendError`` or ``PermanentBackendError``."""

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
        """Paths whose address this backend has up now."""

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
