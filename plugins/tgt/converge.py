"""What to tell tgtd, as data: pure functions from (intent, tgtd's state) to a list of operations.

``ops_for`` makes one disk's target match its ``Entry`` (dropping the sessions its ACL no longer admits, and
reopening the LUN when the disk's size changed); ``revoke_ops`` closes the sessions an ACL does not admit;
``prune_ops`` removes what the record no longer needs; ``served``, ``applied`` and ``logins`` compare the
record with tgtd's state. No function here has a side effect on anything but its arguments: the backend
runs the ops in order (``TgtBackend._run``), and ``apply_ops`` changes the backend's cached view of tgtd's
configuration the way those ops, once they all succeeded, changed tgtd (``additive`` tells which op lists
the backend plans from that view). See docs/backend-tgt.md.
"""
from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from agent.core.model import PathKey
from agent.errors import PermanentBackendError
from plugins.tgt.record import Entry, passwords
from agent.core.targetspec import portal_of
from plugins.tgt.tgtadm import TgtLun, TgtState, TgtTarget

LUN = 1
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")


@dataclass(frozen=True)
class Settings:
    """What the ops depend on besides the intent: the iSCSI port, the fixed ``listen`` address (``""``:
    none), the INQUIRY strings and bs_rbd's ``--bsopts``."""

    port: int = 3260
    listen: str = ""
    vendor_id: str = "PATHAGNT"
    product_id: str = "RBD"
    product_rev: str = "0001"
    bsopts: str = ""


# ---------------------------------------------------------------------------------------------- the ops

@dataclass(frozen=True)
class Probe:
    """Ask the host whether Ceph answers and the image exists (before bs_rbd would block tgtd on it)."""

    pool: str
    image: str

    @property
    def what(self) -> str:
        return f"probe Ceph for {self.pool}/{self.image}"


@dataclass(frozen=True)
class Call:
    """One plain tgtadm call. ``slow``: it may wait for Ceph (a LUN add)."""

    what: str
    args: tuple[str, ...]
    slow: bool = False


@dataclass(frozen=True)
class NewAccount:
    """Create a CHAP account (the password goes on tgtadm's argv; it is never in ``what`` or ``repr``)."""

    user: str
    password: str = field(repr=False)

    @property
    def what(self) -> str:
        return f"create CHAP account {self.user!r}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--mode", "account", "--op", "new", "--user", self.user, "--password", self.password)


@dataclass(frozen=True)
class AddPortal:
    portal: str

    @property
    def what(self) -> str:
        return f"add portal {self.portal}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--mode", "portal", "--op", "new", "--param", f"portal={self.portal}")


@dataclass(frozen=True)
class DeletePortal:
    """Delete a portal; one that is already gone is fine."""

    portal: str

    @property
    def what(self) -> str:
        return f"delete portal {self.portal}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--mode", "portal", "--op", "delete", "--param", f"portal={self.portal}")


@dataclass(frozen=True)
class DeleteTarget:
    """Delete a target with ``--force`` (drops its sessions); retried while tgt calls it busy."""

    tid: int
    name: str

    @property
    def what(self) -> str:
        return f"delete target {self.name}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--mode", "target", "--op", "delete", "--force", "--tid", str(self.tid))


@dataclass(frozen=True)
class CloseConnection:
    """Close one connection of a session (``--mode conn --op delete``), which ends a session of one
    connection. tgt checks its ACL only at login: unbinding an initiator leaves its sessions running. A
    connection, session or target that is already gone is fine."""

    tid: int
    sid: int
    cid: int
    initiator: str

    @property
    def what(self) -> str:
        return f"close session {self.sid} ({self.initiator}) on tid {self.tid}"

    @property
    def args(self) -> tuple[str, ...]:
        return ("--mode", "conn", "--op", "delete", "--tid", str(self.tid), "--sid", str(self.sid),
                "--cid", str(self.cid))


Op = Union[Probe, Call, NewAccount, AddPortal, DeletePortal, DeleteTarget, CloseConnection]
_TargetLookup = Callable[[str], TgtTarget]


# ---------------------------------------------------------------------------------------------- comparing

