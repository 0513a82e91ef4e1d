"""The tgt backend's op lists, table-tested without tgtd: ``ops_for`` (target, LUN, identity, ACL, closing
revoked sessions, CHAP, portals, re-creating the target for a new size), ``prune_ops``, ``served``,
``applied``, ``admits`` and ``logins``; the backend's cached view (``apply_ops``, ``additive``,
``configuration``) and its record journal (``replay``, ``RecordStore``)."""
from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path
from typing import Iterable

import pytest

from agent.core.model import Chap, PathKey
from agent.errors import PermanentBackendError
from plugins.tgt.backend import RecordStore, journal_line, replay, tag_of
from plugins.tgt.converge import (AddPortal, Call, CloseConnection, DeletePortal, DeleteTarget, NewAccount, Op, Probe,
                                  Settings, additive, admits, applied, apply_ops, configuration, logins, narrowed,
                                  needs_reopen, ops_for, prune_ops, revoke_ops, served)
from plugins.tgt.record import Entry, RecordFile, Stored
from plugins.tgt.tgtadm import (TgtConnection, TgtLun, TgtSession, TgtState, TgtTarget, parse_portals,
                                parse_targets)

INI = "iqn.2016-05.io.pathagent.test:ini-a"
OTHER = "iqn.2016-05.io.pathagent.test:ini-b"
S = Settings(port=3260, bsopts="conf=/etc/ceph/ceph.conf;id=admin")
IQN = "iqn.2016-05.io.pathagent:d1"
SERIAL = "5f0c1e2a-0000-4000-8000-00000000000a"
OLD, NEW = 64 << 20, 96 << 20


def entry(disk: str = "d1", iqn: str = IQN, initiators: tuple[str, ...] | None = (INI,), chap: Chap | None = None,
          mutual: Chap | None = None, paths: dict[int, str] | None = None, image: str = "img-d1",
          size: int = OLD) -> Entry:
    return Entry(disk=disk, iqn=iqn, pool="rbd", image=image, serial=SERIAL, initiators=initiators, chap=chap,
                 mutual_chap=mutual, paths={1: "10.0.0.1"} if paths is None else paths, size=size)


def sess(sid: int, initiator: str, ip: str = "198.18.3.1", cid: int = 0) -> TgtSession:
    return TgtSession(sid=sid, initiator=initiator, connections=[TgtConnection(cid, ip)])


def target(tid: int = 1, iqn: str = IQN, acl: Iterable[str] = (INI,), ins: Iterable[str] = (),
           outs: Iterable[str] = (), image: str | None = "rbd/img-d1", serial: str = SERIAL,
           sessions: Iterable[TgtSession] = ()) -> TgtTarget:
    luns = {0: TgtLun(0, "controller", bstype="null", path="None")}
    if image is not None:
        luns[1] = TgtLun(1, "disk", scsi_id=serial, scsi_sn=serial, bstype="rbd", path=image)
    return TgtTarget(tid=tid, name=iqn, luns=luns, acl=set(acl), accounts_in=set(ins), accounts_out=set(outs),
                     it_nexus=list(sessions))


def close(sid: int, initiator: str, tid: int = 1, cid: int = 0) -> CloseConnection:
    return CloseConnection(tid, sid, cid, initiator)


def state(*targets: TgtTarget, portals: Iterable[str] = ("10.0.0.1:3260",),
          accounts: Iterable[str] = ()) -> TgtState:
    return TgtState(targets={t.name: t for t in targets}, portals=set(portals), accounts=set(accounts))


def bind(user: str, tid: int = 1, iqn: str = IQN, outgoing: bool = False) -> Call:
    return Call(f"bind CHAP account {user!r} to {iqn}", ("--mode", "account", "--op", "bind", "--tid", str(tid),
                                                         "--user", user) + (("--outgoing",) if outgoing else ()))


def unbind(user: str, tid: int = 1, outgoing: bool = False) -> Call:
    return Call(f"unbind CHAP account {user!r}", ("--mode", "account", "--op", "unbind", "--tid", str(tid),
                                                  "--user", user) + (("--outgoing",) if outgoing else ()))


def allow(who: str, kind: str = "--initiator-name", tid: int = 1) -> Call:
    return Call(f"allow {who} on {IQN}", ("--mode", "target", "--op", "bind", "--tid", str(tid), kind, who))


def disallow(who: str, kind: str = "--initiator-name", tid: int = 1) -> Call:
    return Call(f"disallow {who} on {IQN}", ("--mode", "target", "--op", "unbind", "--tid", str(tid), kind, who))


