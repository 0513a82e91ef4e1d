"""Benchmarks of the Consul terms of the fencing inequality (docs/fencing.md), on real Consul 1.8.7 clusters
(``lab.consul``), with the Consul settings shipped in ``etc/consul/`` unless overridden:

- ``detect``: failure detection D. A gateway's Consul agent is killed (SIGKILL) or, in netns mode, its link
  is cut (its veth set down on the bridge); D is the time from that to the invalidation of a session bound
  to the node (``checks = ["serfHealth"]``), seen by a blocking query on a server. Also recorded: when the
  Raft leader lists the member as failed. The victim is restarted (or its link restored and ``consul join``
  run in its namespace) between runs, and the gateways take turns.
- ``election``: election stall E. The Raft leader (of 3 servers) is killed with SIGKILL. Per gateway, a
  *raw* prober sends a consistent session read (``GET /v1/session/info/<id>?consistent``) through the
  gateway's own client agent every 20 ms with a 10 s timeout (its longest wait without an answer is the
  stall), and a *confirmer* does what the agent's confirmer thread does (one call with timeout T, then
  wait I): its longest span from the send of a success to the arrival of the next success is the gap that
  ``fence_after`` must exceed. Each run checks that no session was invalidated. The killed server is
  restarted between runs.
- ``stall``: the longest SIGSTOP of a gateway's Consul agent that its session survives.
- ``soak``: false positives. The cluster runs for a while with ``--load`` busy processes competing for
  the CPUs; counted: sessions invalidated, members marked failed, suspicions (memberlist "no acks
  received"), refutations, Raft elections.

``python -m lab.consulbench {all,detect,election,stall,soak} ...`` (see ``--help``); ``scripts/bench-consul``
runs ``all`` (each part on a fresh cluster; the netns parts only as root) and prints the medians and maxima
against the agent's defaults. Everything it starts is stopped by pid at the end, also on SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lab import proc
from lab.consul import (MEMBER_FAILED, ClientSpec, ConsulCluster, ClusterError, http_json,
                        shipped_config)

GATEWAYS = ("gwa", "gwb", "gwc")


def say(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_overrides(text: str) -> dict[str, Any]:
    """``"probe_interval=400ms,suspicion_mult=3"`` -> a dict (integers become ints)."""
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = item.partition("=")
        out[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    return out


def overrides(gossip: str, performance: str) -> dict[str, Any]:
    """``extra_config`` for the cluster: the shipped gossip_lan/performance blocks with these keys changed."""
    extra: dict[str, Any] = {}
    if gossip:
        extra["gossip_lan"] = {**shipped_config("gateway")["gossip_lan"], **parse_overrides(gossip)}
    if performance:
        extra["performance"] = {**shipped_config("server").get("performance", {}), **parse_overrides(performance)}
    return extra


def summary(values: Sequence[float]) -> str:
    if not values:
        return "no runs"
    v = sorted(values)
    return (f"median {statistics.median(v):.2f} s, min {v[0]:.2f}, max {v[-1]:.2f} "
            f"({len(v)} runs)")


# --- sessions --------------------------------------------------------------------------------------------

def create_session(http: str, name: str = "bench") -> str:
    body = json.dumps({"Name": name, "Checks": ["serfHealth"], "Behavior": "release", "LockDelay": "1s"})
    r = http_json(http, "/v1/session/create", method="PUT", data=body.encode(), timeout=5)
    return str(r["ID"])


def session_exists(http: str, sid: str, timeout: float = 5.0) -> bool:
    return bool(http_json(http, f"/v1/session/info/{sid}?consistent", timeout=timeout))


def wait_invalidated(http: str, sid: str, timeout: float) -> float | None:
    """Blocking queries on ``http`` until session ``sid`` is gone; the monotonic time it was seen gone."""
    end = time.monotonic() + timeout
    index = 0
    while time.monotonic() < end:
        q = f"/v1/session/info/{sid}" + (f"?index={index}&wait=5s" if index else "")
        try:
            req = urllib.request.Request(f"http://{http}{q}")
            with _OPENER.open(req, timeout=10) as r:
                body = r.read()
                new = int(r.headers.get("X-Consul-Index", "0") or 0)
        except OSError:
            time.sleep(0.02)
            continue
        if not json.loads(body or b"null"):
            return time.monotonic()
        index = new if new > 0 and new >= index else 0
    return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))    # never via an environment proxy


# --- clusters --------------------------------------------------------------------------------------------

class Bench:
    """A cluster of 3 servers and the gateways, in loopback or netns mode (the netns lab is built here)."""

    def __init__(self, workdir: Path, mode: str, extra: dict[str, Any], gateways: Sequence[str] = GATEWAYS,
                 servers: int = 3) -> None:
        self.mode = mode
        self.gateways = list(gateways)
        self.net: Any = None
        clients: list[str | ClientSpec] = list(self.gateways)
        server_ip = None
        if mode == "netns":
            from lab.netns import GatewayLab
            self.net = GatewayLab(gateways=self.gateways, initiators=()).up()
            clients = [ClientSpec(n, self.net.node_ip(n), self.net.ns(n)) for n in self.gateways]
            server_ip = self.net.host_ip
        try:
            self.cluster = ConsulCluster(str(workdir), servers=servers, clients=clients,
                                         mode="netns" if mode == "netns" else "loopback", server_ip=server_ip,
                                         extra_config=extra)
            self.cluster.start(60)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "cluster", None) is not None:
            self.cluster.teardown()
        if self.net is not None:
            self.net.down()
            self.net = None

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leader_name(self) -> str | None:
        for s in self.cluster.server_names:
            n = self.cluster.nodes[s]
            if not n.running():
                continue
            try:
                addr = self.cluster.leader(via=s)
            except OSError:
                continue
            for name in self.cluster.server_names:
                m = self.cluster.nodes[name]
                if addr == f"{m.ip}:{m.ports['server']}":
                    return name
        return None

    def a_server(self, besides: str | None = None) -> str:
        for s in self.cluster.server_names:
            if s != besides and self.cluster.nodes[s].running():
                return self.cluster.http_address(s)
        raise ClusterError("no running server")

    def cut(self, name: str, up: bool) -> None:
        from lab.netns import ip
        ip("link", "set", name, "up" if up else "down", ns=self.net.bridge_ns)

    def rejoin(self, name: str) -> None:
        """After a cut: ``consul join`` from the node (serf retries failed members only every 30 s)."""
        n = self.cluster.nodes[name]
        s = self.cluster.nodes[self.cluster.server_names[0]]
        subprocess.run(["ip", "netns", "exec", str(n.netns), self.cluster.binary, "join",
                        "-http-addr=http://127.0.0.1:8500", s.serf_lan], capture_output=True, timeout=20)


# --- D: failure detection -----------------------------------------------------------------------------------

@dataclass
class DetectRun:
    victim: str
    invalidated: float | None
    member_failed: float | None


def _watch_member(b: Bench, name: str, t0: float, out: dict[str, float], stop: threading.Event) -> None:
    while not stop.is_set():
        leader = b.leader_name()
        if leader is not None:
            try:
                if b.cluster.member_status(name, via=leader) == MEMBER_FAILED:
                    out["failed"] = time.monotonic() - t0
                    return
            except (OSError, ValueError, ClusterError):
                pass
        time.sleep(0.02)


def detect(b: Bench, runs: int, fault: str) -> list[DetectRun]:
    out: list[DetectRun] = []
    for i in range(runs):
        victim = b.gateways[i % len(b.gateways)]
        sid = create_session(b.cluster.http_address(victim), "bench-detect")
        server = b.a_server()
        time.sleep(random.uniform(0.5, 1.5))          # a random phase against the probe rounds
        seen: dict[str, float] = {}
        stop = threading.Event()
        t0 = time.monotonic()
        watcher = threading.Thread(target=_watch_member, args=(b, victim, t0, seen, stop), daemon=True)
        watcher.start()
        if fault == "kill":
            b.cluster.kill(victim)
        else:
            b.cut(victim, up=False)
        gone = wait_invalidated(server, sid, 30.0)
        watcher.join(2.0)
        stop.set()
        r = DetectRun(victim, None if gone is None else gone - t0, seen.get("failed"))
        out.append(r)
        say(f"detect {fault} {i + 1}/{runs} {victim}: invalidated after "
            f"{'-' if r.invalidated is None else f'{r.invalidated:.2f}'} s, leader lists it failed after "
            f"{'-' if r.member_failed is None else f'{r.member_failed:.2f}'} s (load {loadavg()})")
        if fault == "kill":
            b.cluster.restart(victim, 60)
        else:
            b.cut(victim, up=True)
            b.rejoin(victim)
            b.cluster.wait_ready([victim], 60)
        time.sleep(1.0)
    return out


# --- E: election stall --------------------------------------------------------------------------------------

def _why(e: Exception) -> str:
    """A short, stable description of a failed call (HTTP errors: Consul's message without addresses)."""
    if isinstance(e, urllib.error.HTTPError):
        try:
            body = e.read().decode(errors="replace").strip()
        except OSError:
            body = ""
        for known in ("No cluster leader", "failed to get conn", "rpc error", "connection refused", "EOF"):
            if known in body:
                return f"HTTP {e.code} {known}"
        return f"HTTP {e.code} {body[:60]}"
    if "timed out" in str(e):
        return "timed out"
    return type(e).__name__


@dataclass
class Call:
    sent: float
    done: float
    ok: bool            # the session was read (and exists)
    gone: bool = False  # the read succeeded and the session did not exist
    error: str = ""


@dataclass
class Prober:
    http: str
    sid: str
    interval: float
    timeout: float
    calls: list[Call] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.halt.is_set():
            sent = time.monotonic()
            try:
                info = http_json(self.http, f"/v1/session/info/{self.sid}?consistent", timeout=self.timeout)
                self.calls.append(Call(sent, time.monotonic(), bool(info), gone=not info))
            except (OSError, ValueError) as e:
                self.calls.append(Call(sent, time.monotonic(), False, error=_why(e)))
            self.halt.wait(self.interval)

    def window(self, t0: float, t1: float) -> list[Call]:
        return [c for c in list(self.calls) if t0 <= c.done <= t1]


def longest_gap(calls: Sequence[Call], t0: float) -> float:
    """The longest span from the send time of a success to the arrival of the next success, among the spans
    that end after ``t0`` (what ``fence_after`` must exceed: the deadline is a success's send time + F)."""
    oks = [c for c in calls if c.ok]
    gaps = [b.done - a.sent for a, b in zip(oks, oks[1:]) if b.done >= t0]
    return max(gaps, default=float("nan"))


@dataclass
class ElectionRun:
    new_leader: float        # kill -> a live server names a new leader
    stall: float             # raw probers: longest time from the kill to the first answered success
    failed: int              # raw probers: calls that failed (errors, timeouts)
    gap: float               # confirmers: longest success-send -> next-success-arrival span
    invalidated: bool        # any session gone


def election(b: Bench, runs: int, interval: float, timeout: float) -> list[ElectionRun]:
    out: list[ElectionRun] = []
    for i in range(runs):
        sids = {g: create_session(b.cluster.http_address(g), "bench-election") for g in b.gateways}
        raws = [Prober(b.cluster.http_address(g), sids[g], 0.02, 10.0) for g in b.gateways]
        confs = [Prober(b.cluster.http_address(g), sids[g], interval, timeout) for g in b.gateways]
        threads = [threading.Thread(target=p.run, daemon=True) for p in raws + confs]
        for t in threads:
            t.start()
        time.sleep(random.uniform(2.0, 3.0))
        leader = b.leader_name()
        if leader is None:
            raise ClusterError("no leader before the kill")
        t0 = time.monotonic()
        b.cluster.kill(leader)
        new = None
        while time.monotonic() - t0 < 60:
            nl = b.leader_name()
            if nl is not None and nl != leader:
                new = time.monotonic() - t0
                break
            time.sleep(0.02)

        def answered_after(p: Prober) -> bool:
            return any(c.ok and c.sent > t0 for c in list(p.calls))
        end = time.monotonic() + 30
        while time.monotonic() < end and not all(answered_after(p) for p in raws + confs):
            time.sleep(0.05)
        time.sleep(1.5)
        t1 = time.monotonic()
        for p in raws + confs:
            p.halt.set()
        for t in threads:
            t.join(15)
        stall = 0.0
        failed = 0
        for p in raws:
            first = min((c.done for c in p.calls if c.ok and c.done > t0), default=float("inf"))
            stall = max(stall, first - t0)
            failed += sum(1 for c in p.window(t0, t1) if not c.ok)
        gap = max(longest_gap(p.calls, t0) for p in confs)
        gone = any(c.gone for p in raws + confs for c in p.calls)
        try:
            gone = gone or not all(session_exists(b.a_server(besides=leader), s) for s in sids.values())
        except (OSError, ValueError):
            gone = True
        r = ElectionRun(float("nan") if new is None else new, stall, failed, gap, gone)
        out.append(r)
        kinds: dict[str, int] = {}
        for p in raws + confs:
            for c in p.window(t0, t1):
                if c.error:
                    kinds[c.error] = kinds.get(c.error, 0) + 1
        errors = [f"{k} x{v}" for k, v in sorted(kinds.items())]
        say(f"election {i + 1}/{runs} (killed {leader}): new leader after {r.new_leader:.2f} s; consistent reads "
            f"stalled up to {r.stall:.2f} s ({r.failed} failed: {', '.join(errors) or '-'}); confirmer gap "
            f"{r.gap:.2f} s (I {interval:g}, T {timeout:g}); sessions {'INVALIDATED' if gone else 'kept'} "
            f"(load {loadavg()})")
        b.cluster.restart(leader, 60)
        for s in sids.values():
            try:
                http_json(b.a_server(), f"/v1/session/destroy/{s}", method="PUT", timeout=5)
            except (OSError, ValueError):
                pass
        time.sleep(random.uniform(2.0, 4.0))
    return out


# --- stall: the longest SIGSTOP a session survives -----------------------------------------------------------

def stall(b: Bench, lengths: Sequence[float], repeat: int) -> dict[float, tuple[int, int]]:
    """length -> (survived, tries)."""
    res: dict[float, tuple[int, int]] = {}
    for length in lengths:
        kept = 0
        for i in range(repeat):
            victim = b.gateways[i % len(b.gateways)]
            sid = create_session(b.cluster.http_address(victim), "bench-stall")
            time.sleep(random.uniform(0.5, 1.5))
            b.cluster.freeze(victim)
            time.sleep(length)
            b.cluster.thaw(victim)
            time.sleep(4.0)
            alive = session_exists(b.a_server(), sid)
            kept += alive
            if not alive:
                b.cluster.wait_ready([victim], 60)
            else:
                http_json(b.a_server(), f"/v1/session/destroy/{sid}", method="PUT", timeout=5)
        res[length] = (kept, repeat)
        say(f"stall {length:g} s: session kept {kept}/{repeat} (load {loadavg()})")
    return res


# --- soak: false positives -----------------------------------------------------------------------------------

@dataclass
class Soak:
    seconds: float
    load: int
    invalidations: int = 0
    failures: int = 0
    suspicions: int = 0
    refutes: int = 0
    elections: int = 0
    loads: list[str] = field(default_factory=list)


def _busy(n: int) -> list[subprocess.Popen[bytes]]:
    code = "import os\nos.nice(0)\nwhile True: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code, "consulbench-busy"], stdin=subprocess.DEVNULL,
                             start_new_session=True) for _ in range(n)]


