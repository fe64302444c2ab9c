"""The gateway as a plain ASGI application.

``POST /webhooks/chargify`` checks, in this order, what can be checked cheapest and
before reading more than needed: method and path, content type, declared length, the
body (read up to the limit), the signature over the raw bytes, and the few fields the
record needs. Only then is the body published, byte for byte; 200 means the broker has
it. Every refusal is counted by reason and logged without secrets or bodies.

=========================  ======  ==========================================
outcome                    status  Chargify's reaction
=========================  ======  ==========================================
published                  200     done
bad/missing signature      401     retries (then gives up: an operator fixes keys)
body over the limit        413     retries
not a form                 415     retries
undecodable / no id/event  400     retries
broker down or slow        503     retries: nothing acknowledged is lost
=========================  ======  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs

from ingest.framing import FramingError, frame
from ingest.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ingest.metrics import GatewayMetrics
from ingest.publisher import Headers, PublishError
from ingest.signature import verify
from schemas import headers as h

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WEBHOOK_PATH = "/webhooks/chargify"
SIGNATURE_HEADER = b"x-chargify-webhook-signature-hmac-sha-256"
SIGNATURE_PARAM = "signature_hmac_sha_256"
FORM_TYPE = b"application/x-www-form-urlencoded"


class Sink(Protocol):
    """What the app publishes through (a :class:`~ingest.publisher.Publisher`)."""

    async def publish(self, topic: str, key: bytes, value: bytes, headers: Headers) -> None: ...

    def ping(self, topic: str, timeout: float = 2.0) -> bool: ...


class _Reject(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class GatewayApp:
    """ASGI app; ``publisher`` is any :class:`Sink`, so tests may hand in another."""

    def __init__(
        self,
        *,
        publisher: Sink,
        topic: str,
        shared_keys: tuple[bytes, ...],
        max_body_bytes: int,
        allow_unsigned: bool = False,
        metrics: GatewayMetrics | None = None,
        on_startup: Callable[[], None] | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.topic = topic
        self.shared_keys = shared_keys
        self.max_body_bytes = max_body_bytes
        self.allow_unsigned = allow_unsigned
        self.metrics = metrics or GatewayMetrics()
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]
        if path == WEBHOOK_PATH:
            if method != "POST":
                await _respond(send, 405, b"method not allowed\n", [(b"allow", b"POST")])
                return
            await self._webhook(scope, receive, send)
        elif path in ("/healthz", "/readyz", "/metrics"):
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET")])
            elif path == "/healthz":
                await _respond(send, 200, b"ok\n")
            elif path == "/readyz":
                ok = await asyncio.to_thread(self.publisher.ping, self.topic)
                await _respond(
                    send, 200 if ok else 503, b"ready\n" if ok else b"broker unreachable\n"
                )
            else:
                body = self.metrics.render()
                await _respond(send, 200, body, [(b"content-type", METRICS_CONTENT_TYPE.encode())])
        else:
            await _respond(send, 404, b"not found\n")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._on_startup is not None:
                    self._on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown is not None:
                    self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        metrics.in_flight.inc()
        try:
            status = await self._handle(scope, receive)
        except _Reject as rej:
            metrics.rejects.labels(rej.reason).inc()
            log.warning("rejected webhook: %s (%s)", rej.reason, rej.detail)
            status = rej.status
            await _respond(send, status, rej.detail.encode() + b"\n")
        else:
            await _respond(send, status, b"ok\n")
        finally:
            metrics.in_flight.dec()
        metrics.requests.labels(str(status)).inc()

    async def _handle(self, scope: Scope, receive: Receive) -> int:
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"")
        if ctype.split(b";", 1)[0].strip().lower() != FORM_TYPE:
            raise _Reject(415, "content_type", "expected application/x-www-form-urlencoded")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
        body = await self._read_body(receive)

        provided = headers.get(SIGNATURE_HEADER)
        if provided is None and scope.get("query_string"):
            values = parse_qs(scope["query_string"].decode("latin-1")).get(SIGNATURE_PARAM)
            provided = values[0].encode("latin-1") if values else None
        if not verify(self.shared_keys, body, provided):
            if not self.allow_unsigned:
                raise _Reject(401, "bad_signature" if provided else "no_signature", "bad signature")
            log.warning("accepting a webhook WITHOUT a valid signature (GATEWAY_ALLOW_UNSIGNED)")

        try:
            fr = frame(body)
        except FramingError as exc:
            raise _Reject(400, "malformed", str(exc)) from None

        client = scope.get("client")
        record_headers: list[tuple[str, bytes]] = [
            (h.WEBHOOK_ID, fr.webhook_id.encode()),
            (h.EVENT, fr.event.encode()),
            (h.RECEIVED_AT, _now_rfc3339().encode()),
            (h.CONTENT_TYPE, ctype),
            (h.SOURCE_IP, (client[0] if client else "").encode()),
        ]
        started = time.perf_counter()
        try:
            await self.publisher.publish(self.topic, fr.key, body, record_headers)
        except PublishError as exc:
            raise _Reject(503, "broker_unavailable", f"not stored, retry later: {exc}") from None
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.published.labels(fr.event).inc()
        log.debug("published webhook %s (%s)", fr.webhook_id, fr.event)
        return 200

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "disconnected", "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                # Stop reading here: the rest of an oversized body is never buffered.
                raise _Reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _respond(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if not extra or all(k != b"content-type" for k, _ in extra):
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    headers.extend(extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
