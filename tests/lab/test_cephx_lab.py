"""The deployment guide's Ceph users, for real: a lab whose micro Ceph requires cephx and has exactly the
users docs/deployment.md ("Ceph users: least privilege") tells an admin to create, parsed from the guide's
own ``ceph auth get-or-create`` commands (``lab.iscsilab.guide_users``). The agents run as the guide's
``client_id`` (``pathagent``), each tgtd as its gateway's data client (``pathagent-<node>``), the CLI with
the gateway's config, the cluster leader fences with the Ceph-side fence (``ceph-blocklist``).

What it shows: the CLI creates, starts and reads disks with those caps; every gateway serves them (an
initiator writes and reads at each path IP, the data is in RBD); a crashed gateway is fenced by the leader
(its data client blocklisted) and its path taken over with every acknowledged write intact; no gateway's
log reports a missing cap.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import pytest

from lab import failover, iscsi
from lab.iscsilab import GUIDE_CLIENT_ID, IscsiLab, guide_users

pytestmark = pytest.mark.lab

CAPS_PROBLEM = re.compile(r"insufficient caps|EACCES|Permission denied|PermanentBackendError|not permitted", re.I)


@pytest.fixture
def lab(cephx_lab: IscsiLab) -> IscsiLab:
    return cephx_lab


def _auth(lab: IscsiLab, entity: str) -> dict[str, Any]:
    assert lab.images is not None
    ret, out, err = lab.images.cluster.mon_command(json.dumps({"prefix": "auth get", "entity": entity,
                                                               "format": "json"}), b"")
    assert ret == 0, err
    v = json.loads(out)
    return dict(v[0] if isinstance(v, list) else v)


def _no_caps_problem(lab: IscsiLab) -> None:
    for g in lab.gw.values():
        bad = [ln for ln in g.log_text().splitlines() if CAPS_PROBLEM.search(ln)]
        assert not bad, f"{g.name}: {bad[:3]}"
        tgtd = g.state / "tgt" / "tgtd.log"
        text = tgtd.read_text(errors="replace") if tgtd.exists() else ""
        rbd_errors = [ln for ln in text.splitlines() if re.search(r"bs_rbd.*(: -\d+|[Ff]ail)", ln)]
        assert not rbd_errors, f"{g.name} tgtd: {rbd_errors[:3]}"


def test_the_lab_runs_the_guides_users_and_nothing_more(lab: IscsiLab) -> None:
    users = guide_users(lab.names)
    assert {e for e, _ in users} == {f"client.{GUIDE_CLIENT_ID}"} | {f"client.pathagent-{n}" for n in lab.names}
    for entity, caps in users:
        got = _auth(lab, entity)["caps"]
        assert got == dict(zip(caps[::2], caps[1::2])), entity
    assert all(f'client_id = "{GUIDE_CLIENT_ID}"' in g.config.read_text() for g in lab.gw.values())
    assert lab.images is not None
    ret, _, _ = lab.images.cluster.mon_command(json.dumps({"prefix": "auth get", "entity": "client.nosuch"}), b"")
    assert ret != 0


def test_the_cli_and_every_gateway_work_with_the_guides_caps(lab: IscsiLab) -> None:
    g = next(iter(lab.gw.values()))
    vips = [lab.vip(), lab.vip()]

    def cli(*args: str) -> str:
        p = g.cli(*args)
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
        return p.stdout
    name = f"cx-{uuid.uuid4().hex[:4]}"
    disk_id = cli("disk", "create", name, "--size", "16M", "--open",
                  *(a for v in vips for a in ("--path", f"{v}/{lab.net.prefixlen}"))).strip().splitlines()[-1]
    assert json.loads(cli("disk", "show", disk_id, "--json"))["name"] == name
    cli("disk", "start", disk_id)
    iqn = f"iqn.2016-05.io.pathagent:{disk_id}"
    lab.wait(lambda: sum(1 for k, v in lab.owners().items() if k.startswith(disk_id) and v) == 2, 60,
             "both paths held")
    lab.wait(lambda: all(any(v in gw.addresses() for gw in lab.gw.values()) for v in vips), 60, "both path IPs up")
    owners = {v for k, v in lab.owners().items() if k.startswith(disk_id)}
    assert len(owners) == 2, "two gateways, each opening the image as its own data client"
    data = [os.urandom(64 * 1024) for _ in vips]
    for i, v in enumerate(vips):
        with iscsi.Session(f"{v}:3260", iqn, netns=lab.ini(), timeout=30) as s:
            s.write(2048 + 256 * i, data[i])
            s.sync()
            assert s.read(2048 + 256 * i, len(data[i]) // 512) == data[i]
    with iscsi.Session(f"{vips[1]}:3260", iqn, netns=lab.ini(), timeout=30) as s:
        assert s.read(2048, len(data[0]) // 512) == data[0], "written at path 1, read at path 2"
    assert lab.images is not None
    assert lab.images.read(f"pathagent-{disk_id}", 2048 * 512, len(data[0])) == data[0]
    cli("disk", "stop", disk_id, "--force")
    cli("disk", "delete", disk_id)
    _no_caps_problem(lab)


def test_a_crashed_gateway_is_fenced_by_the_leader_with_the_guides_caps(lab: IscsiLab) -> None:
    assert lab.images is not None
    before = set(lab.images.blocklist())
    o = failover.run(lab, "crash", log=lambda m: print(f"  {m}", flush=True))
    msg = o.line()
    print(f"\n{msg}")
    assert o.overlaps == [], msg
    for v in o.verdicts:
        assert v.checked > 100 and v.ok + v.newer == v.checked and v.bad == 0, msg
    assert o.gap.recovered and o.owner_after not in (None, o.victim), msg
    added = set(lab.images.blocklist()) - before
    assert added, f"the leader blocklisted the crashed gateway's clients; {msg}"
    print(f"blocklisted: {sorted(added)}")
    _no_caps_problem(lab)
