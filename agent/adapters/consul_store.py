"""The one module that talks to Consul (py-consul plus our own ``/v1/txn`` call).

Every py-consul / requests exception is translated here into ``CoordinationError`` (or ``SessionLost``);
nothing above this module catches a ``consul`` or ``requests`` exception. Every call has an HTTP timeout
(``[consul] timeout``; a blocking read adds its wait). A lost race (409 on a transaction) is an outcome,
returned as ``TxnResult(ok=False, errors=...)``, not an exception.

py-consul gotchas handled here: the blocking index comes back as ``str`` (compared as int, reset to 0
when it goes backwards); ``txn.put`` drops the ACL token and raises on 409 (we call ``/v1/txn``
ourselves); ``CONSUL_HTTP_TOKEN`` would override an explicit token (we set the token after construction).
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import consul
import requests

from agent.core import keys
from agent.config import ConsulConfig
from agent.errors import CoordinationError, SessionLost
from agent.core.model import PathKey

MAX_TXN_OPS = 64  # Consul 1.8.7's limit


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes | None
    modify_index: int
    create_index: int
    lock_index: int
    session: str | None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    name: str
    node: str
    checks: tuple[str, ...] = ()
    lock_delay: float = 0.0
    create_index: int = 0


@dataclass(frozen=True)
class TxnResult:
    """Outcome of a transaction: ``ok`` and the entries returned, or the per-op errors of a rollback."""

    ok: bool
    results: tuple[KVEntry, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()

    def reason(self) -> str:
        return "; ".join(f"op {i}: {w}" for i, w in self.errors)


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
    """A connection to the local Consul agent, with the operations the agent and the CLI need."""

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
        self._c.token = token or None
        self._http: requests.Session = self._c.http.session
        if token:
            self._http.headers["X-Consul-Token"] = token
        self._base = f"{cfg.scheme}://{cfg.address}"
        self._verify = verify
        self._cert = cert

    # --- errors ----------------------------------------------------------------------------------------
    def _wrap(self, what: str, e: Exception) -> CoordinationError:
        if isinstance(e, requests.Timeout):
            return CoordinationError(f"consul {what}: timed out after {self.cfg.timeout:g}s ({self.cfg.address})")
        if isinstance(e, requests.ConnectionError):
            return CoordinationError(f"consul {what}: cannot connect to {self.cfg.address}")
        if isinstance(e, consul.ACLPermissionDenied):
            return CoordinationError(f"consul {what}: permission denied (check the ACL token's policy)")
        msg = str(e).replace("\n", " ")[:300]
        return CoordinationError(f"consul {what}: {type(e).__name__}: {msg}")

    # --- agent, status ---------------------------------------------------------------------------------
    def agent_node_name(self) -> str:
        try:
            return str(self._c.agent.self()["Config"]["NodeName"])
        except (consul.ConsulException, requests.RequestException, KeyError, ValueError) as e:
            raise self._wrap("agent/self", e) from None

    def leader(self) -> str:
        try:
            return str(self._c.status.leader())
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("status/leader", e) from None

    # --- sessions ----------------------------------------------------------------------------------------
    @staticmethod
    def _session(d: Mapping[str, Any]) -> SessionInfo:
        delay = d.get("LockDelay", 0)
        return SessionInfo(id=str(d["ID"]), name=str(d.get("Name", "")), node=str(d.get("Node", "")),
                           checks=tuple(d.get("Checks") or ()),
                           lock_delay=float(delay) / 1e9 if isinstance(delay, (int, float)) else 0.0,
                           create_index=int(d.get("CreateIndex", 0)))

    def node_sessions(self, node: str) -> list[SessionInfo]:
        try:
            _, data = self._c.session.node(node, consistency="consistent")
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("session/node", e) from None
        return [self._session(d) for d in data or ()]

    def sessions(self) -> list[SessionInfo]:
        try:
            _, data = self._c.session.list()
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("session/list", e) from None
        return [self._session(d) for d in data or ()]

    def create_session(self, node: str, name: str, checks: Sequence[str], lock_delay: float) -> str:
        """A session bound to ``node`` with ``serfHealth`` plus ``checks``, behavior release."""
        body = {"Name": name, "Node": node, "Checks": ["serfHealth", *checks], "Behavior": "release",
                "LockDelay": f"{lock_delay:g}s"}
        data = self._request("PUT", "/v1/session/create", body, "session/create")
        return str(data["ID"])

    def session_info(self, sid: str) -> SessionInfo | None:
        """A consistent read of session ``sid``: proof the servers can be reached and it still exists."""
        try:
            _, data = self._c.session.info(sid, consistency="consistent")
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("session/info", e) from None
        return self._session(data) if data else None

    def destroy_session(self, sid: str) -> None:
        try:
            self._c.session.destroy(sid)
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("session/destroy", e) from None

    # --- KV --------------------------------------------------------------------------------------------
    def read_tree(self, index: int = 0, wait: float | None = None) -> tuple[int, list[KVEntry]]:
        """Everything under ``{prefix}/``. With ``index`` > 0 this is a blocking query that returns when
        something changes or after ``wait`` seconds. Returns the new index (reset to 0 by the caller's
        rule when it goes backwards: see ``next_index``)."""
        try:
            idx, data = self._c.kv.get(self.prefix + "/", recurse=True, index=index or None,
                                       wait=f"{wait:g}s" if (wait and index) else None)
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("kv read", e) from None
        return int(idx or 0), [_entry(d) for d in data or ()]

    def get(self, key: str) -> KVEntry | None:
        try:
            _, d = self._c.kv.get(key, consistency="consistent")
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("kv get", e) from None
        return None if d is None else _entry(d)

    def put(self, key: str, value: bytes) -> None:
        try:
            self._c.kv.put(key, value)
        except (consul.ConsulException, requests.RequestException, ValueError) as e:
            raise self._wrap("kv put", e) from None

    # --- transactions --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any, what: str) -> Any:
        try:
            r = self._http.request(method, self._base + path, data=json.dumps(body), timeout=self.cfg.timeout,
                                   verify=self._verify, cert=self._cert)
        except requests.RequestException as e:
            raise self._wrap(what, e) from None
        if r.status_code == 403:
            raise CoordinationError(f"consul {what}: permission denied (check the ACL token's policy)")
        if r.status_code >= 300:
            raise CoordinationError(f"consul {what}: HTTP {r.status_code}: {r.text.strip()[:300]}")
        try:
            return r.json()
        except ValueError:
            raise CoordinationError(f"consul {what}: unreadable answer") from None

    def txn(self, ops: TxnOps) -> TxnResult:
        """Run ``ops`` atomically. A rollback (HTTP 409) is ``TxnResult(ok=False)``; anything else that
        fails raises ``CoordinationError``."""
        if len(ops.ops) > MAX_TXN_OPS:
            raise ValueError(f"a transaction takes at most {MAX_TXN_OPS} operations, got {len(ops.ops)}")
        try:
            r = self._http.put(self._base + "/v1/txn", data=json.dumps(ops.ops), timeout=self.cfg.timeout,
                               verify=self._verify, cert=self._cert)
        except requests.RequestException as e:
            raise self._wrap("txn", e) from None
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
                raise CoordinationError("consul txn: permission denied (check the ACL token's policy)")
            return TxnResult(False, (), errors)
        raise CoordinationError(f"consul txn: HTTP {r.status_code}: {r.text.strip()[:300]}")

    # --- path locks ----------------------------------------------------------------------------------
    def acquire(self, path: PathKey, modify_index: int, session: str, value: bytes) -> TxnResult:
        """Lock the path key with ``session`` only if its ModifyIndex is still ``modify_index``: a key
        deleted (or deleted and recreated) since it was observed is refused, never resurrected."""
        k = keys.path_key(self.prefix, path)
        return self.txn(TxnOps().check_index(k, modify_index).lock(k, value, session))

    def acquire_many(self, items: Sequence[tuple[PathKey, int]], session: str, value: bytes) -> TxnResult:
        """``acquire`` for up to 32 paths in one transaction: all are locked, or none (a single stale
        index rolls the whole batch back; the caller then acquires one by one)."""
        ops = TxnOps()
        for path, index in items:
            k = keys.path_key(self.prefix, path)
            ops.check_index(k, index).lock(k, value, session)
        return self.txn(ops)

    def release(self, path: PathKey, session: str, value: bytes = b"") -> TxnResult:
        """Unlock the path key if ``session`` holds it. Refused (ok=False) when the key is gone or held
        by another session: nothing to release then."""
        k = keys.path_key(self.prefix, path)
        return self.txn(TxnOps().check_session(k, session).unlock(k, value, session))

    def lock_node_record(self, node: str, session: str, value: bytes) -> TxnResult:
        k = keys.node_key(self.prefix, node)
        return self.txn(TxnOps().lock(k, value, session))

    def release_node_record(self, node: str, session: str) -> TxnResult:
        k = keys.node_key(self.prefix, node)
        return self.txn(TxnOps().check_session(k, session).unlock(k, b"", session))

    def txn_delete(self, key: str) -> None:
        """Delete one key (idempotent)."""
        self.txn(TxnOps().delete(key))

    def close(self) -> None:
        try:
            self._http.close()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass


def next_index(sent: int, got: int) -> int:
    """Consul's rule for the next blocking index: reset to 0 when it went backwards or is not positive."""
    if got <= 0 or got < sent:
        return 0
    return got
