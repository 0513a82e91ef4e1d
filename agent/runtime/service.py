"""``pathagent run``: build the agent from the config, install the signal handlers, run it.

Signals: SIGTERM / SIGINT -> orderly stop (every address down, unexport, release every lock, destroy the
session, disarm the watchdog, exit 0); SIGUSR2 -> detach for a planned restart (exit leaving session,
locks, exports and the armed watchdog; the next process adopts them; ``RestartKillSignal=SIGUSR2`` makes
``systemctl restart`` do this). The handlers only set a flag and write to a pipe (``Agent.stop`` and
``Agent.detach``), so a signal can never deadlock the process.

The plugins are built before Consul is asked anything: the fencer runs from the first moment, so exports
inherited from an earlier process are fenced at that process's recorded deadline even while the local
Consul agent does not answer.
"""
from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Callable

from agent import plugins
from agent.adapters.ceph import CephClient, CephError, CephNotFound, CephUnavailable
from agent.adapters.consul_store import ConsulStore
from agent.config import Config
from agent.errors import ConfigError, PermanentBackendError, TransientBackendError
from agent.runtime.loop import Agent
from agent.runtime.metrics import MetricsServer
from agent.runtime.notify import Notifier

log = logging.getLogger(__name__)


def ceph_probe(client: CephClient) -> Callable[[str, str], None]:
    """The ``PluginContext.ceph_probe`` capability on the host's Ceph client, in backend errors."""
    def probe(pool: str, image: str) -> None:
        try:
            client.probe(pool, image)
        except CephNotFound as e:
            raise PermanentBackendError(str(e)) from None
        except CephUnavailable as e:
            raise TransientBackendError(f"Ceph unreachable: {e}", retry_after=client.timeout) from None
        except CephError as e:
            raise TransientBackendError(str(e)) from None
    return probe


def build(cfg: Config, notifier: Notifier) -> tuple[Agent, list[Callable[[], None]]]:
    """The agent and the close calls of everything it was built with."""
    store = ConsulStore(cfg.consul)
    client = CephClient(cfg.ceph.conf, cfg.ceph.client_id, cfg.ceph.timeout)
    wake_box: list[Callable[[], None]] = []
    allowed_box: list[Callable[[], bool]] = []

    def wake() -> None:
        for w in wake_box:
            w()

    def may_serve() -> bool:            # the fencer's word, once it exists; nothing may serve before
        return bool(allowed_box) and allowed_box[0]()
    agent_box: list[Agent] = []

    def node_name() -> str:             # the local Consul agent's node name, once the agent resolved it
        return agent_box[0].node if agent_box else cfg.node_name
    node = cfg.node_name
    target = plugins.load_target(cfg.target.backend, plugins.context(cfg, "target", node, wake, ceph_probe(client),
                                                                     may_serve, node_name))
    network = plugins.load_network(cfg.network.backend, plugins.context(cfg, "network", node, wake,
                                                                        may_serve=may_serve, node_name=node_name))
    catalog = plugins.load_catalog(cfg.catalog.backend, plugins.context(cfg, "catalog", node, wake))
    watchdog = plugins.load_watchdog(cfg.watchdog.backend, plugins.context(cfg, "watchdog", node, wake))
    fencing = plugins.load_fencing(cfg.fencing.backend, plugins.context(cfg, "fencing", node, wake,
                                                                        node_name=node_name))
    agent = Agent(cfg, store, catalog, target, network, watchdog, node="", notifier=notifier, fencing=fencing,
                  logins_store=store)
    agent_box.append(agent)
    wake_box.append(agent.wakeup.wake)
    allowed_box.append(agent.fencer.allowed)
    return agent, [watchdog.close, fencing.close, target.close, network.close, catalog.close, client.close,
                   store.close]


def run(cfg: Config) -> int:
    notifier = Notifier()
    agent, closers = build(cfg, notifier)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        agent.stop()

    def on_detach(signum: int, frame: FrameType | None) -> None:
        agent.detach()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR2, on_detach)
    log.info("pathagent starting: target %s, network %s, catalog %s, watchdog %s, prefix %s",
             cfg.target.backend, cfg.network.backend, cfg.catalog.backend, cfg.watchdog.backend, cfg.consul.prefix)
    if cfg.watchdog.backend == "none":
        log.warning("[watchdog] backend is none: if this agent freezes or dies while its node is cut off, nothing "
                    "stops its data path (for tests and demos only; see docs/watchdog.md)")
    metrics = None
    if cfg.metrics_listen:
        try:
            metrics = MetricsServer(cfg.metrics_listen, agent.metrics.registry)
            metrics.start()
        except OSError as e:
            raise ConfigError([("metrics.listen", f"cannot listen on {cfg.metrics_listen}: {e.strerror}")]) from None
    try:
        agent.run()
    finally:
        if metrics is not None:
            metrics.stop()
        for close in closers:
            try:
                close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing: %s", e)
        notifier.close()
    log.info("pathagent stopped")
    return 0
