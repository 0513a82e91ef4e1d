"""Decoding every key kind (``agent.core.tree``): nothing under the prefix may wedge a watcher (finding H5)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.model import PathKey, PathState
from agent.core.tree import (MAX_PEERS, KVEntry, decode_disk, decode_logins, decode_peers, disk_value, lock_value,
                             login_sets, logins_by_disk, logins_value, move_value, node_value, overlay, parse_tree,
                             release_value)

P = "pa"


def e(key: str, value: bytes | None = b"", session: str | None = None, mi: int = 5) -> KVEntry:
    return KVEntry(f"{P}/{key}", value, mi, 1, 1 if session else 0, session)


POISON = [
    ("deep nesting", b"[" * 100000),
    ("deep object", b'{"a":' * 50000),
    ("huge", b'{"node": "' + b"x" * 100000 + b'"}'),
    ("binary", b"\xff\xfe\x00\x01"),
    ("not json", b"{node: gwa}"),
    ("a list", b'["gwa"]'),
    ("wrong types", b'{"node": 7, "pool": [], "image": {}, "rev": "3", "stopping": "yes"}'),
    ("nan", b'{"node": NaN}'),
]


@pytest.mark.parametrize("name,value", POISON, ids=[p[0] for p in POISON])
def test_poisoned_values_are_skipped_with_their_key(name: str, value: bytes) -> None:
    entries = [
        e("disks/d1", disk_value("rbd", "img1")), e("disks/d1/1", lock_value("gwa", "s1", 1.0), "s1"),
        e("disks/d2", value), e("disks/d2/1", value, "s2"), e("moves/d1/1", value, "cli"),
        e("nodes/gwb", value, "s2"),
    ]
    view = parse_tree(P, entries)
    skipped = {k for k, _ in view.skipped}
    assert f"{P}/disks/d2" in skipped
    assert view.disks["d1"].pool == "rbd", "the good disk is unaffected"
    assert view.paths[PathKey("d1", 1)] == PathState(PathKey("d1", 1), 5, "s1", "gwa")
    assert "d2" in view.disks and view.disks["d2"].pool == "", "a started disk stays started, unreadable"
    assert view.paths[PathKey("d2", 1)].session == "s2", "a held path keeps counting by its session"
    assert view.nodes["gwb"] == "s2", "a live node keeps counting by its session"
    assert PathKey("d1", 1) not in view.moves


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["disks/d1", "disks/d1/1", "disks/x/2", "nodes/n", "moves/d1/1",
                                           "disks/D", "other", "disks/d1/0", "disks/d1/1/x"]),
                          st.one_of(st.none(), st.binary(max_size=64), st.text(max_size=64).map(str.encode)),
                          st.one_of(st.none(), st.just("s1")))))
def test_parse_tree_never_raises(items: list[tuple[str, bytes | None, str | None]]) -> None:
    view = parse_tree(P, [e(k, v, s) for k, v, s in items])
    assert all(isinstance(k, str) for k, _ in view.skipped)


def test_live_move_requests_are_the_locked_ones() -> None:
    view = parse_tree(P, [e("moves/d1/1", move_value("gwb"), "cli"), e("moves/d1/2", move_value("gwb"))])
    assert view.moves == {PathKey("d1", 1): "gwb"}, "an unlocked (left over) request counts for nothing"


def test_disk_record_roundtrip_with_rev_and_stopping() -> None:
    r = decode_disk("d1", disk_value("rbd", "img", 3, stopping=True), 42)
    assert (r.pool, r.image, r.rev, r.stopping, r.modify_index) == ("rbd", "img", 3, True, 42)
    assert decode_disk("d1", disk_value("rbd", "img"), 1).stopping is False


def test_node_records_count_only_when_locked() -> None:
    view = parse_tree(P, [e("nodes/gwa", node_value("gwa", "s1", 1.0, "tgt"), "s1"), e("nodes/gwb", b"")])
    assert view.nodes == {"gwa": "s1"}


def test_backends_of_the_live_agents() -> None:
    view = parse_tree(P, [e("nodes/gwa", node_value("gwa", "s1", 1.0, "tgt"), "s1"),
                          e("nodes/gwb", node_value("gwb", "s2", 1.0, "lio"), "s2"),
                          e("nodes/gwc", node_value("gwc", "s3", 1.0, "tgt"), "s3"),
                          e("nodes/gwd", node_value("gwd", "", 1.0, "fake")),         # stopped: not counted
                          e("nodes/gwe", b'{"node": "gwe", "session": "s5", "backend": 7}', "s5")])
    assert view.backends() == {"lio": ("gwb",), "tgt": ("gwa", "gwc")}
    assert view.records["gwe"].backend == "" and view.nodes["gwe"] == "s5", "a bad backend never drops a record"
    assert parse_tree(P, [e("nodes/gwa", node_value("gwa", "s1", 1.0, "tgt"), "s1")]).backends() == {"tgt": ("gwa",)}


def test_overlay_shows_our_newer_writes_only() -> None:
    p = PathKey("d1", 1)
    view = parse_tree(P, [e("disks/d1", disk_value("rbd", "i")), e("disks/d1/1", b"", None, mi=5)])
    mine = overlay(view, {p: PathState(p, 6, "s1", "gwa")}, "gwa", "s1")
    assert mine.paths[p].session == "s1" and mine.nodes == {"gwa": "s1"}
    stale = overlay(view, {p: PathState(p, 4, "s1", "gwa")})
    assert stale.paths[p].session is None, "the view is newer than our write: the view wins"
    gone = overlay(parse_tree(P, []), {p: PathState(p, 6, "s1", "gwa")})
    assert p not in gone.paths, "a deleted key is not brought back"


PEERS = (("198.18.0.50", 40000, 3260), ("198.18.0.51", 40001, 3260))


def test_a_released_key_records_connections_and_stays_an_orderly_release() -> None:
    p = PathKey("d1", 1)
    assert release_value() == b"", "a plain release still writes an empty value"
    d1 = e("disks/d1", disk_value("rbd", "i"))
    view = parse_tree(P, [d1, e("disks/d1/1", release_value(PEERS[::-1]))])
    assert view.paths[p] == PathState(p, 5, None, None, None, PEERS), "sorted, and no orphan"
    held = parse_tree(P, [d1, e("disks/d1/1", lock_value("gwb", "s2", 1.0, PEERS), "s2")])
    assert held.paths[p] == PathState(p, 5, "s2", "gwb", None, PEERS), "the taker keeps them in its lock value"
    orphan = parse_tree(P, [d1, e("disks/d1/1", lock_value("gwb", "s2", 1.0, PEERS))])
    assert orphan.paths[p].orphan_of == "gwb" and orphan.paths[p].peers == (), "an orphan's value is not a record"
    assert decode_peers(release_value([("10.0.0.1", i, 3260) for i in range(1, 100)])) == tuple(
        ("10.0.0.1", i, 3260) for i in sorted(range(1, 100))[:MAX_PEERS]), "at most MAX_PEERS are written"


@pytest.mark.parametrize("value", [
    b'{"peers": "x"}', b'{"peers": [["10.0.0.1", 1]]}', b'{"peers": [["10.0.0.1", 0, 3260]]}',
    b'{"peers": [["10.0.0.1", 70000, 3260]]}', b'{"peers": [["::1", 1, 3260]]}',
    b'{"peers": [["10.0.0.1", true, 3260]]}',
    b'{"peers": [["x", 1, 2]]}', b"\xff", b"[1]", b'{"peers": [' + b",".join([b'["10.0.0.1", 1, 2]'] * 65) + b"]}",
])
def test_malformed_connection_records_read_as_none(value: bytes) -> None:
    assert decode_peers(value) == ()
    view = parse_tree(P, [e("disks/d1", disk_value("rbd", "i")), e("disks/d1/1", value),
                          e("disks/d1/2", value, "s1")])
    assert view.paths[PathKey("d1", 2)].session == "s1", "a held key counts by its session whatever its value"


# --- logins reports ({prefix}/logins/{node}) -------------------------------------------------------------

INI1, INI2 = "iqn.1993-08.org.debian:01:aaa", "iqn.1993-08.org.debian:01:bbb"


def test_logins_report_round_trip() -> None:
    v = logins_value("gwa", "s1", 1.5, {"d1": [INI2, INI1], "d2": frozenset({INI1}), "d3": []})
    assert decode_logins(v) == ("gwa", "s1", {"d1": frozenset({INI1, INI2}), "d2": frozenset({INI1})})
    assert v == logins_value("gwa", "s1", 1.5, {"d2": [INI1], "d1": [INI1, INI2]}), "one encoding per report"
    assert b'"d1":["%s","%s"]' % (INI1.encode(), INI2.encode()) in v and b'"since":1.5' in v
    assert decode_logins(logins_value("gwa", "s1", 1.0, {})) == ("gwa", "s1", {})


def test_logins_encoder_writes_only_what_the_decoder_accepts() -> None:
    v = logins_value("gwa", "s1", 1.0, {"d1": [INI1, "", "bad\nname", "x" * 300], "Not-A-Disk": [INI1],
                                        "d2": "iqn.as.a.string"})
    assert decode_logins(v) == ("gwa", "s1", {"d1": frozenset({INI1})})
    assert login_sets({"d1": [INI1], "d2": [], "BAD": [INI1]}) == {"d1": frozenset({INI1})}


@pytest.mark.parametrize("value", [
    None, b"", b"not json", b"[]", b"\xff\xfe", b"[" * 100000, b'{"node": "gwa", "session": "s1"}',
    b'{"node": "gwa", "session": "s1", "disks": []}',
    b'{"node": "gwa", "session": "s1", "disks": {"d1": "iqn"}}',
    b'{"node": "gwa", "session": "s1", "disks": {"d1": [7]}}',
    b'{"node": "gwa", "session": "s1", "disks": {"BAD/ID": ["iqn"]}}',
    b'{"node": "", "session": "s1", "disks": {}}', b'{"node": "gwa", "session": 3, "disks": {}}',
    b'{"node": "gwa", "session": "s1", "disks": {"d1": ["' + b"x" * (600 * 1024) + b'"]}}',
], ids=lambda v: repr(v)[:40])
def test_decode_logins_rejects_garbage(value: bytes | None) -> None:
    assert decode_logins(value) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.sampled_from(["node", "session", "disks", "d1", "x"]), inner,
                                                max_size=4), max_leaves=20)
                 .map(lambda d: json.dumps(d).encode())))
def test_decode_logins_never_raises(value: bytes | None) -> None:
    got = decode_logins(value)
    assert got is None or (isinstance(got[0], str) and isinstance(got[2], dict))


def test_logins_by_disk_counts_only_locked_reports() -> None:
    entries = [
        e("logins/gwa", logins_value("gwa", "sa", 1.0, {"d1": [INI1], "d2": [INI2]}), "sa"),
        e("logins/gwb", logins_value("gwb", "sb", 1.0, {"d1": [INI1, INI2]}), "sb"),
        e("logins/gwc", logins_value("gwc", "sc", 1.0, {"d1": [INI2]})),          # its agent is gone
        e("logins/gwd", b"garbage", "sd"),                                          # unreadable: skipped
        e("logins/gwe", logins_value("gwe", "se", 1.0, {}), "se"),                  # nobody logged in there
        e("logins/gwf/x", logins_value("gwf", "sf", 1.0, {"d1": [INI1]}), "sf"),   # not a logins key
        e("disks/d1", disk_value("rbd", "img"), "sa"),
        KVEntry("other/logins/gwg", logins_value("gwg", "sg", 1.0, {"d1": [INI1]}), 5, 1, 1, "sg"),
    ]
    assert logins_by_disk(P, entries) == {"d1": {"gwa": frozenset({INI1}), "gwb": frozenset({INI1, INI2})},
                                          "d2": {"gwa": frozenset({INI2})}}
    # the node is the key's, whatever the value names
    assert logins_by_disk(P, [e("logins/gwa", logins_value("elsewhere", "sa", 1.0, {"d1": [INI1]}), "sa")]) \
        == {"d1": {"gwa": frozenset({INI1})}}
    assert logins_by_disk(P, []) == {}


def test_agents_ignore_logins_reports() -> None:
    view = parse_tree(P, [e("logins/gwa", b"garbage", "sa"), e("nodes/gwa", node_value("gwa", "sa", 1.0, "tgt"), "sa")])
    assert view.skipped == () and view.nodes == {"gwa": "sa"}
