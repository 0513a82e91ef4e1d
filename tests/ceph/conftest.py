"""Tier 3 (Ceph) fixtures: a real micro Ceph cluster (``lab.ceph.MicroCeph``: one mon, one memstore OSD,
no auth, ~0.5 s to start) per test module, and a real one-server Consul cluster (``lab.consul``) per module.

Without the Ceph daemons or the rados/rbd bindings, or without the Consul binary, the tests are skipped,
saying why and how to fix it (``bash scripts/setup``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from lab.ceph import MicroCeph
from lab.consul import ConsulCluster, consul_missing


def ceph_missing() -> str | None:
    """Why a micro Ceph cluster cannot run here (None when it can)."""
    absent = [t for t in ("ceph-mon", "ceph-osd", "monmaptool") if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (run `bash scripts/setup`: Debian ceph-mon ceph-osd)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return ("python3-rados/python3-rbd not importable: run the tests with the venv built by "
                "`bash scripts/setup` from /usr/bin/python3 --system-site-packages")
    return None


def _skip_without_ceph() -> None:
    reason = ceph_missing()
    if reason:
        print(f"\nSKIP ceph tier: {reason}")
        pytest.skip(f"micro Ceph needed: {reason}")


@pytest.fixture(scope="module")
def micro_ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MicroCeph]:
    """A running micro Ceph cluster (pool ``rbd``), shared by the tests of one module."""
    _skip_without_ceph()
    ceph = MicroCeph(tmp_path_factory.mktemp("ceph") / "cluster").start()
    try:
        yield ceph
    finally:
        ceph.thaw()
        ceph.stop()


@pytest.fixture
def own_ceph(tmp_path: Path) -> Iterator[MicroCeph]:
    """A cluster for one test only (outage tests freeze it)."""
    _skip_without_ceph()
    ceph = MicroCeph(tmp_path / "ceph").start()
    try:
        yield ceph
    finally:
        ceph.thaw()
        ceph.stop()


@pytest.fixture(scope="module")
def consul_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a one-server Consul cluster shared by the tests of one module."""
    reason = consul_missing()
    if reason:
        print(f"\nSKIP: {reason}")
        pytest.skip(f"real Consul needed: {reason}")
    cluster = ConsulCluster(str(tmp_path_factory.mktemp("consul")), servers=1)
    cluster.start()
    try:
        yield cluster.server_address
    finally:
        cluster.teardown()
