"""Every value under the prefix, decoded into one immutable ``ClusterView``; and the encoders. Pure.

The key *names* live in ``agent.core.keys``; this module owns the *values* (docs/keys.md lists both):

- disk record ``{prefix}/disks/{id}``: ``{"pool", "image", "rev"?, "stopping"?}`` -> ``DiskRecord``;
- path lock ``{prefix}/disks/{id}/{index}``: empty while free, ``{"node", "session", "since"}`` while held;
  ``"peers"`` (``[[ip, port, local port], ...]``, see ``model.Peer``) in the value of a key released by a
  planned hand-over (the connections its holder had open to the path's IP) and in the lock value of the node
  that took it from there (``decode_peers``: advisory, anything malformed reads as none);
- node record ``{prefix}/nodes/{node}``: ``{"node", "session", "since", "backend", "weight"?, "identity"?}``,
  locked by the node's session while its agent runs; only locked records count as live agents; an
  unlocked record whose value names a session is a node that failed (``NodeRecord.orphaned``), one with an
  empty value stopped in order;
- path lock value of a *free* key: empty after an orderly release; still ``{"node", "session", ...}`` when
  the holder's session ended without releasing it (``PathState.orphan_of``);
- leader ``{prefix}/leader``: ``{"node", "session", "since"}``, locked by the leader's session;
- drain ``{prefix}/drain/{node}``: any value; the key's existence drains the node;
- fenced ``{prefix}/fenced/{node}``: ``{"node", "session", "since", "summary"}``; the key's ModifyIndex
  is what counts;
- move request ``{prefix}/moves/{id}/{index}``: ``{"node": target}``, locked by the requesting CLI's
  session (``Behavior=delete``, so it disappears when that CLI dies); only a locked request counts, so no
  node compares clocks to decide whether a request is still wanted;
- logins ``{prefix}/logins/{node}``: ``{"node", "session", "since", "disks": {id: [iqn, ...]}}``, locked
  by the node's agent session; not part of the ``ClusterView`` (agents ignore it): ``decode_logins`` and
  ``logins_by_disk`` are for the CLI, ``logins_value`` for the agent that publishes it.

``parse_tree`` never raises: a value it cannot decode (not UTF-8, not JSON, nested too deep, too large,
wrong types) is ignored with its key and the reason in ``ClusterView.skipped``, and the rest of the view
is unaffected. A path key or node record keeps counting by its session even when its value is unreadable.
"""
from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from agent.core import keys
from agent.core.model import DiskRecord, NodeRecord, PathKey, PathState, Peer

#: no value of ours is anywhere near this; anything bigger is not ours
MAX_VALUE = 16 * 1024
#: connections recorded per path key (``peers``): more are left out
MAX_PEERS = 64
#: except a logins report, which lists every initiator logged in on a node: up to Consul's own limit on a
#: value (``kv_max_value_size``, 512 KiB; a bigger one is refused by Consul when it is written)
MAX_LOGINS_VALUE = 512 * 1024


@dataclass(frozen=True, slots=True)
class KVEntry:
    """One key as the store returns it (the adapter builds these from Consul's answer)."""

    key: str
    value: bytes | None
    modify_index: int
    create_index: int = 0
    lock_index: int = 0
    session: str | None = None


@dataclass(frozen=True)
class ClusterView:
    """The decoded content of ``{prefix}/`` at one Consul index. Never mutated: a change is a new view."""

    disks: Mapping[str, DiskRecord] = field(default_factory=dict)
    paths: Mapping[PathKey, PathState] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)      # node -> session (locked node records)
    moves: Mapping[PathKey, str] = field(default_factory=dict)  # live move requests: path -> target node
    skipped: tuple[tuple[str, str], ...] = ()                   # (key, why its value was ignored)
    index: int = 0
    records: Mapping[str, NodeRecord] = field(default_factory=dict)   # every node record, locked or not
    leader: str | None = None                   # the session holding {prefix}/leader
    leader_index: int = 0                       # its ModifyIndex (0: the key does not exist)
    leader_orphaned: bool = False               # free, but its value names a session: in its lock-delay
    drained: frozenset[str] = frozenset()
    fenced: Mapping[str, int] = field(default_factory=dict)     # node -> ModifyIndex of its fence record
    move_holders: Mapping[PathKey, str] = field(default_factory=dict)  # live move request -> its session
    stale_moves: Mapping[PathKey, int] = field(default_factory=dict)   # unlocked move keys -> ModifyIndex

    def leader_node(self) -> str | None:
        """The node whose session holds the leader key (``None``: no leader, or not a live agent)."""
        if self.leader is None:
            return None
        return next((n for n, sid in self.nodes.items() if sid == self.leader), None)

    def backends(self) -> Mapping[str, tuple[str, ...]]:
        """The target backends the live agents run: backend -> its nodes (sorted); a record without one is
        left out. More than one entry means multipath sees paths of one disk presented differently (LUN
        number, ALUA groups): a site runs one backend on every gateway."""
        by: dict[str, list[str]] = {}
        for n in sorted(self.nodes):
            rec = self.records.get(n)
            if rec is not None and rec.backend:
                by.setdefault(rec.backend, []).append(n)
        return {b: tuple(ns) for b, ns in sorted(by.items())}

    def held_by(self, session: str | None) -> frozenset[PathKey]:
        """Path keys locked by ``session`` (none for ``None``)."""
        if session is None:
            return frozenset()
        return frozenset(p for p, s in self.paths.items() if s.session == session)

    def free(self) -> frozenset[PathKey]:
        return frozenset(p for p, s in self.paths.items() if s.session is None)


