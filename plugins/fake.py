"""``fake`` target backend: does nothing on the data path.

It records the exported paths in ``{state_dir}/fake-targets.json`` (written atomically), so that the set
survives an agent restart the way a kernel target does, and tests can watch it from outside (the guard
process fences it from another process, the same way it fences a real daemon).

Options (``[target.fake]``), testing aids:

- ``fail``: ``"disk/index"`` paths whose export raises ``TransientBackendError``;
- ``export_delay``: seconds every export takes (a slow LUN add, a Ceph probe waiting);
- ``stall_file``: while this file exists, ``exported``, ``export`` and ``unexport`` block until it is
  removed (a wedged target daemon); ``fence`` never blocks.

Like a target daemon killed under a call, an export that was under way when the backend was fenced (by
this process or by the guard) fails instead of recording its path: every read-modify-write of the state
file holds an ``flock`` for the few microseconds of the write, and the file carries a fence count.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from typing import Any, Iterator, Mapping

from agent import statefile
from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.options import Options

log = logging.getLogger(__name__)


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

    def _stall(self) -> None:
        while self.stall_file and os.path.exists(self.stall_file):
            time.sleep(0.05)

    @contextlib.contextmanager
    def _locked(self, wait: bool = True) -> Iterator[None]:
        """The file lock; with ``wait`` false, give up after 50 ms (the fence never waits on a holder that
        may be frozen) and go on without it."""
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

    def _load(self) -> tuple[dict[str, dict[str, Any]], int]:
        """The recorded exports and the fence count."""
        try:
            data = statefile.read(self.path, {})
            return dict(data.get("paths", {})), int(data.get("fences", 0))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise PermanentBackendError(f"fake state file {self.path}: {e}") from e

    def _save(self, paths: dict[str, dict[str, Any]], fences: int) -> None:
        try:
            statefile.write(self.path, {"paths": paths, "fences": fences})
        except OSError as e:
            raise TransientBackendError(f"fake state file {self.path}: {e}") from e

    def exported(self) -> frozenset[PathKey]:
        self._stall()
        out = set()
        for k in self._load()[0]:
            disk, _, idx = k.rpartition("/")
            out.add(PathKey(disk, int(idx)))
        return frozenset(out)

    def export(self, path: PathKey, disk: Disk) -> None:
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
                 "initiators": None if disk.initiators is None else list(disk.initiators)}
        with self._locked():
            paths, now_fences = self._load()
            if now_fences != fences:
                raise TransientBackendError(f"fake: fenced while exporting {path}", retry_after=0.5)
            if paths.get(str(path)) == entry:
                return
            paths[str(path)] = entry
            self._save(paths, fences)
        log.info("fake: would export %s as %s tpg %d portal %s", path, disk.iqn, path.index, spec.ip)

    def unexport(self, path: PathKey) -> None:
        self._stall()
        with self._locked():
            paths, fences = self._load()
            if str(path) not in paths:
                return
            del paths[str(path)]
            self._save(paths, fences)
        log.info("fake: would unexport %s", path)

    def fence(self) -> None:
        """Forget every export at once: one atomic write under the file lock, which is only ever held for
        a write (never across a stall or a delay)."""
        with self._locked(wait=False):
            try:
                _, fences = self._load()
            except PermanentBackendError:
                fences = 0
            self._save({}, fences + 1)
