"""Talking to tgtd: the ``tgtadm`` runner and the pure parsers of its ``--op show`` output.

``Tgtadm.run`` runs one call with a scrubbed environment and a timeout; every failure is a ``TgtadmError``
(transient) whose message names the operation and tgtadm's own words, never the argv (it may hold a CHAP
password). ``parse_*`` are pure. See docs/backend-tgt.md.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

from agent import childenv
from agent.errors import PermanentBackendError, TransientBackendError

# --------------------------------------------------------------------------------------------------
# parsing (pure)


@dataclass
class TgtLun:
    lun: int
    kind: str = ""
    scsi_id: str = ""
    scsi_sn: str = ""
    bstype: str = ""
    path: str = ""


@dataclass
class TgtConnection:
    cid: int
    address: str = ""        # the initiator's IP address as tgt prints it ("" when not shown)


@dataclass
class TgtSession:
    """One I_T nexus: an iSCSI session. ``sid`` is tgt's session id (the TSIH, what ``--sid`` takes). tgt
    prints the connection the session was created with (its text is written once, at login); with tgt's
    default ``MaxConnections=1`` that is the session's only connection."""

    sid: int
    initiator: str = ""
    connections: list[TgtConnection] = field(default_factory=list)


@dataclass
class TgtTarget:
    tid: int
    name: str
    luns: dict[int, TgtLun] = field(default_factory=dict)
    accounts_in: set[str] = field(default_factory=set)
    accounts_out: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)
    it_nexus: list[TgtSession] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        """How many sessions (I_T nexuses) the target has."""
        return len(self.it_nexus)


@dataclass
class TgtState:
    """tgtd's configuration as ``tgtadm --op show`` reports it."""

    targets: dict[str, TgtTarget]          # by IQN
    portals: set[str]                       # "ip:port" / "[ip6]:port"
    accounts: set[str] | None = None        # global account names; None when not read

    def free_tid(self) -> int:
        used = {t.tid for t in self.targets.values()}
        tid = 1
        while tid in used:
            tid += 1
        return tid


_LUN_FIELDS = {"Type": "kind", "SCSI ID": "scsi_id", "SCSI SN": "scsi_sn", "Backing store type": "bstype",
               "Backing store path": "path"}


def parse_targets(text: str) -> dict[str, TgtTarget]:
    """Parse ``tgtadm --mode target --op show`` (sections by indentation: 0 target, 4 section, 8 item; a
    session's ``Initiator:``/``Connection:`` at 12 and a connection's ``IP Address:`` at 16)."""
    targets: dict[str, TgtTarget] = {}
    cur: TgtTarget | None = None
    section = ""
    lun: TgtLun | None = None
    nexus: TgtSession | None = None
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        if indent == 0 and line.startswith("Target ") and ":" in line:
            head, _, name = line.partition(":")
            cur = TgtTarget(tid=int(head.split()[1]), name=name.strip())
            targets[cur.name] = cur
            section, lun, nexus = "", None, None
            continue
        if cur is None:
            continue
        if indent == 4:
            section, lun, nexus = line.rstrip(":"), None, None
            continue
        if section == "LUN information":
            if indent == 8 and line.startswith("LUN:"):
                lun = TgtLun(lun=int(line.split(":", 1)[1]))
                cur.luns[lun.lun] = lun
            elif lun is not None and indent >= 12 and ":" in line:
                k, _, v = line.partition(":")
                attr = _LUN_FIELDS.get(k)
                if attr is not None:
                    setattr(lun, attr, v.strip())
        elif section == "Account information" and indent == 8:
            if line.endswith(" (outgoing)"):
                cur.accounts_out.add(line[: -len(" (outgoing)")])
            else:
                cur.accounts_in.add(line)
        elif section == "ACL information" and indent == 8:
            cur.acl.add(line)
        elif section == "I_T nexus information":
            if indent == 8 and line.startswith("I_T nexus:"):
                nexus = TgtSession(sid=int(line.split(":", 1)[1]))
                cur.it_nexus.append(nexus)
            elif nexus is not None and indent > 8:
                _nexus_line(nexus, line)
    return targets


