"""The sink's retries go through ``chargify.sink.retry``, never the typed topics again.

Real processor and sink processes, a real broker and Postgres: a payment and a signup for
an unknown customer are parked, re-driven once the customer exists, then replayed twice by
an operator. A ``read_committed`` reader of the typed topics sees each record once, and
Postgres holds the payment once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from chargify_stream.base.settings import Settings
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.deadletter import format_timestamp
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from tests.builders import build_body
from tests.integration.test_dlq import (
    cli_json,
    ends,
    payment,
    query,
    sink_caught_up,
    wait_for,
)
from tests.kafka_tools import consume, headers_of, produce

pytestmark = pytest.mark.integration

CUSTOMER = "cust-retry"


def webhook(
    event: str, webhook_id: int, *, reference: str = CUSTOMER, **fields: Any
) -> tuple[bytes, bytes, list[Any]]:
    """A raw-topic record, as the gateway writes it."""
    body = build_body(event, webhook_id=webhook_id, reference=reference, **fields)
    return (
        str(fields["subscription_id"]).encode(),
        body,
        [
            ("chargify-webhook-id", str(webhook_id).encode()),
            ("chargify-event", event.encode()),
            ("received-at", format_timestamp(datetime.now(UTC)).encode()),
            ("content-type", b"application/x-www-form-urlencoded"),
            ("source-ip", b"127.0.0.1"),
        ],
    )


def test_a_park_a_redrive_and_two_replays_leave_each_record_once(
    settings: Settings, stages: Any
) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    stages("processor", settings)
    stages("sink", settings)
    produce(
        bootstrap,
        settings.topic("raw"),
        [
            webhook("signup_success", 4_400_000_001, subscription_id=4_400_000_002),
            webhook(
                "payment_success",
                4_400_000_003,
                subscription_id=4_400_000_002,
                transaction_id=4_400_000_004,
                amount_cents=2_500,
            ),
        ],
    )
    wait_for(lambda: ends(settings)["deadletter"] == 2, "both records parked", timeout=60)
    wait_for(
        lambda: query(settings, "select count(*) from parked_events")[0][0] == 2,
        "the dead letters indexed",
    )

    # Any path creating the customer re-drives: here plain SQL.
    query(settings, "insert into partners (partner_key) values ('p-retry') returning 1")
    query(
        settings,
        "insert into customers (customer_key, partner_key) values (%s, 'p-retry') returning 1",
        CUSTOMER,
    )
    wait_for(
        lambda: (
            query(settings, "select 1 from transactions")
            and query(settings, "select 1 from subscriptions")
        ),
        "the re-driven rows",
    )
    wait_for(lambda: sink_caught_up(settings), "the sink to catch up")
    assert ends(settings)["sink_retry"] == 2

    # The re-drive recorded both events, so they are resolved: replaying them again is an
    # operator's explicit choice, and must still change nothing.
    skipped = cli_json(settings, "dlq", "replay", "--customer", CUSTOMER, "--dry-run", code=3)
    assert (skipped["selected"], skipped["would_replay"]) == (2, 0), skipped
    for round_ in (1, 2):
        done = cli_json(settings, "dlq", "replay", "--customer", CUSTOMER, "--include-resolved")
        assert (done["selected"], done["replayed"], done["refused"]) == (2, 2, 0), done
        assert {r["to_topic"] for r in done["records"]} == {settings.topic("sink_retry")}
        assert ends(settings)["sink_retry"] == 2 + 2 * round_
        wait_for(lambda: sink_caught_up(settings), "the sink to consume the replays")

    # Read as an analyst does (read_committed): each record once on the typed topics.
    payments = consume(bootstrap, settings.topic("transactions"), count=1, settle=3.0)
    changes = consume(bootstrap, settings.topic("subscriptions"), count=1, settle=0.5)
    paid = [decode(m.value() or b"") for m in payments]
    assert [
        (r.transaction_id, r.amount_cents, r.customer_reference, r.webhook_id)
        for r in paid
        if isinstance(r, Transaction)
    ] == [(4_400_000_004, 2_500, CUSTOMER, 4_400_000_003)]
    assert [type(decode(m.value() or b"")) for m in changes] == [SubscriptionChange]
    assert all("dlq-replay-count" not in headers_of(m) for m in payments + changes)

    # The retry topic holds the re-drive and both replays, each with its own count.
    retries = consume(bootstrap, settings.topic("sink_retry"), count=6, settle=0.5)
    counts = sorted(headers_of(m)["dlq-replay-count"] for m in retries)
    assert counts == [b"1"] * 6  # each from the first dead letter: 0 + 1

    assert query(
        settings, "select transaction_id, customer_key, partner_key, amount_cents from transactions"
    ) == [(4_400_000_004, CUSTOMER, "p-retry", 2_500)]
    assert query(settings, "select subscription_id, customer_key from subscriptions") == [
        (4_400_000_002, CUSTOMER)
    ]
    assert ends(settings)["deadletter"] == 2  # nothing failed again
    [event] = [e for e in cli_json(settings, "dlq", "list") if e["event"] == "payment_success"]
    assert (event["customer"], event["attempts"]) == (CUSTOMER, 1)


def test_a_retry_that_fails_again_is_listed_and_replayed_from_the_retry_topic(
    settings: Settings, stages: Any
) -> None:
    bootstrap, retry = settings.kafka_bootstrap_servers, settings.topic("sink_retry")
    stages("sink", settings)
    produce(bootstrap, settings.topic("transactions"), [payment("cust-gone", amount_cents=300)])
    wait_for(lambda: ends(settings)["deadletter"] == 1, "the first dead letter")

    # The customer still does not exist: the replay, read from the retry topic, fails again.
    first = cli_json(settings, "dlq", "replay", "--customer", "cust-gone")
    assert first["replayed"] == 1
    wait_for(lambda: ends(settings)["deadletter"] == 2, "the retry dead-lettered again")
    [event] = cli_json(settings, "dlq", "list", "--customer", "cust-gone")
    assert (event["attempts"], event["records"], event["stage"]) == (2, 2, "sink")
    assert (event["source_topic"], event["reason"]) == (retry, "customer_not_found")
    stats = cli_json(settings, "dlq", "stats")
    assert stats["by_stage"] == {"sink": {"events": 1, "records": 2}}

    # Once the customer exists, the re-driver sends the latest failure back to the retry
    # topic, with its count + 1, and the payment lands once.
    query(settings, "insert into customers (customer_key) values ('cust-gone') returning 1")
    wait_for(lambda: query(settings, "select 1 from transactions"), "the re-driven payment")
    retries = consume(bootstrap, retry, count=2, settle=0.5)
    assert [headers_of(m)["dlq-replay-count"] for m in retries] == [b"1", b"2"]
    # Read as an analyst does (the end offset also counts the transaction's commit marker).
    typed = consume(
        settings.kafka_bootstrap_servers, settings.topic("transactions"), count=2, timeout=5
    )
    assert len(typed) == 1
    assert query(settings, "select count(*), sum(amount_cents) from transactions") == [(1, 300)]

    # The retry topic keeps what it carries like the dead-letter topic does.
    admin = AdminClient({"bootstrap.servers": bootstrap})
    wanted = ("retention.ms", "retention.bytes", "max.message.bytes")
    configs = []
    for topic in (retry, settings.topic("deadletter")):
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        found = admin.describe_configs([resource])[resource].result(timeout=10)
        configs.append({key: found[key].value for key in wanted})
    assert configs[0] == configs[1]
    assert configs[0]["retention.ms"] == "-1"
