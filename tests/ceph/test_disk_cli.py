"""``pathagent disk …`` end to end: the real console script as a subprocess, against a real micro Ceph
cluster and a real Consul server. Checks outputs (text and ``--json``), Consul keys, RBD images, refusals,
exit codes, and that the CHAP secrets never appear in any output."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.core import schema
from diskcli import INIT1, INIT2, MUTUAL, PATHAGENT, SECRET, Cli
from lab.ceph import MicroCeph

pytestmark = pytest.mark.ceph

@pytest.fixture(scope="module")
def cli(micro_ceph: MicroCeph, consul_http: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not PATHAGENT.exists():
        pytest.skip(f"{PATHAGENT} missing: run `bash scripts/setup`")
    c = Cli(tmp_path_factory.mktemp("cli"), micro_ceph, consul_http, f"t{uuid.uuid4().hex[:6]}")
    yield c
    c.ceph.close()


def test_create_show_list(cli: Cli) -> None:
    disk_id = cli.create("vm1", "--initiator", INIT1, "--chap-user", "alice",
                         "--chap-password-file", str(cli.secret_file),
                         "--mutual-chap-user", "target", "--mutual-chap-password-file", str(cli.mutual_file))
    assert len(disk_id) == 8 and int(disk_id, 16) >= 0
    # the image exists with the definition, the secret stored only there
    doc = json.loads(cli.ceph.get_meta("rbd", f"pathagent-{disk_id}", schema.META_KEY) or "")
    assert doc["chap"] == {"user": "alice", "password": SECRET}
    assert doc["mutual_chap"] == {"user": "target", "password": MUTUAL}
    assert doc["iqn"] == f"iqn.2016-05.io.pathagent:{disk_id}"
    assert str(uuid.UUID(doc["serial"])) == doc["serial"]
    shown = cli.json("disk", "show", disk_id)
    assert shown["id"] == disk_id and shown["name"] == "vm1" and shown["started"] is False
    assert shown["size"] == 4 << 20 and shown["initiators"] == [INIT1] and shown["open"] is False
    assert shown["chap"] == {"user": "alice", "password": "***"}
    assert [(p["index"], p["ip"], p["prefix"]) for p in shown["paths"]] == [(1, f"198.19.{cli.n}.10", 24),
                                                                           (2, f"198.19.{cli.n}.11", 24)]
    text = cli.ok("disk", "show", disk_id)
    assert "password ***" in text and INIT1 in text and "stopped" in text
    listed = {d["id"]: d for d in cli.json("disk", "list")}
    assert listed[disk_id]["name"] == "vm1" and listed[disk_id]["valid"] is True
    assert disk_id in cli.ok("disk", "list")


def test_create_json_and_options(cli: Cli) -> None:
    out = cli.json("disk", "create", "vm2", "--size", "1.5M", "--path", "198.18.2.10/25", "--open",
                   "--iqn", "iqn.2001-04.com.example:storage.vm2")
    assert out["id"] and out["size"] == 1536 * 1024 and out["open"] is True and out["initiators"] == []
    assert out["iqn"] == "iqn.2001-04.com.example:storage.vm2" and out["chap"] is None
    assert out["pool"] == "rbd" and out["image"] == f"pathagent-{out['id']}"
    cli.ok("disk", "delete", out["id"])
    tagged = cli.json("disk", "create", "vm3", "--size", "1M", "--path", "198.18.2.20/25,vlan=20,role=iscsi-a",
                      "--path", "198.18.2.21/25,role=iscsi-b", "--open")
    shown = cli.json("disk", "show", tagged["id"])
    assert [(p["ip"], p["vlan"], p["role"]) for p in shown["paths"]] == \
        [("198.18.2.20", 20, "iscsi-a"), ("198.18.2.21", None, "iscsi-b")]
    assert "1: 198.18.2.20/25 vlan 20 role iscsi-a" in cli.ok("disk", "show", tagged["id"])
    cli.ok("disk", "delete", tagged["id"])


@pytest.mark.parametrize("args,words", [
    (["--size", "10X", "--path", "198.18.0.1/24"], "--size"),
    (["--size", "1000", "--path", "198.18.0.1/24"], "multiple of 512"),
    (["--size", "1M", "--path", "198.18.0.1"], "IP/PREFIX"),
    (["--size", "1M", "--path", "198.18.0.999/24"], "--path '198.18.0.999/24' (path 1)"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--path", "198.18.0.1/24"], "(path 2): the same IP as path 1"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--iqn", "not-an-iqn"], "--iqn"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--initiator", "bad iqn"], "--initiator"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--open", "--initiator", INIT1], "--open"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--chap-user", "alice"], "go together"),
    (["--size", "1M", "--path", "198.18.0.1/24", "--chap-user", "alice", "--chap-password-file", "/nonexistent"],
     "No such file"),
    (["--path", "198.18.0.1/24"], "--size"),
])
def test_create_usage_errors(cli: Cli, args: list[str], words: str) -> None:
    before = set(cli.ceph.list_images("rbd"))
    rc, out, err = cli.run("disk", "create", "bad", *args)
    assert rc == 2 and words in err, (rc, out, err)
    assert set(cli.ceph.list_images("rbd")) == before   # nothing created


def test_short_chap_secret_refused_without_echo(cli: Cli, tmp_path: Path) -> None:
    pw = tmp_path / "short.pw"
    pw.write_text("tooShort9")
    rc, out, err = cli.run("disk", "create", "x", "--size", "1M", "--path", "198.18.0.1/24",
                           "--chap-user", "alice", "--chap-password-file", str(pw))
    assert rc == 2 and "--chap-password-file" in err and "12-255" in err and "tooShort9" not in out + err


def test_start_stop_delete_lifecycle(cli: Cli) -> None:
    disk_id = cli.create("life", "--open")
    dkey = f"{cli.prefix}/disks/{disk_id}"
    assert cli.json("disk", "start", disk_id) == {"id": disk_id, "name": "life", "started": True, "paths": [1, 2]}
    kv = cli.kv()
    assert json.loads(kv[dkey]["value"]) == {"pool": "rbd", "image": f"pathagent-{disk_id}"}
    assert kv[f"{dkey}/1"]["value"] == b"" and kv[f"{dkey}/2"]["value"] == b""
    assert kv[dkey]["index"] == kv[f"{dkey}/1"]["index"] == kv[f"{dkey}/2"]["index"]   # one transaction
    assert cli.json("disk", "show", disk_id)["started"] is True

    rc, _, err = cli.run("disk", "start", disk_id)
    assert rc == 1 and "already started" in err
    rc, _, err = cli.run("disk", "delete", disk_id)
    assert rc == 1 and "is started" in err and cli.ceph.image_exists("rbd", f"pathagent-{disk_id}")

    assert cli.json("disk", "stop", disk_id) == {"id": disk_id, "started": False, "was_started": True}
    assert not any(k == dkey or k.startswith(dkey + "/") for k in cli.kv())
    assert cli.json("disk", "stop", disk_id)["was_started"] is False       # idempotent
    assert "was not started" in cli.ok("disk", "stop", disk_id)

    cli.ok("disk", "start", disk_id)                                          # restartable
    cli.ok("disk", "stop", disk_id)
    assert cli.json("disk", "delete", disk_id)["deleted"] is True
    assert not cli.ceph.image_exists("rbd", f"pathagent-{disk_id}")
    rc, _, err = cli.run("disk", "show", disk_id)
    assert rc == 1 and "no disk" in err
    rc, _, err = cli.run("disk", "delete", disk_id)
    assert rc == 1 and "no disk" in err


def test_start_clears_foreign_leftovers_and_handles_32_paths(cli: Cli) -> None:
    paths = [a for i in range(32) for a in ("--path", f"198.18.{i}.20/24")]
    disk_id = cli.ok("disk", "create", "wide", "--size", "1M", *paths).strip().splitlines()[-1]
    dkey = f"{cli.prefix}/disks/{disk_id}"
    requests.put(f"http://{cli.consul}/v1/kv/{dkey}/99", data=b"junk", timeout=5).raise_for_status()
    cli.ok("disk", "start", disk_id)   # 35 operations: fits Consul's 64 per transaction
    keys = sorted(int(k.rsplit("/", 1)[1]) for k in cli.kv() if k.startswith(dkey + "/"))
    assert keys == list(range(1, 33))
    cli.ok("disk", "stop", disk_id)
    cli.ok("disk", "delete", disk_id)


def test_update_a_started_disk_wakes_watchers(cli: Cli) -> None:
    disk_id = cli.create("upd", "--initiator", INIT1)
    cli.ok("disk", "start", disk_id)
    dkey = f"{cli.prefix}/disks/{disk_id}"
    before = cli.kv()[dkey]
    # a blocking query on the disk key returns when the CLI touches it
    r = requests.get(f"http://{cli.consul}/v1/kv/{dkey}", timeout=5)
    index = int(r.headers["X-Consul-Index"])
    updated = cli.json("disk", "update", disk_id, "--add-initiator", INIT2, "--chap-user", "bob",
                       "--chap-password-file", str(cli.secret_file))
    assert updated["initiators"] == [INIT1, INIT2] and updated["chap"] == {"user": "bob", "password": "***"}
    assert updated["started"] is True
    t = time.monotonic()
    r = requests.get(f"http://{cli.consul}/v1/kv/{dkey}?index={index}&wait=5s", timeout=10)
    assert time.monotonic() - t < 2 and int(r.headers["X-Consul-Index"]) > index
    after = cli.kv()[dkey]
    assert after["index"] > before["index"]
    assert json.loads(after["value"]) == {"pool": "rbd", "image": f"pathagent-{disk_id}", "rev": 1}
    doc = json.loads(cli.ceph.get_meta("rbd", f"pathagent-{disk_id}", schema.META_KEY) or "")
    assert doc["initiators"] == [INIT1, INIT2] and doc["chap"]["user"] == "bob"
    # path keys untouched: nobody loses a path because of an ACL change
    assert {k for k in cli.kv() if k.startswith(dkey + "/")} == {f"{dkey}/1", f"{dkey}/2"}

    out = cli.json("disk", "update", disk_id, "--remove-initiator", INIT1, "--no-chap")
    assert out["initiators"] == [INIT2] and out["chap"] is None
    assert json.loads(cli.kv()[dkey]["value"])["rev"] == 2
    assert cli.json("disk", "update", disk_id, "--open")["open"] is True
    rc, _, err = cli.run("disk", "update", disk_id, "--closed")          # would lock everyone out
    assert rc == 1 and "--admit-none" in err
    closed = cli.json("disk", "update", disk_id, "--closed", "--admit-none")
    assert closed["open"] is False and closed["initiators"] == []
    rc, _, err = cli.run("disk", "update", disk_id, "--open", "--initiator", INIT1)
    assert rc == 2 and "open" in err
    cli.ok("disk", "stop", disk_id)
    assert cli.json("disk", "update", disk_id, "--name", "renamed")["name"] == "renamed"   # stopped: no key
    assert not any(k.startswith(dkey) for k in cli.kv())
    cli.ok("disk", "delete", disk_id)


def test_invalid_definition_is_reported(cli: Cli) -> None:
    disk_id = cli.create("corrupt")
    image = f"pathagent-{disk_id}"
    doc = json.loads(cli.ceph.get_meta("rbd", image, schema.META_KEY) or "")
    doc["paths"][0]["ip"] = "198.18.0.300"
    cli.ceph.set_meta("rbd", image, schema.META_KEY, json.dumps(doc))
    rc, out, err = cli.run("disk", "show", disk_id)
    assert rc == 1 and f"disk {disk_id}: field 'paths[0].ip': not an IPv4 address" in err
    rc, out, err = cli.run("disk", "show", disk_id, "--json")
    assert rc == 1 and json.loads(out)["error"]["field"] == "paths[0].ip" and json.loads(out)["valid"] is False
    listed = {d["id"]: d for d in cli.json("disk", "list")}
    assert listed[disk_id]["valid"] is False and listed[disk_id]["error"]["field"] == "paths[0].ip"
    assert "INVALID" in cli.ok("disk", "list")
    rc, _, err = cli.run("disk", "start", disk_id)
    assert rc == 1 and "paths[0].ip" in err and f"{cli.prefix}/disks/{disk_id}" not in cli.kv()
    cli.ceph.set_meta("rbd", image, schema.META_KEY, '{"version": 7}')
    rc, _, err = cli.run("disk", "show", disk_id)
    assert rc == 1 and "unsupported version 7" in err
    cli.ok("disk", "delete", disk_id)


def test_ceph_unreachable_is_a_clear_failure(cli: Cli, tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = [v2:127.0.0.1:9,v1:127.0.0.1:10]\nauth client required = none\n")
    cfg = tmp_path / "dead.toml"
    cfg.write_text(cli.config_text(str(conf), 1))
    t = time.monotonic()
    rc, _, err = cli.run("disk", "list", config=cfg)
    assert rc == 1 and "cannot reach the monitors" in err
    assert time.monotonic() - t < 10


def test_usage_and_config_errors(cli: Cli, tmp_path: Path) -> None:
    rc, _, err = cli.run("disk", "frobnicate")
    assert rc == 2
    rc, _, err = cli.run("disk", "show")
    assert rc == 2
    rc, _, err = cli.run("disk", "list", config=tmp_path / "missing.toml")
    assert rc == 2 and "no such file" in err


def test_update_replaces_the_paths_of_a_stopped_disk_and_moves_their_claims(cli: Cli) -> None:
    c, d = cli.ips()
    disk_id = cli.create("repath")
    before = {p["index"]: p["ip"] for p in cli.json("disk", "show", disk_id)["paths"]}
    old = before[1]
    upd = cli.json("disk", "update", "repath", "--path", f"{c}/24,vlan=30", "--path", f"{before[2]}/24")
    assert [(p["index"], p["ip"], p["vlan"]) for p in upd["paths"]] == [(1, c, 30), (2, before[2], None)]
    assert any(n.startswith("paths were ") for n in upd["notes"]), upd["notes"]
    assert [(p["ip"], p["vlan"]) for p in cli.json("disk", "show", disk_id)["paths"]] == [(c, 30), (before[2], None)]
    rc, _, err = cli.run("disk", "create", "takes-new", "--size", "1M", "--path", f"{c}/24", "--open")
    assert rc == 1 and c in err, "the new address is claimed"
    freed = cli.json("disk", "create", "takes-old", "--size", "1M", "--path", f"{old}/24", "--open")
    cli.ok("disk", "delete", freed["id"])                          # the old one was released
    cli.ok("disk", "start", disk_id)
    rc, _, err = cli.run("disk", "update", disk_id, "--path", f"{d}/24")
    assert rc == 1 and "is started" in err and "stop it first" in err, err
    assert cli.json("disk", "show", disk_id)["paths"][0]["ip"] == c, "refused: nothing changed"
    cli.ok("disk", "stop", disk_id)
    cli.ok("disk", "delete", disk_id)
