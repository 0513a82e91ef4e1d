"""Direct reads and the fence writes of LIO's configfs tree, without rtslib.

``exported``, ``logged_in`` and ``fence`` of the LIO backend use this module only: plain file reads of
``/sys/kernel/config/target/iscsi/<iqn>/tpgt_<tag>/...`` (no lock, no cache, no module loading: a host
without LIO simply has nothing there), and for the fence one write of ``0`` to each ``enable`` file of our
TPGs (the kernel drops the TPG's sessions and refuses logins; nothing else changes). The guard process,
which never imports rtslib, fences through here too. The parsers are pure.
"""
from __future__ import annotations

import os

ROOT = "/sys/kernel/config/target"


def iscsi_dir(root: str = ROOT) -> str:
    return os.path.join(root, "iscsi")


def target_dir(iqn: str, root: str = ROOT) -> str:
    """The target's directory (rtslib and the kernel keep IQNs lower-cased)."""
    return os.path.join(iscsi_dir(root), iqn.lower())


def tpg_dir(iqn: str, tag: int, root: str = ROOT) -> str:
    return os.path.join(target_dir(iqn, root), f"tpgt_{tag}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def tpg_tags(iqn: str, root: str = ROOT) -> list[int]:
    """The TPG tags the target has (empty when the target does not exist)."""
    try:
        names = os.listdir(target_dir(iqn, root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n[5:]) for n in names if n.startswith("tpgt_") and n[5:].isdigit())


def enabled(iqn: str, tag: int, root: str = ROOT) -> bool:
    """The TPG exists and is enabled (``False`` when it does not exist)."""
    try:
        return _read(os.path.join(tpg_dir(iqn, tag, root), "enable")).strip() == "1"
    except (FileNotFoundError, NotADirectoryError):
        return False


def has_lun(iqn: str, tag: int, lun: int, root: str = ROOT) -> bool:
    """The TPG has LUN ``lun`` linked to a storage object."""
    d = os.path.join(tpg_dir(iqn, tag, root), "lun", f"lun_{lun}")
    try:
        return any(os.path.islink(os.path.join(d, n)) for n in os.listdir(d))
    except (FileNotFoundError, NotADirectoryError):
        return False


def parse_acl_info(text: str) -> bool:
    """Whether a node ACL's ``info`` shows an active session (the kernel writes "No active iSCSI Session
    for Initiator Endpoint: ..." otherwise)."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return bool(first) and not first.startswith("No active")


def parse_dynamic_sessions(text: str) -> set[str]:
    """Initiator names of a TPG's ``dynamic_sessions`` file (one per line; demo-mode logins)."""
    return {line.strip() for line in text.replace("\0", "\n").splitlines() if line.strip()}


def sessions(iqn: str, root: str = ROOT) -> set[str]:
    """Initiator names with a session on any TPG of the target: explicit node ACLs whose ``info`` shows a
    session, plus the TPG's dynamic (demo-mode) sessions."""
    out: set[str] = set()
    for tag in tpg_tags(iqn, root):
        d = tpg_dir(iqn, tag, root)
        try:
            out |= parse_dynamic_sessions(_read(os.path.join(d, "dynamic_sessions")))
        except (FileNotFoundError, NotADirectoryError):
            pass
        try:
            acls = os.listdir(os.path.join(d, "acls"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in acls:
            try:
                if parse_acl_info(_read(os.path.join(d, "acls", name, "info"))):
                    out.add(name)
            except (FileNotFoundError, NotADirectoryError):
                continue
    return out


def disable(iqn: str, tag: int, root: str = ROOT) -> bool:
    """Write ``0`` to the TPG's ``enable``: its sessions end and no login is accepted. ``False`` when the
    TPG does not exist (nothing to stop); ``OSError`` when the write failed."""
    path = os.path.join(tpg_dir(iqn, tag, root), "enable")
    try:
        if _read(path).strip() == "0":
            return True
        with open(path, "w") as f:
            f.write("0")
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True