class _Bad(ValueError):
    """A value that is not what its key kind holds."""


def _object(value: bytes | None, limit: int = MAX_VALUE) -> dict[str, Any]:
    """The JSON object in ``value``; ``_Bad`` for anything else. Never lets another exception out."""
    if value is None or value == b"":
        return {}
    if len(value) > limit:
        raise _Bad(f"value of {len(value)} bytes (more than {limit})")
    try:
        doc = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Bad("not UTF-8") from None
    except RecursionError:
        raise _Bad("JSON nested too deeply") from None
    except ValueError:
        raise _Bad("not JSON") from None
    if not isinstance(doc, dict):
        raise _Bad(f"a JSON {type(doc).__name__}, not an object")
    return doc


def _text(doc: Mapping[str, Any], name: str, required: bool = True) -> str:
    v = doc.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v or len(v) > 256:
        raise _Bad(f"{name!r} must be a non-empty string")
    return v


def decode_disk(disk_id: str, value: bytes | None, modify_index: int) -> DiskRecord:
    """A disk record; ``_Bad`` when it does not name a pool and an image."""
    doc = _object(value)
    rev = doc.get("rev", 0)
    if isinstance(rev, bool) or not isinstance(rev, int) or rev < 0:
        raise _Bad("'rev' must be a non-negative integer")
    stopping = doc.get("stopping", False)
    if not isinstance(stopping, bool):
        raise _Bad("'stopping' must be true or false")
    return DiskRecord(disk_id, _text(doc, "pool"), _text(doc, "image"), modify_index, rev, stopping)


def decode_lock_node(value: bytes | None) -> str | None:
    """The node named in a path lock value (``None`` when absent)."""
    node = _object(value).get("node")
    if node is None:
        return None
    if not isinstance(node, str) or not node:
        raise _Bad("'node' must be a non-empty string")
    return node


def decode_peers(value: bytes | None) -> tuple[Peer, ...]:
    """The connections a path key's value records (``"peers"``); advisory, so anything malformed (the value
    or one entry) reads as none rather than as a bad key. At most ``MAX_PEERS``."""
    try:
        raw = _object(value).get("peers", [])
    except _Bad:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_PEERS:
        return ()
    out: list[Peer] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x < 65536 for x in item[1:])):
            return ()
        try:
            ip = str(ipaddress.IPv4Address(item[0]))
        except ValueError:
            return ()
        out.append((ip, item[1], item[2]))
    return tuple(out)


def decode_move(value: bytes | None) -> str:
    return _text(_object(value), "node")


def decode_orphan(value: bytes | None) -> str | None:
    """The node a free path key's value still names (its holder's session ended without a release)."""
    doc = _object(value)
    if not doc.get("session"):
        return None
    return _text(doc, "node")


def decode_record(node: str, e: KVEntry) -> NodeRecord:
    doc = _object(e.value)
    session = doc.get("session", "")
    if not isinstance(session, str):
        raise _Bad("'session' must be a string")
    weight = doc.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000 \
            or not math.isfinite(weight):
        raise _Bad("'weight' must be a number in (0, 1000]")
    identity = doc.get("identity", {})
    if not isinstance(identity, dict):
        raise _Bad("'identity' must be an object")
    backend = doc.get("backend", "")
    return NodeRecord(node, e.modify_index, e.session, session, identity, float(weight),
                      backend if isinstance(backend, str) else "")       # advisory: never rejects a record


