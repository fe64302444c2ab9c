"""The Chargify stand-in behaves as ``shared/chargify/API.md`` describes Chargify.

The reconcile and connect tests are only as good as the stand-in they run against, so
its documented behaviours are pinned here, through plain HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from chargify_stream.base.errors import ConfigError
from chargify_stream.reconcile import our_endpoint
from chargify_stream.reconcile_report import Webhook, Window
from tests.chargify_standin import EASTERN, ChargifyStandIn


class Receiver:
    """An endpoint that records each POST and answers ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[bytes, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((body, dict(self.headers)))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/chargify"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[ChargifyStandIn]:
    with ChargifyStandIn(time_scale=0.001) as standin:
        yield standin


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def client(site: ChargifyStandIn) -> Iterator[Callable[..., httpx.Client]]:
    """``client(site, user=..., password=...)``: an HTTP client, closed after the test."""
    made: list[httpx.Client] = []

    def make(site: ChargifyStandIn, user: str | None = None, password: str = "X") -> httpx.Client:
        c = httpx.Client(base_url=site.url, auth=(user or site.api_key, password), timeout=10)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def body(webhook_id: int, event_id: int) -> bytes:
    return f"id={webhook_id}&event=payment_success&payload[event_id]={event_id}".encode()


def test_basic_auth_as_documented(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    for password in ("x", "X"):
        assert client(site, password=password).get("/endpoints.json").status_code == 200
    denied = client(site, user="invalidKey").get("/webhooks.json")
    assert denied.status_code == 401
    assert denied.text.strip() == "HTTP Basic: Access denied."
    assert httpx.get(f"{site.url}/events.json").status_code == 401
    assert client(site, password="secret").get("/events.json").status_code == 401


def test_webhook_pages_and_wrapper(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    for _ in range(210):
        site.emit("payment_success", body, lost=True)
    c = client(site)
    first = c.get("/webhooks.json").json()
    assert len(first) == 20 and set(first[0]) == {"webhook"}  # default per_page 20
    assert len(c.get("/webhooks.json", params={"per_page": 500}).json()) == 200  # clamped
    assert len(c.get("/webhooks.json", params={"per_page": 200, "page": 2}).json()) == 10
    assert c.get("/webhooks.json", params={"per_page": 200, "page": 3}).json() == []
    record = first[0]["webhook"]
    assert set(record) >= {
        "id", "event", "created_at", "accepted_at", "last_sent_at", "last_sent_url",
        "last_error", "last_error_at", "successful", "body", "signature",
        "signature_hmac_sha_256",
    }  # fmt: skip


def test_webhook_date_filters_are_inclusive_site_dates(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    ids = [site.emit("payment_success", body, lost=True)[0] for _ in range(3)]
    days = [datetime(2026, 11, d, 23, 30, tzinfo=EASTERN) for d in (1, 2, 3)]
    for webhook_id, moment in zip(ids, days, strict=True):
        site.webhooks[webhook_id].created_at = moment  # 23:30 Eastern: the next day in UTC
    got = client(site).get(
        "/webhooks.json", params={"since_date": "2026-11-02", "until_date": "2026-11-02"}
    )
    assert [w["webhook"]["id"] for w in got.json()] == [ids[1]]


def test_delivery_retries_then_replay_updates_the_fields(
    site: ChargifyStandIn, receiver: Receiver, client: Callable[..., httpx.Client]
) -> None:
    site.add_endpoint(receiver.url, ["payment_success"])
    receiver.status = 503
    [webhook_id] = site.emit("payment_success", body)
    site.wait_idle()
    assert len(receiver.received) == 5  # ASAP, +10 s, +15 s, +90 s, +180 s (compressed)
    record = client(site).get("/webhooks.json", params={"status": "failed"}).json()[0]["webhook"]
    assert record["last_error"] == "503 Service Unavailable (retry 5 of 5)"
    assert record["successful"] is False and record["accepted_at"] is None

    receiver.status = 200
    replay = client(site).post("/webhooks/replay.json", json={"ids": [webhook_id, 1]})
    assert replay.json() == {"status": "ok"}  # the unknown id 1 is ignored
    site.wait_idle()
    sent, headers = receiver.received[-1]
    assert sent == site.webhooks[webhook_id].body  # the stored body, re-signed
    key = site.shared_key.encode()
    assert headers["X-Chargify-Webhook-Signature-Hmac-Sha-256"] == (
        hmac.new(key, sent, hashlib.sha256).hexdigest()
    )
    assert headers["X-Chargify-Webhook-Id"] == str(webhook_id)
    record = client(site).get("/webhooks.json").json()[0]["webhook"]
    assert record["successful"] is True and record["accepted_at"] is not None
    assert record["last_error"] is None and record["last_error_at"] is None


def test_replay_refuses_too_many_ids_and_a_form_body(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    c = client(site)
    assert c.post("/webhooks/replay.json", json={"ids": list(range(1001))}).status_code == 422
    form = c.post("/webhooks/replay.json", data={"ids": "1"})
    assert form.status_code == 422  # only JSON bodies (API.md §1.3)


def test_endpoints_pause_after_failures_and_a_url_change_re_enables(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    site.pause_after = 3
    endpoint_id = site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    site.emit("payment_success", body)  # 5 failed attempts
    site.wait_idle()
    [endpoint] = client(site).get("/endpoints.json").json()
    assert endpoint["status"] == "paused"
    [held] = site.emit("payment_success", body)
    assert site.webhooks[held].status == "paused" and site.webhooks[held].deliveries == 0

    site.endpoints[endpoint_id].paused_at = 0.0  # paused long ago: disabled, no records
    assert site.emit("payment_success", body) == []
    assert site.endpoints[endpoint_id].status == "disabled"
    assert len(site.events) == 3  # the events are still recorded

    c = client(site)
    spec = {
        "endpoint": {"url": "http://127.0.0.1:2/", "webhook_subscriptions": ["payment_success"]}
    }
    updated = c.put(f"/endpoints/{endpoint_id}.json", json=spec).json()["endpoint"]
    assert updated["status"] == "enabled"
    assert c.put("/endpoints/12345.json", json=spec).status_code == 404
    bad = {"endpoint": {"url": "ftp://x", "webhook_subscriptions": []}}
    assert c.post("/endpoints.json", json=bad).json() == {
        "errors": ["URL: invalid, only http and https supported"]
    }


def test_a_paused_endpoint_is_probed_until_it_answers(receiver: Receiver) -> None:
    with ChargifyStandIn(time_scale=0.001, pause_after=5, probe_every=50.0) as site:
        endpoint_id = site.add_endpoint(receiver.url, ["payment_success"])
        receiver.status = 503
        [first] = site.emit("payment_success", body)  # 5 failures: paused
        site.wait_idle()
        assert site.endpoints[endpoint_id].status == "paused"
        [held] = site.emit("payment_success", body)
        receiver.status = 200
        deadline = time.monotonic() + 10
        while site.endpoints[endpoint_id].status != "enabled" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert site.endpoints[endpoint_id].status == "enabled"  # the probe got its 200
        assert site.webhooks[first].status == "successful"
        assert site.webhooks[held].status == "paused"  # held records wait for a replay


def test_the_site_switch_off_makes_no_webhooks(
    site: ChargifyStandIn, client: Callable[..., httpx.Client]
) -> None:
    site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    answer = client(site).put("/webhooks/settings.json", json={"webhooks_enabled": False})
    assert answer.json() == {"webhooks_enabled": False}
    assert site.emit("payment_success", body) == []


def test_events_filters(site: ChargifyStandIn, client: Callable[..., httpx.Client]) -> None:
    e1 = site.add_event("payment_success", subscription_id=5)
    e2 = site.add_event("renewal_success", subscription_id=5)
    e3 = site.add_event("signup_success", subscription_id=6)
    e1.created_at = datetime(2026, 11, 1, 12, 0, tzinfo=EASTERN)
    c = client(site)

    def ids(path: str = "/events.json", **params: Any) -> list[int]:
        return [e["event"]["id"] for e in c.get(path, params=params).json()]

    assert ids() == [e3.id, e2.id, e1.id]  # newest first by default
    assert ids(direction="asc", since_id=e2.id) == [e2.id, e3.id]  # inclusive
    assert ids(max_id=e2.id, since_id=e2.id) == [e2.id]
    assert ids(filter="payment_success,signup_success") == [e3.id, e1.id]
    assert ids(date_field="created_at", start_date="2026-11-01", end_date="2026-11-01") == [e1.id]
    after = (e1.created_at + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    assert e1.id not in ids(date_field="created_at", start_datetime=after)
    assert ids("/subscriptions/5/events.json") == [e2.id, e1.id]
    assert c.get("/subscriptions/99/events.json").status_code == 404
    assert c.get("/events/count.json").json() == {"count": 3}


def test_more_than_four_requests_in_flight_get_429() -> None:
    # Each request is held 1 s, and all 8 are sent at once: 4 are answered, 4 refused.
    with ChargifyStandIn(request_delay=1.0) as site:
        statuses: list[int] = []
        auth = "Basic " + base64.b64encode(f"{site.api_key}:X".encode()).decode()
        together = threading.Barrier(8)

        def call() -> None:
            together.wait(10)
            answer = httpx.get(
                f"{site.url}/endpoints.json", headers={"Authorization": auth}, timeout=10
            )
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert "usage violation" in answer.text

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert sorted(statuses) == [200] * 4 + [429] * 4


def test_webhook_states_the_client_derives() -> None:
    base = {"id": 1, "event": "payment_success", "created_at": "2026-11-08T16:22:25-05:00"}
    assert Webhook.from_api({**base, "successful": True}).state == "successful"
    failed = {**base, "successful": False, "last_error": "404 Resource Not Found (retry 5 of 5)"}
    assert Webhook.from_api(failed).state == "failed"
    pending = Webhook.from_api({**base, "successful": False, "body": "id=1&payload[event_id]=9"})
    assert (pending.state, pending.event_id) == ("pending", 9)
    assert pending.created_at == datetime.fromisoformat("2026-11-08T21:22:25+00:00")


def test_window_asks_chargify_a_day_wider() -> None:
    since = datetime.fromisoformat("2026-11-02T03:00:00+00:00")
    window = Window(since, since + timedelta(hours=2))
    assert [d.isoformat() for d in window.api_dates()] == ["2026-11-01", "2026-11-03"]


def test_which_endpoint_is_ours() -> None:
    notes: list[str] = []
    one = [{"url": "https://a/hooks"}]
    assert our_endpoint(one, None, notes) == "https://a/hooks"
    assert our_endpoint([], None, notes) is None and "connect" in notes[-1]
    assert our_endpoint(one, "https://b/hooks", notes) == "https://b/hooks"
    assert "no endpoint of the site has the URL" in notes[-1]
    with pytest.raises(ConfigError, match="--url"):
        our_endpoint([*one, {"url": "https://c/hooks"}], None, notes)
