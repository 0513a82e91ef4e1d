"""``pathagent consul-config``: the Consul agent config (JSON) of a gateway (``--client``) or of a Consul
server (``--server``), with the gossip and Raft timing the fencing defaults assume.

It runs before the cluster exists: it contacts neither Consul nor Ceph and needs no pathagent config
(``handler`` ignores ``cfg``; main.py does not load the config for it). The document is
``agent.core.consulconf.render`` of the options (docs/consul.md has the procedure, etc/consul/README.md
every key).

Contracts:

- every argument is checked before anything is read or written; each problem is one line on stderr
  naming the option, exit 2; a file that cannot be read (``--encrypt-file``, the token files) is exit 2
  too, naming the file;
- secrets (the gossip key, ACL tokens) are read from files, never taken on the command line, and never
  printed in a message; with ``--out`` they are not printed at all (stdout gets a one-line summary, or
  ``--json`` a summary object);
- ``--out FILE`` replaces FILE atomically (a temporary file in the same directory, fsync, rename, fsync of
  the directory) with mode 0600; an existing FILE keeps its owner and group (so a file given to the
  ``consul`` user stays readable by it); a failure to write is exit 1 and leaves FILE as it was;
- without ``--out`` the JSON document goes to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any

from agent.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from agent.config import Config
from agent.core import consulconf
from agent.core.consulconf import AgentSpec, Problem, TlsFiles

DESCRIPTION = """\
Write the Consul agent config (JSON) of a gateway (--client: the Consul client agent that pathagent on that
gateway talks to) or of a Consul server (--server), with the gossip and Raft timing that pathagent's
fencing defaults assume. Needs no Consul, no Ceph and no pathagent config. Install the file in the Consul
agent's config directory (e.g. /etc/consul.d/consul.json) and check it with `consul validate`
(docs/consul.md)."""


def register(subparsers: Any) -> None:
    """Add ``consul-config`` to the top-level ``subparsers`` (its ``func`` is ``handler``; ``no_config``
    tells main.py not to load a pathagent config for it)."""
    p = subparsers.add_parser("consul-config", help="write a Consul agent config for a gateway or a server",
                              description=DESCRIPTION)
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--client", action="store_true", help="a gateway's Consul client agent")
    role.add_argument("--server", action="store_true", help="a Consul server")
    p.add_argument("--node", required=True, metavar="NAME",
                   help="the node name: on a gateway its pathagent node name ([node] name)")
    p.add_argument("--bind", required=True, metavar="IP", help="the address the agent binds for gossip and RPC")
    p.add_argument("--advertise", metavar="IP", help="the address the others reach it at (default: --bind)")
    p.add_argument("--join", action="append", required=True, metavar="ADDR",
                   help="a Consul server to join: IP, IP:PORT, [IPv6]:PORT or a DNS name (repeat for each server)")
    p.add_argument("--datacenter", default=consulconf.DEFAULT_DATACENTER, metavar="DC",
                   help=f"the datacenter, the same on every agent (default {consulconf.DEFAULT_DATACENTER})")
    p.add_argument("--data-dir", default=consulconf.DEFAULT_DATA_DIR, metavar="DIR",
                   help=f"the agent's data directory (default {consulconf.DEFAULT_DATA_DIR})")
    p.add_argument("--client-addr", default=consulconf.DEFAULT_CLIENT_ADDR, metavar="IP",
                   help="where the HTTP API listens, space-separated IPs (default 127.0.0.1: only local "
                        "processes, as pathagent's [consul] address expects)")
    p.add_argument("--bootstrap-expect", type=int, default=None, metavar="N",
                   help=f"--server: the number of servers (default {consulconf.DEFAULT_BOOTSTRAP_EXPECT})")
    p.add_argument("--encrypt-file", metavar="FILE",
                   help="a file holding the gossip encryption key (`consul keygen`), the same on every agent")
    acl = p.add_argument_group("ACLs")
    acl.add_argument("--acl", action="store_true",
                     help="ACLs on, default policy deny (tokens: docs/consul.md)")
    acl.add_argument("--primary-datacenter", default="", metavar="DC",
                     help="--acl: the datacenter authoritative for ACLs (default: --datacenter)")
    acl.add_argument("--agent-token-file", metavar="FILE",
                     help="--acl: a file holding this Consul agent's own token (else set it later with "
                          "`consul acl set-agent-token agent`)")
    acl.add_argument("--master-token-file", metavar="FILE",
                     help="--acl --server: a file holding the initial management token (instead of "
                          "`consul acl bootstrap`)")
    tls = p.add_argument_group("TLS (all three files, absolute paths on the agent's host)")
    tls.add_argument("--tls-ca", metavar="FILE", help="the CA certificate (PEM)")
    tls.add_argument("--tls-cert", metavar="FILE", help="this agent's certificate (PEM)")
    tls.add_argument("--tls-key", metavar="FILE", help="this agent's private key (PEM)")
    tls.add_argument("--https", action="store_true",
                     help=f"the HTTP API over HTTPS only, on port {consulconf.HTTPS_PORT}, for clients with a "
                          "certificate of the CA (set pathagent's [consul] scheme, address and cert files)")
    p.add_argument("--port", action="append", default=[], metavar="KIND=N",
                   help=f"a non-standard port ({', '.join(consulconf.PORT_KINDS)}; -1 turns dns, http, "
                        "https or grpc off); repeatable")
    p.add_argument("--out", metavar="FILE", help="write the config to FILE (atomically, mode 0600) instead "
                                                 "of stdout")
    p.set_defaults(func=handler, no_config=True)


class _Usage(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


def _secret(path: str | None, option: str) -> str:
    """The first line of the file ``path`` (empty when no file was given). The content is never shown."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise _Usage([(option, f"cannot read {path}: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise _Usage([(option, f"{path} is not text")]) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise _Usage([(option, f"{path} is empty")])
    if len(lines) > 1:
        raise _Usage([(option, f"{path} has more than one line: it should hold the secret alone")])
    return lines[0]


