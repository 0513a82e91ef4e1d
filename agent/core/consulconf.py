"""Consul agent configs for the gateways (client agents) and the Consul servers, as data. Pure: no I/O.

The one source of truth for the Consul timing that the fencing defaults assume (docs/fencing.md, "The
inequality"; etc/consul/README.md explains every value): ``GOSSIP_LAN``, ``RPC_HOLD_TIMEOUT``,
``RAFT_MULTIPLIER``, ``SESSION_TTL_MIN``, ``LEAVE_ON_TERMINATE``, ``SKIP_LEAVE_ON_INTERRUPT``. Everything that writes a Consul agent
config takes them from here:

- ``pathagent consul-config`` (``agent.cli.consulconfig``) prints ``render(spec)``;
- the lab's agents (``scripts/lab/consul.py``) run ``render(spec)`` plus a log level;
- the shipped examples ``etc/consul/gateway.json`` and ``etc/consul/server.json`` are ``template(False)``
  and ``template(True)`` (tests/unit/test_consulconf.py compares them key by key).

``problems(spec)`` lists what is wrong with a spec as ``(option, message)`` pairs named after the
command's options, so that the CLI can print them; ``render`` refuses (``ValueError``) a spec with
problems. Secrets (the gossip key, ACL tokens) are carried in the spec and appear in the rendered
document only, never in a problem message.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

#: gossip timing of every agent, servers and gateways alike (every agent probes); detection of a dead
#: gateway 1.5 s median (docs/fencing.md), a VM pause of up to ~1.1 s survived
GOSSIP_LAN: Mapping[str, str | int] = MappingProxyType({
    "probe_interval": "300ms",
    "probe_timeout": "150ms",
    "suspicion_mult": 3,
    "gossip_interval": "100ms",
})
#: how long an agent holds an RPC while there is no Raft leader (both roles)
RPC_HOLD_TIMEOUT = "1s"
#: servers: the fastest Raft timing 1.8.7 accepts; ``[consul] election_stall`` is budgeted for it
RAFT_MULTIPLIER = 1
#: servers: the shortest session TTL accepted (the floor of ``[consul] session_ttl``)
SESSION_TTL_MIN = "10s"
#: a SIGTERM of Consul (a restart) is not a graceful leave, which would end the gateway's session at once
LEAVE_ON_TERMINATE = False
#: nor is a SIGINT: Debian's consul.service stops the agent with ``KillSignal=SIGINT``, and a client agent
#: leaves on SIGINT by default (servers do not)
SKIP_LEAVE_ON_INTERRUPT = True
#: how often a join is retried at start
RETRY_INTERVAL = "5s"

DEFAULT_DATACENTER = "dc1"
DEFAULT_DATA_DIR = "/var/lib/consul"
#: the HTTP API for local processes only: ``[consul] address`` defaults to 127.0.0.1:8500
DEFAULT_CLIENT_ADDR = "127.0.0.1"
DEFAULT_BOOTSTRAP_EXPECT = 3
#: what the shipped example files join (DNS names the site replaces)
PLACEHOLDER_JOIN = ("consul-server-1", "consul-server-2", "consul-server-3")
#: the HTTPS port when the HTTP API is served over TLS only (``TlsFiles.https``)
HTTPS_PORT = 8501

PORT_KINDS = ("dns", "http", "https", "grpc", "serf_lan", "serf_wan", "server")
#: the ports that may be turned off with -1
OPTIONAL_PORTS = ("dns", "http", "https", "grpc")

_NODE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_DC_RE = re.compile(r"[a-z0-9_-]{1,64}")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|ms|s|m|h))+")

Problem = tuple[str, str]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """TLS for RPC between agents (every agent verifies the others: ``verify_incoming_rpc``,
    ``verify_outgoing``, ``verify_server_hostname``), from PEM files at these absolute paths on the agent's
    host. ``https``: the HTTP API only over HTTPS (port ``HTTPS_PORT``, plain HTTP off) and only for
    clients with a certificate of the CA (``verify_incoming_https``): pathagent's ``[consul] scheme``,
    ``address``, ``ca_file``, ``cert_file`` and ``key_file`` must say so."""

    ca_file: str
    cert_file: str
    key_file: str
    https: bool = False


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One Consul agent's config. ``node`` and ``bind`` empty only for ``template``.

    - ``join``: the servers' addresses (``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a DNS name), for servers
      too (they join each other; listing the server itself does no harm);
    - ``advertise``: the address the others reach it at (default ``bind``);
    - ``client_addr``: where the HTTP API (and DNS) listen, space-separated IPs;
    - ``encrypt``: the gossip key (``consul keygen``; empty: no gossip encryption);
    - ``acl``: ACLs on, ``default_policy = deny``; ``agent_token`` (the Consul agent's own token, else set
      later with ``consul acl set-agent-token agent``: ``enable_token_persistence`` keeps it) and, on
      servers only, ``master_token`` (a management token known in advance: no ``consul acl bootstrap``);
      ``primary_datacenter`` (default ``datacenter``) is authoritative for ACLs;
    - ``ports``: kind -> port (``PORT_KINDS``; -1 turns an optional one off), for several agents on one
      host (tests); the standard ports otherwise.
    """

    server: bool
    node: str = ""
    bind: str = ""
    join: tuple[str, ...] = ()
    advertise: str = ""
    datacenter: str = DEFAULT_DATACENTER
    primary_datacenter: str = ""
    data_dir: str = DEFAULT_DATA_DIR
    client_addr: str = DEFAULT_CLIENT_ADDR
    bootstrap_expect: int = DEFAULT_BOOTSTRAP_EXPECT
    retry_interval: str = RETRY_INTERVAL
    encrypt: str = ""
    acl: bool = False
    agent_token: str = ""
    master_token: str = ""
    tls: TlsFiles | None = None
    ports: Mapping[str, int] = field(default_factory=dict)


