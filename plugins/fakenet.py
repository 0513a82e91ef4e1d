"""``fake`` network backend: records which floating IPs would be up in ``{state_dir}/fake-addresses.json``.

For tests and demos without network namespaces: the record is what a test samples to see which node
"has" an address (two nodes with the same path up at once is the overlap the fencing design rules out).
``fence`` clears it in one atomic write.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from agent import statefile
from agent.backend import NetworkBackend, PluginContext
from agent.core.model import PathKey, PathSpec
from agent.errors import PermanentBackendError, TransientBackendError
from plugins.options import Options

log = logging.getLogger(__name__)


class FakeNetwork(NetworkBackend):
    config_keys: Mapping[str, str] = {"file": "record (default {state_dir}/fake-addresses.json)"}

    def __init__(self, context: PluginContext) -> None:
        o = Options("network.fake", context.options)
        self.path = o.text("file", "") or os.path.join(context.state_dir, "fake-addresses.json")
        self.may_serve = context.may_serve
        o.done()

    def _load(self) -> dict[str, Any]:
        try:
            return dict(statefile.read(self.path, {}).get("addresses", {}))
        except (OSError, ValueError, AttributeError) as e:
            raise PermanentBackendError(f"fake address record {self.path}: {e}") from e

    def _save(self, addresses: Mapping[str, Any]) -> None:
        try:
            statefile.write(self.path, {"addresses": dict(addresses)})
        except OSError as e:
            raise TransientBackendError(f"fake address record {self.path}: {e}") from e

    def up(self, path: PathKey, spec: PathSpec) -> None:
        a = self._load()
        if a.get(str(path)) != f"{spec.ip}/{spec.prefix}":
            if not self.may_serve():
                raise TransientBackendError(f"not bringing {path} up: this node may not serve now")
            a[str(path)] = f"{spec.ip}/{spec.prefix}"
            self._save(a)
            log.info("fake: %s/%d up for %s", spec.ip, spec.prefix, path)

    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        a = self._load()
        if str(path) in a:
            del a[str(path)]
            self._save(a)
            log.info("fake: address of %s down", path)

    def active(self) -> frozenset[PathKey]:
        out = set()
        for k in self._load():
            disk, _, idx = k.rpartition("/")
            out.add(PathKey(disk, int(idx)))
        return frozenset(out)

    def fence(self) -> None:
        self._save({})
