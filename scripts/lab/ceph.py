"""A disposable micro Ceph cluster for tests, benchmarks and the demo: one monitor, one OSD (memstore),
no auth (or cephx, ``cephx=True``), every file under one directory, started in about half a second.

```python
with MicroCeph(tmp_path / "ceph") as ceph:      # or ceph.start() ... ceph.stop()
    CephClient(ceph.conf_path, "admin", 5.0)    # pool "rbd" exists and is writable
    ceph.freeze(); ...; ceph.thaw()             # SIGSTOP/SIGCONT both daemons: an outage and its recovery
```

Command line (``scripts/micro-ceph`` wraps it): ``python -m lab.ceph start DIR [--ip IP] [--mon-port N]``
starts a cluster, writes ``DIR/ceph.conf``, prints it and stays in the foreground until SIGTERM/SIGINT,
then stops and purges the cluster; ``python -m lab.ceph stop DIR`` stops one started elsewhere.

With ``cephx=True`` every client must authenticate: the conf names one keyring per entity,
``DIR/keys/ceph.<entity>.keyring`` (``keyring = .../$cluster.$name.keyring``), so any client given only an
id finds its key; ``client.admin`` has every cap, and ``add_user(entity, caps)`` creates a user with exactly
the caps given (``ceph auth get-or-create``), as a site's admin would.

Layout: ``DIR/{ceph.conf, monmap, mon/, osd/, log/, run/, keys/}``. Ports: the monitor listens on ``mon_port``
(msgr v2) and ``mon_port + 1`` (v1); the OSD binds inside ``mon_port + 2 .. mon_port + 15``. The block
of 16 ports is reserved in the host-wide registry of ``lab.consul.PortReservation`` (``mon_port`` given:
that block, else a free one), so several Ceph and Consul lab clusters coexist on one host. The start
refuses when a port of the block is taken (``ceph-mon`` would otherwise daemonize, fail to bind and leave
every client hanging).

The daemons daemonize themselves, so they are tracked by their pid files (``DIR/run/{mon,osd}.pid``) and
signalled only after checking that ``/proc/PID/cmdline`` names this cluster's ``ceph.conf``; never by
process name. memstore keeps the data in RAM and loses it on SIGKILL, so ``stop()`` kills and purges:
a cluster is not restartable, start a new one (see /work/shared/notes/ceph.md).

The conf gives clients small timeouts (``client mount timeout``, ``rados mon op timeout``,
``rados osd op timeout`` = ``client_timeout``, 5 s by default) so that nothing hangs for librados'
default 300 s when the cluster is frozen or gone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    from lab import proc
except ImportError:  # run as a file by /usr/bin/python3 (the bootstrap fallback below)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lab import proc
from lab.consul import ClusterError, PortReservation

PORT_BLOCK = 16            # mon v2, mon v1, then 14 ports for the OSD (it binds 8)
DEBIAN_PYTHON = "/usr/bin/python3"  # the only interpreter with Debian's rados bindings


class CephLabError(RuntimeError):
    """The micro cluster could not be started (with the reason and the log to read)."""


def _conf_text(d: Path, fsid: str, ip: str, mon_port: int, client_timeout: float, cephx: bool = False) -> str:
    t = f"{client_timeout:g}"
    auth = "cephx" if cephx else "none"
    keyring = f"keyring = {d}/keys/$cluster.$name.keyring\n" if cephx else ""
    return f"""# micro Ceph cluster written by scripts/lab/ceph.py: one mon, one memstore OSD, auth {auth}
[global]
{keyring}
fsid = {fsid}
mon host = [v2:{ip}:{mon_port},v1:{ip}:{mon_port + 1}]
public addr = {ip}
cluster addr = {ip}
ms bind port min = {mon_port + 2}
ms bind port max = {mon_port + PORT_BLOCK - 1}
auth cluster required = {auth}
auth service required = {auth}
auth client required = {auth}
mon warn on insecure global id reclaim allowed = false
mon mgr mkfs grace = 31536000
paxos propose interval = 0.01
paxos min wait = 0.001
osd objectstore = memstore
memstore device bytes = 1073741824
memstore page set = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd op num shards = 1
osd op num threads per shard = 2
osd class load list = *
osd class default list = *
mon allow pool delete = true
mon data avail warn = 1
mon data avail crit = 0
run dir = {d}/run
log file = {d}/log/$name.log