def parse_tree(prefix: str, entries: Iterable[KVEntry], index: int = 0) -> ClusterView:
    """The view of ``entries`` (a recursive read of ``{prefix}/``). Pure; never raises."""
    disks: dict[str, DiskRecord] = {}
    paths: dict[PathKey, PathState] = {}
    nodes: dict[str, str] = {}
    moves: dict[PathKey, str] = {}
    move_holders: dict[PathKey, str] = {}
    stale_moves: dict[PathKey, int] = {}
    records: dict[str, NodeRecord] = {}
    drained: set[str] = set()
    fenced: dict[str, int] = {}
    leader: str | None = None
    leader_index = 0
    leader_orphaned = False
    skipped: list[tuple[str, str]] = []
    for e in entries:
        try:
            kind = keys.parse(prefix, e.key)
        except Exception as err:  # noqa: BLE001 - a key we cannot classify is not ours
            skipped.append((e.key[:200], f"unreadable key: {type(err).__name__}"))
            continue
        if kind is None:
            continue
        what, ident = kind
        try:
            if what == "disk" and isinstance(ident, str):
                try:
                    disks[ident] = decode_disk(ident, e.value, e.modify_index)
                except _Bad:
                    # still started: the catalog reports it as unreadable rather than it vanishing
                    disks[ident] = DiskRecord(ident, "", "", e.modify_index)
                    raise
            elif what == "path" and isinstance(ident, PathKey):
                node = None
                paths[ident] = PathState(ident, e.modify_index, e.session, None)
                if e.session:
                    node = decode_lock_node(e.value)
                    paths[ident] = PathState(ident, e.modify_index, e.session, node, None, decode_peers(e.value))
                elif e.value:
                    orphan = decode_orphan(e.value)
                    paths[ident] = PathState(ident, e.modify_index, None, None, orphan,
                                             () if orphan is not None else decode_peers(e.value))
            elif what == "node" and isinstance(ident, str):
                if e.session:
                    nodes[ident] = e.session
                records[ident] = NodeRecord(ident, e.modify_index, e.session)
                records[ident] = decode_record(ident, e)
            elif what == "move" and isinstance(ident, PathKey):
                if e.session:
                    moves[ident] = decode_move(e.value)
                    move_holders[ident] = e.session
                else:
                    stale_moves[ident] = e.modify_index     # its asker is gone (a leader's, after its session)
            elif what == "leader":
                leader, leader_index = e.session, e.modify_index
                leader_orphaned = not e.session and decode_orphan(e.value) is not None
            elif what == "drain" and isinstance(ident, str):
                drained.add(ident)
            elif what == "fenced" and isinstance(ident, str):
                fenced[ident] = e.modify_index
        except _Bad as err:
            skipped.append((e.key, str(err)))
        except Exception as err:  # noqa: BLE001 - no value may wedge the watcher
            skipped.append((e.key, f"{type(err).__name__}"))
    return ClusterView(disks, paths, nodes, moves, tuple(skipped), index, records, leader, leader_index,
                       leader_orphaned, frozenset(drained), fenced, move_holders, stale_moves)


# --- logins reports (not part of the view: the CLI reads them) ----------------------------------------

def _initiator(name: Any) -> bool:
    """An initiator name as a logins report may carry it: a non-empty printable string (an IQN is at most
    223 bytes; 255 leaves room for whatever a backend reports)."""
    return isinstance(name, str) and 0 < len(name) <= 255 and name.isprintable()