def _log_offsets(b: Bench) -> dict[str, int]:
    return {n: b.cluster.log_path(n).stat().st_size for n in b.cluster.names}


def _log_since(b: Bench, name: str, offset: int) -> list[str]:
    with open(b.cluster.log_path(name), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def soak(b: Bench, seconds: float, load: int) -> Soak:
    res = Soak(seconds, load)
    sids = {g: create_session(b.cluster.http_address(g), "bench-soak") for g in b.gateways}
    offsets = _log_offsets(b)
    busy = _busy(load)
    server = b.a_server()
    try:
        end = time.monotonic() + seconds
        last_load = 0.0
        while time.monotonic() < end:
            for g, sid in list(sids.items()):
                try:
                    alive = session_exists(server, sid)
                except (OSError, ValueError):
                    continue
                if not alive:
                    res.invalidations += 1
                    say(f"soak: session of {g} INVALIDATED at {seconds - (end - time.monotonic()):.0f} s")
                    try:
                        b.cluster.wait_ready([g], 30)
                        sids[g] = create_session(b.cluster.http_address(g), "bench-soak")
                    except (OSError, ValueError, ClusterError) as e:
                        say(f"soak: no new session on {g}: {e}")
            if time.monotonic() - last_load > 30:
                last_load = time.monotonic()
                res.loads.append(loadavg())
                say(f"soak: {seconds - (end - time.monotonic()):.0f}/{seconds:.0f} s, load {loadavg()}")
            time.sleep(0.2)
    finally:
        for p in busy:
            proc.kill(p.pid, "consulbench-busy")
            p.wait(5)
    for n in b.cluster.names:
        lines = _log_since(b, n, offsets[n])
        res.suspicions += sum("no acks received" in ln for ln in lines)
        res.refutes += sum("Refuting a suspect" in ln for ln in lines)
        res.elections += sum("entering candidate state" in ln for ln in lines)
        if n in b.cluster.server_names:
            res.failures += sum("EventMemberFailed" in ln for ln in lines)
    res.failures //= max(1, len(b.cluster.server_names))     # every server logs each failure once
    say(f"soak {seconds:g} s with {load} busy processes: {res.invalidations} sessions invalidated, "
        f"{res.failures} member failures, {res.suspicions} suspicions, {res.refutes} refutations, "
        f"{res.elections} candidate transitions; load {', '.join(res.loads)}")
    return res


# --- CLI ---------------------------------------------------------------------------------------------------

@dataclass
class Part:
    what: str
    mode: str = "loopback"
    fault: str = "kill"

    @property
    def name(self) -> str:
        return f"{self.what} ({self.mode}, {self.fault})" if self.what == "detect" else self.what


ALL = (Part("detect", "loopback", "kill"), Part("detect", "netns", "kill"), Part("detect", "netns", "cut"),
       Part("election"), Part("stall"), Part("soak"))


def run_part(part: Part, args: argparse.Namespace, interval: float, timeout: float,
             rows: list[tuple[str, str, list[float], str]]) -> Any:
    """Run one benchmark on a fresh cluster; append (term, case, values, note) rows; return the raw results."""
    work = Path(tempfile.mkdtemp(prefix="consulbench-"))
    say(f"{part.name}: gossip_lan {shipped_config('gateway')['gossip_lan']} overrides {args.gossip or '-'}, "
        f"performance {shipped_config('server')['performance']} overrides {args.performance or '-'}; "
        f"load {loadavg()}; {os.cpu_count()} CPUs")
    try:
        with Bench(work, part.mode, overrides(args.gossip, args.performance)) as b:
            if part.what == "detect":
                d = detect(b, args.runs, part.fault)
                rows.append(("D", f"{part.mode}, {'SIGKILL of the agent' if part.fault == 'kill' else 'link cut'}: "
                                  "session invalidated", [r.invalidated for r in d if r.invalidated is not None],
                             f"{sum(r.invalidated is None for r in d)} runs without an invalidation in 30 s"))
                rows.append(("", "  leader lists the member failed",
                             [r.member_failed for r in d if r.member_failed is not None], ""))
                return [r.__dict__ for r in d]
            if part.what == "election":
                e = election(b, args.runs, interval, timeout)
                bad = sum(r.invalidated for r in e)
                rows.append(("E", "kill -9 of the Raft leader: consistent reads fail or stall (kill to first answer)",
                             [r.stall for r in e], f"{sum(r.failed for r in e)} failed calls"))
                rows.append(("", "  a live server names a new leader", [r.new_leader for r in e], ""))
                rows.append(("G", f"  confirmer (I {interval:g} s, T {timeout:g} s): success sent -> next success",
                             [r.gap for r in e], f"sessions invalidated in {bad} of {len(e)} runs"))
                return [r.__dict__ for r in e]
            if part.what == "stall":
                st = stall(b, [float(x) for x in args.lengths.split(",")], max(1, args.stall_repeat))
                kept = [k for k, (ok, n) in st.items() if ok == n]
                lost = [k for k, (ok, n) in st.items() if ok < n]
                rows.append(("stall", "longest SIGSTOP of a gateway's agent its session survived every time",
                             [max(kept)] if kept else [],
                             ", ".join(f"{k:g} s: {ok}/{n}" for k, (ok, n) in st.items()) +
                             (f"; first loss at {min(lost):g} s" if lost else "")))
                return {str(k): v for k, v in st.items()}
            k = soak(b, args.seconds, args.load)
            rows.append(("soak", f"{k.seconds:g} s, {k.load} busy processes on {os.cpu_count()} CPUs",
                         [float(k.invalidations)],
                         f"{k.invalidations} sessions invalidated, {k.failures} member failures, {k.suspicions} "
                         f"suspicions, {k.refutes} refuted, {k.elections} candidate transitions; 1-min load "
                         f"{_load_range(k.loads)}"))
            return k.__dict__
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def _load_range(loads: Sequence[str]) -> str:
    ones = [float(x.split()[0]) for x in loads]
    return f"{min(ones):g}-{max(ones):g}" if ones else "-"


def report(rows: Sequence[tuple[str, str, list[float], str]], interval: float, timeout: float) -> str:
    from agent.config import Config, ConsulConfig
    c = ConsulConfig()
    out = [f"{'term':<6} {'case':<86} {'median':>7} {'max':>7} {'runs':>5}  note"]
    for term, case, values, note in rows:
        med = f"{statistics.median(values):.2f}" if values else "-"
        mx = f"{max(values):.2f}" if values else "-"
        out.append(f"{term:<6} {case:<86} {med:>7} {mx:>7} {len(values):>5}  {note}")
    d = next((v for t, cs, v, _ in rows if t == "D" and v), [])
    e = next((v for t, cs, v, _ in rows if t == "E" and v), [])
    g = next((v for t, cs, v, _ in rows if t == "G" and v), [])
    out.append("")
    out.append(f"defaults (agent/config.py): lock_delay L {c.lock_delay:g}, fence_after F {c.fence_after:g}, "
               f"confirm_interval I {c.confirm_interval:g}, timeout T {c.timeout:g}, election_stall E "
               f"{c.election_stall:g}, target.stop_time S {Config.stop_time:g}")
    out.append(f"(1) F + S = {c.fence_after + Config.stop_time:g} < L = {c.lock_delay:g}: "
               f"{'ok' if c.fence_after + Config.stop_time < c.lock_delay else 'BROKEN'}")
    need = c.election_stall + c.confirm_interval + c.timeout
    out.append(f"(2) F = {c.fence_after:g} > E + I + T = {need:g}: {'ok' if c.fence_after > need else 'BROKEN'}"
               + (f"; measured stall max {max(e):.2f} s {'within' if max(e) < c.election_stall else 'ABOVE'} the "
                  f"E budget" if e else "")
               + (f"; confirmer gap max {max(g):.2f} s {'below' if max(g) < c.fence_after else 'NOT below'} F"
                  if g and (interval, timeout) == (c.confirm_interval, c.timeout) else ""))
    if d:
        out.append(f"takeover after a crash, median: D {statistics.median(d):.2f} + L {c.lock_delay:g} + 0.3 "
                   f"(acquire, export) = {statistics.median(d) + c.lock_delay + 0.3:.2f} s")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.consulbench", description=__doc__.split("\n")[0] if __doc__
                                 else None)
    ap.add_argument("what", choices=("all", "detect", "election", "stall", "soak"))
    ap.add_argument("--mode", choices=("loopback", "netns"), default="loopback")
    ap.add_argument("--fault", choices=("kill", "cut"), default="kill", help="detect: SIGKILL or link cut (netns)")
    ap.add_argument("--runs", type=int, default=12, help="detect and election runs (each)")
    ap.add_argument("--gossip", default="", help="gossip_lan keys to change, e.g. probe_interval=400ms,suspicion_mult=3")
    ap.add_argument("--performance", default="", help="performance keys to change, e.g. rpc_hold_timeout=2s")
    ap.add_argument("--interval", type=float, default=None, help="election: confirm interval I (default: shipped)")
    ap.add_argument("--timeout", type=float, default=None, help="election: HTTP timeout T (default: shipped)")
    ap.add_argument("--seconds", type=float, default=180, help="soak: how long")
    ap.add_argument("--load", type=int, default=4, help="soak: busy processes")
    ap.add_argument("--lengths", default="0.5,0.8,1.1,1.4,1.7,2", help="stall: SIGSTOP lengths (s)")
    ap.add_argument("--stall-repeat", type=int, default=3, help="stall: tries per length")
    ap.add_argument("--json", default="", help="also write the raw results as JSON here")
    args = ap.parse_args(argv)

    def on_signal(signum: int, frame: object) -> None:     # clean up (busy processes, agents) as on Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    if args.fault == "cut" and args.mode != "netns":
        ap.error("--fault cut needs --mode netns")
    from agent.config import ConsulConfig
    interval = args.interval if args.interval is not None else ConsulConfig.confirm_interval
    timeout = args.timeout if args.timeout is not None else ConsulConfig.timeout
    parts = list(ALL) if args.what == "all" else [Part(args.what, args.mode, args.fault)]
    if os.geteuid() != 0:
        skipped = [p for p in parts if p.mode == "netns"]
        if skipped:
            say(f"not root: skipping {', '.join(p.name for p in skipped)} (network namespaces)")
        parts = [p for p in parts if p.mode != "netns"]
    rows: list[tuple[str, str, list[float], str]] = []
    results: dict[str, Any] = {}
    for part in parts:
        results[part.name] = run_part(part, args, interval, timeout, rows)
    print(report(rows, interval, timeout))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
