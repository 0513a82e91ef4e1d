"""``fake`` target backend: does nothing on the data path.

It records the exported paths in ``{state_dir}/fake-targets.json`` (written atomically), so that the set
survives an agent restart the way a kernel target does, and tests can watch it from outside (the guard
process fences it from another process, the same way it fences a real daemon).

Options (``[target.fake]``), testing aids:

- ``fail``: ``"disk/index"`` paths whose export raises ``TransientBackendError``;
- ``export_delay``: seconds every export takes (a slow LUN add, a Ceph probe waiting);
- ``stall_file``: while this file exists, ``exported``, ``export`` and ``unexport`` block until it is
  removed (a wedged target daemon) and ``logged_in`` raises ``TransientBackendError`` (it cannot tell);
  ``fence`` never blocks.

Like a target daemon killed under a call, an export that was under way when the backend was fenced (by
this process or by the guard) fails instead of recording its path: every read-modify-write of the state
file holds an ``flock`` (and, within a process, a lock) for the few microseconds of the write, and the
file carries a fence count.

Sessions, for tests: ``login(disk_id, initiator)`` / ``logout(disk_id, initiator)`` stand for an initiator
logging in to or out of the disk's target on this node; they live in the same state file (``"logins"``), so
another process (a test driving a ``pathagent run``) can log in with its own ``FakeBackend`` on the same
state dir. A login is refused (``LoginRefused``) like a real target refuses it: no path of the disk exported
here, or the disk's ACL does not admit the initiator. ``export`` with a narrower ACL drops the sessions of
the initiators it no longer admits (the others stay), the last ``unexport`` of a disk and ``fence`` drop
all of them. ``export`` records the disk's size, which ``reported_size`` returns: what the LUN reports.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from typing import Any, Iterator, Mapping

from agent import statefile
from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.options import Options

log = logging.getLogger(__name__)

#: the per-disk part of a path's entry: a changed definition updates every exported path of the disk
_DISK_FIELDS = ("iqn", "serial", "initiators", "size")


class LoginRefused(Exception):
    """``FakeBackend.login`` refused: the disk is not exported here, or its ACL does not admit the initiator."""


def _admits(initiators: Any, initiator: str) -> bool:
    """The fake's ACL: ``None`` admits anyone, a list its members (an empty list nobody)."""
    return initiators is None or initiator in initiators


