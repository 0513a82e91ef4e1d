"""Typed reads of a plugin's config sub-table, collecting every problem into one ``ConfigError``.

```python
o = Options("target.tgt", context.options)
port = o.integer("control_port", 0, 0, 65535)
o.done()          # raises ConfigError listing every bad key
```
"""
from __future__ import annotations

from typing import Any, Mapping

from agent.errors import ConfigError


class Options:
    def __init__(self, table: str, values: Mapping[str, Any]) -> None:
        self.table = table
        self.values = values
        self.problems: list[tuple[str, str]] = []

    def _bad(self, key: str, msg: str) -> None:
        self.problems.append((f"{self.table}.{key}", msg))

    def text(self, key: str, default: str, max_len: int = 4096, forbid: str = "") -> str:
        v = self.values.get(key, default)
        if not isinstance(v, str) or len(v) > max_len or any(c in v for c in forbid):
            extra = f" without any of {forbid!r}" if forbid else ""
            self._bad(key, f"must be a string of at most {max_len} characters{extra}")
            return default
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.values.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self._bad(key, f"must be an integer {lo}-{hi}")
            return default
        return int(v)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.values.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            self._bad(key, f"must be a number {lo:g}-{hi:g}")
            return default
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.values.get(key, default)
        if not isinstance(v, bool):
            self._bad(key, "must be true or false")
            return default
        return v

    def str_table(self, key: str) -> dict[str, str]:
        v = self.values.get(key, {})
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) and x
                                                 for k, x in v.items()):
            self._bad(key, "must be a table of strings")
            return {}
        return dict(v)

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
