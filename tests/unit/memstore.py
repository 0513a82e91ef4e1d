"""An in-memory ``CoordinationStore`` with Consul's semantics where the loop depends on them, on a fake
clock: ModifyIndex/LockIndex per key, sessions with checks, TTL checks, lock-delay after an invalidation
(none after an explicit unlock), all-or-nothing transactions that are refused with a reason. Tier 1 only:
the tiers that test Consul itself run real Consul agents.

Failure knobs: ``down`` (every call raises ``CoordinationError``, like a partitioned node's agent),
``invalidate(sid)`` (what serfHealth or a critical check does), ``expire_checks()`` (TTL checks whose
last pass is older than their TTL fail, and their sessions are invalidated).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

from agent.core import keys
from agent.core.model import PathKey
from agent.core.store import SessionInfo, TxnResult
from agent.core.tree import KVEntry
from agent.errors import CoordinationError


class RealClock:
    """The system's CLOCK_BOOTTIME, for tests that run the agent's threads."""

    def now(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()

    def advance(self, dt: float) -> None:
        time.sleep(dt)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1.7e9 + self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class _Key:
    value: bytes
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None


@dataclass
class _Check:
    ttl: float
    passed_at: float


@dataclass
class MemoryStore:
    clock: FakeClock | RealClock
    prefix: str = "pathagent"
    node: str = "gwa"
    kv: dict[str, _Key] = field(default_factory=dict)
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    checks: dict[str, _Check] = field(default_factory=dict)
    lock_delay_until: dict[str, float] = field(default_factory=dict)
    index: int = 10
    down: bool = False
    block: bool = False          # blocking reads wait (real time) for a change, as Consul's do
    catalog_ok: bool | None = True   # what catalog_agrees answers (False: another install holds the name)
    calls: list[str] = field(default_factory=list)
    _next: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)

    # --- helpers for tests -------------------------------------------------------------------------------
    def _tick(self) -> int:
        with self._changed:
            self.index += 1
            self._changed.notify_all()
        return self.index

    def _up(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            raise CoordinationError(f"consul {what}: cannot connect (test partition)")

    def set(self, key: str, value: bytes = b"", session: str | None = None) -> None:
        """A plain write (what ``disk start`` or a test does)."""
        i = self._tick()
        old = self.kv.get(key)
        self.kv[key] = _Key(value, old.create_index if old else i, i, old.lock_index if old else 0,
                            old.session if old else session)

    def delete(self, key: str) -> None:
        self._tick()
        self.kv.pop(key, None)

    def start_disk(self, disk: str, paths: int, pool: str = "rbd") -> None:
        self.set(keys.disk_key(self.prefix, disk), f'{{"pool":"{pool}","image":"pathagent-{disk}"}}'.encode())
        for i in range(1, paths + 1):
            self.set(keys.path_key(self.prefix, PathKey(disk, i)))

    def holder(self, path: PathKey) -> str | None:
        k = self.kv.get(keys.path_key(self.prefix, path))
        return k.session if k else None

    def invalidate(self, sid: str) -> None:
        """Consul invalidates ``sid``: its locks are released, each with the session's lock-delay."""
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        for name, k in self.kv.items():
            if k.session == sid:
                k.session = None
                k.modify_index = self._tick()
                if s.lock_delay > 0:
                    self.lock_delay_until[name] = self.clock.now() + s.lock_delay

    def expire_checks(self) -> None:
        now = self.clock.now()
        dead = {cid for cid, c in self.checks.items() if now - c.passed_at > c.ttl}
        for sid, s in list(self.sessions.items()):
            if dead & set(s.checks):
                self.invalidate(sid)

    # --- CoordinationStore -------------------------------------------------------------------------------
    def agent_node_name(self) -> str:
        self._up("agent/self")
        return self.node

    def catalog_agrees(self, node: str) -> bool | None:
        self._up("catalog/node")
        return self.catalog_ok

    def read_tree(self, index: int = 0, wait: float | None = None) -> tuple[int, list[KVEntry]]:
        self._up("kv read")
        if self.block and index and wait:
            with self._changed:
                self._changed.wait_for(lambda: self.index != index or self.down, timeout=min(wait, 1.0))
        head = self.prefix + "/"
        out = [KVEntry(k, v.value or None, v.modify_index, v.create_index, v.lock_index, v.session)
               for k, v in sorted(self.kv.items()) if k.startswith(head)]
        return self.index, out

    def session_info(self, sid: str, timeout: float | None = None) -> SessionInfo | None:
        self._up("session/info")
        return self.sessions.get(sid)

    def node_sessions(self, node: str) -> list[SessionInfo]:
        self._up("session/node")
        return [s for s in self.sessions.values() if s.node == node]

    def create_session(self, node: str, name: str, checks: Sequence[str], lock_delay: float,
                       ttl: float = 0.0, behavior: str = "release") -> str:
        self._up("session/create")
        for c in checks:
            if c != "serfHealth" and (c not in self.checks or
                                      self.clock.now() - self.checks[c].passed_at > self.checks[c].ttl):
                raise CoordinationError(f"consul session/create: HTTP 500: Check '{c}' is in critical state")
        self._next += 1
        sid = f"{self._next:08d}-0000-0000-0000-000000000000"
        self.sessions[sid] = SessionInfo(sid, name, node, tuple(checks), lock_delay, ttl, behavior, self._tick())
        return sid

    def renew_session(self, sid: str) -> bool:
        self._up("session/renew")
        return sid in self.sessions

    def destroy_session(self, sid: str) -> None:
        self._up("session/destroy")
        self.invalidate(sid)

    def register_check(self, check_id: str, name: str, ttl: float) -> None:
        self._up("agent/check/register")
        self.checks[check_id] = _Check(ttl, self.clock.now())

    def pass_check(self, check_id: str, note: str = "") -> None:
        self._up("agent/check/pass")
        if check_id not in self.checks:
            raise CoordinationError(f"consul agent/check/pass: HTTP 404: unknown check {check_id}")
        self.checks[check_id] = replace(self.checks[check_id], passed_at=self.clock.now())

    def _lock(self, key: str, sid: str, value: bytes, errors: list[tuple[int, str]], op: int,
              staged: dict[str, _Key | None]) -> None:
        cur = staged[key] if key in staged else self.kv.get(key)
        if sid not in self.sessions:
            errors.append((op, f'invalid session "{sid}"'))
        elif cur is not None and cur.session not in (None, sid):
            errors.append((op, f'failed to lock key "{key}", lock is already held'))
        elif self.lock_delay_until.get(key, 0.0) > self.clock.now() and (cur is None or cur.session != sid):
            errors.append((op, f'failed to lock key "{key}" due to lock delay'))
        else:
            base = cur or _Key(b"", 0, 0)
            staged[key] = _Key(value, base.create_index or -1, -1,
                               base.lock_index + (0 if base.session == sid else 1), sid)

    def _txn(self, ops: list[tuple[str, str, object, object]]) -> TxnResult:
        """(verb, key, arg1, arg2) operations, all or nothing."""
        self._up("txn")
        staged: dict[str, _Key | None] = {}
        errors: list[tuple[int, str]] = []
        touched: list[str] = []
        for i, (verb, key, a1, a2) in enumerate(ops):
            cur = staged[key] if key in staged else self.kv.get(key)
            if verb == "check-index":
                if cur is None:
                    errors.append((i, f'failed to check index, key "{key}" doesn\'t exist'))
                elif cur.modify_index != a1:
                    errors.append((i, f'failed index check for key "{key}", current modify index '
                                      f'{cur.modify_index} != {a1}'))
            elif verb == "check-session":
                if cur is None or cur.session != a1:
                    errors.append((i, f'failed session check for key "{key}"'))
            elif verb == "lock":
                assert isinstance(a1, str) and isinstance(a2, bytes)
                self._lock(key, a1, a2, errors, i, staged)
                touched.append(key)
            elif verb == "unlock":
                if cur is not None and cur.session == a1:
                    assert isinstance(a2, bytes)
                    staged[key] = _Key(a2, cur.create_index, -1, cur.lock_index, None)
                    touched.append(key)
            elif verb == "set":
                assert isinstance(a1, bytes)
                staged[key] = _Key(a1, cur.create_index if cur else -1, -1, cur.lock_index if cur else 0,
                                   cur.session if cur else None)
                touched.append(key)
            elif verb == "delete":
                staged[key] = None
                touched.append(key)
            elif verb == "delete-cas":
                if cur is None or cur.modify_index != a1:
                    errors.append((i, f'failed to delete key "{key}", index is stale'))
                else:
                    staged[key] = None
                    touched.append(key)
            else:
                raise AssertionError(verb)
        if errors:
            return TxnResult(False, (), tuple(errors))
        results = []
        for key in touched:
            k = staged[key]
            if k is None:
                self._tick()
                self.kv.pop(key, None)
                results.append(KVEntry(key, None, 0))
                continue
            i = self._tick()
            k.modify_index = i
            if k.create_index == -1:
                k.create_index = i
            self.kv[key] = k
            results.append(KVEntry(key, k.value, k.modify_index, k.create_index, k.lock_index, k.session))
        # Consul returns one result per op; the loop reads the lock results at odd positions
        padded: list[KVEntry] = []
        it = iter(results)
        for verb, key, _, _ in ops:
            if verb in ("lock", "unlock", "set", "delete", "delete-cas"):
                padded.append(next(it))
            else:
                k = self.kv.get(key)
                padded.append(KVEntry(key, None, k.modify_index if k else 0))
        return TxnResult(True, tuple(padded))

    def acquire_many(self, items: Sequence[tuple[PathKey, int]], session: str, value: bytes) -> TxnResult:
        ops: list[tuple[str, str, object, object]] = []
        for p, idx in items:
            k = keys.path_key(self.prefix, p)
            ops += [("check-index", k, idx, None), ("lock", k, session, value)]
        return self._txn(ops)

    def release(self, path: PathKey, session: str, value: bytes = b"") -> TxnResult:
        k = keys.path_key(self.prefix, path)
        return self._txn([("check-session", k, session, None), ("unlock", k, session, value)])

    def transfer(self, paths: Sequence[PathKey], old: str, new: str, value: bytes) -> TxnResult:
        ops: list[tuple[str, str, object, object]] = []
        for p in paths:
            k = keys.path_key(self.prefix, p)
            ops += [("check-session", k, old, None), ("unlock", k, old, value), ("lock", k, new, value)]
        return self._txn(ops)

    def lock_node_record(self, node: str, session: str, value: bytes) -> TxnResult:
        return self._txn([("lock", keys.node_key(self.prefix, node), session, value)])

    def release_node_record(self, node: str, session: str) -> TxnResult:
        k = keys.node_key(self.prefix, node)
        return self._txn([("check-session", k, session, None), ("unlock", k, session, b"")])

    def acquire_leader(self, session: str, value: bytes) -> TxnResult:
        return self._txn([("lock", keys.leader_key(self.prefix), session, value)])

    def record_fence(self, node: str, leader: str, value: bytes) -> TxnResult:
        return self._txn([("check-session", keys.leader_key(self.prefix), leader, None),
                          ("set", keys.fenced_key(self.prefix, node), value, None)])

    def request_move(self, path: PathKey, leader: str, value: bytes) -> TxnResult:
        return self._txn([("check-session", keys.leader_key(self.prefix), leader, None),
                          ("lock", keys.move_key(self.prefix, path), leader, value)])

    def end_move(self, path: PathKey, session: str) -> TxnResult:
        k = keys.move_key(self.prefix, path)
        return self._txn([("check-session", k, session, None), ("delete", k, None, None)])

    def clean_up(self, key: str, modify_index: int, leader: str) -> TxnResult:
        return self._txn([("check-session", keys.leader_key(self.prefix), leader, None),
                          ("delete-cas", key, modify_index, None)])

    def release_leader(self, session: str) -> TxnResult:
        k = keys.leader_key(self.prefix)
        return self._txn([("check-session", k, session, None), ("unlock", k, session, b"")])

    def transfer_leader(self, old: str, new: str, value: bytes) -> TxnResult:
        k = keys.leader_key(self.prefix)
        return self._txn([("check-session", k, old, None), ("unlock", k, old, value), ("lock", k, new, value)])