def delete_account(user: str, what: str = "replace") -> Call:
    return Call(f"{what} CHAP account {user!r}", ("--mode", "account", "--op", "delete", "--user", user))


def new_target_ops(tid: int) -> list[Op]:
    return [
        Probe("rbd", "img-d1"),
        Call(f"create target {IQN}", ("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", IQN)),
        Call(f"add LUN rbd/img-d1 to {IQN}", ("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1",
                                              "--bstype", "rbd", "--backing-store", "rbd/img-d1",
                                              "--bsopts", "conf=/etc/ceph/ceph.conf;id=admin"), slow=True),
        Call(f"set identity of {IQN}", ("--mode", "logicalunit", "--op", "update", "--tid", str(tid), "--lun", "1",
                                        "--params", "vendor_id=PATHAGNT,product_id=RBD,product_rev=0001,"
                                                    f"scsi_sn={SERIAL},scsi_id={SERIAL}"))]


OTHER_T = target(tid=1, iqn="iqn.2016-05.io.pathagent:other", acl=("ALL",))

CASES: list[tuple[str, Entry, TgtState, Entry | None, dict[str, Entry], list[Op]]] = [
    ("new target on an empty tgtd",
     entry(), state(portals=()), None, {},
     new_target_ops(1) + [allow(INI), AddPortal("10.0.0.1:3260")]),
    ("new target takes the smallest free tid",
     entry(initiators=None), state(OTHER_T, target(tid=3, iqn="iqn.x:three")), None, {},
     new_target_ops(2) + [allow("ALL", "--initiator-address", tid=2)]),
    ("new target that admits nobody binds no ACL",
     entry(initiators=()), state(), None, {},
     new_target_ops(1)),
    ("applied already: nothing to do",
     entry(), state(target()), entry(), {}, []),
    ("a target left without its LUN gets it back, after a probe",
     entry(), state(target(image=None)), None, {},
     [new_target_ops(1)[0]] + new_target_ops(1)[2:]),
    ("ACL: allow the new initiator first, then disallow the old one",
     entry(initiators=(OTHER,)), state(target()), entry(), {},
     [allow(OTHER), disallow(INI)]),
    ("ACL: opened to everyone",
     entry(initiators=None), state(target()), entry(), {},
     [allow("ALL", "--initiator-address"), disallow(INI)]),
    ("ACL: closed to everyone",
     entry(initiators=()), state(target(acl=(INI, OTHER))), entry(), {},
     [disallow(INI), disallow(OTHER)]),
    ("ACL: an address rule is bound by address",
     entry(initiators=("198.18.0.9",)), state(target(acl=())), entry(), {},
     [allow("198.18.0.9", "--initiator-address")]),
    ("CHAP added",
     entry(chap=Chap("alice", "pw-1")), state(target()), entry(), {},
     [NewAccount("alice", "pw-1"), bind("alice")]),
    ("CHAP password changed: the account is replaced and bound again",
     entry(chap=Chap("alice", "pw-2")), state(target(ins=("alice",)), accounts=("alice",)),
     entry(chap=Chap("alice", "pw-1")), {},
     [delete_account("alice"), NewAccount("alice", "pw-2"), bind("alice")]),
    ("CHAP password changed: re-bound to every recorded target that uses the account",
     entry(chap=Chap("alice", "pw-2")),
     state(target(ins=("alice",)), target(tid=2, iqn="iqn.x:d2", ins=("alice",)), accounts=("alice",)),
     entry(chap=Chap("alice", "pw-1")),
     {"d2": entry(disk="d2", iqn="iqn.x:d2", chap=Chap("alice", "pw-2"))},
     [delete_account("alice"), NewAccount("alice", "pw-2"), bind("alice", tid=2, iqn="iqn.x:d2"), bind("alice")]),
    ("CHAP user shared with another disk, same password: bound, not re-created",
     entry(chap=Chap("alice", "pw-1")), state(target(), target(tid=2, iqn="iqn.x:d2", ins=("alice",)),
                                              accounts=("alice",)),
     entry(), {"d2": entry(disk="d2", iqn="iqn.x:d2", chap=Chap("alice", "pw-1"))},
     [bind("alice")]),
    ("an account tgtd has but the record does not know is re-created (its password is unknown)",
     entry(chap=Chap("alice", "pw-1")), state(target(), accounts=("alice",)), entry(), {},
     [delete_account("alice"), NewAccount("alice", "pw-1"), bind("alice")]),
    ("CHAP removed: unbound",
     entry(), state(target(ins=("alice",)), accounts=("alice",)), entry(chap=Chap("alice", "pw-1")), {},
     [unbind("alice")]),
    ("mutual CHAP added",
     entry(chap=Chap("alice", "pw-1"), mutual=Chap("tgt-1", "tpw-1")),
     state(target(ins=("alice",)), accounts=("alice",)), entry(chap=Chap("alice", "pw-1")), {},
     [NewAccount("tgt-1", "tpw-1"), bind("tgt-1", outgoing=True)]),
    ("mutual CHAP swapped: one outgoing account per target, so the old one is unbound first",
     entry(chap=Chap("alice", "pw-1"), mutual=Chap("tgt-2", "tpw-2")),
     state(target(ins=("alice",), outs=("tgt-1",)), accounts=("alice", "tgt-1")),
     entry(chap=Chap("alice", "pw-1"), mutual=Chap("tgt-1", "tpw-1")), {},
     [NewAccount("tgt-2", "tpw-2"), unbind("tgt-1", outgoing=True), bind("tgt-2", outgoing=True)]),
    ("incoming and outgoing swapped",
     entry(chap=Chap("tgt-1", "tpw-1"), mutual=Chap("alice", "pw-1")),
     state(target(ins=("alice",), outs=("tgt-1",)), accounts=("alice", "tgt-1")),
     entry(chap=Chap("alice", "pw-1"), mutual=Chap("tgt-1", "tpw-1")), {},
     [bind("tgt-1"), unbind("tgt-1", outgoing=True), bind("alice", outgoing=True), unbind("alice")]),
    ("a second path adds its portal",
     entry(paths={1: "10.0.0.1", 2: "10.0.0.2"}), state(target()), entry(), {},
     [AddPortal("10.0.0.2:3260")]),
    ("two paths on one IP need one portal",
     entry(paths={1: "10.0.0.5", 2: "10.0.0.5"}), state(target(), portals=()), entry(), {},
     [AddPortal("10.0.0.5:3260")]),
    ("an IPv6 path",
     entry(paths={1: "fd00::7"}), state(target(), portals=()), entry(), {},
     [AddPortal("[fd00::7]:3260")]),
    ("a wrong identity is set again",
     entry(), state(target(serial="beaf11")), entry(), {},
     [new_target_ops(1)[3]]),
    # revocation: tgt checks the ACL only at login, so the sessions it no longer admits are closed
    ("revoked: the sessions of the initiator no longer admitted are closed after the unbind; the other's stay",
     entry(initiators=(INI,)), state(target(acl=(INI, OTHER), sessions=[sess(1, INI), sess(2, OTHER)])),
     entry(initiators=(INI, OTHER)), {},
     [disallow(OTHER), close(2, OTHER)]),
    ("revoked: closed to everyone closes every session",
     entry(initiators=()), state(target(acl=(INI, OTHER), sessions=[sess(4, OTHER), sess(1, INI)])), entry(), {},
     [disallow(INI), disallow(OTHER), close(1, INI), close(4, OTHER)]),
    ("opened to everyone: no session is closed",
     entry(initiators=None), state(target(sessions=[sess(1, INI), sess(2, OTHER)])), entry(), {},
     [allow("ALL", "--initiator-address"), disallow(INI)]),
    ("from open to a list: every session of an unlisted initiator is closed",
     entry(initiators=(INI,)),
     state(target(acl=("ALL",), sessions=[sess(1, INI), sess(2, OTHER), sess(3, OTHER, cid=1)])),
     entry(initiators=None), {},
     [allow(INI), disallow("ALL", "--initiator-address"), close(2, OTHER), close(3, OTHER, cid=1)]),
    ("an address rule keeps the sessions from its addresses (tgt admits by name or by address)",
     entry(initiators=("198.18.3.0/24",)),
     state(target(acl=(INI,), sessions=[sess(1, INI, "198.18.3.7"), sess(2, OTHER, "198.18.4.7")])), entry(), {},
     [allow("198.18.3.0/24", "--initiator-address"), disallow(INI), close(2, OTHER, cid=0)]),
    ("a session the ACL already refuses (its close was interrupted) is closed at the next export",
     entry(), state(target(sessions=[sess(1, INI), sess(2, OTHER)])), entry(), {},
     [close(2, OTHER)]),
    ("a CHAP change keeps the sessions: it applies at the next login",
     entry(chap=Chap("alice", "pw-2")), state(target(ins=("alice",), sessions=[sess(1, INI)]), accounts=("alice",)),
     entry(chap=Chap("alice", "pw-1")), {},
     [delete_account("alice"), NewAccount("alice", "pw-2"), bind("alice")]),
    # a new size: bs_rbd reads it only at open, so the target is made again
    ("a larger size re-creates the target: portals, sessions and target go, it comes back, portals last",
     entry(size=NEW, paths={1: "10.0.0.1", 2: "10.0.0.2"}),
     state(target(sessions=[sess(1, INI), sess(2, INI, cid=3)]),
           portals=("10.0.0.1:3260", "10.0.0.2:3260", "10.0.0.9:3260")),
     entry(paths={1: "10.0.0.1", 2: "10.0.0.2"}), {},
     [Probe("rbd", "img-d1"), DeletePortal("10.0.0.1:3260"), DeletePortal("10.0.0.2:3260"), close(1, INI),
      close(2, INI, cid=3), DeleteTarget(1, IQN)] + new_target_ops(1)[1:]
     + [allow(INI), AddPortal("10.0.0.1:3260"), AddPortal("10.0.0.2:3260")]),
    ("a smaller size re-creates it too; a path exported with it gets its portal with the others",
     entry(size=OLD - (16 << 20), paths={1: "10.0.0.1", 2: "10.0.0.2"}), state(target()), entry(), {},
     [Probe("rbd", "img-d1"), DeletePortal("10.0.0.1:3260"), DeleteTarget(1, IQN)] + new_target_ops(1)[1:]
     + [allow(INI), AddPortal("10.0.0.1:3260"), AddPortal("10.0.0.2:3260")]),
    ("a re-created target gets its CHAP accounts bound again (they stay in tgtd)",
     entry(chap=Chap("alice", "pw-1"), size=NEW), state(target(ins=("alice",)), accounts=("alice",)),
     entry(chap=Chap("alice", "pw-1")), {},
     [Probe("rbd", "img-d1"), DeletePortal("10.0.0.1:3260"), DeleteTarget(1, IQN)] + new_target_ops(1)[1:]
     + [allow(INI), bind("alice"), AddPortal("10.0.0.1:3260")]),
    ("a re-created target takes the smallest free tid",
     entry(size=NEW), state(target(tid=3)), entry(), {},
     [Probe("rbd", "img-d1"), DeletePortal("10.0.0.1:3260"), DeleteTarget(3, IQN)] + new_target_ops(1)[1:]
     + [allow(INI), AddPortal("10.0.0.1:3260")]),
    ("an unknown recorded size (a record from before sizes) does not re-create",
     entry(size=NEW), state(target()), entry(size=0), {}, []),
    ("an unknown new size does not re-create",
     entry(size=0), state(target()), entry(), {}, []),
    ("a new size for a target without its LUN: the LUN is added (it opens with the new size)",
     entry(size=NEW), state(target(image=None)), entry(), {},
     [new_target_ops(1)[0]] + new_target_ops(1)[2:]),
    ("a new size for a disk not exported here: a plain new target",
     entry(size=NEW), state(portals=()), entry(), {},
     new_target_ops(1) + [allow(INI), AddPortal("10.0.0.1:3260")]),
]


