"""The CLI's audit trail: one syslog line per command that changes the cluster (``disk create``, ``import``,
``update``, ``resize``, ``start``, ``stop``, ``delete``, ``path move``, ``node drain|undrain``), sent when
the command ends, whatever its outcome.

The line goes to the local syslog socket (``[log] audit``, default ``/dev/log``: journald and rsyslog both
listen there), facility ``authpriv``, severity notice, tag ``pathagent-cli``, so that ``journalctl -t
pathagent-cli`` lists who did what and when on this host::

    pathagent-cli[4242]: user=alice (uid 0) exit=0 disk delete vm1

The command line is logged as given (the CLI takes secrets only from files, so it holds none); the value
after an option whose name says password, secret or token is replaced by ``***`` all the same. Sending is
best effort and bounded (a datagram, 0.2 s): a missing socket or a full queue never changes the command's
outcome, and nothing is printed about it.
"""
from __future__ import annotations

import os
import pwd
import socket
from typing import Sequence

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
TAG = "pathagent-cli"
_SECRET_WORDS = ("password", "secret", "token")


def redacted(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret-named option (``--x-password V``, ``--x-token=V``) masked."""
    out: list[str] = []
    hide = False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        name, eq, _ = a.partition("=")
        secret = name.startswith("--") and any(w in name for w in _SECRET_WORDS) and not name.endswith("-file")
        if secret and eq:
            out.append(f"{name}=***")
        else:
            out.append(a)
            hide = secret
    return out


def who() -> str:
    """``user=NAME (uid N)``, with the sudo caller's name when run through sudo."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    caller = os.environ.get("SUDO_USER")
    return f"user={caller} (uid {uid}, via sudo)" if caller and caller != name else f"user={name} (uid {uid})"


def line(argv: Sequence[str], rc: int) -> str:
    """The message (without the syslog header)."""
    text = " ".join(redacted(argv)).replace("\n", " ")
    return f"{who()} exit={rc} {text}"[:900]


def send(socket_path: str, argv: Sequence[str], rc: int) -> bool:
    """Send the audit line of ``argv`` that ended with ``rc`` to ``socket_path`` (``""``: off). Whether it
    was handed to the socket; never raises."""
    if not socket_path:
        return False
    msg = f"<{FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE}>{TAG}[{os.getpid()}]: {line(argv, rc)}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(msg.encode("utf-8", "replace"), socket_path)
        return True
    except OSError:
        return False
