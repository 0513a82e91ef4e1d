"""The LIO test guest's control daemon (standard library only), started by the guest's PID 1
(scripts/lab/guest-init.sh) with the project venv's python from the 9p share of the checkout.

It talks to the host (``lab.guest.Guest``) over the virtio-serial port ``pathagent.ctl``, so control works
whatever the guest's network does. Protocol: JSON lines. Each request is ``{"id": N, "op": OP, ...}`` and
is handled in a thread of its own; each response carries the request's id: ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": {"type", "message", "attrs", "traceback"}}``, so a
blocked call does not hold up the others.

Ops:
  ping                                          -> {"pid", "uptime"}
  exec      argv, env?, cwd?, stdin?, timeout?  -> {"rc", "stdout", "stderr", "timed_out"}
  spawn     argv, env?, cwd?, log?              -> {"pid"} (background, own session, output to log)
  wait      pid, timeout?                       -> {"rc"} (None while it runs; spawned processes only)
  signal    pid, sig (number or name), group?   -> null
  read_file path                                -> {"data": base64}
  write_file path, data (base64), mode?, append?, mkdir? -> null
  call      fn ("pkg.module:function" or "module:Class.method"), args, kwargs -> the JSON result
  poweroff                                      -> null, then the daemon exits (PID 1 powers off)

``env`` entries are added to the daemon's environment (a value of null removes the variable). ``call``
imports modules in this process, with the checkout and its ``scripts/`` on sys.path, so a module can keep
objects alive between calls; a raised exception comes back as its qualified class name, message and
JSON-able attributes (``retry_after`` ...).
"""
from __future__ import annotations

import argparse
import base64
import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

PORT_NAME = "pathagent.ctl"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Running as a script put scripts/lab first on sys.path, where lab's consul.py would shadow py-consul.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
for _p in (os.path.join(REPO, "scripts"), REPO):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def log(msg: str) -> None:
    sys.stderr.write(f"guestd {time.monotonic():.3f}: {msg}\n")
    sys.stderr.flush()


