"""Decoding every key kind (``agent.core.tree``): nothing under the prefix may wedge a watcher (finding H5)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.model import PathKey, PathState
from agent.core.tree import (KVEntry, decode_disk, disk_value, lock_value, move_value, node_value, overlay,
                             parse_tree)

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


def test_overlay_shows_our_newer_writes_only() -> None:
    p = PathKey("d1", 1)
    view = parse_tree(P, [e("disks/d1", disk_value("rbd", "i")), e("disks/d1/1", b"", None, mi=5)])
    mine = overlay(view, {p: PathState(p, 6, "s1", "gwa")}, "gwa", "s1")
    assert mine.paths[p].session == "s1" and mine.nodes == {"gwa": "s1"}
    stale = overlay(view, {p: PathState(p, 4, "s1", "gwa")})
    assert stale.paths[p].session is None, "the view is newer than our write: the view wins"
    gone = overlay(parse_tree(P, []), {p: PathState(p, 6, "s1", "gwa")})
    assert p not in gone.paths, "a deleted key is not brought back"
