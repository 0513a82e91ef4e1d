"""Failover measurement on the iSCSI lab (``lab.iscsilab.IscsiLab``): a writer that never stops, failures
injected into the gateway serving it, the gap the initiator saw, and a check that no acknowledged write was
lost or overwritten. Used by ``tests/lab/test_failover_lab.py`` and ``scripts/bench-failover``.

**Writer.** One libiscsi ``Session`` in the lab's initiator namespace, logged in at one path IP, writes
4 KiB (8 blocks of 512) per command to successive slots of a ring of LBAs, each with Force Unit Access
and followed by SYNCHRONIZE CACHE; a write counts as acknowledged once both returned GOOD. Every write
carries a payload that names it (``payload``: magic, run id, sequence number, LBA, kind, then filler
derived from those), so what a block holds can be told apart from any other write of the run. A failed
write is retried with the same sequence number and payload until acknowledged; on a failure the writer
drops the connection and logs in again at the same portal as soon as a plain TCP connect to it succeeds
(probed every 0.1 s, 0.5 s each), as an initiator whose path came back does. libiscsi's own reconnect
stays on: a reset connection is re-established inside the command that noticed it. Two timeouts:
``timeout`` (2 s) for commands on an established connection, the way a real initiator's NOP-Out detects
a dead path in seconds; ``settle_timeout`` (60 s) for the first command after a login, because a path
that just answered a login is alive and a slow first write is the storage (today: the RBD exclusive
lock, below), not a reason to pile up retries.

The **gap** is the longest time between two consecutive acknowledgements around the failure.

**verify()** reads every acknowledged slot back, through a fresh initiator session and directly from RBD,
and checks that each holds the last acknowledged payload for it. A slot that holds an older write of the
run (a late write of an old owner landing over newer data, or a lost acknowledged write) is **stale**; one
that holds anything else (zeros, a torn or foreign block) is **lost**; a later write of the writer that was
sent but never acknowledged (the one in flight at the stop) may be there and is counted apart. With a
small ring (``slots``) every LBA is rewritten every few hundred milliseconds, so a late write of an old
owner would overwrite newer data and be caught.

**Failures** (``Fault`` subclasses: ``inject()`` returns its time, ``heal()`` undoes it):

- ``Crash``: the gateway's link goes down (``ip link set eth0 down`` inside its namespace), then its
  pathagent and its Consul client agent are SIGKILLed. Its tgtd and its watchdog guard are left: a
  separate process by design, the guard fences at the agent's last deadline (addresses down, tgtd killed),
  and nothing left in the namespace can reach anyone with the link down.
- ``Partition``: the link goes down, everything on the gateway keeps running (it must fence itself).
- ``ConsulPartition``: iptables inside the gateway namespace drop every packet to or from a Consul server
  or serf port (the servers' and every client agent's server/serf_lan/serf_wan ports, TCP and UDP); Ceph,
  iSCSI and the initiator stay reachable, and the local Consul agent keeps running and answering on
  127.0.0.1 (with errors once its RPCs time out). That is what "this gateway lost Consul" means in
  production (a firewall change, a broken Consul VLAN): the hard case, where the agent is never told its
  session is gone. SIGSTOPping the Consul agent instead would model a hung Consul agent (local calls time
  out), and killing it a crashed one (calls refused at once); both are easier to notice.
- ``Freeze``: the pathagent is SIGSTOPped (12 s by default) and SIGCONTed. ``liveness_bound`` says how long
  a freeze its session is designed to survive (its TTL check); the tests freeze no longer than that.
- planned move: ``move()`` runs ``pathagent path move DISK/INDEX NODE`` on a gateway.
- ``StuckInFlight`` (acceptance 2): the old owner's writes stuck in flight, released after the takeover.
  tgtd is SIGSTOPped while the initiator has writes outstanding (the writer's, plus ``probes`` sessions that
  each send one more write after the stop, so they sit unread in tgtd's socket; the bytes are counted
  with ``ss``); the agent and its guard are SIGSTOPped too and the link goes down (the whole gateway
  paused, or a fence that did not happen: otherwise the fencer would SIGKILL tgtd and the stuck writes
  would die with it). After the takeover, once newer writes are acknowledged at the same LBAs and the
  writer is stopped, the release: the old gateway's path addresses are deleted (what its fence would do
  first, so the address is never live twice), iptables let only Ceph traffic through, the link comes up
  and tgtd is SIGCONTed, so it reads and executes the stuck writes against RBD; only then the agent and
  its guard are SIGCONTed (they fence tgtd) and the link is opened fully. ``verify()`` then tells whether
  anything late landed over newer data.

**AddressSampler** records which gateway has which path IP on its eth0 every 50 ms: an IP on two
gateways at one sample is an **overlap** (strict: it counts a gateway whose link is down too, because its
address must already be gone by the time another gateway brings it up); ``live_overlaps`` counts only
gateways whose eth0 is up (reachable), the ones that matter while a paused gateway is cut off.

**run()** does one whole measurement on a fresh one-path disk and returns an ``Outcome``. It also scrapes
every gateway's ``/metrics`` (``Gateway.metrics``: the Prometheus text parser) before the failure, once the
new owner's metrics show the path served (a takeover), and the failed gateway's after the heal, so a test
can check ``pathagent_path_exported`` moving and the takeover counted (``Outcome.metrics_line``).

Why a crash gap is ~30 s without a Ceph-side fence (``[fencing] backend = "none"``, the default): the new
owner's first write waits for the old tgtd's RBD exclusive lock, which librbd breaks only after the OSD
drops the old client's watch (``osd_client_watch_timeout``, 30 s; /work/shared/notes/ceph.md, last
section). With ``ceph-blocklist`` the old owner is blocklisted when its paths are taken over and the gap
is the takeover itself (failure detection + lock-delay, ~7-9 s with the lab's timings). The harness
reports whatever the code does. Measured meanwhile (without the fence):
with ``rbd blocklist on break lock = false`` in the lab's ceph.conf (the taker breaks the lock without
fencing the old tgtd) the stuck-in-flight run found all four probe writes and the writer's own stuck
write landed over newer data, in both read-backs: the check does catch what it is for.

A planned move's gap is the takeover itself, ~0.1 s (old owner: address down, unexport, release; new
owner: acquire, export, address up, then its tickle of the old connection, which libiscsi's TCP answers
with an ACK that the new owner resets, so libiscsi reconnects there at once: docs/placement.md). What
libiscsi (1.19, ``lib/connect.c``, ``lib/socket.c``, ``lib/sync.c``) does on its own, and what it cost
before: it reconnects at once when a connection fails; a failed reconnect sets ``next_reconnect =
time(NULL) + 1`` and polls with no events and a 1 s timeout, so it tries again either after exactly that
1 s (1001 ms traced) or, when the refused socket keeps ``poll`` returning (POLLHUP/POLLERR: the loop
spins), as soon as ``time(NULL)`` reaches the next whole wall-clock second (0-1 s: 0.53-0.92 s traced);
a successful reconnect blocks the next one for 3 wall-clock seconds. When the old owner ended its sessions
while it still had the address, the immediate reconnect reached it and was refused (its target gone), so
the gap was that wait (median 1.01 s over 5 runs of bench-failover, 1.005 s over 10 traced ones, 6 of
them 1.004-1.016 s). Taking the address down first without a tickle left the writer waiting for a reply
that could no longer leave: its 2 s timeout (5 of 6 runs; 0.2 s when its last segment happened to be
unacknowledged and was retransmitted to the new owner). A second move of the same path within 3 s of the
first one's reconnect still waits out libiscsi's 3 s.
"""
from __future__ import annotations

