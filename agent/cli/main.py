"""The ``pathagent`` command line.

``--config FILE`` and ``--json`` are accepted before or after the subcommand. Exit codes: 0 success,
1 operation failed (``status``: the node is degraded, see ``STATUS_HELP``), 2 usage or configuration error
(every command: a config file that cannot be read, is not UTF-8 or not TOML is one line naming the file,
and the line and column where that applies; a bad setting names the file and ``[table] key``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Mapping, Sequence, TextIO

from agent import config as config_mod
from agent import plugins
from agent.backend import Catalog
from agent.config import Config
from agent.errors import AgentError, CatalogError, ConfigError, CoordinationError, DefinitionError
from agent.core.model import PathKey
from agent.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Live, emit, fail, paths_table
from agent.core.tree import KVEntry, parse_tree

Handler = Callable[[argparse.Namespace, Config], int]


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    d: Any = None if top else argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE", default=d,
                   help="config file (default: $PATHAGENT_CONFIG or /etc/pathagent/pathagent.toml)")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="machine-readable output")


class _Parser(argparse.ArgumentParser):
    def add_subparsers(self, **kw: Any) -> Any:  # every subcommand accepts the common options too
        kw.setdefault("parser_class", _Parser)
        sp = super().add_subparsers(**kw)
        orig = sp.add_parser

        def add_parser(name: str, **k: Any) -> argparse.ArgumentParser:
            p: argparse.ArgumentParser = orig(name, **k)
            _common(p, top=False)
            return p
        sp.add_parser = add_parser  # type: ignore[method-assign]
        return sp


EPILOG = """exit codes: 0 success, 1 operation failed (for status: the node is degraded), 2 usage or
configuration error (a config file that is not UTF-8 or not TOML, or a bad setting, names the file and
the key)"""

STATUS_HELP = """This node's state as its agent records it in [state] dir (the agent's pid, its session,
the lease, fenced or not, the paths it exports, its last warnings and errors), read even when Consul is
down, and Consul's view of the node when Consul answers ("consul: unreachable (...)" otherwise).
Exit 0 when the node is healthy: an agent runs (it holds the state directory's lock), its status file
was written in the last %gs, it holds a session and a lease, it is not fenced, its watchdog is pet,
it is not waiting to be fenced, and Consul answers and lists exactly that session of this node. Exit 1
when the node is degraded (any of those fails; every reason is listed); 2 on a configuration error."""

RUN_HELP = """The node service, in the foreground (systemd runs it). SIGTERM / SIGINT: orderly stop (every
address down, unexport, release every lock, destroy the session, disarm the watchdog: another gateway
takes over at once). SIGUSR2: detach for a planned restart (session, locks, exports and the armed
watchdog stay; the next agent process adopts them). Refuses to start (exit 2) on any config problem
that check-config reports."""


def _interval(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number of seconds") from None
    if not 0.1 <= x <= 3600:
        raise argparse.ArgumentTypeError(f"{v!r}: must be between 0.1 and 3600 seconds")
    return x


def build_parser() -> argparse.ArgumentParser:
    from agent.cli import version
    parser = _Parser(prog="pathagent", description="iSCSI gateway path agent (Ceph RBD, Consul locks)",
                     epilog=EPILOG)
    _common(parser, top=True)
    parser.add_argument("--version", action="version", version=f"pathagent {version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the node service in the foreground", description=RUN_HELP)
    p.set_defaults(func=cmd_run, needs_config=True)

    what = "every path with its owner"
    p = sub.add_parser("paths", help=what, description=what + ": disk, index, name, IP, owner node, state "
                       "(held, free, stopping, invalid). --watch redraws the table until Ctrl-C (exit 0); a "
                       "Consul error is shown in its header and retried.")
    p.add_argument("--mine", action="store_true", help="only this node's paths")
    p.add_argument("--node", metavar="N", help="only paths owned by node N")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C: at once when a path changes, "
                   "else every --interval seconds (--json: one JSON object per refresh and line)")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="S",
                   help="seconds between refreshes with --watch (default 2)")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("status", help="this node: agent, session, lease, fenced, exports, errors, Consul's view",
                       description=STATUS_HELP % STATUS_STALE)
    p.set_defaults(func=cmd_status)

    what = "list every problem in the config"
    p = sub.add_parser("check-config", help=what, description=what + ", with its key, as run would refuse "
                       "it: the core tables, the fencing inequality and every configured plugin's own "
                       "options (exit 2 if any problem)")
    p.set_defaults(func=cmd_check_config, raw_config=True)

    from agent.cli import disk as cli_disk
    cli_disk.register(sub)
    from agent.cli import consulconfig
    consulconfig.register(sub)

    what = "every installed plugin: kind, name, where it comes from"
    p = sub.add_parser("plugins", help=what, description=what + " (the built-in ones and any package that "
                       "registers an entry point in a pathagent.* namespace; docs/plugins.md)")
    p.set_defaults(func=cmd_plugins, no_config=True)

    what = "every gateway: live, drained, paths held, leader"
    p = sub.add_parser("nodes", help=what, description=what)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("node", help="node operations", description="node operations")
    nsub = p.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    for name, on, what in (("drain", True, "move NODE's paths away by planned moves; it takes none until undrained"),
                           ("undrain", False, "let NODE take paths again")):
        d = nsub.add_parser(name, help=what, description=what)
        d.add_argument("node", metavar="NODE")
        if on:
            d.add_argument("--wait", action="store_true", help="return once NODE holds no path")
            d.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")
        d.set_defaults(func=cmd_node_drain, drain_on=on, audit=True)

    p = sub.add_parser("path", help="path operations", description="path operations")
    psub = p.add_subparsers(dest="path_command", metavar="SUBCOMMAND", required=True)
    what = "move one path to a node, without lock-delay"
    m = psub.add_parser("move", help=what, description=what)
    m.add_argument("path", metavar="DISK_ID/INDEX")
    m.add_argument("node", metavar="NODE")
    m.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the move (default 30)")
    m.set_defaults(func=cmd_path_move, audit=True)
    return parser


# --- commands ------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from agent import logsetup as log
    from agent.runtime import service
    from agent.runtime.statedir import ErrorLog
    log.setup(cfg.log_level, cfg.log_format)
    errors = ErrorLog.install(cfg.state_dir)       # written to errors.json once the agent holds the state dir
    try:
        return service.run(cfg)
    finally:
        errors.close()


def config_problems(explicit: str | None) -> tuple[str, bool, list[tuple[str, str]]]:
    """What ``check-config`` reports: the file, whether it exists, and every problem with its key: those
    of ``config.examine`` (tables, keys, values, the fencing inequality) and then those the configured
    plugins find in their own sub-tables (``plugins.option_problems``): every check ``run`` applies
    before it asks Consul anything. A file that cannot be read or decoded is the one problem."""
    path, named = config_mod.config_path(explicit)
    try:
        data = config_mod.read(path, named)
    except ConfigError as e:
        return path, True, e.problems
    cfg, problems = config_mod.examine(data or {}, path)
    seen = set(problems)
    for pr in plugins.option_problems(cfg):
        if pr not in seen:
            seen.add(pr)
            problems.append(pr)
    return path, data is not None, problems


def cmd_check_config(args: argparse.Namespace, cfg: Config | None) -> int:
    path, found, problems = config_problems(args.config)
    if problems:
        emit(args, {"file": path, "ok": False, "problems": [
                 {"key": k, "where": config_mod.show_key(k), "problem": m} for k, m in problems]},
             "\n".join(config_mod.problem_line(path, k, m) for k, m in problems))
        return EXIT_USAGE
    emit(args, {"file": path, "ok": True, "found": found, "problems": []},
         f"{path}: OK" if found else f"{path}: not found; every setting at its default: OK")
    return EXIT_OK


def _catalog(cfg: Config) -> Catalog:
    return plugins.load_catalog(cfg.catalog.backend, plugins.context(cfg, "catalog", cfg.node_name))


def _rows(cfg: Config, entries: Sequence[KVEntry], sessions: Mapping[str, str], catalog: Catalog,
          index: int = 0) -> list[dict[str, Any]]:
    """``path_rows`` from what was read: the KV tree, session id -> node, and the catalog to read with."""
    tree = parse_tree(cfg.consul.prefix.rstrip("/"), entries, index)
    defs: dict[str, Any] = {}
    invalid: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for disk_id, rec in tree.disks.items():
        try:
            defs[disk_id] = catalog.get(disk_id, rec.pool, rec.image, rec.modify_index)
        except DefinitionError as e:
            invalid[disk_id] = e.message
        except CatalogError as e:
            unreadable[disk_id] = f"definition unreadable: {e.message}"
    rows = []
    for p in sorted(tree.paths):
        st = tree.paths[p]
        disk = defs.get(p.disk)
        spec = disk.path(p.index) if disk else None
        node = (st.node or sessions.get(st.session or "")) if st.session else None
        stopping = p.disk in tree.disks and tree.disks[p.disk].stopping
        state = ("invalid" if p.disk in invalid else "stopping" if stopping
                 else "held" if st.session else "free")
        row: dict[str, Any] = {"disk": p.disk, "index": p.index, "ip": spec.ip if spec else None,
                               "node": node, "state": state, "name": disk.name if disk else None}
        error = invalid.get(p.disk) or unreadable.get(p.disk)
        if error:
            row["error"] = error
        rows.append(row)
    return rows


def path_rows(cfg: Config) -> list[dict[str, Any]]:
    """Every path key with its owner, IP and state (``held``, ``free``, ``stopping``, ``invalid``): the
    keys ``disk``, ``index``, ``ip``, ``node``, ``state`` (a fixed contract), ``name`` (the disk's display
    name; ``None`` when its definition cannot be read) and ``error`` for a disk whose definition is
    invalid (state ``invalid``) or cannot be read now (Ceph unreachable: the state stays what the lock
    says, the IP and name are ``None``)."""
    from agent.adapters.consul_store import ConsulStore
    store = ConsulStore(cfg.consul)
    try:
        index, entries = store.read_tree()
        sessions = {s.id: s.node for s in store.sessions()}
    finally:
        store.close()
    catalog = _catalog(cfg)
    try:
        return _rows(cfg, entries, sessions, catalog, index)
    finally:
        catalog.close()


def _filter(rows: list[dict[str, Any]], mine: str | None, node: str | None) -> list[dict[str, Any]]:
    """The rows owned by ``mine`` (this node's name, for ``--mine``) and by ``node``, where given."""
    if mine is not None:
        rows = [r for r in rows if r["node"] == mine]
    if node:
        rows = [r for r in rows if r["node"] == node]
    return rows


def cmd_paths(args: argparse.Namespace, cfg: Config) -> int:
    if args.watch:
        return watch_paths(args, cfg)
    rows = path_rows(cfg)
    me = None
    if args.mine:
        from agent.adapters.consul_store import ConsulStore
        store = ConsulStore(cfg.consul)
        try:
            me = cfg.node_name or store.agent_node_name()
        finally:
            store.close()
    rows = _filter(rows, me, args.node)
    emit(args, rows, paths_table(rows))
    return EXIT_OK


#: the least time between two redraws of ``paths --watch`` (a burst of changes is drawn once)
WATCH_MIN_GAP = 0.25


@dataclass(frozen=True)
class Refresh:
    """One refresh of the path table: ``rows`` (those read last), ``error`` (why this read failed, the
    rows then being the last good ones), ``read_at`` (wall time of the rows; ``None``: never read)."""

    rows: list[dict[str, Any]]
    error: str | None
    read_at: float | None


def watch_rows(cfg: Config, interval: float, mine: bool = False, node: str | None = None) -> Generator[Refresh, None, None]:
    """The path table again and again, for ``paths --watch`` and the demo: a blocking read of the prefix
    returns on the first change (drawn at most every ``WATCH_MIN_GAP`` seconds) or after ``interval``
    seconds; a Consul error is yielded with the last rows and retried every ``interval``. Never ends by
    itself; closing the generator closes its Consul and catalog connections. ``ConfigError`` at once
    when the catalog plugin cannot be built (a bad config is not retried)."""
    from agent.adapters.consul_store import ConsulStore
    from agent.core.store import next_index
    catalog = _catalog(cfg)
    try:
        store = ConsulStore(cfg.consul)
    except BaseException:
        catalog.close()
        raise
    index = 0
    rows: list[dict[str, Any]] = []
    read_at: float | None = None
    me: str | None = None
    try:
        while True:
            t0 = time.monotonic()
            error: str | None = None
            try:
                got, entries = store.read_tree(index, interval) if index else store.read_tree()
                index = next_index(index, got)
                sessions = {s.id: s.node for s in store.sessions()}
                if mine and me is None:
                    me = cfg.node_name or store.agent_node_name()
                rows = _filter(_rows(cfg, entries, sessions, catalog, got), me if mine else None, node)
                read_at = time.time()
            except CoordinationError as e:
                error, index = str(e), 0
            yield Refresh(rows, error, read_at)
            pause = interval if error is not None else WATCH_MIN_GAP - (time.monotonic() - t0)
            if pause > 0:
                time.sleep(pause)
    finally:
        store.close()
        catalog.close()


def watch_header(r: Refresh, interval: float) -> str:
    """The first line(s) of a ``paths --watch`` block: the counts and the time; after a failed read also
    the error (retried) and the time of the rows shown under it."""
    now = time.strftime("%H:%M:%S")
    held = sum(1 for row in r.rows if row["state"] == "held")
    head = (f"{len(r.rows)} paths, {held} held, {len(r.rows) - held} not held at {now} "
            f"(every {interval:g}s and on each change; Ctrl-C ends)")
    if r.error is None:
        return head
    when = time.strftime("%H:%M:%S", time.localtime(r.read_at)) if r.read_at else "never"
    return f"{head}\nconsul: unreachable, retrying every {interval:g}s; the table was read at {when} ({r.error})"


def watch_paths(args: argparse.Namespace, cfg: Config, out: TextIO | None = None) -> int:
    """``paths --watch``: ``watch_rows`` drawn with ``Live`` (in place on a terminal, blocks separated by an
    empty line elsewhere) under ``watch_header``. Ctrl-C ends it with exit 0. With ``--json`` every
    refresh is one line: ``{"time", "error", "paths"}``."""
    stream = out or sys.stdout
    live = Live(stream)
    refreshes = watch_rows(cfg, args.interval, args.mine, args.node)
    try:
        for r in refreshes:
            if getattr(args, "json", False):
                stream.write(json.dumps({"time": round(time.time(), 3), "error": r.error, "paths": r.rows},
                                        sort_keys=True) + "\n")
                stream.flush()
            else:
                live.show(watch_header(r, args.interval) + "\n" + paths_table(r.rows))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:             # `pathagent paths --watch | head`: the reader is gone
        try:
            sys.stdout = open(os.devnull, "w")      # (no second error when Python flushes at exit)
        except OSError:
            pass
        return EXIT_OK
    finally:
        refreshes.close()
    return EXIT_OK


# --- status ----------------------------------------------------------------------------------------------

#: ``status.json`` older than this (seconds) while the agent runs means its loop is not cycling: the agent
#: writes it after every cycle, and cycles at least every 2 s while it works
STATUS_STALE = 10.0


def _is_agent(pid: int) -> bool:
    """Whether ``pid`` is a live ``pathagent run`` process (the recorded pid may have been reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and any(b"pathagent" in a or b"agent.cli" in a for a in argv)


def local_state(cfg: Config) -> dict[str, Any]:
    """This node's state from ``[state] dir`` alone (no network): what the running (or last) agent wrote.
    Keys: ``state_dir``, ``readable`` (false with ``error`` when the directory cannot be read),
    ``agent_running``, ``pid``, ``node``, ``session``, ``fenced``, ``lease_left`` (seconds left now, from
    ``lease.json``: negative = ran out; ``None`` when unknown or from another boot),
    ``lease_confirmed_ago`` (``fence_after`` of this config minus that), ``status_age`` (seconds since the
    last cycle's status), ``exported`` (count), ``exported_paths``, ``held``, ``bad_disks``, ``disk_names``,
    ``waiting_fence``, ``fence_error``, ``watchdog_error``, ``last_fence``, ``leader``, ``drained``,
    ``errors`` (the last warnings and errors, oldest first) and ``errors_pid`` (the process they are of)."""
    from agent.runtime.clock import SystemClock, boot_id
    from agent.runtime.statedir import StateDir, lock_holder
    d = cfg.state_dir
    out: dict[str, Any] = {"state_dir": d, "readable": True}
    try:
        os.listdir(d)
    except FileNotFoundError:
        out.update(readable=False, error="no such directory (no agent ever ran with this config)")
    except OSError as e:
        out.update(readable=False, error=e.strerror or str(e))
    sd = StateDir(d)
    st = sd.status()
    errs = sd.errors()
    holder = lock_holder(d)
    recorded = [p for p in (st.get("pid"), errs.get("pid")) if isinstance(p, int) and not isinstance(p, bool)]
    if holder is None:                  # cannot tell from the lock: trust a recorded pid that is alive
        holder = next((p for p in recorded if _is_agent(p)), 0)
    out["agent_running"] = bool(holder)
    out["pid"] = holder or (recorded[0] if recorded else None)
    updated = st.get("updated")
    out["status_age"] = (round(time.time() - updated, 1) if isinstance(updated, (int, float))
                         and not isinstance(updated, bool) else None)
    if st.get("pid") != out["pid"] and out["agent_running"]:
        out["status_age"] = None        # a status of an earlier process: the running one has not cycled yet
        st = {}
    out["node"] = st.get("node") or sd.node() or None
    for k in ("session", "fenced", "held", "exported", "exported_paths", "waiting_fence", "fence_error",
              "watchdog_error", "last_fence", "leader", "drained"):
        out[k] = st.get(k)
    out["bad_disks"] = st.get("bad_disks") if isinstance(st.get("bad_disks"), dict) else {}
    names = st.get("disk_names")
    out["disk_names"] = {k: v for k, v in names.items() if isinstance(v, str)} if isinstance(names, dict) else {}
    lease = sd.lease()
    left = None
    if lease is not None and lease[0] == boot_id():
        left = round(lease[1] - SystemClock().now(), 2)
    out["lease_left"] = left
    out["lease_confirmed_ago"] = None if left is None else round(max(0.0, cfg.consul.fence_after - left), 2)
    out["errors"] = errs.get("errors", [])
    out["errors_pid"] = errs.get("pid")
    return out


def consul_state(cfg: Config, node: str | None) -> dict[str, Any]:
    """Consul's view of this node: ``reachable`` (with ``error`` when not), ``node`` (the local Consul
    agent's name unless ``[node] name`` is set), ``consul_leader``, ``sessions`` (this node's sessions named
    ``[consul] session_name``), the cluster ``leader``, ``drained``, ``paths_held`` (by those sessions),
    ``paths_total``, ``disks_started``, ``live_nodes``, ``backends`` (backend -> the live nodes running
    it, from their node records). Never raises for Consul's sake."""
    from agent.adapters.consul_store import ConsulStore
    try:
        store = ConsulStore(cfg.consul)
        try:
            name = cfg.node_name or store.agent_node_name()
            raft = store.leader()
            sessions = [s for s in store.node_sessions(name) if s.name == cfg.consul.session_name]
            index, entries = store.read_tree()
        finally:
            store.close()
    except CoordinationError as e:
        return {"reachable": False, "error": str(e), "node": cfg.node_name or node}
    tree = parse_tree(cfg.consul.prefix.rstrip("/"), entries, index)
    sids = {s.id for s in sessions}
    return {"reachable": True, "error": None, "node": name, "consul_leader": raft or None,
            "sessions": [{"id": s.id, "checks": list(s.checks), "lock_delay": s.lock_delay} for s in sessions],
            "leader": tree.leader_node(), "drained": name in tree.drained,
            "paths_held": sum(1 for st in tree.paths.values() if st.session in sids),
            "paths_total": len(tree.paths), "disks_started": len(tree.disks), "live_nodes": sorted(tree.nodes),
            "backends": {b: list(ns) for b, ns in tree.backends().items()}}


def degraded_reasons(local: Mapping[str, Any], consul: Mapping[str, Any]) -> list[str]:
    """Why the node is degraded (empty: healthy); the rule of ``STATUS_HELP``."""
    why: list[str] = []
    if not local["readable"]:
        why.append(f"state dir {local['state_dir']}: {local['error']}")
    if not local["agent_running"]:
        why.append("agent not running")
    elif local["status_age"] is None:
        why.append("no status yet (the agent has not completed a cycle)")
    elif local["status_age"] > STATUS_STALE:
        why.append(f"status file {local['status_age']:.0f}s old")
    if local["agent_running"] and local["status_age"] is not None:
        if not local["session"]:
            why.append("no session")
        if local["fenced"]:
            why.append("fenced")
        if local["watchdog_error"]:
            why.append("watchdog not pet")
        if local["waiting_fence"]:
            why.append("waiting to be fenced")
    if local["agent_running"] and (local["lease_left"] is None or local["lease_left"] <= 0):
        why.append("no lease" if local["lease_left"] is None else f"lease ran out {-local['lease_left']:.1f}s ago")
    if not consul["reachable"]:
        why.append("consul unreachable")
    else:
        ids = [s["id"] for s in consul["sessions"]]
        if len(ids) != 1:
            why.append(f"{len(ids)} sessions of this node in Consul" if ids else "no session in Consul")
        elif local["agent_running"] and local["session"] and local["session"] not in ids:
            why.append("the agent's session is not in Consul")
    return why


def _ago(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def status_text(data: Mapping[str, Any]) -> str:
    """The text of ``pathagent status``."""
    from agent.runtime.report import label
    c = data["consul"]
    names = data["disk_names"]
    node = data["node"] or "(unknown)"
    head = "healthy" if not data["degraded"] else "degraded: " + "; ".join(data["degraded"])
    lines = [f"node:      {node} ({head})"]
    if data["agent_running"]:
        age = data["status_age"]
        agent = f"running, pid {data['pid']}" + (f"; status {age:.1f}s old" if age is not None else "; no status yet")
    else:
        agent = "not running" + (f" (last pid {data['pid']}" + (f", status {data['status_age']:.0f}s old"
                                 if data["status_age"] is not None else "") + ")" if data["pid"] else "")
    if not data["readable"]:
        agent += f"; state dir {data['state_dir']}: {data['error']}"
    lines.append(f"agent:     {agent}")
    ids = [s["id"] for s in data.get("sessions") or []]
    old = "" if data["agent_running"] else " (as last recorded)"
    sess = (data["session"] or "none") + (old if data["session"] else "")
    if c["reachable"]:
        sess += (" (Consul: the same)" if data["session"] and ids == [data["session"]] else
                 f" (Consul: {', '.join(ids) or 'none'})")
    lines.append(f"session:   {sess}")
    left = data["lease_left"]
    lines.append("lease:     " + ("unknown" if left is None else
                                  f"{left:.1f}s left (confirmed {data['lease_confirmed_ago']:.1f}s ago)" if left > 0
                                  else f"ran out {-left:.1f}s ago"))
    fenced = data["fenced"]
    lines.append("fenced:    " + ("unknown" if fenced is None else ("yes" if fenced else "no") + old)
                 + (f" (last fence: {data['last_fence']})" if data.get("last_fence") else ""))
    exp = data["exported_paths"]
    if isinstance(exp, list):
        shown = " ".join(label(p, names) for p in exp[:8]) + (f" ... and {len(exp) - 8} more" if len(exp) > 8 else "")
        lines.append(f"exported:  {len(exp)} paths{old}" + (f": {shown}" if exp else ""))
    elif data["exported"] is not None:
        lines.append(f"exported:  {data['exported']} paths{old}")
    if c["reachable"]:
        leader = data["leader"]
        lines += [f"leader:    {leader or 'none'}{' (this node)' if data['is_leader'] else ''}"
                  + (" - this node is drained" if data["drained"] else ""),
                  f"consul:    leader {data['consul_leader'] or 'none'}",
                  f"paths:     {data['paths_held']} held here of {data['paths_total']} ({data['disks_started']} "
                  f"disks started, {len(data['live_nodes'])} live nodes)"]
    else:
        lines.append(f"consul:    unreachable ({c['error']})")
    lines.append(f"backend:   {data['backend']}")
    mixed = data.get("backends") or {}
    if len(mixed) > 1:
        lines.append("backends:  the live gateways run different target backends ("
                     + "; ".join(f"{b} on {', '.join(ns)}" for b, ns in mixed.items())
                     + "): an initiator sees their paths of a disk on different LUNs; run one backend everywhere")
    lines += [f"bad disk:  {label(d, names)}: {m}" for d, m in sorted(data["bad_disks"].items())]
    if data["waiting_fence"]:
        lines.append("fencing:   waiting for the leader to fence this node's previous session (it takes no path before)")
    if data["fence_error"]:
        lines.append(f"fencing:   {data['fence_error']}")
    if data["watchdog_error"]:
        lines.append(f"watchdog:  {data['watchdog_error']}")
    errors = data["errors"]
    if errors:
        whose = "this agent" if data["errors_pid"] == data["pid"] and data["agent_running"] else \
            f"agent process {data['errors_pid']}"
        lines.append(f"errors:    the last {min(len(errors), 5)} warnings and errors of {whose}:")
        for e in errors[-5:]:
            times = f" (x{e['count']} since {_ago(e['first'])[11:]})" if e.get("count", 1) > 1 else ""
            lines.append(f"  {_ago(e['time'])} {e.get('level', '?')} {e['message']}{times}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """``pathagent status``: ``local_state`` (whatever Consul does) and ``consul_state`` merged; ``--json``
    prints the keys of both (``node``, ``consul_leader``, ``sessions``, ``leader``, ``is_leader``,
    ``drained``, ``paths_held``, ``paths_total``, ``disks_started``, ``live_nodes``, ``backends``: ``None``
    while Consul does not answer, except ``leader``/``is_leader``/``drained`` then as the agent last recorded
    them), ``consul: {reachable, error}``, ``backend``, ``health`` (``healthy``/``degraded``) and
    ``degraded`` (the reasons). Exit 1 when degraded (``degraded_reasons``); live gateways on different
    target backends are a warning line, not degraded (a migration passes through it)."""
    local = local_state(cfg)
    consul = consul_state(cfg, local["node"])
    degraded = degraded_reasons(local, consul)
    node = consul.get("node") or local["node"]
    if consul["reachable"]:
        leader, drained = consul["leader"], consul["drained"]
    else:                       # as this node's agent last saw it
        leader, drained = (node if local["leader"] else None), local["drained"]
    data: dict[str, Any] = {
        **local, "node": node,
        "consul": {"reachable": consul["reachable"], "error": consul["error"]},
        "consul_leader": consul.get("consul_leader"), "sessions": consul.get("sessions"),
        "leader": leader, "is_leader": bool(leader) and leader == node,
        "drained": drained, "paths_held": consul.get("paths_held"),
        "paths_total": consul.get("paths_total"), "disks_started": consul.get("disks_started"),
        "live_nodes": consul.get("live_nodes"), "backend": cfg.target.backend, "backends": consul.get("backends"),
        "health": "degraded" if degraded else "healthy", "degraded": degraded,
    }
    emit(args, data, status_text(data))
    return EXIT_FAILED if degraded else EXIT_OK


def cmd_nodes(args: argparse.Namespace, cfg: Config) -> int:
    from agent.cli import nodes
    table = nodes.list_nodes(cfg)
    emit(args, table, nodes.text(table))
    return EXIT_OK


def cmd_node_drain(args: argparse.Namespace, cfg: Config) -> int:
    from agent.cli import nodes
    on = bool(args.drain_on)
    row = nodes.drain(cfg, args.node, on, wait=getattr(args, "wait", False), timeout=getattr(args, "timeout", 300.0))
    state = "drained" if on else "undrained"
    how = "" if row["changed"] else " (it already was)"
    emit(args, row, f"{args.node} {state}{how}; it holds {row['paths']} paths")
    return EXIT_OK


def cmd_path_move(args: argparse.Namespace, cfg: Config) -> int:
    from agent.cli import moves
    try:
        disk, _, idx = args.path.rpartition("/")
        path = PathKey(disk, int(idx))
    except ValueError:
        return fail(f"{args.path!r} is not DISK_ID/INDEX", EXIT_USAGE)
    result = moves.move(cfg, path, args.node, args.timeout)
    emit(args, result, f"{path} moved to {args.node}")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace, cfg: Config | None) -> int:
    """``pathagent plugins``: every entry point of every ``pathagent.*`` namespace, with the distribution
    that registers it. Needs no config."""
    from importlib import metadata
    from agent.plugins import NAMESPACES
    rows: list[dict[str, Any]] = []
    for kind, (namespace, _) in NAMESPACES.items():
        for ep in sorted(metadata.entry_points(group=namespace), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            rows.append({"kind": kind, "namespace": namespace, "name": ep.name, "object": ep.value,
                         "distribution": f"{dist.metadata['Name']} {dist.version}" if dist is not None else None})
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [f"{'KIND':<9} {'NAME':<{width}} {'FROM':<32} OBJECT"]
    lines += [f"{r['kind']:<9} {r['name']:<{width}} {r['distribution'] or '-':<32} {r['object']}" for r in rows]
    emit(args, rows, "\n".join(lines))
    return EXIT_OK


def _config_failed(path: str, e: ConfigError) -> int:
    for k, m in e.problems:
        print(f"pathagent: {config_mod.problem_line(path, k, m)}", file=sys.stderr)
    return EXIT_USAGE


#: seconds a changing CLI command allows each Consul call (at least): Consul 1.8's consistent reads and
#: transactions stall for up to ~4 s while the servers elect a leader (docs/fencing.md)
CLI_CONSUL_TIMEOUT = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the config and run the command; returns the exit code. A config that cannot
    be read, decoded or parsed gets one line per problem on stderr (the file, the key) and exit 2, for
    every command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    if getattr(args, "raw_config", False):
        return cmd_check_config(args, None)
    if getattr(args, "no_config", False):      # consul-config, plugins: they need no pathagent config
        bare: Callable[[argparse.Namespace, Config | None], int] = args.func
        return bare(args, None)
    path, _ = config_mod.config_path(args.config)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        return _config_failed(path, e)
    if getattr(args, "audit", False):
        # a changing command waits for Consul as long as an election can stall it (the agent's short
        # [consul] timeout bounds its lease confirmations; an admin's command is not on that path)
        cfg = replace(cfg, consul=replace(cfg.consul, timeout=max(cfg.consul.timeout, CLI_CONSUL_TIMEOUT)))
    try:
        rc = handler(args, cfg)
    except ConfigError as e:
        rc = _config_failed(path, e)
    except AgentError as e:
        rc = fail(str(e))
    except KeyboardInterrupt:
        rc = EXIT_FAILED
    if getattr(args, "audit", False):
        from agent.cli import audit
        audit.send(cfg.log_audit, sys.argv[1:] if argv is None else list(argv), rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
