"""A small JSON state file written atomically (write to a temp file, fsync, rename)."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def read(path: str, default: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def write(path: str, data: Any, durable: bool = False) -> None:
    """Replace ``path`` atomically (readers see the old or the new content, never a mix); with
    ``durable`` also fsync before the rename."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
