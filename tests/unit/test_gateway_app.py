"""The gateway's ASGI app with a fake sink: status-code logic, metrics, and a property test
that no request, however malformed, escapes unanswered or crashes the app.

What a 200 means on a real broker is tested in ``tests/integration/test_gateway.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chargify_stream.base.errors import ConfigError
from chargify_stream.base.settings import load_settings
from chargify_stream.ingest.app import GatewayApp
from chargify_stream.ingest.publisher import Headers, PublishError
from chargify_stream.ingest.server import build_app
from chargify_stream.ingest.signature import sign

KEY = b"unit-key"
FORM = b"application/x-www-form-urlencoded"
SIG = b"x-chargify-webhook-signature-hmac-sha-256"
BODY = b"id=77&event=payment_success&payload[subscription][id]=5"
LIMIT = 1024


@dataclass
class FakeSink:
    """Records what was published; ``fail`` makes ``publish`` raise it instead."""

    fail: BaseException | None = None
    up: bool = True
    records: list[tuple[str, bytes | None, bytes, dict[str, bytes]]] = field(default_factory=list)

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        if self.fail is not None:
            raise self.fail
        self.records.append((topic, key, value, dict(headers)))

    async def ready(self, topic: str) -> bool:
        return self.up


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    starts: int
    receives: int


def make_app(sink: FakeSink | None = None, **kw: Any) -> tuple[GatewayApp, FakeSink]:
    sink = sink or FakeSink()
    options: dict[str, Any] = {"shared_keys": (KEY, b"second-key"), "max_body_bytes": LIMIT}
    options.update(kw)
    return GatewayApp(sink=sink, topic="raw", **options), sink


def request(
    app: GatewayApp,
    method: str = "POST",
    path: str = "/webhooks/chargify",
    *,
    headers: Iterable[tuple[bytes, bytes]] | None = None,
    chunks: list[bytes] | None = None,
    query: bytes = b"",
    disconnect: bool = False,
) -> Answer:
    """Run one HTTP request through the app the way an ASGI server would."""
    if headers is None:
        headers = [(b"content-type", FORM), (SIG, sign(KEY, BODY).encode())]
    chunks = [BODY] if chunks is None else chunks
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": list(headers),
        "client": ("10.1.2.3", 5555),
    }
    sent: list[dict[str, Any]] = []
    receives = 0

    async def receive() -> dict[str, Any]:
        nonlocal receives
        receives += 1
        if receives <= len(chunks):
            more = receives < len(chunks) or disconnect
            return {"type": "http.request", "body": chunks[receives - 1], "more_body": more}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(starts[0]["status"], dict(starts[0]["headers"]), body, len(starts), receives)


def signed(body: bytes, key: bytes = KEY) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", FORM), (SIG, sign(key, body).encode())]


def metric(app: GatewayApp, line: str) -> float:
    for text in app.metrics.render().decode().splitlines():
        if text.startswith(line + " "):
            return float(text.split()[-1])
    return 0.0


def test_publishes_the_body_with_key_and_headers() -> None:
    app, sink = make_app()
    answer = request(app)
    assert answer.status == 200
    [(topic, key, value, headers)] = sink.records
    assert (topic, key, value) == ("raw", b"5", BODY)
    assert headers["chargify-webhook-id"] == b"77"
    assert headers["chargify-event"] == b"payment_success"
    assert headers["content-type"] == FORM
    assert headers["source-ip"] == b"10.1.2.3"
    assert headers["received-at"].endswith(b"Z")
    assert metric(app, 'gateway_requests_total{status="200"}') == 1
    assert metric(app, 'gateway_published_total{event="payment_success"}') == 1
    assert metric(app, "gateway_publish_seconds_count") == 1
    assert metric(app, "gateway_in_flight") == 0


def test_body_in_several_chunks() -> None:
    app, sink = make_app()
    assert request(app, chunks=[BODY[:10], b"", BODY[10:]]).status == 200
    assert sink.records[0][2] == BODY


def test_second_key_and_query_parameter() -> None:
    app, sink = make_app()
    assert request(app, headers=signed(BODY, b"second-key")).status == 200
    query = b"signature_hmac_sha_256=" + sign(KEY, BODY).encode()
    assert request(app, headers=[(b"content-type", FORM)], query=query).status == 200
    assert len(sink.records) == 2


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"content-type", FORM)], "no_signature"),
        ([(b"content-type", FORM), (SIG, b"")], "no_signature"),
        ([(b"content-type", FORM), (SIG, sign(b"other", BODY).encode())], "bad_signature"),
    ],
)
def test_401_publishes_nothing(headers: list[tuple[bytes, bytes]], reason: str) -> None:
    app, sink = make_app()
    assert request(app, headers=headers).status == 401
    assert sink.records == []
    assert metric(app, f'gateway_rejects_total{{reason="{reason}"}}') == 1


def test_no_keys_refuse_everything() -> None:
    app, sink = make_app(shared_keys=())
    assert request(app).status == 401
    assert sink.records == []


def test_unsigned_mode_accepts_and_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    app, sink = make_app(allow_unsigned=True)
    with caplog.at_level(logging.WARNING):
        assert request(app, headers=[(b"content-type", FORM)]).status == 200
    assert len(sink.records) == 1
    assert "WITHOUT A VALID SIGNATURE" in caplog.text


def test_unsigned_mode_is_announced_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    app = build_app(load_settings(gateway_allow_unsigned=True), sink=FakeSink())

    async def startup() -> None:
        assert app._startup is not None
        await app._startup()

    with caplog.at_level(logging.WARNING):
        asyncio.run(startup())
    assert "GATEWAY_ALLOW_UNSIGNED=true" in caplog.text


def test_declared_oversize_is_413_before_reading() -> None:
    app, sink = make_app()
    headers = [*signed(BODY), (b"content-length", str(LIMIT + 1).encode())]
    answer = request(app, headers=headers)
    assert answer.status == 413
    assert answer.receives == 0
    assert sink.records == []


def test_streamed_oversize_is_413_at_the_limit() -> None:
    app, _ = make_app()
    chunks = [b"a" * 512] * 10
    answer = request(app, chunks=chunks)
    assert answer.status == 413
    assert answer.receives == 3  # 1536 bytes > 1024: not one chunk more is read
    assert metric(app, 'gateway_rejects_total{reason="too_large"}') == 1


@pytest.mark.parametrize(
    "ctype", [b"", b"application/json", b"text/plain", b"application/x-www-form-urlencodedx"]
)
def test_415(ctype: bytes) -> None:
    app, _ = make_app()
    answer = request(app, headers=[(b"content-type", ctype), (SIG, sign(KEY, BODY).encode())])
    assert answer.status == 415
    assert answer.receives == 0


@pytest.mark.parametrize("body", [b"event=x", b"id=1", b"id=1&event=x&y=%zz", b"\xff"])
def test_400(body: bytes) -> None:
    app, sink = make_app()
    assert request(app, headers=signed(body), chunks=[body]).status == 400
    assert sink.records == []


def test_client_gone_mid_body() -> None:
    app, _ = make_app()
    assert request(app, chunks=[BODY[:5]], disconnect=True).status == 400
    assert metric(app, 'gateway_rejects_total{reason="disconnected"}') == 1


def test_405_and_404() -> None:
    app, _ = make_app()
    answer = request(app, "GET")
    assert (answer.status, answer.headers[b"allow"]) == (405, b"POST")
    assert metric(app, 'gateway_rejects_total{reason="method"}') == 1
    assert request(app, "POST", "/healthz").status == 405
    assert request(app, "GET", "/nope").status == 404


def test_503_when_the_broker_does_not_take_it(caplog: pytest.LogCaptureFixture) -> None:
    kafka_text = 'KafkaError{code=MSG_SIZE_TOO_LARGE,val=10,str="Broker: Message size too large"}'
    app, _ = make_app(FakeSink(fail=PublishError(kafka_text)))
    with caplog.at_level(logging.WARNING):
        answer = request(app)
    assert answer.status == 503
    assert answer.headers[b"retry-after"] == b"5"
    # The client learns to retry, nothing of the gateway's insides.
    assert answer.body == b"not stored, retry later\n"
    # The broker's error is logged once, in one line.
    [line] = [r.getMessage() for r in caplog.records if kafka_text in r.getMessage()]
    assert "\n" not in line and "reason=broker_unavailable" in line
    assert metric(app, 'gateway_rejects_total{reason="broker_unavailable"}') == 1
    assert metric(app, "gateway_publish_seconds_count") == 1


@pytest.mark.parametrize(
    "headers",
    [[(b"content-type", FORM)], [(b"content-type", FORM), (SIG, b"")]],
    ids=["no-header", "empty-header"],
)
def test_no_signature_is_401_before_the_body_is_read(headers: list[tuple[bytes, bytes]]) -> None:
    app, sink = make_app()
    answer = request(app, headers=headers)
    assert (answer.status, answer.receives) == (401, 0)
    assert sink.records == []


def test_unsigned_mode_still_reads_an_unsigned_body() -> None:
    app, sink = make_app(allow_unsigned=True)
    assert request(app, headers=[(b"content-type", FORM)]).status == 200
    assert len(sink.records) == 1


def test_a_full_budget_is_503_before_the_body_is_read() -> None:
    app, sink = make_app(max_inflight_bytes=LIMIT)
    with app.budget.lease() as other:  # another request holds all but 10 bytes
        assert other.take(LIMIT - 10)
        headers = [*signed(BODY), (b"content-length", str(len(BODY)).encode())]
        answer = request(app, headers=headers)
        assert (answer.status, answer.receives) == (503, 0)
        assert answer.headers[b"retry-after"] == b"5"
        # Without a declared length the body is read, and refused once it passes the bound.
        answer = request(app, chunks=[BODY[:8], BODY[8:]])
        assert (answer.status, answer.receives) == (503, 2)
    assert metric(app, 'gateway_rejects_total{reason="inflight_bytes"}') == 2
    assert sink.records == []
    # Given back: the same request now fits.
    assert app.budget.used == 0
    assert request(app).status == 200
    assert metric(app, "gateway_in_flight_bytes") == 0


def test_too_many_requests_in_flight_is_503() -> None:
    app, sink = make_app(max_in_flight=0)
    answer = request(app)
    assert (answer.status, answer.receives) == (503, 0)
    assert metric(app, 'gateway_rejects_total{reason="too_many_requests"}') == 1
    assert sink.records == []


def test_in_flight_bytes_must_hold_a_body() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_MAX_INFLIGHT_BYTES"):
        load_settings(gateway_max_body_bytes=4096, gateway_max_inflight_bytes=4095)
    assert load_settings(gateway_max_body_bytes=4096, gateway_max_inflight_bytes=4096)


def test_a_bug_is_500_and_the_app_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    sink = FakeSink(fail=ZeroDivisionError("a bug"))
    app, _ = make_app(sink)
    with caplog.at_level(logging.ERROR):
        assert request(app).status == 500
    assert "internal error" in caplog.text
    sink.fail = None
    assert request(app).status == 200


def test_probes() -> None:
    app, sink = make_app()
    assert request(app, "GET", "/healthz").status == 200
    assert request(app, "GET", "/readyz").status == 200
    sink.up = False
    assert request(app, "GET", "/readyz").status == 503
    metrics = request(app, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert b"gateway_in_flight" in metrics.body


def test_lifespan_reports_a_failed_startup() -> None:
    async def boom() -> None:
        raise RuntimeError("cannot start")

    app, _ = make_app(startup=boom)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan"}, receive, send))
    assert sent == [{"type": "lifespan.startup.failed", "message": "cannot start"}]


# -- no input crashes the handler ---------------------------------------------------------

_header_names = st.sampled_from(
    [b"content-type", b"content-length", SIG, b"transfer-encoding", b"x-other", b""]
)
_header_values = st.one_of(
    st.sampled_from([FORM, FORM + b"; charset=utf-8", b"99999999999", b"-1", b"", b"0" * 64]),
    st.binary(max_size=80),
)
_bodies = st.one_of(
    st.binary(max_size=2 * LIMIT),
    st.lists(
        st.sampled_from(
            [
                b"id=1",
                b"id=",
                b"event=test",
                b"event=payment_success",
                b"payload[subscription][id]=9",
                b"payload[subscription_id]=x",
                b"%",
                b"%zz",
                b"%C3%28",
                b"\xff",
                b"=",
                b"&",
                b"+",
            ]
        ),
        max_size=10,
    ).map(b"&".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "HEAD", "OPTIONS", "BREW"]),
    path=st.sampled_from(["/webhooks/chargify", "/healthz", "/readyz", "/metrics", "/", "/x"]),
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=6),
    body=_bodies,
    split=st.integers(min_value=0, max_value=2 * LIMIT),
    sign_it=st.booleans(),
    query=st.binary(max_size=80),
    failure=st.sampled_from([None, PublishError("down"), ValueError("bug")]),
)
def test_no_request_crashes_the_handler(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    split: int,
    sign_it: bool,
    query: bytes,
    failure: BaseException | None,
) -> None:
    app, sink = make_app(FakeSink(fail=failure))
    if sign_it:
        headers = [*headers, (SIG, sign(KEY, body).encode())]
    answer = request(
        app, method, path, headers=headers, chunks=[body[:split], body[split:]], query=query
    )
    assert answer.starts == 1
    assert answer.status in {200, 400, 401, 404, 405, 413, 415, 500, 503}
    assert int(answer.headers[b"content-length"]) == len(answer.body)
    if answer.status == 500:
        assert isinstance(failure, ValueError)
    for _, _, value, _ in sink.records:
        assert value == body
    assert metric(app, "gateway_in_flight") == 0
