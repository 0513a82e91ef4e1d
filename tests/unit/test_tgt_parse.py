"""The tgtadm parsers on real ``tgtadm --op show`` outputs (captured from tgt 1.0.85; see tgt-show/README.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.targetspec import portal_of
from plugins.tgt.tgtadm import TgtConnection, TgtLun, TgtSession, parse_accounts, parse_portals, parse_targets

SHOW = Path(__file__).parent / "tgt-show"


def show(name: str) -> str:
    return (SHOW / name).read_text()


def test_targets_with_rbd_and_rdwr_luns_acls_and_accounts() -> None:
    ts = parse_targets(show("targets-mixed.txt"))
    assert sorted((t.tid, n) for n, t in ts.items()) == [
        (1, "iqn.2016-05.io.pathagent:disk-a"), (2, "iqn.2016-05.io.pathagent:disk-b"),
        (3, "iqn.2016-05.io.pathagent:disk-d"), (4, "iqn.2016-05.io.pathagent:disk-c")]
    a = ts["iqn.2016-05.io.pathagent:disk-a"]
    assert a.luns[1] == TgtLun(lun=1, kind="disk", scsi_id="5f0c1e2a-0000-4000-8000-00000000000a",
                               scsi_sn="5f0c1e2a-0000-4000-8000-00000000000a", bstype="rbd", path="rbd/capimg")
    assert a.luns[0].kind == "controller" and a.luns[0].bstype == "null"
    assert a.acl == {"iqn.2016-05.io.pathagent.test:ini-a", "iqn.2016-05.io.pathagent.test:ini-b"}
    assert (a.accounts_in, a.accounts_out) == ({"alice"}, {"target-a"})
    assert a.sessions == 0
    b = ts["iqn.2016-05.io.pathagent:disk-b"]
    assert (b.luns[1].bstype, b.luns[1].path, b.luns[1].scsi_sn) == ("rdwr", "/tmp/tgtcap/file.img", "serial-b")
    assert b.acl == {"ALL"} and not b.accounts_in and not b.accounts_out
    d = ts["iqn.2016-05.io.pathagent:disk-d"]
    assert (d.luns[1].scsi_id, d.luns[1].scsi_sn) == ("IET     00030001", "beaf31")   # tgt's defaults
    assert d.acl == {"127.0.0.1"} and d.accounts_in == {"bob", "alice"}
    c = ts["iqn.2016-05.io.pathagent:disk-c"]
    assert set(c.luns) == {0} and not c.acl and not c.accounts_in


def test_sessions_are_counted_per_target() -> None:
    ts = parse_targets(show("targets-sessions.txt"))
    assert {n.rsplit(":", 1)[1]: t.sessions for n, t in ts.items()} == {
        "disk-a": 1, "disk-b": 2, "disk-d": 0, "disk-c": 0}
    # the nexus details (Initiator:, Connection:, IP Address:) do not leak into other sections
    a = ts["iqn.2016-05.io.pathagent:disk-a"]
    assert a.luns[1].path == "rbd/capimg" and a.acl == {"iqn.2016-05.io.pathagent.test:ini-a",
                                                        "iqn.2016-05.io.pathagent.test:ini-b"}


def test_sessions_carry_sid_initiator_and_connections() -> None:
    ts = parse_targets(show("targets-sessions.txt"))
    ini_a, ini_b = "iqn.2016-05.io.pathagent.test:ini-a", "iqn.2016-05.io.pathagent.test:ini-b"
    assert ts["iqn.2016-05.io.pathagent:disk-a"].it_nexus == [
        TgtSession(sid=3, initiator=ini_a, connections=[TgtConnection(0, "127.0.0.1")])]
    assert ts["iqn.2016-05.io.pathagent:disk-b"].it_nexus == [
        TgtSession(sid=1, initiator=ini_a, connections=[TgtConnection(0, "127.0.0.1")]),
        TgtSession(sid=2, initiator=ini_b, connections=[TgtConnection(0, "127.0.0.1")])]
    assert ts["iqn.2016-05.io.pathagent:disk-d"].it_nexus == []


def test_session_lines_with_an_alias_and_ipv6() -> None:
    text = ("Target 7: iqn.x:t\n"
            "    I_T nexus information:\n"
            "        I_T nexus: 65535\n"
            "            Initiator: iqn.1993-08.org.debian:01:abc alias: host one\n"
            "            Connection: 2\n"
            "                IP Address: fd00::5\n"
            "    LUN information:\n"
            "        LUN: 0\n"
            "            Type: controller\n")
    t = parse_targets(text)["iqn.x:t"]
    assert t.it_nexus == [TgtSession(65535, "iqn.1993-08.org.debian:01:abc", [TgtConnection(2, "fd00::5")])]
    assert t.sessions == 1 and t.luns[0].kind == "controller"


def test_fresh_tgtd_prints_nothing() -> None:
    assert show("targets-empty.txt") == "" and parse_targets("") == {}
    assert show("accounts-empty.txt") == "" and parse_accounts("") == set()


def test_portals_ipv4_and_ipv6() -> None:
    assert parse_portals(show("portals-boot.txt")) == {"127.0.0.1:13260"}
    assert parse_portals(show("portals-mixed.txt")) == {"127.0.0.1:13260", "127.0.0.2:13260", "[::1]:13260"}
    assert portal_of("::1", 13260) == "[::1]:13260" and portal_of("10.0.0.1", 3260) == "10.0.0.1:3260"


def test_accounts() -> None:
    assert parse_accounts(show("accounts-mixed.txt")) == {"alice", "bob", "target-a"}


@pytest.mark.parametrize("name", ["targets-mixed.txt", "targets-sessions.txt"])
def test_free_tid_fills_gaps(name: str) -> None:
    from plugins.tgt.tgtadm import TgtState
    ts = parse_targets(show(name))
    assert TgtState(targets=ts, portals=set()).free_tid() == 5
    del ts["iqn.2016-05.io.pathagent:disk-b"]
    assert TgtState(targets=ts, portals=set()).free_tid() == 2
