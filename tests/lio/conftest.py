"""Tier 4 fixtures: LIO guests (``lab.guest``: Debian 12 under QEMU TCG, the stock kernel with LIO, built
by ``scripts/lio-guest build``) on a ``GatewayLab`` bridge with one initiator namespace.

- ``lio_lab`` (session): ``GatewayLab(gateways=(), initiators=("ini",))``; Ceph/Consul started on the host
  bind ``lio_lab.host_ip``, the initiator runs in ``lio_lab.ns("ini")``.
- ``lio_guests`` (session): a ``GuestPool`` on it; ``lio_guests.boot("a", "b")`` boots guests in parallel.
  Every guest still running is stopped at the end of the session.
- ``lio_guest`` (session): one shared guest, booted once. Don't crash it or cut its link for good.
- ``boot_guests`` (function): ``boot_guests("x", "y")`` boots guests that are stopped after the test.

Skipped, with ``lab.guest.lio_missing()``'s reason, where the tier cannot run.
"""
from __future__ import annotations

from typing import Callable, Iterator

import pytest

from lab.guest import Guest, GuestPool, lio_missing
from lab.netns import GatewayLab


def _skip_without_lio() -> None:
    reason = lio_missing()
    if reason:
        print(f"\nSKIP lio tier: {reason}")
        pytest.skip(f"LIO guest needed: {reason}")


def report_boot(*guests: Guest) -> None:
    for g in guests:
        print(f"\nlio guest {g.name} ({g.ip}): boot to ready {g.boot_seconds or 0:.1f} s, "
              f"qemu RSS {g.rss_kb() // 1024} MiB")


@pytest.fixture(scope="session")
def lio_lab() -> Iterator[GatewayLab]:
    _skip_without_lio()
    with GatewayLab(gateways=(), initiators=("ini",)) as lab:
        yield lab


@pytest.fixture(scope="session")
def lio_guests(lio_lab: GatewayLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestPool]:
    with GuestPool(lio_lab, tmp_path_factory.mktemp("lio")) as pool:
        yield pool


@pytest.fixture(scope="session")
def lio_guest(lio_guests: GuestPool) -> Guest:
    g, = lio_guests.boot("lio-main")
    report_boot(g)
    return g


@pytest.fixture
def boot_guests(lio_guests: GuestPool) -> Iterator[Callable[..., list[Guest]]]:
    booted: list[Guest] = []

    def boot(*names: str, **kw: object) -> list[Guest]:
        guests = lio_guests.boot(*names, **kw)
        booted.extend(guests)
        report_boot(*guests)
        return guests

    yield boot
    for g in booted:
        g.close()
        if g in lio_guests.guests:
            lio_guests.guests.remove(g)
