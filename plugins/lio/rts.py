"""The one module that imports rtslib-fb: LIO's configuration in our vocabulary, errors translated.

``Lio`` starts lazily: the first call prepares the dbroot (``pr/`` and ``alua/``, without which every
APTPL PERSISTENT RESERVE OUT fails), then constructs ``RTSRoot()`` (which mounts configfs and loads
``target_core_mod`` as a side effect: never at plugin construction, which the guard and check-config do
too). Every object is found or created with ``mode='any'`` and every setter compares before it writes, so
``apply`` run twice changes nothing. rtslib's process-wide caches are invalidated before each use (another
process, or the kernel, may have changed the tree). ``RTSLibError`` and ``OSError`` become
``TransientBackendError`` here; nothing above this module sees an rtslib exception.

Callers hold the backend's process-wide lock: this is the only writer of LIO state in the process.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Iterator

import rtslib_fb
from rtslib_fb import (BlockStorageObject, FabricModule, LUN, MappedLUN, NetworkPortal, NodeACL, RTSRoot,
                       Target, TPG, UserBackedStorageObject)

from agent.core.targetspec import TargetSpec
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.lio import configfs

RTSLibError: type[Exception] = getattr(rtslib_fb, "RTSLibError", Exception)


@dataclass(frozen=True)
class Identity:
    """What every gateway gives the LUN (the same everywhere, so multipath matches them): the INQUIRY
    strings, and ``unmap``: thin provisioning reported, UNMAP and WRITE SAME with UNMAP accepted (LIO's
    ``emulate_tpu``/``emulate_tpws``; they become discards of the RBD device)."""

    vendor_id: str = "PATHAGNT"
    product_id: str = "RBD"
    revision: str = "0001"
    unmap: bool = True


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    try:
        yield
    except (TransientBackendError, PermanentBackendError):
        raise
    except (RTSLibError, OSError, ValueError) as e:
        raise TransientBackendError(f"lio: {what}: {e}", retry_after=2) from None


def _portal_ip(ip: str) -> str:
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


def _write_if_present(path: str, value: str) -> None:
    """Write a configfs attribute that this kernel may not have (compare first: some refuse rewrites
    while exported)."""
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return
    except FileNotFoundError:
        return
    with open(path, "w") as f:
        f.write(value)


class Lio:
    """LIO through rtslib. ``dbroot``: where the kernel keeps PR and ALUA metadata (``""``: rtslib's own
    preferred one, so that targetcli's saveconfig and the agent agree)."""

    def __init__(self, dbroot: str) -> None:
        self.dbroot = dbroot
        self._root: Any = None

    # ------------------------------------------------------------------ start

    def root(self) -> Any:
        if self._root is None:
            with translated("start LIO (configfs, target_core_mod)"):
                # RTSRoot() itself points the kernel at rtslib's preferred dbroot and fails when that
                # directory is missing; ours (when another) is set right after, before any fabric registers
                preferred = str(getattr(RTSRoot, "_preferred_dbroot", "") or "/etc/target")
                self.dbroot = self.dbroot or preferred
                for d in {preferred, self.dbroot}:
                    for sub in ("pr", "alua"):
                        os.makedirs(os.path.join(d, sub), exist_ok=True)
                self._set_dbroot()
                self._root = RTSRoot()
                self._set_dbroot()
                # the kernel keeps the first dbroot set before a device registered (maybe another tool's):
                # wherever it is, it needs pr/ and alua/ or every APTPL PERSISTENT RESERVE OUT fails
                current = self.current_dbroot()
                if current:
                    for sub in ("pr", "alua"):
                        os.makedirs(os.path.join(current, sub), exist_ok=True)
        inv = getattr(self._root, "invalidate_caches", None)
        if callable(inv):
            inv()
        return self._root

    def _set_dbroot(self) -> None:
        """Point the kernel at our dbroot while no device is registered yet (the kernel refuses later)."""
        path = os.path.join(configfs.ROOT, "dbroot")
        try:
            with open(path) as f:
                if f.read().strip() == self.dbroot:
                    return
            with open(path, "w") as f:
                f.write(self.dbroot + "\n")     # with the newline: 6.1 copies exactly what is written, no NUL
        except OSError:
            pass          # configfs not mounted yet, or devices exist: the kernel keeps its dbroot

    def current_dbroot(self) -> str:
        try:
            with open(os.path.join(configfs.ROOT, "dbroot")) as f:
                return f.read().strip()
        except OSError:
            return ""

    # ------------------------------------------------------------------ storage objects

    def _lookup_so(self, plugin: str, name: str) -> Any | None:
        for so in self.root().storage_objects:
            if so.plugin == plugin and so.name == name:
                return so
        return None

    def block(self, name: str, dev: str, wwn: str, ident: Identity) -> str | None:
        """The iblock storage object ``name`` on ``dev`` with unit serial ``wwn``; one on another device is
        replaced (its LUNs go with it: the caller re-creates them). Returns why UNMAP could not be set as
        ``ident.unmap`` asks (``None``: it is), which serves the LUN fully provisioned instead of failing."""
        with translated(f"block storage object {name} on {dev}"):
            so = self._lookup_so("block", name)
            if so is not None and so.udev_path != dev:
                so.delete()
                so = None
            if so is None:
                so = BlockStorageObject(name, dev=dev, wwn=wwn)
                self._identity(so, ident)
            elif so.wwn != wwn:
                so.wwn = wwn
            return self._provisioning(so, ident.unmap)

    def user_rbd(self, name: str, config: str, size: int, wwn: str, ident: Identity) -> None:
        """The tcmu-runner ``user:rbd`` storage object ``name`` with handler config ``config``
        (``rbd/<pool>/<image>;conf=...;id=...``); one with another config is replaced (its LUNs go with it).
        The size follows the definition: a larger one is written to the object (tcmu-runner re-reads it)."""
        with translated(f"user:rbd storage object {name} ({config.split(';')[0]})"):
            so = self._lookup_so("user", name)
            if so is not None and so.config != config:
                so.delete()
                so = None
            if so is None:
                so = UserBackedStorageObject(name, config=config, size=size, wwn=wwn)
                self._identity(so, ident)
            elif so.size < size:
                _write_if_present(os.path.join(so.path, "attrib", "dev_size"), str(size))

    def _identity(self, so: Any, ident: Identity) -> None:
        for attr, value in (("vendor_id", ident.vendor_id), ("product_id", ident.product_id),
                            ("revision", ident.revision)):
            _write_if_present(os.path.join(so.path, "wwn", attr), value)

    def _provisioning(self, so: Any, unmap: bool) -> str | None:
        """``emulate_tpu`` and ``emulate_tpws`` of ``so`` as ``unmap`` (the kernel refuses them on a device
        without discard: the reason is returned, the attributes stay as they were)."""
        want = "1" if unmap else "0"
        for attr in ("emulate_tpu", "emulate_tpws"):
            try:
                _write_if_present(os.path.join(so.path, "attrib", attr), want)
            except OSError as e:
                return f"{attr}={want}: {e.strerror or e}"
        return None

    def delete_so(self, plugin: str, name: str) -> None:
        with translated(f"delete storage object {name}"):
            so = self._lookup_so(plugin, name)
            if so is not None:
                so.delete()

    def so_names(self) -> set[tuple[str, str]]:
        with translated("list storage objects"):
            return {(so.plugin, so.name) for so in self.root().storage_objects}

    # ------------------------------------------------------------------ targets

    def _target(self, iqn: str, mode: str) -> Any | None:
        fm = FabricModule("iscsi")
        try:
            return Target(fm, iqn, mode=mode)
        except RTSLibError:
            if mode == "lookup":
                return None
            raise

    def apply(self, spec: TargetSpec, so_plugin: str, so_name: str, enable: set[int],
              dynamic: set[str]) -> list[str]:
        """Make the disk's target match ``spec``: every TPG of ``spec`` (in tag order, so that every gateway
        gives each path the same relative port id), LUN ``spec.lun`` on the storage object, one portal each,
        access and CHAP, enabled exactly for the tags in ``enable``. ``dynamic``: initiators with a
        demo-mode session now (from configfs). Returns the initiators whose sessions were ended because
        they are no longer admitted."""
        dropped: list[str] = []
        with translated(f"configure target {spec.iqn}"):
            self.root()
            so = self._lookup_so(so_plugin, so_name)
            if so is None:
                raise TransientBackendError(f"lio: storage object {so_name} is missing", retry_after=1)
            t = self._target(spec.iqn, "any")
            assert t is not None
            want = {tp.tag for tp in spec.tpgs}
            for tpg in list(t.tpgs):
                if tpg.tag not in want:
                    tpg.delete()
            for tp in spec.tpgs:
                tpg = TPG(t, tp.tag, mode="any")
                if tp.tag not in enable and tpg.enable:
                    tpg.enable = False          # first: no I/O through a TPG we give up while we edit it
                self._lun(tpg, spec, so)
                self._portal(tpg, tp.ip, tp.port)
                dropped += self._access(tpg, spec, dynamic)
                if tp.tag in enable and not tpg.enable:
                    tpg.enable = True
        return sorted(set(dropped))

    def _lun(self, tpg: Any, spec: TargetSpec, so: Any) -> None:
        for lun in list(tpg.luns):
            if lun.lun != spec.lun or lun.storage_object.path != so.path:
                lun.delete()
        if not any(lun.lun == spec.lun for lun in tpg.luns):
            LUN(tpg, spec.lun, so)

    def _portal(self, tpg: Any, ip: str, port: int) -> None:
        want = _portal_ip(ip)
        for np in list(tpg.network_portals):
            if (np.ip_address, np.port) != (want, port):
                np.delete()
        NetworkPortal(tpg, want, port, mode="any")

    def _attr(self, tpg: Any, name: str, value: int) -> None:
        try:
            if str(tpg.get_attribute(name)).strip() != str(value):
                tpg.set_attribute(name, str(value))
        except RTSLibError:
            if name != "tpg_enabled_sendtargets":       # older kernels lack it
                raise

    def _access(self, tpg: Any, spec: TargetSpec, dynamic: set[str]) -> list[str]:
        self._attr(tpg, "authentication", 1 if spec.chap else 0)
        self._attr(tpg, "demo_mode_write_protect", 0)
        self._attr(tpg, "tpg_enabled_sendtargets", 0)     # discovery lists every path, also the disabled
        self._attr(tpg, "cache_dynamic_acls", 1 if spec.open else 0)
        self._attr(tpg, "generate_node_acls", 1 if spec.open else 0)
        self._chap(tpg, spec)                               # demo mode logins use the TPG's credentials
        dropped: list[str] = []
        acls = {a.node_wwn: a for a in tpg.node_acls}
        if not spec.open:
            for name in spec.initiators or ():
                acl = acls.get(name.lower()) or NodeACL(tpg, name, mode="any")
                if not any(m.mapped_lun == spec.lun for m in acl.mapped_luns):
                    MappedLUN(acl, spec.lun, spec.lun)
                self._chap(acl, spec)
            for name, acl in acls.items():
                if not spec.admits(name):
                    acl.delete()                            # its sessions end with it
                    dropped.append(name)
            for name in dynamic:
                if not spec.admits(name):                   # a demo-mode session from when it was open
                    NodeACL(tpg, name, mode="any").delete()
                    dropped.append(name)
        else:
            for acl in acls.values():                       # kept: it is admitted anyway, with the CHAP
                self._chap(acl, spec)
        return dropped

    def _chap(self, node: Any, spec: TargetSpec) -> None:
        pairs = (("chap_userid", spec.chap.user if spec.chap else ""),
                 ("chap_password", spec.chap.password if spec.chap else ""),
                 ("chap_mutual_userid", spec.mutual_chap.user if spec.mutual_chap else ""),
                 ("chap_mutual_password", spec.mutual_chap.password if spec.mutual_chap else ""))
        for attr, value in pairs:
            if (getattr(node, attr) or "") != value:
                setattr(node, attr, value)

    def disable(self, iqn: str, tag: int) -> None:
        with translated(f"disable {iqn} TPG {tag}"):
            configfs.disable(iqn, tag)

    def delete_target(self, iqn: str) -> None:
        """Remove the target (TPGs disabled first, then ACLs, LUNs and portals: every session ends)."""
        with translated(f"delete target {iqn}"):
            if not os.path.isdir(configfs.target_dir(iqn)):
                return
            self.root()
            t = self._target(iqn, "lookup")
            if t is None:
                return
            for tpg in list(t.tpgs):
                tpg.enable = False
            t.delete()