def lun_ok(entry: Entry, t: TgtTarget | None) -> bool:
    lun = t.luns.get(LUN) if t else None
    return lun is not None and lun.bstype == "rbd" and lun.path == f"{entry.pool}/{entry.image}"


def served(record: Mapping[str, Entry], state: TgtState, port: int) -> frozenset[PathKey]:
    """Recorded paths that tgtd serves: the disk's target with LUN 1 on its image, and the path's portal."""
    out: set[PathKey] = set()
    for d, e in record.items():
        if lun_ok(e, state.targets.get(e.iqn)):
            out.update(PathKey(d, i) for i, ip in e.paths.items() if portal_of(ip, port) in state.portals)
    return frozenset(out)


def applied(entry: Entry, state: TgtState, port: int) -> bool:
    """Whether tgtd already has ``entry`` exactly (secrets are trusted to the record), with no session its
    ACL does not admit (one left by an export interrupted between the unbind and the close)."""
    t = state.targets.get(entry.iqn)
    if t is None or not lun_ok(entry, t):
        return False
    lun = t.luns[LUN]
    return (lun.scsi_sn == entry.serial and lun.scsi_id == entry.serial and t.acl == entry.acl()
            and t.accounts_in == {c.user for c, out in entry.accounts() if not out}
            and t.accounts_out == {c.user for c, out in entry.accounts() if out}
            and all(portal_of(ip, port) in state.portals for ip in entry.paths.values())
            and not revoke_ops(entry, t))


def logins(record: Mapping[str, Entry], targets: Mapping[str, TgtTarget]) -> dict[str, frozenset[str]]:
    """Initiator names with a session on each recorded disk's target, by disk id; disks without one (or
    without a target) are left out."""
    out: dict[str, frozenset[str]] = {}
    for d, e in record.items():
        t = targets.get(e.iqn)
        names = frozenset(n.initiator for n in t.it_nexus if n.initiator) if t is not None else frozenset()
        if names:
            out[d] = names
    return out


def wanted_portals(record: Mapping[str, Entry], s: Settings) -> set[str]:
    out = {portal_of(ip, s.port) for e in record.values() for ip in e.paths.values()}
    if s.listen:
        out.add(portal_of(s.listen, s.port))
    return out


# ---------------------------------------------------------------------------------------------- planning

def _acl_kind(who: str) -> str:
    return "--initiator-address" if who == "ALL" or not who.startswith(_NAME_PREFIXES) else "--initiator-name"


def _address_matches(rule: str, address: str) -> bool:
    """tgt's ``ip_match``: an address rule is one address or ``addr/prefix`` (IPv6 optionally in
    brackets), compared with the connection's peer address. Unparsable: no match."""
    r = rule.strip()
    if r.startswith("["):
        host, _, rest = r[1:].partition("]")
        r = host + rest
    try:
        peer = ipaddress.ip_address(address.strip("[]"))
        net = ipaddress.ip_network(r, strict=False)
    except ValueError:
        return False
    return peer.version == net.version and peer in net


def admits(acl: set[str], initiator: str, address: str) -> bool:
    """Whether tgt would admit a login of ``initiator`` from ``address`` under ``acl``, as its login does
    (``ip_acl || iqn_acl``): ``ALL``, the initiator's name, or an address rule matching ``address``."""
    if "ALL" in acl:
        return True
    for who in acl:
        if _acl_kind(who) == "--initiator-name":
            if who == initiator:
                return True
        elif _address_matches(who, address):
            return True
    return False


def revoke_ops(entry: Entry, t: TgtTarget | None) -> list[Op]:
    """Close every connection of target ``t`` that ``entry``'s ACL does not admit (its initiator would be
    refused if it logged in now); the sessions of admitted initiators are left alone. Pure."""
    if t is None:
        return []
    acl = entry.acl()
    return [CloseConnection(t.tid, n.sid, c.cid, n.initiator) for n in sorted(t.it_nexus, key=lambda n: n.sid)
            for c in n.connections if not admits(acl, n.initiator, c.address)]


def narrowed(entry: Entry, state: TgtState) -> bool:
    """Whether exporting ``entry`` takes an ACL rule away from its existing target (sessions may then have
    to go, including one whose login completed while the ACL changed)."""
    t = state.targets.get(entry.iqn)
    return t is not None and bool(t.acl - entry.acl())