def _ports(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    bad: list[Problem] = []
    for item in items:
        kind, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[kind.strip()] = int(value)
        except ValueError:
            bad.append(("--port", f"{item[:60]!r} is not KIND=N"))
    if bad:
        raise _Usage(bad)
    return out


def spec_from(args: argparse.Namespace) -> AgentSpec:
    """The ``AgentSpec`` the options ask for, with the secrets read from their files. Raises ``_Usage``
    with every problem (the checks of ``consulconf.problems`` plus the options' own)."""
    pre: list[Problem] = []
    if args.client and args.bootstrap_expect is not None:
        pre.append(("--bootstrap-expect", "only for --server"))
    paths = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(paths) and not all(paths):
        pre.append(("--tls-ca", "TLS needs all three of --tls-ca, --tls-cert and --tls-key"))
    if args.https and not all(paths):
        pre.append(("--https", "needs --tls-ca, --tls-cert and --tls-key"))
    if args.primary_datacenter and not args.acl:
        pre.append(("--primary-datacenter", "needs --acl"))
    if pre:
        raise _Usage(pre)
    tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key, https=args.https) if all(paths) else None
    spec = AgentSpec(
        server=bool(args.server), node=args.node, bind=args.bind, join=tuple(args.join),
        advertise=args.advertise or "", datacenter=args.datacenter, primary_datacenter=args.primary_datacenter,
        data_dir=args.data_dir, client_addr=args.client_addr,
        bootstrap_expect=args.bootstrap_expect if args.bootstrap_expect is not None
        else consulconf.DEFAULT_BOOTSTRAP_EXPECT,
        acl=bool(args.acl), tls=tls, ports=_ports(args.port))
    found = consulconf.problems(spec)        # the arguments first: no file is read for a bad command
    if found:
        raise _Usage(found)
    spec = dataclasses.replace(spec, encrypt=_secret(args.encrypt_file, "--encrypt-file"),
                               agent_token=_secret(args.agent_token_file, "--agent-token-file"),
                               master_token=_secret(args.master_token_file, "--master-token-file"))
    found = consulconf.problems(spec)
    if found:
        raise _Usage(found)
    return spec


def write_private(path: str, text: str) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 (see the module docstring). Raises OSError."""
    target = os.path.abspath(path)
    d = os.path.dirname(target)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(target)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass        # not root: the file is ours, as the file we replace could not be kept
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _report(spec: AgentSpec, out: str) -> str:
    s = consulconf.summary(spec)
    role = "Consul server" if spec.server else "gateway Consul client agent"
    acl = "off"
    if spec.acl:
        acl = "on, default deny" + ("; agent token set" if spec.agent_token else
                                    "; agent token not set (consul acl set-agent-token agent)")
        if spec.master_token:
            acl += "; master token set"
    tls = "off" if spec.tls is None else "RPC" + (" and HTTPS-only API" if spec.tls.https else "")
    return (f"wrote {out}: {role} {s['node']} (bind {s['bind']}, advertise {s['advertise']}), "
            f"joins {', '.join(spec.join)}; gossip encryption {'on' if spec.encrypt else 'off'}; ACLs {acl}; "
            f"TLS {tls}")


def handler(args: argparse.Namespace, cfg: Config | None) -> int:
    """Run the command (see the module docstring); ``cfg`` is not used."""
    try:
        spec = spec_from(args)
    except _Usage as e:
        for opt, msg in e.problems:
            print(f"pathagent consul-config: {opt}: {msg}", file=sys.stderr)
        return EXIT_USAGE
    text = json.dumps(consulconf.render(spec), indent=2) + "\n"
    if not (spec.encrypt or spec.acl or spec.tls):
        print("pathagent consul-config: note: no gossip encryption, ACLs or TLS: for a lab only "
              "(docs/consul.md)", file=sys.stderr)
    if not args.out:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            return EXIT_FAILED
        return EXIT_OK
    try:
        write_private(args.out, text)
    except OSError as e:
        print(f"pathagent consul-config: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    if getattr(args, "json", False):
        print(json.dumps({"file": os.path.abspath(args.out), **consulconf.summary(spec)}, indent=2, sort_keys=True))
    else:
        print(_report(spec, args.out))
    return EXIT_OK