# --- checks of single values (each returns why the value is refused, or None) -------------------------

def node_problem(name: str) -> str | None:
    if _NODE_RE.fullmatch(name):
        return None
    return (f"{name[:80]!r} is not a node name: use 1-63 lowercase letters, digits and '-', not starting or "
            "ending with '-' (it names the Consul node, the key {prefix}/nodes/NAME and the Ceph client "
            "pathagent-NAME; Consul compares node names without case, Ceph and the keys with it)")


def ip_problem(text: str, what: str = "an IP address") -> str | None:
    """Why ``text`` is not a unicast IP address an agent can bind or advertise."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return f"{text[:80]!r} is not {what}"
    if ip.is_unspecified or ip.is_multicast:
        return f"{text!r} cannot be bound or advertised: give the agent's own address"
    return None


def _hostname_ok(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    # an all-numeric last label is a mistyped IP address (10.0.0.300), not a DNS name
    return (0 < len(host) <= 253 and all(_LABEL_RE.fullmatch(x) for x in labels)
            and not labels[-1].isdigit())


def split_address(text: str) -> tuple[str, int | None]:
    """``(host, port)`` of ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, a bare IPv6 address or ``NAME[:PORT]``
    (port ``None`` when absent). Raises ``ValueError`` for anything else."""
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1:] and not text[end + 1:].startswith(":")):
            raise ValueError(text)
        host, rest = text[1:end], text[end + 2:]
        if rest:
            port = _port(rest)
        ipaddress.IPv6Address(host)
        return host, port
    if text.count(":") == 1:
        host, rest = text.split(":")
        port = _port(rest)
    elif text.count(":") > 1:
        ipaddress.IPv6Address(text)
        return text, None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _hostname_ok(host):
            raise ValueError(text) from None
    return host, port


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(text)
    return int(text)


def join_problem(text: str) -> str | None:
    try:
        split_address(text)
    except ValueError:
        return (f"{text[:80]!r} is not a server address: IP, IP:PORT, [IPv6]:PORT or a DNS name "
                "(with :PORT if it is not 8301)")
    return None


def encrypt_problem(key: str) -> str | None:
    """Why ``key`` is not a gossip key (base64 of 16, 24 or 32 bytes, as ``consul keygen`` prints). The
    message never contains the key."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return "is not base64 (make one with `consul keygen`)"
    if len(raw) not in (16, 24, 32):
        return f"decodes to {len(raw)} bytes, a gossip key has 16, 24 or 32 (make one with `consul keygen`)"
    return None


