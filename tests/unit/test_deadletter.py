"""Dead-letter headers: building, replaying and reading them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from chargify_stream.schemas import headers
from chargify_stream.schemas.deadletter import (
    ERROR_MAX_CHARS,
    DeadLetterInfo,
    dead_letter_headers,
    parse_dead_letter,
    pointer,
    replay_headers,
)

ORIGINAL = [
    (headers.WEBHOOK_ID, b"141765008"),
    (headers.EVENT, b"payment_success"),
    (headers.RECEIVED_AT, b"2024-10-11T19:28:31.000Z"),
]
FAILED_AT = datetime(2024, 10, 11, 19, 28, 32, 500000, tzinfo=UTC)


def build(**overrides: object) -> list[tuple[str, bytes]]:
    fields: dict[str, object] = {
        "reason": "missing_customer_reference",
        "stage": "processor",
        "error": "payment_success: the customer reference in the payload is empty",
        "source_topic": "chargify.webhooks.raw",
        "source_partition": 3,
        "source_offset": 1234567,
        "original_headers": ORIGINAL,
        "failed_at": FAILED_AT,
    }
    fields.update(overrides)
    return dead_letter_headers(**fields)  # type: ignore[arg-type]


def test_original_headers_then_every_dlq_header() -> None:
    result = build()
    assert result == [
        *ORIGINAL,
        ("dlq-reason", b"missing_customer_reference"),
        ("dlq-stage", b"processor"),
        ("dlq-error", b"payment_success: the customer reference in the payload is empty"),
        ("dlq-source-topic", b"chargify.webhooks.raw"),
        ("dlq-source-partition", b"3"),
        ("dlq-source-offset", b"1234567"),
        ("dlq-failed-at", b"2024-10-11T19:28:32.500Z"),
        ("dlq-replay-count", b"0"),
    ]
    assert {name for name, _ in result} >= set(headers.DLQ_HEADERS)


def test_failed_at_is_converted_to_utc_and_defaults_to_now() -> None:
    eastern = datetime(2024, 10, 11, 15, 28, 32, tzinfo=timezone(timedelta(hours=-4)))
    assert dict(build(failed_at=eastern))["dlq-failed-at"] == b"2024-10-11T19:28:32.000Z"
    before = datetime.now(UTC)
    stamped = dict(build(failed_at=None))["dlq-failed-at"].decode()
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(stamped) <= datetime.now(UTC)


@pytest.mark.parametrize("reason", headers.REASONS)
def test_every_reason_code_is_accepted(reason: str) -> None:
    assert dict(build(reason=reason))["dlq-reason"] == reason.encode()


@pytest.mark.parametrize(("field", "value"), [("reason", "oops"), ("stage", "gateway")])
def test_unknown_reason_or_stage_is_rejected(field: str, value: str) -> None:
    with pytest.raises(ValueError):
        build(**{field: value})


def test_error_is_truncated_single_line_and_never_carries_form_data() -> None:
    body = "id=1&event=payment_success&payload[subscription][customer][email]=a%40b.c"
    result = dict(build(error=f"could not parse\n{body}\tat all " + "x" * 2000))
    error = result["dlq-error"].decode()
    assert len(error) <= ERROR_MAX_CHARS
    assert "\n" not in error and "\t" not in error
    assert "email" not in error and "a%40b.c" not in error
    assert error.startswith("could not parse [form data removed] at all")


def test_old_dlq_headers_are_replaced_and_replay_count_is_kept() -> None:
    replayed = [*ORIGINAL, ("dlq-replay-count", b"2")]
    previous = [*ORIGINAL, ("dlq-reason", b"customer_not_found"), ("dlq-replay-count", b"2")]
    for original in (replayed, previous):
        result = build(original_headers=original)
        assert [value for name, value in result if name == "dlq-reason"] == [
            b"missing_customer_reference"
        ]
        assert dict(result)["dlq-replay-count"] == b"2"
        assert sum(name.startswith("dlq-") for name, _ in result) == len(headers.DLQ_HEADERS)
    assert dict(build(original_headers=replayed, replay_count=7))["dlq-replay-count"] == b"7"


def test_replay_headers_restore_the_originals_and_count() -> None:
    first = replay_headers(build())
    assert first == [*ORIGINAL, ("dlq-replay-count", b"1")]
    again = build(original_headers=first, stage="sink", reason="customer_not_found")
    assert replay_headers(again) == [*ORIGINAL, ("dlq-replay-count", b"2")]


def test_replay_of_an_unreadable_count_starts_over() -> None:
    assert replay_headers([*ORIGINAL, ("dlq-replay-count", b"many")])[-1] == (
        "dlq-replay-count",
        b"1",
    )


def test_parse_dead_letter_round_trip() -> None:
    assert parse_dead_letter(build(replay_count=4)) == DeadLetterInfo(
        reason="missing_customer_reference",
        stage="processor",
        error="payment_success: the customer reference in the payload is empty",
        source_topic="chargify.webhooks.raw",
        source_partition=3,
        source_offset=1234567,
        failed_at=FAILED_AT,
        replay_count=4,
    )


def test_parse_dead_letter_without_dlq_headers_is_none() -> None:
    assert parse_dead_letter(ORIGINAL) is None
    assert parse_dead_letter([]) is None
    incomplete = [(name, value) for name, value in build() if name != "dlq-source-offset"]
    assert parse_dead_letter(incomplete) is None
    unreadable = [(n, b"x" if n == "dlq-source-partition" else v) for n, v in build()]
    assert parse_dead_letter(unreadable) is None


def test_a_pointer_keeps_where_the_original_is_and_why_but_no_body() -> None:
    letter = [("content-type", b"application/x-www-form-urlencoded"), *build()]
    key, result = pointer(b"15100141", 1_048_576, letter, refusal="MSG_SIZE_TOO_LARGE (too big)")
    assert key == b"15100141"
    found = dict(result)
    assert "content-type" not in found  # only the small carried-over originals
    for name, value in ORIGINAL:
        assert found[name] == value
    for name in headers.DLQ_HEADERS:
        if name != headers.DLQ_ERROR:
            assert found[name] == dict(letter)[name]
    assert found[headers.DLQ_ERROR].startswith(dict(letter)[headers.DLQ_ERROR])
    assert b"written as a pointer" in found[headers.DLQ_ERROR]
    assert b"MSG_SIZE_TOO_LARGE" in found[headers.DLQ_ERROR]
    info = parse_dead_letter(result)
    assert info is not None
    assert (info.pointer, info.original_size, info.source_offset) == (True, 1_048_576, 1234567)
    assert info.reason == "missing_customer_reference"


def test_a_pointer_always_fits() -> None:
    huge = [(headers.WEBHOOK_ID, b"9" * 100_000), *build(error="x" * 100_000)]
    key, result = pointer(b"k" * 2_000_000, 5, huge, refusal="r" * 100_000)
    assert key is None
    assert sum(len(n) + len(v) for n, v in result) < 2_000
    assert parse_dead_letter(result) is not None


def test_a_whole_dead_letter_is_no_pointer() -> None:
    info = parse_dead_letter(build())
    assert info is not None and not info.pointer and info.original_size is None