def needs_reopen(entry: Entry, state: TgtState, prev: Entry | None) -> bool:
    """The target serves the disk's image, and the size it was opened with (``prev.size``) is known and is
    not ``entry.size``: bs_rbd reads the image's size only when it opens the LUN."""
    t = state.targets.get(entry.iqn)
    return (prev is not None and prev.size > 0 and entry.size > 0 and prev.size != entry.size
            and t is not None and lun_ok(entry, t))


def _reopen_ops(entry: Entry, st: TgtState, prev: Entry, record: Mapping[str, Entry], s: Settings) -> list[Op]:
    """Open the LUN again (so that tgt reports the new size) by re-creating the target. tgt has no safe
    in-place reopen of a non-removable LU: ``--params path=`` closes the image while worker threads may
    still use it, and deleting/re-adding LUN 1 lets commands meet LUN-not-supported. So: the probe; the
    portals of this disk's paths (a reconnect is refused, and retried, rather than logging in to a target
    without its LUN); every connection of the target (no new command, so its in-flight ones drain); the
    target (``--force``); then the target as new; its portals last."""
    t = st.targets[entry.iqn]
    probe = Probe(entry.pool, entry.image)
    listen = {portal_of(s.listen, s.port)} if s.listen else set()
    mine = {portal_of(ip, s.port) for ip in set(prev.paths.values()) | set(entry.paths.values())}
    gone = sorted((mine & st.portals) - listen)
    ops: list[Op] = [probe, *(DeletePortal(p) for p in gone)]
    ops += [CloseConnection(t.tid, n.sid, c.cid, n.initiator) for n in sorted(t.it_nexus, key=lambda n: n.sid)
            for c in n.connections]
    ops.append(DeleteTarget(t.tid, entry.iqn))
    del st.targets[entry.iqn]
    st.portals -= set(gone)
    again = ops_for(entry, st, prev, record, s)    # copies st again: st is not the caller's state
    return ops + [op for op in again if op != probe]


def ops_for(entry: Entry, state: TgtState, prev: Entry | None, record: Mapping[str, Entry],
            s: Settings = Settings()) -> list[Op]:
    """The ops that make tgtd's target for ``entry`` match it. ``state``: tgtd's state now (with the
    account list and the sessions); ``prev``: the entry the record held before (it tells whether a CHAP
    password or the size changed); ``record``: every recorded disk, ``entry`` included. Order: Ceph probe,
    target, LUN, identity, ACL (allow before disallow), closing the connections the ACL no longer admits,
    CHAP (applies at the next login), portals. A changed size re-creates the target (``_reopen_ops``).
    ``PermanentBackendError`` when the target's LUN 1 is another image. Pure: ``state`` is not modified.
    Its cost does not grow with the targets tgtd has (but for ``free_tid`` and C-level copies of the target
    dict and the portal set): only the targets it changes are copied (``_own``)."""
    st = _working_copy(state)
    ops: list[Op] = []
    t = _own(st, state, entry.iqn)
    lun = t.luns.get(LUN) if t is not None else None
    if lun is not None and not lun_ok(entry, t):
        raise PermanentBackendError(f"disk {entry.disk}: target {entry.iqn} serves {lun.path or lun.kind} "
                                    f"as LUN {LUN}, not {entry.pool}/{entry.image}; unexport it first")
    if prev is not None and needs_reopen(entry, st, prev):
        return _reopen_ops(entry, st, prev, record, s)
    if t is None or lun is None:
        # before anything else: bs_rbd would block tgtd's event loop while Ceph does not answer
        ops.append(Probe(entry.pool, entry.image))
    if t is None:
        t = TgtTarget(tid=st.free_tid(), name=entry.iqn)
        st.targets[entry.iqn] = t
        ops.append(Call(f"create target {entry.iqn}",
                        ("--mode", "target", "--op", "new", "--tid", str(t.tid), "--targetname", entry.iqn)))
    tid = str(t.tid)
    if lun is None:
        lun = TgtLun(lun=LUN, bstype="rbd", path=f"{entry.pool}/{entry.image}")
        t.luns[LUN] = lun
        ops.append(Call(f"add LUN {entry.pool}/{entry.image} to {entry.iqn}",
                        ("--mode", "logicalunit", "--op", "new", "--tid", tid, "--lun", str(LUN), "--bstype", "rbd",
                         "--backing-store", f"{entry.pool}/{entry.image}", "--bsopts", s.bsopts), slow=True))
    if lun.scsi_sn != entry.serial or lun.scsi_id != entry.serial:
        params = (f"vendor_id={s.vendor_id},product_id={s.product_id},product_rev={s.product_rev},"
                  f"scsi_sn={entry.serial},scsi_id={entry.serial}")
        ops.append(Call(f"set identity of {entry.iqn}", ("--mode", "logicalunit", "--op", "update", "--tid", tid,
                                                         "--lun", str(LUN), "--params", params)))
    want = entry.acl()
    for who in sorted(want - t.acl):
        ops.append(Call(f"allow {who} on {entry.iqn}", ("--mode", "target", "--op", "bind", "--tid", tid,
                                                        _acl_kind(who), who)))
    for who in sorted(t.acl - want):
        ops.append(Call(f"disallow {who} on {entry.iqn}", ("--mode", "target", "--op", "unbind", "--tid", tid,
                                                           _acl_kind(who), who)))
    t.acl = set(want)
    ops += revoke_ops(entry, t)
    ops += _account_ops(entry, t, st, prev, record, state)
    for ip in sorted(set(entry.paths.values())):
        p = portal_of(ip, s.port)
        if p not in st.portals:
            ops.append(AddPortal(p))
            st.portals.add(p)
    return ops


