"""Prometheus metrics of one agent (every one is listed in docs/metrics.md), served on ``[metrics] listen``
(``GET /metrics``; off when it is empty).

A scrape never waits on the loop and never touches a lock the fencing deadline depends on:

- at the end of every cycle the main loop hands ``AgentMetrics.publish`` what it knows (the cycle's frozen
  ``CycleReport``, the immutable ``ClusterView`` it planned from, what the target exports and which
  addresses are up); ``publish`` freezes the loop's own counters and histograms beside them into one
  immutable ``Published`` and stores it with a single reference assignment;
- ``_Collector`` (registered in the agent's private ``CollectorRegistry``) reads that reference once per
  scrape and renders everything from it, on the HTTP server's thread: the per-path series are computed
  there, never in the loop;
- four values are read live at scrape time, each one plain attribute read that takes no lock: our session
  (``SessionKeeper.session``), ``Fencer.fenced``, ``Fencer.serve_until`` (for the time left on the lease)
  and ``Fencer.events``, plus the time since the main loop's last beat (so a stuck loop shows, although it
  publishes nothing).

Counters and histograms that the main loop feeds (``count_acquire_failures``, ``observe_cycle``,
``observe_failover``) live in this object and are only ever touched by the main loop's thread.

Each agent has its own ``CollectorRegistry`` (never prometheus_client's global one), so several agents in
one process (tier-1 tests) do not clash. Works with prometheus_client 0.16 (Debian 12) and later.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agent.core.model import PathKey
from agent.core.tree import ClusterView
from agent.runtime.applier import ACQUIRE_FAILURE_REASONS
from agent.runtime.report import CycleReport

log = logging.getLogger(__name__)

CYCLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAILOVER_BUCKETS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0)
SCRAPE_TIMEOUT = 5.0       # seconds a client may take to send its request (a stuck client holds one thread)


def version() -> str:
    """The installed distribution's version (``unknown`` when it is not installed, as in a bare checkout)."""
    try:
        return metadata.version("iscsi-path-agent")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class HistogramValue:
    """A histogram's state: ``counts[i]`` observations <= ``bounds[i]`` (not cumulative), the last one
    above every bound (``+Inf``); ``total`` is the sum of every observation."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


class Buckets:
    """A histogram accumulated by one thread (the main loop); ``frozen()`` is a copy for a ``Published``."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def frozen(self) -> HistogramValue:
        return HistogramValue(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True)
class Live:
    """The values a scrape reads live (each one lock-free attribute read; see the module docstring)."""

    session: Callable[[], str | None] = lambda: None
    fenced: Callable[[], bool] = lambda: True
    serve_until: Callable[[], float] = lambda: float("-inf")
    fence_events: Callable[[], int] = lambda: 0
    beat_age: Callable[[], float] = lambda: 0.0
    now: Callable[[], float] = lambda: 0.0


@dataclass(frozen=True)
class Published:
    """Everything a scrape renders besides ``Live``: one cycle's state, frozen. Nothing in it is mutated
    after ``publish`` (``ClusterView`` and the frozensets are immutable; the mappings are fresh copies)."""

    report: CycleReport = field(default_factory=CycleReport)
    view: ClusterView | None = None                 # the view the cycle planned from (with our own writes)
    exported: frozenset[PathKey] = frozenset()      # what the target exports here
    addresses: frozenset[PathKey] = frozenset()     # whose floating IP is up here
    acquire_failures: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(ACQUIRE_FAILURE_REASONS, 0))
    cycle_seconds: HistogramValue = HistogramValue(CYCLE_BUCKETS, (0,) * (len(CYCLE_BUCKETS) + 1))
    failover_seconds: HistogramValue = HistogramValue(FAILOVER_BUCKETS, (0,) * (len(FAILOVER_BUCKETS) + 1))
    last_failover: float | None = None              # seconds the last completed failover here took
    node_fence_failures: int = 0