@pytest.mark.parametrize("name,e,st,prev,others,want", CASES, ids=[c[0] for c in CASES])
def test_ops_for(name: str, e: Entry, st: TgtState, prev: Entry | None, others: dict[str, Entry],
                 want: list[Op]) -> None:
    before = copy.deepcopy(st)
    record = {**others, e.disk: e}
    assert ops_for(e, st, prev, record, S) == want
    assert st == before                                   # pure: the state given is not touched


def test_a_reopen_keeps_the_listen_portal_and_ends_with_the_disks_portals() -> None:
    s = Settings(port=3260, listen="10.0.0.1", bsopts=S.bsopts)
    ops = ops_for(entry(size=NEW, paths={1: "10.0.0.1", 2: "10.0.0.2"}),
                  state(target(), portals=("10.0.0.1:3260", "10.0.0.2:3260")),
                  entry(paths={1: "10.0.0.1", 2: "10.0.0.2"}), {}, s)
    assert [op for op in ops if isinstance(op, (DeletePortal, AddPortal))] == [
        DeletePortal("10.0.0.2:3260"), AddPortal("10.0.0.2:3260")]
    assert isinstance(ops[0], Probe) and ops[-1] == AddPortal("10.0.0.2:3260")
    assert sum(isinstance(op, Probe) for op in ops) == 1      # one probe, before anything is taken away


