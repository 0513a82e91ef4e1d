"""``pathagent disk …``: argparse wiring and output of the disk lifecycle (``agent.cli.disks``).

``register(subparsers)`` adds the ``disk`` command; every leaf sets ``func`` to a ``handler(args, cfg)``
returning the exit code: 0 success, 1 operation failed (refused, Ceph or Consul error, invalid stored
definition), 2 usage error (bad size, path, IQN, CHAP input, unreadable password file). Every leaf takes
``--json``. ``disk create`` prints the new id alone on its last stdout line.

CHAP passwords are read from files (``--chap-password-file``), never from the command line, and never
printed: output goes through ``schema.public_dict`` and error messages never echo a secret.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any, Callable

from agent.core import schema
from agent.config import Config
from agent.errors import AgentError, DefinitionError
from agent.core.model import Chap, Disk
from agent.cli.output import EXIT_OK, EXIT_USAGE, emit, fail

if TYPE_CHECKING:  # imported when a disk command runs: the other commands need neither Consul nor rados
    from agent.cli.disks import DiskInfo, Disks

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"1.5G"``, ``"2T"`` (K/M/G/T are powers of 1024); a whole
    number of 512-byte sectors."""
    from agent.cli.disks import SECTOR
    m = SIZE_RE.match(text)
    if not m:
        raise UsageError(f"--size {text!r}: expected a byte count or a number with K, M, G or T")
    size = float(m.group(1)) * UNITS[m.group(2).upper()]
    if size != int(size) or size <= 0 or size % SECTOR:
        raise UsageError(f"--size {text!r}: must be a positive multiple of {SECTOR} bytes")
    return int(size)


def human_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]} {unit}iB"
    return f"{size} B"


def parse_path(text: str) -> tuple[str, int]:
    """``"198.18.0.10/24"`` -> ``("198.18.0.10", 24)``; the address itself is checked by the schema."""
    ip, sep, prefix = text.partition("/")
    if not sep or not prefix.isdigit():
        raise UsageError(f"--path {text!r}: expected IP/PREFIX, e.g. 198.18.0.10/24")
    return ip, int(prefix)


