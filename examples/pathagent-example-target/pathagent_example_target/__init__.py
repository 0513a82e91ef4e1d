"""``logged``: a pathagent target backend that logs every call and delegates the work to another one.

What it shows (docs/plugins.md walks through it):

- the class implements ``agent.backend.TargetBackend`` and is registered under the entry point namespace
  ``pathagent.targets`` by this package's own ``setup.cfg``; pathagent finds it by name
  (``[target] backend = "logged"``) once the package is installed into pathagent's venv;
- its settings are the config sub-table named after it, ``[target.logged]``; ``config_keys`` lists the keys
  (the host refuses any other), and the constructor checks the values and raises ``ConfigError`` with every
  problem and its key (``pathagent check-config`` and ``pathagent run`` report them);
- the constructor touches nothing: it runs in ``check-config``, in the agent and in the watchdog guard
  process, which builds the same backend from the same config to fence it;
- it imports only the host's interfaces (``agent.backend``, ``agent.core.model``, ``agent.errors``) and
  stevedore, which it uses to build its delegate from the same namespace;
- ``fence`` stays one bounded step with no lock: the delegate's fence first, then one appended line;
- nothing secret is written: the journal names the path, the IQN, the image and the portal, never CHAP.

Options (``[target.logged]``):

- ``delegate``: the target backend that does the work (default ``tgt``; any name in ``pathagent.targets``
  but ``logged`` itself);
- ``delegate_options``: a table, the delegate's own options (what ``[target.<delegate>]`` holds otherwise);
- ``journal``: the file the records are appended to (default ``{state.dir}/logged-target.jsonl``); one JSON
  object per line: ``{"t": unix time, "pid": ..., "op": "export" | "unexport" | "fence", "path": "disk/index",
  ...}``, written after the delegate's call returned, with ``"error"`` when it raised.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Mapping

from stevedore import driver
from stevedore.exception import NoMatches

from agent.backend import PluginContext, TargetBackend
from agent.core.model import Disk, PathKey
from agent.errors import BackendError, ConfigError

NAME = "logged"
NAMESPACE = "pathagent.targets"
log = logging.getLogger(__name__)


def _target_class(name: str) -> type:
    """The target backend class registered as ``name`` (``LookupError`` when there is none)."""
    try:
        mgr: driver.DriverManager[Any] = driver.DriverManager(namespace=NAMESPACE, name=name, invoke_on_load=False)
    except NoMatches:
        raise LookupError(name) from None
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, TargetBackend)):
        raise LookupError(name)
    return cls


class LoggedTarget(TargetBackend):
    """See the module docstring."""

    config_keys: Mapping[str, str] = {
        "delegate": "the target backend that does the work (default tgt)",
        "delegate_options": "table: the delegate's own options",
        "journal": "file the JSON-lines records are appended to (default {state_dir}/logged-target.jsonl)",
    }

    def __init__(self, context: PluginContext) -> None:
        key = f"target.{NAME}"
        opts = context.options
        problems: list[tuple[str, str]] = []
        delegate = opts.get("delegate", "tgt")
        if not isinstance(delegate, str) or not delegate or delegate == NAME:
            problems.append((f"{key}.delegate", f"must name another target backend than {NAME!r}"))
            delegate = ""
        inner_opts = opts.get("delegate_options", {})
        if not isinstance(inner_opts, dict):
            problems.append((f"{key}.delegate_options", "must be a table"))
            inner_opts = {}
        journal = opts.get("journal", "")
        if not isinstance(journal, str):
            problems.append((f"{key}.journal", "must be a path"))
            journal = ""
        cls: type | None = None
        if delegate:
            try:
                cls = _target_class(delegate)
            except LookupError:
                problems.append((f"{key}.delegate", f"no target backend named {delegate!r} in {NAMESPACE}"))
        if cls is not None:
            known = getattr(cls, "config_keys", {})
            problems += [(f"{key}.delegate_options.{k}", f"unknown key (of the {delegate} backend)")
                         for k in inner_opts if k not in known]
        if problems:
            raise ConfigError(problems)
        assert cls is not None
        self.delegate_name = delegate
        self.journal = journal or os.path.join(context.state_dir, "logged-target.jsonl")
        self.port = context.port
        # the delegate checks its own values; it is built with the same context, its own options
        self._inner: TargetBackend = cls(dataclasses.replace(context, options=inner_opts))

    # --- the record -----------------------------------------------------------------------------------

    def _record(self, op: str, **fields: Any) -> None:
        line = json.dumps({"t": round(time.time(), 3), "pid": os.getpid(), "op": op, **fields}, sort_keys=True)
        try:
            # one write of one line with O_APPEND: records of the agent and of the guard never interleave
            fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as e:        # the journal is an aid: it never fails a call of the data path
            log.warning("logged: cannot append to %s: %s", self.journal, e)

    # --- TargetBackend --------------------------------------------------------------------------------

    def exported(self) -> frozenset[PathKey]:
        return self._inner.exported()          # every cycle: not logged

    def logged_in(self) -> Mapping[str, frozenset[str]] | None:
        return self._inner.logged_in()

    def export(self, path: PathKey, disk: Disk) -> None:
        spec = disk.path(path.index)
        what = {"path": str(path), "iqn": disk.iqn, "image": f"{disk.pool}/{disk.image}",
                "portal": f"{spec.ip}:{self.port}" if spec else None, "delegate": self.delegate_name}
        try:
            self._inner.export(path, disk)
        except BackendError as e:
            log.warning("logged: export of %s through %s failed: %s", path, self.delegate_name, e)
            self._record("export", error=str(e), **what)
            raise
        log.info("logged: exported %s (%s) on %s through %s", path, disk.iqn, what["portal"], self.delegate_name)
        self._record("export", **what)

    def unexport(self, path: PathKey) -> None:
        try:
            self._inner.unexport(path)
        except BackendError as e:
            log.warning("logged: unexport of %s through %s failed: %s", path, self.delegate_name, e)
            self._record("unexport", path=str(path), error=str(e))
            raise
        log.info("logged: unexported %s through %s", path, self.delegate_name)
        self._record("unexport", path=str(path))

    def fence(self) -> None:
        try:
            self._inner.fence()                # first: the bound of the fence is the delegate's
        except BackendError as e:
            self._record("fence", error=str(e))
            raise
        self._record("fence")

    def close(self) -> None:
        self._inner.close()
