"""``scripts/install`` on a clean Debian 12 root: what it leaves behind, that a second run changes nothing, and
that the agent it installed serves a disk in the lab (the installed ``pathagent run`` as a gateway, chrooted
into the root inside the gateway's network namespace, against a real Consul and a micro Ceph; the disk made
with the installed CLI and read by a userspace initiator)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.iscsilab import REPO
from lab.installed import AGENT, Installed, InstalledLab

SAMPLE = (REPO / "etc" / "pathagent.toml").read_text()


def read_unit(inst: Installed, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in inst.root.inside(f"/etc/systemd/system/{name}").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_fresh_install_leaves_a_gateway_ready_to_start(installed: Installed) -> None:
    root, err = installed.root, installed.first.stderr
    # the command, from PATH
    r = root.run(["sh", "-c", "command -v pathagent && pathagent --help"], check=True)
    assert r.stdout.splitlines()[0] == AGENT
    assert "check-config" in r.stdout and "disk" in r.stdout
    assert os.readlink(root.inside(AGENT)) == "/opt/pathagent/bin/pathagent"
    # a venv of Debian's python with the system's Ceph bindings, the project installed into it (not editable)
    cfg = root.inside("/opt/pathagent/pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and "home = /usr/bin" in cfg
    r = root.run(["/opt/pathagent/bin/python", "-c", "import rados, rbd, agent, plugins; print(agent.__file__)"],
                 check=True)
    assert r.stdout.strip().startswith("/opt/pathagent/lib/python3"), r.stdout
    # the config: the sample, readable by root only, accepted by check-config
    conf = root.inside("/etc/pathagent/pathagent.toml")
    assert conf.read_text() == SAMPLE
    assert conf.stat().st_mode & 0o777 == 0o640
    assert "/etc/pathagent/pathagent.toml: OK" in err
    # the unit, enabled, with paths that exist
    wants = root.inside("/etc/systemd/system/multi-user.target.wants/pathagent.service")
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/pathagent.service"
    unit = read_unit(installed, "pathagent.service")
    assert unit["ExecStart"] == f"{AGENT} run" and unit["ExecStartPre"] == f"{AGENT} check-config"
    assert unit["KillMode"] == "process" and unit["Type"] == "notify"
    doc = unit["Documentation"].removeprefix("file://")
    assert root.inside(doc).is_file(), f"Documentation={unit['Documentation']} does not exist"
    r = root.run(["systemctl", "is-enabled", "pathagent.service"], env={"SYSTEMD_OFFLINE": "1"})
    assert r.stdout.strip() == "enabled", r.stdout + r.stderr
    # Debian's tgt.service: masked, with the reason printed
    tgt = root.inside("/etc/systemd/system/tgt.service")
    assert tgt.is_symlink() and os.readlink(tgt) == "/dev/null"
    assert not root.inside("/etc/systemd/system/multi-user.target.wants/tgt.service").exists()
    r = root.run(["systemctl", "is-enabled", "tgt.service"], env={"SYSTEMD_OFFLINE": "1"})
    assert r.stdout.strip() == "masked", r.stdout + r.stderr
    assert "listening on every address at port 3260" in err
    # rtslib-fb-targetctl.service (python3-rtslib-fb, the lio backend): masked too
    rts = root.inside("/etc/systemd/system/rtslib-fb-targetctl.service")
    assert rts.is_symlink() and os.readlink(rts) == "/dev/null"
    r = root.run(["systemctl", "is-enabled", "rtslib-fb-targetctl.service"], env={"SYSTEMD_OFFLINE": "1"})
    assert r.stdout.strip() == "masked", r.stdout + r.stderr
    assert "restores a saved LIO configuration at boot" in err
    # nothing was started in the chroot (tgt's postinst was refused), and the temporary policy is gone
    assert root.processes() == [], "a process was started inside the root during the install"
    assert not root.inside("/usr/sbin/policy-rc.d").exists()
    assert "starts at the next boot" in err
    print(f"\nscripts/install (fresh): {installed.seconds['install']:.1f} s\n{err}")


def test_a_second_run_changes_nothing_and_keeps_the_admins_config(installed: Installed) -> None:
    conf = installed.root.inside("/etc/pathagent/pathagent.toml")
    mine = SAMPLE.replace('prefix = "pathagent"', 'prefix = "site-a"')
    conf.write_text(mine)
    unit = installed.root.inside("/etc/systemd/system/pathagent.service")
    before = (unit.stat().st_mtime_ns, installed.root.inside("/opt/pathagent/.pathagent-source").read_text())
    t0 = time.monotonic()
    r = installed.install()
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert conf.read_text() == mine, "the admin's config was overwritten"
    for said in ("Debian packages: all there", "is installed already", "kept /etc/pathagent/pathagent.toml",
                 "tgt.service: masked already", "rtslib-fb-targetctl.service: masked already"):
        assert said in r.stderr, f"{said!r} not in:\n{r.stderr}"
    assert (unit.stat().st_mtime_ns, installed.root.inside("/opt/pathagent/.pathagent-source").read_text()) == before
    print(f"\nscripts/install (second run): {took:.1f} s")


def test_usage_errors_exit_2(installed: Installed) -> None:
    for args in (["--bogus"], ["--prefix", "relative/dir"]):
        r = installed.install(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)


# --- the installed agent in the lab -------------------------------------------------------------------

def lab_missing() -> str | None:
    from lab.consul import consul_missing
    from lab.gwtools import missing_tools
    miss = missing_tools("ip", "ceph-mon", "ceph-osd", "monmaptool")
    if miss:
        return f"not installed on the host: {', '.join(miss)}"
    if consul_missing():
        return consul_missing()
    try:
        import rados  # noqa: F401
        from lab import iscsi
        iscsi.lib()
    except (ImportError, OSError) as e:
        return f"host side of the lab missing: {e}"
    return None


def cli_json(g: Any, *args: str) -> Any:
    r = g.cli("--json", *args)
    assert r.returncode == 0, f"pathagent {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


def scrape(ns: str, url: str) -> str:
    """GET ``url`` from inside network namespace ``ns``."""
    import urllib.request
    from lab.netns import NetnsThread

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    with NetnsThread(ns) as t:
        return t.call(get)


def test_the_installed_agent_serves_a_disk_in_the_lab(installed: Installed, tmp_path: Path) -> None:
    reason = lab_missing()
    if reason:
        print(f"\nSKIP installed agent in the lab: {reason}")
        pytest.skip(reason)
    from lab.iscsi import Session
    t0 = time.monotonic()
    with InstalledLab(tmp_path / "lab", installed.root, gateways=("gwa",)) as lab:
        g = lab.gw["gwa"]
        # the installed check-config accepts a gateway config for this lab's Consul agent and Ceph
        r = g.cli("check-config")
        assert r.returncode == 0 and r.stdout.strip() == f"{g.config}: OK", r.stdout + r.stderr
        assert g.p is not None
        # it is the installed agent that runs: its root is the Debian root, its interpreter the venv's
        assert os.readlink(f"/proc/{g.p.pid}/root") == str(installed.root.path)
        assert os.readlink(f"/proc/{g.p.pid}/exe").startswith(str(installed.root.path))
        started = time.monotonic()
        vip = lab.vip()
        created = cli_json(g, "disk", "create", "installed", "--size", "64M", "--path", f"{vip}/{lab.net.prefixlen}",
                           "--open")
        disk = cli_json(g, "disk", "show", created["id"])
        cli_json(g, "disk", "start", created["id"])

        def served() -> bool:
            rows = cli_json(g, "paths")
            return any(r["disk"] == disk["id"] and r["node"] == "gwa" and r["state"] == "held" for r in rows) \
                and vip in g.addresses()
        try:
            lab.wait(served, 60, "the disk's path held and its IP up on gwa", interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\npaths: {cli_json(g, 'paths')}\nagent log:\n{g.log_text()[-5000:]}") from None
        st = g.cli("status")
        assert st.returncode == 0 and "(healthy)" in st.stdout.splitlines()[0], st.stdout + st.stderr
        tgtd = g.tgtd_pid()
        assert tgtd is not None and os.readlink(f"/proc/{tgtd}/root") == str(installed.root.path), \
            "tgtd is not the root's"
        image = SimpleNamespace(image=disk["image"])
        pattern = os.urandom(4096)
        lab.write_image(image, 1 << 20, pattern)                  # through librbd, read through iSCSI
        with Session(f"{vip}:3260", disk["iqn"], netns=lab.ini()) as s:
            inq = s.inquiry()
            assert (inq.vendor, inq.product) == ("PATHAGNT", "RBD")
            assert s.serial() == disk["serial"]
            blocks, bs = s.capacity()
            assert blocks * bs == 64 << 20
            assert s.read((1 << 20) // bs, 4096 // bs, bs) == pattern
            back = os.urandom(8192)
            s.write(0, back, bs, fua=True)
            s.sync()
        served_after = time.monotonic() - started
        # the installed agent's metrics (prometheus-client as installed: Debian's where the pins accept it)
        metrics = scrape(lab.net.ns("gwa"), f"http://{g.metrics_listen}/metrics")
        assert f'pathagent_path_exported{{disk="{disk["id"]}",index="1"}} 1.0' in metrics, metrics[-3000:]
        assert "pathagent_build_info{" in metrics
        assert lab.read_image(image, 0, len(back)) == back
        r = g.cli("disk", "stop", disk["id"], "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        lab.wait(lambda: vip not in g.addresses(), 30, "the path IP down after disk stop")
    print(f"\ninstalled agent in the lab: {time.monotonic() - t0:.1f} s (disk create to data read and "
          f"written through iSCSI: {served_after:.1f} s)")


def test_prefix_bindir_docdir_and_no_apt(installed: Installed) -> None:
    r = installed.install("--no-apt", "--no-start", "--prefix", "/opt/pa-alt", "--bindir", "/opt/pa-bin",
                          "--docdir", "/opt/pa-doc")
    assert r.returncode == 0, r.stderr
    root = installed.root
    assert os.readlink(root.inside("/opt/pa-bin/pathagent")) == "/opt/pa-alt/bin/pathagent"
    assert root.run(["/opt/pa-bin/pathagent", "--help"]).returncode == 0
    unit = read_unit(installed, "pathagent.service")
    assert unit["ExecStart"] == "/opt/pa-bin/pathagent run"
    assert unit["Documentation"] == "file:///opt/pa-doc/README.md" and root.inside("/opt/pa-doc/README.md").is_file()
    for sample in ("consul/gateway.json", "consul/acl/pathagent-agent.hcl", "consul/acl/pathagent-cli.hcl",
                   "prometheus/pathagent-rules.yml", "docs/consul.md"):     # what the docs tell admins to copy
        assert root.inside(f"/opt/pa-doc/{sample}").is_file(), sample
