"""``pathagent run``: build the agent from the config, install signal handlers, run it.

Signals: SIGTERM / SIGINT -> orderly stop (unexport, release every lock, destroy the session, exit 0);
SIGUSR2 -> detach for a planned restart (exit leaving session, locks and exports; the next process
adopts them; systemd's ``RestartKillSignal=SIGUSR2`` makes ``systemctl restart`` do this).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

from agent import plugins
from agent.backend import PluginContext
from agent.config import Config
from agent.adapters.consul_store import ConsulStore
from agent.errors import ConfigError, CoordinationError
from agent.runtime.loop import Agent, inherited_deadline
from agent.runtime.metrics import MetricsServer

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


def fence_inherited(cfg: Config) -> None:
    """Stop serving whatever an earlier agent process left exported, without Consul: its lease ran out
    (or we are told to stop) before this process could adopt the session. Addresses first."""
    node = cfg.node_name or _recorded_node(cfg)
    network = plugins.load_network(cfg.network.backend, plugin_context(cfg, node, "network"))
    target = plugins.load_target(cfg.target.backend, plugin_context(cfg, node, "target"))
    try:
        for p in sorted(network.active()):
            network.down(p, None)
        target.cleanup(frozenset())
        log.error("unexported everything inherited from the previous agent process (no Consul to adopt "
                  "its session)")
    finally:
        network.close()
        target.close()


def _recorded_node(cfg: Config) -> str:
    try:
        with open(os.path.join(cfg.state_dir, "node"), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _record_node(cfg: Config, node: str) -> None:
    try:
        os.makedirs(cfg.state_dir, exist_ok=True)
        with open(os.path.join(cfg.state_dir, "node"), "w", encoding="utf-8") as f:
            f.write(node)
    except OSError as e:
        log.warning("cannot record the node name in %s: %s", cfg.state_dir, e.strerror)


def run(cfg: Config) -> int:
    store = ConsulStore(cfg.consul)
    node = None
    delay = 0.5
    stop_requested = False
    inherited_until = inherited_deadline(cfg)
    inherited_fenced = False

    def early(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, early)
    signal.signal(signal.SIGINT, early)
    while node is None:
        try:
            node = resolve_node(cfg, store)
        except CoordinationError as e:
            if not inherited_fenced and (stop_requested or time.monotonic() >= inherited_until):
                try:
                    fence_inherited(cfg)
                    inherited_fenced = True
                except Exception as fe:  # noqa: BLE001 - keep trying; never die here
                    log.error("could not unexport inherited paths: %s", fe)
            if stop_requested:
                return 0
            log.warning("waiting for the local Consul agent: %s", e)
            left = inherited_until - time.monotonic()
            time.sleep(delay if inherited_fenced else max(0.05, min(delay, left)))
            delay = min(delay * 2, 5.0)
    _record_node(cfg, node)
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
    metrics = None
    if cfg.metrics_listen:
        try:
            metrics = MetricsServer(cfg.metrics_listen, agent.metrics)
            metrics.start()
        except OSError as e:
            raise ConfigError([("metrics.listen", f"cannot listen on {cfg.metrics_listen}: {e.strerror}")]) from None
    try:
        agent.run()
    finally:
        if metrics is not None:
            metrics.stop()
        for p in (agent.target, agent.network, agent.catalog):
            try:
                p.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing %s: %s", type(p).__name__, e)
        store.close()
    log.info("pathagent stopped")
    return 0