def test_needs_reopen_and_narrowed() -> None:
    st = state(target(acl=(INI, OTHER)))
    assert needs_reopen(entry(size=NEW), st, entry())
    assert not needs_reopen(entry(), st, entry())
    assert not needs_reopen(entry(size=NEW), st, None)
    assert not needs_reopen(entry(size=NEW), state(), entry())
    assert narrowed(entry(), st) and not narrowed(entry(initiators=(INI, OTHER)), st)
    assert not narrowed(entry(), state())


@pytest.mark.parametrize("acl,initiator,address,want", [
    ({"ALL"}, OTHER, "", True),
    ({INI}, INI, "198.18.3.1", True),
    ({INI}, OTHER, "198.18.3.1", False),
    (set(), INI, "198.18.3.1", False),
    ({"198.18.3.1"}, OTHER, "198.18.3.1", True),
    ({"198.18.3.1"}, OTHER, "198.18.3.2", False),
    ({"198.18.3.0/24"}, OTHER, "198.18.3.200", True),
    ({"[fd00::]/64"}, OTHER, "fd00::9", True),
    ({"fd00::9"}, OTHER, "fd00::9", True),
    ({"198.18.3.0/24"}, OTHER, "fd00::9", False),
    ({"198.18.3.0/24"}, OTHER, "", False),            # no address shown: only a name or ALL admits it
    ({"not-an-address"}, OTHER, "198.18.3.1", False),
])
def test_admits_like_tgts_login(acl: set[str], initiator: str, address: str, want: bool) -> None:
    assert admits(acl, initiator, address) is want


