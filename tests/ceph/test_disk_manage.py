"""Disk management an admin can trust, end to end with the real console script, a real Consul server and a
micro Ceph cluster: every bad argument refused before any connection, names, IQNs and path IPs unique
across disks (also when two shells race), names accepted wherever ids are, import and resize, access edits
that need their flag, missing disks, the logged-in check of ``stop``, and a command killed between any two
of its steps finished by running it again, with nothing orphaned."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import rados
import rbd
import requests

from agent.core import schema
from diskcli import INIT1, INIT2, PATHAGENT, Cli
from lab.ceph import MicroCeph

pytestmark = pytest.mark.ceph


@pytest.fixture(scope="module")
def cli(micro_ceph: MicroCeph, consul_http: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    if not PATHAGENT.exists():
        pytest.skip(f"{PATHAGENT} missing: run `bash scripts/setup`")
    c = Cli(tmp_path_factory.mktemp("cli"), micro_ceph, consul_http, f"m{uuid.uuid4().hex[:6]}")
    yield c
    c.ceph.close()


@pytest.fixture(scope="module")
def rbd_io(micro_ceph: MicroCeph) -> Iterator[rados.Ioctx]:
    cluster = rados.Rados(conffile=micro_ceph.conf_path)
    cluster.connect(timeout=10)
    io = cluster.open_ioctx("rbd")
    yield io
    io.close()
    cluster.shutdown()


def last_line(out: str) -> str:
    return out.strip().splitlines()[-1]


# --- 1. bad arguments: exit 2 naming the option, before any connection ------------------------------------

class Listener:
    """A TCP socket standing in for Consul and the Ceph monitors: it counts every connection attempt."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Listener, Path]]:
    tmp = tmp_path_factory.mktemp("offline")
    lis = Listener()
    conf = tmp / "ceph.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:{lis.port}\nauth client required = none\n")
    cfg = tmp / "pathagent.toml"
    cfg.write_text(f'[consul]\naddress = "127.0.0.1:{lis.port}"\n[ceph]\nconf = "{conf}"\npool = "rbd"\n'
                   'timeout = 2\n[target]\nbackend = "fake"\n[network]\nbackend = "none"\n')
    pw = tmp / "good.pw"
    pw.write_text("Good-Secret-0123\n")
    (tmp / "short.pw").write_text("short\n")
    (tmp / "latin1.pw").write_bytes(b"caf\xe9-secret-0123\n")
    yield cfg, lis, tmp
    lis.sock.close()


