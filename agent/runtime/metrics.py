"""Prometheus text metrics on ``[metrics] listen`` (``GET /metrics``); off when it is empty.

Read-only: it renders the last cycle's frozen report and never calls Consul, Ceph or a plugin.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

log = logging.getLogger(__name__)

HELP = {
    "pathagent_up": "1 while the agent runs",
    "pathagent_session_valid": "1 while the agent holds a Consul session",
    "pathagent_fenced": "1 while the agent is fenced (no session confirmation for fence_after)",
    "pathagent_lease_left_seconds": "seconds until the fencing deadline (negative: passed; -1: no session)",
    "pathagent_paths_held": "path locks held by this node's session",
    "pathagent_paths_exported": "paths the target backend exports on this node",
    "pathagent_addresses_up": "floating path IPs the network backend has up on this node",
    "pathagent_paths_total": "path keys of started disks",
    "pathagent_paths_free": "path keys nobody holds",
    "pathagent_nodes_live": "agents with a locked node record",
    "pathagent_disks_started": "started disks",
    "pathagent_disks_invalid": "started disks whose definition cannot be read or is invalid",
    "pathagent_paths_backing_off": "paths this node backs off from after failures",
    "pathagent_target_state_known": "0 while the target backend cannot say what it serves",
    "pathagent_fence_events_total": "times this agent fenced itself (addresses down, data path stopped)",
    "pathagent_takeovers_total": "paths this agent acquired",
    "pathagent_cycles_total": "loop cycles since start",
}


def render(values: Mapping[str, float]) -> str:
    out = []
    for name, value in values.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        out.append(f"# HELP {name} {HELP.get(name, name)}\n# TYPE {name} {kind}\n{name} {value:g}\n")
    return "".join(out)


class MetricsServer:
    """Serves ``render(source())`` on ``host:port`` from a daemon thread."""

    def __init__(self, listen: str, source: Callable[[], Mapping[str, float]]) -> None:
        host, port = listen.rsplit(":", 1)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = render(source()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
