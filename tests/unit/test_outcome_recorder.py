"""What each dead letter and decision record means to the outcome log (no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime

from chargify_stream.base.settings import load_settings
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import dead_letter_headers
from chargify_stream.schemas.decisions import Decision, encode_decision
from chargify_stream.sink.outcomes import parse_position, source_of
from chargify_stream.sink.recorder import delivery_of

SETTINGS = load_settings(kafka_topic_prefix="t.")
NOW = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
FAILED = datetime(2026, 12, 5, 6, 59, tzinfo=UTC)
ORIGINAL = [
    (h.WEBHOOK_ID, b"812345678"),
    (h.EVENT, b"payment_success"),
    (h.RECEIVED_AT, b"2026-12-05T06:58:00.000Z"),
]


def letter(stage: str, reason: str, original: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return dead_letter_headers(
        reason=reason, stage=stage, error="why", source_topic="src", source_partition=2,
        source_offset=40, original_headers=original, failed_at=FAILED,
    )  # fmt: skip


def test_a_processor_dead_letter_is_the_decision_on_its_raw_record() -> None:
    d = delivery_of(
        SETTINGS, topic="t.chargify.deadletter", partition=1, offset=7, key=b"99",
        value=b"body", headers=letter("processor", h.UNKNOWN_SUBSCRIPTION, ORIGINAL),
        timestamp=NOW,
    )  # fmt: skip
    assert d is not None
    assert (d.webhook_id, d.stage, d.decision, d.reason) == (
        812345678, "processor", "dead_lettered", "unknown_subscription",
    )  # fmt: skip
    assert (d.topic, d.partition, d.offset, d.at) == ("t.chargify.deadletter", 1, 7, FAILED)
    assert (d.source_topic, d.source_partition, d.source_offset) == ("src", 2, 40)
    assert d.attempt and d.customer_key is None
    assert d.received_at == datetime(2026, 12, 5, 6, 58, tzinfo=UTC)


def test_a_sink_dead_letter_names_the_raw_record_through_the_typed_one() -> None:
    typed = [*ORIGINAL, (h.RAW_POSITION, b"t.chargify.webhooks.raw/0/12")]
    d = delivery_of(
        SETTINGS, topic="t.chargify.deadletter", partition=0, offset=3, key=b"cust-9",
        value=b"avro", headers=letter("sink", h.CUSTOMER_NOT_FOUND, typed), timestamp=NOW,
    )  # fmt: skip
    assert d is not None
    assert (d.stage, d.decision, d.customer_key, d.attempt) == ("sink", "parked", "cust-9", False)
    assert (d.source_topic, d.source_partition, d.source_offset) == (
        "t.chargify.webhooks.raw", 0, 12,
    )  # fmt: skip


def test_a_decision_record() -> None:
    value = encode_decision(
        Decision("812345678", "ignored", "test_panel", "payment_success", None,
                 "2026-12-05T07:00:00.000001Z", "t.chargify.webhooks.raw", 1, 5, 0)
    )  # fmt: skip
    d = delivery_of(
        SETTINGS, topic="t.chargify.processor.decisions", partition=0, offset=0,
        key=b"812345678", value=value, headers=[], timestamp=NOW,
    )  # fmt: skip
    assert d is not None
    assert (d.decision, d.reason, d.topic, d.offset, d.attempt) == (
        "ignored", "test_panel", "t.chargify.webhooks.raw", 5, True,
    )  # fmt: skip
    assert d.at == datetime(2026, 12, 5, 7, 0, 0, 1, tzinfo=UTC)


def test_records_without_a_usable_webhook_id_are_skipped() -> None:
    for original in ([], [(h.WEBHOOK_ID, b"abc")], [(h.WEBHOOK_ID, b"99999999999999999999")]):
        assert (
            delivery_of(
                SETTINGS,
                topic="t.chargify.deadletter",
                partition=0,
                offset=0,
                key=None,
                value=b"",
                headers=letter("processor", h.MALFORMED_PAYLOAD, original),
                timestamp=NOW,
            )
            is None
        )
    assert (
        delivery_of(
            SETTINGS,
            topic="t.chargify.processor.decisions",
            partition=0,
            offset=0,
            key=None,
            value=b"not json",
            headers=[],
            timestamp=NOW,
        )
        is None
    )


def test_the_sink_reads_where_a_typed_record_came_from() -> None:
    source = source_of(
        "t.chargify.transactions", 2, 9,
        [*ORIGINAL, (h.DLQ_REPLAY_COUNT, b"1"), (h.RAW_POSITION, b"a.b-c_d/1/2")],
    )  # fmt: skip
    assert source.replay_count == 1 and source.raw == ("a.b-c_d", 1, 2)
    assert parse_position(b"no-position") is None and parse_position(b"t/x/1") is None
