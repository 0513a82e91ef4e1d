"""Setting a ``/proc/sys`` switch of this network namespace, shared by the built-in plugins."""
from __future__ import annotations


def ensure_one(path: str) -> bool:
    """Make the sysctl file ``path`` read ``1``. Returns whether it had to be changed; raises ``OSError``
    (``FileNotFoundError`` when the switch does not exist here)."""
    with open(path, encoding="ascii") as f:
        if f.read().strip() == "1":
            return False
    with open(path, "w", encoding="ascii") as f:
        f.write("1")
    return True
