"""``fake`` catalog: disk definitions from one JSON file instead of RBD image metadata.

For tests and demos of the core without Ceph. ``[catalog.fake] file`` names a JSON object mapping disk
id -> definition document (the same version-1 document that lives in the RBD metadata; it is validated
the same way). A disk missing from the file raises ``CatalogUnavailable``; an invalid document raises
``DefinitionError``. The file is re-read whenever it changes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from agent.core import schema
from agent.backend import Catalog, PluginContext
from agent.errors import CatalogUnavailable, DefinitionError
from agent.core.model import Disk


class FileCatalog(Catalog):
    config_keys: Mapping[str, str] = {"file": "JSON file: {disk_id: definition document}"}

    def __init__(self, context: PluginContext) -> None:
        self.file = str(context.options.get("file") or os.path.join(context.state_dir, "fake-catalog.json"))
        self._stamp: tuple[int, int] | None = None
        self._docs: dict[str, Any] = {}

    def _reload(self, disk_id: str) -> None:
        try:
            st = os.stat(self.file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.file, encoding="utf-8") as f:
                    docs = json.load(f)
                if not isinstance(docs, dict):
                    raise ValueError("not a JSON object")
                self._docs, self._stamp = docs, stamp
        except (OSError, ValueError) as e:
            raise CatalogUnavailable(disk_id, f"catalog file {self.file}: {e}") from e

    def get(self, disk_id: str, pool: str, image: str, version: int) -> Disk:
        self._reload(disk_id)
        if disk_id not in self._docs:
            raise CatalogUnavailable(disk_id, f"not in catalog file {self.file}")
        doc = self._docs[disk_id]
        if isinstance(doc, str):
            return schema.parse(doc, disk_id)
        return schema.from_dict(doc, disk_id)
