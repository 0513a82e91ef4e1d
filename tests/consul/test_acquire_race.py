"""Issue 2 acceptance 4: a path key deleted (and recreated) between an agent's observation and its acquire
is never locked, and a deleted key is never resurrected. The interleaving is driven deterministically:
the store used by the agent mutates Consul right before it sends the acquire transaction."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from agent import config
from agent.adapters.consul_store import ConsulStore, TxnResult
from agent.runtime.loop import Agent
from agent.core.model import PathKey
from lab.agents import Catalog, definition, path_owners, start_disks, stop_disk
from plugins.fake import FakeBackend
from plugins.fakecatalog import FileCatalog
from plugins.nonet import NoNetwork
from plugins.nowatchdog import NoWatchdog
from agent.backend import PluginContext

pytestmark = pytest.mark.consul
P = PathKey("d1", 1)


class InterleavingStore(ConsulStore):
    """Runs ``before_acquire`` (a real Consul mutation) between the observation and the acquire."""

    before_acquire: Callable[[], None] | None = None

    def acquire_many(self, items: Sequence[tuple[PathKey, int]], session: str, value: bytes) -> TxnResult:
        if self.before_acquire is not None:
            hook, self.before_acquire = self.before_acquire, None
            hook()
        return super().acquire_many(items, session, value)


def make_agent(http: str, tmp: Path) -> tuple[Agent, InterleavingStore, FakeBackend]:
    cat = Catalog(tmp / "catalog.json")
    cat.add("d1", definition("d1", 1))
    cfg = config.parse({"consul": {"address": http, "agent_check_ttl": 0, "session_ttl": 0},
                        "state": {"dir": str(tmp / "state")},
                        "target": {"backend": "fake"}, "network": {"backend": "none"},
                        "catalog": {"backend": "fake", "fake": {"file": str(cat.path)}},
                        "watchdog": {"backend": "none"}, "placement": {"settle": 0}})
    store = InterleavingStore(cfg.consul)
    ctx = PluginContext(node="gwa", state_dir=cfg.state_dir, options={"file": str(cat.path)})
    target = FakeBackend(PluginContext(node="gwa", state_dir=cfg.state_dir))
    agent = Agent(cfg, store, FileCatalog(ctx), target, NoNetwork(ctx), NoWatchdog(ctx), store.agent_node_name())
    return agent, store, target


def observe(agent: Agent) -> None:
    """The agent reads the keys now (what its watcher thread does)."""
    agent.watcher.refresh()


def test_store_acquire_checks_the_observed_index(consul_cluster_factory: Callable[..., Any]) -> None:
    cluster = consul_cluster_factory(clients=["gwa"])
    http = cluster.http_address("gwa")
    store = ConsulStore(config.parse({"consul": {"address": http}, "target": {"backend": "fake"},
                                      "network": {"backend": "none"}, "catalog": {"backend": "fake"}}).consul)
    sid = store.create_session(store.agent_node_name(), "iSCSITarget", ("serfHealth",), 1)
    start_disks(http, {"d1": 1})
    observed = store.get("pathagent/disks/d1/1")
    assert observed is not None
    # deleted after observation: refused, not resurrected
    stop_disk(http, "d1")
    res = store.acquire(P, observed.modify_index, sid, b"{}")
    assert not res.ok and "doesn't exist" in res.reason()
    assert store.get("pathagent/disks/d1/1") is None
    # deleted and recreated: refused, the new key stays unlocked
    start_disks(http, {"d1": 1})
    res = store.acquire(P, observed.modify_index, sid, b"{}")
    assert not res.ok and "index" in res.reason()
    assert path_owners(http) == {"d1/1": None}
    # observed correctly: locked
    fresh = store.get("pathagent/disks/d1/1")
    assert fresh is not None
    assert store.acquire(P, fresh.modify_index, sid, b"{}").ok
    assert path_owners(http) == {"d1/1": sid}


@pytest.mark.parametrize("recreate", [False, True])
def test_agent_never_locks_a_key_replaced_after_observation(consul_cluster_factory: Callable[..., Any],
                                                            tmp_path: Path, recreate: bool,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cluster = consul_cluster_factory(clients=["gwa"])
    http = cluster.http_address("gwa")
    agent, store, target = make_agent(http, tmp_path)
    start_disks(http, {"d1": 1})
    agent.keeper.establish(agent.maybe_serving)
    observe(agent)                            # the agent observes the free key ...
    assert agent.fencer.unfence()

    def swap() -> None:                       # ... which is then deleted (and maybe recreated)
        stop_disk(http, "d1")
        if recreate:
            start_disks(http, {"d1": 1})
    store.before_acquire = swap
    with caplog.at_level(logging.INFO):
        agent.cycle()
    assert "acquire d1/1 (disk-d1) refused" in caplog.text
    assert target.exported() == frozenset()
    owners = path_owners(http)
    assert owners == ({"d1/1": None} if recreate else {}), "never locked, never resurrected"
    if recreate:                              # the next observation sees the new key and takes it properly
        for _ in range(3):
            observe(agent)
            agent.cycle()
        assert path_owners(http) == {"d1/1": agent.keeper.session}
        assert target.exported() == frozenset({P})
