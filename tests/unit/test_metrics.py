"""Tier 1: the agent's Prometheus metrics (agent.runtime.metrics), scraped from running in-memory agents and
parsed with prometheus_client's text parser; the alert rules (etc/prometheus) through promtool; and
docs/metrics.md against what an agent really renders."""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from agent.core import keys
from agent.core.model import DiskRecord, PathKey, PathState
from agent.core.store import TxnResult
from agent.core.tree import ClusterView, lock_value
from agent.runtime.applier import ACQUIRE_FAILURE_REASONS, refusal_reason
from agent.runtime.metrics import AgentMetrics, Buckets, FailoverTimer, MetricsServer
from doubles import MemFencing, Node, disk, make_node
from memstore import FakeClock, MemoryStore

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "etc" / "prometheus"
P1, P2 = PathKey("d1", 1), PathKey("d1", 2)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def scrape(n: Node) -> Samples:
    return parse(n.agent.metrics.render().decode())[1]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def exported(samples: Samples) -> dict[PathKey, float]:
    """``pathagent_path_exported`` per path."""
    return {PathKey(dict(lb)["disk"], int(dict(lb)["index"])): v for (name, lb), v in samples.items()
            if name == "pathagent_path_exported"}


def cluster_paths(samples: Samples) -> dict[PathKey, float]:
    return {PathKey(dict(lb)["disk"], int(dict(lb)["index"])): v for (name, lb), v in samples.items()
            if name == "pathagent_cluster_path_held"}


def run(nodes: list[Node], seconds: float, clock: FakeClock, dt: float = 0.25) -> None:
    t_end = clock.now() + seconds
    while clock.now() < t_end:
        clock.advance(dt)
        for n in nodes:
            if n.session is None:
                n.agent.keeper.establish(n.agent.maybe_serving)
            n.step()


