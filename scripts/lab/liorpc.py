"""A target backend running inside a LIO guest, driven from the host as if it were local.

The guest's control daemon (``lab.guestd``) imports this module in its own process and calls ``new`` and
``invoke`` (``Guest.call``); the backend objects live there between calls, like an agent's. Arguments and
results travel pickled (the guest runs the same Python and the same checkout, shared at the same path).
``RemoteBackend`` is the host side: a ``TargetBackend`` whose every method runs in the guest, and whose
errors come back as the same ``BackendError`` kinds (with ``retry_after``). Tests only.
"""
from __future__ import annotations

import base64
import itertools
import pickle
import threading
from typing import Any, Mapping

from agent.backend import PluginContext, TargetBackend
from agent.config import CephConfig
from agent.core.model import Disk, PathKey
from agent.errors import BackendError, ConfigError, PermanentBackendError, TransientBackendError

# ------------------------------------------------------------------ guest side

_backends: dict[int, TargetBackend] = {}
_ids = itertools.count(1)
_lock = threading.Lock()


def _pack(v: Any) -> str:
    return base64.b64encode(pickle.dumps(v)).decode()


def _unpack(s: str) -> Any:
    return pickle.loads(base64.b64decode(s))


def new(name: str, context: str) -> int:
    """Build backend ``name`` (a ``pathagent.targets`` plugin) from a pickled ``PluginContext``."""
    from agent.plugins import plugin_class
    ctx: PluginContext = _unpack(context)
    b = plugin_class("target", name)(ctx)
    with _lock:
        n = next(_ids)
        _backends[n] = b
    return n


def invoke(handle: int, method: str, args: str) -> str:
    """``method(*args)`` on backend ``handle``; the result pickled."""
    b = _backends[handle]
    return _pack(getattr(b, method)(*_unpack(args)))


def drop(handle: int) -> None:
    with _lock:
        b = _backends.pop(handle, None)
    if b is not None:
        b.close()


# ------------------------------------------------------------------ host side

_KINDS: dict[str, type[Exception]] = {
    "agent.errors.TransientBackendError": TransientBackendError,
    "agent.errors.PermanentBackendError": PermanentBackendError,
    "agent.errors.BackendError": BackendError,
    "agent.errors.ConfigError": ConfigError,
}


class RemoteBackend(TargetBackend):
    """A backend in ``guest`` (a ``lab.guest.Guest``). The context is built on the host; ``wake`` and
    ``ceph_probe`` do not cross (the guest's backend gets neither)."""

    def __init__(self, guest: Any, name: str, ctx: PluginContext) -> None:
        self.guest = guest
        self.name = name
        plain = PluginContext(node=ctx.node, state_dir=ctx.state_dir, options=dict(ctx.options),
                              ceph=CephConfig(**{f: getattr(ctx.ceph, f) for f in ctx.ceph.__dataclass_fields__}),
                              port=ctx.port, config_file=ctx.config_file)
        self.handle = int(self._call("lab.liorpc:new", name, _pack(plain)))

    def _call(self, fn: str, *args: Any) -> Any:
        from lab.guest import GuestCallError
        try:
            return self.guest.call(fn, *args)
        except GuestCallError as e:
            kind = _KINDS.get(e.type)
            if kind is None:
                raise
            if kind is TransientBackendError:
                raise TransientBackendError(e.message, retry_after=float(e.attrs.get("retry_after", 1.0))) from None
            raise kind(e.message) from None

    def _invoke(self, method: str, *args: Any) -> Any:
        return _unpack(self._call("lab.liorpc:invoke", self.handle, method, _pack(args)))

    def exported(self) -> frozenset[PathKey]:
        return frozenset(self._invoke("exported"))

    def export(self, path: PathKey, disk: Disk) -> None:
        self._invoke("export", path, disk)

    def unexport(self, path: PathKey) -> None:
        self._invoke("unexport", path)

    def logged_in(self) -> Mapping[str, frozenset[str]] | None:
        r: Mapping[str, frozenset[str]] | None = self._invoke("logged_in")
        return r

    def fence(self) -> None:
        self._invoke("fence")

    def close(self) -> None:
        self._call("lab.liorpc:drop", self.handle)