OK_PATH = ("--path", "198.18.5.10/24")
CREATE = ("disk", "create", "vm", "--size", "1G")
BAD_ARGS: list[tuple[tuple[str, ...], str]] = [
    (CREATE[:3] + ("--size", "banana") + OK_PATH, "--size 'banana'"),
    (CREATE[:3] + ("--size", "1000") + OK_PATH, "--size '1000'"),
    (CREATE[:3] + ("--size", "0") + OK_PATH, "--size '0'"),
    (CREATE[:3] + ("--size", "2000000T") + OK_PATH, "--size '2000000T'"),
    (CREATE + ("--path", "10.0.0.1"), "--path '10.0.0.1' (path 1): expected IP/PREFIX"),
    (CREATE + ("--path", "999.0.0.1/24"), "--path '999.0.0.1/24' (path 1)"),
    (CREATE + ("--path", "10.0.0.1/33"), "--path '10.0.0.1/33' (path 1)"),
    (CREATE + ("--path", "10.0.0.0/24"), "network address of 10.0.0.0/24"),
    (CREATE + ("--path", "10.0.0.255/24"), "broadcast address of 10.0.0.0/24"),
    (CREATE + ("--path", "127.0.0.5/8"), "not a usable unicast address"),
    (CREATE + ("--path", "10.0.0.1/24,vlan=4095"), "--path '10.0.0.1/24,vlan=4095' (path 1): 'vlan=4095' is not"),
    (CREATE + ("--path", "10.0.0.1/24,role=ISCSI"), "'role=ISCSI' is not vlan=1..4094 or role=NAME"),
    (CREATE + ("--path", "10.0.0.1/24,vlan=2,vlan=3"), "'vlan=3' is not"),
    (CREATE + ("--path", "10.0.0.1/24,mtu=9000"), "'mtu=9000' is not"),
    (("disk", "update", "vm", "--path", "10.0.0.0/24"), "--path '10.0.0.0/24' (path 1): 10.0.0.0 is the network"),
    (CREATE + ("--path", "224.0.0.5/24"), "not a usable unicast address"),
    (CREATE + OK_PATH + ("--path", "198.18.5.10/24"), "--path '198.18.5.10/24' (path 2): the same IP as path 1"),
    (CREATE + OK_PATH + ("--iqn", "iqn.2016-05.IO.pathagent:x"), "--iqn 'iqn.2016-05.IO.pathagent:x'"),
    (CREATE + OK_PATH + ("--initiator", "host1"), "--initiator 'host1'"),
    (CREATE + OK_PATH + ("--open", "--initiator", INIT1), "--open admits any initiator"),
    (CREATE + OK_PATH + ("--chap-user", "alice"), "--chap-user and --chap-password-file go together"),
    (CREATE + OK_PATH + ("--chap-user", "al ice", "--chap-password-file", "{tmp}/good.pw"), "--chap-user 'al ice'"),
    (CREATE + OK_PATH + ("--chap-user", "alice", "--chap-password-file", "{tmp}/short.pw"),
     "--chap-password-file {tmp}/short.pw: the first line must be a password of 12-255"),
    (CREATE + OK_PATH + ("--chap-user", "alice", "--chap-password-file", "{tmp}/latin1.pw"), "not UTF-8"),
    (CREATE + OK_PATH + ("--chap-user", "alice", "--chap-password-file", "{tmp}/none.pw"), "No such file"),
    (CREATE + OK_PATH + ("--mutual-chap-user", "t", "--mutual-chap-password-file", "{tmp}/good.pw"),
     "--mutual-chap-user needs --chap-user"),
    (CREATE + OK_PATH + ("--pool", "bad/pool"), "--pool 'bad/pool'"),
    (("disk", "create", "bad name", "--size", "1G") + OK_PATH, "NAME 'bad name'"),
    (("disk", "import", "vm", "--image", "justimage") + OK_PATH, "--image 'justimage': expected POOL/IMAGE"),
    (("disk", "import", "vm", "--image", "rbd/img", "--serial", "1234") + OK_PATH, "--serial '1234'"),
    (("disk", "import", "vm", "--image", "rbd/img", "--path", "198.18.5.0/24"), "network address"),
    (("disk", "show", "_bad"), "DISK '_bad'"),
    (("disk", "start", "bad name"), "DISK 'bad name'"),
    (("disk", "stop", "vm", "--timeout", "0"), "--timeout 0"),
    (("disk", "delete", "vm", "--wait", "-1"), "--wait -1"),
    (("disk", "update", "vm"), "nothing to change"),
    (("disk", "update", "vm", "--open", "--add-initiator", INIT1), "--open admits any initiator"),
    (("disk", "update", "vm", "--add-initiator", INIT1, "--remove-initiator", INIT1), "both name"),
    (("disk", "update", "vm", "--name", "no/slash"), "--name 'no/slash'"),
    (("disk", "update", "vm", "--no-chap", "--chap-user", "a", "--chap-password-file", "{tmp}/good.pw"),
     "--no-chap removes CHAP"),
    (("disk", "resize", "vm", "12Q"), "SIZE '12Q'"),
    (("disk", "resize", "vm", "100"), "SIZE '100'"),
]


