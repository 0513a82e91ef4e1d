"""``pathagent run``: build the agent from the config, install signal handlers, run it.

Signals: SIGTERM / SIGINT -> orderly stop (unexport, release every lock, destroy the session, exit 0);
SIGUSR2 -> detach for a planned restart (exit leaving session, locks and exports; the next process
adopts them; systemd's ``RestartKillSignal=SIGUSR2`` makes ``systemctl restart`` do this).
"""
from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from agent import plugins
from agent.backend import PluginContext
from agent.config import Config
from agent.consul_store import ConsulStore
from agent.errors import ConfigError, CoordinationError
from agent.loop import Agent

log = logging.getLogger(__name__)


def plugin_context(cfg: Config, node: str, kind: str) -> PluginContext:
    table = getattr(cfg, kind)
    ceph = {"conf": cfg.ceph.conf, "client_id": cfg.ceph.client_id, "refresh": cfg.ceph.refresh,
            "timeout": cfg.ceph.timeout, "pool": cfg.ceph.pool}
    return PluginContext(node=node, state_dir=cfg.state_dir, options=table.own(), ceph=ceph, port=cfg.port)


def resolve_node(cfg: Config, store: ConsulStore) -> str:
    """The node name: the local Consul agent's. ``[node] name``, if set, must equal it."""
    agent_node = store.agent_node_name()
    if cfg.node_name and cfg.node_name != agent_node:
        raise ConfigError([("node.name", f"is {cfg.node_name!r} but the local Consul agent's node name is "
                                         f"{agent_node!r}; they must be the same")])
    return agent_node


def build(cfg: Config, node: str, store: ConsulStore) -> Agent:
    target = plugins.load_target(cfg.target.backend, plugin_context(cfg, node, "target"))
    network = plugins.load_network(cfg.network.backend, plugin_context(cfg, node, "network"))
    catalog = plugins.load_catalog(cfg.catalog.backend, plugin_context(cfg, node, "catalog"))
    return Agent(cfg, store, catalog, target, network, node)


def run(cfg: Config) -> int:
    store = ConsulStore(cfg.consul)
    node = None
    delay = 0.5
    stop_requested = False

    def early(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    while node is None:
        try:
            node = resolve_node(cfg, store)
        except CoordinationError as e:
            if stop_requested:
                return 0
            log.warning("waiting for the local Consul agent: %s", e)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    agent = build(cfg, node, store)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s received", signal.Signals(signum).name)
        agent.stop()

    def on_detach(signum: int, frame: FrameType | None) -> None:
        log.info("SIGUSR2 received: detaching for a planned restart")
        agent.detach()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR2, on_detach)
    if stop_requested:
        agent.stop()
    log.info("pathagent starting on node %s: target %s, network %s, catalog %s, prefix %s", node,
             cfg.target.backend, cfg.network.backend, cfg.catalog.backend, cfg.consul.prefix)
    try:
        agent.run()
    finally:
        for p in (agent.target, agent.network, agent.catalog):
            try:
                p.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing %s: %s", type(p).__name__, e)
        store.close()
    log.info("pathagent stopped")
    return 0
