"""Issue 11 acceptance in the namespace lab (three gateways running ``pathagent run`` with tgt and iproute,
micro Ceph, real Consul, a libiscsi initiator in its own namespace), every change made with the real CLI
on a gateway:

3. ``disk import`` of an image written beforehand: after ``start`` the initiator reads the original data
   and the serial given on the command line, on every path;
4. ``disk resize`` while an initiator is logged in on every path: READ CAPACITY reports the new size on
   every path (the logged-in sessions, reconnected by the owners' reopen, and fresh logins);
5. revoking an initiator ends its session within seconds while another initiator keeps working; the
   owners' report of who is logged in makes ``disk stop`` refuse without ``--force``.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
import pytest
import requests

from lab import iscsi
from lab.iscsilab import PREFIX, IscsiLab

pytestmark = pytest.mark.lab

INI = iscsi.DEFAULT_INITIATOR
OTHER = "iqn.2016-05.io.pathagent.test:second-host"


def cli(lab: IscsiLab, *args: str) -> str:
    g = next(iter(lab.gw.values()))
    p = g.cli(*args)
    assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p.stdout


def cli_fails(lab: IscsiLab, *args: str) -> str:
    g = next(iter(lab.gw.values()))
    p = g.cli(*args)
    assert p.returncode == 1, (args, p.returncode, p.stdout, p.stderr)
    return p.stderr


def logged_in(lab: IscsiLab, disk_id: str) -> set[str]:
    """The initiators the live agents report logged in to ``disk_id`` (``{prefix}/logins/``)."""
    r = requests.get(f"http://{lab.http}/v1/kv/{PREFIX}/logins/?recurse=true", timeout=5)
    if r.status_code == 404:
        return set()
    out: set[str] = set()
    for e in r.json():
        if e.get("Session") and e.get("Value"):
            out |= set(json.loads(base64.b64decode(e["Value"])).get("disks", {}).get(disk_id, []))
    return out


def wait_served(lab: IscsiLab, disk_id: str, vips: list[str]) -> float:
    """Until every path of the disk is locked by a node that has its target and its address up."""
    def ok() -> bool:
        owners, by_ip = lab.owners(), lab.served_by()
        for i, v in enumerate(vips, 1):
            node = owners.get(f"{disk_id}/{i}")
            if node is None or by_ip.get(v) != node or f"iqn.2016-05.io.pathagent:{disk_id}" not in lab.gw[node].targets():
                return False
        return True
    return lab.wait(ok, 60, f"disk {disk_id}: {len(vips)} path(s) served")


def test_import_serves_the_original_data_and_serial(iscsi_lab: IscsiLab) -> None:
    import rbd
    lab = iscsi_lab
    assert lab.images is not None
    image = lab.images.create(f"legacy-{uuid.uuid4().hex[:6]}", 32 << 20)
    data = os.urandom(256 * 1024)
    lab.images.write(image, 1 << 20, data)
    serial = str(uuid.uuid4())
    vips = [lab.vip(), lab.vip()]
    out = cli(lab, "disk", "import", image, "--image", f"rbd/{image}", "--serial", serial, "--open",
              *(a for v in vips for a in ("--path", f"{v}/{lab.net.prefixlen}")))
    disk_id = out.strip().splitlines()[-1]
    iqn = f"iqn.2016-05.io.pathagent:{disk_id}"
    cli(lab, "disk", "start", image)
    took = wait_served(lab, disk_id, vips)
    for v in vips:
        with iscsi.Session(f"{v}:3260", iqn, netns=lab.ini()) as s:
            assert s.serial() == serial
            assert s.capacity() == ((32 << 20) // 512, 512)
            assert s.read((1 << 20) // 512, len(data) // 512) == data
    print(f"\nimported rbd/{image} served on 2 paths {took:.2f} s after start; original data and serial read back")
    cli(lab, "disk", "stop", image, "--force")
    cli(lab, "disk", "delete", image)
    assert lab.images.read(image, 1 << 20, len(data)) == data      # an imported image keeps its data
    rbd.RBD().remove(lab.images.ioctx, image)


def _capacity(s: iscsi.Session) -> int:
    blocks, size = s.capacity()
    return blocks * size


def test_resize_while_logged_in_reports_the_new_size_on_every_path(iscsi_lab: IscsiLab) -> None:
    lab = iscsi_lab
    vips = [lab.vip(), lab.vip()]
    out = cli(lab, "disk", "create", f"grow-{uuid.uuid4().hex[:4]}", "--size", "32M", "--open",
              *(a for v in vips for a in ("--path", f"{v}/{lab.net.prefixlen}")))
    disk_id = out.strip().splitlines()[-1]
    iqn = f"iqn.2016-05.io.pathagent:{disk_id}"
    cli(lab, "disk", "start", disk_id)
    wait_served(lab, disk_id, vips)
    sessions = [iscsi.Session(f"{v}:3260", iqn, netns=lab.ini(), timeout=30) for v in vips]
    try:
        assert [_capacity(s) for s in sessions] == [32 << 20, 32 << 20]
        pattern = os.urandom(64 * 1024)
        sessions[0].write(2048, pattern)
        sessions[0].sync()
        t0 = time.monotonic()
        assert "grown from 32 MiB to 96 MiB" in cli(lab, "disk", "resize", disk_id, "96M")
        seen = lab.wait(lambda: all(_capacity(s) == 96 << 20 for s in sessions), 30,
                        "READ CAPACITY of the logged-in sessions to report 96 MiB")
        print(f"\nresize to 96 MiB: reported by both logged-in sessions {time.monotonic() - t0:.2f} s after the "
              f"command started ({seen:.2f} s after it returned)")
        for s in sessions:                       # the data before the resize is still there, and past it works
            assert s.read(2048, len(pattern) // 512) == pattern
            s.write((90 << 20) // 512, pattern)
            s.sync()
    finally:
        for s in sessions:
            s.close()
    for v in vips:                               # a fresh login on every path sees it too
        with iscsi.Session(f"{v}:3260", iqn, netns=lab.ini()) as s:
            assert _capacity(s) == 96 << 20
    assert cli_fails(lab, "disk", "resize", disk_id, "64M").count("refused") == 1
    cli(lab, "disk", "stop", disk_id, "--force")
    cli(lab, "disk", "delete", disk_id)


def test_revoked_initiator_loses_its_session_the_other_keeps_working(iscsi_lab: IscsiLab) -> None:
    lab = iscsi_lab
    vip = lab.vip()
    out = cli(lab, "disk", "create", f"acl-{uuid.uuid4().hex[:4]}", "--size", "16M", "--path",
              f"{vip}/{lab.net.prefixlen}", "--initiator", INI, "--initiator", OTHER)
    disk_id = out.strip().splitlines()[-1]
    iqn = f"iqn.2016-05.io.pathagent:{disk_id}"
    cli(lab, "disk", "start", disk_id)
    wait_served(lab, disk_id, [vip])
    keep = iscsi.Session(f"{vip}:3260", iqn, initiator=INI, netns=lab.ini(), timeout=5)
    gone = iscsi.Session(f"{vip}:3260", iqn, initiator=OTHER, netns=lab.ini(), timeout=5, reconnect=False)
    try:
        keep.test_unit_ready()
        gone.test_unit_ready()
        # the owner reports both logins: stop refuses to cut them off without --force
        took = lab.wait(lambda: logged_in(lab, disk_id) == {INI, OTHER}, 20,
                        "the owner to report both logged-in initiators", interval=0.2)
        print(f"\nboth logins reported by the owner {took:.2f} s after they logged in")
        err = cli_fails(lab, "disk", "stop", disk_id)
        assert "2 initiator(s) logged in" in err and INI in err and OTHER in err and "--force" in err
        t0 = time.monotonic()
        out = cli(lab, "disk", "update", disk_id, "--remove-initiator", OTHER)
        assert f"access: only {INI}" in out

        def cut_off() -> bool:
            try:
                gone.test_unit_ready()
                return False
            except iscsi.IscsiError:
                return True
        took = lab.wait(cut_off, 15, f"{OTHER}'s session to end", interval=0.2)
        print(f"\nrevoked initiator's session ended {time.monotonic() - t0:.2f} s after the update started "
              f"({took:.2f} s after it returned)")
        for _ in range(20):                       # the admitted one never noticed
            keep.test_unit_ready()
            assert keep.read(0, 8)
        with pytest.raises(iscsi.IscsiError):     # and the revoked one cannot log in again
            iscsi.Session(f"{vip}:3260", iqn, initiator=OTHER, netns=lab.ini(), timeout=5, reconnect=False).close()
    finally:
        gone.close()
        keep.close()
    cli(lab, "disk", "stop", disk_id, "--force")
    cli(lab, "disk", "delete", disk_id)