def token_problem(token: str) -> str | None:
    """Why ``token`` is not an ACL token secret (a UUID). The message never contains the token."""
    try:
        ok = str(uuid.UUID(token)) == token.lower() and len(token) == 36
    except ValueError:
        ok = False
    return None if ok else "is not a token SecretID (a UUID such as `uuidgen` or `consul acl token create` print)"


def duration_problem(text: str) -> str | None:
    return None if _DURATION_RE.fullmatch(text) else f"{text[:40]!r} is not a duration such as 5s or 500ms"


# --- the whole spec -------------------------------------------------------------------------------------

def problems(spec: AgentSpec, template: bool = False) -> list[Problem]:
    """Every problem of ``spec``, as ``(option, message)`` with the option named as ``pathagent
    consul-config`` names it. ``template``: ``node`` and ``bind`` may be empty (the shipped examples)."""
    out: list[Problem] = []
    if spec.node or not template:
        if (why := node_problem(spec.node)) is not None:
            out.append(("--node", why))
    if spec.bind or not template:
        if (why := ip_problem(spec.bind)) is not None:
            out.append(("--bind", why))
    if spec.advertise and (why := ip_problem(spec.advertise)) is not None:
        out.append(("--advertise", why))
    if not spec.join:
        out.append(("--join", "give the address of at least one Consul server"))
    for j in spec.join:
        if (why := join_problem(j)) is not None:
            out.append(("--join", why))
    if len(set(spec.join)) != len(spec.join):
        out.append(("--join", "an address is given twice"))
    for opt, dc in (("--datacenter", spec.datacenter), ("--primary-datacenter", spec.primary_datacenter)):
        if (dc or opt == "--datacenter") and not _DC_RE.fullmatch(dc):
            out.append((opt, f"{dc[:80]!r} is not a datacenter name: lowercase letters, digits, '-' and '_'"))
    if not spec.data_dir.startswith("/"):
        out.append(("--data-dir", f"{spec.data_dir[:80]!r} is not an absolute path"))
    addrs = spec.client_addr.split()
    if not addrs:
        out.append(("--client-addr", "give at least one address for the HTTP API"))
    for a in addrs:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            out.append(("--client-addr", f"{a[:80]!r} is not an IP address"))
    if spec.server:
        if not 1 <= spec.bootstrap_expect <= 9:
            out.append(("--bootstrap-expect", f"{spec.bootstrap_expect} is not a number of servers (1-9; 3 or 5)"))
    if (why := duration_problem(spec.retry_interval)) is not None:
        out.append(("--retry-interval", why))
    if spec.encrypt and (why := encrypt_problem(spec.encrypt)) is not None:
        out.append(("--encrypt-file", f"the gossip key {why}"))
    if not spec.acl:
        for opt, tok in (("--agent-token-file", spec.agent_token), ("--master-token-file", spec.master_token)):
            if tok:
                out.append((opt, "needs --acl"))
    for opt, tok in (("--agent-token-file", spec.agent_token), ("--master-token-file", spec.master_token)):
        if tok and (why := token_problem(tok)) is not None:
            out.append((opt, f"the token {why}"))
    if spec.master_token and not spec.server:
        out.append(("--master-token-file", "only servers take the master token (a gateway's agent takes "
                                           "--agent-token-file)"))
    if spec.tls is not None:
        for opt, path in (("--tls-ca", spec.tls.ca_file), ("--tls-cert", spec.tls.cert_file),
                          ("--tls-key", spec.tls.key_file)):
            if not path.startswith("/"):
                out.append((opt, f"{path[:80]!r} is not an absolute path" if path else
                            "TLS needs all three of --tls-ca, --tls-cert and --tls-key"))
    for kind, port in spec.ports.items():
        if kind not in PORT_KINDS:
            out.append(("--port", f"{kind[:40]!r} is not a port kind ({', '.join(PORT_KINDS)})"))
        elif not (1 <= port <= 65535 or (port == -1 and kind in OPTIONAL_PORTS)):
            out.append(("--port", f"{kind}={port}: a port is 1-65535"
                                  + (" or -1 (off)" if kind in OPTIONAL_PORTS else "")))
    used = [p for p in spec.ports.values() if p > 0]
    if len(set(used)) != len(used):
        out.append(("--port", "two kinds have the same port"))
    return out


