"""``ceph-blocklist`` fencing: blocklist every librados client of a failed gateway before its paths move.

Registered as ``ceph-blocklist`` in ``pathagent.fencing``. It lives in ``agent.adapters`` (like the ``rbd``
catalog) because only ``agent.adapters`` may import rados/rbd. Settings: ``[fencing.ceph-blocklist]``
(``expire``, ``parallel``) and the ``[ceph]`` table (``conf``, ``client_id``, ``timeout``,
``data_client_id``). The whole story, with the caps it needs, is docs/fencing.md, "Ceph-side fencing
(ceph-blocklist)".

Why. A gateway that died or froze keeps its images' exclusive locks, and the OSDs keep its watches for
``osd_client_watch_timeout`` (30 s): the next owner's first write waits that long, then its librbd
blocklists the old owner by itself. Blocklisting at once removes the wait (the next write takes
milliseconds), and it is the only thing that stops a frozen gateway that wakes up from writing: the OSDs do
not enforce the exclusive lock, only the blocklist.

Who. Every gateway's data path (tgtd's bs_rbd) runs as its own Ceph entity, ``client.<data_client_id>``
with ``{node}`` replaced by the node name, so a monitor session names the node it belongs to. ``identity``
publishes that entity and the node's source IPs: ``{"v": 1, "entity": "client.pathagent-gwa", "ips":
["10.0.0.5"]}``, a few dozen bytes whatever the number of LUNs. ``fence`` blocklists the set that
``agent.adapters.ceph_clients.plan`` picks: every monitor session of the entity, plus the watchers and lock
owners of the failed node's images that come from one of its IPs and have no session under another entity
(a killed tgtd's lingering watch). A lock is broken only when its owner is in that set, after the blocklist
is committed and this client has the newest OSD map (librbd's own order); a lock held by anyone else (a
healthy gateway) is left alone and reported.

Cost. Each blocklist entry is an OSD map change; the monitors commit the commands that arrive together in
one epoch, one epoch per ``paxos_propose_interval`` (1 s by default). So ``parallel`` commands are kept in
flight: N clients take about N / ``parallel`` seconds on a default cluster (tgtd has one client per LUN).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping, TypeVar

from agent.adapters import ceph_clients
from agent.adapters.ceph import CephClient, CephError, CephNotFound, CephPermissionDenied, CephUnavailable
from agent.adapters.ceph_clients import ImageClients, MonSession
from agent.backend import FailedNode, Fencing, PluginContext
from agent.errors import ConfigError, PermanentBackendError, TransientBackendError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_EXPIRE = 3600.0
DEFAULT_PARALLEL = 64
#: identity() reads every monitor's sessions; the IPs found there are reused for this long
IDENTITY_REFRESH = 60.0
RETRY_AFTER = 2.0


def _options(values: Mapping[str, Any]) -> tuple[float, int]:
    problems: list[tuple[str, str]] = []
    for k in values:
        if k not in CephBlocklistFencing.config_keys:
            problems.append((f"fencing.ceph-blocklist.{k}", "unknown key"))
    expire = values.get("expire", DEFAULT_EXPIRE)
    if isinstance(expire, bool) or not isinstance(expire, (int, float)) or not 60 <= expire <= 31536000:
        problems.append(("fencing.ceph-blocklist.expire", "must be a number of seconds 60-31536000"))
        expire = DEFAULT_EXPIRE
    parallel = values.get("parallel", DEFAULT_PARALLEL)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 256:
        problems.append(("fencing.ceph-blocklist.parallel", "must be an integer 1-256"))
        parallel = DEFAULT_PARALLEL
    if problems:
        raise ConfigError(problems)
    return float(expire), int(parallel)


class CephBlocklistFencing(Fencing):
    """See the module docstring. Thread-safe; ``fence`` and ``identity`` may block up to a few
    ``[ceph] timeout`` (see docs/fencing.md for the measured durations)."""

    config_keys: Mapping[str, str] = {
        "expire": "seconds a blocklist entry lasts (default 3600); must outlast the longest a fenced gateway "
                  "can stay frozen and then wake up",
        "parallel": "blocklist commands and image inspections in flight at once (default 64): N clients take "
                    "about N / parallel x paxos_propose_interval",
    }
    required = True

    def __init__(self, context: PluginContext, clock: Callable[[], float] = time.monotonic) -> None:
        """Reads ``[fencing.ceph-blocklist]`` (``ConfigError`` listing every bad key). Connects nothing."""
        self.expire, self.parallel = _options(context.options)
        self._node = context.current_node     # the name may be learnt from Consul after construction
        self.ceph = context.ceph
        self.client = CephClient(context.ceph.conf, context.ceph.client_id, context.ceph.timeout,
                                 # we blocklist the owner ourselves (with our expiry) before breaking its lock
                                 settings={"rbd_blocklist_on_break_lock": "false"},
                                 threads=self.parallel + 4)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: tuple[float, list[MonSession]] | None = None   # (read at, our entity's sessions)

    # --- who we are ------------------------------------------------------------------------------------
    @property
    def node(self) -> str:
        """This node's name (empty while unknown)."""
        return self._node()

    def _entity(self, node: str) -> str:
        return "client." + self.ceph.data_id(node)

    def identity(self) -> Mapping[str, Any]:
        """``{"v": 1, "entity": "client.<data id>", "ips": [...]}``: this node's data-path entity and the IPs
        its clients reach Ceph from (this process's own client, plus the sessions of the entity; those are
        re-read every ``IDENTITY_REFRESH`` s; without the caps to list sessions, only the former)."""
        node = self.node
        if not node:
            raise TransientBackendError("ceph-blocklist identity: this node's name is not known yet")
        entity = self._entity(node)
        try:
            own = self.client.address()
            with self._lock:
                cached = self._sessions
            if cached is None or self._clock() - cached[0] >= IDENTITY_REFRESH:
                try:
                    mine = [s for s in self.client.mon_sessions() if s.entity == entity]
                except CephPermissionDenied as e:   # our own address still says where we are
                    log.warning("ceph-blocklist identity: %s; publishing this process's address only (the "
                                "leader's fence needs that cap: docs/fencing.md)", e)
                    mine = []
                cached = (self._clock(), mine)
                with self._lock:
                    self._sessions = cached
        except CephError as e:
            raise TransientBackendError(f"ceph-blocklist identity of {node}: {e}",
                                        retry_after=RETRY_AFTER) from None
        return ceph_clients.identity_of(entity, [own], cached[1])

    # --- fencing ---------------------------------------------------------------------------------------
    def _target(self, failed: FailedNode) -> tuple[str, frozenset[str]]:
        """The entity and IPs to fence, from the published identity (else from the config)."""
        fallback = self._entity(failed.node) if "{node}" in self.ceph.data_client_id else ""
        entity, ips, problems = ceph_clients.read_identity(failed.identity, fallback)
        for p in problems:
            log.warning("fence %s: published identity: %s (ignored)", failed.node, p)
        if not entity:
            raise PermanentBackendError(
                f"fence {failed.node}: its Ceph client name is unknown: it published no identity and "
                f"[ceph] data_client_id ({self.ceph.data_client_id!r}) has no {{node}}")
        # Never this process's own client, nor (through another node's record) this node's data path. The
        # one exception is this node's own predecessor: a gateway that comes back alone (a reinstall, a
        # reboot) leads and must fence what its earlier instance left before it serves; it serves nothing
        # until that fence is recorded, so every client of its data entity then is the predecessor's.
        own = {"client." + self.ceph.client_id}
        node = self.node
        if node and failed.node != node:
            own.add(self._entity(node))
        if entity in own:
            raise PermanentBackendError(f"fence {failed.node}: refusing to blocklist {entity}: that is this "
                                        f"node's own Ceph client ([ceph] client_id / data_client_id)")
        return entity, ips

    def _each(self, fn: Callable[[T], R], items: Iterable[T]) -> list[tuple[T, R | None, CephError | None]]:
        """``fn`` on every item, ``parallel`` at a time, in order of submission; each result or error."""
        todo = list(items)
        if not todo:
            return []

        def one(item: T) -> tuple[T, R | None, CephError | None]:
            try:
                return item, fn(item), None
            except CephError as e:
                return item, None, e
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(todo)),
                                thread_name_prefix="ceph-fence") as ex:
            return list(ex.map(one, todo))

    def fence(self, failed: FailedNode) -> str:
        """Blocklist every client of ``failed`` (see the module docstring) for ``expire`` seconds, then break
        the locks its clients held. Idempotent: a second call blocklists what is still there again (the
        entries' expiry starts over) and breaks nothing."""
        t0 = self._clock()
        entity, ips = self._target(failed)
        name = failed.node
        try:
            me = self.client.address()
            sessions: list[MonSession] = self.client.mon_sessions()
            wanted = list(dict.fromkeys(failed.images))
            inspected = self._each(lambda pi: self.client.image_clients(pi[0], pi[1]), wanted)
            images: list[ImageClients] = []
            gone = 0
            for (pool, image), found, err in inspected:
                if isinstance(err, CephNotFound):
                    gone += 1          # deleted or never there: nobody can write to it
                elif err is not None:
                    raise err
                elif found is not None:  # our own open, for the inspection, is no one's business
                    images.append(dataclasses.replace(found, watchers=tuple(w for w in found.watchers if w != me)))
            plan = ceph_clients.plan(entity, ips, sessions, images)
            t_look = self._clock()
            done = self._each(lambda a: self.client.blocklist_add(a, self.expire), plan.blocklist)
            failed_adds = [(a, err) for a, _, err in done if err is not None]
            if failed_adds:
                first, err = failed_adds[0]
                raise type(err)(f"{len(failed_adds)} of {len(plan.blocklist)} blocklist entries failed, "
                                f"first {first}: {err}")
            t_block = self._clock()
            broken = 0
            unbroken: list[str] = []
            if plan.breaks:
                self.client.wait_for_latest_osdmap()
                for (pool, image, _), ok, err in self._each(lambda b: self.client.break_lock(*b), plan.breaks):
                    if err is not None:   # fenced already; the next writer's librbd breaks it in ~20 ms
                        unbroken.append(f"{pool}/{image}: {err}")
                    elif ok:
                        broken += 1
        except CephPermissionDenied as e:
            raise PermanentBackendError(f"fence {name}: {e}") from None
        except CephUnavailable as e:
            raise TransientBackendError(f"fence {name}: {e}", retry_after=RETRY_AFTER) from None
        except CephError as e:
            raise TransientBackendError(f"fence {name}: {e}", retry_after=RETRY_AFTER) from None
        for u in unbroken:
            log.warning("fence %s: lock not broken (its owner is blocklisted; the next writer breaks it): %s",
                        name, u)
        for pool, image, owner in plan.spared_owners:
            log.warning("fence %s: the lock of %s/%s is held by %s, not a client of %s: left alone",
                        name, pool, image, owner, name)
        parts = [f"{name}: blocklisted {len(plan.blocklist)} client(s) of {entity} for {self.expire:g}s "
                 f"({len(plan.by_session)} with a mon session, {len(plan.by_ip)} lingering watch(es) from "
                 f"{len(ips)} published IP(s))",
                 f"broke {broken} lock(s) on {len(images)} image(s)"]
        if unbroken:
            parts.append(f"{len(unbroken)} lock(s) not broken")
        if plan.spared_owners:
            parts.append(f"{len(plan.spared_owners)} lock(s) held by other clients left alone")
        if plan.spared:
            parts.append(f"{plan.spared} watcher(s) of other entities on its IPs left alone")
        if gone:
            parts.append(f"{gone} image(s) gone")
        t_end = self._clock()
        parts.append(f"{(t_end - t0) * 1000:.0f} ms (looking {(t_look - t0) * 1000:.0f}, blocklisting "
                     f"{(t_block - t_look) * 1000:.0f}, breaking {(t_end - t_block) * 1000:.0f})")
        return "; ".join(parts)

    def close(self) -> None:
        self.client.close()
