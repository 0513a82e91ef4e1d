"""Tier 1: which clients ``ceph-blocklist`` fences, given the monitors' sessions, the images' watchers and lock
owners and the failed node's published identity (``agent.adapters.ceph_clients``, pure: no rados)."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.adapters.ceph_clients import (MAX_IPS, ImageClients, MonSession, addr_ip, identity_of, normalize, plan,
                                         read_identity)

GWA = "client.pathagent-gwa"
GWB = "client.pathagent-gwb"
ADMIN = "client.admin"
A1, A2, A3 = "10.0.0.1:0/101", "10.0.0.1:0/102", "10.0.0.1:0/103"      # gwa's librados instances
B1 = "10.0.0.2:0/201"                                                   # gwb's
ADM_A = "10.0.0.1:0/301"                                                # gwa's own agent, as client.admin
L1, L2 = "127.0.0.1:0/11", "127.0.0.1:0/12"                             # a shared IP (tests on loopback)


def s(entity: str, *addrs: str, mon: str = "a") -> MonSession:
    return MonSession(mon=mon, entity=entity, addrs=addrs)


def img(watchers: tuple[str, ...], owners: tuple[str, ...] = (), name: str = "i1") -> ImageClients:
    return ImageClients(pool="rbd", image=name, watchers=watchers, owners=owners)


# name, published ips, sessions, images -> blocklist (in order), breaks (image, owner), spared owners, spared
CASES: list[tuple[str, list[str], list[MonSession], list[ImageClients], tuple[str, ...], list[tuple[str, str]],
                  list[tuple[str, str]], int]] = [
    ("frozen owner with its mon session",
     ["10.0.0.1"], [s(GWA, A1), s(GWB, B1)], [img((A1, B1), (A1,))],
     (A1,), [("i1", A1)], [], 0),
    ("a healthy gateway holds the lock: only the failed node's opener goes",
     ["10.0.0.1"], [s(GWA, A1), s(GWB, B1)], [img((A1, B1), (B1,))],
     (A1,), [], [("i1", B1)], 0),
    ("killed owner: no session, lingering watch from its IP",
     ["10.0.0.1"], [s(GWB, B1)], [img((A1, B1), (A1,))],
     (A1,), [("i1", A1)], [], 0),
    ("lingering watch but no IP published: not fenced, lock reported",
     [], [s(GWB, B1)], [img((A1, B1), (A1,))],
     (), [], [("i1", A1)], 0),
    ("lingering watch from another node's IP: not ours",
     ["10.0.0.1"], [], [img((B1,), (B1,))],
     (), [], [("i1", B1)], 0),
    ("shared IP: the other node's live client is spared by its session",
     ["127.0.0.1"], [s(GWB, L2)], [img((L1, L2), (L1,))],
     (L1,), [("i1", L1)], [], 1),
    ("shared IP: the other node holds the lock",
     ["127.0.0.1"], [s(GWA, L1), s(GWB, L2)], [img((L1, L2), (L2,))],
     (L1,), [], [("i1", L2)], 1),
    ("the failed node's agent (another entity) on its IP is spared",
     ["10.0.0.1"], [s(GWA, A1), s(ADMIN, ADM_A)], [img((A1, ADM_A), (A1,))],
     (A1,), [("i1", A1)], [], 1),
    ("every session of the entity goes, owners first, then openers, then the rest",
     ["10.0.0.1"], [s(GWA, A3), s(GWA, A2), s(GWA, A1, mon="b")],
     [img((A2,), (), "i1"), img((A1, A2), (A1,), "i2")],
     (A1, A2, A3), [("i2", A1)], [], 0),
    ("sessions on several monitors are all the entity's",
     [], [s(GWA, A1, mon="a"), s(GWA, A2, mon="b"), s(GWB, B1, mon="c")], [],
     (A1, A2), [], [], 0),
    ("a session of the entity is fenced whatever its IP",
     ["10.0.0.9"], [s(GWA, "10.0.0.2:0/9")], [],
     ("10.0.0.2:0/9",), [], [], 0),
    ("typed and untyped spellings of one address are one client",
     ["10.0.0.1"], [s(GWA, A1)], [img(("v2:" + A1,), ("any:" + A1,))],
     (A1,), [("i1", A1)], [], 0),
    ("IPv6",
     ["fd00:0::1"], [s(GWB, "[fd00::2]:0/2")], [img(("[fd00::1]:0/1", "[fd00::2]:0/2"), ("[fd00::1]:0/1",))],
     ("[fd00::1]:0/1",), [("i1", "[fd00::1]:0/1")], [], 0),
    ("nothing left", ["10.0.0.1"], [s(GWB, B1)], [img((B1,))], (), [], [], 0),
]


@pytest.mark.parametrize("name,ips,sessions,images,blocklist,breaks,spared_owners,spared", CASES,
                         ids=[c[0] for c in CASES])
def test_plan(name: str, ips: list[str], sessions: list[MonSession], images: list[ImageClients],
              blocklist: tuple[str, ...], breaks: list[tuple[str, str]], spared_owners: list[tuple[str, str]],
              spared: int) -> None:
    p = plan(GWA, ips, sessions, images)
    assert p.blocklist == blocklist
    assert [(i, o) for _, i, o in p.breaks] == breaks
    assert [(i, o) for _, i, o in p.spared_owners] == spared_owners
    assert p.spared == spared
    assert p.by_session | p.by_ip == set(p.blocklist)


def test_lingering_counts_only_what_no_session_explains() -> None:
    p = plan(GWA, ["10.0.0.1"], [s(GWA, A1)], [img((A1, A2), (A1,))])
    assert p.by_session == {A1} and p.by_ip == {A2}


ADDR = st.builds(lambda ip, nonce: f"10.0.0.{ip}:0/{nonce}", st.integers(1, 3), st.integers(1, 6))
ENTITY = st.sampled_from([GWA, GWB, ADMIN])


@settings(max_examples=300, deadline=None)
@given(sessions=st.lists(st.builds(lambda e, a: s(e, a), ENTITY, ADDR), max_size=8),
       images=st.lists(st.builds(lambda w, o: img(tuple(w), tuple(o[:1])), st.lists(ADDR, max_size=4),
                                 st.lists(ADDR, max_size=1)), max_size=3),
       ips=st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), max_size=3))
def test_never_fences_another_entitys_session_nor_breaks_an_unfenced_lock(
        sessions: list[MonSession], images: list[ImageClients], ips: list[str]) -> None:
    p = plan(GWA, ips, sessions, images)
    mine = {a for x in sessions if x.entity == GWA for a in x.addrs}
    theirs = {a for x in sessions if x.entity != GWA for a in x.addrs} - mine
    assert not set(p.blocklist) & theirs
    assert mine <= set(p.blocklist)
    assert all(o in p.blocklist for _, _, o in p.breaks)
    assert len(p.breaks) + len(p.spared_owners) == sum(len(i.owners) for i in images)
    for a in p.by_ip:
        assert addr_ip(a) in ips


@pytest.mark.parametrize("addr,ip", [
    ("127.0.0.1:0/4711", "127.0.0.1"), ("[fd00::5]:0/7", "fd00::5"), ("v2:10.1.2.3:6800/99", "10.1.2.3"),
    ("any:10.1.2.3:0/1", "10.1.2.3"), ("10.0.0.1", "10.0.0.1"), ("::1", "::1"), ("[v2:10.0.0.4:0/5]", "10.0.0.4"),
    ("nonsense", None), ("", None), ("host.example:0/1", None)])
def test_addr_ip(addr: str, ip: str | None) -> None:
    assert addr_ip(addr) == ip


def test_normalize() -> None:
    assert normalize(" v2:10.0.0.1:0/5 ") == "10.0.0.1:0/5"
    assert normalize("[v1:10.0.0.1:0/5]") == "10.0.0.1:0/5"
    assert normalize("[fd00::1]:0/5") == "[fd00::1]:0/5"


def test_identity_is_small_with_a_thousand_luns() -> None:
    sessions = [s(GWA, f"10.0.0.1:0/{n}") for n in range(1000)] + [s(GWB, "10.0.0.2:0/1")]
    ident = identity_of(GWA, ["10.0.0.1:0/99999"], sessions)
    assert ident == {"v": 1, "entity": GWA, "ips": ["10.0.0.1"]}
    many = identity_of(GWA, [], [s(GWA, f"10.{n // 250}.{n % 250}.1:0/{n}") for n in range(1000)])
    assert len(many["ips"]) == MAX_IPS and len(json.dumps(many)) < 4096


@pytest.mark.parametrize("identity,fallback,entity,ips,problems", [
    ({}, GWA, GWA, set(), 0),
    ({}, "", "", set(), 0),
    ({"v": 1, "entity": GWB, "ips": ["10.0.0.2"]}, GWA, GWB, {"10.0.0.2"}, 0),
    ({"entity": "osd.0", "ips": ["10.0.0.2"]}, GWA, GWA, {"10.0.0.2"}, 1),
    ({"entity": "client.with space"}, GWA, GWA, set(), 1),
    ({"entity": 7}, "", "", set(), 1),
    ({"entity": GWA, "ips": "10.0.0.1"}, GWA, GWA, set(), 1),
    ({"entity": GWA, "ips": ["10.0.0.1", "bogus", 3, "fd00:0::1"]}, GWA, GWA, {"10.0.0.1", "fd00::1"}, 2),
])
def test_read_identity(identity: dict[str, Any], fallback: str, entity: str, ips: set[str], problems: int) -> None:
    got_entity, got_ips, got_problems = read_identity(identity, fallback)
    assert (got_entity, set(got_ips), len(got_problems)) == (entity, ips, problems)
