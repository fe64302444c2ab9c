"""The gateway as a plain ASGI application.

``POST /webhooks/chargify`` checks, in this order, what can be checked cheapest and
before reading more than needed: method and path, content type, declared length, that
a signature is there at all, room for the body among the requests in flight, the body
(read up to the limit, never further), the signature over the raw bytes, and the few
fields the record needs. Only then is the body published, byte for byte; 200 means the
broker acknowledged it. Every refusal is counted by reason and logged without secrets
or bodies, in one line; no input, and no bug, escapes as an unanswered request. What
the connection does with the rest of a body answered early is ``ingest/connection.py``'s.

=========================  ======  ==========================================
outcome                    status  Chargify's reaction
=========================  ======  ==========================================
published                  200     done
bad/missing signature      401     retries (then gives up: an operator fixes keys)
body over the limit        413     retries
not a form                 415     retries
undecodable / no id/event  400     retries
too much in flight         503     retries (``Retry-After``): nothing was read
broker down or slow        503     retries: nothing acknowledged is lost
a bug in the gateway       500     retries
=========================  ======  ==========================================

``event=test`` (Chargify's endpoint test) is published like any webhook: DESIGN.md keeps
it on the raw topic and the processor ignores it. The 2010-style test body has no id, so
its record has no key and no ``chargify-webhook-id`` header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs

from chargify_stream.ingest.budget import ByteBudget, Lease
from chargify_stream.ingest.framing import FramingError, frame
from chargify_stream.ingest.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from chargify_stream.ingest.metrics import GatewayMetrics
from chargify_stream.ingest.publisher import Headers, PublishError
from chargify_stream.ingest.signature import verify
from chargify_stream.schemas import headers as h

__all__ = ["WEBHOOK_PATH", "GatewayApp", "Sink"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

WEBHOOK_PATH = "/webhooks/chargify"
SIGNATURE_HEADER = b"x-chargify-webhook-signature-hmac-sha-256"
SIGNATURE_PARAM = "signature_hmac_sha_256"
FORM_TYPE = b"application/x-www-form-urlencoded"

_TEXT = (b"content-type", b"text/plain; charset=utf-8")
# Seconds a client is asked to wait after a 503 (Chargify retries on its own schedule).
RETRY_AFTER_S = 5


class Sink(Protocol):
    """Where the app publishes (a :class:`~ingest.publisher.Publisher`, or a test double)."""

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> None: ...

    async def ready(self, topic: str) -> bool: ...


class _Reject(Exception):
    """A webhook refused with ``status``; ``reason`` is its metrics label.

    ``detail`` is the answer's text; ``cause`` (an internal error, such as the broker's)
    is only logged, never answered.
    """

    def __init__(self, status: int, reason: str, detail: str, cause: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.cause = cause


class GatewayApp:
    """The ASGI app. ``startup``/``shutdown`` run in the lifespan (they own the producer)."""

    def __init__(
        self,
        *,
        sink: Sink,
        topic: str,
        shared_keys: tuple[bytes, ...],
        max_body_bytes: int,
        max_inflight_bytes: int | None = None,
        max_in_flight: int | None = None,
        allow_unsigned: bool = False,
        metrics: GatewayMetrics | None = None,
        startup: Hook | None = None,
        shutdown: Hook | None = None,
    ) -> None:
        self.sink = sink
        self.topic = topic
        self.shared_keys = shared_keys
        self.max_body_bytes = max_body_bytes
        # Bodies held at once (None: unbounded), and webhook requests handled at once.
        self.budget = ByteBudget(max_inflight_bytes or 2**62)
        self.max_in_flight = max_in_flight
        self.allow_unsigned = allow_unsigned
        self.metrics = metrics or GatewayMetrics()
        self.metrics.in_flight_bytes.set_function(lambda: self.budget.used)
        self._startup = startup
        self._shutdown = shutdown
        self._in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        if path == WEBHOOK_PATH:
            if method == "POST":
                await self._webhook(scope, receive, send)
            else:
                self._refused(scope, _Reject(405, "method", f"method {method} not allowed"))
                self.metrics.answered(405)
                await _respond(send, 405, b"method not allowed\n", (b"allow", b"POST"))
        elif path in ("/healthz", "/readyz", "/metrics"):
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed\n", (b"allow", b"GET, HEAD"))
            elif path == "/healthz":
                await _respond(send, 200, b"ok\n")
            elif path == "/readyz":
                try:
                    ok = await self.sink.ready(self.topic)
                except Exception:
                    log.exception("readiness check failed")
                    ok = False
                await _respond(
                    send, 200 if ok else 503, b"ready\n" if ok else b"broker unreachable\n"
                )
            else:
                body = self.metrics.render()
                await _respond(send, 200, body, (b"content-type", METRICS_CONTENT_TYPE.encode()))
        else:
            await _respond(send, 404, b"not found\n")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._startup is not None:
                        await self._startup()
                except Exception as exc:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._shutdown is not None:
                        await self._shutdown()
                except Exception as exc:
                    log.exception("gateway shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _webhook(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        metrics.in_flight.inc()
        self._in_flight += 1
        try:
            extra: tuple[tuple[bytes, bytes], ...] = ()
            try:
                with self.budget.lease() as lease:
                    await self._accept(scope, receive, lease)
                status, text = 200, b"ok\n"
            except _Reject as rej:
                self._refused(scope, rej)
                status, text = rej.status, rej.detail.encode() + b"\n"
                if status == 503:
                    extra = ((b"retry-after", str(RETRY_AFTER_S).encode()),)
            except Exception:
                # A bug, not bad input: answer so Chargify retries, and keep serving.
                log.exception("internal error while handling a webhook")
                metrics.rejects.labels("internal").inc()
                status, text = 500, b"internal error, retry later\n"
            metrics.answered(status)
            try:
                await _respond(send, status, text, _TEXT, *extra)
            except Exception as exc:
                # The client went away before its answer; what was published stays published.
                log.info("could not answer a webhook (%s): %s", status, exc)
        finally:
            self._in_flight -= 1
            metrics.in_flight.dec()

    def _refused(self, scope: Scope, rej: _Reject) -> None:
        self.metrics.rejects.labels(rej.reason).inc()
        log.warning(
            "webhook refused: status=%d reason=%s source_ip=%s detail=%s%s",
            rej.status,
            rej.reason,
            _client_ip(scope),
            rej.detail,
            f" cause={rej.cause}" if rej.cause else "",
        )

    async def _accept(self, scope: Scope, receive: Receive, lease: Lease) -> None:
        """Check, then publish one webhook; raise :class:`_Reject` to refuse it.

        Its body's bytes are taken from ``lease`` as they are read.
        """
        received_at = datetime.now(UTC)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"")
        if ctype.partition(b";")[0].strip().lower() != FORM_TYPE:
            raise _Reject(415, "content_type", "expected application/x-www-form-urlencoded")
        declared_text = headers.get(b"content-length")
        declared = int(declared_text) if declared_text and declared_text.isdigit() else 0
        # Each refusal below comes before a byte of the body is read (and before a
        # 100-continue): the connection discards what the client still sends.
        if declared > self.max_body_bytes:
            raise _Reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
        signed = bool(headers.get(SIGNATURE_HEADER) or _query_sig(scope))
        if not signed and not self.allow_unsigned:
            raise _Reject(401, "no_signature", "missing or invalid signature")
        if self.max_in_flight is not None and self._in_flight > self.max_in_flight:
            raise _Reject(503, "too_many_requests", "too many requests in flight, retry later")
        if not self.budget.fits(max(declared, 1)):
            raise _Reject(503, "inflight_bytes", "too much in flight, retry later")
        body = await self._read_body(receive, lease)

        if not verify(self.shared_keys, body, headers.get(SIGNATURE_HEADER), _query_sig(scope)):
            if not self.allow_unsigned:
                raise _Reject(401, "bad_signature", "missing or invalid signature")
            log.warning(
                "ACCEPTING A WEBHOOK WITHOUT A VALID SIGNATURE (GATEWAY_ALLOW_UNSIGNED=true)"
            )

        try:
            fr = frame(body)
        except FramingError as exc:
            raise _Reject(400, exc.reason, str(exc)) from None

        record_headers: list[tuple[str, bytes]] = []
        if fr.webhook_id is not None:
            record_headers.append((h.WEBHOOK_ID, fr.webhook_id.encode()))
        record_headers += [
            (h.EVENT, fr.event.encode()),
            (h.RECEIVED_AT, _rfc3339(received_at).encode()),
            (h.CONTENT_TYPE, ctype),
            (h.SOURCE_IP, _client_ip(scope).encode()),
        ]
        started = time.perf_counter()
        try:
            await self.sink.publish(self.topic, fr.key, body, record_headers)
        except PublishError as exc:
            # The broker's error is for the log; the client learns only to retry.
            raise _Reject(503, "broker_unavailable", "not stored, retry later", str(exc)) from None
        finally:
            self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.published.labels(fr.event).inc()

    async def _read_body(self, receive: Receive, lease: Lease) -> bytes:
        """The whole body, or :class:`_Reject` as soon as it passes the limit or the
        in-flight budget."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reject(400, "disconnected", "client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                # Stop here: the rest of an oversized body is never buffered.
                raise _Reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
            if not lease.take(len(chunk)):
                raise _Reject(503, "inflight_bytes", "too much in flight, retry later")
            if not message.get("more_body", False):
                if not chunks:
                    return bytes(chunk)
                chunks.append(chunk)
                return b"".join(chunks)
            chunks.append(chunk)


def _query_sig(scope: Scope) -> str | None:
    """The ``signature_hmac_sha_256`` query parameter (WEBHOOKS.md §2.1), if any."""
    query: bytes = scope.get("query_string", b"")
    if SIGNATURE_PARAM.encode() not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get(SIGNATURE_PARAM)
    return values[0] if values else None


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _respond(send: Send, status: int, body: bytes, *header: tuple[bytes, bytes]) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *header]
    if not any(name == b"content-type" for name, _ in headers):
        headers.append(_TEXT)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
