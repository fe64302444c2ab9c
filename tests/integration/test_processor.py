"""The processor worker (``chargify-stream processor``) against the real broker.

Raw records are written as the gateway writes them (body byte for byte, keyed by
subscription id, with its headers); the worker runs as a real process, and what it
publishes is read back from the output topics.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.settings import Settings
from chargify_stream.processors.clients import ensure_changelogs
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from tests.builders import build_body
from tests.kafka_tools import consume, end_offsets, headers_of, produce
from tests.stages import run_cli

pytestmark = pytest.mark.integration

Raw = tuple[bytes | None, bytes, list[tuple[str, bytes]]]

RECEIVED_AT = b"2024-10-11T19:28:31.000Z"


def raw(body: bytes, *, key: bytes | None, webhook_id: int | None, event: str) -> Raw:
    headers = [
        (h.EVENT, event.encode()),
        (h.RECEIVED_AT, RECEIVED_AT),
        (h.CONTENT_TYPE, b"application/x-www-form-urlencoded"),
        (h.SOURCE_IP, b"127.0.0.1"),
    ]
    if webhook_id is not None:
        headers.insert(0, (h.WEBHOOK_ID, str(webhook_id).encode()))
    return key, body, headers


def webhook(event: str, *, webhook_id: int, subscription_id: int = 15100141, **fields: Any) -> Raw:
    """A raw record as the gateway publishes it."""
    body = build_body(event, webhook_id=webhook_id, subscription_id=subscription_id, **fields)
    return raw(body, key=str(subscription_id).encode(), webhook_id=webhook_id, event=event)


def committed(settings: Settings, partitions: int) -> int:
    """The processor group's committed offsets on the raw topic, summed."""
    group = settings.processor_app_id
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group})
    try:
        tps = [TopicPartition(settings.topic("raw"), p) for p in range(partitions)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10))
    except KafkaException:  # the group's coordinator is still being set up
        return -1
    finally:
        consumer.close()


def wait_committed(settings: Settings, partitions: int, timeout: float = 30.0) -> None:
    """Until the processor has committed everything on the raw topic."""
    total = end_offsets(settings.kafka_bootstrap_servers, settings.topic("raw"))
    deadline = time.monotonic() + timeout
    while committed(settings, partitions) < total:
        assert time.monotonic() < deadline, "the processor did not commit the raw topic"
        time.sleep(0.3)


def by_topic(settings: Settings, name: str, count: int, **kwargs: Any) -> list[Message]:
    return consume(settings.kafka_bootstrap_servers, settings.topic(name), count=count, **kwargs)