[client]
# librados retries for 300 s by default when the cluster is unreachable: keep every client short
client mount timeout = {t}
rados mon op timeout = {t}
rados osd op timeout = {t}

[mon]
mon data = {d}/mon
admin socket = {d}/run/$cluster-$name.asok

[osd]
osd data = {d}/osd
osd journal = {d}/osd.journal
admin socket = {d}/run/$cluster-$name.asok
"""


def bootstrap(conf: str, pool: str, timeout: float) -> None:
    """Register OSD 0 and create ``pool`` (application rbd) through one librados handle."""
    import rados

    r = rados.Rados(conffile=conf)
    r.conf_set("rados_mon_op_timeout", f"{timeout:g}")
    r.connect(timeout=int(max(1, timeout)))
    try:
        for cmd in ({"prefix": "osd create"},
                    {"prefix": "osd crush add", "id": 0, "weight": 1.0, "args": ["root=default"]},
                    {"prefix": "osd pool create", "pool": pool, "pg_num": 8},
                    {"prefix": "osd pool application enable", "pool": pool, "app": "rbd"}):
            ret, _, outs = r.mon_command(json.dumps(cmd), b"")
            if ret != 0:
                raise CephLabError(f"mon command {cmd['prefix']!r} failed: {ret} {outs}")
    finally:
        r.shutdown()


def wait_writable(conf: str, pool: str, timeout: float) -> None:
    """Block until a ``write_full`` to ``pool`` succeeds (the OSD is up and the PGs are active)."""
    import rados

    end = time.monotonic() + timeout
    r = rados.Rados(conffile=conf)
    r.conf_set("rados_osd_op_timeout", "2")
    r.connect(timeout=int(max(1, timeout)))
    try:
        with r.open_ioctx(pool) as io:
            while True:
                try:
                    io.write_full("lab-probe", b"x")
                    io.remove_object("lab-probe")
                    return
                except rados.Error:
                    if time.monotonic() > end:
                        raise CephLabError(f"pool {pool} not writable after {timeout:g}s") from None
                    time.sleep(0.05)
    finally:
        r.shutdown()


def _have_rados() -> bool:
    try:
        import rados  # noqa: F401
    except ImportError:
        return False
    return True


class MicroCeph:
    """One micro cluster in ``workdir``. ``start()`` creates it; ``stop()`` kills it and removes ``workdir``.

    A ``MicroCeph(workdir)`` that was not started here can still ``stop()`` a cluster started by another
    process in the same directory (the pid files are the record)."""

    DAEMONS = ("mon", "osd")

    def __init__(self, workdir: str | os.PathLike[str], ip: str = "127.0.0.1", mon_port: int | None = None,
                 pool: str = "rbd", client_timeout: float = 5.0, start_timeout: float = 30.0,
                 cephx: bool = False) -> None:
        self.dir = Path(workdir).resolve()
        self.cephx = cephx
        self.ip = ip
        self.mon_port = mon_port
        self.pool = pool
        self.client_timeout = client_timeout
        self.start_timeout = start_timeout
        self.fsid = ""
        self._ports: PortReservation | None = None

    # --- paths ---------------------------------------------------------------------------------------
    @property
    def conf_path(self) -> str:
        return str(self.dir / "ceph.conf")

    @property
    def mon_address(self) -> str:
        return f"{self.ip}:{self.mon_port}"

    LAYOUT = frozenset({"ceph.conf", "monmap", "mon", "osd", "log", "run", "osd.journal", "keys"})

    def keyring(self, entity: str) -> str:
        """Where ``entity`` (e.g. ``client.admin``) finds its key with ``cephx``."""
        return str(self.dir / "keys" / f"ceph.{entity}.keyring")

    def add_user(self, entity: str, caps: list[str]) -> str:
        """``ceph auth get-or-create ENTITY CAPS...`` (``caps`` as the CLI takes them: ``["mon", "profile
        rbd", "osd", "profile rbd pool=rbd"]``) into its keyring; returns the keyring's path."""
        if not self.cephx:
            raise CephLabError("add_user needs a cluster started with cephx=True")
        out = self.keyring(entity)
        self._run(["ceph", "-c", self.conf_path, "--name", "client.admin", "auth", "get-or-create", entity, *caps,
                   "-o", out])
        os.chmod(out, 0o600)
        return out

    def _removable(self) -> bool:
        """True when ``workdir`` holds nothing but a micro cluster's files (never remove anything else)."""
        try:
            return set(os.listdir(self.dir)) <= self.LAYOUT
        except FileNotFoundError:
            return True

    def pid_file(self, daemon: str) -> Path:
        return self.dir / "run" / f"{daemon}.pid"

    def pid(self, daemon: str) -> int | None:
        """The daemon's pid from its pid file, if that process is alive and is ours."""
        try:
            pid = int(self.pid_file(daemon).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if proc.alive(pid) and self.conf_path in proc.cmdline(pid) else None

    # --- start ---------------------------------------------------------------------------------------
    def _run(self, argv: list[str]) -> None:
        log = self.dir / "log" / "commands.log"
        with open(log, "ab") as out:
            out.write(("$ " + " ".join(argv) + "\n").encode())
            out.flush()
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=self.start_timeout).returncode
        if rc != 0:
            raise CephLabError(f"{argv[0]} failed with exit {rc}; see {log}")

    def _daemon(self, daemon: str, argv: list[str]) -> None:
        self._run(argv + ["--pid-file", str(self.pid_file(daemon))])
        end = time.monotonic() + self.start_timeout
        while self.pid(daemon) is None:  # the pid file appears once the daemon has forked
            if time.monotonic() > end:
                raise CephLabError(f"ceph-{daemon} did not start; see {self.dir / 'log'}")
            time.sleep(0.01)

    def _python_step(self, step: str) -> None:
        if _have_rados():
            {"bootstrap": bootstrap, "ready": wait_writable}[step](self.conf_path, self.pool, self.start_timeout)
        else:  # e.g. run by an interpreter without Debian's bindings: do the step in /usr/bin/python3
            self._run([DEBIAN_PYTHON, __file__, f"_{step}", self.conf_path, self.pool, f"{self.start_timeout:g}"])

    def start(self) -> "MicroCeph":
        """Create and start the cluster; returns once ``pool`` accepts writes. Raises ``CephLabError`` (and
        leaves nothing running) when it cannot."""
        if shutil.which("ceph-mon") is None or shutil.which("ceph-osd") is None:
            raise CephLabError("ceph-mon/ceph-osd not installed (apt-get install ceph-mon ceph-osd)")
        if self.pid("mon") or self.pid("osd"):
            raise CephLabError(f"a cluster is already running in {self.dir}")
        if not self._removable():
            raise CephLabError(f"{self.dir} holds more than a micro Ceph cluster; refusing to remove it "
                               "(give a new or empty directory)")
        try:  # the host-wide port registry shared with lab.consul: clusters of both kinds never collide
            self._ports = PortReservation.allocate([self.ip] * (PORT_BLOCK // 4), str(self.dir), self.mon_port)
        except ClusterError as e:
            raise CephLabError(f"refusing to start: {e}") from None
        self.mon_port = self._ports.lo
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("mon", "osd", "log", "run") + (("keys",) if self.cephx else ()):
            (self.dir / sub).mkdir(parents=True)
        self.fsid = str(uuid.uuid4())
        conf = self.conf_path
        Path(conf).write_text(_conf_text(self.dir, self.fsid, self.ip, self.mon_port, self.client_timeout,
                                         self.cephx))
        monmap = str(self.dir / "monmap")
        try:
            self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                       f"[v2:{self.ip}:{self.mon_port},v1:{self.ip}:{self.mon_port + 1}]", monmap])
            mon_keyring = "/dev/null"
            if self.cephx:
                mon_keyring, admin = self.keyring("mon"), self.keyring("client.admin")
                self._run(["ceph-authtool", "--create-keyring", mon_keyring, "--gen-key", "-n", "mon.",
                           "--cap", "mon", "allow *"])
                self._run(["ceph-authtool", "--create-keyring", admin, "--gen-key", "-n", "client.admin",
                           "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])
                self._run(["ceph-authtool", mon_keyring, "--import-keyring", admin])
            self._run(["ceph-mon", "-c", conf, "--id", "a", "--mkfs", "--monmap", monmap, "--keyring", mon_keyring])
            self._daemon("mon", ["ceph-mon", "-c", conf, "--id", "a"])
            self._python_step("bootstrap")
            self._run(["ceph-osd", "-c", conf, "--id", "0", "--mkfs"] + (["--mkkey", "--no-mon-config"] if self.cephx else []))
            if self.cephx:
                self._run(["ceph", "-c", conf, "--name", "client.admin", "auth", "add", "osd.0", "osd", "allow *",
                           "mon", "allow profile osd", "-i", self.keyring("osd.0")])
            self._daemon("osd", ["ceph-osd", "-c", conf, "--id", "0"])
            self._python_step("ready")
        except BaseException:
            self.stop(purge=False)  # keep the logs for the error message's reader
            raise
        return self

    # --- stop, outage --------------------------------------------------------------------------------
    def _signal(self, sig: int) -> None:
        for d in self.DAEMONS:
            pid = self.pid(d)
            if pid is not None:
                proc.signal_checked(pid, sig, self.conf_path)

    def freeze(self) -> None:
        """SIGSTOP both daemons: clients see an unreachable cluster until ``thaw()``."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT both daemons: the cluster answers again with its data intact."""
        self._signal(signal.SIGCONT)

    def running(self) -> bool:
        return all(self.pid(d) is not None for d in self.DAEMONS)

    def stop(self, purge: bool = True) -> None:
        """Kill the daemons (by pid file, cmdline-checked) and, with ``purge``, remove the directory.
        Idempotent. memstore data does not survive this: the cluster is gone."""
        for d in self.DAEMONS:
            pid = self.pid(d)
            if pid is not None:
                proc.kill(pid, self.conf_path)
        if purge and self.dir.exists() and self._removable():
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._ports is not None:
            self._ports.release()
            self._ports = None

    def __enter__(self) -> "MicroCeph":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --- command line ------------------------------------------------------------------------------------

def _cmd_start(a: argparse.Namespace) -> int:
    ceph = MicroCeph(a.dir, ip=a.ip, mon_port=a.mon_port, pool=a.pool, cephx=a.cephx)
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    try:
        ceph.start()
    except CephLabError as e:
        print(f"micro-ceph: {e}", file=sys.stderr)
        return 1
    print(f"micro-ceph: started in {time.monotonic() - t0:.2f}s; mon {ceph.mon_address}; "
          f"pool {ceph.pool}; CEPH_CONF={ceph.conf_path}", file=sys.stderr, flush=True)
    print(ceph.conf_path, flush=True)
    owner = ceph.dir / "run" / "owner.pid"
    owner.write_text(f"{os.getpid()}\n")
    try:
        while not done.wait(0.5):
            if not ceph.running():
                print("micro-ceph: a daemon died; stopping", file=sys.stderr)
                return 1
    finally:
        ceph.stop()
    return 0


def _cmd_stop(a: argparse.Namespace) -> int:
    ceph = MicroCeph(a.dir)
    try:  # a foreground `start` owns the cluster: let it stop and purge
        owner = int((ceph.dir / "run" / "owner.pid").read_text())
    except (OSError, ValueError):
        owner = 0
    if owner and owner != os.getpid() and not a.keep:
        proc.stop(owner, "lab.ceph", grace=10.0)
    ceph.stop(purge=not a.keep)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["_bootstrap"], ["_ready"]):  # internal: a step run under /usr/bin/python3
        step, conf, pool, timeout = argv[0], argv[1], argv[2], float(argv[3])
        (bootstrap if step == "_bootstrap" else wait_writable)(conf, pool, timeout)
        return 0
    p = argparse.ArgumentParser(prog="micro-ceph", description="a disposable one-mon one-OSD Ceph cluster")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a cluster in DIR and stay in the foreground until SIGTERM")
    s.add_argument("dir")
    s.add_argument("--ip", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--mon-port", type=int, default=None, help="monitor v2 port (default: a free block)")
    s.add_argument("--pool", default="rbd")
    s.add_argument("--cephx", action="store_true", help="require cephx (keyrings under DIR/keys)")
    s.set_defaults(func=_cmd_start)
    t = sub.add_parser("stop", help="stop the cluster running in DIR (by its pid files) and remove DIR")
    t.add_argument("dir")
    t.add_argument("--keep", action="store_true", help="keep DIR (logs) after stopping")
    t.set_defaults(func=_cmd_stop)
    a = p.parse_args(argv)
    rc: int = a.func(a)
    return rc


if __name__ == "__main__":
    sys.exit(main())
