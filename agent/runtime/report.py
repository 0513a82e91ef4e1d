"""``CycleReport``: one frozen value per loop cycle, rendered as the cycle's log line, the status file and
the metrics (so the three always agree, and ``/metrics`` never reads state the loop is changing); and
``label``, how every log line and CLI text names a disk or a path: its id with the disk's display name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from agent.core.model import PathKey


def label(what: PathKey | str, names: Mapping[str, str]) -> str:
    """``d15c0001/1 (vm)`` for a path, ``d15c0001 (vm)`` for a disk id: the id with the display name of its
    disk (``Disk.name``) where ``names`` (disk id -> name) knows it, else the id alone."""
    disk = what.disk if isinstance(what, PathKey) else what
    name = names.get(disk)
    return f"{what} ({name})" if name else str(what)


def _path_order(p: str) -> tuple[str, int, str]:
    """"disk/index" in disk order, then by index as a number (d1/2 before d1/10)."""
    disk, _, index = p.rpartition("/")
    return (disk, int(index), "") if index.isdigit() else (disk, -1, index)


@dataclass(frozen=True)
class CycleReport:
    cycle: int = 0
    node: str = ""
    session: str | None = None
    fenced: bool = True
    lease_left: float | None = None         # seconds until the fencing deadline (negative: passed)
    held: int = 0
    exported: frozenset[str] = frozenset()  # "disk/index"
    addresses: int = 0
    free: int = 0
    paths: int = 0
    nodes: int = 0
    disks: int = 0
    bad_disks: Mapping[str, str] = field(default_factory=dict)
    disk_names: Mapping[str, str] = field(default_factory=dict)    # of the bad disks, where known
    target_known: bool = True
    planned: Mapping[str, int] = field(default_factory=dict)
    applied: int = 0
    failed: int = 0
    interrupted: str = ""
    backing_off: int = 0
    fence_events: int = 0
    fence_reason: str = ""
    takeovers: int = 0
    watchdog_error: str | None = None
    backend: str = ""
    wall: float = 0.0
    leader: bool = False                    # this node holds {prefix}/leader
    drained: bool = False
    fences_done: int = 0                    # failed nodes fenced by this node as the leader
    fence_error: str = ""                   # the last failed fence of another node (as the leader)
    waiting_fence: bool = False             # our previous session failed: we wait to be fenced

    def summary(self) -> str:
        """The cycle's log line: the state, then what was planned and how much of it took effect."""
        state = (f"session={(self.session or 'none')[:8]} fenced={self.fenced} held={self.held} "
                 f"exported={len(self.exported)} up={self.addresses} free={self.free} nodes={self.nodes} "
                 f"disks={self.disks} bad_disks={len(self.bad_disks)}"
                 + ("" if self.target_known else " target=unknown") + (" leader" if self.leader else "")
                 + (" drained" if self.drained else "") + (" waiting-for-fence" if self.waiting_fence else ""))
        if not self.planned:
            return f"{state}; nothing to do"
        plan = ", ".join(f"{k} {v}" for k, v in sorted(self.planned.items()))
        tail = f"; stopped early: {self.interrupted}" if self.interrupted else ""
        return f"{state}; planned {plan}, {self.applied} applied, {self.failed} failed{tail}"

    def state_line(self) -> str:
        return self.summary().split(";", 1)[0]

    def status(self, pid: int) -> dict[str, Any]:
        """What ``status.json`` holds (read by ``pathagent status``): ``exported`` is how many paths the
        target serves, ``exported_paths`` which ("disk/index", sorted), ``updated`` the wall time of the
        cycle, ``lease_left`` the seconds left on the lease then."""
        return {"node": self.node, "session": self.session, "fenced": self.fenced, "pid": pid,
                "lease_left": None if self.lease_left is None else round(self.lease_left, 3),
                "held": self.held, "exported": len(self.exported), "exported_paths": sorted(self.exported, key=_path_order),
                "addresses": self.addresses,
                "target_known": self.target_known, "backend": self.backend, "bad_disks": dict(self.bad_disks),
                "disk_names": dict(self.disk_names),
                "fence_events": self.fence_events, "last_fence": self.fence_reason,
                "watchdog_error": self.watchdog_error, "cycle": self.cycle, "updated": self.wall,
                "leader": self.leader, "drained": self.drained, "fences_done": self.fences_done,
                "fence_error": self.fence_error, "waiting_fence": self.waiting_fence}