@pytest.mark.parametrize("args,words", BAD_ARGS, ids=[" ".join(a[1:4]) + f" #{i}" for i, (a, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_exit_2_before_any_connection(offline: tuple[Path, Listener, Path], args: tuple[str, ...],
                                                      words: str) -> None:
    cfg, lis, tmp = offline
    before = lis.accepted
    argv = [a.replace("{tmp}", str(tmp)) for a in args]
    t = time.monotonic()
    import subprocess
    p = subprocess.run([str(PATHAGENT), "--config", str(cfg), *argv], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, (argv, p.returncode, p.stdout, p.stderr)
    assert words.replace("{tmp}", str(tmp)) in p.stderr, (argv, p.stderr)
    assert "Traceback" not in p.stderr and "Good-Secret" not in p.stderr + p.stdout
    assert lis.accepted == before, f"{argv}: connected before refusing"
    assert time.monotonic() - t < 10


# --- 2. unique names, IQNs and path IPs -----------------------------------------------------------------------

def test_a_name_iqn_or_path_ip_belongs_to_one_disk(cli: Cli) -> None:
    a, b = cli.ips()
    iqn = "iqn.2024-01.com.example:shared"
    first = last_line(cli.ok("disk", "create", "uniq-a", "--size", "1M", "--path", f"{a}/24", "--iqn", iqn))
    images = cli.images()
    for argv, words in [
        (("uniq-b", "--size", "1M", "--path", f"{b}/24", "--path", f"{a}/24"), f"path IP {a} is already used by disk {first}"),
        (("uniq-b", "--size", "1M", "--path", f"{b}/24", "--iqn", iqn), f"IQN {iqn} is already used by disk {first}"),
        (("UNIQ-A", "--size", "1M", "--path", f"{b}/24"), "a disk named UNIQ-A exists already"),
        (("uniq-a", "--size", "2M", "--path", f"{a}/24", "--iqn", iqn), "another definition (size 1 MiB)"),
    ]:
        rc, out, err = cli.run("disk", "create", *argv)
        assert rc == 1 and words in err, (argv, rc, out, err)
        assert cli.images() == images            # nothing made
    # the same command again is not a conflict: it says the disk exists (idempotent)
    out = cli.ok("disk", "create", "uniq-a", "--size", "1M", "--path", f"{a}/24", "--iqn", iqn)
    assert "exists already with this definition" in out and last_line(out) == first
    # a rename onto another disk's name is refused; import with a taken IP too
    second = last_line(cli.ok("disk", "create", "uniq-b", "--size", "1M", "--path", f"{b}/24"))
    rc, _, err = cli.run("disk", "update", second, "--name", "Uniq-A")
    assert rc == 1 and f"name uniq-a is already used by disk {first}" in err
    cli.ceph.create_image("rbd", "foreign-1", 1 << 20)
    rc, _, err = cli.run("disk", "import", "imp", "--image", "rbd/foreign-1", "--path", f"{b}/24")
    assert rc == 1 and f"path IP {b} is already used by disk {second}" in err
    assert cli.ceph.get_meta("rbd", "foreign-1", schema.META_KEY) is None
    cli.ceph.remove_image("rbd", "foreign-1")
    # the claims name each value once
    claims = cli.claims()
    assert claims[f"ip/{a}"]["value"]["disk"] == first and claims[f"ip/{b}"]["value"]["disk"] == second
    assert claims["name/uniq-a"]["value"]["disk"] == first and claims[f"iqn/{iqn}"]["value"]["disk"] == first
    assert all(c["session"] is None for c in claims.values())      # finished: nothing locked
    for d in (first, second):
        cli.ok("disk", "delete", d)
    assert not [k for k, c in cli.claims().items() if c["value"]["disk"] in (first, second)]


def test_definitions_written_by_other_tools_are_checked_too(cli: Cli) -> None:
    """A disk whose definition has no claims (written by another tool) still owns its values: a create
    is refused against its definition, and its start claims them atomically."""
    a, b = cli.ips()
    one = last_line(cli.ok("disk", "create", "tool-1", "--size", "1M", "--path", f"{a}/24"))
    two = last_line(cli.ok("disk", "create", "tool-2", "--size", "1M", "--path", f"{b}/24"))
    # another tool edits disk two's definition to use disk one's address, bypassing the claims
    doc = json.loads(cli.ceph.get_meta("rbd", f"pathagent-{two}", schema.META_KEY) or "")
    doc["paths"][0]["ip"] = a
    cli.ceph.set_meta("rbd", f"pathagent-{two}", schema.META_KEY, json.dumps(doc))
    rc, _, err = cli.run("disk", "start", two)
    assert rc == 1 and f"path IP {a} is already used by disk {one}" in err
    assert f"{cli.prefix}/disks/{two}" not in cli.kv()
    # a definition without any claim key: its values are refused to others all the same
    for k in [k for k, c in cli.claims().items() if c["value"]["disk"] == one]:
        requests.delete(f"http://{cli.consul}/v1/kv/{cli.prefix}/claims/{k}", timeout=5).raise_for_status()
    rc, _, err = cli.run("disk", "create", "tool-3", "--size", "1M", "--path", f"{a}/24")
    assert rc == 1 and f"path IP {a} is already used by disk " in err and "(in its definition)" in err
    cli.ok("disk", "start", one)                    # start claims them again
    assert cli.claims()[f"ip/{a}"]["value"]["disk"] == one
    cli.ok("disk", "stop", one)
    for d in (one, two):
        cli.ok("disk", "delete", d)


def test_concurrent_creates_from_two_shells(cli: Cli) -> None:
    """Two shells create disks at the same moment: with the same IP, the same IQN or the same name, one
    wins and the other is refused, every time."""
    for round_ in range(4):
        a, b = cli.ips()
        c, d = cli.ips()
        kind = ["ip", "iqn", "name", "ip"][round_]
        if kind == "ip":
            argvs = [("race-a", "--path", f"{a}/24"), ("race-b", "--path", f"{a}/24")]
        elif kind == "iqn":
            argvs = [("race-a", "--path", f"{a}/24", "--iqn", "iqn.2024-01.com.example:race"),
                     ("race-b", "--path", f"{c}/24", "--iqn", "iqn.2024-01.com.example:race")]
        else:
            argvs = [("race-a", "--path", f"{a}/24"), ("race-a", "--path", f"{c}/24", "--path", f"{d}/24")]
        procs = [cli.popen("disk", "create", *argv, "--size", "1M") for argv in argvs]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        codes = sorted(r[0] for r in results)
        assert codes == [0, 1], (kind, results)
        loser = next(r for r in results if r[0] == 1)
        assert ("already used by disk" in loser[2] or "being created by another pathagent command" in loser[2]
                or "exists already" in loser[2]), (kind, loser)
        winner = last_line(next(r for r in results if r[0] == 0)[1])
        disks = [x for x in cli.json("disk", "list") if x.get("name", "").startswith("race-")]
        assert [x["id"] for x in disks] == [winner], (kind, disks)
        cli.ok("disk", "delete", winner)
        assert not [k for k in cli.claims() if k.startswith("name/race")]


# --- names as identifiers, missing disks ------------------------------------------------------------------

def test_every_command_takes_the_name_and_missing_disks_exit_1(cli: Cli) -> None:
    a, _ = cli.ips()
    disk_id = last_line(cli.ok("disk", "create", "byname", "--size", "1M", "--path", f"{a}/24", "--open"))
    assert cli.json("disk", "show", "byname")["id"] == disk_id
    assert cli.json("disk", "show", "ByName")["id"] == disk_id
    assert cli.json("disk", "start", "byname")["id"] == disk_id
    assert cli.json("disk", "update", "byname", "--name", "renamed")["name"] == "renamed"
    assert cli.json("disk", "show", "renamed")["id"] == disk_id
    rc, _, err = cli.run("disk", "show", "byname")
    assert rc == 1 and "no disk 'byname'" in err
    assert cli.json("disk", "resize", "renamed", "2M")["size"] == 2 << 20
    assert cli.json("disk", "stop", "renamed")["was_started"] is True
    assert cli.json("disk", "stop", "renamed")["was_started"] is False       # idempotent, exit 0
    assert cli.json("disk", "delete", "renamed")["id"] == disk_id
    for cmd in (("show",), ("stop",), ("delete",), ("start",), ("resize", "nosuchdisk", "1G"), ("update",)):
        argv = ("disk", cmd[0], "nosuchdisk", *cmd[2:]) if len(cmd) > 1 else ("disk", cmd[0], "nosuchdisk")
        if cmd == ("update",):
            argv += ("--name", "x")
        rc, _, err = cli.run(*argv)
        assert rc == 1 and "no disk 'nosuchdisk'" in err, (argv, rc, err)


# --- 3. import, resize -------------------------------------------------------------------------------------

def test_import_keeps_the_data_and_the_serial(cli: Cli, rbd_io: rados.Ioctx) -> None:
    a, b = cli.ips()
    rbd.RBD().create(rbd_io, "legacy-vm", 8 << 20, old_format=False, features=rbd.RBD_FEATURE_LAYERING
                     | rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
    data = os.urandom(64 * 1024)
    with rbd.Image(rbd_io, "legacy-vm") as img:
        img.write(data, 4 << 20)
    serial = "0f9c2a55-6b1e-4c3d-9e8f-a1b2c3d4e5f6"
    out = cli.ok("disk", "import", "legacy", "--image", "rbd/legacy-vm", "--path", f"{a}/24", "--path", f"{b}/24",
                 "--serial", serial.upper(), "--initiator", INIT1)
    disk_id = last_line(out)
    assert "its data is untouched" in out and "access: only " + INIT1 in out
    shown = cli.json("disk", "show", "legacy")
    assert shown["id"] == disk_id and shown["serial"] == serial and shown["size"] == 8 << 20
    assert shown["pool"] == "rbd" and shown["image"] == "legacy-vm"
    with rbd.Image(rbd_io, "legacy-vm", read_only=True) as img:
        assert img.read(4 << 20, len(data)) == data and img.size() == 8 << 20
    assert disk_id in {d["id"] for d in cli.json("disk", "list")}
    again = cli.ok("disk", "import", "legacy", "--image", "rbd/legacy-vm", "--path", f"{a}/24", "--path",
                   f"{b}/24", "--serial", serial, "--initiator", INIT1)
    assert "exists already" in again and last_line(again) == disk_id
    rc, _, err = cli.run("disk", "import", "other", "--image", "rbd/legacy-vm", "--path", f"{a}/25")
    assert rc == 1 and f"is disk {disk_id} (legacy) already" in err
    rc, _, err = cli.run("disk", "import", "x", "--image", "rbd/no-such-image", "--path", "198.19.250.1/24")
    assert rc == 1 and "no such image" in err
    # deleting an imported disk keeps the image and its data
    out = cli.ok("disk", "delete", "legacy")
    assert "the image and its data are kept" in out
    assert cli.ceph.get_meta("rbd", "legacy-vm", schema.META_KEY) is None
    with rbd.Image(rbd_io, "legacy-vm", read_only=True) as img:
        assert img.read(4 << 20, len(data)) == data
    rbd.RBD().remove(rbd_io, "legacy-vm")


def test_resize_grows_refuses_shrink_and_is_idempotent(cli: Cli, rbd_io: rados.Ioctx) -> None:
    a, _ = cli.ips()
    disk_id = last_line(cli.ok("disk", "create", "grow", "--size", "4M", "--path", f"{a}/24"))
    cli.ok("disk", "start", disk_id)
    index = cli.kv()[f"{cli.prefix}/disks/{disk_id}"]["index"]
    out = cli.ok("disk", "resize", disk_id, "8M")
    assert "grown from 4 MiB to 8 MiB" in out and "owners make the LUN report" in out
    with rbd.Image(rbd_io, f"pathagent-{disk_id}", read_only=True) as img:
        assert img.size() == 8 << 20
    assert cli.json("disk", "show", disk_id)["size"] == 8 << 20
    assert cli.kv()[f"{cli.prefix}/disks/{disk_id}"]["index"] > index         # owners woken
    rc, _, err = cli.run("disk", "resize", disk_id, "6M")
    assert rc == 1 and "shrinking it to 6 MiB is refused" in err
    assert "nothing changed" in cli.ok("disk", "resize", disk_id, "8M")
    cli.ok("disk", "stop", disk_id)
    cli.ok("disk", "delete", disk_id)


# --- access edits say what they do ---------------------------------------------------------------------------

def test_access_edits_need_their_flag_and_print_the_result(cli: Cli) -> None:
    a, _ = cli.ips()
    disk_id = last_line(cli.ok("disk", "create", "acl", "--size", "1M", "--path", f"{a}/24", "--initiator", INIT1))
    out = cli.ok("disk", "update", disk_id, "--open")
    assert "the list of 1 initiator(s) is dropped" in out and "access: any initiator; no CHAP" in out
    rc, _, err = cli.run("disk", "update", disk_id, "--add-initiator", INIT2)
    assert rc == 1 and "add --closed to confirm" in err
    assert cli.json("disk", "show", disk_id)["open"] is True                 # unchanged
    out = cli.ok("disk", "update", disk_id, "--closed", "--add-initiator", INIT2)
    assert "access: only " + INIT2 in out
    rc, _, err = cli.run("disk", "update", disk_id, "--remove-initiator", INIT2)
    assert rc == 1 and "add --admit-none to confirm" in err
    assert cli.json("disk", "show", disk_id)["initiators"] == [INIT2]        # unchanged
    out = cli.ok("disk", "update", disk_id, "--remove-initiator", INIT1)     # not admitted: a note, no error
    assert f"{INIT1} was not admitted; nothing to remove" in out and "unchanged" in out
    out = cli.ok("disk", "update", disk_id, "--remove-initiator", INIT2, "--admit-none")
    assert "access: no initiator (locked)" in out
    cli.ok("disk", "delete", disk_id)


# --- stop refuses while initiators are logged in ------------------------------------------------------------

def test_stop_refuses_while_initiators_are_logged_in(cli: Cli) -> None:
    a, _ = cli.ips()
    disk_id = last_line(cli.ok("disk", "create", "busy", "--size", "1M", "--path", f"{a}/24", "--open"))
    cli.ok("disk", "start", disk_id)
    base = f"http://{cli.consul}/v1"
    node = requests.get(f"{base}/agent/self", timeout=5).json()["Config"]["NodeName"]
    sid = requests.put(f"{base}/session/create", json={"Node": node, "Name": "test agent", "TTL": "60s",
                                                       "Checks": []}, timeout=5).json()["ID"]
    value = {"node": "gw1", "session": sid, "since": time.time(), "disks": {disk_id: [INIT1, INIT2]}}
    key = f"{base}/kv/{cli.prefix}/logins/gw1"
    assert requests.put(f"{key}?acquire={sid}", data=json.dumps(value), timeout=5).json() is True
    rc, _, err = cli.run("disk", "stop", disk_id)
    assert rc == 1 and "2 initiator(s) logged in" in err and f"{INIT1}, {INIT2} on gw1" in err and "--force" in err
    assert f"{cli.prefix}/disks/{disk_id}" in cli.kv()
    rc, _, err = cli.run("disk", "delete", disk_id)
    assert rc == 1 and "--force" in err
    # a report its agent no longer holds (the agent died) says nothing
    requests.put(f"{key}?release={sid}", data=json.dumps(value), timeout=5).raise_for_status()
    out = cli.ok("disk", "stop", disk_id, "--timeout", "10")
    assert "stopped" in out
    cli.ok("disk", "start", disk_id)
    assert requests.put(f"{key}?acquire={sid}", data=json.dumps(value), timeout=5).json() is True
    out = cli.ok("disk", "delete", disk_id, "--force")                       # stops (cutting them off), deletes
    assert "deleted" in out and f"pathagent-{disk_id}" not in cli.images()
    requests.put(f"{base}/session/destroy/{sid}", timeout=5)


# --- 6. interrupted commands: running the same command again finishes the job -------------------------------

def killed(cli: Cli, step: str, *args: str) -> None:
    rc, out, err = cli.run(*args, env={**os.environ, "PATHAGENT_FAILPOINT": step})
    assert rc == -9, (step, rc, out, err)


def orphans(cli: Cli) -> list[str]:
    """Images of ours without a definition, claims of disks that have neither image nor definition, claim
    keys still locked by a dead command."""
    out = []
    for image in cli.images():
        if image.startswith("pathagent-") and cli.ceph.get_meta("rbd", image, schema.META_KEY) is None:
            out.append(f"image {image}")
    for k, c in cli.claims().items():
        v = c["value"]
        if c["session"] is not None:
            out.append(f"locked claim {k}")
        if v["image"] not in cli.images() or cli.ceph.get_meta("rbd", v["image"], schema.META_KEY) is None:
            out.append(f"claim {k} of {v['disk']}")
    return out


@pytest.mark.parametrize("step", ["create:claimed", "create:image", "create:defined"])
def test_interrupted_create_is_finished_by_running_it_again(cli: Cli, step: str) -> None:
    a, b = cli.ips()
    argv = ("disk", "create", f"int-{step[7:]}", "--size", "2M", "--path", f"{a}/24", "--path", f"{b}/24")
    killed(cli, step, *argv)
    listed = [d for d in cli.json("disk", "list") if d.get("name") == f"int-{step[7:]}"]
    assert len(listed) == 1 and (step == "create:defined" or "unfinished" in listed[0]["error"]["message"])
    first = listed[0]["id"]
    out = cli.ok(*argv)
    assert last_line(out) == first                     # the same disk, finished
    assert cli.json("disk", "show", first)["size"] == 2 << 20
    assert orphans(cli) == []
    cli.ok("disk", "delete", first)
    assert orphans(cli) == []


def test_interrupted_create_can_be_dropped_instead(cli: Cli) -> None:
    a, _ = cli.ips()
    killed(cli, "create:image", "disk", "create", "dropme", "--size", "1M", "--path", f"{a}/24")
    rc, _, err = cli.run("disk", "show", "dropme")
    assert rc == 1 and "is unfinished" in err and "disk delete" in err
    rc, _, err = cli.run("disk", "create", "other", "--size", "1M", "--path", f"{a}/24")
    assert rc == 1 and "already used by disk" in err                       # still claimed
    out = cli.ok("disk", "delete", "dropme")
    assert "deleted" in out and orphans(cli) == []
    last_line(cli.ok("disk", "create", "other", "--size", "1M", "--path", f"{a}/24"))
    cli.ok("disk", "delete", "other")


@pytest.mark.parametrize("step", ["import:claimed", "import:defined"])
def test_interrupted_import_is_finished_by_running_it_again(cli: Cli, step: str) -> None:
    a, _ = cli.ips()
    image = f"imp-{step[7:]}"
    cli.ceph.create_image("rbd", image, 1 << 20)
    argv = ("disk", "import", image, "--image", f"rbd/{image}", "--path", f"{a}/24")
    killed(cli, step, *argv)
    disk_id = last_line(cli.ok(*argv))
    assert cli.json("disk", "show", image)["id"] == disk_id
    assert orphans(cli) == []
    cli.ok("disk", "delete", disk_id)
    cli.ceph.remove_image("rbd", image)
    assert orphans(cli) == []


@pytest.mark.parametrize("step", ["start:claimed", "stop:marked", "stop:locked", "delete:removed",
                                  "update:claimed", "update:defined", "resize:grown", "resize:defined"])
def test_interrupted_lifecycle_step_is_finished_by_running_it_again(cli: Cli, step: str) -> None:
    a, _ = cli.ips()
    name = f"life-{step.replace(':', '-')}"
    disk_id = last_line(cli.ok("disk", "create", name, "--size", "1M", "--path", f"{a}/24", "--open"))
    dkey = f"{cli.prefix}/disks/{disk_id}"
    command = step.split(":")[0]
    if command in ("stop",):
        cli.ok("disk", "start", disk_id)
    argv: tuple[str, ...] = {
        "start": ("disk", "start", disk_id), "stop": ("disk", "stop", disk_id, "--timeout", "10"),
        "delete": ("disk", "delete", disk_id), "update": ("disk", "update", disk_id, "--name", name + "-new"),
        "resize": ("disk", "resize", disk_id, "3M")}[command]
    killed(cli, step, *argv)
    cli.ok(*argv)
    kv = cli.kv()
    if command == "start":
        assert dkey in kv and f"{dkey}/1" in kv
        cli.ok("disk", "stop", disk_id)
    elif command == "stop":
        assert not [k for k in kv if k == dkey or k.startswith(dkey + "/")]
    elif command == "update":
        assert cli.json("disk", "show", name + "-new")["id"] == disk_id
        assert f"name/{name}" not in cli.claims() and f"name/{name}-new" in cli.claims()
    elif command == "resize":
        assert cli.json("disk", "show", disk_id)["size"] == 3 << 20
    if command == "delete":
        assert f"pathagent-{disk_id}" not in cli.images()
        assert not [k for k, c in cli.claims().items() if c["value"]["disk"] == disk_id]
    else:
        assert orphans(cli) == []
        cli.ok("disk", "delete", disk_id)
    assert orphans(cli) == []
    assert not [k for k in cli.kv() if k.startswith(dkey)]


def test_a_create_still_running_elsewhere_is_neither_adopted_nor_deleted(cli: Cli) -> None:
    """A name claim locked by a live command on another host: a second create and a delete refuse (they
    cannot tell it from a slow command), and once its session ends the rerun finishes the job."""
    a, _ = cli.ips()
    argv = ("disk", "create", "elsewhere", "--size", "1M", "--path", f"{a}/24")
    killed(cli, "create:claimed", *argv)
    base = f"http://{cli.consul}/v1"
    for s in requests.get(f"{base}/session/list", timeout=5).json():
        if "create disk elsewhere" in s["Name"]:
            requests.put(f"{base}/session/destroy/{s['ID']}", timeout=5).raise_for_status()
    node = requests.get(f"{base}/agent/self", timeout=5).json()["Config"]["NodeName"]
    sid = requests.put(f"{base}/session/create", timeout=5, json={
        "Node": node, "Name": "pathagent-cli: create disk elsewhere [pid 1 start 1 host another-host]",
        "TTL": "60s", "Checks": [], "Behavior": "release", "LockDelay": "0s"}).json()["ID"]
    key = f"{base}/kv/{cli.prefix}/claims/name/elsewhere"
    value = requests.get(f"{key}?raw", timeout=5).content
    assert requests.put(f"{key}?acquire={sid}", data=value, timeout=5).json() is True
    for args in (argv, ("disk", "delete", "elsewhere")):
        rc, _, err = cli.run(*args)
        assert rc == 1 and "is being created by another pathagent command" in err and "another-host" in err, err
    requests.put(f"{base}/session/destroy/{sid}", timeout=5).raise_for_status()
    disk_id = last_line(cli.ok(*argv))
    assert cli.json("disk", "show", "elsewhere")["id"] == disk_id and orphans(cli) == []
    cli.ok("disk", "delete", disk_id)