def find_port(timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while True:
        link = f"/dev/virtio-ports/{PORT_NAME}"
        if os.path.exists(link):
            return link
        for d in glob.glob("/sys/class/virtio-ports/vport*"):
            try:
                with open(os.path.join(d, "name")) as f:
                    if f.read().strip() == PORT_NAME and os.path.exists(f"/dev/{os.path.basename(d)}"):
                        return f"/dev/{os.path.basename(d)}"
            except OSError:
                pass
        if time.monotonic() > end:
            raise RuntimeError(f"no virtio-serial port named {PORT_NAME}")
        time.sleep(0.05)


class Daemon:
    def __init__(self, port: str) -> None:
        self.fd = os.open(port, os.O_RDWR)
        self.wlock = threading.Lock()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.rcs: dict[int, int] = {}
        self.plock = threading.Lock()
        self.stopping = threading.Event()
        self.ops: dict[str, Callable[[dict[str, Any]], Any]] = {
            "ping": self.op_ping, "exec": self.op_exec, "spawn": self.op_spawn, "wait": self.op_wait,
            "signal": self.op_signal, "read_file": self.op_read_file, "write_file": self.op_write_file,
            "call": self.op_call, "poweroff": self.op_poweroff,
        }

    # transport
    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, default=repr) + "\n").encode()
        with self.wlock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def serve(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except InterruptedError:
                continue
            if not chunk:          # the host end is not connected (yet, or any more)
                buf = b""
                time.sleep(0.1)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    threading.Thread(target=self.handle, args=(line,), daemon=True).start()

    def handle(self, line: bytes) -> None:
        rid: Any = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            op = self.ops.get(req.get("op", ""))
            if op is None:
                raise ValueError(f"unknown op {req.get('op')!r}")
            resp: dict[str, Any] = {"id": rid, "ok": True, "result": op(req)}
            try:
                json.dumps(resp)
            except (TypeError, ValueError) as e:
                raise TypeError(f"result is not JSON serialisable: {e}") from e
        except BaseException as e:  # noqa: B036 - everything goes back to the host
            resp = {"id": rid, "ok": False, "error": error_object(e)}
        self.send(resp)
        if self.stopping.is_set():
            log("poweroff requested")
            time.sleep(0.5)          # let qemu pass the answer on before PID 1 powers off
            os._exit(0)

    # ops
    def op_ping(self, req: dict[str, Any]) -> Any:
        with open("/proc/uptime") as f:
            return {"pid": os.getpid(), "uptime": float(f.read().split()[0])}

    @staticmethod
    def _env(extra: dict[str, str | None] | None) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def op_exec(self, req: dict[str, Any]) -> Any:
        stdin = req.get("stdin")
        p = subprocess.Popen(req["argv"], stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env(req.get("env")),
                             cwd=req.get("cwd"), start_new_session=True)
        timed_out = False
        try:
            out, err = p.communicate(stdin.encode() if stdin is not None else None, timeout=req.get("timeout"))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = p.communicate()
        return {"rc": p.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
                "timed_out": timed_out}

    def op_spawn(self, req: dict[str, Any]) -> Any:
        logpath = req.get("log") or "/dev/null"
        if logpath != "/dev/null":
            os.makedirs(os.path.dirname(logpath) or ".", exist_ok=True)
        with open(logpath, "ab") as out:
            p = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=self._env(req.get("env")), cwd=req.get("cwd"), start_new_session=True)
        with self.plock:
            self.procs[p.pid] = p
        threading.Thread(target=self._reap, args=(p,), daemon=True).start()
        return {"pid": p.pid}

    def _reap(self, p: subprocess.Popen[bytes]) -> None:
        rc = p.wait()
        with self.plock:
            self.rcs[p.pid] = rc

    def op_wait(self, req: dict[str, Any]) -> Any:
        pid = int(req["pid"])
        with self.plock:
            p = self.procs.get(pid)
        if p is None:
            raise ProcessLookupError(f"pid {pid} was not spawned by guestd")
        try:
            return {"rc": p.wait(timeout=req.get("timeout"))}
        except subprocess.TimeoutExpired:
            return {"rc": None}

    def op_signal(self, req: dict[str, Any]) -> Any:
        sig = req.get("sig", "SIGTERM")
        signum = int(sig) if isinstance(sig, int) or str(sig).isdigit() else int(getattr(signal, str(sig)))
        if req.get("group"):
            os.killpg(int(req["pid"]), signum)
        else:
            os.kill(int(req["pid"]), signum)
        return None

    def op_read_file(self, req: dict[str, Any]) -> Any:
        with open(req["path"], "rb") as f:
            return {"data": base64.b64encode(f.read()).decode()}

    def op_write_file(self, req: dict[str, Any]) -> Any:
        path = req["path"]
        if req.get("mkdir"):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "ab" if req.get("append") else "wb") as f:
            f.write(base64.b64decode(req.get("data", "")))
        if req.get("mode") is not None:
            os.chmod(path, int(req["mode"]))
        return None

    def op_call(self, req: dict[str, Any]) -> Any:
        modname, _, attr = str(req["fn"]).partition(":")
        if not modname or not attr:
            raise ValueError(f"fn must be 'module:function', not {req['fn']!r}")
        obj: Any = importlib.import_module(modname)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj(*req.get("args", []), **req.get("kwargs", {}))

    def op_poweroff(self, req: dict[str, Any]) -> Any:
        self.stopping.set()          # handle() exits the process once the answer is sent
        return None


def error_object(e: BaseException) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for k, v in vars(e).items() if hasattr(e, "__dict__") else ():
        if k.startswith("_"):
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = repr(v)
        attrs[k] = v
    for k in ("errno", "strerror", "filename"):  # OSError's are slots, not in vars()
        v = getattr(e, k, None)
        if v is not None and k not in attrs:
            attrs[k] = v if isinstance(v, (int, str)) else repr(v)
    t = type(e)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return {"type": name, "message": str(e), "attrs": attrs,
            "traceback": "".join(traceback.format_exception(t, e, e.__traceback__))[-4000:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ready", help="file to create once the port is open")
    a = ap.parse_args()
    port = find_port()
    d = Daemon(port)
    log(f"serving on {port}")
    if a.ready:
        with open(a.ready, "w") as f:
            f.write(f"{os.getpid()}\n")
    d.serve()


if __name__ == "__main__":
    main()