def _working_copy(state: TgtState) -> TgtState:
    """A copy of ``state`` that ``ops_for`` may change: its own target dict, portal set and account set;
    the targets themselves are shared with ``state`` until ``_own`` copies one."""
    return TgtState(targets=dict(state.targets), portals=set(state.portals),
                    accounts=None if state.accounts is None else set(state.accounts))


def _own(st: TgtState, state: TgtState, iqn: str) -> TgtTarget | None:
    """Target ``iqn`` of the working copy ``st``, copied first if it is still ``state``'s own object."""
    t = st.targets.get(iqn)
    if t is not None and t is state.targets.get(iqn):
        t = copy.deepcopy(t)
        st.targets[iqn] = t
    return t


def _account_ops(entry: Entry, t: TgtTarget, st: TgtState, prev: Entry | None,
                 record: Mapping[str, Entry], state: TgtState | None = None) -> list[Op]:
    """CHAP: an account whose password changed (or is unknown) is deleted and created again, which unbinds
    it everywhere, so it is bound again to every recorded target that uses it; tgt allows one outgoing
    account per target. Mutates ``t`` and ``st`` (the caller's copies; another target of ``st`` is copied
    before it changes while it is still ``state``'s)."""
    ops: list[Op] = []
    if not entry.accounts() and not t.accounts_in and not t.accounts_out:
        return ops
    known = passwords({d: e for d, e in record.items() if d != entry.disk}) if entry.accounts() else {}
    if prev is not None:
        known.update({c.user: c.password for c, _ in prev.accounts()})
    accounts = st.accounts if st.accounts is not None else set()
    base = state if state is not None else st

    def bind(target: TgtTarget, user: str, outgoing: bool) -> None:
        have = target.accounts_out if outgoing else target.accounts_in
        if user in have:
            return
        if outgoing:
            for old in sorted(target.accounts_out):
                ops.append(_unbind(target, old, True))
            target.accounts_out.clear()
        ops.append(Call(f"bind CHAP account {user!r} to {target.name}",
                        ("--mode", "account", "--op", "bind", "--tid", str(target.tid), "--user", user)
                        + (("--outgoing",) if outgoing else ())))
        have.add(user)

    for c, outgoing in entry.accounts():
        if c.user in accounts and known.get(c.user) != c.password:
            ops.append(Call(f"replace CHAP account {c.user!r}", ("--mode", "account", "--op", "delete",
                                                                 "--user", c.user)))
            accounts.discard(c.user)
            for name in [n for n, tt in st.targets.items() if c.user in tt.accounts_in | tt.accounts_out]:
                tt = _own(st, base, name)
                assert tt is not None
                tt.accounts_in.discard(c.user)
                tt.accounts_out.discard(c.user)
        if c.user not in accounts:
            ops.append(NewAccount(c.user, c.password))
            accounts.add(c.user)
            for e in record.values():
                if e.disk == entry.disk or e.iqn not in st.targets or not any(
                        oc.user == c.user for oc, _ in e.accounts()):
                    continue
                other = _own(st, base, e.iqn)
                assert other is not None
                for oc, oout in e.accounts():
                    if oc.user == c.user:
                        bind(other, oc.user, oout)
        bind(t, c.user, outgoing)
    want_in = {c.user for c, out in entry.accounts() if not out}
    want_out = {c.user for c, out in entry.accounts() if out}
    for user in sorted(t.accounts_in - want_in):
        ops.append(_unbind(t, user, False))
        t.accounts_in.discard(user)
    for user in sorted(t.accounts_out - want_out):
        ops.append(_unbind(t, user, True))
        t.accounts_out.discard(user)
    st.accounts = accounts
    return ops