class FailoverTimer:
    """When each path this node takes over was first seen orphaned, to time its failover (main loop only).

    A *failover* is a path whose holder's session ended without releasing it (a crash, a partition, a
    fence: ``PathState.orphan_of``), that this node then acquired and serves. Its duration runs from the
    first cycle in which this node's view showed the key orphaned to the end of the cycle in which the
    path was both exported here and had its address up. It leaves out the time Consul took to notice the
    failure (``docs/fencing.md``: D) and the initiator's own reconnect, and counts the lock-delay, the
    wait for the leader's fence of the failed node, the export and the address. Planned moves and
    releases (the key's value is emptied: no orphan) are not failovers."""

    def __init__(self) -> None:
        self._orphaned: dict[PathKey, float] = {}    # orphaned path -> first seen so
        self._taking: dict[PathKey, float] = {}      # acquired by us after that -> when it was first seen

    def observe(self, view: ClusterView, session: str | None, now: float) -> None:
        """Note the orphaned keys of ``view``; forget paths that are gone or that another session holds."""
        for p, st in view.paths.items():
            if st.session is None and st.orphan_of is not None:
                self._orphaned.setdefault(p, now)
            elif st.session is not None:
                self._orphaned.pop(p, None)
        for p in [p for p in self._orphaned if p not in view.paths]:
            del self._orphaned[p]
        for p in [p for p in self._taking if p not in view.paths or view.paths[p].session != session
                  or session is None]:
            del self._taking[p]

    def acquired(self, paths: Iterable[PathKey]) -> None:
        """Our session locked ``paths``; those that were orphaned are failing over to us now."""
        for p in paths:
            if p in self._orphaned:
                self._taking[p] = self._orphaned.pop(p)

    def served(self, served: frozenset[PathKey], now: float) -> list[float]:
        """The durations of the failovers completed now (``served``: exported here with the address up)."""
        done = [p for p in self._taking if p in served]
        return [now - self._taking.pop(p) for p in done]


