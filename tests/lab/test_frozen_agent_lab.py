"""Issue 8, acceptance 1, on the real lab: a gateway's pathagent frozen (SIGSTOP) for 12 s while an
initiator writes continuously at its path IP never loses the path.

While the agent is frozen its guard confirms the agent's session by itself (docs/watchdog.md), so it does
not fence at the deadline; when the agent thaws, its fencer counts the guard's deadline and does not fence
either. What is asserted, from outside: the path IP is on the frozen gateway's eth0 at every sample (every
50 ms) from the freeze until after the thaw, and on no other gateway; the writer's acknowledgements never
pause for long (a fence kills tgtd: the gap would be the freeze itself); the guard never fenced, tgtd is
the same process, the lock and the session did not change; every acknowledged write reads back.

The agents run the shipped liveness check (``agent_check_ttl`` 15 s, passed every second), designed to
survive a freeze of ``failover.liveness_bound`` (about 12.2 s); a longer freeze loses the session by
design (and then the paths move, safely: tests/lab/test_failover_lab.py).
"""
from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from lab import failover
from lab.iscsilab import IscsiLab
from plugins.guard import read_events, shared

pytestmark = pytest.mark.lab

FREEZE = 12.0
MAX_GAP = 3.0            # writes are acknowledged every few ms; a fence would stop them for ~10 s


def _conftest() -> Any:
    spec = importlib.util.spec_from_file_location("lab_conftest", Path(__file__).with_name("conftest.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IscsiLab]:
    labs: list[IscsiLab] = []
    try:
        for lab in _conftest().started_lab(tmp_path_factory.mktemp("frozen")):
            labs.append(lab)
            yield lab
    finally:
        for lab in labs:                        # the guards are gone: their /dev/shm pages too
            for g in lab.gw.values():
                for lock in g.state.glob("guard-*.lock"):
                    Path(shared.path(str(g.state), lock.name[len("guard-"):-len(".lock")])).unlink(missing_ok=True)


class Presence(threading.Thread):
    """Whether ``address`` is on gateway ``g``'s eth0 (and eth0 up), every ``interval``."""

    def __init__(self, g: Any, address: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.g, self.address, self.interval = g, address, interval
        self.samples: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                addrs, up = failover.eth0(self.g)
                self.samples.append((failover.now(), up and self.address in addrs))
            except Exception:  # noqa: BLE001 - counted as absent
                self.samples.append((failover.now(), False))
            self.halt.wait(self.interval)

    def stop(self) -> "Presence":
        self.halt.set()
        self.join(5)
        return self


def test_a_frozen_agent_keeps_its_path_and_the_writes_acknowledged(lab: IscsiLab) -> None:
    assert failover.liveness_bound(lab) >= FREEZE, "the lab's liveness check must survive the freeze"
    d = lab.create_disk(paths=1, size=16 << 20)
    p = d.paths[0]
    key = f"{d.id}/{p.index}"
    lab.wait(lambda: lab.all_served([d]), 60, f"disk {d.id} served")
    owner = lab.owners()[key]
    assert owner is not None
    g = lab.gw[owner]
    session, tgtd, fences = g.session(), g.tgtd_pid(), read_events(str(g.state))["count"]
    writer = failover.Writer(f"{p.ip}:3260", d.iqn, lab.ini(), slots=(16 << 20) // failover.WRITE_SIZE).start()
    sampler = failover.AddressSampler(lab)
    presence = Presence(g, p.ip)
    try:
        lab.wait(lambda: writer.acked_after(0) >= 200 or bool(writer.error), 30, "the writer's first 200 writes")
        assert writer.error is None, writer.error
        sampler.start()
        presence.start()
        time.sleep(0.5)
        freeze = failover.Freeze(lab, g)
        t0 = freeze.inject()
        time.sleep(max(0.0, t0 + FREEZE - failover.now()))
        t_thaw = failover.now()
        freeze.heal()                                # SIGCONT; returns once the agent has a session
        time.sleep(3.0)                              # the thawed agent's own fencer had its say
        t_end = failover.now()
    finally:
        for t in (presence, sampler):
            if t.ident is not None:
                t.stop()
        writer.stop()
    during = [(t, on) for t, on in presence.samples if t0 <= t <= t_end]
    missing = [round(t - t0, 2) for t, on in during if not on]
    gap = writer.gap(t0, t_end)
    acked_frozen = writer.acked_after(t0) - writer.acked_after(t_thaw)
    log = (g.state / "guard.log").read_text(errors="replace")
    print(f"\nagent frozen {t_thaw - t0:.1f}s: {len(during)} samples, {len(missing)} without {p.ip} on "
          f"{g.name}; {acked_frozen} writes acknowledged while frozen, longest gap {gap.seconds * 1e3:.0f} ms; "
          f"guard fences {read_events(str(g.state))['count'] - fences}")
    assert len(during) > (t_end - t0) / 0.05 * 0.3, "too few samples to tell"
    assert missing == [], f"{p.ip} was gone from {g.name} at {missing[:5]} s after the freeze"
    assert sampler.overlaps == [], f"a path IP on two gateways: {sampler.overlaps[:3]}"
    assert read_events(str(g.state))["count"] == fences, "the guard fenced"
    assert g.tgtd_pid() == tgtd, "tgtd was killed (a fence)"
    assert lab.owners()[key] == g.name and g.session() == session, "the path changed hands"
    assert acked_frozen > 100 and gap.seconds < MAX_GAP, f"writes stalled for {gap.seconds:.1f}s"
    assert "confirmed session" in log, "the guard did not confirm the session itself"
    for v in failover.verify(lab, d, writer):
        assert v.checked > 100 and v.bad == 0, v.summary()
