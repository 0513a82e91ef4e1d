"""Uniqueness claims (``agent.core.claims``): which keys a disk needs, what stands in the way, and what a
claim transaction must create, keep and drop. Pure, table-driven."""
from __future__ import annotations

import pytest

from agent.core import claims
from agent.core.claims import ClaimValue, Conflict, Held

V = {d: ClaimValue(d, "rbd", f"pathagent-{d}") for d in ("aaaa0001", "bbbb0002")}


def held(**kv: tuple[str, int]) -> dict[tuple[str, str], Held]:
    """``ip_198_18_0_1=("aaaa0001", 7)`` -> {("ip", "198.18.0.1"): Held(...)}."""
    out = {}
    for k, (disk, index) in kv.items():
        kind, _, value = k.partition("_")
        out[(kind, value.replace("_", "."))] = Held(V.get(disk), index)
    return out


def test_wanted_normalises_the_name_and_dedups_ips() -> None:
    assert claims.wanted("VM", "iqn.2016-05.io.x:a", ["198.18.0.1", "198.18.0.1"]) == frozenset(
        {("name", "vm"), ("iqn", "iqn.2016-05.io.x:a"), ("ip", "198.18.0.1")})


@pytest.mark.parametrize("have,definitions,expect", [
    ({}, {}, []),
    (held(ip_198_18_0_1=("aaaa0001", 5)), {}, []),                                 # ours
    (held(ip_198_18_0_1=("bbbb0002", 5)), {}, [Conflict(("ip", "198.18.0.1"), "bbbb0002")]),
    ({("ip", "198.18.0.1"): Held(None, 5)}, {}, [Conflict(("ip", "198.18.0.1"), "?")]),   # unreadable: taken
    ({}, {"bbbb0002": frozenset({("name", "vm")})}, [Conflict(("name", "vm"), "bbbb0002", "definition")]),
    ({}, {"aaaa0001": frozenset({("name", "vm")})}, []),                            # our own definition
])
def test_conflicts(have: dict[tuple[str, str], Held], definitions: dict[str, frozenset[tuple[str, str]]],
                   expect: list[Conflict]) -> None:
    want = claims.wanted("vm", "iqn.2016-05.io.x:a", ["198.18.0.1"])
    assert claims.conflicts("aaaa0001", want, have, definitions) == expect


def test_plan_creates_the_missing_keeps_ours_and_drops_the_old() -> None:
    have = held(ip_198_18_0_1=("aaaa0001", 5), ip_198_18_0_9=("aaaa0001", 6), name_vm=("aaaa0001", 7),
                ip_198_18_0_2=("bbbb0002", 8))
    want = claims.wanted("vm", "iqn.2016-05.io.x:a", ["198.18.0.1", "198.18.0.3"])
    p = claims.plan("aaaa0001", want, have)
    assert p.create == (("ip", "198.18.0.3"), ("iqn", "iqn.2016-05.io.x:a"))
    assert p.keep == ((("ip", "198.18.0.1"), 5), (("name", "vm"), 7))
    assert p.drop == ((("ip", "198.18.0.9"), 6),)       # never another disk's


def test_claim_values_round_trip_and_garbage_is_none() -> None:
    v = ClaimValue("aaaa0001", "rbd", "legacy", "vm", "import")
    assert ClaimValue.decode(v.encode()) == v
    for raw in (None, b"", b"{", b"[]", b'{"disk": 5}', b'{"disk": "NOT AN ID"}', b"x" * 5000):
        assert ClaimValue.decode(raw) is None
    assert claims.registry({("name", "vm"): Held(v, 3), ("ip", "198.18.0.1"): Held(v, 4)}) == {
        "aaaa0001": (("name", "vm"), Held(v, 3))}