def test_each_event_lands_on_its_topic_under_its_customer(
    make_settings: Callable[..., Settings], stages: Any
) -> None:
    settings = make_settings(partitions=3)
    malformed = b"id=5001&event=payment_success&payload[transaction][id]=%zz"
    records = [
        webhook("payment_success", webhook_id=1001, subscription_id=11, reference="c-pay",
                transaction_id=7001, amount_cents=4900),
        webhook("refund_success", webhook_id=1002, subscription_id=11, reference="c-pay",
                refund_id=7002, amount_cents=900, payment_id=7001),
        webhook("signup_success", webhook_id=1003, subscription_id=22, reference="c-sub"),
        webhook("subscription_state_change", webhook_id=1004, subscription_id=22,
                reference="c-sub", state="past_due"),
        webhook("subscription_product_change", webhook_id=1005, subscription_id=22,
                reference="c-sub", product_id=9),
        # Carries no customer: resolved through the table, from the signup above.
        webhook("component_allocation_change", webhook_id=1006, subscription_id=22),
        # An exact duplicate (a Chargify retry): dropped.
        webhook("payment_success", webhook_id=1001, subscription_id=11, reference="c-pay",
                transaction_id=7001, amount_cents=4900),
        # Dead letters.
        webhook("component_allocation_change", webhook_id=2001, subscription_id=404),
        webhook("payment_success", webhook_id=2002, subscription_id=33, reference=""),
        raw(malformed, key=b"5001", webhook_id=5001, event="payment_success"),
        # Ignored: the test event, a test-panel body, an event we do not act on.
        raw(b"id=123456&event=test&payload[chargify]=testing", key=b"123456",
            webhook_id=123456, event="test"),
        webhook("payment_success", webhook_id=3002, subscription_id=0, event_id=None),
        raw(build_body("signup_success", webhook_id=3003).replace(
            b"event=signup_success", b"event=renewal_success"),
            key=b"15100141", webhook_id=3003, event="renewal_success"),
    ]  # fmt: skip
    produce(settings.kafka_bootstrap_servers, settings.topic("raw"), records)
    processor = stages("processor", settings)

    metrics_url = f"http://127.0.0.1:{settings.processor_web_port}/metrics"

    def processed() -> float:
        try:
            text = httpx.get(metrics_url, timeout=2).text
        except httpx.HTTPError:
            return 0
        lines = text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith("processor_events_total"))

    processor.wait_until(lambda: processed() == len(records), 60, "every raw record processed")
    metrics = httpx.get(metrics_url).text

    # SIGTERM at once (before the periodic commit, most of the time): a clean exit that
    # commits everything acked.
    assert processor.stop() == 0
    assert committed(settings, 3) == len(records)

    # Read a little longer than needed, to see that nothing more arrived (no duplicate
    # payment, nothing for the ignored bodies).
    transactions = by_topic(settings, "transactions", 2, settle=1.0)
    subscriptions = by_topic(settings, "subscriptions", 4, settle=1.0)
    dead = by_topic(settings, "deadletter", 3, settle=1.0)
    assert (len(transactions), len(subscriptions), len(dead)) == (2, 4, 3)

    payment, refund = (decode(m.value()) for m in transactions)
    assert [m.key() for m in transactions] == [b"c-pay", b"c-pay"]
    assert isinstance(payment, Transaction) and isinstance(refund, Transaction)
    assert (payment.kind, payment.transaction_id, payment.amount_cents) == ("payment", 7001, 4900)
    assert (refund.kind, refund.amount_cents, refund.refunded_payment_id) == ("refund", -900, 7001)
    carried = headers_of(transactions[0])
    # Where the raw record was, for the outcome log.
    assert carried.pop(h.RAW_POSITION).startswith(f"{settings.topic('raw')}/".encode())
    assert carried == {
        h.WEBHOOK_ID: b"1001",
        h.EVENT: b"payment_success",
        h.RECEIVED_AT: RECEIVED_AT,
    }

    assert [m.key() for m in subscriptions] == [b"c-sub"] * 4
    changes = [decode(m.value()) for m in subscriptions]
    assert all(isinstance(c, SubscriptionChange) for c in changes)
    assert [(c.event, c.subscription_id) for c in changes] == [
        ("signup_success", 22),
        ("subscription_state_change", 22),
        ("subscription_product_change", 22),
        ("component_allocation_change", 22),
    ]
    assert [headers_of(m)[h.WEBHOOK_ID] for m in subscriptions] == [
        b"1003", b"1004", b"1005", b"1006"
    ]  # fmt: skip

    reasons = {headers_of(m)[h.DLQ_REASON]: m for m in dead}
    assert set(reasons) == {b"unknown_subscription", b"missing_customer_reference",
                            b"malformed_payload"}  # fmt: skip
    bad = reasons[b"malformed_payload"]
    assert (bad.key(), bad.value()) == (b"5001", malformed)
    bad_headers = headers_of(bad)
    for name, value in records[9][2]:
        assert bad_headers[name] == value  # the original headers, all of them
    assert bad_headers[h.DLQ_STAGE] == b"processor"
    assert bad_headers[h.DLQ_SOURCE_TOPIC] == settings.topic("raw").encode()
    assert bad_headers[h.DLQ_REPLAY_COUNT] == b"0"
    assert {h.DLQ_ERROR, h.DLQ_SOURCE_PARTITION, h.DLQ_SOURCE_OFFSET, h.DLQ_FAILED_AT} <= set(
        bad_headers
    )
    unknown = reasons[b"unknown_subscription"]
    assert unknown.key() == b"404" and unknown.value() == records[7][1]

    assert "processor_duplicates_total 1.0" in metrics
    assert 'processor_ignored_total{reason="test_event"} 1.0' in metrics
    assert 'processor_ignored_total{reason="test_panel"} 1.0' in metrics
    assert 'processor_ignored_total{reason="unsupported_event"} 1.0' in metrics
    assert 'processor_dead_letters_total{reason="unknown_subscription"} 1.0' in metrics
    assert 'processor_records_published_total{topic="subscriptions"} 4.0' in metrics
    assert 'processor_events_total{event="payment_success",outcome="emitted"} 1.0' in metrics
    # Every record read: no partition it took a batch from is behind.
    lag = [line for line in metrics.splitlines() if line.startswith("processor_consumer_lag{")]
    assert lag and all(line.endswith(" 0.0") for line in lag), lag


def test_state_survives_a_restart(make_settings: Callable[..., Settings], stages: Any) -> None:
    """References and dedup keys come back after SIGKILL (local copy plus changelog)."""
    settings = make_settings(partitions=2)
    bootstrap, raw_topic = settings.kafka_bootstrap_servers, settings.topic("raw")
    payment = webhook("payment_success", webhook_id=1101, subscription_id=77, reference="c-77")
    signup = webhook("signup_success", webhook_id=1100, subscription_id=77, reference="c-77")
    produce(bootstrap, raw_topic, [signup, payment])
    first = stages("processor", settings)
    assert len(by_topic(settings, "subscriptions", 1, timeout=60)) == 1
    wait_committed(settings, partitions=2)  # committed with the changelogs, in one transaction
    first.kill()

    produce(bootstrap, raw_topic, [
        payment,  # a replay of an emitted webhook: still a duplicate
        webhook("component_allocation_change", webhook_id=1102, subscription_id=77),
    ])  # fmt: skip
    second = stages("processor", settings)
    second.wait_for_log("state restored")
    wait_committed(settings, partitions=2, timeout=60)
    subscriptions = by_topic(settings, "subscriptions", 2)
    assert [m.key() for m in subscriptions] == [b"c-77", b"c-77"]
    assert headers_of(subscriptions[1])[h.EVENT] == b"component_allocation_change"
    transactions = by_topic(settings, "transactions", 1, settle=1.0)
    assert [headers_of(m)[h.WEBHOOK_ID] for m in transactions] == [b"1101"]
    assert end_offsets(settings.kafka_bootstrap_servers, settings.topic("deadletter")) == 0