def login_sets(disks: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """``disks`` (disk id -> initiator names, as ``TargetBackend.logged_in`` answers) in the form a logins
    report carries: disks with no initiator left out, and only what ``decode_logins`` accepts (a disk id
    that is not one, a name that is not a short printable string, is dropped). Two answers that are equal
    in this form are the same report."""
    out: dict[str, frozenset[str]] = {}
    for d, names in disks.items():
        if not isinstance(d, str) or not keys.DISK_ID_RE.fullmatch(d) or isinstance(names, (str, bytes)):
            continue
        got = frozenset(n for n in names if _initiator(n))
        if got:
            out[d] = got
    return out


def decode_logins(value: bytes | None) -> tuple[str, str, Mapping[str, frozenset[str]]] | None:
    """``(node, session, {disk_id: initiator names})`` of a logins report (disks listed with no initiator
    are left out); ``None`` for anything that is not one (empty, not JSON, wrong types, a bad disk id or
    initiator name, more than ``MAX_LOGINS_VALUE`` bytes). Never raises."""
    try:
        doc = _object(value, MAX_LOGINS_VALUE)
        node, session = _text(doc, "node"), _text(doc, "session")
        disks = doc.get("disks")
        if not isinstance(disks, dict):
            return None
        out: dict[str, frozenset[str]] = {}
        for d, names in disks.items():
            if not keys.DISK_ID_RE.fullmatch(d) or not isinstance(names, list) \
                    or not all(_initiator(n) for n in names):
                return None
            if names:
                out[d] = frozenset(names)
        return node, session, out
    except Exception:  # noqa: BLE001 - garbage is not a report (a _Bad, or anything a value may provoke)
        return None


def logins_by_disk(prefix: str, entries: Iterable[KVEntry]) -> dict[str, dict[str, frozenset[str]]]:
    """Who is logged in where, from the keys under ``keys.logins_prefix(prefix)`` (other keys are
    ignored): ``{disk_id: {node: initiator names}}``, only disks with someone logged in. Only a report
    locked by a session counts (``KVEntry.session`` set): the report of an agent that died or stopped is
    unlocked and says nothing. The node is the key's (``{prefix}/logins/{node}``), whatever the value
    names; the lock counts, not the session the value names. A value ``decode_logins`` rejects is skipped.
    Pure; never raises."""
    head = keys.logins_prefix(prefix)
    out: dict[str, dict[str, frozenset[str]]] = {}
    for e in entries:
        if not e.session or not isinstance(e.key, str) or not e.key.startswith(head):
            continue
        node = e.key[len(head):]
        if not node or "/" in node:
            continue
        report = decode_logins(e.value)
        if report is None:
            continue
        for d, names in report[2].items():
            out.setdefault(d, {})[node] = names
    return out


# --- encoders (the writers' side) ------------------------------------------------------------------------

def _dump(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _since(now: float) -> float:
    return round(now, 3) if math.isfinite(now) else 0.0


def _peers(peers: Iterable[Peer]) -> list[list[Any]]:
    return [[ip, port, local] for ip, port, local in sorted(set(peers))[:MAX_PEERS]]


def lock_value(node: str, session: str, now: float, peers: Iterable[Peer] = ()) -> bytes:
    """The value of a path key we lock (``now``: the writer's wall clock, for people; nobody compares it);
    ``peers``: the connections the released key recorded (kept for our ``AddressUp``)."""
    d: dict[str, Any] = {"node": node, "session": session, "since": _since(now)}
    if peers:
        d["peers"] = _peers(peers)
    return _dump(d)


def release_value(peers: Iterable[Peer] = ()) -> bytes:
    """The value a path key is released with: empty (an orderly release names no session), or the
    connections to the path's IP that the next owner should tickle."""
    p = _peers(peers)
    return _dump({"peers": p}) if p else b""


def node_value(node: str, session: str, now: float, backend: str, weight: float = 1.0,
               identity: Mapping[str, Any] | None = None) -> bytes:
    d: dict[str, Any] = {"node": node, "session": session, "since": _since(now), "backend": backend}
    if weight != 1.0:
        d["weight"] = weight
    if identity:
        d["identity"] = dict(identity)
    return _dump(d)


def leader_value(node: str, session: str, now: float) -> bytes:
    return _dump({"node": node, "session": session, "since": _since(now)})


def fenced_value(node: str, session: str, now: float, summary: str) -> bytes:
    return _dump({"node": node, "session": session, "since": _since(now), "summary": summary[:500]})


def drain_value(now: float) -> bytes:
    return _dump({"since": _since(now)})


def disk_value(pool: str, image: str, rev: int = 0, stopping: bool = False) -> bytes:
    d: dict[str, Any] = {"pool": pool, "image": image}
    if rev:
        d["rev"] = rev
    if stopping:
        d["stopping"] = True
    return _dump(d)


def move_value(node: str) -> bytes:
    return _dump({"node": node})


def logins_value(node: str, session: str, now: float, disks: Mapping[str, Iterable[str]]) -> bytes:
    """The value of ``{prefix}/logins/{node}``: ``{"node", "session", "since", "disks": {id: [iqn, ...]}}``,
    ``disks`` as ``login_sets`` leaves it, each list sorted (the same logins always encode the same way,
    but for ``since``: the writer's wall clock, for people)."""
    sets = login_sets(disks)
    return _dump({"node": node, "session": session, "since": _since(now),
                  "disks": {d: sorted(sets[d]) for d in sorted(sets)}})


def overlay(view: ClusterView, own: Mapping[PathKey, PathState], node: str = "",
            node_session: str | None = None, leader: str | None = None,
            moves: Mapping[PathKey, tuple[str, str] | None] | None = None) -> ClusterView:
    """``view`` with our own writes that it does not show yet (a lock or release we made, recognised by
    its ModifyIndex being newer than the view's; the leader key we took; move requests we made or ended),
    so the next plan does not repeat them before the watch catches up. Paths the view no longer has are
    not brought back. Pure."""
    paths = dict(view.paths)
    for p, st in own.items():
        cur = paths.get(p)
        if cur is not None and cur.modify_index < st.modify_index:
            paths[p] = st
    nodes = dict(view.nodes)
    if node and node_session is not None and node not in nodes:
        nodes[node] = node_session
    out = replace(view, paths=paths, nodes=nodes)
    if leader is not None and view.leader is None:
        out = replace(out, leader=leader)
    if moves:
        mv, holders = dict(view.moves), dict(view.move_holders)
        for p, m in moves.items():
            if m is None:
                mv.pop(p, None)
                holders.pop(p, None)
            else:
                mv[p], holders[p] = m
        out = replace(out, moves=mv, move_holders=holders)
    return out
