"""The ``pathagent`` command line.

``--config FILE`` and ``--json`` are accepted before or after the subcommand. Exit codes: 0 success,
1 operation failed, 2 usage or configuration error (every command: a config file that cannot be read, is
not UTF-8 or not TOML is one line naming the file, and the line and column where that applies; a bad
setting names the file and ``[table] key``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence

from agent import config as config_mod
from agent import plugins
from agent.backend import Catalog
from agent.config import Config
from agent.errors import AgentError, CatalogError, ConfigError
from agent.core.model import PathKey
from agent.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, emit, fail
from agent.core.tree import parse_tree

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


EPILOG = """exit codes: 0 success, 1 operation failed, 2 usage or configuration error (a config file that is not
UTF-8 or not TOML, or a bad setting, names the file and the key)"""

RUN_HELP = """The node service, in the foreground (systemd runs it). SIGTERM / SIGINT: orderly stop (every
address down, unexport, release every lock, destroy the session, disarm the watchdog: another gateway
takes over at once). SIGUSR2: detach for a planned restart (session, locks, exports and the armed
watchdog stay; the next agent process adopts them). Refuses to start (exit 2) on any config problem
that check-config reports."""


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
                       "(held, free, stopping, invalid)")
    p.add_argument("--mine", action="store_true", help="only this node's paths")
    p.add_argument("--node", metavar="N", help="only paths owned by node N")
    p.set_defaults(func=cmd_paths)

    what = "this node: session, lease, leader, counts, backend"
    p = sub.add_parser("status", help=what, description=what)
    p.set_defaults(func=cmd_status)

    what = "list every problem in the config"
    p = sub.add_parser("check-config", help=what, description=what + ", with its key, as run would refuse "
                       "it: the core tables, the fencing inequality and every configured plugin's own "
                       "options (exit 2 if any problem)")
    p.set_defaults(func=cmd_check_config, raw_config=True)

    from agent.cli import disk as cli_disk
    cli_disk.register(sub)

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
        d.set_defaults(func=cmd_node_drain, drain_on=on)

    p = sub.add_parser("path", help="path operations", description="path operations")
    psub = p.add_subparsers(dest="path_command", metavar="SUBCOMMAND", required=True)
    what = "move one path to a node, without lock-delay"
    m = psub.add_parser("move", help=what, description=what)
    m.add_argument("path", metavar="DISK_ID/INDEX")
    m.add_argument("node", metavar="NODE")
    m.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the move (default 30)")
    m.set_defaults(func=cmd_path_move)
    return parser


# --- commands ------------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from agent import logsetup as log
    from agent.runtime import service
    log.setup(cfg.log_level, cfg.log_format)
    return service.run(cfg)


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


def path_rows(cfg: Config) -> list[dict[str, Any]]:
    """Every path key with its owner, IP and state (``held``, ``free``, ``stopping``, ``invalid``): the
    keys ``disk``, ``index``, ``ip``, ``node``, ``state`` (a fixed contract), ``name`` (the disk's display
    name; ``None`` when its definition cannot be read) and ``error`` for an invalid disk."""
    from agent.adapters.consul_store import ConsulStore
    store = ConsulStore(cfg.consul)
    try:
        _, entries = store.read_tree()
        sessions = {s.id: s.node for s in store.sessions()}
    finally:
        store.close()
    tree = parse_tree(cfg.consul.prefix.rstrip("/"), entries)
    catalog = _catalog(cfg)
    defs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        for disk_id, rec in tree.disks.items():
            try:
                defs[disk_id] = catalog.get(disk_id, rec.pool, rec.image, rec.modify_index)
            except CatalogError as e:
                errors[disk_id] = e.message
    finally:
        catalog.close()
    rows = []
    for p in sorted(tree.paths):
        st = tree.paths[p]
        disk = defs.get(p.disk)
        spec = disk.path(p.index) if disk else None
        node = (st.node or sessions.get(st.session or "")) if st.session else None
        stopping = p.disk in tree.disks and tree.disks[p.disk].stopping
        state = ("invalid" if p.disk in errors else "stopping" if stopping
                 else "held" if st.session else "free")
        row: dict[str, Any] = {"disk": p.disk, "index": p.index, "ip": spec.ip if spec else None,
                               "node": node, "state": state, "name": disk.name if disk else None}
        if p.disk in errors:
            row["error"] = errors[p.disk]
        rows.append(row)
    return rows


def cmd_paths(args: argparse.Namespace, cfg: Config) -> int:
    rows = path_rows(cfg)
    if args.mine:
        from agent.adapters.consul_store import ConsulStore
        store = ConsulStore(cfg.consul)
        try:
            me = cfg.node_name or store.agent_node_name()
        finally:
            store.close()
        rows = [r for r in rows if r["node"] == me]
    if args.node:
        rows = [r for r in rows if r["node"] == args.node]
    w = max([16] + [len(r["name"] or "-") for r in rows])
    lines = [f"{'PATH':<24} {'NAME':<{w}} {'IP':<16} {'NODE':<16} STATE"]
    for r in rows:
        lines.append(f"{r['disk'] + '/' + str(r['index']):<24} {r['name'] or '-':<{w}} {r['ip'] or '-':<16} "
                     f"{r['node'] or '-':<16} {r['state']}" + (f" ({r['error']})" if "error" in r else ""))
    emit(args, rows, "\n".join(lines))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from agent.adapters.consul_store import ConsulStore
    from agent.runtime.report import label
    from agent.runtime.statedir import read_status
    store = ConsulStore(cfg.consul)
    try:
        node = cfg.node_name or store.agent_node_name()
        leader = store.leader()
        sessions = [s for s in store.node_sessions(node) if s.name == cfg.consul.session_name]
        _, entries = store.read_tree()
    finally:
        store.close()
    tree = parse_tree(cfg.consul.prefix.rstrip("/"), entries)
    cluster_leader = tree.leader_node()
    sids = {s.id for s in sessions}
    held = sum(1 for st in tree.paths.values() if st.session in sids)
    local = read_status(cfg.state_dir)
    running = bool(local.get("pid")) and os.path.exists(f"/proc/{local.get('pid')}")
    names: dict[str, Any] = local.get("disk_names") or {}       # of the bad disks, where the agent knows it
    if not isinstance(names, dict):
        names = {}
    data = {
        "node": node, "consul_leader": leader or None, "leader": cluster_leader,
        "is_leader": cluster_leader == node, "drained": node in tree.drained,
        "sessions": [{"id": s.id, "checks": list(s.checks), "lock_delay": s.lock_delay} for s in sessions],
        "agent_running": running, "fenced": local.get("fenced") if running else None,
        "lease_left": local.get("lease_left") if running else None,
        "status_age": round(time.time() - local["updated"], 1) if running and "updated" in local else None,
        "paths_held": held, "paths_total": len(tree.paths), "disks_started": len(tree.disks),
        "live_nodes": sorted(tree.nodes), "backend": cfg.target.backend,
        "exported": local.get("exported") if running else None,
        "bad_disks": local.get("bad_disks", {}) if running else {},
        "disk_names": {d: n for d, n in names.items() if isinstance(n, str)} if running else {},
        "waiting_fence": bool(local.get("waiting_fence")) if running else None,
        "fence_error": (local.get("fence_error") or None) if running else None,
    }
    health = "healthy" if len(sessions) == 1 and running and not data["fenced"] else "degraded"
    data["health"] = health
    text = "\n".join([
        f"node:      {node} ({health})",
        f"session:   {', '.join(s.id for s in sessions) or 'none'}",
        f"agent:     {'running, pid ' + str(local.get('pid')) if running else 'not running'}"
        + (f", fenced" if data["fenced"] else "") + (f", lease valid for {data['lease_left']}s more"
                                                    if data["lease_left"] is not None else ""),
        f"leader:    {cluster_leader or 'none'}{' (this node)' if cluster_leader == node else ''}"
        + (" - this node is drained" if node in tree.drained else ""),
        f"consul:    leader {leader or 'none'}",
        f"paths:     {held} held here of {len(tree.paths)} ({len(tree.disks)} disks started, "
        f"{len(tree.nodes)} live nodes)",
        f"backend:   {cfg.target.backend}",
    ] + [f"bad disk:  {label(d, data['disk_names'])}: {m}" for d, m in sorted(data["bad_disks"].items())]
      + (["fencing:   waiting for the leader to fence this node's previous session (it takes no path before)"]
         if data["waiting_fence"] else [])
      + ([f"fencing:   {data['fence_error']}"] if data["fence_error"] else []))
    emit(args, data, text)
    return EXIT_OK


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


def _config_failed(path: str, e: ConfigError) -> int:
    for k, m in e.problems:
        print(f"pathagent: {config_mod.problem_line(path, k, m)}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the config and run the command; returns the exit code. A config that cannot
    be read, decoded or parsed gets one line per problem on stderr (the file, the key) and exit 2, for
    every command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    if getattr(args, "raw_config", False):
        return cmd_check_config(args, None)
    path, _ = config_mod.config_path(args.config)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        return _config_failed(path, e)
    try:
        return handler(args, cfg)
    except ConfigError as e:
        return _config_failed(path, e)
    except AgentError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
