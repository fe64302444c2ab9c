"""The re-driver's decisions: which dead letters are parked, and which one per event goes back."""

from __future__ import annotations

from chargify_stream.base.messages import ConsumedFields
from chargify_stream.dlq import DeadLetterRecord
from chargify_stream.sink.parked import Claimed, ParkedEvent, choose_redrives, parkable
from tests.unit.test_dlq_events import DLQ, RAW, RETRY, TXNS, consumed, dead_letter

SINK_TOPICS = (TXNS, "chargify.subscriptions", RETRY)


def park_record(record: DeadLetterRecord) -> ParkedEvent | None:
    return parkable(consumed(record), sink_topics=SINK_TOPICS)


def park(**kw: object) -> ParkedEvent | None:
    return park_record(dead_letter(**kw))  # type: ignore[arg-type]


def test_a_sink_customer_not_found_is_parked_under_its_key() -> None:
    record = dead_letter(key=b"cust-9", replay_count=2)
    parked = park_record(record)
    assert parked is not None
    assert (parked.customer_key, parked.source_topic, parked.replay_count) == ("cust-9", TXNS, 2)
    assert (parked.webhook_id, parked.event) == ("9001", "payment_success")
    assert parked.headers == list(record.headers)
    assert parked.value == record.value


def test_only_sink_customer_not_found_records_are_parked() -> None:
    assert park(reason="unknown_subscription", stage="processor", source=RAW) is None
    assert park(reason="unsupported_schema") is None
    assert park(source=DLQ) is None  # never re-publish onto a topic the sink does not read
    assert park(key=None) is None


def test_a_retry_that_failed_again_is_parked_too() -> None:
    parked = park(source=RETRY, replay_count=1)
    assert parked is not None
    assert (parked.source_topic, parked.replay_count) == (RETRY, 1)


def test_a_record_without_dlq_headers_is_never_parked() -> None:
    assert (
        parkable(
            ConsumedFields(
                topic=DLQ,
                partition=0,
                offset=1,
                key=b"cust-1",
                value=b"v",
                headers=[("chargify-webhook-id", b"1")],
                timestamp=None,
            ),
            sink_topics=SINK_TOPICS,
        )
        is None
    )


def claimed(offset: int, webhook: str | None, replay_count: int) -> Claimed:
    return Claimed(
        dlq_topic=DLQ,
        dlq_partition=0,
        dlq_offset=offset,
        customer_key="cust-1",
        source_topic=TXNS,
        source_partition=0,
        source_offset=100 + offset,
        record_key=b"cust-1",
        value=b"v",
        headers=[],
        webhook_id=webhook,
        replay_count=replay_count,
    )


def test_one_redrive_per_event_with_the_highest_replay_count() -> None:
    rows = [claimed(1, "7", 0), claimed(2, "8", 0), claimed(3, "7", 1), claimed(4, None, 0)]
    assert [r.dlq_offset for r in choose_redrives(rows)] == [3, 2, 4]