class AgentMetrics:
    """One agent's metrics: the main loop feeds and publishes (``publish``, ``observe_*``, ``count_*``);
    ``registry`` is what ``MetricsServer`` renders."""

    def __init__(self, live: Live | None = None, process: bool = True) -> None:
        """``process``: also the standard ``process_*`` and ``python_*`` collectors."""
        self.live = live or Live()
        self.version = version()
        self.registry = CollectorRegistry(auto_describe=False)
        self._published = Published()
        self._cycle = Buckets(CYCLE_BUCKETS)
        self._failover = Buckets(FAILOVER_BUCKETS)
        self._last_failover: float | None = None
        self._acquire_failures = dict.fromkeys(ACQUIRE_FAILURE_REASONS, 0)
        self.registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # --- the main loop -----------------------------------------------------------------------------------
    def observe_cycle(self, seconds: float) -> None:
        self._cycle.observe(seconds)

    def observe_failover(self, seconds: float) -> None:
        self._failover.observe(seconds)
        self._last_failover = seconds

    def count_acquire_failures(self, reasons: Mapping[str, int]) -> None:
        for r, n in reasons.items():
            key = r if r in self._acquire_failures else "other"
            self._acquire_failures[key] += n

    def publish(self, report: CycleReport, view: ClusterView | None, exported: frozenset[PathKey],
                addresses: frozenset[PathKey], node_fence_failures: int = 0) -> None:
        """Make this state what scrapes render from now on (one reference assignment)."""
        self._published = Published(report=report, view=view, exported=exported, addresses=addresses,
                                    acquire_failures=dict(self._acquire_failures),
                                    cycle_seconds=self._cycle.frozen(), failover_seconds=self._failover.frozen(),
                                    last_failover=self._last_failover, node_fence_failures=node_fence_failures)

    @property
    def published(self) -> Published:
        return self._published

    def render(self) -> bytes:
        """The Prometheus text exposition of everything (what ``GET /metrics`` answers)."""
        return bytes(generate_latest(self.registry))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, h: HistogramValue) -> HistogramMetricFamily:
    running, buckets = 0, []
    for bound, n in zip(h.bounds + (float("inf"),), h.counts):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class _Collector(Collector):
    """Renders ``AgentMetrics.published`` and ``AgentMetrics.live`` (one read of each per scrape)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        p, live = m.published, m.live
        r = p.report
        session, fenced = live.session(), live.fenced()
        build = GaugeMetricFamily("pathagent_build_info", "1, labelled with the agent's version",
                                  labels=["version"])
        build.add_metric([m.version], 1)
        yield build
        yield _gauge("pathagent_up", "1 while the agent runs", 1)
        yield _gauge("pathagent_session_valid", "1 while the agent holds a Consul session", int(session is not None))
        yield _gauge("pathagent_fenced", "1 while this node may not serve (fenced: no session confirmation for "
                     "fence_after, the target could not tell what it serves, or no lease yet)", int(fenced))
        left = live.serve_until() - live.now() if session is not None and not fenced else 0.0
        yield _gauge("pathagent_lease_left_seconds", "seconds until the fencing deadline while this node may "
                     "serve (negative: passed, the fence is due); 0 when fenced or without a session", left)
        yield _gauge("pathagent_waiting_for_fence", "1 while our previous session failed and this node waits "
                     "for the leader to fence it before it takes paths", int(r.waiting_fence))
        # a fenced node may still see itself as the leader in its last view (cut off from Consul): it
        # cannot act as one, and its view may be stale, so neither the gauge nor the per-path series say so
        leading = r.leader and not fenced
        yield _gauge("pathagent_leader", "1 while this node holds the cluster leader lock and is not fenced",
                     int(leading))
        yield _gauge("pathagent_drained", "1 while this node is drained (it takes no path)", int(r.drained))
        yield _gauge("pathagent_paths_held", "path locks held by this node's session", r.held)
        yield _gauge("pathagent_paths_exported", "paths the target backend exports on this node", len(p.exported))
        yield _gauge("pathagent_addresses_up", "floating path IPs the network backend has up on this node",
                     len(p.addresses))
        yield from self._paths(p, r.session, leading)
        yield _gauge("pathagent_paths_total", "path keys of started disks (this node's view)", r.paths)
        yield _gauge("pathagent_paths_free", "path keys nobody holds (this node's view)", r.free)
        yield _gauge("pathagent_nodes_live", "agents with a locked node record (this node's view)", r.nodes)
        yield _gauge("pathagent_disks_started", "started disks (this node's view)", r.disks)
        yield _gauge("pathagent_disks_invalid", "started disks whose definition this node cannot read or finds "
                     "invalid", len(r.bad_disks))
        bad = GaugeMetricFamily("pathagent_disk_invalid", "1 for each started disk whose definition this node "
                                "cannot read or finds invalid (the agent's log and `pathagent disk show` say why)",
                                labels=["disk"])
        for d in sorted(r.bad_disks):
            bad.add_metric([d], 1)
        yield bad
        yield _gauge("pathagent_paths_backing_off", "paths this node backs off from after failures", r.backing_off)
        yield _gauge("pathagent_target_state_known", "0 while the target backend cannot say what it serves",
                     int(r.target_known))
        yield _counter("pathagent_fence_events_total", "times this agent fenced itself (addresses down, data path "
                       "stopped)", live.fence_events())
        yield _counter("pathagent_takeovers_total", "path locks this agent acquired (a failover, a planned move "
                       "to it, a free path)", r.takeovers)
        failures = CounterMetricFamily("pathagent_acquire_failures", "path lock acquisitions that did not take "
                                       "effect, by reason", labels=["reason"])
        for reason in ACQUIRE_FAILURE_REASONS:
            failures.add_metric([reason], p.acquire_failures.get(reason, 0))
        yield failures
        yield _histogram("pathagent_failover_seconds", "failovers to this node: from its first view of the path "
                         "orphaned (its holder's session ended) to the path exported here with its address up",
                         p.failover_seconds)
        if p.last_failover is not None:
            yield _gauge("pathagent_last_failover_seconds", "the duration of the last failover completed on this "
                         "node (see pathagent_failover_seconds)", p.last_failover)
        yield _counter("pathagent_nodes_fenced_total", "failed nodes this node fenced as the leader", r.fences_done)
        yield _counter("pathagent_node_fence_failures_total", "fences of failed nodes that failed (as the leader; "
                       "the failed node's paths wait meanwhile)", p.node_fence_failures)
        yield _counter("pathagent_cycles_total", "loop cycles since start", r.cycle)
        yield _histogram("pathagent_cycle_seconds", "duration of one loop cycle (snapshot, plan, apply)",
                         p.cycle_seconds)
        yield _gauge("pathagent_loop_beat_age_seconds", "seconds since the main loop last showed progress (it "
                     "beats at least every 2 s)", live.beat_age())

    def _paths(self, p: Published, session: str | None, leading: bool) -> Iterator[Metric]:
        held = p.view.held_by(session) if p.view is not None else frozenset()
        served = p.exported & p.addresses
        exported = GaugeMetricFamily("pathagent_path_exported", "1 for a path this node serves (exported and its "
                                     "address up); 0 for one it holds, exports or has the address of, but does "
                                     "not serve (yet)", labels=["disk", "index"])
        for k in sorted(held | p.exported | p.addresses, key=lambda k: (k.disk, k.index)):
            exported.add_metric([k.disk, str(k.index)], int(k in served))
        yield exported
        cluster = GaugeMetricFamily("pathagent_cluster_path_held", "leader only: one series per path of every "
                                    "started disk that is not stopping; 1 while a session holds its lock, 0 while "
                                    "it is free", labels=["disk", "index"])
        if leading and p.view is not None:
            view = p.view
            for k in sorted(view.paths, key=lambda k: (k.disk, k.index)):
                rec = view.disks.get(k.disk)
                if rec is not None and not rec.stopping:
                    cluster.add_metric([k.disk, str(k.index)], int(view.paths[k].session is not None))
        yield cluster


class MetricsServer:
    """Serves ``GET /metrics`` on ``host:port`` from daemon threads (one per request, each with a socket
    timeout), rendering ``registry``. Nothing here is on the loop's or the fencer's path."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = listen.rsplit(":", 1)

        def body() -> tuple[bytes, str]:
            return bytes(generate_latest(registry)), CONTENT_TYPE_LATEST

        class Handler(BaseHTTPRequestHandler):
            timeout = SCRAPE_TIMEOUT

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                data, kind = body()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

