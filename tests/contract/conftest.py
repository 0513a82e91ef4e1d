"""Fixtures for the backend contract suites: a gateway lab (network namespaces), a micro Ceph on the lab's
root-namespace address, RBD images, and the host's Ceph probe capability."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import pytest

from lab.ceph import CephLabError, MicroCeph
from lab.gwtools import RbdImages, missing_tools
from lab.netns import GatewayLab


def require_root_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if missing_tools("ip"):
        pytest.skip("iproute2 (ip) is not installed")


@pytest.fixture(scope="session")
def gw_lab() -> Iterator[GatewayLab]:
    """Gateways gwa, gwb and initiator ini on one bridge, plus the root-namespace leg (Ceph lives there)."""
    require_root_netns()
    with GatewayLab(gateways=("gwa", "gwb"), initiators=("ini",)) as lab:
        yield lab


@pytest.fixture(scope="session")
def ceph(gw_lab: GatewayLab) -> Iterator[Any]:
    miss = missing_tools("ceph-mon", "ceph-osd", "monmaptool")
    if miss:
        pytest.skip(f"Ceph daemons not installed: {', '.join(miss)}")
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as e:
        pytest.skip(f"python rados/rbd bindings missing: {e}")
    work = tempfile.mkdtemp(prefix="pa-ceph-")
    c = MicroCeph(os.path.join(work, "ceph"), ip=gw_lab.host_ip)
    try:
        try:
            c.start()
        except CephLabError as e:
            pytest.fail(f"micro Ceph did not start: {e}")
        yield c
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def images(ceph: Any) -> Iterator[RbdImages]:
    im = RbdImages(ceph.conf_path)
    yield im
    im.close()


@pytest.fixture(scope="session")
def host_ceph_probe(ceph: Any) -> Iterator[Callable[[str, str], None]]:
    """``PluginContext.ceph_probe`` as the agent builds it: on the host's one Ceph client (3 s timeout)."""
    from agent.adapters.ceph import CephClient
    from agent.runtime.service import ceph_probe
    client = CephClient(ceph.conf_path, "admin", 3.0)
    try:
        yield ceph_probe(client)
    finally:
        client.close()


@pytest.fixture(scope="session")
def lio_lab(gw_lab: GatewayLab) -> Iterator[GatewayLab]:
    """Tier 4's own bridge (its own path IPs and initiator namespace ``ini``); its guests reach the micro Ceph
    at ``gw_lab.host_ip`` through the root namespace, where both labs' legs are local addresses."""
    from lab.guest import lio_missing
    reason = lio_missing()
    if reason:
        print(f"\nSKIP lio tier: {reason}")
        pytest.skip(f"LIO guest needed: {reason}")
    with GatewayLab(gateways=(), initiators=("ini",)) as lab:
        yield lab


@pytest.fixture(scope="session")
def lio_guest(lio_lab: GatewayLab, ceph: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Tier 4: one LIO guest (``lab.guest``: the stock Debian kernel under QEMU TCG) on ``lio_lab``, beside its
    initiator namespace, reaching the micro Ceph. Skipped with the reason where the tier cannot run."""
    from lab.guest import GuestPool
    with GuestPool(lio_lab, tmp_path_factory.mktemp("lio-contract")) as pool:
        g, = pool.boot("lioa")
        print(f"\nlio guest {g.name} ({g.ip}): boot to ready {g.boot_seconds or 0:.1f} s")
        yield g
