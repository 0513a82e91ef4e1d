from __future__ import annotations

import pytest

from agent.core import keys
from agent.core.store import next_index
from agent.core.lease import Lease
from agent.core.model import PathKey


def test_lease_expires_fence_after_the_send_time_of_the_last_success() -> None:
    lease = Lease(4.0)
    assert lease.expired(0.0), "no confirmation yet means no lease"
    lease = lease.confirm(10.0)
    assert not lease.expired(13.9)
    assert lease.expired(14.0)
    assert lease.confirm(9.0).deadline() == 14.0, "an older answer never moves the deadline back"
    assert lease.confirm(12.0).deadline() == 16.0
    assert lease.reset().expired(10.0)


@pytest.mark.parametrize("sent,got,expected", [
    (0, 52, 52), (52, 53, 53), (53, 53, 53), (53, 12, 0), (10, 0, 0), (10, -1, 0)])
def test_blocking_index_rule(sent: int, got: int, expected: int) -> None:
    assert next_index(sent, got) == expected


@pytest.mark.parametrize("key,expected", [
    ("pa/disks/d1", ("disk", "d1")),
    ("pa/disks/d1/2", ("path", PathKey("d1", 2))),
    ("pa/disks/d1/02", None),
    ("pa/disks/d1/0", None),
    ("pa/disks/d1/x", None),
    ("pa/disks/D1", None),
    ("pa/nodes/gw1", ("node", "gw1")),
    ("pa/moves/d1/3", ("move", PathKey("d1", 3))),
    ("pa/other/thing", None),
    ("other/disks/d1", None),
    ("pa/disks/d1/2/extra", None),
])
def test_key_layout_parse(key: str, expected: object) -> None:
    assert keys.parse("pa", key) == expected


def test_key_layout_roundtrip() -> None:
    p = PathKey("abc", 7)
    assert keys.parse("x/y", keys.path_key("x/y", p)) == ("path", p)
    assert keys.parse("x/y", keys.disk_key("x/y", "abc")) == ("disk", "abc")
    assert keys.parse("x/y", keys.node_key("x/y", "n")) == ("node", "n")
    assert keys.parse("x/y", keys.move_key("x/y", p)) == ("move", p)
