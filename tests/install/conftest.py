"""The install tier: ``scripts/install`` run in a clean Debian 12 root (``lab.installed.DebianRoot``), once per
test session; the root is built with debootstrap the first time and then unpacked from the tarball cached in
``.cache/install`` (``$PATHAGENT_INSTALL_CACHE``), with the apt and pip downloads cached beside it.

``$PATHAGENT_INSTALL_SRC`` installs another checkout instead of this one (e.g. a copy with other dependency
pins). Skipped, with the reason printed, without root, debootstrap or the Debian mirror."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from lab.iscsilab import REPO
from lab.installed import SRC, DebianRoot, Installed, cache_dir, root_missing

#: what pip and apt say when the network, not the install, failed (a pin nobody can meet, or a TLS failure,
#: is a failure of the test, not a skip)
OFFLINE = ("Temporary failure in name resolution", "NewConnectionError", "Network is unreachable",
           "Failed to fetch", "Unable to fetch some archives")


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    reason = root_missing()
    if reason:
        print(f"\nSKIP install tier: {reason}")
        pytest.skip(f"a clean Debian 12 root cannot be built here: {reason}")
    cache = cache_dir()
    cold = not (cache / "bookworm-base.tar").exists()
    work = Path(tempfile.mkdtemp(prefix="pa-install-"))
    root = DebianRoot(work / "root", cache)
    t0 = time.monotonic()
    try:
        try:
            root.create()
        except RuntimeError as e:
            pytest.skip(f"debootstrap could not build a Debian 12 root: {e}")
        root.mount()
        root.bind(os.environ.get("PATHAGENT_INSTALL_SRC") or REPO, SRC, ro=True)
        t1 = time.monotonic()
        first = root.run([f"{SRC}/scripts/install"], timeout=1200)
        t2 = time.monotonic()
        inst = Installed(root, first, {"base": root.build_seconds, "unpack": root.unpack_seconds,
                                       "install": t2 - t1, "to installed": t2 - t0})
        print(f"\ninstall tier ({'cold: base built' if cold else 'cached base'}): debootstrap "
              f"{root.build_seconds:.1f} s, unpack {root.unpack_seconds:.1f} s, scripts/install {t2 - t1:.1f} s")
        if first.returncode != 0 and any(w in first.stderr for w in OFFLINE):
            print(f"\nSKIP install tier: the package index is unreachable:\n{first.stderr[-2000:]}")
            pytest.skip("scripts/install could not reach the package index (pip/apt), see the output above")
        assert first.returncode == 0, f"scripts/install failed ({first.returncode}):\n{first.stderr[-6000:]}"
        yield inst
    finally:
        root.close()
        shutil.rmtree(work, ignore_errors=True)
        print(f"\ninstall tier: {time.monotonic() - t0:.1f} s in all, root removed")