class FakeBackend(TargetBackend):
    config_keys: Mapping[str, str] = {
        "fail": "list of disk/index paths whose export fails (testing aid)",
        "file": "state file (default {state_dir}/fake-targets.json)",
        "export_delay": "seconds every export takes (testing aid, default 0)",
        "stall_file": "while this file exists every call but fence blocks (testing aid)",
    }

    def __init__(self, context: PluginContext) -> None:
        o = Options("target.fake", context.options)
        self.path = o.text("file", "") or os.path.join(context.state_dir, "fake-targets.json")
        fail = context.options.get("fail", [])
        if not isinstance(fail, list) or not all(isinstance(p, str) for p in fail):
            o.problems.append(("target.fake.fail", "must be a list of disk/index strings"))
            fail = []
        self.fail = frozenset(fail)
        self.export_delay = o.number("export_delay", 0.0, 0.0, 600.0)
        self.stall_file = o.text("stall_file", "")
        o.done()
        self._lock = threading.Lock()       # this process's writers; the flock covers other processes

    def _stall(self) -> None:
        while self.stall_file and os.path.exists(self.stall_file):
            time.sleep(0.05)

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[None]:
        """The process's lock and the file lock; with ``wait`` false, give up on each after 50 ms (the
        fence never waits on a holder that may be frozen) and go on without it."""
        got = self._lock.acquire(timeout=-1 if wait else 0.05)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if wait:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    for _ in range(10):
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            time.sleep(0.005)
                yield
            finally:
                os.close(fd)
        finally:
            if got:
                self._lock.release()

    def _state(self) -> tuple[dict[str, dict[str, Any]], int, dict[str, list[str]]]:
        """The recorded exports, the fence count and the initiators logged in by disk id (one read)."""
        try:
            data = statefile.read(self.path, {})
            return (dict(data.get("paths", {})), int(data.get("fences", 0)),
                    {str(d): [str(i) for i in v] for d, v in dict(data.get("logins", {})).items()})
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise PermanentBackendError(f"fake state file {self.path}: {e}") from e

    def _load(self) -> tuple[dict[str, dict[str, Any]], int]:
        """The recorded exports and the fence count."""
        paths, fences, _ = self._state()
        return paths, fences

    def _save(self, paths: dict[str, dict[str, Any]], fences: int, logins: dict[str, list[str]]) -> None:
        try:
            statefile.write(self.path, {"paths": paths, "fences": fences,
                                        "logins": {d: sorted(set(v)) for d, v in sorted(logins.items()) if v}})
        except OSError as e:
            raise TransientBackendError(f"fake state file {self.path}: {e}") from e

    @staticmethod
    def _of_disk(paths: Mapping[str, dict[str, Any]], disk_id: str) -> list[str]:
        return sorted(k for k in paths if k.rpartition("/")[0] == disk_id)

    # ---------------------------------------------------------------- the ABC

    def exported(self) -> frozenset[PathKey]:
        self._stall()
        out = set()
        for k in self._load()[0]:
            disk, _, idx = k.rpartition("/")
            out.add(PathKey(disk, int(idx)))
        return frozenset(out)

    def export(self, path: PathKey, disk: Disk) -> None:
        """Record the path; a changed definition updates every recorded path of the disk in place (one
        target per disk) and drops the sessions of initiators its ACL no longer admits."""
        spec = disk.path(path.index)
        if spec is None:
            raise PermanentBackendError(f"disk {disk.id} has no path {path.index}")
        _, fences = self._load()
        self._stall()
        if self.export_delay:
            time.sleep(self.export_delay)
        if str(path) in self.fail:
            raise TransientBackendError(f"fake: configured to fail exporting {path}", retry_after=1.0)
        entry = {"iqn": disk.iqn, "tpg": path.index, "portal": f"{spec.ip}", "serial": disk.serial,
                 "initiators": None if disk.initiators is None else list(disk.initiators), "size": disk.size}
        with self._locked():
            paths, now_fences, logins = self._state()
            if now_fences != fences:
                raise TransientBackendError(f"fake: fenced while exporting {path}", retry_after=0.5)
            new = dict(paths)
            new[str(path)] = entry
            for k in self._of_disk(paths, disk.id):
                new[k] = {**paths[k], **{f: entry[f] for f in _DISK_FIELDS}}
            kept = [i for i in logins.get(disk.id, []) if _admits(disk.initiators, i)]
            dropped = sorted(set(logins.get(disk.id, [])) - set(kept))
            if new == paths and not dropped:
                return
            logins[disk.id] = kept
            self._save(new, fences, logins)
        if dropped:
            log.info("fake: dropped the sessions of %s on %s (no longer admitted)", ", ".join(dropped), disk.id)
        log.info("fake: would export %s as %s tpg %d portal %s", path, disk.iqn, path.index, spec.ip)

    def unexport(self, path: PathKey) -> None:
        """Forget the path; the disk's sessions go with its last path."""
        self._stall()
        with self._locked():
            paths, fences, logins = self._state()
            if str(path) not in paths:
                return
            del paths[str(path)]
            if not self._of_disk(paths, path.disk):
                logins.pop(path.disk, None)
            self._save(paths, fences, logins)
        log.info("fake: would unexport %s", path)

    def logged_in(self) -> Mapping[str, frozenset[str]]:
        """The sessions ``login`` recorded, by disk id (read from the state file, without a lock).
        ``TransientBackendError`` while the stall file exists (the daemon does not answer)."""
        if self.stall_file and os.path.exists(self.stall_file):
            raise TransientBackendError("fake: the target does not answer (stall file)", retry_after=0.5)
        return {d: frozenset(v) for d, v in self._state()[2].items() if v}

    def fence(self) -> None:
        """Forget every export and session at once: one atomic write under the file lock, which is only
        ever held for a write (never across a stall or a delay)."""
        with self._locked(wait=False):
            try:
                _, fences = self._load()
            except PermanentBackendError:
                fences = 0
            self._save({}, fences + 1, {})

    # ---------------------------------------------------------------- testing aids

    def login(self, disk_id: str, initiator: str) -> None:
        """``initiator`` logs in to ``disk_id``'s target on this node (idempotent: one session per
        initiator and disk). ``LoginRefused`` when no path of the disk is exported here or its ACL does
        not admit ``initiator``. CHAP is not modelled."""
        with self._locked():
            paths, fences, logins = self._state()
            mine = self._of_disk(paths, disk_id)
            if not mine:
                raise LoginRefused(f"fake: {disk_id} is not exported on this node")
            if not _admits(paths[mine[0]].get("initiators"), initiator):
                raise LoginRefused(f"fake: {disk_id} does not admit {initiator}")
            if initiator in logins.get(disk_id, []):
                return
            logins.setdefault(disk_id, []).append(initiator)
            self._save(paths, fences, logins)

    def logout(self, disk_id: str, initiator: str) -> None:
        """``initiator`` logs out of ``disk_id`` (no-op when it has no session there)."""
        with self._locked():
            paths, fences, logins = self._state()
            if initiator not in logins.get(disk_id, []):
                return
            logins[disk_id] = [i for i in logins[disk_id] if i != initiator]
            self._save(paths, fences, logins)

    def reported_size(self, disk_id: str) -> int | None:
        """The size (bytes) the disk's LUN reports on this node: its ``Disk.size`` at the last export;
        ``None`` when the disk is not exported here."""
        paths, _ = self._load()
        mine = self._of_disk(paths, disk_id)
        return int(paths[mine[0]].get("size", 0)) if mine else None
