"""The ``pathagent`` console script as the disk tests run it: a subprocess with a config pointing at the
module's real Consul and micro Ceph; every call checks that no CHAP secret is printed."""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import requests

from agent.adapters.ceph import CephClient
from lab.ceph import MicroCeph

REPO = Path(__file__).resolve().parents[2]
PATHAGENT = REPO / ".venv" / "bin" / "pathagent"
SECRET = "Chap-Secret-0123"
MUTUAL = "Mutual-Secret-4567"
INIT1 = "iqn.1993-08.org.debian:01:host1"
INIT2 = "iqn.1993-08.org.debian:01:host2"


class Cli:
    """Runs ``pathagent --config FILE ...``; every call asserts that no secret is printed."""

    def __init__(self, tmp: Path, ceph: MicroCeph, consul: str, prefix: str) -> None:
        self.consul = consul
        self.prefix = prefix
        self.config = tmp / "pathagent.toml"
        self.config.write_text(self.config_text(ceph.conf_path, 3))
        self.secret_file = tmp / "chap.pw"
        self.secret_file.write_text(SECRET + "\n")
        self.mutual_file = tmp / "mutual.pw"
        self.mutual_file.write_text(MUTUAL)
        self.ceph = CephClient(ceph.conf_path, "admin", 5.0)
        self.n = 0

    def config_text(self, ceph_conf: str, timeout: float) -> str:
        return (f'[consul]\naddress = "{self.consul}"\nprefix = "{self.prefix}"\n'
                f'[ceph]\nconf = "{ceph_conf}"\npool = "rbd"\ntimeout = {timeout}\n'
                '[target]\nbackend = "fake"\n[network]\nbackend = "none"\n')

    def run(self, *args: str, config: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        p = subprocess.run([str(PATHAGENT), "--config", str(config or self.config), *args],
                           capture_output=True, text=True, timeout=90, env=env)
        for secret in (SECRET, MUTUAL):
            assert secret not in p.stdout and secret not in p.stderr, (args, p.stdout, p.stderr)
        return p.returncode, p.stdout, p.stderr

    def ok(self, *args: str) -> str:
        rc, out, err = self.run(*args)
        assert rc == 0, (args, rc, out, err)
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def ips(self) -> tuple[str, str]:
        """Two path addresses no other disk of this module uses (path IPs are unique across disks)."""
        self.n += 1
        return f"198.19.{self.n}.10", f"198.19.{self.n}.11"

    def create(self, name: str, *extra: str) -> str:
        a, b = self.ips()
        out = self.ok("disk", "create", name, "--size", "4M", "--path", f"{a}/24", "--path", f"{b}/24", *extra)
        return out.strip().splitlines()[-1]

    def kv(self) -> dict[str, Any]:
        r = requests.get(f"http://{self.consul}/v1/kv/{self.prefix}/?recurse=true", timeout=5)
        if r.status_code == 404:
            return {}
        r.raise_for_status()
        return {e["Key"]: {"value": base64.b64decode(e["Value"]) if e.get("Value") else b"",
                           "index": e["ModifyIndex"]} for e in r.json()}

    def claims(self) -> dict[str, dict[str, Any]]:
        """``{prefix}/claims/...`` keys (prefix stripped) -> {"value": decoded JSON, "session": holder}."""
        r = requests.get(f"http://{self.consul}/v1/kv/{self.prefix}/claims/?recurse=true", timeout=5)
        if r.status_code == 404:
            return {}
        r.raise_for_status()
        return {e["Key"][len(self.prefix) + len("/claims/"):]: {
            "value": json.loads(base64.b64decode(e["Value"])) if e.get("Value") else None,
            "session": e.get("Session")} for e in r.json()}

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(PATHAGENT), "--config", str(self.config), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def images(self) -> set[str]:
        return set(self.ceph.list_images("rbd"))
