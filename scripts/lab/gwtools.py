"""Small helpers shared by the gateway tests, the benchmark and the demo: which tools are missing, RBD
images (and the cluster's blocklist) through one librados handle, and stopping a tgtd that a tgt backend
started."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from lab import proc


def missing_tools(*tools: str) -> list[str]:
    """The tools of ``tools`` found neither on PATH nor in /usr/sbin."""
    return [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def tgt_missing() -> str | None:
    """Why the tgt tier cannot run here, or None."""
    miss = missing_tools("tgtd", "tgtadm", "iscsi-inq")
    if miss:
        return f"not installed: {', '.join(miss)}"
    if not os.path.exists("/usr/lib/tgt/backing-store/bs_rbd.so"):
        return "tgt-rbd (bs_rbd) is not installed"
    from lab import iscsi
    try:
        iscsi.lib()
    except OSError as e:
        return f"libiscsi.so.7 not loadable: {e}"
    return None


class RbdImages:
    """Creates and reads RBD images in ``pool`` through one librados handle."""

    def __init__(self, conf: str, pool: str = "rbd") -> None:
        import rados
        self.cluster = rados.Rados(conffile=conf)
        self.cluster.connect(timeout=10)
        self.ioctx = self.cluster.open_ioctx(pool)

    def create(self, name: str, size: int = 64 << 20) -> str:
        import rbd
        rbd.RBD().create(self.ioctx, name, size, old_format=False,
                         features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
        return name

    def read(self, name: str, offset: int, length: int) -> bytes:
        import rbd
        with rbd.Image(self.ioctx, name, read_only=True) as img:
            return bytes(img.read(offset, length))

    def allocated(self, name: str) -> int:
        """Bytes of ``name`` that RBD has data for (the extents ``diff_iterate`` from the start reports)."""
        import rbd
        total = 0

        def count(offset: int, length: int, exists: bool) -> None:
            nonlocal total
            total += length if exists else 0
        with rbd.Image(self.ioctx, name, read_only=True) as img:
            img.diff_iterate(0, img.size(), None, count)
        return total

    def write(self, name: str, offset: int, data: bytes) -> None:
        import rbd
        with rbd.Image(self.ioctx, name) as img:
            img.write(data, offset)

    def define(self, disk: Any) -> None:
        """Create ``disk``'s image and write its definition into the image metadata (``disk create``)."""
        from agent.core import schema
        self.create(disk.image, disk.size)
        self.set_meta(disk.image, schema.META_KEY, schema.dump(disk))

    def blocklist(self) -> list[str]:
        """The addresses in the OSD blocklist (``ceph osd blocklist ls``)."""
        ret, out, errs = self.cluster.mon_command(json.dumps({"prefix": "osd blocklist ls", "format": "json"}), b"")
        if ret != 0:
            raise RuntimeError(f"osd blocklist ls: {ret} {errs}")
        # pacific prints two documents: the address entries, then the range entries
        text, dec, addrs = (out or b"").decode(), json.JSONDecoder(), []
        i = len(text) - len(text.lstrip())
        while i < len(text):
            doc, end = dec.raw_decode(text, i)
            addrs += [str(e.get("addr")) for e in doc]
            i = end + len(text[end:]) - len(text[end:].lstrip())
        return addrs

    def set_meta(self, name: str, key: str, value: str) -> None:
        import rbd
        with rbd.Image(self.ioctx, name) as img:
            img.metadata_set(key, value)

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


def stop_tgtd(state_dir: str) -> None:
    """Kill the tgtd a tgt backend started under ``state_dir`` (by its pid file, checked against
    /proc/PID/cmdline). tgtd ignores SIGTERM; tests do not need a graceful stop."""
    try:
        with open(os.path.join(state_dir, "tgt", "tgtd.pid")) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    proc.kill(pid, "tgtd")
