"""``pathagent disk …``: argparse wiring and output of the disk lifecycle (``agent.cli.disks``).

``register(subparsers)`` adds the ``disk`` command. Every leaf has a *check* and an *operation*: the check
(``agent.cli.diskargs``) parses and validates every argument without any network call and exits 2 naming
the option; only then are Consul and Ceph contacted and the operation run. Exit codes: 0 success (also
when there was nothing to do: the commands are idempotent), 1 operation failed (refused, not found,
conflict with another disk, Ceph or Consul error, invalid stored definition), 2 usage error. Every leaf
takes ``--json``. ``disk create`` and ``disk import`` print the disk id alone on their last stdout line.

Every command that takes a disk accepts its id or its name (``DISK``).

CHAP passwords are read from files (``--chap-password-file``), never from the command line, and never
printed: output goes through ``schema.public_dict`` and error messages never echo a secret.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

from agent.cli import diskargs as da
from agent.cli.diskargs import UsageError, human_size
from agent.cli.output import EXIT_OK, EXIT_USAGE, emit, fail
from agent.config import Config
from agent.core import schema
from agent.core.model import Chap, Disk
from agent.errors import AgentError, DefinitionError

if TYPE_CHECKING:  # imported when a disk command runs: the other commands need neither Consul nor rados
    from agent.cli.disks import AccessChange, DiskInfo, Disks, NewDisk

parse_size = da.parse_size     # kept for callers of the old name


# --- output ------------------------------------------------------------------------------------------------

def _error_dict(e: DefinitionError) -> dict[str, str]:
    return {"field": e.field, "reason": e.reason, "message": str(e)}


def info_dict(info: DiskInfo) -> dict[str, Any]:
    """What ``list``/``show`` print for one disk (no secrets)."""
    if info.disk is not None:
        return {**schema.public_dict(info.disk), "started": info.started, "valid": True}
    assert info.error is not None
    return {"id": info.id, "name": info.name or None, "pool": info.pool, "image": info.image,
            "started": info.started, "valid": False, "error": _error_dict(info.error)}


def describe(disk: Disk, started: bool) -> str:
    def chap(c: Chap | None) -> str:
        return "none" if c is None else f"user {c.user}, password ***"
    access = ("open (any initiator)" if disk.initiators is None
              else ", ".join(disk.initiators) if disk.initiators else "none admitted (set --initiator or --open)")
    lines = [f"id:          {disk.id}", f"name:        {disk.name}", f"state:       {'started' if started else 'stopped'}",
             f"image:       {disk.pool}/{disk.image}", f"size:        {human_size(disk.size)}",
             f"iqn:         {disk.iqn}", f"serial:      {disk.serial}", f"initiators:  {access}",
             f"chap:        {chap(disk.chap)}", f"mutual chap: {chap(disk.mutual_chap)}", "paths:"]
    for p in disk.paths:
        extra = "".join(f" {k} {v}" for k, v in (("vlan", p.vlan), ("role", p.role)) if v is not None)
        lines.append(f"  {p.index}: {p.ip}/{p.prefix}{extra}")
    return "\n".join(lines)


def _progress(msg: str) -> None:
    print(f"pathagent: {msg}", file=sys.stderr)


# --- the checks (no network) -----------------------------------------------------------------------------

def _access(args: argparse.Namespace) -> da.AccessArgs:
    return da.check_access(args.initiator, args.open, args.chap_user, args.chap_password_file,
                           args.mutual_chap_user, args.mutual_chap_password_file)


def _new(args: argparse.Namespace, imported: bool) -> NewDisk:
    from agent.cli.disks import NewDisk
    name = da.check_name(args.name)
    size = 0 if imported else da.parse_size(args.size)
    paths = da.check_paths(args.path)
    pool = da.check_pool(args.pool) if getattr(args, "pool", None) else None
    image = da.check_image_spec(args.image) if imported else None
    iqn = da.check_iqn(args.iqn, "--iqn") if args.iqn else None
    serial = da.check_serial(args.serial) if imported and args.serial else None
    return NewDisk(name=name, paths=paths, access=_access(args), size=size, pool=pool, image=image, iqn=iqn,
                   serial=serial)


def _ref(args: argparse.Namespace) -> str:
    if getattr(args, "pool", None):
        da.check_pool(args.pool)
    return da.check_ref(args.id)


UpdateArgs = tuple[str, "str | None", "AccessChange", "tuple[da.PathArg, ...] | None"]


def _update_check(args: argparse.Namespace) -> UpdateArgs:
    from agent.cli.disks import AccessChange
    ref = _ref(args)
    name = da.check_name(args.name, "--name") if args.name is not None else None
    given, given_mutual = da.check_chap(args.chap_user, args.chap_password_file, "chap"), \
        da.check_chap(args.mutual_chap_user, args.mutual_chap_password_file, "mutual-chap")
    if args.no_chap and (given or given_mutual):
        raise UsageError("--no-chap removes CHAP: it takes no --chap-user or --mutual-chap-user")
    if args.no_mutual_chap and given_mutual:
        raise UsageError("--no-mutual-chap and --mutual-chap-user exclude each other")
    inits = da.check_initiators(args.initiator) if args.initiator is not None else None
    add = da.check_initiators(args.add_initiator or (), "--add-initiator")
    remove = da.check_initiators(args.remove_initiator or (), "--remove-initiator")
    if args.open is True and (inits or add):
        raise UsageError("--open admits any initiator: it takes no --initiator or --add-initiator")
    if set(add) & set(remove):
        raise UsageError(f"--add-initiator and --remove-initiator both name {sorted(set(add) & set(remove))[0]}")
    chap: Chap | None | bool = None if args.no_chap else (given or True)
    mutual: Chap | None | bool = None if args.no_chap or args.no_mutual_chap else (given_mutual or True)
    change = AccessChange(initiators=inits, add=add, remove=remove, open_=args.open, admit_none=args.admit_none,
                          chap=chap, mutual_chap=mutual)
    paths = da.check_paths(args.path) if args.path else None
    if name is None and paths is None and change == AccessChange(admit_none=args.admit_none):
        raise UsageError("nothing to change: give --name, --path, --initiator, --add-initiator, "
                         "--remove-initiator, --open, --closed, --chap-user … or --no-chap")
    return ref, name, change, paths


# --- handlers ------------------------------------------------------------------------------------------------

Check = Callable[[argparse.Namespace], Any]
Op = Callable[[argparse.Namespace, Any, "Disks"], int]


def _run(check: Check, op: Op) -> Callable[[argparse.Namespace, Config], int]:
    """``check`` the arguments (exit 2, nothing contacted), then connect and run ``op``."""
    def handler(args: argparse.Namespace, cfg: Config) -> int:
        try:
            checked = check(args)
        except UsageError as e:
            return fail(str(e), EXIT_USAGE)
        from agent.adapters.ceph import CephClient
        from agent.adapters.consul_store import ConsulStore
        from agent.cli.disks import Disks
        try:
            store = ConsulStore(cfg.consul)
            ceph = CephClient(cfg.ceph.conf, cfg.ceph.client_id, cfg.ceph.timeout)
        except AgentError as e:
            return fail(str(e))
        try:
            return op(args, checked, Disks(cfg, store, ceph))
        except UsageError as e:
            return fail(str(e), EXIT_USAGE)
        except AgentError as e:
            return fail(str(e))
        finally:
            ceph.close()
            store.close()
    handler.__name__ = f"cmd_disk_{op.__name__.lstrip('_')}"
    return handler


def _created(args: argparse.Namespace, disk: Disk, existed: bool, verb: str) -> int:
    from agent.cli.disks import access_text
    if existed:
        text = f"disk {disk.name} exists already with this definition ({disk.id}); nothing changed"
    elif verb == "imported":
        text = (f"imported {disk.pool}/{disk.image} as disk {disk.name}: {human_size(disk.size)}, "
                f"{len(disk.paths)} path(s), serial {disk.serial}; its data is untouched")
    else:
        text = (f"created disk {disk.name}: {disk.pool}/{disk.image}, {human_size(disk.size)}, "
                f"{len(disk.paths)} path(s)")
    emit(args, {**schema.public_dict(disk), "started": False, "existed": existed},
         f"{text}\n{access_text(disk)}\n{disk.id}")
    return EXIT_OK


def _create(args: argparse.Namespace, req: NewDisk, disks: Disks) -> int:
    disk, existed = disks.create(req)
    return _created(args, disk, existed, "created")


def _import(args: argparse.Namespace, req: NewDisk, disks: Disks) -> int:
    disk, existed = disks.import_(req)
    return _created(args, disk, existed, "imported")


def _list_check(args: argparse.Namespace) -> list[str]:
    return [da.check_pool(p) for p in args.pool or ()]


def _list(args: argparse.Namespace, pools: list[str], disks: Disks) -> int:
    infos = disks.list(pools)
    rows = [f"{'ID':<10} {'NAME':<20} {'STATE':<8} {'SIZE':>9} {'PATHS':>5}  IMAGE"]
    for i in infos:
        if i.disk is not None:
            rows.append(f"{i.id:<10} {i.disk.name:<20} {'started' if i.started else 'stopped':<8} "
                        f"{human_size(i.disk.size):>9} {len(i.disk.paths):>5}  {i.pool}/{i.image}")
        else:
            assert i.error is not None
            rows.append(f"{i.id:<10} {i.name or '-':<20} {'started' if i.started else 'stopped':<8} {'-':>9} "
                        f"{'-':>5}  {i.pool}/{i.image}  INVALID: {i.error.reason if i.name else i.error.message}")
    emit(args, [info_dict(i) for i in infos], "\n".join(rows))
    return EXIT_OK


def _show(args: argparse.Namespace, ref: str, disks: Disks) -> int:
    info = disks.show(ref, args.pool)
    if info.disk is None:
        assert info.error is not None
        if getattr(args, "json", False):
            emit(args, info_dict(info), "")
        return fail(info.error.reason if info.name else str(info.error))
    emit(args, info_dict(info), describe(info.disk, info.started))
    return EXIT_OK


def _start(args: argparse.Namespace, ref: str, disks: Disks) -> int:
    disk = disks.start(ref, args.pool)
    emit(args, {"id": disk.id, "name": disk.name, "started": True, "paths": [p.index for p in disk.paths]},
         f"disk {disk.id} ({disk.name}) started: {len(disk.paths)} path(s)")
    return EXIT_OK


def _stop_check(args: argparse.Namespace) -> str:
    da.check_positive(args.timeout, "--timeout")
    return _ref(args)


def _stop(args: argparse.Namespace, ref: str, disks: Disks) -> int:
    disk_id, was = disks.stop(ref, timeout=args.timeout, force=args.force, progress=_progress)
    emit(args, {"id": disk_id, "started": False, "was_started": was},
         f"disk {disk_id} stopped" if was else f"disk {disk_id} was not started; nothing to do")
    return EXIT_OK


def _delete_check(args: argparse.Namespace) -> str:
    if args.wait < 0:
        raise UsageError(f"--wait {args.wait:g}: must not be negative")
    da.check_positive(args.timeout, "--timeout")
    return _ref(args)


def _delete(args: argparse.Namespace, ref: str, disks: Disks) -> int:
    loc, what = disks.delete(ref, args.pool, wait=args.wait, force=args.force, timeout=args.timeout,
                             progress=_progress)
    emit(args, {"id": loc.id, "deleted": True, "pool": loc.pool, "image": loc.image,
                "image_removed": not loc.imported},
         f"disk {loc.id} deleted ({what})")
    return EXIT_OK


def _update(args: argparse.Namespace, checked: UpdateArgs, disks: Disks) -> int:
    from agent.cli.disks import access_text
    ref, name, change, paths = checked
    disk, notes = disks.update(ref, args.pool, name=name, access=change, paths=paths)
    started = disks.record(disk.id) is not None
    lines = [f"disk {disk.id} ({disk.name}) " + ("unchanged" if "nothing changed" in notes else "updated")
             + (" (its owners apply it now)" if started and "nothing changed" not in notes else "")]
    lines += [f"  note: {n}" for n in notes if n != "nothing changed"]
    lines.append(access_text(disk))
    emit(args, {**schema.public_dict(disk), "started": started, "notes": notes}, "\n".join(lines))
    return EXIT_OK


def _resize_check(args: argparse.Namespace) -> tuple[str, int]:
    return _ref(args), da.parse_size(args.size, "SIZE")


def _resize(args: argparse.Namespace, checked: tuple[str, int], disks: Disks) -> int:
    ref, size = checked
    disk, old = disks.resize(ref, size, args.pool)
    started = disks.record(disk.id) is not None
    if old == disk.size:
        text = f"disk {disk.id} ({disk.name}) is {human_size(disk.size)} already; nothing changed"
    else:
        text = (f"disk {disk.id} ({disk.name}) grown from {human_size(old)} to {human_size(disk.size)}"
                + ("; its owners make the LUN report the new size now (initiators rescan to see it)"
                   if started else ""))
    emit(args, {"id": disk.id, "name": disk.name, "size": disk.size, "old_size": old, "started": started}, text)
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------------------

#: the disk commands that change something: each leaves a line in the audit trail (agent.cli.audit)
AUDITED = frozenset({"create", "import", "start", "stop", "delete", "update", "resize"})


def _leaf(sub: Any, name: str, check: Check, op: Op, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.set_defaults(audit=name in AUDITED)
    try:
        p.add_argument("--json", action="store_true", dest="json", default=False, help="machine-readable output")
    except argparse.ArgumentError:
        pass  # the host parser already gives every subcommand --json
    p.set_defaults(func=_run(check, op))
    return p


def _disk_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", metavar="DISK", help="the disk's id or name")


def _pool_opt(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--pool", metavar="P", default=None,
                   help=f"pool to {what} (default: the started disk's pool, else [ceph] pool)")


def _chap_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chap-user", metavar="U", help="CHAP user the initiators log in with")
    p.add_argument("--chap-password-file", metavar="F", help="file whose first line is the CHAP password "
                                                             "(12-255 printable characters, no spaces)")
    p.add_argument("--mutual-chap-user", metavar="U", help="mutual CHAP: user the target answers with")
    p.add_argument("--mutual-chap-password-file", metavar="F", help="file whose first line is the mutual "
                                                                    "CHAP password")


def _new_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="display name, unique (1-64 of A-Z a-z 0-9 . _ -)")
    p.add_argument("--path", action="append", required=True, metavar="IP/PREFIX[,vlan=N][,role=NAME]",
                   help="a floating path address, unique across disks, optionally on VLAN N and the interface of "
                        "role NAME ([network.iproute] roles); repeat for each path (index = order given)")
    p.add_argument("--iqn", help="target IQN, unique (default iqn.2016-05.io.pathagent:<id>)")
    p.add_argument("--initiator", action="append", metavar="IQN",
                   help="an initiator IQN to admit; repeat for more (default: none admitted)")
    p.add_argument("--open", action="store_true", help="admit any initiator")
    _chap_opts(p)


def register(subparsers: Any) -> None:
    """Add ``disk`` with its subcommands to the top-level ``subparsers``."""
    d = subparsers.add_parser("disk", help="disk lifecycle: create, import, list, show, start, stop, update, "
                                           "resize, delete")
    sub = d.add_subparsers(dest="disk_command", metavar="SUBCOMMAND", required=True)

    p = _leaf(sub, "create", lambda a: _new(a, False), _create,
              "create the RBD image and its definition; prints the new disk id (idempotent: the same "
              "command again finishes an interrupted create or says the disk exists)")
    _new_opts(p)
    p.add_argument("--size", required=True, help="bytes, or a number with K, M, G or T (powers of 1024)")
    p.add_argument("--pool", metavar="P", default=None, help="pool of the image (default: [ceph] pool)")

    p = _leaf(sub, "import", lambda a: _new(a, True), _import,
              "make an existing RBD image a disk without touching its data; prints the new disk id")
    _new_opts(p)
    p.add_argument("--image", required=True, metavar="POOL/IMAGE", help="the image to serve")
    p.add_argument("--serial", metavar="UUID", help="the LUN's unit serial the initiators know (keep the one "
                                                    "the image was served with before; default: a new one)")

    p = _leaf(sub, "list", _list_check, _list, "every disk with its state")
    p.add_argument("--pool", action="append", metavar="P",
                   help="pool to scan (repeatable; default: [ceph] pool and the pools of known disks)")

    p = _leaf(sub, "show", _ref, _show, "one disk's definition (exits 1 if it is invalid or unfinished)")
    _disk_arg(p)
    _pool_opt(p, "look in")

    p = _leaf(sub, "start", _ref, _start, "claim the disk's name, IQN and IPs and create its Consul keys: "
                                         "nodes start serving its paths")
    _disk_arg(p)
    _pool_opt(p, "look in")

    p = _leaf(sub, "stop", _stop_check, _stop, "owners stop serving the disk and release its paths; then its "
                                               "Consul keys are removed (refused while initiators are "
                                               "logged in, unless --force)")
    _disk_arg(p)
    p.add_argument("--force", action="store_true", help="stop even while initiators are logged in (their "
                                                        "I/O fails)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the owners to let go (default 60); running the command again "
                        "finishes a stop that timed out")

    p = _leaf(sub, "delete", _delete_check, _delete,
              "remove a stopped disk: its image and data (an imported image keeps its data: only the "
              "definition goes), then its claims")
    _disk_arg(p)
    _pool_opt(p, "look in")
    p.add_argument("--force", action="store_true", help="stop a started disk first, cutting off its initiators")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to retry while a gateway still has the image open (default 10)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --force: how long to wait for the owners to let go (default 60)")

    p = _leaf(sub, "update", _update_check, _update,
              "change a disk's name, initiators or CHAP (a started disk's owners apply it without a stop), or "
              "its paths (a stopped disk); prints the resulting access")
    _disk_arg(p)
    _pool_opt(p, "look in")
    p.add_argument("--name", help="new display name (unique)")
    p.add_argument("--path", action="append", metavar="IP/PREFIX[,vlan=N][,role=NAME]",
                   help="replace the paths (repeat for each; index = order given; the disk must be stopped): the "
                        "new addresses are claimed, the old ones released")
    p.add_argument("--initiator", action="append", metavar="IQN", help="replace the initiator list (repeatable)")
    p.add_argument("--add-initiator", action="append", metavar="IQN", help="admit one more initiator")
    p.add_argument("--remove-initiator", action="append", metavar="IQN",
                   help="stop admitting an initiator and end its sessions")
    acc = p.add_mutually_exclusive_group()
    acc.add_argument("--open", dest="open", action="store_const", const=True, default=None,
                     help="admit any initiator (drops the initiator list)")
    acc.add_argument("--closed", dest="open", action="store_const", const=False,
                     help="admit only the listed initiators (needed to give an open disk a list)")
    p.add_argument("--admit-none", action="store_true",
                   help="confirm a change that leaves no initiator admitted (locks every initiator out)")
    _chap_opts(p)
    p.add_argument("--no-chap", action="store_true", help="remove CHAP (and mutual CHAP)")
    p.add_argument("--no-mutual-chap", action="store_true", help="remove mutual CHAP")

    p = _leaf(sub, "resize", _resize_check, _resize,
              "grow the disk; its owners make the LUN report the new size while serving (shrinking is refused)")
    _disk_arg(p)
    p.add_argument("size", metavar="SIZE", help="the new size: bytes, or a number with K, M, G or T")
    _pool_opt(p, "look in")
