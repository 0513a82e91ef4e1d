"""Configuration: TOML, every key documented in ``etc/pathagent.toml``.

``load(path)`` returns a ``Config`` or raises ``ConfigError`` listing *every* problem with its key
(unknown keys, wrong types, bad values, and settings that break the self-fencing inequality, see
``docs/fencing.md``). Durations are seconds (numbers); addresses are ``host:port``.

Lookup order for the file: ``--config``, ``$PATHAGENT_CONFIG``, ``/etc/pathagent/pathagent.toml``.
A missing default file means "all defaults"; a missing file that was named explicitly is an error.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.errors import ConfigError

DEFAULT_PATH = "/etc/pathagent/pathagent.toml"


@dataclass(frozen=True)
class ConsulConfig:
    address: str = "127.0.0.1:8500"
    scheme: str = "http"
    token: str = field(default="", repr=False)
    token_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    prefix: str = "pathagent"
    session_name: str = "iSCSITarget"
    checks: tuple[str, ...] = ()
    lock_delay: float = 6.0
    fence_after: float = 5.25
    confirm_interval: float = 0.25
    timeout: float = 0.5
    wait: float = 30.0
    election_stall: float = 4.5
    agent_check_ttl: float = 15.0
    session_ttl: float = 30.0

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def resolved_token(self) -> str:
        """The ACL token from ``token`` or ``token_file`` (empty: none). Never logged."""
        if self.token:
            return self.token
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return ""


@dataclass(frozen=True)
class CephConfig:
    conf: str = "/etc/ceph/ceph.conf"
    client_id: str = "admin"
    pool: str = "rbd"
    refresh: float = 30.0
    timeout: float = 10.0
    #: the Ceph client id (without "client.") of this node's data path (what the target backend opens
    #: images with); "{node}" is replaced by the node name, so that every gateway has its own and a
    #: failed one can be fenced without touching the others
    data_client_id: str = "pathagent-{node}"

    def data_id(self, node: str) -> str:
        """``data_client_id`` for ``node``."""
        return self.data_client_id.replace("{node}", node)


@dataclass(frozen=True)
class PluginTable:
    backend: str
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def own(self) -> Mapping[str, Any]:
        return self.options.get(self.backend, {})


@dataclass(frozen=True)
class Config:
    node_name: str = ""
    consul: ConsulConfig = ConsulConfig()
    ceph: CephConfig = CephConfig()
    state_dir: str = "/var/lib/pathagent"
    target: PluginTable = PluginTable("tgt")
    port: int = 3260
    stop_time: float = 0.5
    #: budget of the fence's first step, every floating IP of this node down: the serving bound of
    #: inequality (1) when a Ceph-side fence stops the old data path before a takeover
    down_time: float = 0.25
    network: PluginTable = PluginTable("iproute")
    catalog: PluginTable = PluginTable("rbd")
    watchdog: PluginTable = PluginTable("guard")
    fencing: PluginTable = PluginTable("none")
    node_weight: float = 1.0
    placement_grace: float = 3.0
    placement_settle: float = 2.0
    rebalance_after: float = 10.0
    max_moves: int = 4
    move_timeout: float = 30.0
    metrics_listen: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    log_audit: str = "/dev/log"      # the syslog socket the CLI's audit lines go to ("": none)
    source: str = ""


# --- schema: table -> key -> (type check, description) -----------------------------------------------

def _num(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number of seconds, not {type(v).__name__}"
        if not lo <= v <= hi:
            return f"must be between {lo:g} and {hi:g}"
        return None
    return check


def _int(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, not {type(v).__name__}"
        if not lo <= v <= hi:
            return f"must be between {lo} and {hi}"
        return None
    return check


def _abs_or_empty() -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, not {type(v).__name__}"
        if v and not v.startswith("/"):
            return "must be an absolute path (or empty: off)"
        return None
    return check


def _str(allow_empty: bool = True) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, not {type(v).__name__}"
        if not allow_empty and not v:
            return "must not be empty"
        return None
    return check


def _choice(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v not in choices:
            return f"must be one of {', '.join(choices)}"
        return None
    return check


def _address(v: Any) -> str | None:
    if not isinstance(v, str) or ":" not in v:
        return "must be host:port"
    host, port = v.rsplit(":", 1)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be host:port with a port 1-65535"
    return None


def _address_or_empty(v: Any) -> str | None:
    return None if v == "" else _address(v)


def _ttl(lo: float, hi: float) -> Callable[[Any], str | None]:
    """0 (off) or a number of seconds in ``[lo, hi]``."""
    inner = _num(lo, hi)

    def check(v: Any) -> str | None:
        if v == 0 and not isinstance(v, bool):
            return None
        err = inner(v)
        return f"{err} (or 0: off)" if err else None
    return check


def _str_list(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        return "must be a list of check names"
    return None


SCHEMA: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "node": {"name": _str(), "weight": _num(0.01, 1000)},
    "consul": {
        "address": _address, "scheme": _choice("http", "https"), "token": _str(), "token_file": _str(),
        "ca_file": _str(), "cert_file": _str(), "key_file": _str(), "prefix": _str(False),
        "session_name": _str(False), "checks": _str_list, "lock_delay": _num(1, 60),
        "fence_after": _num(0.5, 60), "confirm_interval": _num(0.1, 10), "timeout": _num(0.2, 10),
        "wait": _num(1, 300), "election_stall": _num(0, 60), "agent_check_ttl": _ttl(5, 600),
        "session_ttl": _ttl(10, 3600),
    },
    "ceph": {"conf": _str(False), "client_id": _str(False), "pool": _str(False), "refresh": _num(1, 3600),
             "timeout": _num(1, 300), "data_client_id": _str(False)},
    "state": {"dir": _str(False)},
    "target": {"backend": _str(False), "port": _int(1, 65535), "stop_time": _num(0.01, 60)},
    "network": {"backend": _str(False), "down_time": _num(0.01, 60)},
    "catalog": {"backend": _str(False)},
    "watchdog": {"backend": _str(False)},
    "fencing": {"backend": _str(False)},
    "placement": {"grace": _num(0, 600), "settle": _num(0, 60), "rebalance_after": _num(0, 3600),
                  "moves": _int(0, 1000), "move_timeout": _num(1, 3600)},
    "metrics": {"listen": _address_or_empty},
    "log": {"level": _choice("DEBUG", "INFO", "WARNING", "ERROR"), "format": _choice("text", "json"),
            "audit": _abs_or_empty()},
}
PLUGIN_TABLES = ("target", "network", "catalog", "watchdog", "fencing")


def _plugin_keys(kind: str, name: str) -> Mapping[str, str] | None:
    """The config keys plugin ``name`` accepts, or None when it cannot be loaded (reported elsewhere)."""
    from agent import plugins  # stevedore import only when checking plugin tables
    try:
        return dict(getattr(plugins.plugin_class(kind, name), "config_keys", {}))
    except ConfigError:
        return None


def parse(data: Mapping[str, Any], source: str = "") -> Config:
    """Build a ``Config`` from decoded TOML, or raise ``ConfigError`` with every problem."""
    cfg, problems = examine(data, source)
    if problems:
        raise ConfigError(problems)
    return cfg


def examine(data: Mapping[str, Any], source: str = "") -> tuple[Config, list[tuple[str, str]]]:
    """``parse`` without raising: the ``Config`` (every bad value replaced by its default) and every
    problem with its key. ``check-config`` uses it to run the plugins' own option checks
    (``agent.plugins.option_problems``) on the same config even when other keys are wrong."""
    problems: list[tuple[str, str]] = []
    values: dict[str, dict[str, Any]] = {t: {} for t in SCHEMA}
    sub: dict[str, dict[str, Mapping[str, Any]]] = {t: {} for t in PLUGIN_TABLES}
    for table, body in data.items():
        if table not in SCHEMA:
            problems.append((table, "unknown table"))
            continue
        if not isinstance(body, dict):
            problems.append((table, "must be a table"))
            continue
        for key, v in body.items():
            name = f"{table}.{key}"
            if table in PLUGIN_TABLES and isinstance(v, dict):
                sub[table][key] = v
                continue
            check = SCHEMA[table].get(key)
            if check is None:
                problems.append((name, "unknown key"))
                continue
            err = check(v)
            if err:
                problems.append((name, err))
            else:
                values[table][key] = v

    c = values["consul"]
    consul_kw = dict(c)
    if "checks" in consul_kw:
        consul_kw["checks"] = tuple(consul_kw["checks"])
    consul = ConsulConfig(**consul_kw)
    if consul.token and consul.token_file:
        problems.append(("consul.token_file", "set either token or token_file, not both"))
    if consul.token_file and not os.path.isfile(consul.token_file):
        problems.append(("consul.token_file", "no such file"))
    if consul.scheme == "https":
        for k in ("ca_file", "cert_file", "key_file"):
            p = getattr(consul, k)
            if p and not os.path.isfile(p):
                problems.append((f"consul.{k}", "no such file"))
    if bool(consul.cert_file) != bool(consul.key_file):
        problems.append(("consul.key_file", "cert_file and key_file go together"))

    targets = {**values["target"]}
    cfg = Config(
        node_name=values["node"].get("name", ""),
        consul=consul,
        ceph=CephConfig(**values["ceph"]),
        state_dir=values["state"].get("dir", Config.state_dir),
        target=PluginTable(targets.get("backend", "tgt"), sub["target"]),
        port=targets.get("port", 3260),
        stop_time=targets.get("stop_time", Config.stop_time),
        network=PluginTable(values["network"].get("backend", "iproute"), sub["network"]),
        down_time=values["network"].get("down_time", Config.down_time),
        catalog=PluginTable(values["catalog"].get("backend", "rbd"), sub["catalog"]),
        watchdog=PluginTable(values["watchdog"].get("backend", "guard"), sub["watchdog"]),
        # Ceph-side fencing is on by default where the disks are RBD images read from Ceph
        fencing=PluginTable(values["fencing"].get(
            "backend", "ceph-blocklist" if values["catalog"].get("backend", "rbd") == "rbd" else "none"),
            sub["fencing"]),
        node_weight=values["node"].get("weight", 1.0),
        placement_grace=values["placement"].get("grace", 3.0),
        placement_settle=values["placement"].get("settle", 2.0),
        rebalance_after=values["placement"].get("rebalance_after", Config.rebalance_after),
        max_moves=values["placement"].get("moves", Config.max_moves),
        move_timeout=values["placement"].get("move_timeout", Config.move_timeout),
        metrics_listen=values["metrics"].get("listen", ""),
        log_level=values["log"].get("level", "INFO"),
        log_format=values["log"].get("format", "text"),
        log_audit=values["log"].get("audit", "/dev/log"),
        source=source,
    )
    problems.extend(fencing_problems(cfg))
    for kind in PLUGIN_TABLES:
        ptable: PluginTable = getattr(cfg, kind)
        for name, body in ptable.options.items():
            keys = _plugin_keys(kind, name)
            if keys is None:
                problems.append((f"{kind}.{name}", f"no {kind} plugin named {name!r}"))
                continue
            for k in body:
                if k not in keys:
                    problems.append((f"{kind}.{name}.{k}", "unknown key"))
        if _plugin_keys(kind, ptable.backend) is None:
            from agent import plugins
            problems.append((f"{kind}.backend", f"unknown {kind} plugin {ptable.backend!r}; available: "
                                                f"{', '.join(plugins.available(kind))}"))
    return cfg, problems


PET_BUDGET = 0.25      # a confirmation's pet of the watchdog (the guard's own timeout) in inequality (2)


def serving_bound(cfg: Config) -> tuple[float, str]:
    """S of inequality (1), and its key: how long after the deadline this node has stopped serving."""
    if cfg.fencing.backend != "none":
        return cfg.down_time, "network.down_time"
    return cfg.stop_time, "target.stop_time"


def fencing_problems(cfg: Config) -> list[tuple[str, str]]:
    """The bounds of docs/fencing.md that the configuration alone decides:

    (1) ``fence_after + S < lock_delay``: a node that lost contact has stopped serving (its fencer, or
        the watchdog, acts at ``fence_after`` after the send time of its last good confirmation and needs
        at most S) before any other node can lock its paths (the earliest takeover is that send time plus
        the lock-delay; failure detection is not counted: with gossip broken but RPC working, the session
        can be invalidated right after that confirmation). S is ``network.down_time`` (its floating IPs
        down: initiators reach it no more) when a Ceph-side fence (``[fencing] backend`` not ``none``)
        cuts the old data path off before any takeover, else ``target.stop_time`` (addresses and the data
        path). No HTTP call is on that path, so no HTTP timeout enters it.
    (2) ``fence_after > election_stall + confirm_interval + PET_BUDGET``: confirmations are started every
        interval without waiting for each other, so the first one sent after a Consul leader election
        (at most one interval later) arrives and pets the watchdog before the deadline: an election
        never fences healthy nodes.
    (3) a liveness check or session TTL hands a dead or frozen agent's paths to others; that is safe only
        with a watchdog that stops its data path first, so ``agent_check_ttl``/``session_ttl`` need
        ``[watchdog] backend`` other than ``none``.
    (4) ``[watchdog.device] timeout`` T: the device is pet after each confirmation only while now + T is
        before the deadline, so T < fence_after - confirm_interval - timeout (else it resets the node).
    """
    c = cfg.consul
    out: list[tuple[str, str]] = []
    bound, name = serving_bound(cfg)
    worst = c.fence_after + bound
    if not worst < c.lock_delay:
        out.append(("consul.fence_after",
                    f"fence_after + {name} = {worst:g}s must be below lock_delay = {c.lock_delay:g}s, "
                    "or another node could take the paths while this one still serves them"))
    need = c.election_stall + c.confirm_interval + PET_BUDGET
    if not c.fence_after > need:
        out.append(("consul.fence_after",
                    f"must exceed election_stall + confirm_interval + {PET_BUDGET:g} (watchdog pet) = {need:g}s, "
                    "or a Consul leader election fences healthy nodes"))
    if cfg.fencing.backend == "ceph-blocklist" and "{node}" not in cfg.ceph.data_client_id:
        out.append(("ceph.data_client_id",
                    f"{cfg.ceph.data_client_id!r} has no {{node}}: with ceph-blocklist fencing every gateway's data "
                    "path needs a Ceph client name of its own, or fencing a failed gateway would fence all"))
    if cfg.watchdog.backend == "none":
        for key in ("agent_check_ttl", "session_ttl"):
            if getattr(c, key) > 0:
                out.append((f"consul.{key}",
                            f"needs a watchdog ([watchdog] backend is none): without one, a frozen agent's "
                            "paths would be taken over while its data path still serves them; set it to 0 "
                            "or choose a watchdog"))
    lio = cfg.target.options.get("lio", {}) if cfg.target.backend == "lio" else {}
    ft = lio.get("fence_timeout", 0.25) if isinstance(lio, Mapping) else None   # the lio plugin's default
    if isinstance(ft, (int, float)) and not isinstance(ft, bool) and not ft + cfg.down_time <= cfg.stop_time:
        out.append(("target.lio.fence_timeout",
                    f"{ft:g}s + network.down_time {cfg.down_time:g}s must not exceed target.stop_time "
                    f"{cfg.stop_time:g}s: the fence takes the addresses down, then disables the TPGs within "
                    "fence_timeout, and both must fit the stop time that the lock-delay bound counts"))
    dev = cfg.watchdog.options.get("device", {})
    t = dev.get("timeout", 2) if isinstance(dev, Mapping) else None     # 2: the device plugin's default
    if cfg.watchdog.backend == "device" and isinstance(t, (int, float)) and not isinstance(t, bool):
        room = c.fence_after - c.confirm_interval - c.timeout
        if not t < room:
            out.append(("watchdog.device.timeout",
                        f"{t:g}s must be below fence_after - confirm_interval - timeout = {room:g}s, or the "
                        "device cannot be pet in time and resets the node"))
    return out


def config_path(explicit: str | None) -> tuple[str, bool]:
    """The file to read and whether it was named explicitly."""
    if explicit:
        return explicit, True
    env = os.environ.get("PATHAGENT_CONFIG")
    if env:
        return env, True
    return DEFAULT_PATH, False


FILE_KEY = "(file)"     #: the key of a problem with the file itself (missing, unreadable, not UTF-8, not TOML)


def read(path: str, named: bool = True) -> dict[str, Any] | None:
    """The decoded TOML of ``path``; ``None`` when it does not exist and was not ``named`` (all defaults).
    ``ConfigError`` with one ``(file)`` problem, a single line that names the file (and the line and
    column for bad bytes or bad TOML), when it cannot be read, is not UTF-8 or is not TOML."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if named:
            raise ConfigError([(FILE_KEY, f"{path}: no such file")]) from None
        return None
    except OSError as e:
        raise ConfigError([(FILE_KEY, f"{path}: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([(FILE_KEY, f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} at line {line}, "
                                      f"column {col} (TOML files are UTF-8)")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line L, column C)"
        raise ConfigError([(FILE_KEY, f"{path}: not valid TOML: {' '.join(str(e).split())}")]) from None


def load(explicit: str | None = None) -> Config:
    """The configuration from ``--config``, ``$PATHAGENT_CONFIG`` or the default file (missing: all
    defaults); ``ConfigError`` with every problem (``read``, ``parse``)."""
    path, named = config_path(explicit)
    data = read(path, named)
    return parse(data or {}, path)


def show_key(key: str) -> str:
    """A problem's key the way the file spells it: ``consul.lock_delay`` -> ``[consul] lock_delay``,
    ``target.tgt.io_threads`` -> ``[target.tgt] io_threads``, ``target.tgt`` (a sub-table) ->
    ``[target.tgt]``; ``(file)`` stays as it is."""
    if key.startswith("("):
        return key
    parts = key.split(".")
    table = parts[0]
    if table in PLUGIN_TABLES and len(parts) >= 2 and parts[1] not in SCHEMA.get(table, {}):
        table, parts = f"{table}.{parts[1]}", parts[1:]
    rest = ".".join(parts[1:])
    return f"[{table}] {rest}" if rest else f"[{table}]"


def problem_line(path: str, key: str, message: str) -> str:
    """One problem as one line: ``FILE: [table] key: message`` (a ``(file)`` problem names the file
    itself: ``FILE: not valid TOML: ...``)."""
    if key == FILE_KEY:
        return message if message.startswith(path) else f"{path}: {message}"
    return f"{path}: {show_key(key)}: {message}"
