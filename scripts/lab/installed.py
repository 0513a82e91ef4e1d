"""A clean Debian 12 root with iscsi-path-agent installed by ``scripts/install``, and a lab gateway that runs
the *installed* agent (for ``tests/install``).

``DebianRoot(path, cache)``:

- ``create()`` unpacks a pristine Debian 12 (bookworm) root into ``path``: ``debootstrap --variant=minbase``
  plus ``systemd`` (a gateway host has systemctl; the install enables units offline in the chroot),
  built once and kept as a tarball in ``cache`` (``bookworm-base.tar``), so a second run only unpacks it.
  The mirror is the host's own apt source (``/etc/apt/sources.list.d/*.sources`` or ``sources.list``).
- ``mount()`` binds ``/proc``, ``/sys``, ``/dev`` (recursively: ``/dev/shm``, ``/dev/pts``) and the cached
  ``apt-archives`` and ``pip`` directories of ``cache`` into it (downloads are paid once); ``bind(src, dst)``
  binds more (read-only on request), each at the same path inside as outside unless told otherwise.
- ``run(argv)`` runs a command in it (``chroot``), optionally inside a network namespace
  (``ip netns exec NS chroot ROOT ...``: the namespace is entered first, so the chrooted process has the
  gateway's network and the root's files).
- ``close()`` stops what still runs with its root in ``path`` (by pid, checked through ``/proc/PID/root``),
  unmounts everything under ``path`` and removes it, refusing to remove anything while a mount is left
  under it (a bind of ``/dev`` or of the checkout must never be deleted through).

``root_missing()`` says why such a root cannot be built here (not root, no debootstrap or chroot, the
mirror unreachable), or None.

``InstalledGateway`` is a lab gateway (``lab.iscsilab.Gateway``) whose agent is the one installed in the
root: ``ip netns exec NS chroot ROOT /usr/local/bin/pathagent --config CFG run``; ``InstalledLab`` is an
``IscsiLab`` whose gateways are ``InstalledGateway``s, with the lab directory (Ceph conf, state dirs,
configs) bound into the root at the same path, so every path in the agents' configs means the same inside
and outside.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lab import proc
from lab.iscsilab import REPO, Gateway, IscsiLab

SUITE = "bookworm"
BASE_TAR = "bookworm-base.tar"
#: what a gateway host has besides minbase: systemctl (units are enabled offline in the chroot)
BASE_INCLUDE = ("systemd",)
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
       "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}


def cache_dir() -> Path:
    """Where the base tarball and the downloads are kept: ``$PATHAGENT_INSTALL_CACHE`` or
    ``.cache/install`` in the checkout."""
    return Path(os.environ.get("PATHAGENT_INSTALL_CACHE") or REPO / ".cache" / "install")


def host_mirror() -> str:
    """The Debian mirror of the host's apt sources (the first ``URIs:`` / ``deb`` line for the main archive)."""
    texts: list[str] = []
    d = Path("/etc/apt/sources.list.d")
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        texts.append(f.read_text(errors="replace"))
    for m in re.finditer(r"^URIs:\s*(\S+)", "\n".join(texts), re.M):
        if "security" not in m.group(1):
            return m.group(1)
    try:
        lines = Path("/etc/apt/sources.list").read_text(errors="replace")
    except OSError:
        lines = ""
    for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", lines, re.M):
        if "security" not in m.group(1):
            return m.group(1)
    raise RuntimeError("no Debian mirror in the host's apt sources")


def mirror_reachable(mirror: str, timeout: float = 10) -> str | None:
    """None when ``mirror`` serves bookworm's Release file, else why not."""
    try:
        with urllib.request.urlopen(f"{mirror.rstrip('/')}/dists/{SUITE}/Release", timeout=timeout) as r:
            r.read(64)
        return None
    except (urllib.error.URLError, OSError) as e:
        return f"the Debian mirror {mirror} is unreachable ({e})"


def root_missing(cache: Path | None = None) -> str | None:
    """Why a clean Debian 12 root cannot be had here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, bind mounts)"
    for tool in ("debootstrap", "chroot", "mount", "umount", "tar"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (scripts/setup installs debootstrap)"
    base = (cache or cache_dir()) / BASE_TAR
    try:
        mirror = host_mirror()
    except (RuntimeError, OSError) as e:
        return str(e) if not base.exists() else None
    # the install step needs the mirror too (apt-get install), cached tarball or not
    return mirror_reachable(mirror)


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or under ``path`` (from /proc/self/mountinfo), deepest first."""
    p = str(path.resolve())
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == p or mp.startswith(p + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda m: (-m.count("/"), m))


