"""The one module that talks to Consul (py-consul plus our own ``/v1/txn`` call).

Every py-consul / requests exception is translated here (one ``_translated`` block) into ``CoordinationError``;
nothing above this module catches a ``consul`` or ``requests`` exception. Every call has an HTTP timeout
(``[consul] timeout``; a blocking read adds its wait). A lost race (409 on a transaction) is an outcome,
returned as ``TxnResult(ok=False, errors=...)``, not an exception.

py-consul gotchas handled here: the blocking index comes back as ``str`` (compared as int, reset to 0
when it goes backwards); ``txn.put`` drops the ACL token and raises on 409 (we call ``/v1/txn``
ourselves); ``CONSUL_HTTP_TOKEN`` would override an explicit token (we set the token after construction).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import consul
import requests

from agent.config import ConsulConfig
from agent.core import keys
from agent.core.model import PathKey
from agent.core.store import MAX_TXN_OPS, SessionInfo, TxnResult, next_index  # noqa: F401 - re-exported
from agent.core.tree import KVEntry
from agent.errors import CoordinationError

#: paths per transaction: acquire = check-index + lock (2 ops), transfer = check + unlock + lock (3 ops)
ACQUIRE_BATCH = MAX_TXN_OPS // 2
TRANSFER_BATCH = MAX_TXN_OPS // 3

@dataclass
class TxnOps:
    """Builder for a list of KV transaction operations."""

    ops: list[dict[str, Any]] = field(default_factory=list)

    def _add(self, verb: str, key: str, **kw: Any) -> "TxnOps":
        op: dict[str, Any] = {"Verb": verb, "Key": key}
        if "value" in kw:
            op["Value"] = base64.b64encode(kw.pop("value")).decode()
        for k, v in kw.items():
            op[k] = v
        self.ops.append({"KV": op})
        return self

    def check_index(self, key: str, index: int) -> "TxnOps":
        return self._add("check-index", key, Index=index)

    def check_not_exists(self, key: str) -> "TxnOps":
        return self._add("check-not-exists", key)

    def check_session(self, key: str, session: str) -> "TxnOps":
        return self._add("check-session", key, Session=session)

    def lock(self, key: str, value: bytes, session: str) -> "TxnOps":
        return self._add("lock", key, value=value, Session=session)

    def unlock(self, key: str, value: bytes, session: str) -> "TxnOps":
        return self._add("unlock", key, value=value, Session=session)

    def set(self, key: str, value: bytes) -> "TxnOps":
        return self._add("set", key, value=value)

    def cas(self, key: str, value: bytes, index: int) -> "TxnOps":
        return self._add("cas", key, value=value, Index=index)

    def delete(self, key: str) -> "TxnOps":
        return self._add("delete", key)

    def delete_tree(self, key: str) -> "TxnOps":
        return self._add("delete-tree", key)

    def delete_cas(self, key: str, index: int) -> "TxnOps":
        return self._add("delete-cas", key, Index=index)


def _entry(d: Mapping[str, Any], b64: bool = False) -> KVEntry:
    """A KV entry from Consul's JSON. py-consul has already decoded ``Value`` to bytes; ``/v1/txn``
    answers carry it base64-encoded (``b64``)."""
    raw = d.get("Value")
    value = None if raw is None else (base64.b64decode(raw) if b64 else
                                      raw if isinstance(raw, bytes) else str(raw).encode())
    return KVEntry(key=str(d["Key"]), value=value, modify_index=int(d.get("ModifyIndex", 0)),
                   create_index=int(d.get("CreateIndex", 0)), lock_index=int(d.get("LockIndex", 0)),
                   session=d.get("Session") or None)


class ConsulStore:
    """A connection to the local Consul agent, with the operations the agent and the CLI need (it
    implements ``agent.core.store.CoordinationStore``)."""

    def __init__(self, cfg: ConsulConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix.rstrip("/")
        try:
            token = cfg.resolved_token() or os.environ.get("CONSUL_HTTP_TOKEN", "")
        except OSError as e:
            raise CoordinationError(f"cannot read consul.token_file: {e.strerror}") from None
        verify: bool | str = cfg.ca_file or True
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None
        self._c = consul.Consul(host=cfg.host, port=cfg.port, scheme=cfg.scheme, verify=verify, cert=cert,
                                connections_timeout=cfg.timeout)
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; the config wins here.
        self._http: requests.Session = self._c.http.session
        self._set_token(token)
        self._base = f"{cfg.scheme}://{cfg.address}"
        self._verify = verify
        self._cert = cert

    def _set_token(self, token: str) -> None:
        self._c.token = token or None
        if token:
            self._http.headers["X-Consul-Token"] = token
        else:
            self._http.headers.pop("X-Consul-Token", None)

    def _reread_token(self) -> None:
        """After a refusal: a rotated token in ``token_file`` is used from the next call on (the agent
        would otherwise stay fenced until restarted). The token is never logged."""
        if not self.cfg.token_file:
            return
        try:
            token = self.cfg.resolved_token()
        except OSError:
            return
        if token and token != self._c.token:
            self._set_token(token)

    # --- errors ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Every py-consul / requests failure inside becomes one ``CoordinationError`` naming ``what``."""
        try:
            yield
        except CoordinationError:
            raise
        except requests.Timeout:
            raise CoordinationError(f"consul {what}: timed out after {self.cfg.timeout:g}s "
                                    f"({self.cfg.address})") from None
        except requests.ConnectionError:
            raise CoordinationError(f"consul {what}: cannot connect to {self.cfg.address}") from None
        except consul.ACLPermissionDenied:
            self._reread_token()
            raise CoordinationError(f"consul {what}: permission denied (check the ACL token's policy)") from None
        except (consul.ConsulException, requests.RequestException, KeyError, TypeError, ValueError) as e:
            msg = str(e).replace("\n", " ")[:300]
            raise CoordinationError(f"consul {what}: {type(e).__name__}: {msg}") from None

    # --- agent, status ---------------------------------------------------------------------------------
    def agent_node_name(self) -> str:
        with self._translated("agent/self"):
            return str(self._c.agent.self()["Config"]["NodeName"])

    def catalog_agrees(self, node: str) -> bool | None:
        with self._translated("agent/self"):
            mine = str(self._c.agent.self()["Config"].get("NodeID") or "")
        try:
            data = self._request("GET", f"/v1/catalog/node/{node}", None, "catalog/node",
                                 params={"consistent": ""})
        except _NotFound:
            return False
        except CoordinationError as e:
            if "permission denied" in str(e):
                return None
            raise
        found = str(((data or {}).get("Node") or {}).get("ID") or "")
        return bool(mine) and found == mine

    def leader(self) -> str:
        with self._translated("status/leader"):
            return str(self._c.status.leader())

    def register_check(self, check_id: str, name: str, ttl: float) -> None:
        """A TTL check on the local agent, registered passing (a session listing a critical check cannot be
        created). Registering it again keeps the agent's copy in step with the config."""
        self._request("PUT", "/v1/agent/check/register",
                      {"ID": check_id, "Name": name, "TTL": f"{ttl:g}s", "Status": "passing",
                       "Notes": "passed by pathagent while its loop is healthy and not fenced"},
                      "agent/check/register")

    def pass_check(self, check_id: str, note: str = "") -> None:
        self._request("PUT", f"/v1/agent/check/pass/{check_id}", None, "agent/check/pass",
                      params={"note": note} if note else None)

    # --- sessions ----------------------------------------------------------------------------------------
    @staticmethod
    def _session(d: Mapping[str, Any]) -> SessionInfo:
        delay = d.get("LockDelay", 0)
        ttl = str(d.get("TTL") or "0s")
        return SessionInfo(id=str(d["ID"]), name=str(d.get("Name", "")), node=str(d.get("Node", "")),
                           checks=tuple(d.get("Checks") or d.get("NodeChecks") or ()),
                           lock_delay=float(delay) / 1e9 if isinstance(delay, (int, float)) else 0.0,
                           ttl=_seconds(ttl), behavior=str(d.get("Behavior") or "release"),
                           create_index=int(d.get("CreateIndex", 0)))

    def node_sessions(self, node: str) -> list[SessionInfo]:
        with self._translated("session/node"):
            _, data = self._c.session.node(node, consistency="consistent")
            return [self._session(d) for d in data or ()]

    def sessions(self) -> list[SessionInfo]:
        with self._translated("session/list"):
            _, data = self._c.session.list()
            return [self._session(d) for d in data or ()]

    def create_session(self, node: str, name: str, checks: Sequence[str], lock_delay: float,
                       ttl: float = 0.0, behavior: str = "release") -> str:
        """A session bound to ``node`` with exactly ``checks`` (the agent passes ``serfHealth`` and its own
        TTL check; the CLI none), ``behavior`` release or delete, a ``ttl`` when > 0."""
        body: dict[str, Any] = {"Name": name, "Node": node, "Checks": list(checks), "Behavior": behavior,
                                "LockDelay": f"{lock_delay:g}s"}
        if ttl > 0:
            body["TTL"] = f"{ttl:g}s"
        data = self._request("PUT", "/v1/session/create", body, "session/create")
        return str(data["ID"])

    def session_info(self, sid: str, timeout: float | None = None) -> SessionInfo | None:
        """A consistent read of session ``sid``: proof the servers can be reached and it still exists.
        ``timeout``: this call's HTTP timeout (default ``[consul] timeout``)."""
        try:
            data = self._request("GET", f"/v1/session/info/{sid}", None, "session/info",
                                 params={"consistent": ""}, timeout=timeout)
        except _NotFound:
            return None
        return self._session(data[0]) if data else None

    def renew_session(self, sid: str) -> bool:
        try:
            self._request("PUT", f"/v1/session/renew/{sid}", None, "session/renew")
        except _NotFound:
            return False
        return True

    def destroy_session(self, sid: str) -> None:
        with self._translated("session/destroy"):
            self._c.session.destroy(sid)

    # --- KV --------------------------------------------------------------------------------------------
    def read_tree(self, index: int = 0, wait: float | None = None) -> tuple[int, list[KVEntry]]:
        """Everything under ``{prefix}/``. With ``index`` > 0 this is a blocking query that returns when
        something changes or after ``wait`` seconds. Returns Consul's new index (the caller applies
        ``next_index``)."""
        with self._translated("kv read"):
            idx, data = self._c.kv.get(self.prefix + "/", recurse=True, index=index or None,
                                       wait=f"{wait:g}s" if (wait and index) else None)
            return int(idx or 0), [_entry(d) for d in data or ()]

    def read_under(self, key_prefix: str) -> list[KVEntry]:
        """Every key under ``key_prefix`` (for example ``{prefix}/claims/``), read consistently."""
        with self._translated("kv read"):
            _, data = self._c.kv.get(key_prefix, recurse=True, consistency="consistent")
            return [_entry(d) for d in data or ()]

    def get(self, key: str) -> KVEntry | None:
        with self._translated("kv get"):
            _, d = self._c.kv.get(key, consistency="consistent")
            return None if d is None else _entry(d)

    def put(self, key: str, value: bytes) -> None:
        with self._translated("kv put"):
            self._c.kv.put(key, value)

    # --- raw HTTP, transactions ------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any, what: str,
                 params: Mapping[str, str] | None = None, timeout: float | None = None) -> Any:
        with self._translated(what):
            r = self._http.request(method, self._base + path, data=None if body is None else json.dumps(body),
                                   params=params, timeout=timeout or self.cfg.timeout, verify=self._verify,
                                   cert=self._cert)
        if r.status_code == 403:
            self._reread_token()
            raise CoordinationError(f"consul {what}: permission denied (check the ACL token's policy)")
        if r.status_code == 404:
            raise _NotFound(f"consul {what}: not found")
        if r.status_code >= 300:
            raise CoordinationError(f"consul {what}: HTTP {r.status_code}: {r.text.strip()[:300]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise CoordinationError(f"consul {what}: unreadable answer") from None

    def txn(self, ops: TxnOps) -> TxnResult:
        """Run ``ops`` atomically. A rollback (HTTP 409) is ``TxnResult(ok=False)``; anything else that
        fails raises ``CoordinationError``."""
        if len(ops.ops) > MAX_TXN_OPS:
            raise ValueError(f"a transaction takes at most {MAX_TXN_OPS} operations, got {len(ops.ops)}")
        with self._translated("txn"):
            r = self._http.put(self._base + "/v1/txn", data=json.dumps(ops.ops), timeout=self.cfg.timeout,
                               verify=self._verify, cert=self._cert)
        if r.status_code in (200, 409):
            try:
                body = r.json()
            except ValueError:
                raise CoordinationError(f"consul txn: unreadable answer (HTTP {r.status_code})") from None
            results = tuple(_entry(x["KV"], b64=True) for x in (body.get("Results") or ()) if "KV" in x)
            errors = tuple((int(e.get("OpIndex", -1)), str(e.get("What", ""))) for e in (body.get("Errors") or ()))
            if r.status_code == 200:
                return TxnResult(True, results)
            if any("Permission denied" in w for _, w in errors):
                self._reread_token()
                raise CoordinationError("consul txn: permission denied (check the ACL token's policy)")
            return TxnResult(False, (), errors)
        raise CoordinationError(f"consul txn: HTTP {r.status_code}: {r.text.strip()[:300]}")

    # --- path locks ----------------------------------------------------------------------------------
    def acquire_many(self, items: Sequence[tuple[PathKey, int]], session: str, value: bytes) -> TxnResult:
        """Lock each path key with ``session`` only if its ModifyIndex is still the one observed, all or
        none (at most ``ACQUIRE_BATCH``): a key deleted, or deleted and recreated, since it was observed is
        refused, never resurrected."""
        ops = TxnOps()
        for path, index in items:
            k = keys.path_key(self.prefix, path)
            ops.check_index(k, index).lock(k, value, session)
        return self.txn(ops)

    def acquire(self, path: PathKey, modify_index: int, session: str, value: bytes) -> TxnResult:
        """``acquire_many`` of one path."""
        return self.acquire_many([(path, modify_index)], session, value)

    def release(self, path: PathKey, session: str, value: bytes = b"") -> TxnResult:
        """Unlock the path key if ``session`` holds it. Refused (ok=False) when the key is gone or held
        by another session: nothing to release then."""
        k = keys.path_key(self.prefix, path)
        return self.txn(TxnOps().check_session(k, session).unlock(k, value, session))

    def transfer(self, paths: Sequence[PathKey], old: str, new: str, value: bytes) -> TxnResult:
        """Move the locks on ``paths`` (at most ``TRANSFER_BATCH``) from session ``old`` to ``new``: an
        explicit unlock carries no lock-delay, so the new session locks at once, in the same transaction."""
        ops = TxnOps()
        for path in paths:
            k = keys.path_key(self.prefix, path)
            ops.check_session(k, old).unlock(k, value, old).lock(k, value, new)
        return self.txn(ops)

    def lock_node_record(self, node: str, session: str, value: bytes) -> TxnResult:
        k = keys.node_key(self.prefix, node)
        return self.txn(TxnOps().lock(k, value, session))

    def release_node_record(self, node: str, session: str) -> TxnResult:
        k = keys.node_key(self.prefix, node)
        return self.txn(TxnOps().check_session(k, session).unlock(k, b"", session))

    # --- the leader -----------------------------------------------------------------------------------
    def acquire_leader(self, session: str, value: bytes) -> TxnResult:
        return self.txn(TxnOps().lock(keys.leader_key(self.prefix), value, session))

    def transfer_leader(self, old: str, new: str, value: bytes) -> TxnResult:
        k = keys.leader_key(self.prefix)
        return self.txn(TxnOps().check_session(k, old).unlock(k, value, old).lock(k, value, new))

    def release_leader(self, session: str) -> TxnResult:
        k = keys.leader_key(self.prefix)
        return self.txn(TxnOps().check_session(k, session).unlock(k, b"", session))

    def record_fence(self, node: str, leader: str, value: bytes) -> TxnResult:
        return self.txn(TxnOps().check_session(keys.leader_key(self.prefix), leader)
                        .set(keys.fenced_key(self.prefix, node), value))

    def request_move(self, path: PathKey, leader: str, value: bytes) -> TxnResult:
        return self.txn(TxnOps().check_session(keys.leader_key(self.prefix), leader)
                        .lock(keys.move_key(self.prefix, path), value, leader))

    def end_move(self, path: PathKey, session: str) -> TxnResult:
        k = keys.move_key(self.prefix, path)
        return self.txn(TxnOps().check_session(k, session).delete(k))

    def clean_up(self, key: str, modify_index: int, leader: str) -> TxnResult:
        return self.txn(TxnOps().check_session(keys.leader_key(self.prefix), leader).delete_cas(key, modify_index))

    def txn_delete(self, key: str) -> None:
        """Delete one key (idempotent)."""
        self.txn(TxnOps().delete(key))

    def close(self) -> None:
        try:
            self._http.close()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass


class _NotFound(CoordinationError):
    """HTTP 404 from a raw call (a session that is gone, for renew)."""


def _seconds(text: str) -> float:
    """Consul's Go duration strings as seconds (``"30s"``, ``"1m30s"``, ``"500ms"``); 0 when unreadable."""
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    i = 0
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = text[i:i + 2] if text[i:i + 2] in units else c
        if unit not in units or not num:
            return 0.0
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    return total
