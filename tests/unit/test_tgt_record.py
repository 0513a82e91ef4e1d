"""The tgt record: bound to one tgtd instance, version-1 records adopted, conflicts, secrets on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.core.model import Chap
from agent.errors import PermanentBackendError
from plugins.tgt.record import Entry, RecordFile, Stored, check_conflicts, passwords


def entry(disk: str = "d1", iqn: str = "iqn.x:d1", chap: Chap | None = None, mutual: Chap | None = None) -> Entry:
    return Entry(disk=disk, iqn=iqn, pool="rbd", image=f"img-{disk}", serial="s", initiators=None, chap=chap,
                 mutual_chap=mutual, paths={1: "10.0.0.1", 2: "10.0.0.2"})


def test_round_trip_and_mode(tmp_path: Path) -> None:
    f = RecordFile(str(tmp_path / "tgt" / "exports.json"))
    assert f.load() == Stored()
    e = entry(chap=Chap("alice", "pw-1"), mutual=Chap("tgt", "pw-2"))
    f.save("123 456", "mark", {"d1": e})
    assert f.load() == Stored(tgtd="123 456", fence="mark", disks={"d1": e})
    assert os.stat(f.path).st_mode & 0o077 == 0
    assert os.stat(tmp_path / "tgt").st_mode & 0o077 == 0


def test_the_record_is_bound_to_one_tgtd(tmp_path: Path) -> None:
    f = RecordFile(str(tmp_path / "exports.json"))
    f.save("123 456", "", {"d1": entry()})
    assert f.load().disks_for("123 456") == {"d1": entry()}
    assert f.load().disks_for("123 999") == {}          # pid reused, or another tgtd: its exports are not ours
    f.save(None, "", {"d1": entry()})
    assert f.load().disks_for("123 456") == {}


def test_the_size_is_recorded_and_an_old_entry_without_it_reads_as_unknown(tmp_path: Path) -> None:
    from agent.core.model import Disk, PathSpec
    d = Disk(id="d1", name="d1", iqn="iqn.x:d1", serial="s", paths=(PathSpec(1, "10.0.0.1", 24),), pool="rbd",
             image="img-d1", size=96 << 20)
    e = Entry.of(d, {1: "10.0.0.1"})
    assert e.size == 96 << 20 and e.with_paths({2: "10.0.0.2"}).size == 96 << 20
    f = RecordFile(str(tmp_path / "exports.json"))
    f.save("1 2", "", {"d1": e})
    assert f.load().disks["d1"] == e
    old = e.to_json()
    del old["size"]
    assert Entry.from_json("d1", old).size == 0
    assert Entry.from_json("d1", {**old, "size": None}).size == 0


def test_a_version_1_record_is_adopted_by_the_running_tgtd(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    path.write_text(json.dumps({"version": 1, "disks": {"d1": entry().to_json()}}))
    assert RecordFile(str(path)).load().disks_for("77 88") == {"d1": entry()}


def test_an_unreadable_record_is_permanent(tmp_path: Path) -> None:
    path = tmp_path / "exports.json"
    path.write_text("{not json")
    with pytest.raises(PermanentBackendError, match="unreadable"):
        RecordFile(str(path)).load()


def test_conflicts() -> None:
    a = entry(chap=Chap("shared", "one"))
    check_conflicts(a, {"d1": a})
    check_conflicts(entry("d2", "iqn.x:d2", chap=Chap("shared", "one")), {"d1": a})
    with pytest.raises(PermanentBackendError, match="IQN iqn.x:d1 is already exported for disk d1"):
        check_conflicts(entry("d2", "iqn.x:d1"), {"d1": a})
    with pytest.raises(PermanentBackendError, match="'shared'") as e:
        check_conflicts(entry("d2", "iqn.x:d2", chap=Chap("shared", "two")), {"d1": a})
    assert "one" not in str(e.value) and "two" not in str(e.value)
    with pytest.raises(PermanentBackendError):       # one disk cannot use a user twice with two passwords
        check_conflicts(entry("d3", "iqn.x:d3", chap=Chap("u", "1"), mutual=Chap("u", "2")), {})
    assert passwords({"d1": a}) == {"shared": "one"}
