"""The sink's HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Served from a daemon thread on ``METRICS_HOST:SINK_METRICS_PORT``. ``/healthz`` answers 200
while the process runs (a liveness probe); ``/readyz`` answers 200 once the sink consumes
and no step is waiting on a transient fault (database or broker away), else 503 with the
reason, so an orchestrator or the console sees a sink that is up but stuck.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["serve_health"]


def serve_health(
    host: str, port: int, registry: CollectorRegistry, readiness: Callable[[], str | None]
) -> ThreadingHTTPServer:
    """Start serving; ``readiness()`` returns ``None`` when ready, else why not."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            elif path == "/readyz":
                why = readiness()
                if why is None:
                    self._send(200, "text/plain", b"ready\n")
                else:
                    self._send(503, "text/plain", f"not ready: {why}\n".encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds: not worth a log line each

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sink-http", daemon=True).start()
    return server