def test_closing_a_connection_names_tid_sid_and_cid() -> None:
    op = close(7, OTHER, tid=3, cid=2)
    assert op.args == ("--mode", "conn", "--op", "delete", "--tid", "3", "--sid", "7", "--cid", "2")
    assert OTHER in op.what
    assert revoke_ops(entry(), None) == []


def test_lun_on_another_image_is_permanent_before_any_op() -> None:
    with pytest.raises(PermanentBackendError, match="unexport it first"):
        ops_for(entry(image="img-other"), state(target()), entry(), {"d1": entry(image="img-other")}, S)


def test_secrets_are_never_in_what_or_repr() -> None:
    e = entry(chap=Chap("alice", "s3cret-in"), mutual=Chap("tgt", "s3cret-out"))
    ops = ops_for(e, state(portals=()), None, {"d1": e}, S)
    assert NewAccount("alice", "s3cret-in") in ops
    for op in ops:
        assert "s3cret" not in op.what and "s3cret" not in repr(op) and "s3cret" not in str(op)


def test_settings_reach_the_ops() -> None:
    s = Settings(port=13260, vendor_id="GW", product_id="P", product_rev="r1", bsopts="conf=/x;id=y")
    ops = ops_for(entry(), state(portals=()), None, {"d1": entry()}, s)
    args = [a for op in ops if isinstance(op, Call) for a in op.args]
    assert "conf=/x;id=y" in args
    assert f"vendor_id=GW,product_id=P,product_rev=r1,scsi_sn={SERIAL},scsi_id={SERIAL}" in args
    assert ops[-1] == AddPortal("10.0.0.1:13260")


# ------------------------------------------------------------------------------------------------ prune

def test_prune_after_the_last_path_removes_target_portal_and_accounts() -> None:
    st = state(target(ins=("alice",), outs=("tgt-1",)), TgtTarget(tid=2, name="iqn.x:keep"),
               portals=("10.0.0.1:3260", "10.0.0.9:3260"), accounts=("alice", "tgt-1", "keep-user"))
    keep = entry(disk="d2", iqn="iqn.x:keep", chap=Chap("keep-user", "k"), paths={1: "10.0.0.9"})
    assert prune_ops(st, {"d2": keep}, S) == [
        DeleteTarget(1, IQN), DeletePortal("10.0.0.1:3260"),
        Call("delete CHAP account 'alice'", ("--mode", "account", "--op", "delete", "--user", "alice")),
        Call("delete CHAP account 'tgt-1'", ("--mode", "account", "--op", "delete", "--user", "tgt-1"))]


def test_prune_keeps_a_portal_still_used_and_the_listen_portal() -> None:
    st = state(target(), portals=("10.0.0.1:3260", "10.0.0.2:3260", "192.0.2.1:3260"))
    s = Settings(port=3260, listen="192.0.2.1")
    assert prune_ops(st, {"d1": entry(paths={2: "10.0.0.1"})}, s) == [DeletePortal("10.0.0.2:3260")]


def test_prune_without_the_account_list_leaves_accounts() -> None:
    st = TgtState(targets={IQN: target()}, portals=set(), accounts=None)
    assert prune_ops(st, {}, S) == [DeleteTarget(1, IQN)]


# ------------------------------------------------------------------------------------------------ served