def _unbind(t: TgtTarget, user: str, outgoing: bool) -> Call:
    return Call(f"unbind CHAP account {user!r}", ("--mode", "account", "--op", "unbind", "--tid", str(t.tid),
                                                  "--user", user) + (("--outgoing",) if outgoing else ()))


def prune_ops(state: TgtState, record: Mapping[str, Entry], s: Settings = Settings()) -> list[Op]:
    """The ops that remove from tgtd what ``record`` does not need: targets, then portals, then (when
    ``state`` has the account list) accounts. tgtd is ours alone. Pure."""
    iqns = {e.iqn for e in record.values()}
    ops: list[Op] = [DeleteTarget(t.tid, name) for name, t in sorted(state.targets.items()) if name not in iqns]
    ops += [DeletePortal(p) for p in sorted(state.portals - wanted_portals(record, s))]
    users = set(passwords(record))
    ops += [Call(f"delete CHAP account {u!r}", ("--mode", "account", "--op", "delete", "--user", u))
            for u in sorted((state.accounts or set()) - users)]
    return ops


# ---------------------------------------------------------------------------------------------- the cached view

#: (mode, op) of the plain calls that only add to tgtd's configuration (and change no session)
_ADDING = {("target", "new"), ("logicalunit", "new"), ("logicalunit", "update"), ("target", "bind"),
           ("account", "bind")}