def read_secret(path: str, option: str) -> str:
    """The first line of ``path`` (a CHAP password file), without its line ending. Never printed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"{option} {path}: {reason}") from None
    lines = data.splitlines()
    return lines[0] if lines else ""


def chap_from(args: argparse.Namespace, kind: str) -> Chap | None:
    """A ``Chap`` from ``--{kind}-user`` and ``--{kind}-password-file``, or ``None`` when neither is given."""
    user = getattr(args, f"{kind.replace('-', '_')}_user", None)
    pw_file = getattr(args, f"{kind.replace('-', '_')}_password_file", None)
    if user is None and pw_file is None:
        return None
    if user is None or pw_file is None:
        raise UsageError(f"--{kind}-user and --{kind}-password-file go together")
    return Chap(user, read_secret(pw_file, f"--{kind}-password-file"))


# --- output ------------------------------------------------------------------------------------------------

def _error_dict(e: DefinitionError) -> dict[str, str]:
    return {"field": e.field, "reason": e.reason, "message": str(e)}


def info_dict(info: DiskInfo) -> dict[str, Any]:
    """What ``list``/``show`` print for one disk (no secrets)."""
    if info.disk is not None:
        return {**schema.public_dict(info.disk), "started": info.started, "valid": True}
    assert info.error is not None
    return {"id": info.id, "pool": info.pool, "image": info.image, "started": info.started, "valid": False,
            "error": _error_dict(info.error)}


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


# --- handlers ------------------------------------------------------------------------------------------------

Op = Callable[[argparse.Namespace, "Disks"], int]


def _run(op: Op) -> Callable[[argparse.Namespace, Config], int]:
    """Wrap ``op`` with the Consul and Ceph connections and the exit-code mapping."""
    def handler(args: argparse.Namespace, cfg: Config) -> int:
        from agent.adapters.ceph import CephClient
        from agent.adapters.consul_store import ConsulStore
        from agent.cli.disks import Disks
        try:
            store = ConsulStore(cfg.consul)
            ceph = CephClient(cfg.ceph.conf, cfg.ceph.client_id, cfg.ceph.timeout)
        except AgentError as e:
            return fail(str(e))
        try:
            return op(args, Disks(cfg, store, ceph))
        except UsageError as e:
            return fail(str(e), EXIT_USAGE)
        except AgentError as e:
            return fail(str(e))
        finally:
            ceph.close()
            store.close()
    handler.__name__ = f"cmd_disk_{op.__name__.lstrip('_')}"
    return handler


def _create(args: argparse.Namespace, disks: Disks) -> int:
    size = parse_size(args.size)
    paths = [parse_path(p) for p in args.path]
    chap, mutual = chap_from(args, "chap"), chap_from(args, "mutual-chap")
    try:
        disk = disks.create(args.name, size, paths, pool=args.pool, iqn=args.iqn,
                            initiators=args.initiator or (), open_=args.open, chap=chap, mutual_chap=mutual)
    except DefinitionError as e:  # the input does not make a valid definition: nothing was created
        raise UsageError(f"invalid disk definition: field {e.field!r}: {e.reason}") from None
    emit(args, {**schema.public_dict(disk), "started": False},
          f"created disk {disk.name}: {disk.pool}/{disk.image}, {human_size(disk.size)}, "
          f"{len(disk.paths)} path(s)\n{disk.id}")
    return EXIT_OK


def _list(args: argparse.Namespace, disks: Disks) -> int:
    infos = disks.list(args.pool or ())
    rows = [f"{'ID':<10} {'NAME':<20} {'STATE':<8} {'SIZE':>9} {'PATHS':>5}  IMAGE"]
    for i in infos:
        if i.disk is not None:
            rows.append(f"{i.id:<10} {i.disk.name:<20} {'started' if i.started else 'stopped':<8} "
                        f"{human_size(i.disk.size):>9} {len(i.disk.paths):>5}  {i.pool}/{i.image}")
        else:
            assert i.error is not None
            rows.append(f"{i.id:<10} {'-':<20} {'started' if i.started else 'stopped':<8} {'-':>9} {'-':>5}  "
                        f"{i.pool}/{i.image}  INVALID: {i.error.message}")
    emit(args, [info_dict(i) for i in infos], "\n".join(rows))
    return EXIT_OK


def _show(args: argparse.Namespace, disks: Disks) -> int:
    info = disks.show(args.id, args.pool)
    if info.disk is None:
        assert info.error is not None
        if getattr(args, "json", False):
            emit(args, info_dict(info), "")
        return fail(str(info.error))
    emit(args, info_dict(info), describe(info.disk, info.started))
    return EXIT_OK


def _start(args: argparse.Namespace, disks: Disks) -> int:
    disk = disks.start(args.id, args.pool)
    emit(args, {"id": disk.id, "started": True, "paths": [p.index for p in disk.paths]},
          f"disk {disk.id} started: {len(disk.paths)} path(s)")
    return EXIT_OK


def _stop(args: argparse.Namespace, disks: Disks) -> int:
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g}: must be positive")
    was = disks.stop(args.id, timeout=args.timeout,
                     progress=lambda msg: print(f"pathagent: {msg}", file=sys.stderr))
    emit(args, {"id": args.id, "started": False, "was_started": was},
          f"disk {args.id} stopped" if was else f"disk {args.id} was not started")
    return EXIT_OK


def _delete(args: argparse.Namespace, disks: Disks) -> int:
    pool, image = disks.delete(args.id, args.pool, wait=args.wait)
    emit(args, {"id": args.id, "deleted": True, "pool": pool, "image": image},
          f"disk {args.id} deleted ({pool}/{image} removed)")
    return EXIT_OK


def _update(args: argparse.Namespace, disks: Disks) -> int:
    given, given_mutual = chap_from(args, "chap"), chap_from(args, "mutual-chap")
    if args.no_chap and (given or given_mutual):
        raise UsageError("--no-chap removes CHAP: it takes no --chap-user or --mutual-chap-user")
    if args.no_mutual_chap and given_mutual:
        raise UsageError("--no-mutual-chap and --mutual-chap-user exclude each other")
    chap: Chap | None | bool = None if args.no_chap else (given or True)
    mutual: Chap | None | bool = (None if args.no_chap or args.no_mutual_chap else (given_mutual or True))
    try:
        disk = disks.update(args.id, args.pool, name=args.name, initiators=args.initiator,
                            add_initiators=args.add_initiator or (), remove_initiators=args.remove_initiator or (),
                            open_=args.open, chap=chap, mutual_chap=mutual)
    except DefinitionError as e:
        raise UsageError(f"invalid disk definition: field {e.field!r}: {e.reason}") from None
    started = disks.record(args.id) is not None
    emit(args, {**schema.public_dict(disk), "started": started},
          f"disk {disk.id} updated" + (" (owners apply it now)" if started else ""))
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------------------

def _leaf(sub: Any, name: str, op: Op, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    try:
        p.add_argument("--json", action="store_true", dest="json", default=False, help="machine-readable output")
    except argparse.ArgumentError:
        pass  # the host parser already gives every subcommand --json
    p.set_defaults(func=_run(op))
    return p


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


def register(subparsers: Any) -> None:
    """Add ``disk`` with its subcommands to the top-level ``subparsers``."""
    d = subparsers.add_parser("disk", help="disk lifecycle: create, list, show, start, stop, update, delete")
    sub = d.add_subparsers(dest="disk_command", metavar="SUBCOMMAND", required=True)

    p = _leaf(sub, "create", _create, "create the RBD image and its definition; prints the new disk id")
    p.add_argument("name", metavar="NAME", help="display name (1-64 of A-Z a-z 0-9 . _ -)")
    p.add_argument("--size", required=True, help="bytes, or a number with K, M, G or T (powers of 1024)")
    p.add_argument("--path", action="append", required=True, metavar="IP/PREFIX",
                   help="a floating path address; repeat for each path (index = order given)")
    p.add_argument("--pool", metavar="P", default=None, help="pool of the image (default: [ceph] pool)")
    p.add_argument("--iqn", help="target IQN (default iqn.2016-05.io.pathagent:<id>)")
    p.add_argument("--initiator", action="append", metavar="IQN",
                   help="an initiator IQN to admit; repeat for more (default: none admitted)")
    p.add_argument("--open", action="store_true", help="admit any initiator")
    _chap_opts(p)

    p = _leaf(sub, "list", _list, "every disk with its state")
    p.add_argument("--pool", action="append", metavar="P",
                   help="pool to scan (repeatable; default: [ceph] pool and the pools of started disks)")

    p = _leaf(sub, "show", _show, "one disk's definition (exits 1 if it is invalid)")
    p.add_argument("id", metavar="ID")
    _pool_opt(p, "look in")

    p = _leaf(sub, "start", _start, "create the disk's Consul keys: nodes start serving its paths")
    p.add_argument("id", metavar="ID")
    _pool_opt(p, "look in")

    p = _leaf(sub, "stop", _stop, "owners stop serving the disk and release its paths; then its Consul keys "
                                  "are removed")
    p.add_argument("id", metavar="ID")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the owners to let go (default 60); running the command again "
                        "finishes a stop that timed out")

    p = _leaf(sub, "delete", _delete, "remove a stopped disk's image and data")
    p.add_argument("id", metavar="ID")
    _pool_opt(p, "look in")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to retry while a gateway still has the image open (default 10)")

    p = _leaf(sub, "update", _update, "change a disk's name, initiators or CHAP (applies to a started "
                                      "disk without a stop)")
    p.add_argument("id", metavar="ID")
    _pool_opt(p, "look in")
    p.add_argument("--name", help="new display name")
    p.add_argument("--initiator", action="append", metavar="IQN", help="replace the initiator list (repeatable)")
    p.add_argument("--add-initiator", action="append", metavar="IQN", help="admit one more initiator")
    p.add_argument("--remove-initiator", action="append", metavar="IQN", help="stop admitting an initiator")
    acc = p.add_mutually_exclusive_group()
    acc.add_argument("--open", dest="open", action="store_const", const=True, default=None,
                     help="admit any initiator")
    acc.add_argument("--closed", dest="open", action="store_const", const=False,
                     help="admit only the listed initiators")
    _chap_opts(p)
    p.add_argument("--no-chap", action="store_true", help="remove CHAP (and mutual CHAP)")
    p.add_argument("--no-mutual-chap", action="store_true", help="remove mutual CHAP")