def _sh(argv: Sequence[str], timeout: float = 600, check: bool = True,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=dict(env) if env else None)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def build_base(cache: Path, log: Path | None = None) -> tuple[Path, float]:
    """The base tarball, built with debootstrap unless cached; (path, seconds spent building: 0 if cached).
    Built under a lock in ``cache`` so that two runs never build it at once."""
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / BASE_TAR
    with open(cache / "base.lock", "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if tar.exists():
            return tar, 0.0
        t0 = time.monotonic()
        work = cache / "base.build"
        if work.exists():
            _remove_tree(work)
        work.mkdir()
        mirror = host_mirror()
        debs = cache / "debootstrap-debs"        # the .debs: a rebuilt base downloads nothing again
        debs.mkdir(exist_ok=True)
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_INCLUDE)}",
                            f"--cache-dir={debs}", SUITE, str(work), mirror],
                           capture_output=True, text=True, timeout=1800, env=dict(os.environ, **ENV))
        if log is not None:
            log.write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            _remove_tree(work)
            raise RuntimeError(f"debootstrap failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        for f in (work / "var/cache/apt").glob("*.bin"):     # apt's caches: rebuilt by the first apt run
            f.unlink()
        tmp = cache / (BASE_TAR + ".tmp")
        _sh(["tar", "-C", str(work), "--numeric-owner", "-cf", str(tmp), "."], timeout=600)
        os.replace(tmp, tar)
        _remove_tree(work)
        return tar, time.monotonic() - t0


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, refused while anything is mounted under it."""
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to remove {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=False)


class DebianRoot:
    """See the module docstring."""

    def __init__(self, path: str | os.PathLike[str], cache: Path | None = None) -> None:
        self.path = Path(path).resolve()
        self.cache = cache or cache_dir()
        self.build_seconds = 0.0
        self.unpack_seconds = 0.0
        self._mounted: list[str] = []
        self.env = dict(ENV)

    def inside(self, p: str | os.PathLike[str]) -> Path:
        """``p`` (absolute, as seen inside the root) on the host."""
        return self.path / str(p).lstrip("/")

    def create(self) -> "DebianRoot":
        tar, self.build_seconds = build_base(self.cache, self.cache / "debootstrap.log")
        t0 = time.monotonic()
        self.path.mkdir(parents=True, exist_ok=False)
        _sh(["tar", "-C", str(self.path), "--numeric-owner", "-xf", str(tar)], timeout=600)
        if os.path.exists("/etc/resolv.conf"):              # name resolution for apt and pip inside
            shutil.copyfile("/etc/resolv.conf", self.inside("/etc/resolv.conf"))
        self.unpack_seconds = time.monotonic() - t0
        return self

    def _mount(self, argv: Sequence[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        _sh(["mount", *argv, str(target)], timeout=30)
        self._mounted.append(str(target))

    def mount(self) -> "DebianRoot":
        self._mount(["-t", "proc", "proc"], self.inside("/proc"))
        self._mount(["--rbind", "/sys"], self.inside("/sys"))
        _sh(["mount", "--make-rslave", str(self.inside("/sys"))])
        self._mount(["--rbind", "/dev"], self.inside("/dev"))
        _sh(["mount", "--make-rslave", str(self.inside("/dev"))])
        for sub, inside in (("apt-archives", "/var/cache/apt/archives"), ("pip", "/root/.cache/pip")):
            src = self.cache / sub
            src.mkdir(parents=True, exist_ok=True)
            self.bind(src, inside)
        # the network this host reaches PyPI through may need its own CA (a TLS-inspecting proxy): that is
        # the site's setup, not the install's, so it is handed to pip as a site would, in its environment
        ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
        if ca and os.path.isfile(ca):
            self.inside("/etc/ssl").mkdir(exist_ok=True)
            shutil.copyfile(ca, self.inside("/etc/ssl/host-ca.pem"))
            self.env["PIP_CERT"] = "/etc/ssl/host-ca.pem"
        if os.environ.get("PIP_DEFAULT_TIMEOUT"):
            self.env["PIP_DEFAULT_TIMEOUT"] = os.environ["PIP_DEFAULT_TIMEOUT"]
        # unpacking packages is what takes time in a chroot; this root is thrown away afterwards
        self.inside("/etc/apt/apt.conf.d/99pathagent-test").write_text(
            'Dpkg::Options { "--force-unsafe-io"; };\nAcquire::Retries "3";\n')
        return self

    def bind(self, src: str | os.PathLike[str], inside: str | os.PathLike[str] | None = None,
             ro: bool = False) -> Path:
        target = self.inside(inside if inside is not None else src)
        self._mount(["--bind", str(src)], target)
        if ro:
            _sh(["mount", "-o", "remount,bind,ro", str(target)])
        return target

    def argv(self, argv: Sequence[str], netns: str | None = None) -> list[str]:
        inner = ["chroot", str(self.path), *argv]
        return ["ip", "netns", "exec", netns, *inner] if netns else inner

    def run(self, argv: Sequence[str], timeout: float = 600, netns: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        e = dict(self.env, **(env or {}))
        r = subprocess.run(self.argv(argv, netns), capture_output=True, text=True, timeout=timeout, env=e)
        if check and r.returncode != 0:
            raise AssertionError(f"in the root: {' '.join(argv)} exited {r.returncode}:\n"
                                 f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r

    def processes(self) -> list[int]:
        """Pids of the processes whose root directory is this root."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{d}/root") == str(self.path):
                    out.append(int(d))
            except OSError:
                continue
        return out

    def stop_processes(self, grace: float = 3.0) -> list[int]:
        """SIGTERM, then SIGKILL, every process still running with its root here; returns their pids."""
        pids = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    if os.readlink(f"/proc/{pid}/root") == str(self.path):
                        os.kill(pid, sig)
                except OSError:
                    pass
            end = time.monotonic() + grace
            while time.monotonic() < end and any(proc.alive(p) for p in pids):
                time.sleep(0.05)
        return pids

    def unmount(self) -> None:
        for mp in _mounts_under(self.path):
            r = _sh(["umount", "-R", mp], check=False)
            if r.returncode != 0 and mp in _mounts_under(self.path):
                _sh(["umount", "-l", mp], check=False)
        self._mounted.clear()

    def close(self) -> None:
        if not self.path.exists():
            return
        self.stop_processes()
        self.unmount()
        _remove_tree(self.path)

    def __enter__(self) -> "DebianRoot":
        return self.create().mount()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- scripts/install in the root, and the installed agent as a lab gateway ---------------------------------