@pytest.mark.parametrize("signal", ["SIGKILL", "SIGTERM"])
def test_a_worker_stopped_mid_stream_loses_and_doubles_nothing(
    make_settings: Callable[..., Settings], stages: Any, signal: str
) -> None:
    """Killed (an open transaction is left behind) or stopped (the batch in hand is
    finished): the next worker carries on from what was committed, so a read_committed
    reader sees every transaction exactly once, in each partition's order."""
    settings = make_settings(partitions=3)
    total = 8000
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("raw"),
        [
            webhook("payment_success", webhook_id=10_000 + i, subscription_id=500 + i % 40,
                    reference=f"c-{i % 40}", transaction_id=90_000 + i)
            for i in range(total)
        ],
    )  # fmt: skip
    first = stages("processor", settings)
    first.wait_until(
        lambda: end_offsets(settings.kafka_bootstrap_servers, settings.topic("transactions")) > 0,
        60,
        "the first outputs",
    )
    if signal == "SIGKILL":
        first.kill()
    else:
        assert first.stop() == 0
    assert committed(settings, 3) < total

    second = stages("processor", settings)
    wait_committed(settings, partitions=3, timeout=90)
    out = by_topic(settings, "transactions", total, timeout=60, settle=1.0)
    ids = [decode(m.value()).transaction_id for m in out]  # type: ignore[union-attr]
    assert Counter(ids) == Counter(90_000 + i for i in range(total))  # each exactly once
    # Per customer (one key, one partition), in the order the webhooks arrived.
    by_customer: dict[bytes | None, list[int]] = {}
    for m, txn in zip(out, ids, strict=True):
        by_customer.setdefault(m.key(), []).append(txn)
    assert all(seq == sorted(seq) for seq in by_customer.values())
    second.stop()


def test_a_changelog_partitioned_unlike_the_raw_topic_stops_the_start(
    make_settings: Callable[..., Settings], stages: Any
) -> None:
    settings = make_settings(partitions=2)
    changelog = f"{settings.processor_app_id}-references-changelog"
    ensure_topics(settings.kafka_bootstrap_servers, [changelog], partitions=3)
    processor = stages("processor", settings)
    assert processor.proc is not None and processor.proc.wait(60) == 2
    assert f"changelog topic {changelog} has 3 partitions" in processor.log()


def test_the_changelogs_are_created_partitioned_like_raw(
    make_settings: Callable[..., Settings],
) -> None:
    """References compacted; dedup keys deleted by time, a bucket past the window."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    settings = make_settings(partitions=2, processor_dedup_window_s=700)
    names = ensure_changelogs(settings, 2)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topics = admin.list_topics(timeout=10).topics
    wanted = {
        names.references: {"cleanup.policy": "compact"},
        names.dedup: {"cleanup.policy": "delete", "retention.ms": "800000"},
    }
    for name, expected in wanted.items():
        assert len(topics[name].partitions) == 2, name
        resource = ConfigResource(ConfigResource.Type.TOPIC, name)
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
        assert {key: configs[key].value for key in expected} == expected, name


def test_a_dead_letter_replayed_twice_is_emitted_once(
    make_settings: Callable[..., Settings], stages: Any
) -> None:
    """An allocation change for a subscription not yet known is dead-lettered; once the
    signup arrived, an operator replays it, then replays it again by mistake: the typed
    topic holds it once (the second replay is a duplicate of an emitted event)."""
    settings = make_settings(partitions=2)
    bootstrap, raw_topic = settings.kafka_bootstrap_servers, settings.topic("raw")
    produce(bootstrap, raw_topic, [webhook("component_allocation_change", webhook_id=1201,
                                           subscription_id=88)])  # fmt: skip
    stages("processor", settings)
    [dead] = by_topic(settings, "deadletter", 1)
    assert headers_of(dead)[h.DLQ_REASON] == b"unknown_subscription"
    produce(bootstrap, raw_topic, [webhook("signup_success", webhook_id=1200, subscription_id=88,
                                           reference="c-88")])  # fmt: skip
    by_topic(settings, "subscriptions", 1)
    for _ in range(2):
        replay = run_cli(settings, "dlq", "replay", "--reason", "unknown_subscription", "--json")
        assert replay.returncode == 0, replay.stderr
        assert json.loads(replay.stdout)["replayed"] == 1
    wait_committed(settings, partitions=2)
    out = by_topic(settings, "subscriptions", 2, settle=2.0)
    assert [headers_of(m)[h.WEBHOOK_ID] for m in out] == [b"1200", b"1201"]
    assert len(by_topic(settings, "deadletter", 1, settle=1.0)) == 1  # not failed again
