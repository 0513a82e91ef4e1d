"""Split-brain safety with the real target: three gateway namespaces (tgt + RBD, iproute, the guard
watchdog), an address sampler every 50 ms on every gateway, and the failures of the safety review
reproduced from outside:

- C2: tgtd stopped (SIGSTOP) and the gateway then cut off: its addresses still go down at its deadline;
- acceptance 2 (C4): the agent frozen (SIGSTOP) longer than the bound and its session then invalidated
  (its Consul agent killed): the gateway stops serving (addresses down, tgtd killed by the guard) before
  any other gateway brings a path up;
- C3: a disk's owner frozen, then `disk stop` and `disk start`: never the same address on two gateways.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from lab.failover import AddressSampler
from lab.iscsilab import IscsiLab

pytestmark = pytest.mark.lab


@pytest.fixture
def lab(safety_lab: IscsiLab) -> IscsiLab:
    return safety_lab


def busiest(lab: IscsiLab) -> Any:
    owners = lab.owners()
    return max(lab.gw.values(), key=lambda g: sum(1 for o in owners.values() if o == g.name))


def restore(lab: IscsiLab, g: Any) -> None:
    """Put a gateway back in service after a test hurt it."""
    g.signal(signal.SIGCONT)
    pid = g.tgtd_pid()
    if pid is not None:
        os.kill(pid, signal.SIGCONT)
    assert lab.consul is not None
    if not lab.consul.running(g.name):
        lab.consul.restart(g.name)
    if not g.running():
        g.start()
    lab.wait(lambda: g.session() is not None and g.running(), 40, f"{g.name} back in service")
    lab.wait(lambda: lab.all_served(), 40, "every path served again")


def test_c2_stopped_tgtd_and_cut_off_gateway_still_drops_its_addresses_in_time(lab: IscsiLab) -> None:
    ds = [lab.create_disk(paths=2, size=16 << 20) for _ in range(3)]
    lab.wait(lambda: lab.all_served(ds), 60, "3 disks served")
    g = busiest(lab)
    mine = {p.ip for d in ds for p in d.paths if lab.owners()[f"{d.id}/{p.index}"] == g.name}
    pid = g.tgtd_pid()
    assert mine and pid is not None
    sampler = AddressSampler(lab)
    sampler.start()
    os.kill(pid, signal.SIGSTOP)                 # every tgtadm call now hangs
    t0 = time.monotonic()
    assert lab.consul is not None
    lab.consul.kill(g.name)                      # and the gateway is cut off from Consul
    try:
        down = lab.wait(lambda: not (g.addresses() & mine), 10, f"{g.name}'s addresses down", interval=0.02)
        lab.wait(lambda: lab.all_served(ds), 40, "the others serving its paths")
        took = time.monotonic() - t0
        assert g.tgtd_pid() != pid, "the stopped tgtd was killed (the data path's one-step stop)"
    finally:
        sampler.stop()
        restore(lab, g)
    print(f"\ntgtd stopped + cut off: {g.name}'s addresses down {down:.2f}s after the cut "
          f"(fence_after {lab.fence_after}s), its paths served elsewhere after {took:.2f}s")
    assert sampler.overlaps == [], f"an address on two gateways: {sampler.overlaps[:3]}"
    assert down < lab.fence_after + 1.0


def test_frozen_agent_whose_session_ends_stops_serving_before_any_takeover(lab: IscsiLab) -> None:
    ds = [lab.create_disk(paths=2, size=16 << 20) for _ in range(3)]
    lab.wait(lambda: lab.all_served(ds), 60, "3 disks served")
    g = busiest(lab)
    mine = {p.ip for d in ds for p in d.paths if lab.owners()[f"{d.id}/{p.index}"] == g.name}
    assert mine
    sampler = AddressSampler(lab)
    sampler.start()
    t0 = time.monotonic()
    g.signal(signal.SIGSTOP)                     # the agent freezes; tgtd and the addresses go on serving
    try:
        time.sleep(0.5)
        assert lab.consul is not None
        lab.consul.kill(g.name)                  # then its session is invalidated
        fenced = lab.wait(lambda: not (g.addresses() & mine) and g.tgtd_pid() is None, 15,
                          f"{g.name}'s guard to fence it", interval=0.02)
        lab.wait(lambda: lab.all_served(ds), 40, "the others serving its paths")
        took = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        sampler.stop()
        restore(lab, g)
    last_frozen = max(t for (n, a), t in sampler.last.items() if n == g.name and a in mine)
    first_other = min(t for (n, a), t in sampler.first.items() if n != g.name and a in mine)
    print(f"\nfrozen agent, session invalidated: {g.name} stopped serving {fenced:.2f}s after the freeze; "
          f"first takeover {first_other - t0:.2f}s, all taken {took:.2f}s; {sampler.samples} samples")
    assert sampler.overlaps == [], f"an address on two gateways: {sampler.overlaps[:3]}"
    assert last_frozen < first_other, "the frozen gateway stopped serving before anyone took over"


def test_disk_stop_with_a_frozen_owner_then_start_never_serves_twice(lab: IscsiLab) -> None:
    d = lab.create_disk(paths=2, size=16 << 20)
    lab.wait(lambda: lab.all_served([d]), 60, "the disk served")
    owner = lab.gw[str(lab.owners()[f"{d.id}/1"])]
    other = next(g for g in lab.gw.values() if g is not owner)
    sampler = AddressSampler(lab)
    sampler.start()
    owner.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        r = other.cli("disk", "stop", d.id, "--timeout", "60")
        stopped = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        r = other.cli("disk", "start", d.id)
        assert r.returncode == 0, r.stderr
        lab.wait(lambda: lab.all_served([d]), 40, "the restarted disk served")
        time.sleep(1.0)
    finally:
        sampler.stop()
        restore(lab, owner)
    print(f"\ndisk stop with a frozen owner: done after {stopped:.1f}s (the owner's guard fenced it, its "
          "session ended by its liveness check, then the lock-delay ran out)")
    assert sampler.overlaps == [], f"an address on two gateways: {sampler.overlaps[:3]}"
