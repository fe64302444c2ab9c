"""The Chargify API client, ``connect`` and the replay batching against the local stand-in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from chargify_stream import connect
from chargify_stream.base.errors import ConfigError, TransientError
from chargify_stream.base.settings import load_settings
from chargify_stream.chargify_api import (
    ChargifyApi,
    ChargifyApiError,
    ChargifyAuthError,
    ChargifyUnavailable,
)
from chargify_stream.local.ports import free_port
from chargify_stream.reconcile import ReplayIncomplete, Webhook, parse_interval, request_replays
from tests.chargify_standin import ChargifyStandIn

GATEWAY = "https://hooks.example.com/webhooks/chargify"


@pytest.fixture
def site() -> Iterator[ChargifyStandIn]:
    with ChargifyStandIn(time_scale=0.001) as standin:
        yield standin


def api_for(site: ChargifyStandIn, **kwargs: float) -> ChargifyApi:
    return ChargifyApi(site.url, site.api_key, backoff=0.01, max_backoff=0.05, **kwargs)  # type: ignore[arg-type]


def body(webhook_id: int, event_id: int) -> bytes:
    return f"id={webhook_id}&event=payment_success&payload[event_id]={event_id}".encode()


def test_lists_every_page_of_webhooks_and_ignores_unknown_fields(site: ChargifyStandIn) -> None:
    site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    made = [i for _ in range(450) for i in site.emit("payment_success", body, lost=True)]
    api = api_for(site)
    listed = list(api.webhooks(order="oldest_first"))
    assert [w["id"] for w in listed] == made
    assert api.requests == 3  # 200 + 200 + 50: the short page is the last
    parsed = Webhook.from_api({**listed[0], "something_new": 1})
    assert (parsed.state, parsed.event_id) == ("successful", int(listed[0]["body"].split("=")[-1]))


def test_webhook_filters_of_the_standin(site: ChargifyStandIn) -> None:
    site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
    ok = site.emit("payment_success", body, lost=True, subscription_id=7)
    failed = site.emit("payment_success", body, subscription_id=8)
    site.wait_idle()
    api = api_for(site)
    assert [w["id"] for w in api.webhooks(status="failed")] == failed
    assert [w["id"] for w in api.webhooks(subscription=7)] == ok
    assert [w["id"] for w in api.webhooks()] == failed + ok  # newest first by default
    assert [w["id"] for w in api.webhooks(order="oldest_first")] == ok + failed
    assert api.request("GET", "/webhooks.json", query={"page": 9}) == []
    [record] = api.webhooks(status="failed")
    assert record["last_error"] == "Connection refused (retry 5 of 5)"
    assert record["accepted_at"] is None and record["successful"] is False


def test_a_wrong_key_is_a_configuration_error_naming_the_variable(site: ChargifyStandIn) -> None:
    api = ChargifyApi(site.url, "not-the-key")
    with pytest.raises(ChargifyAuthError) as caught:
        api.endpoints()
    assert isinstance(caught.value, ConfigError)
    assert "CHARGIFY_API_KEY" in str(caught.value)
    assert "not-the-key" not in str(caught.value) and "not-the-key" not in repr(api)


def test_a_redirect_is_not_followed_with_the_key() -> None:
    seen: list[str | None] = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/x")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = ChargifyApi(f"http://127.0.0.1:{server.server_address[1]}", "key")
        with pytest.raises(ChargifyApiError, match="302"):
            api.endpoints()
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 1  # the redirect was not followed


def test_429_is_retried_with_growing_pauses(site: ChargifyStandIn) -> None:
    pauses: list[float] = []
    api = ChargifyApi(site.url, site.api_key, backoff=1.0, max_backoff=3.0, sleep=pauses.append)
    site.throttle(4)
    assert api.endpoints() == []
    assert pauses == [1.0, 2.0, 3.0, 3.0]
    assert site.throttled == 4


def test_429_after_every_retry_is_unavailable(site: ChargifyStandIn) -> None:
    api = ChargifyApi(site.url, site.api_key, retries=2, sleep=lambda _s: None)
    site.throttle(10)
    with pytest.raises(ChargifyUnavailable, match="429"):
        api.endpoints()


def test_more_than_four_requests_at_once_are_throttled_and_retried() -> None:
    with ChargifyStandIn(request_delay=0.5) as site:
        site.add_endpoint("http://127.0.0.1:1/", ["payment_success"])
        results: list[object] = []
        together = threading.Barrier(10)

        def call() -> None:
            api = ChargifyApi(site.url, site.api_key, retries=10, backoff=0.1, max_backoff=1.0)
            together.wait(10)
            try:
                results.append(len(api.endpoints()))
            except Exception as exc:
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert site.throttled >= 6  # 10 at once, 4 answered: the other 6 were throttled first
    assert results == [1] * 10


def test_network_failure_says_so_and_repeats_only_what_is_safe() -> None:
    api = ChargifyApi(f"http://127.0.0.1:{free_port()}", "key", retries=2, sleep=lambda _s: None)
    with pytest.raises(ChargifyUnavailable, match="unreachable"):
        api.endpoints()
    assert api.requests == 3  # a GET is repeated
    before = api.requests
    with pytest.raises(ChargifyUnavailable):
        api.replay([1, 2])
    assert api.requests == before + 1  # a POST is not: it might have been done


def test_replays_go_in_batches_of_1000_never_twice(site: ChargifyStandIn) -> None:
    api = api_for(site)
    requested: set[int] = set()
    ids = list(range(1, 2501))
    assert request_replays(api, ids + ids[:10], requested) == ids
    assert [len(batch) for batch in site.replays] == [1000, 1000, 500]
    assert request_replays(api, ids, requested) == []
    assert len(site.replays) == 3
    with pytest.raises(ValueError):
        api.replay(list(range(1001)))


def test_a_failed_replay_batch_says_what_was_and_was_not_requested(site: ChargifyStandIn) -> None:
    class DownAfterFirstBatch(ChargifyApi):
        def replay(self, ids: list[int]) -> None:  # type: ignore[override]
            super().replay(ids)
            self.base_url = f"http://127.0.0.1:{free_port()}"

    api = DownAfterFirstBatch(site.url, site.api_key, sleep=lambda _s: None)
    with pytest.raises(ReplayIncomplete) as caught:
        request_replays(api, list(range(1, 2101)), set())
    message = str(caught.value)
    assert "unreachable" in message
    assert "requested for 1000 of 2100" in message
    assert "batch of 1000 being sent" in message and "100 more were not requested" in message


def test_connect_creates_then_changes_nothing(site: ChargifyStandIn) -> None:
    api = api_for(site)
    dry = connect.connect(api, GATEWAY, dry_run=True)
    assert dry.action == "would create" and site.mutations() == []
    created = connect.connect(api, GATEWAY)
    assert created.action == "created"
    assert site.webhooks_enabled
    [endpoint] = site.endpoints.values()
    assert (endpoint.url, endpoint.events) == (GATEWAY, list(connect.EVENTS))
    changes = len(site.mutations())
    again = connect.connect(api, GATEWAY)
    assert again.action == "unchanged" and not again.changed
    # Only the site's switch was set again (it cannot be read); no endpoint was touched.
    assert [(r.method, r.path) for r in site.mutations()[changes:]] == [
        ("PUT", "/webhooks/settings.json")
    ]


def test_connect_updates_an_endpoint_to_exactly_the_events(site: ChargifyStandIn) -> None:
    site.add_endpoint(GATEWAY, ["payment_success", "renewal_success"])
    site.add_endpoint("https://old.example.com/hooks", ["payment_success"])
    api = api_for(site)
    dry = connect.connect(api, GATEWAY, dry_run=True)
    assert dry.action == "would update" and site.mutations() == []
    result = connect.connect(api, GATEWAY)
    assert result.action == "updated"
    assert result.previous_events == ["payment_success", "renewal_success"]
    assert sorted(site.endpoints[result.endpoint["id"]].events) == sorted(connect.EVENTS)  # type: ignore[index]
    assert [o["url"] for o in result.others] == ["https://old.example.com/hooks"]


def test_connect_says_plainly_when_the_endpoint_is_paused(site: ChargifyStandIn) -> None:
    endpoint_id = site.add_endpoint(GATEWAY, list(connect.EVENTS))
    site.endpoints[endpoint_id].status = "paused"
    result = connect.connect(api_for(site), GATEWAY)
    assert result.action == "unchanged"
    assert result.advice is not None and "PAUSED" in result.advice
    assert "reconcile" in result.advice


def test_connect_refuses_a_bad_url_and_relays_chargify_refusals(site: ChargifyStandIn) -> None:
    with pytest.raises(ConfigError, match="not an http"):
        connect.connect(api_for(site), "hooks.example.com")
    with pytest.raises(ChargifyApiError, match="Event key is not valid - foobar") as caught:
        api_for(site).create_endpoint(GATEWAY, ["foobar"])
    assert caught.value.status == 422


def test_connect_when_chargify_is_unreachable_changed_nothing() -> None:
    api = ChargifyApi(f"http://127.0.0.1:{free_port()}", "key", fault_retries=0)
    with pytest.raises(TransientError, match="nothing was changed"):
        connect.connect(api, GATEWAY)


def test_settings_for_the_api() -> None:
    assert load_settings(chargify_subdomain="Acme").chargify_base_url() == (
        "https://acme.chargify.com"
    )
    eu = load_settings(
        chargify_subdomain="acme", chargify_api_url="https://acme.ebilling.maxio.com/"
    )
    assert eu.chargify_base_url() == "https://acme.ebilling.maxio.com"
    with pytest.raises(ConfigError, match="CHARGIFY_SUBDOMAIN"):
        load_settings(chargify_subdomain="https://acme.chargify.com")
    with pytest.raises(ConfigError, match="CHARGIFY_API_URL"):
        load_settings(chargify_api_url="acme.chargify.com")
    with pytest.raises(ConfigError, match=r"CHARGIFY_API_URL.*https"):
        load_settings(chargify_api_url="http://acme.chargify.com")
    with pytest.raises(ConfigError, match="CHARGIFY_SUBDOMAIN"):
        load_settings().chargify_base_url()
    with pytest.raises(ConfigError, match="CHARGIFY_API_KEY"):
        load_settings().chargify_key()
    assert load_settings(chargify_api_key="s3cret").masked()["chargify_api_key"] == "******"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)]
)
def test_intervals(text: str, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["0m", "15", "m", "-1h", "1w"])
def test_bad_intervals(text: str) -> None:
    with pytest.raises(ValueError):
        parse_interval(text)
