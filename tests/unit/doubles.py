"""In-memory plugins (our own plugin boundary) and a harness that drives ``Agent`` step by step on a fake
clock: each thread's body is one method (``watcher.poll_once``, ``keeper.confirm_once``,
``fencer.check``), so a test decides exactly what runs when."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from agent.backend import Catalog, FailedNode, Fencing, NetworkBackend, TargetBackend, Watchdog
from agent.config import Config, ConsulConfig, PluginTable
from agent.core.model import Disk, PathKey, PathSpec, Peer
from agent.errors import CatalogUnavailable, PermanentBackendError, TransientBackendError
from agent.runtime.loop import Agent
from memstore import FakeClock, MemoryStore


def disk(d: str, n: int = 2, base: int = 10) -> Disk:
    return Disk(id=d, name=f"disk-{d}", iqn=f"iqn.2016-05.io.pathagent:{d}", serial="x", pool="rbd",
                image=f"pathagent-{d}",
                paths=tuple(PathSpec(i, f"198.18.{base}.{i + 10 * (sum(map(ord, d)) % 20)}", 24) for i in range(1, n + 1)))


class MemTarget(TargetBackend):
    def __init__(self, clock: FakeClock, log: list[tuple[float, str, str]] | None = None) -> None:
        self.clock = clock
        self.served: dict[PathKey, Disk] = {}
        self.log: list[tuple[float, str, str]] = [] if log is None else log
        self.fail: set[PathKey] = set()
        self.unexport_fails: set[PathKey] = set()
        self.during_export: Callable[[PathKey], None] = lambda p: None
        self.unknown = False          # exported() cannot tell
        self.cured_by_fence = True    # a fence (killing the daemon) makes it answer again
        self.fences = 0

    def exported(self) -> frozenset[PathKey]:
        if self.unknown:
            raise TransientBackendError("no answer from the target daemon within 2 s")
        return frozenset(self.served)

    def export(self, path: PathKey, d: Disk) -> None:
        self.during_export(path)
        if path in self.fail:
            raise TransientBackendError(f"export of {path} failed", retry_after=1.0)
        self.served[path] = d
        self.log.append((self.clock.now(), "export", str(path)))

    def unexport(self, path: PathKey) -> None:
        if path in self.unexport_fails:
            raise TransientBackendError(f"unexport of {path} failed")
        self.served.pop(path, None)
        self.log.append((self.clock.now(), "unexport", str(path)))

    def fence(self) -> None:
        self.fences += 1
        self.served.clear()
        if self.cured_by_fence:
            self.unknown = False      # a killed daemon answers again once restarted
        self.log.append((self.clock.now(), "fence", ""))


class MemNetwork(NetworkBackend):
    def __init__(self, clock: FakeClock, log: list[tuple[float, str, str]] | None = None) -> None:
        self.clock = clock
        self.up_paths: set[PathKey] = set()
        self.log: list[tuple[float, str, str]] = [] if log is None else log
        self.down_fails: set[PathKey] = set()
        self.during_up: Callable[[PathKey], None] = lambda p: None
        self.may_serve: Callable[[], bool] = lambda: True    # PluginContext.may_serve, as the real ones ask
        self.conns: dict[PathKey, tuple[Peer, ...]] = {}     # what connections() reports while a path is up
        self.tickles: list[tuple[PathKey, tuple[Peer, ...]]] = []

    def up(self, path: PathKey, spec: PathSpec) -> None:
        self.during_up(path)
        if not self.may_serve():
            raise TransientBackendError(f"not bringing {path} up: this node may not serve now")
        self.up_paths.add(path)
        self.log.append((self.clock.now(), "up", str(path)))

    def down(self, path: PathKey, spec: PathSpec | None) -> None:
        if path in self.down_fails:
            raise PermanentBackendError(f"{path}: address present but not ours")
        if path in self.up_paths:
            self.up_paths.discard(path)
            self.log.append((self.clock.now(), "down", str(path)))

    def active(self) -> frozenset[PathKey]:
        return frozenset(self.up_paths)

    def connections(self, path: PathKey, spec: PathSpec | None) -> tuple[Peer, ...]:
        return self.conns.get(path, ()) if path in self.up_paths else ()

    def tickle(self, path: PathKey, spec: PathSpec, peers: tuple[Peer, ...]) -> None:
        self.tickles.append((path, peers))
        self.log.append((self.clock.now(), "tickle", str(path)))

    def fence(self) -> None:
        for p in sorted(self.up_paths):
            self.log.append((self.clock.now(), "down", str(p)))
        self.up_paths.clear()


class MemCatalog(Catalog):
    def __init__(self) -> None:
        self.disks: dict[str, Disk] = {}

    def get(self, disk_id: str, pool: str, image: str, version: int) -> Disk:
        if disk_id not in self.disks:
            raise CatalogUnavailable(disk_id, "not in the test catalog")
        return self.disks[disk_id]


class MemWatchdog(Watchdog):
    def __init__(self) -> None:
        self.pets: list[float] = []
        self.sessions: list[str] = []
        self.proved: dict[str, float] = {}    # what the watchdog confirmed by itself, per session
        self.disarmed = False

    def pet(self, deadline: float, session: str = "") -> None:
        self.pets.append(deadline)
        self.sessions.append(session)

    def confirmed(self, session: str) -> float:
        return self.proved.get(session, float("-inf"))

    def disarm(self) -> None:
        self.disarmed = True


def config(tmp: Path, **consul: Any) -> Config:
    c = dict(lock_delay=8.0, fence_after=4.0, confirm_interval=0.5, timeout=1.0, election_stall=2.0,
             agent_check_ttl=15.0, session_ttl=30.0)
    c.update(consul)
    return Config(consul=ConsulConfig(**c), state_dir=str(tmp), target=PluginTable("fake"),
                  network=PluginTable("fake"), catalog=PluginTable("fake"), watchdog=PluginTable("guard"),
                  placement_grace=3.0, placement_settle=0.0)


@dataclasses.dataclass
class Node:
    """One agent on the shared store, with its plugins."""

    agent: Agent
    target: MemTarget
    network: MemNetwork
    watchdog: MemWatchdog
    catalog: MemCatalog

    @property
    def session(self) -> str | None:
        return self.agent.keeper.session

    def start(self) -> None:
        self.agent.state.lock()
        self.agent.fencer.extend(self.agent.state.serve_until(self.agent.clock.now(), "", 0.0))
        self.agent.set_node(self.agent.node)
        self.agent.keeper.establish(self.agent.maybe_serving)
        self.agent.watcher.poll_once()

    def step(self, confirm: bool = True, rounds: int = 6) -> None:
        """What the threads and the main loop do in a moment of calm: confirm, watch, fence check, then
        cycles until nothing more takes effect."""
        if confirm:
            self.agent.keeper.confirm_once()
            self.agent.keeper.report_liveness()
        try:
            self.agent.watcher.poll_once()
        except Exception:  # noqa: BLE001 - a partitioned store; the cycle copes
            pass
        self.agent.fencer.check()
        for _ in range(rounds):
            _, _, again = self.agent.cycle()
            if not again:
                break

    def serving(self) -> set[str]:
        """Paths with their address up (what an initiator can reach)."""
        return {str(p) for p in self.network.up_paths}


class MemFencing(Fencing):
    """Fencing that records each call (node, session, images) in a log shared by the cluster's nodes;
    ``fail`` makes ``fence`` raise (a Ceph that does not answer)."""

    def __init__(self, calls: list[tuple[float, str, str, tuple[tuple[str, str], ...]]], clock: FakeClock,
                 node: str) -> None:
        self.calls, self.clock, self.node = calls, clock, node
        self.fail: Exception | None = None

    def identity(self) -> Mapping[str, Any]:
        return {"entity": f"client.pathagent-{self.node}"}

    def fence(self, failed: FailedNode) -> str:
        if self.fail is not None:
            raise self.fail
        assert failed.identity == {"entity": f"client.pathagent-{failed.node}"}, failed.identity
        self.calls.append((self.clock.now(), failed.node, failed.session, failed.images))
        return f"fenced {failed.node}"


def make_node(tmp: Path, store: MemoryStore, clock: FakeClock, name: str, cfg: Config | None = None,
              disks: dict[str, Disk] | None = None, fencing: Fencing | None = None) -> Node:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = cfg or config(d)
    cfg = dataclasses.replace(cfg, state_dir=str(d))
    events: list[tuple[float, str, str]] = []     # one log for both: the order of data path and address steps
    target, network, wd, cat = MemTarget(clock, events), MemNetwork(clock, events), MemWatchdog(), MemCatalog()
    cat.disks.update(disks or {})
    view = MemoryStoreView(store, name)
    agent = Agent(cfg, view, cat, target, network, wd, node=name, clock=clock, fencing=fencing)
    network.may_serve = agent.fencer.allowed
    return Node(agent, target, network, wd, cat)


class MemoryStoreView:
    """One node's connection to the shared store: ``agent_node_name`` is this node's name, and
    ``partitioned`` cuts only this node off."""

    def __init__(self, store: MemoryStore, node: str) -> None:
        self._store = store
        self.node = node
        self.prefix = store.prefix
        self.partitioned = False
        self.checks_prefix = f"{node}:"

    def __getattr__(self, name: str) -> Any:
        if self.partitioned and name not in ("prefix",):
            from agent.errors import CoordinationError

            def refuse(*a: Any, **k: Any) -> Any:
                raise CoordinationError(f"consul {name}: timed out (test partition of {self.node})")
            return refuse
        return getattr(self._store, name)

    def agent_node_name(self) -> str:
        if self.partitioned:
            from agent.errors import CoordinationError
            raise CoordinationError("consul agent/self: timed out (test partition)")
        return self.node

    def register_check(self, check_id: str, name: str, ttl: float) -> None:
        self.__getattr__("register_check")(self.checks_prefix + check_id, name, ttl)

    def pass_check(self, check_id: str, note: str = "") -> None:
        self.__getattr__("pass_check")(self.checks_prefix + check_id, note)

    def create_session(self, node: str, name: str, checks: Any, lock_delay: float, ttl: float = 0.0,
                       behavior: str = "release") -> str:
        mapped = [c if c == "serfHealth" else self.checks_prefix + c for c in checks]
        sid: str = self.__getattr__("create_session")(node, name, mapped, lock_delay, ttl, behavior)
        return sid

    def node_sessions(self, node: str) -> Any:
        got = self.__getattr__("node_sessions")(node)
        return [dataclasses.replace(s, checks=tuple(c.removeprefix(self.checks_prefix) for c in s.checks))
                for s in got]