def _nexus_line(nexus: TgtSession, line: str) -> None:
    """``Initiator: <name> alias: <alias>``, ``Connection: <cid>``, ``IP Address: <ip>`` (the last one
    belongs to the connection above it)."""
    k, _, v = line.partition(":")
    v = v.strip()
    if k == "Initiator":
        nexus.initiator = v.split(" alias: ", 1)[0].strip()
    elif k == "Connection" and v.isdigit():
        nexus.connections.append(TgtConnection(cid=int(v)))
    elif k == "IP Address" and nexus.connections:
        nexus.connections[-1].address = v


def parse_portals(text: str) -> set[str]:
    """Parse ``tgtadm --mode portal --op show`` (``Portal: 1.2.3.4:3260,1``) into ``ip:port`` strings."""
    out = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Portal:"):
            out.add(line.split(":", 1)[1].strip().rsplit(",", 1)[0])
    return out


def parse_accounts(text: str) -> set[str]:
    """Parse ``tgtadm --mode account --op show`` (``Account list:`` then one name a line; empty output
    when there is no account)."""
    return {line.strip() for line in text.splitlines()
            if line.strip() and line.strip() != "Account list:"}


# --------------------------------------------------------------------------------------------------
# the runner


class TgtadmError(TransientBackendError):
    """A ``tgtadm`` call failed: ``rc`` and tgtadm's own message (never the argv: it may hold a secret).
    ``rc`` is -1 when tgtd did not answer in time."""

    def __init__(self, what: str, rc: int, detail: str, retry_after: float = 2.0) -> None:
        self.what = what
        self.rc = rc
        self.detail = detail
        super().__init__(f"tgtadm {what}: {detail or f'exit {rc}'}", retry_after)


class Tgtadm:
    """Runs ``tgtadm -C <control port> --lld iscsi ...`` against the tgtd on ``socket``."""

    def __init__(self, binary: str, control_port: int, socket: str, timeout: float) -> None:
        self.binary = binary
        self.control_port = control_port
        self.socket = socket
        self.timeout = timeout

    def env(self) -> dict[str, str]:
        return childenv.child_env(TGT_IPC_SOCKET=self.socket)

    def run(self, what: str, args: Sequence[str], timeout: float | None = None) -> str:
        """tgtadm's stdout. ``what`` describes the call in messages; it must not hold a secret."""
        limit = self.timeout if timeout is None else max(0.05, timeout)
        argv = [self.binary, "-C", str(self.control_port), "--lld", "iscsi", *args]
        try:
            r = subprocess.run(argv, env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=limit)
        except subprocess.TimeoutExpired:
            raise TgtadmError(what, -1, f"no answer from tgtd within {limit:g} s") from None
        except OSError as e:
            raise PermanentBackendError(f"cannot run {self.binary}: {e.strerror or e}") from None
        if r.returncode != 0:
            detail = r.stderr.decode(errors="replace").strip().removeprefix("tgtadm:").strip()
            raise TgtadmError(what, r.returncode, detail)
        return r.stdout.decode(errors="replace")

    def show(self, accounts: bool, timeout: float | None = None) -> TgtState:
        """tgtd's state (targets, portals, and the account list when ``accounts``), all of it within
        ``timeout`` seconds (default: the per-call timeout for each call)."""
        end = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if end is None else end - time.monotonic()

        st = TgtState(targets=parse_targets(self.run("show targets", ["--mode", "target", "--op", "show"], left())),
                      portals=parse_portals(self.run("show portals", ["--mode", "portal", "--op", "show"], left())))
        if accounts:
            st.accounts = parse_accounts(self.run("show accounts", ["--mode", "account", "--op", "show"], left()))
        return st

    def show_targets(self, timeout: float | None = None) -> dict[str, TgtTarget]:
        """tgtd's targets (with their sessions), one read-only call within ``timeout`` seconds."""
        return parse_targets(self.run("show targets", ["--mode", "target", "--op", "show"], timeout))