import abc
import bisect
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import requests

from lab import iscsi, proc
from lab.consul import MEMBER_ALIVE, ClusterError
from lab.iscsilab import Gateway, IscsiLab, Samples, path_exported, sample
from lab.netns import NetnsThread, exec_argv, ip

BLOCK = 512
BLOCKS_PER_WRITE = 8
WRITE_SIZE = BLOCK * BLOCKS_PER_WRITE
MAGIC = b"PAFO"
HEADER = struct.Struct(">4s16sQQB")        # magic, run id, seq, lba, kind
KIND_WRITER, KIND_PROBE = 0, 1
WRITER_INITIATOR = "iqn.2016-05.io.pathagent.test:failover-writer"
CHAIN = "pathlab-cut"


def now() -> float:
    return time.monotonic()


# ==== payloads ===========================================================================================

def payload(run: bytes, seq: int, lba: int, kind: int = KIND_WRITER) -> bytes:
    """4 KiB that name one write: the header, then filler hashed from it (a torn block does not match)."""
    head = HEADER.pack(MAGIC, run, seq, lba, kind)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return (head + fill * (WRITE_SIZE // len(fill) + 1))[:WRITE_SIZE]


@dataclass(frozen=True, slots=True)
class Decoded:
    run: bytes
    seq: int
    lba: int
    kind: int


def decode(block: bytes) -> Decoded | None:
    """The write a 4 KiB block holds, or None when it is not an intact payload (zeros, torn, foreign)."""
    if len(block) != WRITE_SIZE or not block.startswith(MAGIC):
        return None
    magic, run, seq, lba, kind = HEADER.unpack_from(block)
    if payload(run, seq, lba, kind) != block:
        return None
    return Decoded(run, seq, lba, kind)


# ==== the writer =========================================================================================

@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    lba: int
    sent: float          # first attempt of this write
    last_sent: float     # the attempt that was acknowledged
    acked: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Failure:
    t: float
    seq: int
    lba: int
    what: str


@dataclass(frozen=True, slots=True)
class Login:
    t: float
    took: float
    revision: str        # INQUIRY product revision: the lab gateway's name (its first 4 characters)


@dataclass(frozen=True, slots=True)
class Gap:
    seconds: float
    start: float         # the acknowledgement before it
    end: float | None    # the one after it (None: not recovered yet)

    @property
    def recovered(self) -> bool:
        return self.end is not None


class Writer:
    """Writes continuously at ``portal`` (see the module docstring). ``slots`` 4 KiB slots from
    ``first_lba``: write ``seq`` goes to slot ``seq % slots``. ``start()``, ``stop()``; the records
    (``acks``, ``failures``, ``logins``) may be read at any time (copy under ``lock``)."""

    def __init__(self, portal: str, iqn: str, netns: str | None, slots: int, first_lba: int = 0,
                 timeout: int = 2, settle_timeout: int = 60, backoff: float = 0.1, probe_timeout: float = 0.5,
                 initiator: str = WRITER_INITIATOR, sync: bool = True, fua: bool = True,
                 run: bytes | None = None) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.portal, self.iqn, self.netns = portal, iqn, netns
        self.slots, self.first_lba = slots, first_lba
        self.timeout, self.settle_timeout, self.backoff = timeout, settle_timeout, backoff
        self.probe_timeout = probe_timeout
        self.unreachable = 0            # connect probes that failed while logged out
        self._probe_thread: NetnsThread | None = None
        self.initiator, self.sync, self.fua = initiator, sync, fua
        self.run_id = run or uuid.uuid4().bytes
        self.acks: list[Ack] = []
        self.failures: list[Failure] = []
        self.logins: list[Login] = []
        self.attempted = -1             # highest sequence number sent at least once
        self.stopped_at: float | None = None
        self._ack_times: list[float] = []
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"writer-{portal}", daemon=True)
        self.error: BaseException | None = None

    def lba(self, seq: int) -> int:
        return self.first_lba + (seq % self.slots) * BLOCKS_PER_WRITE

    def payload(self, seq: int) -> bytes:
        return payload(self.run_id, seq, self.lba(seq))

    def start(self) -> "Writer":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> "Writer":
        """Stop after the write in flight (waits up to ``timeout``, default settle_timeout + 5 s)."""
        self._halt.set()
        if self.stopped_at is None:
            self.stopped_at = now()
        self._thread.join(timeout if timeout is not None else self.settle_timeout + 5)
        if self._thread.is_alive():
            raise RuntimeError(f"the writer at {self.portal} did not stop")
        return self

    def running(self) -> bool:
        return self._thread.is_alive()

    def _reachable(self) -> bool:
        """A plain TCP connect to the portal within ``probe_timeout`` (in the writer's namespace). libiscsi's
        own connect waits out the kernel's SYN retransmissions (1, 3, 7 s), so a login started while the
        path IP was nowhere would notice its return seconds late; probing first keeps that delay out of
        the gap, the way an initiator retrying its login every second would."""
        host, port = self.portal.rsplit(":", 1)

        def probe() -> bool:
            try:
                with socket.create_connection((host, int(port)), timeout=self.probe_timeout):
                    return True
            except OSError:
                return False
        if self.netns is None:
            return probe()
        if self._probe_thread is None:
            self._probe_thread = NetnsThread(self.netns)
        return self._probe_thread.call(probe)

    def _login(self) -> iscsi.Session:
        t0 = now()
        s = iscsi.Session(self.portal, self.iqn, netns=self.netns, initiator=self.initiator,
                          timeout=self.timeout)
        try:
            rev = s.inquiry().revision
        except iscsi.IscsiError:
            s.close(logout=False)
            raise
        with self.lock:
            self.logins.append(Login(now(), now() - t0, rev))
        return s

    def _loop(self) -> None:
        try:
            self._write_forever()
        except BaseException as e:  # noqa: BLE001 - reported by the caller through .error
            self.error = e

    def _write_forever(self) -> None:
        s: iscsi.Session | None = None
        seq, first_sent, attempts = 0, 0.0, 0
        fresh = False
        try:
            while not self._halt.is_set():
                lba = self.lba(seq)
                if s is None:
                    if not self._reachable():
                        self.unreachable += 1
                        self._halt.wait(self.backoff)
                        continue
                    try:
                        s = self._login()
                        fresh = True
                    except iscsi.IscsiError as e:
                        with self.lock:
                            self.failures.append(Failure(now(), seq, lba, f"login: {e}"))
                        self._halt.wait(self.backoff)
                        continue
                if fresh:
                    s.set_timeout(self.settle_timeout)
                t = now()
                if attempts == 0:
                    first_sent = t
                attempts += 1
                self.attempted = max(self.attempted, seq)
                try:
                    s.write(lba, self.payload(seq), BLOCK, fua=self.fua)
                    if self.sync:
                        s.sync()
                except iscsi.IscsiError as e:
                    with self.lock:
                        self.failures.append(Failure(now(), seq, lba, str(e)))
                    s.close(logout=False)
                    s = None
                    self._halt.wait(self.backoff)
                    continue
                acked = now()
                with self.lock:
                    self.acks.append(Ack(seq, lba, first_sent, t, acked, attempts))
                    self._ack_times.append(acked)
                if fresh:
                    s.set_timeout(self.timeout)
                    fresh = False
                seq, attempts = seq + 1, 0
        finally:
            if s is not None:
                s.close(logout=False)
            if self._probe_thread is not None:
                self._probe_thread.close()

    # --- records ----------------------------------------------------------------------------------------
    def snapshot(self) -> tuple[list[Ack], list[Failure], list[Login]]:
        with self.lock:
            return list(self.acks), list(self.failures), list(self.logins)

    def acked_after(self, t: float) -> int:
        """How many writes were acknowledged after ``t``."""
        with self.lock:
            return len(self._ack_times) - bisect.bisect_right(self._ack_times, t)

    def gap(self, since: float, until: float | None = None) -> Gap:
        """The longest time between consecutive acknowledgements, over the intervals that end at or after
        ``since`` and start before ``until`` (default: no bound). The interval after the last
        acknowledgement counts too, up to now (or the stop): if it is the longest, the writer has not
        recovered (``end`` None)."""
        acks, _, _ = self.snapshot()
        best = Gap(0.0, since, since)
        for prev, a in zip(acks, acks[1:]):
            if a.acked >= since and (until is None or prev.acked < until):
                if a.acked - prev.acked > best.seconds:
                    best = Gap(a.acked - prev.acked, prev.acked, a.acked)
        if acks:
            last = acks[-1].acked
            t_end = self.stopped_at if self.stopped_at is not None else now()
            if until is not None:
                t_end = min(t_end, until)
            if t_end >= since and t_end - last > best.seconds:
                best = Gap(t_end - last, last, None)
        return best

    def last_acked(self) -> dict[int, Ack]:
        """slot LBA -> its last acknowledged write."""
        acks, _, _ = self.snapshot()
        out: dict[int, Ack] = {}
        for a in acks:
            out[a.lba] = a
        return out


# ==== verify =============================================================================================

@dataclass
class Verdict:
    """What one read-back source (``initiator`` or ``rbd``) found in the acknowledged slots."""
    source: str
    checked: int = 0
    ok: int = 0
    newer: int = 0                       # a later, unacknowledged write of the writer (allowed)
    stale: list[tuple[int, int, str]] = field(default_factory=list)   # (lba, expected seq, what is there)
    lost: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return len(self.stale) + len(self.lost)

    def summary(self) -> str:
        s = f"{self.source}: {self.ok}/{self.checked} ok, {len(self.stale)} stale, {len(self.lost)} lost"
        if self.newer:
            s += f", {self.newer} newer unacknowledged"
        bad = (self.stale + self.lost)[:3]
        return s + (f" (e.g. {bad})" if bad else "")


def judge(writer: Writer, source: str, read: Callable[[int, int], bytes], chunk_slots: int = 256) -> Verdict:
    """Check every acknowledged slot; ``read(lba, blocks)`` reads from the source under test."""
    last = writer.last_acked()
    v = Verdict(source)
    lbas = sorted(last)
    i = 0
    while i < len(lbas):
        start = lbas[i]
        span = [x for x in lbas[i:i + chunk_slots] if x < start + chunk_slots * BLOCKS_PER_WRITE]
        end = span[-1] + BLOCKS_PER_WRITE
        data = read(start, end - start)
        for lba in span:
            a = last[lba]
            off = (lba - start) * BLOCK
            block = data[off:off + WRITE_SIZE]
            v.checked += 1
            if block == writer.payload(a.seq):
                v.ok += 1
                continue
            d = decode(block)
            if d is None:
                what = "zeros" if block.count(0) == len(block) else "not an intact payload"
                v.lost.append((lba, a.seq, what))
            elif d.run != writer.run_id:
                v.lost.append((lba, a.seq, "a payload of another run"))
            elif d.kind == KIND_PROBE:
                v.stale.append((lba, a.seq, f"probe write {d.seq} (sent to the old owner, never acknowledged)"))
            elif d.seq > a.seq and d.seq <= writer.attempted and d.lba == lba:
                v.newer += 1
            elif d.seq < a.seq:
                v.stale.append((lba, a.seq, f"older write {d.seq}"))
            else:
                v.lost.append((lba, a.seq, f"write {d.seq} for lba {d.lba}"))
        i += len(span)
    return v


def verify(lab: IscsiLab, disk: Any, writer: Writer, portal: str | None = None) -> list[Verdict]:
    """Read every acknowledged slot back through a fresh initiator session (at ``portal``, default the
    writer's) and directly from RBD (``lab.read_image``); one ``Verdict`` each."""
    out = []
    with iscsi.Session(portal or writer.portal, disk.iqn, netns=lab.ini(), initiator=writer.initiator + "-verify",
                       timeout=30) as s:
        out.append(judge(writer, "initiator", lambda lba, n: s.read(lba, n)))
    out.append(judge(writer, "rbd", lambda lba, n: lab.read_image(disk, lba * BLOCK, n * BLOCK)))
    return out


# ==== observation ========================================================================================

def eth0(g: Gateway) -> tuple[set[str], bool]:
    """(path IPs on the gateway's eth0 besides its own, whether eth0 is up)."""
    out = json.loads(ip("-4", "-j", "addr", "show", "dev", "eth0", ns=g.ns).stdout or "[]")
    addrs = {a["local"] for link in out for a in link.get("addr_info", []) if a["local"] != g.ip}
    up = any("UP" in link.get("flags", []) for link in out)
    return addrs, up


class AddressSampler(threading.Thread):
    """Which gateway has which path IP up, every ``interval``; any IP up on two gateways is an overlap
    (``overlaps``: whatever the gateways' links; ``live_overlaps``: only gateways whose eth0 is up)."""

    def __init__(self, lab: IscsiLab, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.lab, self.interval = lab, interval
        self.overlaps: list[tuple[float, str, list[str]]] = []
        self.live_overlaps: list[tuple[float, str, list[str]]] = []
        self.last: dict[tuple[str, str], float] = {}
        self.first: dict[tuple[str, str], float] = {}
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t = now()
            seen: dict[str, list[str]] = {}
            live: dict[str, list[str]] = {}
            for g in self.lab.gw.values():
                try:
                    addrs, up = eth0(g)
                except Exception:  # noqa: BLE001 - a namespace being rebuilt
                    continue
                for a in addrs:
                    seen.setdefault(a, []).append(g.name)
                    if up:
                        live.setdefault(a, []).append(g.name)
                    self.last[(g.name, a)] = t
                    self.first.setdefault((g.name, a), t)
            self.overlaps += [(t, a, ns) for a, ns in seen.items() if len(ns) > 1]
            self.live_overlaps += [(t, a, ns) for a, ns in live.items() if len(ns) > 1]
            self.samples += 1
            self.halt.wait(self.interval)

    def stop(self) -> "AddressSampler":
        self.halt.set()
        self.join(5)
        return self

    def first_elsewhere(self, address: str, besides: str, after: float) -> float | None:
        """When a gateway other than ``besides`` was first seen with ``address`` after ``after``."""
        ts = [t for (g, a), t in self.first.items() if a == address and g != besides and t >= after]
        return min(ts) if ts else None


class OwnerWatch(threading.Thread):
    """The lock holder of one path (``lab.owners()``), every ``interval``: ``changes`` is [(time, node)]."""

    def __init__(self, lab: IscsiLab, path: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.lab, self.path, self.interval = lab, path, interval
        self.changes: list[tuple[float, str | None]] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                o = self.lab.owners().get(self.path)
            except Exception:  # noqa: BLE001 - the Consul server busy; counted
                self.errors += 1
            else:
                if not self.changes or self.changes[-1][1] != o:
                    self.changes.append((now(), o))
            self.halt.wait(self.interval)

    def stop(self) -> "OwnerWatch":
        self.halt.set()
        self.join(5)
        return self


# ==== failure injection ==================================================================================

def link(g: Gateway, up: bool) -> None:
    ip("link", "set", "eth0", "up" if up else "down", ns=g.ns)


def iptables(g: Gateway, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(exec_argv(g.ns, ["iptables", "-w", "5", *args]), capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)} in {g.ns}: {r.stderr.strip()}")
    return r


def cut(g: Gateway, rules: Sequence[Sequence[str]]) -> None:
    """Install ``rules`` (each the part after ``-A CHAIN``) in a chain of our own, jumped to from INPUT and
    OUTPUT for eth0 only (loopback stays open)."""
    uncut(g)
    iptables(g, "-N", CHAIN)
    for r in rules:
        iptables(g, "-A", CHAIN, *r)
    iptables(g, "-I", "INPUT", "-i", "eth0", "-j", CHAIN)
    iptables(g, "-I", "OUTPUT", "-o", "eth0", "-j", CHAIN)


def uncut(g: Gateway) -> None:
    """Remove what ``cut`` installed (idempotent)."""
    iptables(g, "-D", "INPUT", "-i", "eth0", "-j", CHAIN, check=False)
    iptables(g, "-D", "OUTPUT", "-o", "eth0", "-j", CHAIN, check=False)
    iptables(g, "-F", CHAIN, check=False)
    iptables(g, "-X", CHAIN, check=False)


def consul_ports(lab: IscsiLab) -> list[int]:
    """Every server, serf_lan and serf_wan port of the lab's Consul agents (servers and clients)."""
    assert lab.consul is not None
    ports = {n.ports[k] for n in lab.consul.nodes.values() for k in ("server", "serf_lan", "serf_wan")}
    return sorted(ports)


def ceph_ports(lab: IscsiLab) -> tuple[int, int]:
    """The micro Ceph's port block (monitor v2/v1 and the OSD's ports)."""
    assert lab.ceph is not None and lab.ceph.mon_port is not None
    return lab.ceph.mon_port, lab.ceph.mon_port + 15


def stop_threads(pid: int, stopped: bool, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is (or is no longer) stopped: signal delivery is asynchronous."""
    end = now() + timeout
    while now() < end:
        try:
            states = [proc.state(int(t)) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            return
        if all((s == "T") == stopped for s in states if s is not None):
            return
        time.sleep(0.005)
    raise RuntimeError(f"pid {pid}: threads still {'running' if stopped else 'stopped'} after {timeout} s")


def pause(pid: int | None, needle: str) -> bool:
    if pid is not None and proc.signal_checked(pid, signal.SIGSTOP, needle):
        stop_threads(pid, True)
        return True
    return False


def resume(pid: int | None, needle: str) -> None:
    if pid is not None and proc.signal_checked(pid, signal.SIGCONT, needle):
        stop_threads(pid, False)


class Fault(abc.ABC):
    """A failure of gateway ``g``. ``inject()`` returns when it is in place (its time, on ``now()``);
    ``heal()`` undoes it and returns once the gateway runs an agent with a session again."""

    kind = ""

    def __init__(self, lab: IscsiLab, g: Gateway) -> None:
        self.lab, self.g = lab, g
        self.t: float | None = None
        self.session_before = g.session()

    @abc.abstractmethod
    def inject(self) -> float: ...

    @abc.abstractmethod
    def heal(self) -> None: ...

    def wait_back(self, timeout: float = 60) -> float:
        """Wait until the gateway's agent runs with a Consul session (a new one when the fault ended it)."""
        g = self.g
        return self.lab.wait(lambda: g.running() and g.session() is not None, timeout, f"{g.name} back in service")


def rejoin(lab: IscsiLab, g: Gateway, timeout: float = 20) -> None:
    """Ask the gateway's Consul agent to join the server again (``/v1/agent/join``) until it is a live
    member: serf retries a failed member only every 30 s by itself, and a heal should not wait for that."""
    assert lab.consul is not None
    http = lab.consul.http_address(g.name)
    server = lab.consul.node(lab.consul.server_names[0]).serf_lan

    def joined() -> bool:
        try:
            requests.put(f"http://{http}/v1/agent/join/{server}", timeout=2).raise_for_status()
            assert lab.consul is not None
            return lab.consul.member_status(g.name) == MEMBER_ALIVE
        except (requests.RequestException, OSError, ValueError, ClusterError):
            return False
    lab.wait(joined, timeout, f"{g.name}'s Consul agent to join again", interval=0.5)


class Crash(Fault):
    kind = "crash"

    def inject(self) -> float:
        g = self.g
        link(g, False)
        self.t = now()
        g.signal(signal.SIGKILL)
        if g.p is not None:
            g.p.wait(10)
        assert self.lab.consul is not None
        self.lab.consul.kill(g.name)
        return self.t

    def heal(self) -> None:
        g = self.g
        link(g, True)
        assert self.lab.consul is not None
        self.lab.consul.restart(g.name)
        g.start()
        self.lab.wait(lambda: g.session() not in (None, self.session_before), 60,
                      f"{g.name} to have a new session after the crash")
        self.wait_back()


class Partition(Fault):
    kind = "partition"

    def inject(self) -> float:
        link(self.g, False)
        self.t = now()
        return self.t

    def heal(self) -> None:
        link(self.g, True)
        rejoin(self.lab, self.g)
        self.lab.wait(lambda: self.g.session() not in (None, self.session_before), 60,
                      f"{self.g.name} to have a new session after the partition")
        self.wait_back()


class ConsulPartition(Fault):
    kind = "consul-partition"

    def rules(self) -> list[list[str]]:
        ports = ",".join(str(p) for p in consul_ports(self.lab))
        return [["-p", proto, "-m", "multiport", "--ports", ports, "-j", "DROP"] for proto in ("tcp", "udp")]

    def inject(self) -> float:
        cut(self.g, self.rules())
        self.t = now()
        return self.t

    def heal(self) -> None:
        uncut(self.g)
        rejoin(self.lab, self.g)
        self.lab.wait(lambda: self.g.session() not in (None, self.session_before), 60,
                      f"{self.g.name} to have a new session after the Consul partition")
        self.wait_back()


class Freeze(Fault):
    """SIGSTOP of the pathagent (``heal`` is the SIGCONT); tgtd, the guard and Consul keep running."""

    kind = "freeze"

    def inject(self) -> float:
        g = self.g
        assert g.p is not None
        pause(g.p.pid, "agent.cli")
        self.t = now()
        return self.t

    def heal(self) -> None:
        g = self.g
        assert g.p is not None
        resume(g.p.pid, "agent.cli")
        self.wait_back()


def socket_backlog(g: Gateway, port: int = 3260) -> int:
    """Bytes received by the kernel and not yet read by the listener process, over the gateway's
    established connections on local ``port`` (``ss`` Recv-Q)."""
    r = subprocess.run(exec_argv(g.ns, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"]),
                       capture_output=True, text=True, timeout=10)
    total = 0
    for line in r.stdout.splitlines():
        f = line.split()
        if f and f[0].isdigit():
            total += int(f[0])
    return total


class StuckInFlight(Fault):
    """See the module docstring. ``inject()`` stops tgtd, sends one write per probe session (to the LBAs
    ``probe_lbas``), pauses the agent and its guard, and cuts the link; ``release()`` lets the stuck
    writes go to RBD (after the caller stopped the writer); ``heal()`` gives the gateway back."""

    kind = "stuck-in-flight"

    def __init__(self, lab: IscsiLab, g: Gateway, portal: str, iqn: str, run: bytes, probe_lbas: Sequence[int],
                 hold_fence: bool = True) -> None:
        super().__init__(lab, g)
        self.portal, self.iqn, self.run, self.probe_lbas = portal, iqn, run, list(probe_lbas)
        self.hold_fence = hold_fence
        self.tgtd = g.tgtd_pid()
        self.guards = g.guard_pids()
        self.probes: list[iscsi.Session] = []
        self.probe_threads: list[threading.Thread] = []
        self.probe_errors: list[str] = []
        self.stuck_bytes = 0
        self.left_bytes: int | None = None
        self.released: float | None = None
        self.tgtd_errors: list[str] = []

    def login_probes(self) -> None:
        """Log the probe sessions in while tgtd still answers (one per stuck write)."""
        for i, _ in enumerate(self.probe_lbas):
            self.probes.append(iscsi.Session(self.portal, self.iqn, netns=self.lab.ini(), timeout=5, reconnect=False,
                                             initiator=f"{WRITER_INITIATOR}-probe{i}"))

    def _probe(self, s: iscsi.Session, seq: int, lba: int) -> None:
        try:
            s.write(lba, payload(self.run, seq, lba, KIND_PROBE), BLOCK, fua=True)
            self.probe_errors.append(f"probe {seq} at lba {lba} was acknowledged")
        except iscsi.IscsiError as e:
            self.probe_errors.append(f"probe {seq}: {e}")
        finally:
            s.close(logout=False)

    def inject(self) -> float:
        g = self.g
        if self.tgtd is None:
            raise RuntimeError(f"{g.name} runs no tgtd")
        if not self.probes:
            self.login_probes()
        base = socket_backlog(g)
        pause(self.tgtd, "tgtd")
        self.t = now()
        for i, (s, lba) in enumerate(zip(self.probes, self.probe_lbas)):
            th = threading.Thread(target=self._probe, args=(s, i, lba), daemon=True, name=f"probe{i}")
            th.start()
            self.probe_threads.append(th)
        want = base + len(self.probe_lbas) * WRITE_SIZE
        end = now() + 3
        while socket_backlog(g) < want and now() < end:
            time.sleep(0.02)
        self.stuck_bytes = socket_backlog(g)
        if self.hold_fence:
            assert g.p is not None
            pause(g.p.pid, "agent.cli")
            for pid in self.guards:
                pause(pid, "plugins.guard")
        link(g, False)
        return self.t

    def release(self, wait: float = 3.0) -> None:
        """Delete the gateway's path addresses, open the link to Ceph only, SIGCONT tgtd and give it ``wait``
        seconds (and until its socket backlog is read) to execute what was stuck."""
        g = self.g
        for a in eth0(g)[0]:
            ip("addr", "del", f"{a}/{self.lab.net.prefixlen}", "dev", "eth0", ns=g.ns, check=False)
        lo, hi = ceph_ports(self.lab)
        host = self.lab.net.host_ip
        cut(g, [["-s", host, "-p", "tcp", "--sport", f"{lo}:{hi}", "-j", "RETURN"],
                ["-d", host, "-p", "tcp", "--dport", f"{lo}:{hi}", "-j", "RETURN"],
                ["-j", "DROP"]])
        link(g, True)
        self.released = now()
        resume(self.tgtd, "tgtd")
        t_min, t_max = now() + wait, now() + 3 * wait
        while now() < t_max and (now() < t_min or socket_backlog(g) > 0):
            time.sleep(0.1)
        self.left_bytes = socket_backlog(g) if self.tgtd is not None and proc.alive(self.tgtd) else 0
        self.tgtd_errors = self._tgtd_log_errors()

    def _tgtd_log_errors(self) -> list[str]:
        log = self.g.state / "tgt" / "tgtd.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines()[-200:] if re.search(r"error|fail|shutdown", ln, re.I)][-5:]

    def heal(self) -> None:
        g = self.g
        if self.released is None:
            self.release()
        if self.hold_fence:
            for pid in self.guards:
                resume(pid, "plugins.guard")
            assert g.p is not None
            resume(g.p.pid, "agent.cli")
        if self.tgtd is not None:
            self.lab.wait(lambda: self.tgtd is None or not proc.alive(self.tgtd), 15,
                          f"{g.name}'s fence to kill the released tgtd")
        uncut(g)
        rejoin(self.lab, g)
        for th in self.probe_threads:
            th.join(15)
        self.lab.wait(lambda: g.session() not in (None, self.session_before), 60,
                      f"{g.name} to have a new session after the pause")
        self.wait_back()


def move(lab: IscsiLab, path: str, node: str, via: Gateway | None = None,
         timeout: float = 60) -> tuple[float, subprocess.CompletedProcess[str]]:
    """``pathagent path move PATH NODE`` run on ``via`` (default: ``node``'s gateway): (seconds, result)."""
    g = via or lab.gw[node]
    t0 = now()
    r = g.cli("path", "move", path, node, "--timeout", f"{timeout:g}", timeout=timeout + 30)
    return now() - t0, r


# ==== one measurement ====================================================================================

KINDS = ("crash", "partition", "consul-partition", "freeze", "move", "stuck-in-flight")


@dataclass
class Outcome:
    """One measurement. Times are seconds after ``t0`` unless said otherwise."""
    kind: str
    victim: str
    disk: str
    path: str
    address: str
    t0: float                               # when the failure was in place (or the move was asked), on now()
    gap: Gap                                # over the failure (from t0 until the heal began)
    heal_gap: Gap | None                    # while the gateway was given back (crash, partitions)
    owner_after: str | None
    served_by_after: str | None             # the gateway(s) with the path IP up at the end, comma-separated
    takeover: float | None                  # another gateway first had the address up
    detected: float | None                  # the writer's first failed attempt
    relogin: float | None                   # its first login after that (the gateway that answered: revision)
    relogin_to: str | None
    owners: list[tuple[float, str | None]]  # the path's lock holder over the run (absolute times)
    overlaps: list[tuple[float, str, list[str]]]
    live_overlaps: list[tuple[float, str, list[str]]]
    samples: int
    verdicts: list[Verdict]
    acks: int
    failures: list[Failure]
    logins: list[Login]
    timeout: int                            # the writer's command timeout on an established connection
    notes: list[str] = field(default_factory=list)
    freeze_for: float | None = None
    stuck_bytes: int = 0
    left_bytes: int | None = None
    move_seconds: float | None = None
    wall: float = 0.0
    writer: Writer | None = field(default=None, repr=False)
    metrics_before: dict[str, Samples | None] = field(default_factory=dict, repr=False)   # gateway -> scrape
    metrics_after: dict[str, Samples | None] = field(default_factory=dict, repr=False)    # after a takeover
    metrics_healed: Samples | None = field(default=None, repr=False)    # the failed gateway's, after the heal

    @property
    def lost(self) -> int:
        """Acknowledged writes lost or overwritten, over every read-back source."""
        return sum(v.bad for v in self.verdicts)

    @property
    def owner_nodes(self) -> list[str | None]:
        return [o for _, o in self.owners]

    def line(self) -> str:
        def rel(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f} s"
        g = f"{self.gap.seconds:.2f} s" + ("" if self.gap.recovered else " (NOT RECOVERED)")
        parts = [f"{self.kind} of {self.victim}: gap {g}"]
        if self.heal_gap is not None:
            parts.append(f"heal gap {self.heal_gap.seconds:.2f} s")
        if self.freeze_for is not None:
            parts.append(f"frozen {self.freeze_for:.1f} s")
        parts += [f"owners {' -> '.join(str(o) for o in self.owner_nodes) or '?'}",
                  f"served by {self.served_by_after}", f"takeover {rel(self.takeover)}",
                  f"writer: first failure {rel(self.detected)} (timeout {self.timeout} s), "
                  f"login again {rel(self.relogin)} at {self.relogin_to}, acknowledged again "
                  f"{rel(None if self.gap.end is None else self.gap.end - self.t0)}",
                  f"overlaps {len(self.overlaps)} (live {len(self.live_overlaps)}) in {self.samples} samples",
                  f"{self.acks} acks, {len(self.failures)} failed attempts",
                  "; ".join(v.summary() for v in self.verdicts)]
        if self.move_seconds is not None:
            parts.append(f"path move CLI {self.move_seconds:.2f} s")
        if self.kind == "stuck-in-flight":
            parts.append(f"stuck in tgtd {self.stuck_bytes} bytes, unread after the release {self.left_bytes}")
        if self.metrics_after:
            parts.append(self.metrics_line())
        parts.append(f"wall {self.wall:.0f} s")
        return ", ".join(parts + self.notes)

    def exported_on(self, scrapes: dict[str, Samples | None]) -> list[str]:
        """The gateways whose scrape shows this run's path served (``pathagent_path_exported`` 1)."""
        return sorted(n for n, s in scrapes.items() if path_exported(s).get(self.path) == 1)

    def metric_delta(self, node: str, name: str) -> float | None:
        """How much ``name`` grew on ``node`` from before the failure to after the takeover."""
        a = sample(self.metrics_after.get(node), name)
        b = sample(self.metrics_before.get(node), name)
        return None if a is None or b is None else a - b

    def metrics_line(self) -> str:
        """What the scrapes showed: where the path was exported, the takeover and failover counted."""
        taker = self.owner_after or "?"

        def num(x: float | None, unit: str = "") -> str:
            return "-" if x is None else f"{x:g}{unit}"
        last = sample(self.metrics_after.get(taker), "pathagent_last_failover_seconds")
        return (f"metrics: path exported on {','.join(self.exported_on(self.metrics_before)) or '-'} -> "
                f"{','.join(self.exported_on(self.metrics_after)) or '-'}, {taker} takeovers "
                f"+{num(self.metric_delta(taker, 'pathagent_takeovers_total'))}, failovers "
                f"+{num(self.metric_delta(taker, 'pathagent_failover_seconds_count'))}, last failover "
                f"{num(None if last is None else round(last, 2), ' s')}")

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 4)
        return {"kind": self.kind, "victim": self.victim, "gap": r(self.gap.seconds),
                "recovered": self.gap.recovered,
                "heal_gap": None if self.heal_gap is None else r(self.heal_gap.seconds),
                "takeover": r(self.takeover), "detected": r(self.detected), "relogin": r(self.relogin),
                "owners": self.owner_nodes, "served_by_after": self.served_by_after,
                "overlaps": len(self.overlaps), "live_overlaps": len(self.live_overlaps), "lost": self.lost,
                "acks": self.acks, "failures": len(self.failures), "timeout": self.timeout,
                "wall": round(self.wall, 1)}


def fencing_backend(lab: IscsiLab) -> str:
    """The ``[fencing] backend`` the lab's agents run with."""
    from agent.config import load
    return load(str(next(iter(lab.gw.values())).config)).fencing.backend


def liveness_bound(lab: IscsiLab) -> float:
    """The longest agent freeze that its session survives by design: the TTL check
    (``[consul] agent_check_ttl``, passed every ``session.PASS_EVERY`` s or fifth of it, whichever is
    shorter) must be passed again after the thaw, which takes the liveness thread's next tick (<= 1 s;
    the fencer counts what the guard proved meanwhile, so no confirmation is awaited) and the main loop's
    next beat (at once: its wait ran out during the freeze), with half a second to spare. Infinite without
    a TTL check."""
    from agent.config import load
    cfg = load(str(next(iter(lab.gw.values())).config))
    c = cfg.consul
    if c.agent_check_ttl <= 0:
        return float("inf")
    from agent.runtime.session import PASS_EVERY
    return c.agent_check_ttl - min(c.agent_check_ttl / 5, PASS_EVERY) - 1.0 - 0.5


def run(lab: IscsiLab, kind: str, *, slots: int | None = None, size: int = 16 << 20, freeze_for: float = 12.0,
        recover_timeout: float = 90.0, after: int = 300, settle: float = 1.0, probes: int = 4,
        timeout: int = 2, log: Callable[[str], None] | None = None) -> Outcome:
    """One measurement of ``kind`` (see ``KINDS``) on a new one-path disk: start it, write at its path IP,
    fail its owner (or move the path), wait until another gateway serves the path (for a takeover) and
    ``after`` writes were acknowledged after that (or after the thaw, or the move); heal, stop, verify.
    ``slots`` defaults to the whole disk (successive LBAs) and to 128 for stuck-in-flight (rewritten
    LBAs). A writer that does not recover within ``recover_timeout`` is noted in ``notes`` and shows as
    an open gap."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    say = log or (lambda m: None)
    wall = now()
    d = lab.create_disk(paths=1, size=size)
    p = d.paths[0]
    key = f"{d.id}/{p.index}"
    lab.wait(lambda: lab.all_served([d]), 60, f"disk {d.id} served")
    owner = lab.owners()[key]
    assert owner is not None
    victim = lab.gw[owner]
    nslots = slots or (128 if kind == "stuck-in-flight" else size // WRITE_SIZE)
    portal = f"{p.ip}:3260"
    writer = Writer(portal, d.iqn, lab.ini(), nslots, timeout=timeout).start()
    sampler = AddressSampler(lab)
    watch = OwnerWatch(lab, key)
    fault: Fault | None = None
    notes: list[str] = []
    metrics_before: dict[str, Samples | None] = {}
    metrics_after: dict[str, Samples | None] = {}
    metrics_healed: Samples | None = None
    t_heal: float | None = None
    move_s: float | None = None
    takeover_wanted = kind in ("crash", "partition", "consul-partition", "stuck-in-flight")
    try:
        lab.wait(lambda: writer.acked_after(0) >= 200 or bool(writer.error), 30, "the writer's first 200 writes")
        if writer.error:
            raise writer.error
        sampler.start()
        watch.start()
        time.sleep(0.3)
        metrics_before = scrape_all(lab)
        say(f"{kind}: disk {d.id} at {p.ip} served by {victim.name}; {writer.acked_after(0)} writes so far")
        if kind == "move":
            target = next(g for g in lab.gw.values() if g is not victim)
            t0 = now()
            move_s, r = move(lab, key, target.name, via=victim)
            if r.returncode != 0:
                raise RuntimeError(f"path move {key} {target.name} failed ({r.returncode}): {r.stderr.strip()}")
            base = now()
        else:
            if kind == "stuck-in-flight":
                fault = StuckInFlight(lab, victim, portal, d.iqn, writer.run_id,
                                      [writer.lba(i) for i in range(min(probes, nslots))])
                fault.login_probes()
            else:
                faults: dict[str, Callable[[IscsiLab, Gateway], Fault]] = {
                    "crash": Crash, "partition": Partition, "consul-partition": ConsulPartition, "freeze": Freeze}
                fault = faults[kind](lab, victim)
            t0 = fault.inject()
            base = t0
        say(f"{kind}: injected on {victim.name}")
        if kind == "freeze":
            assert fault is not None
            time.sleep(max(0.0, t0 + freeze_for - now()))
            fault.heal()
            t_heal = base = now()
            say(f"{kind}: thawed after {t_heal - t0:.1f} s")

        def taken_over() -> bool:
            if writer.error:
                raise writer.error
            o = lab.owners().get(key)
            return o not in (None, victim.name) and o in lab.gw and p.ip in lab.gw[o].addresses()

        try:
            if takeover_wanted:
                base = t0 + lab.wait(taken_over, recover_timeout, f"another gateway to serve {key}")
                say(f"{kind}: {lab.owners().get(key)} serves it {base - t0:.2f} s after the {kind}")
                metrics_after = scrape_after_takeover(lab, key, victim)
            left = max(1.0, recover_timeout - (now() - t0))
            lab.wait(lambda: writer.acked_after(base) >= after or bool(writer.error), left,
                     f"{after} writes acknowledged after the {kind}")
            if writer.error:
                raise writer.error
        except AssertionError as e:
            notes.append(f"NOT RECOVERED: {e}")
        say(f"{kind}: writer recovered; gap {writer.gap(t0).seconds:.2f} s")
        if isinstance(fault, StuckInFlight):
            # newer writes over every probe's LBA (two more turns of the ring), then stop and release
            n = writer.acked_after(0)
            lab.wait(lambda: writer.acked_after(0) >= n + 2 * nslots, 30, "two more turns of the ring")
            writer.stop()
            t_heal = now()
            fault.release()
            say(f"{kind}: released; {fault.stuck_bytes} bytes were stuck, {fault.left_bytes} left unread")
            fault.heal()
        elif fault is not None and kind != "freeze":
            t_heal = now()
            fault.heal()
            say(f"{kind}: healed in {now() - t_heal:.1f} s")
            metrics_healed = victim.metrics()
        if writer.running():
            lab.wait(lambda: lab.all_served([d]), 60, f"disk {d.id} served after the heal")
            end = now() + settle
            lab.wait(lambda: now() > end and writer.acked_after(end - settle) > 0, 60, "writes after the heal")
            writer.stop()
        until = t_heal if kind in ("crash", "partition", "consul-partition", "stuck-in-flight") else None
        gap = writer.gap(t0, until)
        heal_gap = writer.gap(t_heal) if until is not None and kind != "stuck-in-flight" and t_heal else None
    finally:
        if writer.running():
            writer.stop()
        if sampler.is_alive():
            sampler.stop()
        if watch.is_alive():
            watch.stop()
        if isinstance(fault, StuckInFlight) and fault.released is None:
            fault.heal()                    # an error half-way: give the gateway back all the same
    owners = lab.owners()
    holders = [g.name for g in lab.gw.values() if p.ip in g.addresses()]
    verdicts = verify(lab, d, writer)
    acks, failures, logins = writer.snapshot()
    elsewhere = sampler.first_elsewhere(p.ip, victim.name, t0)
    first_fail = next((f for f in failures if f.t >= t0), None)
    relog = next((lg for lg in logins if first_fail is not None and lg.t > first_fail.t), None)
    out = Outcome(kind=kind, victim=victim.name, disk=d.id, path=key, address=p.ip, t0=t0, gap=gap,
                  heal_gap=heal_gap, owner_after=owners.get(key), served_by_after=",".join(holders) or None,
                  takeover=None if elsewhere is None else elsewhere - t0,
                  detected=None if first_fail is None else first_fail.t - t0,
                  relogin=None if relog is None else relog.t - t0, relogin_to=None if relog is None else relog.revision,
                  owners=list(watch.changes), overlaps=list(sampler.overlaps),
                  live_overlaps=list(sampler.live_overlaps), samples=sampler.samples, verdicts=verdicts,
                  acks=len(acks), failures=failures, logins=logins, timeout=timeout, notes=notes,
                  freeze_for=(t_heal - t0) if kind == "freeze" and t_heal is not None else None,
                  move_seconds=move_s, wall=now() - wall, writer=writer, metrics_before=metrics_before,
                  metrics_after=metrics_after, metrics_healed=metrics_healed)
    if isinstance(fault, StuckInFlight):
        out.stuck_bytes, out.left_bytes = fault.stuck_bytes, fault.left_bytes
        out.notes += [f"probe {e}" for e in fault.probe_errors[:1]]
        out.notes += [f"old tgtd after the release: {ln.strip()[:160]}" for ln in fault.tgtd_errors[-2:]]
    return out


def scrape_all(lab: IscsiLab, timeout: float = 2.0) -> dict[str, Samples | None]:
    """Every gateway's ``/metrics``, parsed (``None`` for one that does not answer)."""
    return {n: g.metrics(timeout) for n, g in lab.gw.items()}


def scrape_after_takeover(lab: IscsiLab, path: str, victim: Gateway, wait: float = 5.0) -> dict[str, Samples | None]:
    """Every gateway's scrape once the path's new owner shows it served in its metrics (they are published
    at the end of the cycle that brought the address up), or after ``wait`` seconds; the failed gateway is
    given 1 s (a crashed one does not answer)."""
    owner = lab.owners().get(path)
    end = now() + wait
    while owner in lab.gw and now() < end and path_exported(lab.gw[owner].metrics()).get(path) != 1:
        time.sleep(0.05)
    return {n: g.metrics(1.0 if g is victim else 2.0) for n, g in lab.gw.items()}


def retire(lab: IscsiLab, disk_id: str) -> None:
    """Stop and delete a disk the measurement made (frees its LUN on the gateways and its RBD memory).
    ``--force``: the run's writer and verifier are gone, but the logins report that ``disk stop`` checks is
    refreshed only every 5 s (``agent.runtime.logins``); a disk left behind unbalances the gateways, and the
    leader's balancing then moves a later run's path once more right after its move (a second reconnect
    within 3 s, which libiscsi defers: a 2-3 s gap that is not the move's)."""
    g = next(iter(lab.gw.values()))
    for args in (("disk", "stop", "--force", disk_id), ("disk", "delete", disk_id)):
        r = g.cli(*args)
        if r.returncode != 0:
            raise RuntimeError(f"pathagent {' '.join(args)}: {r.stderr.strip()}")
