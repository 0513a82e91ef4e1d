"""``fake`` target backend: does nothing on the data path.

It logs what a real backend would do and records the exported paths in ``{state_dir}/fake-targets.json``
(written atomically), so that the set survives an agent restart the way a kernel target does, and tests
can watch it from outside. Options (``[target.fake]``): ``fail`` — a list of ``"disk/index"`` paths whose
export raises ``TransientBackendError`` (to exercise the agent's error handling).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from agent.backend import PluginContext, TargetBackend
from agent.errors import PermanentBackendError, TransientBackendError
from agent.core.model import Disk, PathKey
from agent import statefile

log = logging.getLogger(__name__)


class FakeBackend(TargetBackend):
    config_keys: Mapping[str, str] = {
        "fail": "list of disk/index paths whose export fails (testing aid)",
        "file": "state file (default {state_dir}/fake-targets.json)",
    }

    def __init__(self, context: PluginContext) -> None:
        opts: Mapping[str, Any] = context.options
        self.path = str(opts.get("file") or os.path.join(context.state_dir, "fake-targets.json"))
        self.fail = frozenset(str(p) for p in opts.get("fail", []))
        self._cache: tuple[tuple[int, int], dict[str, dict[str, Any]]] | None = None

    def _stamp(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_ino)

    def _load(self) -> dict[str, dict[str, Any]]:
        """The recorded exports; re-read only when the file changed since we last read or wrote it."""
        stamp = self._stamp()
        if self._cache is not None and self._cache[0] == stamp:
            return dict(self._cache[1])
        try:
            data = statefile.read(self.path, {})
        except (OSError, ValueError) as e:
            raise PermanentBackendError(f"fake state file {self.path}: {e}") from e
        paths = dict(data.get("paths", {}))
        self._cache = (stamp, paths)
        return dict(paths)

    def _save(self, paths: dict[str, dict[str, Any]]) -> None:
        try:
            statefile.write(self.path, {"paths": paths})
        except OSError as e:
            raise TransientBackendError(f"fake state file {self.path}: {e}") from e
        self._cache = (self._stamp(), dict(paths))

    def exported(self) -> frozenset[PathKey]:
        out = set()
        for k in self._load():
            disk, _, idx = k.rpartition("/")
            out.add(PathKey(disk, int(idx)))
        return frozenset(out)

    def export(self, path: PathKey, disk: Disk) -> None:
        if str(path) in self.fail:
            raise TransientBackendError(f"fake: configured to fail exporting {path}", retry_after=1.0)
        spec = disk.path(path.index)
        if spec is None:
            raise PermanentBackendError(f"disk {disk.id} has no path {path.index}")
        paths = self._load()
        entry = {"iqn": disk.iqn, "tpg": path.index, "portal": f"{spec.ip}", "serial": disk.serial}
        if paths.get(str(path)) == entry:
            return
        log.info("fake: would export %s as %s tpg %d portal %s", path, disk.iqn, path.index, spec.ip)
        paths[str(path)] = entry
        self._save(paths)

    def unexport(self, path: PathKey) -> None:
        paths = self._load()
        if str(path) not in paths:
            return
        log.info("fake: would unexport %s", path)
        del paths[str(path)]
        self._save(paths)

    def cleanup(self, keep: frozenset[PathKey]) -> None:
        paths = self._load()
        kept = {k: v for k, v in paths.items() if k in {str(p) for p in keep}}
        if kept != paths:
            self._save(kept)