def tuning(server: bool) -> dict[str, Any]:
    """The tuned keys of a role's config (a new dict each call): what the fencing defaults assume."""
    performance: dict[str, Any] = {"rpc_hold_timeout": RPC_HOLD_TIMEOUT}
    out: dict[str, Any] = {"leave_on_terminate": LEAVE_ON_TERMINATE, "skip_leave_on_interrupt": SKIP_LEAVE_ON_INTERRUPT,
                           "disable_update_check": True}
    if server:
        performance = {"raft_multiplier": RAFT_MULTIPLIER, **performance}
        out["session_ttl_min"] = SESSION_TTL_MIN
    out["performance"] = performance
    out["gossip_lan"] = dict(GOSSIP_LAN)
    return out


def render(spec: AgentSpec, template: bool = False) -> dict[str, Any]:
    """The agent config document (``json.dumps`` it) for ``spec``. Raises ``ValueError`` naming the first
    problem (``problems``) without any secret."""
    found = problems(spec, template)
    if found:
        opt, msg = found[0]
        raise ValueError(f"{opt}: {msg}")
    doc: dict[str, Any] = {}
    if spec.node:
        doc["node_name"] = spec.node
    doc["datacenter"] = spec.datacenter
    doc["data_dir"] = spec.data_dir
    doc["server"] = spec.server
    if spec.server:
        doc["bootstrap_expect"] = spec.bootstrap_expect
    if spec.bind:
        doc["bind_addr"] = spec.bind
        doc["advertise_addr"] = spec.advertise or spec.bind
    doc["client_addr"] = " ".join(spec.client_addr.split())
    doc["retry_join"] = list(spec.join)
    doc["retry_interval"] = spec.retry_interval
    ports = dict(spec.ports)
    if spec.encrypt:
        doc["encrypt"] = spec.encrypt
    acl: dict[str, Any] = {"enabled": spec.acl, "default_policy": "deny", "down_policy": "extend-cache",
                           "enable_token_persistence": True}
    tokens = {k: v for k, v in (("master", spec.master_token), ("agent", spec.agent_token)) if v}
    if tokens:
        acl["tokens"] = tokens
    if spec.acl:
        doc["primary_datacenter"] = spec.primary_datacenter or spec.datacenter
    doc["acl"] = acl
    if spec.tls is not None:
        doc["ca_file"] = spec.tls.ca_file
        doc["cert_file"] = spec.tls.cert_file
        doc["key_file"] = spec.tls.key_file
        doc["verify_incoming_rpc"] = True
        doc["verify_outgoing"] = True
        doc["verify_server_hostname"] = True
        if spec.tls.https:
            doc["verify_incoming_https"] = True
            ports.setdefault("https", HTTPS_PORT)
            ports.setdefault("http", -1)
    if ports:
        doc["ports"] = {k: ports[k] for k in PORT_KINDS if k in ports}
    doc.update(tuning(spec.server))
    return doc


def template(server: bool) -> dict[str, Any]:
    """The shipped example ``etc/consul/server.json`` (``server``) or ``etc/consul/gateway.json``: the
    tuning, the defaults, and ``PLACEHOLDER_JOIN``; no node name or address (the site's part,
    etc/consul/README.md)."""
    return render(AgentSpec(server=server, join=PLACEHOLDER_JOIN), template=True)


def summary(spec: AgentSpec) -> dict[str, Any]:
    """What ``spec`` sets up, without any secret: for the command's report."""
    return {"role": "server" if spec.server else "client", "node": spec.node, "bind": spec.bind,
            "advertise": spec.advertise or spec.bind, "join": list(spec.join), "datacenter": spec.datacenter,
            "data_dir": spec.data_dir, "encrypt": bool(spec.encrypt), "acl": spec.acl,
            "agent_token": bool(spec.agent_token), "master_token": bool(spec.master_token),
            "tls": spec.tls is not None, "https": spec.tls is not None and spec.tls.https}
