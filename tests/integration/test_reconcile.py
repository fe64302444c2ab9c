"""``reconcile`` and ``connect`` against the Chargify stand-in, real Kafka, real Postgres.

The stand-in (``tests/chargify_standin.py``) plays the Chargify site: it sends webhooks to
the gateway, retries them on Chargify's schedule (compressed 100 times), marks them
failed, and re-sends what ``reconcile`` asks it to replay. Gateway, processor and sink run
as processes; the commands run as an operator runs them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Producer

from chargify_stream.base.settings import Settings
from chargify_stream.connect import EVENTS
from chargify_stream.local.ports import free_port
from chargify_stream.received import RawTopicReader
from chargify_stream.sink.admin import add_customer, add_partner, connect
from tests.builders import build_body
from tests.chargify_standin import ChargifyStandIn
from tests.conftest import TEST_SHARED_KEY
from tests.pipeline import Pipeline
from tests.stages import Stage, run_cli

pytestmark = pytest.mark.integration

SUB = 7_100_000_001
TRANSACTION = 8_100_000_000


@pytest.fixture
def site() -> Iterator[ChargifyStandIn]:
    with ChargifyStandIn(shared_key=TEST_SHARED_KEY, time_scale=0.01) as standin:
        yield standin


@pytest.fixture
def site_settings(make_settings: Callable[..., Settings], site: ChargifyStandIn) -> Settings:
    return make_settings(chargify_api_url=site.url, chargify_api_key=site.api_key)


def payment(site: ChargifyStandIn, n: int, *, lost: bool = False) -> list[int]:
    """Payment ``n`` of customer c1 happens on the site; return its webhooks' ids."""
    transaction_id = TRANSACTION + n

    def body(webhook_id: int, event_id: int) -> bytes:
        return build_body(
            "payment_success", webhook_id=webhook_id, event_id=event_id,
            transaction_id=transaction_id, subscription_id=SUB, reference="c1",
        )  # fmt: skip

    data = {"product_id": 3792003, "account_transaction_id": transaction_id}
    return site.emit("payment_success", body, subscription_id=SUB, data=data, lost=lost)


def pay(site: ChargifyStandIn, n: int, *, lost: bool = False) -> int:
    """Payment ``n`` on a site with one endpoint; its webhook id."""
    [webhook_id] = payment(site, n, lost=lost)
    return webhook_id


