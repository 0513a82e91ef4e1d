"""What a disk's target must present on every gateway, whatever the backend: one backend-neutral value.

``TargetSpec.of(disk, port, lun)`` turns a validated ``Disk`` into what an initiator sees: the target name
(the disk's IQN), one TPG per path (tag = path index, portal = the path's floating IP and the iSCSI port),
the LUN number, the unit serial (also the WWN source), the size, who is admitted (``None``: anyone) and the
CHAP credentials. Every gateway derives the same spec from the same definition, so every gateway presents
the same identity; backends (tgt, LIO) differ only in how they make it so. Pure: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.core.model import Chap, Disk


def chap_accounts(chap: Chap | None, mutual: Chap | None) -> list[tuple[Chap, bool]]:
    """(credentials, outgoing) pairs a target binds: the initiator's CHAP, then the target's (mutual) one."""
    out = []
    if chap is not None:
        out.append((chap, False))
    if mutual is not None:
        out.append((mutual, True))
    return out


def portal_of(ip: str, port: int) -> str:
    """``ip:port`` (IPv6 in brackets), as iSCSI writes a portal."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class TpgSpec:
    """One path as a target portal group: ``tag`` = the path index, ``ip`` its floating IP."""

    tag: int
    ip: str
    port: int

    @property
    def portal(self) -> str:
        return portal_of(self.ip, self.port)


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """One disk's target. ``tpgs`` holds every path of the disk (sorted by tag), not only those a node
    serves: backends with TPGs create all of them so that discovery and ALUA look alike everywhere."""

    disk: str
    iqn: str
    lun: int
    serial: str
    size: int
    pool: str
    image: str
    initiators: tuple[str, ...] | None
    chap: Chap | None
    mutual_chap: Chap | None
    tpgs: tuple[TpgSpec, ...]

    @classmethod
    def of(cls, disk: Disk, port: int = 3260, lun: int = 0) -> "TargetSpec":
        return cls(disk=disk.id, iqn=disk.iqn, lun=lun, serial=disk.serial, size=disk.size, pool=disk.pool,
                   image=disk.image, initiators=disk.initiators, chap=disk.chap, mutual_chap=disk.mutual_chap,
                   tpgs=tuple(TpgSpec(p.index, p.ip, port) for p in sorted(disk.paths, key=lambda p: p.index)))

    @property
    def open(self) -> bool:
        """Any initiator is admitted."""
        return self.initiators is None

    def tpg(self, tag: int) -> TpgSpec | None:
        for t in self.tpgs:
            if t.tag == tag:
                return t
        return None

    def admits(self, initiator: str) -> bool:
        """Whether ``initiator`` may log in (CHAP aside). iSCSI names compare case-insensitively."""
        if self.initiators is None:
            return True
        return initiator.lower() in {i.lower() for i in self.initiators}

    def accounts(self) -> list[tuple[Chap, bool]]:
        """(credentials, outgoing) pairs: the initiator's CHAP, then the target's (mutual) one."""
        return chap_accounts(self.chap, self.mutual_chap)
