"""The LIO backend's pure parts: krbd's parsers, the configfs readers on a tree of plain files, the record,
the backend-neutral spec and the option checks. The real kernel is tier 4 (tests/lio)."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest

from agent.backend import PluginContext
from agent.core.model import Chap, Disk, PathSpec
from agent.core.targetspec import TargetSpec
from agent.errors import ConfigError, PermanentBackendError, TransientBackendError
from plugins.lio import configfs
from plugins.lio.backend import LioBackend
from plugins.lio.krbd import (Mapping, MapRequest, Monitors, made_by, map_line, options_of, parse_keyring,
                              parse_mon_host, read_conf_value)
from plugins.lio.record import MappingRef, Owned, Record, RecordFile
from plugins.tgt.record import Entry

DISK = Disk(id="d1", name="vm", iqn="iqn.2016-05.io.pathagent:VM1", serial="6f1e07c2-8c84-4e55-9d59-2ad1a0e5b3f1",
            paths=(PathSpec(2, "fd00::5", 64), PathSpec(1, "198.18.7.10", 24)), pool="rbd", image="img", size=1 << 30,
            initiators=("iqn.1993-08.org.debian:01:ABC",), chap=Chap("u", "p"), mutual_chap=None)


@pytest.mark.parametrize("text,want", [
    ("198.18.0.1", Monitors(("198.18.0.1:6789",), "legacy")),
    ("198.18.0.1:16789, 198.18.0.2:16789", Monitors(("198.18.0.1:16789", "198.18.0.2:16789"), "legacy")),
    ("[v2:198.18.0.1:13300,v1:198.18.0.1:16789]", Monitors(("198.18.0.1:16789",), "legacy")),
    ("[v2:10.0.0.1:3300,v1:10.0.0.1:6789] [v2:10.0.0.2:3300,v1:10.0.0.2:6789]",
     Monitors(("10.0.0.1:6789", "10.0.0.2:6789"), "legacy")),
    ("[v2:10.0.0.1:3300]", Monitors(("10.0.0.1:3300",), "prefer-crc")),
    ("v2:10.0.0.1:3300,v2:10.0.0.2:3300", Monitors(("10.0.0.1:3300", "10.0.0.2:3300"), "prefer-crc")),
])
def test_mon_host_forms(text: str, want: Monitors) -> None:
    assert parse_mon_host(text) == want


@pytest.mark.parametrize("text", ["", "  ", "mon1.example.com", "[v2:mon-a:3300,v1:mon-a:6789]"])
def test_mon_host_refusals(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mon_host(text)


def test_conf_and_keyring() -> None:
    conf = "# c\n[global]\nfsid = x\nmon_host = [v2:1.2.3.4:3300,v1:1.2.3.4:6789] ; comment\n[client]\nmon host = no\n"
    assert read_conf_value(conf, "mon host") == "[v2:1.2.3.4:3300,v1:1.2.3.4:6789]"
    assert read_conf_value("[client]\nmon host = 1.1.1.1\n", "mon host") is None
    ring = "[client.admin]\n\tkey = AAA==\n[client.pathagent-gwa]\n\tkey = BQB0==\n\tcaps mon = \"profile rbd\"\n"
    assert parse_keyring(ring, "pathagent-gwa") == "BQB0=="
    assert parse_keyring(ring, "other") is None


def test_map_line_and_secret_hidden() -> None:
    r = MapRequest(Monitors(("1.2.3.4:6789",)), "pathagent-gwa", "rbd", "img", secret="S3CR3T==",
                   options=("osd_request_timeout=60",))
    assert map_line(r) == "1.2.3.4:6789 name=pathagent-gwa,noshare,secret=S3CR3T==,osd_request_timeout=60 rbd img -"
    assert "S3CR3T" not in repr(r)
    v2 = MapRequest(Monitors(("1.2.3.4:3300",), "prefer-crc"), "a", "rbd", "img")
    assert map_line(v2) == "1.2.3.4:3300 name=a,noshare,ms_mode=prefer-crc rbd img -"
    with pytest.raises(PermanentBackendError, match="image"):
        map_line(MapRequest(Monitors(("1.2.3.4:6789",)), "a", "rbd", "bad image"))


def test_which_mappings_this_backend_made() -> None:
    info = "198.18.0.1:6789 name=pathagent-gwa,noshare,secret=S3CR3T== rbd img -"
    assert options_of(info) == ("name=pathagent-gwa", "noshare")
    m = Mapping(0, "rbd", "img", "-", "client4100", "198.18.0.2:0/1", 1 << 20, options_of(info))
    assert made_by(m, "pathagent-gwa") and not made_by(m, "pathagent-gwb")
    shared = Mapping(1, "rbd", "img", "-", "client4101", "198.18.0.2:0/2", 1 << 20,
                     options_of("198.18.0.1:6789 name=pathagent-gwa rbd img -"))
    assert not made_by(shared, "pathagent-gwa"), "a shared-client mapping (rbd map by hand) is not ours"
    assert options_of("") == ()


def _tree(tmp: Any) -> str:
    root = str(tmp)
    t = os.path.join(root, "iscsi", "iqn.2016-05.io.pathagent:vm1")
    for tag, en in ((1, "1"), (2, "0")):
        d = os.path.join(t, f"tpgt_{tag}")
        os.makedirs(os.path.join(d, "lun", "lun_0"))
        with open(os.path.join(d, "enable"), "w") as f:
            f.write(en + "\n")
        os.symlink("/nowhere", os.path.join(d, "lun", "lun_0", "abc123"))
        os.makedirs(os.path.join(d, "acls", "iqn.x:a"))
        os.makedirs(os.path.join(d, "acls", "iqn.x:b"))
        with open(os.path.join(d, "acls", "iqn.x:a", "info"), "w") as f:
            f.write("InitiatorName: iqn.x:a\nLIO Session ID: 1   ISID: 0x00023d000001  TSIH: 1  SessionType: Normal\n"
                    if tag == 1 else "No active iSCSI Session for Initiator Endpoint: iqn.x:a\n")
        with open(os.path.join(d, "acls", "iqn.x:b", "info"), "w") as f:
            f.write("No active iSCSI Session for Initiator Endpoint: iqn.x:b\n")
        with open(os.path.join(d, "dynamic_sessions"), "w") as f:
            f.write("iqn.x:dyn\n" if tag == 2 else "")
    os.makedirs(os.path.join(t, "tpgt_3"))        # no enable file: half made
    return root


def test_configfs_readers_and_disable(tmp_path: Any) -> None:
    root = _tree(tmp_path)
    iqn = "iqn.2016-05.io.pathagent:VM1"            # any case: the tree is lower-cased
    assert configfs.tpg_tags(iqn, root) == [1, 2, 3]
    assert [configfs.enabled(iqn, t, root) for t in (1, 2, 3, 4)] == [True, False, False, False]
    assert configfs.has_lun(iqn, 1, 0, root) and not configfs.has_lun(iqn, 1, 1, root)
    assert not configfs.has_lun(iqn, 3, 0, root)
    assert configfs.sessions(iqn, root) == {"iqn.x:a", "iqn.x:dyn"}
    assert configfs.sessions("iqn.none:x", root) == set() and configfs.tpg_tags("iqn.none:x", root) == []
    assert configfs.disable(iqn, 1, root) is True
    assert not configfs.enabled(iqn, 1, root)
    assert configfs.disable(iqn, 2, root) is True and configfs.disable(iqn, 9, root) is False


def test_configfs_parsers() -> None:
    assert not configfs.parse_acl_info("")
    assert not configfs.parse_acl_info("No active iSCSI Session for Initiator Endpoint: iqn.a\n")
    assert configfs.parse_acl_info("InitiatorName: iqn.a\n")
    assert configfs.parse_dynamic_sessions("iqn.a\niqn.b\n\n") == {"iqn.a", "iqn.b"}


def test_record_roundtrip_and_damage(tmp_path: Any) -> None:
    f = RecordFile(str(tmp_path / "lio" / "record.json"))
    assert f.load() == Record()
    o = Owned("d1", "iqn.a:b", "block", "pathagent-d1", MappingRef(3, "rbd", "img", "1.2.3.4:0/99"), (1, 2))
    f.save(Record().with_disk(o))
    assert f.load().disks == {"d1": o}
    assert f.load().without("d1").disks == {}
    with open(f.path, "w") as fh:
        json.dump({"version": 7, "disks": {}}, fh)
    with pytest.raises(TransientBackendError, match="damaged"):
        f.load()
    with open(f.path, "w") as fh:
        fh.write("{not json")
    with pytest.raises(TransientBackendError, match="cannot read"):
        f.load()


def test_target_spec_is_what_both_backends_present() -> None:
    s = TargetSpec.of(DISK, port=3260, lun=0)
    assert [t.tag for t in s.tpgs] == [1, 2]
    assert [t.portal for t in s.tpgs] == ["198.18.7.10:3260", "[fd00::5]:3260"]
    assert s.admits("IQN.1993-08.org.debian:01:abc") and not s.admits("iqn.other:x")
    assert s.accounts() == [(Chap("u", "p"), False)]
    assert TargetSpec.of(Disk(**{**{f: getattr(DISK, f) for f in DISK.__dataclass_fields__},
                                 "initiators": None})).admits("iqn.any:x")
    e = Entry.of(DISK, {1: "198.18.7.10"})
    assert (e.iqn, e.serial, e.initiators, e.chap, e.size) == (s.iqn, s.serial, s.initiators, s.chap, s.size)


def test_options_are_checked_without_touching_anything(tmp_path: Any) -> None:
    ctx = PluginContext(node="gwa", state_dir=str(tmp_path))
    b = LioBackend(ctx)
    assert b.backstore == "block" and b.dbroot == ""
    assert not os.path.exists(tmp_path / "lio")           # constructing touches nothing
    assert b.exported() == frozenset() and b.logged_in() == {}
    with pytest.raises(ConfigError) as e:
        LioBackend(PluginContext(node="gwa", state_dir=str(tmp_path),
                                 options={"backstore": "fileio", "dbroot": "rel", "monitors": "mon.example",
                                          "map_options": "noshare", "fence_timeout": 0}))
    msg = str(e.value)
    for key in ("backstore", "dbroot", "monitors", "map_options", "fence_timeout"):
        assert f"target.lio.{key}" in msg, msg