def reconcile(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_cli(settings, "reconcile", "--since", "1h", "--until", "0s", "--json", *args)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, json.loads(done.stdout)


def seed(settings: Settings) -> None:
    with connect(settings) as conn:
        add_partner(conn, "p1", "Partner One")
        add_customer(conn, "c1", partner="p1")


def test_reconcile_has_chargify_replay_what_an_outage_lost(
    site_settings: Settings, site: ChargifyStandIn, stages: Callable[..., Stage]
) -> None:
    settings = site_settings
    seed(settings)
    pipeline = Pipeline(settings, stages)
    site.add_endpoint(f"{pipeline.base}/webhooks/chargify", EVENTS)

    delivered = [pay(site, n) for n in range(3)]
    site.wait_idle()
    pipeline.gateway.stop()
    # 4 webhooks x 5 attempts: 20 failures in a row, short of the 25 that pause the endpoint.
    outage = [pay(site, n) for n in range(3, 7)]
    site.wait_idle()  # every retry made, and failed
    for webhook_id in outage:
        webhook = site.webhooks[webhook_id]
        assert webhook.status == "failed", webhook
        assert (webhook.last_error or "").endswith("(retry 5 of 5)")
    # Accepted by something else (an old load balancer, say): "successful", yet absent.
    lost = pay(site, 7, lost=True)
    pipeline.gateway = stages("gateway", settings)
    pipeline.gateway.wait_http_ready(f"{pipeline.base}/readyz")
    delivered += [pay(site, n) for n in range(8, 11)]
    site.wait_idle()
    assert [site.webhooks[i].status for i in delivered] == ["successful"] * 6
    missing = sorted([*outage, lost])
    everything = [TRANSACTION + n for n in range(11)]

    code, report = reconcile(settings, "--dry-run")
    assert code == 3  # the dry run found something to do
    assert [w["id"] for w in report["missing"]] == missing
    assert {w["id"]: w["status"] for w in report["missing"]}[lost] == "successful"
    assert (report["checked"], report["already_received"]) == (11, 6)
    assert report["replay_requested"] == 0
    assert site.replays == [] and site.mutations() == []

    code, report = reconcile(settings, "--wait", "60")
    assert code == 0, report
    assert (report["checked"], report["already_received"]) == (11, 6)
    assert report["replay_requested"] == 5 and sorted(report["replayed_ids"]) == missing
    assert report["still_missing"] == []
    assert report["events_checked"] == 11 and report["events_without_webhook"] == []
    assert [e["status"] for e in report["endpoints"]] == ["enabled"]
    assert [sorted(batch) for batch in site.replays] == [missing]

    pipeline.wait_for(
        "select transaction_id, count(*) from transactions group by 1 order by 1",
        [(t, 1) for t in everything],
    )
    with psycopg.connect(settings.database_dsn()) as conn:
        rows = conn.execute("select count(*), count(distinct transaction_id) from transactions")
        assert rows.fetchone() == (11, 11)

    code, report = reconcile(settings)
    assert code == 0
    assert (report["checked"], report["already_received"]) == (11, 11)
    assert report["missing"] == [] and report["replay_requested"] == 0
    assert len(site.replays) == 1  # nothing asked again

    text = run_cli(settings, "reconcile", "--since", "1h", "--until", "0s")
    assert text.returncode == 0, text.stderr
    assert "already received: 11" in text.stdout and "missing: 0" in text.stdout


def test_webhooks_held_by_a_paused_endpoint_are_replayed(
    make_settings: Callable[..., Settings], stages: Callable[..., Stage]
) -> None:
    with ChargifyStandIn(shared_key=TEST_SHARED_KEY, time_scale=0.01, pause_after=10) as site:
        settings = make_settings(chargify_api_url=site.url, chargify_api_key=site.api_key)
        base = f"http://127.0.0.1:{settings.gateway_port}"
        endpoint_id = site.add_endpoint(f"{base}/webhooks/chargify", EVENTS)
        failed = [pay(site, n) for n in range(2)]  # 2 x 5 attempts: 10 failures in a row
        site.wait_idle()
        assert site.endpoints[endpoint_id].status == "paused"
        held = [pay(site, n) for n in range(2, 4)]  # made paused, never sent
        assert [site.webhooks[i].status for i in held] == ["paused", "paused"]

        code, report = reconcile(settings, "--dry-run")
        assert code == 3 and "PAUSED" in report["endpoints"][0]["advice"]

        gateway = stages("gateway", settings)
        gateway.wait_http_ready(f"{base}/readyz")
        code, report = reconcile(settings, "--wait", "60")
        assert code == 0, report
        assert sorted(report["replayed_ids"]) == sorted(failed + held)
        assert report["still_missing"] == []
        # The accepted replays re-enabled the endpoint, and the report says so.
        assert [e["status"] for e in report["endpoints"]] == ["enabled"]


def test_reconcile_reports_events_without_webhook_and_paused_endpoints(
    site_settings: Settings, site: ChargifyStandIn
) -> None:
    settings = site_settings
    endpoint_id = site.add_endpoint(f"http://127.0.0.1:{free_port()}/webhooks/chargify", EVENTS)
    lost = pay(site, 1, lost=True)
    decided = pay(site, 2, lost=True)
    site.endpoints[endpoint_id].events.remove("refund_success")
    orphan = site.add_event("refund_success", subscription_id=SUB)  # not subscribed: no webhook
    site.add_event("renewal_success", subscription_id=SUB)  # not a type the pipeline acts on
    site.endpoints[endpoint_id].status = "paused"
    # The pipeline's outcome log knows one webhook the raw topic does not hold.
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        conn.execute(
            "insert into webhook_outcomes (webhook_id, outcome, stage, decided_at)"
            " values (%s, 'recorded', 'sink', now())",
            (decided,),
        )

    code, report = reconcile(settings, "--dry-run")
    assert code == 3
    assert [w["id"] for w in report["missing"]] == [lost]
    assert report["already_received"] == 1
    assert [e["id"] for e in report["events_without_webhook"]] == [orphan.id]
    assert report["events_checked"] == 3
    [endpoint] = report["endpoints"]
    assert endpoint["status"] == "paused" and "PAUSED" in endpoint["advice"]
    assert site.mutations() == []

    text = run_cli(settings, "reconcile", "--since", "1h", "--until", "0s", "--dry-run")
    assert text.returncode == 3
    assert f"event {orphan.id}  refund_success" in text.stdout
    assert "replay cannot bring it" in text.stdout and "is PAUSED" in text.stdout


def test_reconcile_leaves_the_other_endpoints_webhooks_alone(
    site_settings: Settings, site: ChargifyStandIn
) -> None:
    ours = f"http://127.0.0.1:{free_port()}/webhooks/chargify"
    site.add_endpoint(ours, EVENTS)
    site.add_endpoint(f"http://127.0.0.1:{free_port()}/partners", ["payment_success"])
    mine, theirs = payment(site, 1, lost=True)  # one copy per endpoint, each its own id

    done = run_cli(site_settings, "reconcile", "--since", "1h", "--until", "0s")
    assert done.returncode == 2 and "--url" in done.stderr
    assert site.mutations() == []

    code, report = reconcile(site_settings, "--url", ours)
    assert code == 0, report
    assert [w["id"] for w in report["missing"]] == [mine]
    assert (report["checked"], report["other_endpoints_webhooks"]) == (1, 1)
    assert site.replays == [[mine]] and theirs not in site.replays[0]


def test_replays_that_do_not_arrive_are_reported_still_missing(
    site_settings: Settings, site: ChargifyStandIn
) -> None:
    site.add_endpoint(f"http://127.0.0.1:{free_port()}/webhooks/chargify", EVENTS)  # down
    lost = pay(site, 1, lost=True)
    code, report = reconcile(site_settings, "--wait", "2")
    assert code == 3
    assert report["replayed_ids"] == [lost] and report["still_missing"] == [lost]
    assert report["waited_s"] >= 2


def test_reconcile_errors_name_the_key_and_say_what_was_done(
    site_settings: Settings, site: ChargifyStandIn
) -> None:
    wrong = site_settings.model_copy(update={"chargify_api_key": "wrong-key-123"})
    done = run_cli(wrong, "reconcile")
    assert done.returncode == 2
    assert "CHARGIFY_API_KEY" in done.stderr and "wrong-key-123" not in done.stderr + done.stdout

    away = site_settings.model_copy(update={"chargify_api_url": f"http://127.0.0.1:{free_port()}"})
    done = run_cli(away, "reconcile")
    assert done.returncode == 1
    assert "unreachable" in done.stderr and "nothing was compared or replayed" in done.stderr

    done = run_cli(site_settings, "reconcile", "--since", "tomorrow")
    assert done.returncode == 2 and "--since" in done.stderr

    # By default the last 10 minutes are left to Chargify's own retries.
    site.add_endpoint(f"http://127.0.0.1:{free_port()}/webhooks/chargify", EVENTS)
    pay(site, 1, lost=True)
    done = run_cli(site_settings, "reconcile", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checked"] == 0


def test_connect_points_the_site_at_the_gateway_once(
    site_settings: Settings, site: ChargifyStandIn, stages: Callable[..., Stage]
) -> None:
    settings = site_settings
    seed(settings)
    pipeline = Pipeline(settings, stages)
    url = f"{pipeline.base}/webhooks/chargify"

    dry = run_cli(settings, "connect", url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would create" in dry.stdout and site.mutations() == []

    first = run_cli(settings, "connect", url)
    assert first.returncode == 0, first.stderr
    assert "created endpoint" in first.stdout and "endpoint status: enabled" in first.stdout
    [endpoint] = site.endpoints.values()
    assert endpoint.url == url and sorted(endpoint.events) == sorted(EVENTS)
    assert site.webhooks_enabled

    second = run_cli(settings, "connect", url, "--json")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["action"] == "unchanged" and result["endpoint_status"] == "enabled"
    assert [e.id for e in site.endpoints.values()] == [endpoint.id]
    assert site.mutations()[-1].path == "/webhooks/settings.json"  # nothing else written

    webhook_id = pay(site, 42)
    pipeline.wait_for(
        "select transaction_id, webhook_id from transactions", [(TRANSACTION + 42, webhook_id)]
    )


def test_reconcile_every_serves_metrics(
    site_settings: Settings, site: ChargifyStandIn, stages: Callable[..., Stage]
) -> None:
    port = free_port()
    settings = site_settings.model_copy(update={"reconcile_metrics_port": port})
    site.add_endpoint(f"http://127.0.0.1:{free_port()}/webhooks/chargify", EVENTS)
    lost = pay(site, 1, lost=True)
    stage = stages("reconcile", settings, "--every", "1s", "--since", "1h", "--until", "0s")

    def metric(name: str) -> float | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    stage.wait_until(lambda: (metric("reconcile_replayed_total") or 0) >= 2, 60, "two passes")
    assert metric("reconcile_missing") == 1
    assert all(batch == [lost] for batch in site.replays)  # once per pass


def test_raw_topic_reader_reads_from_since_and_follows(settings: Settings) -> None:
    now = datetime.now(UTC)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})

    def raw(webhook_id: int, at: datetime) -> None:
        producer.produce(
            settings.topic("raw"), build_body("payment_success", webhook_id=webhook_id,
            event_id=webhook_id + 1), timestamp=int(at.timestamp() * 1000),
            headers=[("chargify-webhook-id", str(webhook_id).encode())],
        )  # fmt: skip
        producer.flush(10)

    raw(11, now - timedelta(days=3))  # before the window
    raw(12, now - timedelta(hours=1))
    with RawTopicReader(settings) as reader:
        assert reader.read(now - timedelta(days=2)) == {12}
        assert reader.event_ids == {13}
        assert not reader.truncated
        raw(14, now)
        assert reader.follow([14, 15], timeout=5) == {15}
        assert reader.ids == {12, 14}
