"""``chargify-stream console``: the operators' web page, served by uvicorn.

Routes: ``/`` (the page), ``/api/summary`` (the same figures as JSON, for scripts),
``/trace?webhook_id=N`` (one webhook's trace; the page's search box), ``/api/trace/N``
(JSON; 404 for an unknown webhook), ``/healthz``. A plain ASGI app: nothing to build, no
script in the page. It listens on ``CONSOLE_HOST:CONSOLE_PORT`` (loopback by default: it
shows customer keys and amounts, and has no login).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from chargify_stream.base.settings import Settings
from chargify_stream.console.page import render_summary, render_trace
from chargify_stream.console.summary import gather
from chargify_stream.trace import WebhookNotFound, build_trace, plain, render_text

__all__ = ["ConsoleApp", "run"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HTML = "text/html; charset=utf-8"
JSON = "application/json"


class ConsoleApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await receive()  # startup: nothing to open, each request connects on its own
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, "text/plain", b"method not allowed")
        elif path == "/":
            summary = await asyncio.to_thread(gather, self.settings)
            await _respond(send, 200, HTML, render_summary(summary).encode())
        elif path == "/api/summary":
            summary = await asyncio.to_thread(gather, self.settings)
            await _respond(send, 200, JSON, _json(summary))
        elif path == "/trace":
            webhook_id = (query.get("webhook_id") or [""])[0].strip()
            status, body = await asyncio.to_thread(self._trace_page, webhook_id)
            await _respond(send, status, HTML, body.encode())
        elif path.startswith("/api/trace/"):
            status, trace = await asyncio.to_thread(self._trace, path.rsplit("/", 1)[1])
            await _respond(send, status, JSON, _json(trace))
        elif path == "/healthz":
            await _respond(send, 200, "text/plain", b"ok")
        else:
            await _respond(send, 404, "text/plain", b"not found")

    def _trace(self, webhook_id: str) -> tuple[int, dict[str, Any]]:
        if not webhook_id.isdigit():
            return 400, {"error": f"{webhook_id!r} is not a webhook id (a number)"}
        try:
            return 200, build_trace(self.settings, int(webhook_id))
        except WebhookNotFound as exc:
            return 404, {"error": str(exc)}

    def _trace_page(self, webhook_id: str) -> tuple[int, str]:
        status, trace = self._trace(webhook_id)
        if status != 200:
            return status, render_trace(webhook_id, trace["error"], None)
        return 200, render_trace(webhook_id, render_text(trace), trace)


def _json(value: Any) -> bytes:
    return json.dumps(value, default=plain, indent=2).encode()


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def run(settings: Settings) -> int:
    """Serve the console until interrupted."""
    log.info("console on http://%s:%d/", settings.console_host, settings.console_port)
    uvicorn.run(
        ConsoleApp(settings),
        host=settings.console_host,
        port=settings.console_port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return 0