def _argmap(args: Sequence[str]) -> dict[str, str]:
    """``--key value`` pairs of a tgtadm argv (a flag without a value maps to ``""``)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        key = args[i]
        if key.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key[2:]] = args[i + 1]
            i += 2
        else:
            out[key.lstrip("-")] = ""
            i += 1
    return out


def additive(ops: Sequence[Op]) -> bool:
    """Whether ``ops`` only add to tgtd: a target, its LUN, its identity, an ACL entry, a CHAP account or
    its binding, a portal. Nothing of that depends on or changes a session, so the backend may plan such
    ops from its cached view of tgtd's configuration; anything else (a delete, an unbind, closing a
    session, re-creating a target) is planned from a fresh ``tgtadm --op show``."""
    for op in ops:
        if isinstance(op, (Probe, NewAccount, AddPortal)):
            continue
        if not isinstance(op, Call):
            return False
        a = _argmap(op.args)
        if (a.get("mode", ""), a.get("op", "")) not in _ADDING:
            return False
    return True


def _default_lun(tid: int, lun: int, kind: str, bstype: str, path: str) -> TgtLun:
    """A LUN as tgt creates it (``tgt_device_create``: the default ``scsi_id``/``scsi_sn`` from tid and
    LUN)."""
    return TgtLun(lun=lun, kind=kind, scsi_id=f"IET     {tid:04x}{lun:04x}", scsi_sn=f"beaf{tid}{lun}",
                  bstype=bstype, path=path)


def apply_ops(state: TgtState, ops: Sequence[Op]) -> None:
    """Change ``state`` as tgtd changed when every op of ``ops`` succeeded (in order): targets (a new one
    with tgt's controller LUN 0), LUNs, identities, ACLs, accounts and their bindings, portals, and the
    sessions closed. Mutates ``state`` (the backend's cached view); the cost is per op, not per target,
    except for an op on a target that ``ops`` did not create (a lookup by tid) and an account delete
    (unbound everywhere). ``ValueError`` for an op it cannot model: the backend then forgets its view."""
    by_tid: dict[int, TgtTarget] = {}

    def target(tid_s: str) -> TgtTarget:
        tid = int(tid_s)
        t = by_tid.get(tid)
        if t is None:
            t = next((x for x in state.targets.values() if x.tid == tid), None)
            if t is None:
                raise ValueError(f"no target with tid {tid} in the view")
            by_tid[tid] = t
        return t

    for op in ops:
        if isinstance(op, Probe):
            continue
        if isinstance(op, AddPortal):
            state.portals.add(op.portal)
        elif isinstance(op, DeletePortal):
            state.portals.discard(op.portal)
        elif isinstance(op, NewAccount):
            if state.accounts is not None:
                state.accounts.add(op.user)
        elif isinstance(op, DeleteTarget):
            state.targets.pop(op.name, None)
            by_tid.pop(op.tid, None)
        elif isinstance(op, CloseConnection):
            t = next((x for x in state.targets.values() if x.tid == op.tid), None)
            if t is not None:
                for n in t.it_nexus:
                    if n.sid == op.sid:
                        n.connections = [c for c in n.connections if c.cid != op.cid]
                t.it_nexus = [n for n in t.it_nexus if n.sid != op.sid or n.connections]
        elif isinstance(op, Call):
            _apply_call(state, _argmap(op.args), target, by_tid)
        else:                                                   # pragma: no cover - Op is a closed union
            raise ValueError(f"cannot model {op!r}")


def _apply_call(state: TgtState, a: Mapping[str, str], target: _TargetLookup, by_tid: dict[int, TgtTarget]) -> None:
    mode, what = a.get("mode", ""), a.get("op", "")
    if (mode, what) == ("target", "new"):
        tid = int(a["tid"])
        t = TgtTarget(tid=tid, name=a["targetname"])
        t.luns[0] = _default_lun(tid, 0, "controller", "null", "None")
        state.targets[t.name] = t
        by_tid[tid] = t
    elif (mode, what) == ("logicalunit", "new"):
        t = target(a["tid"])
        lun = int(a["lun"])
        t.luns[lun] = _default_lun(t.tid, lun, "disk", a.get("bstype", ""), a.get("backing-store", ""))
    elif (mode, what) == ("logicalunit", "update"):
        lun_ = target(a["tid"]).luns.get(int(a["lun"]))
        if lun_ is None:
            raise ValueError(f"no LUN {a['lun']} on tid {a['tid']} in the view")
        for kv in a.get("params", "").split(","):
            k, _, v = kv.partition("=")
            if k == "scsi_sn":
                lun_.scsi_sn = v
            elif k == "scsi_id":
                lun_.scsi_id = v
    elif mode == "target" and what in ("bind", "unbind"):
        t = target(a["tid"])
        who = a.get("initiator-name", a.get("initiator-address"))
        if who is None:
            raise ValueError("an ACL call without an initiator")
        if what == "bind":
            t.acl.add(who)
        else:
            t.acl.discard(who)
    elif mode == "account" and what in ("bind", "unbind"):
        t = target(a["tid"])
        have = t.accounts_out if "outgoing" in a else t.accounts_in
        if what == "bind":
            have.add(a["user"])
        else:
            have.discard(a["user"])
    elif (mode, what) == ("account", "delete"):
        user = a["user"]
        if state.accounts is not None:
            state.accounts.discard(user)
        for t in state.targets.values():                       # tgt unbinds a deleted account everywhere
            t.accounts_in.discard(user)
            t.accounts_out.discard(user)
    else:
        raise ValueError(f"cannot model tgtadm --mode {mode} --op {what}")


def configuration(state: TgtState) -> TgtState:
    """``state`` without its sessions (what the cached view keeps: the backend is the only writer of its
    tgtd's configuration, but initiators log in and out as they like)."""
    out = copy.deepcopy(state)
    for t in out.targets.values():
        t.it_nexus = []
    return out