def test_served_needs_the_lun_on_the_image_and_the_portal() -> None:
    e = entry(paths={1: "10.0.0.1", 2: "10.0.0.2"})
    assert served({"d1": e}, state(target()), 3260) == {PathKey("d1", 1)}
    assert served({"d1": e}, state(target(), portals=("10.0.0.1:3260", "10.0.0.2:3260")), 3260) == {
        PathKey("d1", 1), PathKey("d1", 2)}
    assert served({"d1": e}, state(target(image=None)), 3260) == frozenset()
    assert served({"d1": e}, state(target(image="rbd/other")), 3260) == frozenset()
    assert served({"d1": e}, state(), 3260) == frozenset()


def test_applied_compares_everything_but_secrets() -> None:
    e = entry(chap=Chap("alice", "pw"))
    assert not applied(e, state(target()), 3260)
    assert applied(e, state(target(ins=("alice",))), 3260)
    assert not applied(e, state(target(ins=("alice",)), portals=()), 3260)
    assert not applied(e, state(target(ins=("alice",), acl=(INI, OTHER))), 3260)
    assert applied(e, state(target(ins=("alice",), sessions=[sess(1, INI)])), 3260)
    assert not applied(e, state(target(ins=("alice",), sessions=[sess(1, INI), sess(2, OTHER)])), 3260)


def test_ops_from_a_real_show() -> None:
    """disk-a of the captured output as the record has it: nothing to do; its password changed: re-created."""
    show = Path(__file__).parent / "tgt-show"
    st = TgtState(targets=parse_targets((show / "targets-mixed.txt").read_text()),
                  portals=parse_portals((show / "portals-mixed.txt").read_text()),
                  accounts={"alice", "bob", "target-a"})
    a = Entry(disk="a", iqn="iqn.2016-05.io.pathagent:disk-a", pool="rbd", image="capimg", serial=SERIAL,
              initiators=(INI, OTHER), chap=Chap("alice", "alice-secret-1"),
              mutual_chap=Chap("target-a", "target-secret-1"), paths={1: "127.0.0.2"})
    d = Entry(disk="d", iqn="iqn.2016-05.io.pathagent:disk-d", pool="rbd", image="capimg2", serial="beaf31",
              initiators=("127.0.0.1",), chap=Chap("bob", "bob-secret-123"), mutual_chap=None, paths={1: "127.0.0.1"})
    record = {"a": a, "d": d}
    port = 13260
    s = Settings(port=port)
    assert ops_for(a, st, a, record, s) == [] and applied(a, st, port)
    changed = Entry(**{**a.__dict__, "chap": Chap("alice", "alice-secret-2")})
    ops = ops_for(changed, st, a, {**record, "a": changed}, s)
    assert ops[:2] == [delete_account("alice"), NewAccount("alice", "alice-secret-2")]
    assert ops[2:] == [Call("bind CHAP account 'alice' to iqn.2016-05.io.pathagent:disk-a",
                            ("--mode", "account", "--op", "bind", "--tid", "1", "--user", "alice"))]
    # d's LUN 1 still has tgt's default serial: served (the identity is export's business, not exported's)
    assert served(record, st, port) == {PathKey("a", 1), PathKey("d", 1)}
    assert not applied(d, st, port)


def test_revocation_and_logins_from_a_real_show() -> None:
    """disk-a of the capture with ini-a logged in (sid 3): admitting ini-b alone closes ini-a's session."""
    show = Path(__file__).parent / "tgt-show"
    st = TgtState(targets=parse_targets((show / "targets-sessions.txt").read_text()),
                  portals=parse_portals((show / "portals-mixed.txt").read_text()),
                  accounts={"alice", "bob", "target-a"})
    a = Entry(disk="a", iqn="iqn.2016-05.io.pathagent:disk-a", pool="rbd", image="capimg", serial=SERIAL,
              initiators=(INI, OTHER), chap=Chap("alice", "alice-secret-1"),
              mutual_chap=Chap("target-a", "target-secret-1"), paths={1: "127.0.0.2"})
    d = Entry(disk="d", iqn="iqn.2016-05.io.pathagent:disk-d", pool="rbd", image="capimg2", serial="beaf31",
              initiators=("127.0.0.1",), chap=None, mutual_chap=None, paths={1: "127.0.0.1"})
    s = Settings(port=13260)
    assert ops_for(a, st, a, {"a": a, "d": d}, s) == []
    only_b = Entry(**{**a.__dict__, "initiators": (OTHER,)})
    assert ops_for(only_b, st, a, {"a": only_b, "d": d}, s) == [
        Call(f"disallow {INI} on iqn.2016-05.io.pathagent:disk-a",
             ("--mode", "target", "--op", "unbind", "--tid", "1", "--initiator-name", INI)),
        CloseConnection(1, 3, 0, INI)]
    b = Entry(disk="b", iqn="iqn.2016-05.io.pathagent:disk-b", pool="rbd", image="x", serial="serial-b",
              initiators=None, chap=None, mutual_chap=None, paths={})
    assert logins({"a": a, "b": b, "d": d}, st.targets) == {"a": frozenset({INI}), "b": frozenset({INI, OTHER})}
    assert logins({"d": d}, st.targets) == {} and logins({"a": a}, {}) == {}