def test_the_endpoint_serves_every_metric_with_its_type_labels_and_value(tmp_path: Path, store: MemoryStore,
                                                                          clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    n.target.during_export = lambda p: clock.advance(0.3)     # the cycle exporting both takes 0.6 s
    run([n], 3, clock)
    server = MetricsServer("127.0.0.1:0", n.agent.metrics.registry)
    server.start()
    try:
        port = server.server.server_address[1]
        r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert requests.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
    finally:
        server.stop()
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    types, s = parse(r.text)
    assert types["pathagent_build_info"] == "gauge" and value(s, "pathagent_build_info", version="0.1.0") == 1
    for name, kind in (("pathagent_takeovers", "counter"), ("pathagent_fence_events", "counter"),
                       ("pathagent_acquire_failures", "counter"), ("pathagent_cycle_seconds", "histogram"),
                       ("pathagent_failover_seconds", "histogram"), ("pathagent_path_exported", "gauge")):
        assert types[name] == kind, name
    assert value(s, "pathagent_session_valid") == 1 and value(s, "pathagent_fenced") == 0
    assert value(s, "pathagent_leader") == 1 and value(s, "pathagent_paths_held") == 2
    assert exported(s) == {P1: 1, P2: 1}
    assert cluster_paths(s) == {P1: 1, P2: 1}
    assert value(s, "pathagent_takeovers_total") == 2
    # the lease is read when scraped: fence_after (4 s) from the last confirmation, at most one step ago
    left = value(s, "pathagent_lease_left_seconds")
    assert left is not None and 3.0 <= left <= 4.0, left
    assert {dict(lb)["reason"] for (name, lb) in s if name == "pathagent_acquire_failures_total"} \
        == set(ACQUIRE_FAILURE_REASONS)
    cycles = value(s, "pathagent_cycles_total")
    count = value(s, "pathagent_cycle_seconds_count")
    assert cycles is not None and count is not None and count >= cycles >= 5
    fast, slow = value(s, "pathagent_cycle_seconds_bucket", le="0.5"), value(s, "pathagent_cycle_seconds_bucket",
                                                                            le="1.0")
    assert fast is not None and slow is not None and slow - fast == 1, "the cycle with both exports"
    assert value(s, "pathagent_cycle_seconds_bucket", le="+Inf") == count
    assert value(s, "pathagent_failover_seconds_count") == 0 and value(s, "pathagent_last_failover_seconds") is None
    assert value(s, "process_cpu_seconds_total") is not None


def test_a_crash_moves_path_exported_to_the_takers_and_counts_the_takeovers(tmp_path: Path, store: MemoryStore,
                                                                              clock: FakeClock) -> None:
    disks = {f"d{i}": disk(f"d{i}", 2, base=10 + 10 * i) for i in range(1, 4)}
    for d in disks:
        store.start_disk(d, 2)
    calls: list[tuple[float, str, str, tuple[tuple[str, str], ...]]] = []
    nodes = {name: make_node(tmp_path, store, clock, name, disks=dict(disks), fencing=MemFencing(calls, clock, name))
             for name in ("gwa", "gwb", "gwc")}
    for n in nodes.values():
        n.start()
    run(list(nodes.values()), 15, clock)
    before = {name: scrape(n) for name, n in nodes.items()}
    leader = next(name for name, s in before.items() if value(s, "pathagent_leader") == 1)
    victim = next(name for name in nodes if name != leader)
    survivors = [name for name in nodes if name != victim]
    lost = {p for p, v in exported(before[victim]).items() if v == 1}
    assert lost, before[victim]
    for name in survivors:                # each path has one series set to 1, on the node serving it
        assert not lost & {p for p, v in exported(before[name]).items() if v == 1}
    assert set(cluster_paths(before[leader])) == {PathKey(d, i) for d in disks for i in (1, 2)}
    assert cluster_paths(before[victim]) == {}, "only the leader publishes every path"

    old = nodes[victim].session
    assert old is not None
    store.invalidate(old)                 # the victim crashed: it runs no more steps
    crashed_at = clock.now()
    run([nodes[n] for n in survivors], 2, clock)
    s = scrape(nodes[leader])
    assert all(cluster_paths(s)[p] == 0 for p in lost), "free during the lock-delay"
    served = {p for name in survivors for p, v in exported(scrape(nodes[name])).items() if v == 1}
    assert not lost & served, "what the rules call unserved: known to the leader, served nowhere"
    run([nodes[n] for n in survivors], 10, clock)

    after = {name: scrape(nodes[name]) for name in survivors}
    takers: dict[PathKey, str] = {}
    for name in survivors:
        for p, v in exported(after[name]).items():
            if v == 1 and p in lost:
                assert p not in takers, f"{p} exported on two nodes"
                takers[p] = name
    assert set(takers) == lost
    assert all(cluster_paths(after[leader])[p] == 1 for p in lost)
    for name in survivors:
        got = [p for p, t in takers.items() if t == name]
        took = value(after[name], "pathagent_takeovers_total")
        was = value(before[name], "pathagent_takeovers_total")
        assert took is not None and was is not None and took - was == len(got), name
        assert value(after[name], "pathagent_failover_seconds_count") == len(got), name
        if got:
            # from the first view of the key orphaned (<= one step after the crash) to served here: the
            # lock-delay (8 s) and the fence, then the export and the address (test_failover checks when)
            last = value(after[name], "pathagent_last_failover_seconds")
            assert last is not None and 8.0 - 0.25 <= last <= 8.0 + 1.5, last
            total = value(after[name], "pathagent_failover_seconds_sum")
            assert total is not None and total <= len(got) * (8.0 + 1.5)
    assert value(after[leader], "pathagent_nodes_fenced_total") == 1 and calls[0][1] == victim
    assert clock.now() - crashed_at >= 8.0

    # the victim comes back: it learns its session is gone, fences itself and serves nothing
    nodes[victim].agent.keeper.confirm_once()
    nodes[victim].agent.cycle()
    s = scrape(nodes[victim])
    assert value(s, "pathagent_session_valid") == 0 and value(s, "pathagent_fenced") == 1
    assert value(s, "pathagent_lease_left_seconds") == 0
    fences = value(s, "pathagent_fence_events_total")
    assert fences is not None and fences >= 1
    assert not {p for p, v in exported(s).items() if v == 1}


def test_a_leader_cut_off_from_consul_shows_fenced_and_no_longer_leads(tmp_path: Path, store: MemoryStore,
                                                                         clock: FakeClock) -> None:
    """Its last view still names it the leader; the metrics must not (nor publish that stale view's paths)."""
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    run([n], 2, clock)
    s = scrape(n)
    assert value(s, "pathagent_leader") == 1 and len(cluster_paths(s)) == 2
    n.agent.store.partitioned = True        # type: ignore[attr-defined]
    run([n], 5, clock)                      # fence_after 4 s without a confirmation
    assert n.agent.report.leader, "the agent's own last view still says leader"
    s = scrape(n)
    assert value(s, "pathagent_fenced") == 1 and value(s, "pathagent_leader") == 0
    assert cluster_paths(s) == {} and value(s, "pathagent_lease_left_seconds") == 0
    assert not {p for p, v in exported(s).items() if v == 1}
    assert value(s, "pathagent_session_valid") == 1, "it cannot tell whether its session still exists"


def held_by_another(store: MemoryStore, key: str) -> None:
    sid = store.create_session("gwz", "iSCSITarget", ["serfHealth"], 0.0)
    store.set(key, lock_value("gwz", sid, 1.0))
    store.kv[key].session = sid


@pytest.mark.parametrize("reason", ["lock_delay", "held", "changed", "session", "consul"])
def test_acquire_failures_are_counted_by_reason(tmp_path: Path, store: MemoryStore, clock: FakeClock,
                                                reason: str) -> None:
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1", 1)})
    n.start()
    run([n], 2, clock)                      # unfenced, node record and leader taken
    store.start_disk("d1", 1)
    n.agent.watcher.poll_once()             # the path is free in the view the next cycle plans from
    key = keys.path_key(store.prefix, P1)
    if reason == "lock_delay":
        store.lock_delay_until[key] = clock.now() + 60
    elif reason == "held":
        held_by_another(store, key)
    elif reason == "changed":
        store.set(key, b"")
    elif reason == "session":
        store.sessions.pop(n.session or "")
    else:
        n.agent.store.partitioned = True    # type: ignore[attr-defined]
    n.agent.cycle()
    s = scrape(n)
    got = {r: value(s, "pathagent_acquire_failures_total", reason=r) for r in ACQUIRE_FAILURE_REASONS}
    assert got == {r: float(r == reason) for r in ACQUIRE_FAILURE_REASONS}
    assert value(s, "pathagent_takeovers_total") == 0


@pytest.mark.parametrize("errors, reason", [
    ([(1, 'failed to lock key "k" due to lock delay')], "lock_delay"),
    ([(0, 'failed index check for key "k", current modify index 9 != 8'),
      (1, 'failed to lock key "k", lock is already held')], "held"),
    ([(0, 'failed to check index, key "k" doesn\'t exist')], "changed"),
    ([(1, 'invalid session "s"')], "session"),
    ([(1, "Permission denied")], "other"),
])
def test_refusal_reason_reads_consuls_error_texts(errors: list[tuple[int, str]], reason: str) -> None:
    assert refusal_reason(TxnResult(False, (), tuple(errors))) == reason


def view(states: dict[PathKey, tuple[str | None, str | None]]) -> ClusterView:
    """A view of disk d1 with each path's (holder session, orphan_of)."""
    return ClusterView(disks={"d1": DiskRecord("d1", "rbd", "img")},
                       paths={p: PathState(p, 10, sid, None, orphan) for p, (sid, orphan) in states.items()})


def test_a_failover_is_timed_from_the_orphan_seen_and_a_planned_move_is_none() -> None:
    t = FailoverTimer()
    t.observe(view({P1: (None, "gwb"), P2: (None, None)}), "me", 100.0)      # P1 orphaned, P2 released
    t.observe(view({P1: (None, "gwb"), P2: (None, None)}), "me", 103.0)
    t.acquired([P1, P2])
    t.observe(view({P1: ("me", None), P2: ("me", None)}), "me", 108.0)
    assert t.served(frozenset(), 108.5) == []
    assert t.served(frozenset({P1, P2}), 109.0) == [9.0]
    assert t.served(frozenset({P1, P2}), 110.0) == [], "counted once"
    # orphaned, then taken by another node: nothing to time here
    t.observe(view({P1: (None, "gwb")}), "me", 200.0)
    t.observe(view({P1: ("other", None)}), "me", 201.0)
    t.acquired([P1])
    assert t.served(frozenset({P1}), 202.0) == []


def test_histogram_buckets_are_cumulative_in_the_exposition() -> None:
    b = Buckets((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 7.0):
        b.observe(v)
    h = b.frozen()
    assert h.counts == (2, 1, 1) and h.count == 4 and h.total == 10.0
    m = AgentMetrics(process=False)
    for v in (0.5, 9.0):
        m.observe_failover(v)
    m.publish(m.published.report, None, frozenset(), frozenset())
    s = parse(m.render().decode())[1]
    assert value(s, "pathagent_failover_seconds_bucket", le="1.0") == 1
    assert value(s, "pathagent_failover_seconds_bucket", le="8.0") == 1
    assert value(s, "pathagent_failover_seconds_bucket", le="10.0") == 2
    assert value(s, "pathagent_failover_seconds_sum") == 9.5 and value(s, "pathagent_last_failover_seconds") == 9.0


def test_a_scrape_takes_no_lock_of_the_loop_or_the_fencer(tmp_path: Path, store: MemoryStore,
                                                          clock: FakeClock) -> None:
    """While the fencer's, the watcher's, the definitions', the keeper's and the duties' locks are held
    (by a stuck thread), a scrape still answers."""
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    run([n], 2, clock)
    a = n.agent
    locks = [a.fencer._cond, a.fencer._fencing, a.watcher._lock, a.definitions._lock, a.keeper._lock,
             a.keeper._pet_lock, a.duties._cond]
    out: list[bytes] = []
    for lk in locks:
        lk.acquire()
    try:
        t = threading.Thread(target=lambda: out.append(a.metrics.render()), daemon=True)
        t.start()
        t.join(5)
    finally:
        for lk in locks:
            lk.release()
    assert out, "the scrape waited on a lock of the agent"
    assert exported(parse(out[0].decode())[1]) == {P1: 1, P2: 1}


def test_agents_in_one_process_have_registries_of_their_own(tmp_path: Path, store: MemoryStore,
                                                            clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    a = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    b = make_node(tmp_path, store, clock, "gwb", disks={"d1": disk("d1")})
    a.start()
    run([a], 2, clock)
    b.start()
    assert a.agent.metrics.registry is not b.agent.metrics.registry
    assert value(scrape(a), "pathagent_paths_held") == 2 and value(scrape(b), "pathagent_paths_held") == 0


def documented() -> set[str]:
    """The metric names in docs/metrics.md's tables (first column, in backticks)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(pathagent_\w+)`", text, re.M))


def rendered_families(n: Node) -> set[str]:
    text = n.agent.metrics.render().decode()
    return {m for m in re.findall(r"^# TYPE (\w+) ", text, re.M) if m.startswith("pathagent_")}


def test_docs_list_exactly_the_metrics_an_agent_renders(tmp_path: Path, store: MemoryStore, clock: FakeClock) -> None:
    store.start_disk("d1", 2)
    n = make_node(tmp_path, store, clock, "gwa", disks={"d1": disk("d1")})
    n.start()
    n.agent.metrics.observe_failover(1.0)       # so that the last failover's gauge is rendered too
    run([n], 2, clock)
    assert rendered_families(n) == documented()


def test_rules_name_only_metrics_that_exist() -> None:
    used = set(re.findall(r"\b(pathagent_\w+)", (RULES / "pathagent-rules.yml").read_text()))
    known = documented() | {f"{m}_{s}" for m in documented() for s in ("bucket", "count", "sum")}
    assert used and used <= known, used - known


@pytest.fixture
def promtool() -> Iterator[str]:
    exe = shutil.which("promtool") or str(REPO / ".cache" / "bin" / "promtool")
    if not Path(exe).exists():
        pytest.skip("promtool is not installed (scripts/setup puts it in .cache/bin)")
    yield exe


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", "pathagent-rules.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 11 rules found" in r.stdout


def test_every_alert_fires_on_its_series_in_promtools_unit_tests(promtool: str) -> None:
    rules = set(re.findall(r"- alert: (\w+)", (RULES / "pathagent-rules.yml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "pathagent-rules.test.yml").read_text()))
    assert rules == tested
    r = subprocess.run([promtool, "test", "rules", "pathagent-rules.test.yml"], cwd=RULES, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