SRC = "/src/iscsi-path-agent"           # where the tests bind the checkout (read-only) inside the root
AGENT = "/usr/local/bin/pathagent"      # what scripts/install puts on PATH


@dataclass
class Installed:
    """A root that ``scripts/install`` ran in: its first run's output and the seconds each step took."""

    root: DebianRoot
    first: subprocess.CompletedProcess[str]
    seconds: dict[str, float] = field(default_factory=dict)

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``scripts/install ARGS`` run again in the root (from the bound checkout)."""
        return self.root.run([f"{SRC}/scripts/install", *args], timeout=1200)


class InstalledGateway(Gateway):
    """A gateway whose agent and CLI are the ones installed in ``root``."""

    root: DebianRoot

    @property
    def metrics_listen(self) -> str:
        """The agent's ``[metrics] listen`` (``InstalledLab`` makes sure there is one)."""
        with open(self.config, "rb") as f:
            return str(tomllib.load(f)["metrics"]["listen"])

    def start(self) -> None:
        self.p = proc.spawn(self.root.argv([AGENT, "--config", str(self.config), "run"], self.ns), str(self.log),
                            env=dict(self.root.env))

    def signal(self, sig: int) -> None:
        if self.p is not None:
            proc.signal_checked(self.p.pid, sig, AGENT)

    def cli(self, *args: str, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
        return self.root.run([AGENT, "--config", str(self.config), *args], timeout=timeout, netns=self.ns)


class InstalledLab(IscsiLab):
    """An ``IscsiLab`` whose gateways run the agent installed in ``root`` (the lab directory is bound into
    the root at the same path before the agents start). Every agent serves metrics: on ``127.0.0.1:9120``
    in its namespace unless the lab's config already has a ``[metrics]`` table."""

    def __init__(self, workdir: str | os.PathLike[str], root: DebianRoot, gateways: Iterable[str] = ("gwa",),
                 **kw: Any) -> None:
        super().__init__(workdir, gateways=gateways, **kw)
        self.root = root

    def _start(self, agents: bool) -> None:
        super()._start(agents=False)
        self.root.bind(self.dir)
        for name, g in list(self.gw.items()):
            with open(g.config, "rb") as f:
                if "metrics" not in tomllib.load(f):
                    with open(g.config, "a", encoding="utf-8") as out:
                        out.write('\n[metrics]\nlisten = "127.0.0.1:9120"\n')
            ig = InstalledGateway(g.name, g.ns, g.ip, g.dir, g.config, env=dict(ENV))
            ig.root = self.root
            self.gw[name] = ig
        if agents:
            self.start_agents()