# ------------------------------------------------------------------------------------------------ the cached view

@pytest.mark.parametrize("name,e,st,prev,others,want", CASES, ids=[c[0] for c in CASES])
def test_applying_the_ops_leaves_nothing_to_do(name: str, e: Entry, st: TgtState, prev: Entry | None,
                                               others: dict[str, Entry], want: list[Op]) -> None:
    """What the backend's view becomes after the ops succeeded is a tgtd that has the entry: planning again
    from it (with the entry now recorded) finds nothing to do."""
    record = {**others, e.disk: e}
    view = copy.deepcopy(st)
    apply_ops(view, want)
    assert ops_for(e, view, e, record, S) == []
    assert applied(e, view, 3260)


def test_apply_ops_builds_what_tgt_shows_for_a_new_target() -> None:
    """LUN 0 and LUN 1 with tgt's default identity (``IET     TTTTLLLL``, ``beafTL``) until the update, as in
    the captured ``tgtadm --op show``."""
    view = state(portals=())
    ops = ops_for(entry(initiators=None), view, None, {"d1": entry(initiators=None)}, S)
    apply_ops(view, ops[:3])                        # probe, target, LUN: not the identity yet
    lun0, lun1 = view.targets[IQN].luns[0], view.targets[IQN].luns[1]
    assert (lun0.kind, lun0.scsi_id, lun0.scsi_sn, lun0.bstype, lun0.path) == (
        "controller", "IET     00010000", "beaf10", "null", "None")
    assert (lun1.kind, lun1.scsi_id, lun1.scsi_sn, lun1.bstype, lun1.path) == (
        "disk", "IET     00010001", "beaf11", "rbd", "rbd/img-d1")
    apply_ops(view, ops[3:])
    assert (lun1.scsi_id, lun1.scsi_sn) == (SERIAL, SERIAL)
    assert view.targets[IQN].acl == {"ALL"} and view.portals == {"10.0.0.1:3260"}


def test_apply_ops_follows_accounts_deletes_and_closed_sessions() -> None:
    view = state(target(ins=("alice",), outs=("tgt-1",), sessions=[sess(1, INI), sess(2, OTHER)]),
                 target(tid=2, iqn="iqn.x:d2", ins=("alice",)), accounts=("alice", "tgt-1"))
    apply_ops(view, [delete_account("alice"), close(2, OTHER), unbind("tgt-1", outgoing=True)])
    t1, t2 = view.targets[IQN], view.targets["iqn.x:d2"]
    assert view.accounts == {"tgt-1"} and not t1.accounts_in and not t2.accounts_in and not t1.accounts_out
    assert [n.sid for n in t1.it_nexus] == [1]
    apply_ops(view, [NewAccount("alice", "pw"), bind("alice", tid=2, iqn="iqn.x:d2"), DeleteTarget(1, IQN),
                     DeletePortal("10.0.0.1:3260")])
    assert view.accounts == {"alice", "tgt-1"} and t2.accounts_in == {"alice"}
    assert set(view.targets) == {"iqn.x:d2"} and view.portals == set()


def test_apply_ops_refuses_what_it_cannot_model() -> None:
    with pytest.raises(ValueError):
        apply_ops(state(), [Call("show", ("--mode", "target", "--op", "show"))])
    with pytest.raises(ValueError):
        apply_ops(state(), [allow(INI, tid=9)])          # a target the view does not have


def test_additive_ops_are_those_that_only_add() -> None:
    new = ops_for(entry(chap=Chap("alice", "pw"), mutual=Chap("t", "tpw")), state(portals=()), None,
                  {"d1": entry(chap=Chap("alice", "pw"), mutual=Chap("t", "tpw"))}, S)
    assert additive(new) and additive([AddPortal("10.0.0.2:3260")]) and additive([])
    for _, e, st, prev, others, want in CASES:
        takes = any(isinstance(op, (DeletePortal, DeleteTarget, CloseConnection)) or (
            isinstance(op, Call) and ("unbind" in op.args or "delete" in op.args)) for op in want)
        assert additive(want) is not takes, want


