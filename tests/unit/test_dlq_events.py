"""Grouping dead-letter records into events, filtering them, and deciding what to replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chargify_stream.arguments import parse_time
from chargify_stream.base.messages import ConsumedFields
from chargify_stream.dlq import (
    DeadLetterEvent,
    DeadLetterRecord,
    Filters,
    format_age,
    group_events,
    plan_replay,
    replay_destination,
)
from chargify_stream.schemas.deadletter import dead_letter_headers, pointer

T0 = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
RAW, TXNS, DLQ = "chargify.webhooks.raw", "chargify.transactions", "chargify.deadletter"
RETRY = "chargify.sink.retry"
offsets = iter(range(1000))


def dead_letter(
    *,
    webhook: str | None = "9001",
    event: str = "payment_success",
    key: bytes | None = b"cust-1",
    reason: str = "customer_not_found",
    stage: str = "sink",
    source: str = TXNS,
    source_offset: int = 5,
    replay_count: int = 0,
    failed_at: datetime = T0,
    value: bytes | None = b"\xc3\x01value",
) -> DeadLetterRecord:
    original = [("chargify-event", event.encode())]
    if webhook is not None:
        original.insert(0, ("chargify-webhook-id", webhook.encode()))
    headers = dead_letter_headers(
        reason=reason,
        stage=stage,
        error="no customer with this customer_key",
        source_topic=source,
        source_partition=0,
        source_offset=source_offset,
        original_headers=original,
        replay_count=replay_count,
        failed_at=failed_at,
    )
    return DeadLetterRecord.build(
        topic=DLQ, partition=0, offset=next(offsets), key=key, value=value, headers=headers
    )


def consumed(record: DeadLetterRecord) -> ConsumedFields:
    """``record`` as the message it was read from, to read it again another way."""
    return ConsumedFields(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=list(record.headers),
        timestamp=record.timestamp,
    )


def bare(key: bytes = b"x") -> DeadLetterRecord:
    """A record on the dead-letter topic written by hand: no dlq-* headers."""
    return DeadLetterRecord.build(
        topic=DLQ,
        partition=0,
        offset=next(offsets),
        key=key,
        value=b"id=1&event=payment_success",
        headers=[("chargify-webhook-id", b"777")],
        timestamp=T0,
    )


def one(records: list[DeadLetterRecord]) -> DeadLetterEvent:
    [event] = group_events(records)
    return event


def test_a_record_that_failed_again_after_a_replay_is_one_event_with_its_latest_failure() -> None:
    first = dead_letter(source_offset=5, replay_count=0, failed_at=T0)
    # The replay landed at a new offset of the source topic and failed again.
    again = dead_letter(source_offset=9, replay_count=1, failed_at=T0 + timedelta(hours=1))
    event = one([again, first])
    assert event.latest is again
    assert event.attempts == 2
    assert len(event.records) == 2
    assert event.first_failed_at == T0
    assert event.last_failed_at == T0 + timedelta(hours=1)
    assert (event.reason, event.stage, event.customer, event.webhook_id, event.event) == (
        "customer_not_found",
        "sink",
        "cust-1",
        "9001",
        "payment_success",
    )


def test_processor_failure_then_sink_failure_is_one_event_shown_at_the_sink() -> None:
    at_processor = dead_letter(
        reason="unknown_subscription", stage="processor", source=RAW, key=b"15100141"
    )
    at_sink = dead_letter(replay_count=1, failed_at=T0 + timedelta(minutes=5))
    event = one([at_processor, at_sink])
    assert (event.reason, event.stage, event.attempts) == ("customer_not_found", "sink", 2)


def test_without_a_webhook_id_the_source_position_identifies_the_event() -> None:
    events = group_events(
        [dead_letter(webhook=None, source_offset=1), dead_letter(webhook=None, source_offset=2)]
    )
    assert [e.identity for e in events] == [f"source:{TXNS}[0]@1", f"source:{TXNS}[0]@2"]


def test_processor_dead_letters_have_no_customer() -> None:
    event = one([dead_letter(reason="missing_customer_reference", stage="processor", source=RAW)])
    assert event.customer is None


def test_a_record_without_dlq_headers_is_its_own_event_and_is_never_replayed() -> None:
    record = bare()
    event = one([record])
    assert event.info is None and event.reason is None
    assert event.identity == f"record:{record.position}"
    plan = plan_replay([event], max_attempts=5, input_topics=[TXNS], sink_retry_topic=RETRY)
    assert plan.replay == []
    assert "never replayed blindly" in plan.refused[0][1]


def test_max_attempts_counts_failures() -> None:
    fourth = one([dead_letter(replay_count=3)])
    fifth = one([dead_letter(webhook="2", replay_count=4)])
    plan = plan_replay([fourth, fifth], max_attempts=5, input_topics=[TXNS], sink_retry_topic=RETRY)
    assert plan.replay == [fourth]
    assert plan.refused == [(fifth, "failed 5 times (--max-attempts 5)")]


def test_replay_only_from_input_topics_to_existing_topics() -> None:
    loop = one([dead_letter(source=DLQ)])
    gone = one([dead_letter(webhook="3", reason="malformed_payload", stage="processor",
                            source="old.topic")])  # fmt: skip
    # A sink dead letter goes to the retry topic, whether or not its typed topic still exists.
    sink = one([dead_letter(webhook="4", source="old.topic")])
    plan = plan_replay(
        [loop, gone, sink],
        max_attempts=5,
        input_topics=[TXNS, "old.topic"],
        sink_retry_topic=RETRY,
        existing_topics=[TXNS, RETRY],
    )
    assert plan.replay == [sink]
    assert [why for _, why in plan.refused] == [
        f"source topic {DLQ} is not an input of this pipeline",
        "topic old.topic does not exist",
    ]


def test_sink_dead_letters_replay_to_the_retry_topic_processor_ones_to_their_source() -> None:
    first = dead_letter(source=TXNS)
    again = dead_letter(source=RETRY, replay_count=1)  # a retry that failed again
    processor = dead_letter(webhook="5", reason="unknown_subscription", stage="processor",
                            source=RAW, source_offset=41)  # fmt: skip
    for record in (first, again):
        assert record.info is not None
        assert replay_destination(record.info, RETRY) == (RETRY, None)
    assert processor.info is not None
    assert replay_destination(processor.info, RETRY) == (RAW, 0)
    # The retry's failure is the same event as the first one, and shows its customer.
    event = one([first, again])
    assert (event.attempts, len(event.records), event.customer) == (2, 2, "cust-1")
    assert event.latest is again


def test_filters_apply_to_the_latest_failure() -> None:
    a = one([dead_letter(webhook="1", key=b"cust-a", failed_at=T0)])
    b = one(
        [
            dead_letter(
                webhook="2",
                key=b"cust-b",
                event="signup_success",
                failed_at=T0 + timedelta(days=1),
            )
        ]
    )
    p = one([dead_letter(webhook="3", reason="malformed_payload", stage="processor", source=RAW)])
    events = [a, b, p]

    def chosen(**kw: object) -> list[DeadLetterEvent]:
        return [e for e in events if Filters(**kw).matches(e)]  # type: ignore[arg-type]

    assert chosen() == events
    assert chosen(reasons=frozenset({"customer_not_found"})) == [a, b]
    assert chosen(events=frozenset({"signup_success"})) == [b]
    assert chosen(customers=frozenset({"cust-a"})) == [a]
    assert chosen(since=T0 + timedelta(hours=1)) == [b]
    assert chosen(until=T0 + timedelta(hours=1)) == [a, p]
    assert chosen(since=T0, until=T0 + timedelta(days=1)) == [a, p]  # until is exclusive


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
        ("2026-11-27T05:00:00-05:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
        ("2026-11-27 10:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=UTC)),
        ("90s", T0 - timedelta(seconds=90)),
        ("15m", T0 - timedelta(minutes=15)),
        ("2h", T0 - timedelta(hours=2)),
        ("7d", T0 - timedelta(days=7)),
        ("1w", T0 - timedelta(weeks=1)),
    ],
)
def test_time_filters(text: str, expected: datetime) -> None:
    assert parse_time(text, T0) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "5 parsecs", "", "-2h", "2026/11/27"])
def test_malformed_time_filters_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_time(text, T0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (5, "5s"),
        (600, "10m"),
        (3 * 3600 + 240, "3h 4m"),
        (2 * 86400 + 5 * 3600, "2d 5h"),
    ],
)
def test_ages_read_at_a_glance(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


def test_a_pointer_whose_original_is_gone_is_refused_and_says_where_it_was() -> None:
    whole = dead_letter(webhook="9002")
    key, headers = pointer(whole.key, 1_048_576, list(whole.headers), refusal="MSG_SIZE_TOO_LARGE")
    record = DeadLetterRecord.build(
        topic=DLQ, partition=0, offset=next(offsets), key=key, value=None, headers=headers
    )
    [event] = group_events([record])
    assert event.info is not None and event.info.pointer
    assert event.as_json(T0)["pointer"] is True
    assert event.as_json(T0)["original_size"] == 1_048_576
    plan = plan_replay([event], max_attempts=5, input_topics=[TXNS], sink_retry_topic=RETRY)
    [(refused, why)] = plan.refused
    assert refused is event
    assert why == f"a pointer, and its original at {TXNS}[0]@5 is no longer there"


def test_a_scan_keeps_a_summary_of_each_record_without_its_value() -> None:
    full = dead_letter(webhook="9100", replay_count=2)
    summary = DeadLetterRecord.build(**consumed(full), keep_value=False)
    assert (summary.value, summary.has_value, summary.info) == (None, True, full.info)
    assert {name for name, _ in summary.headers} == {"chargify-webhook-id", "chargify-event"}
    first = dead_letter(webhook="9100", replay_count=1)
    event = one([first, summary])
    assert (event.latest, event.webhook_id, event.event, event.attempts) == (
        summary,
        "9100",
        "payment_success",
        3,
    )
    assert event.records == (("customer_not_found", "sink"), ("customer_not_found", "sink"))