def test_configuration_leaves_the_sessions_out() -> None:
    st = state(target(sessions=[sess(1, INI)]))
    view = configuration(st)
    assert view.targets[IQN].it_nexus == [] and st.targets[IQN].sessions == 1
    assert view.targets[IQN].luns == st.targets[IQN].luns and view.portals == st.portals


def test_ops_for_copies_only_the_targets_it_changes() -> None:
    others = {f"iqn.x:o{i}": target(tid=i + 2, iqn=f"iqn.x:o{i}") for i in range(50)}
    st = state(target(), *others.values(), portals=("10.0.0.1:3260",))
    before = {n: id(t) for n, t in st.targets.items()}
    assert ops_for(entry(paths={1: "10.0.0.1", 2: "10.0.0.2"}), st, entry(), {}, S) == [AddPortal("10.0.0.2:3260")]
    assert {n: id(t) for n, t in st.targets.items()} == before and st.portals == {"10.0.0.1:3260"}


# ------------------------------------------------------------------------------------------------ the journal

def stored(*entries: Entry, tgtd: str = "7 70", fence: str = "m1") -> Stored:
    return Stored(tgtd=tgtd, fence=fence, disks={e.disk: e for e in entries})


def test_replay_applies_the_lines_of_this_base_and_tgtd_in_order() -> None:
    d2 = entry(disk="d2", iqn="iqn.x:d2")
    data = (journal_line("B", "7 70", "m1", "d2", d2) + journal_line("B", "7 70", "m2", "d1", None)
            + journal_line("OLD", "7 70", "m3", "d3", entry(disk="d3"))      # before a compaction: stale
            + journal_line("B", "6 60", "m4", "d4", entry(disk="d4")))       # another tgtd: stale
    rec, lines, torn = replay(stored(entry()), "B", data)
    assert rec.disks == {"d2": d2} and rec.fence == "m2" and rec.tgtd == "7 70"
    assert (lines, torn) == (4, False)


def test_replay_ignores_a_torn_tail_and_says_so() -> None:
    line = journal_line("B", "7 70", "m1", "d2", entry(disk="d2"))
    rec, lines, torn = replay(stored(), "B", line + line[:20])
    assert set(rec.disks) == {"d2"} and (lines, torn) == (2, True)
    rec, _, torn = replay(stored(), "B", line[:20] + b"\n" + line)    # appended after a torn line: distrusted
    assert rec.disks == {} and torn


def test_replay_needs_a_base_of_a_tgtd() -> None:
    line = journal_line("", "", "m1", "d2", entry(disk="d2"))
    assert replay(Stored(tgtd="", disks={}), "", line)[0].disks == {}
    assert replay(Stored(tgtd=None, disks={}), "B", journal_line("B", "7 70", "m", "d2", entry()))[0].disks == {}


def test_record_store_appends_compacts_and_forgets_a_stale_journal(tmp_path: Path) -> None:
    base = RecordFile(str(tmp_path / "tgt" / "exports.json"))
    store = RecordStore(base, str(tmp_path / "tgt" / "exports.log"))
    stamp, tag = store.save("7 70", "m1", {"d1": entry()})
    assert stamp == store.stamp() and stamp[1] is None and tag == tag_of(stamp[0])
    d2 = entry(disk="d2", iqn="iqn.x:d2")
    stamp2 = store.append(tag, "7 70", "m1", "d2", d2)
    assert stamp2 == store.stamp() and stamp2[1] is not None
    assert stat.S_IMODE(os.stat(store.journal).st_mode) == 0o600          # entries hold CHAP secrets
    loaded = store.load()
    assert loaded.stored.disks == {"d1": entry(), "d2": d2} and loaded.lines == 1 and not loaded.torn
    assert loaded.stamp == stamp2
    # the base alone (what an older agent reads) does not have d2 until a compaction
    assert set(json.load(open(base.path))["disks"]) == {"d1"}
    old_journal = open(store.journal, "rb").read()
    _, tag3 = store.save("7 70", "m1", {"d2": d2})
    assert not os.path.exists(store.journal) and set(json.load(open(base.path))["disks"]) == {"d2"}
    # a crash between the base and the removal of the journal: its lines name the old base, and are stale
    open(store.journal, "wb").write(old_journal + journal_line("OLD-BASE", "7 70", "m1", "d1", None))
    assert store.load().stored.disks == {"d2": d2}
    store.append(tag3, "7 70", "m1", "d1", entry())
    assert store.load().stored.disks == {"d1": entry(), "d2": d2}
