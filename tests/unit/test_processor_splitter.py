"""The processor's per-batch logic (``processors.splitter.split``), without Kafka.

The state is the real local store (:class:`processors.state.Store`, SQLite in a
temporary folder), filled as committed batches fill it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chargify_stream.processors import splitter
from chargify_stream.processors.splitter import (
    EVENT_KEY,
    TRANSACTION_KEY,
    WEBHOOK_KEY,
    Incoming,
    Split,
    split,
)
from chargify_stream.processors.state import Store
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.deadletter import parse_dead_letter
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from tests.builders import build_body

MakeStore = Callable[..., Store]


@pytest.fixture
def make_store(tmp_path: Path) -> MakeStore:
    made = 0

    def make(
        references: dict[str, str] | None = None, seen: set[int] | None = None, partition: int = 0
    ) -> Store:
        nonlocal made
        made += 1
        folder = tmp_path / f"store-{made}"
        folder.mkdir()
        store = Store(folder, 3600)
        store.apply(
            references={(partition, sid): ref for sid, ref in (references or {}).items()},
            seen=[(time.time(), sorted(seen or ()))],
        )
        return store

    return make


def commit(store: Store, result: Split) -> None:
    """What the pipeline does once a batch's transaction committed."""
    store.apply(
        references=result.learned,
        seen=[(time.time(), keys) for keys in result.emitted.values()],
    )


def w(webhook_id: int) -> int:
    return webhook_id * 4 + WEBHOOK_KEY


def e(event_id: int) -> int:
    return event_id * 4 + EVENT_KEY


def t(transaction_id: int) -> int:
    return transaction_id * 4 + TRANSACTION_KEY


def incoming(
    event: str,
    webhook_id: int,
    *,
    offset: int = 0,
    partition: int = 0,
    subscription_id: int = 15100141,
    extra_headers: list[tuple[str, bytes]] | None = None,
    with_id_header: bool = True,
    **fields: Any,
) -> Incoming:
    fields.setdefault("event_id", 40_000 + webhook_id)
    if event == "payment_success":
        fields.setdefault("transaction_id", 70_000 + webhook_id)
    body = build_body(event, webhook_id=webhook_id, subscription_id=subscription_id, **fields)
    headers = [
        (h.EVENT, event.encode()),
        (h.RECEIVED_AT, b"2024-10-11T19:28:31.000Z"),
        (h.SOURCE_IP, b"10.0.0.1"),
        *(extra_headers or []),
    ]
    if with_id_header:
        headers.insert(0, (h.WEBHOOK_ID, str(webhook_id).encode()))
    return Incoming("raw", partition, offset, str(subscription_id).encode(), body, headers)


def test_emits_avro_under_the_customer_with_the_carried_headers(make_store: MakeStore) -> None:
    record = incoming("payment_success", 1, reference="cust-1", transaction_id=70, event_id=9)
    result = split([record], make_store())
    [out] = result.outgoing
    assert (out.topic, out.key) == ("transactions", b"cust-1")
    value = decode(out.value)
    assert isinstance(value, Transaction) and value.transaction_id == 70
    assert out.headers == [
        (h.WEBHOOK_ID, b"1"),
        (h.EVENT, b"payment_success"),
        (h.RECEIVED_AT, b"2024-10-11T19:28:31.000Z"),
        (h.RAW_POSITION, b"raw/0/0"),
    ]
    assert result.emitted == {0: [w(1), t(70)]}
    assert result.tally.events == {("payment_success", "emitted"): 1}
    assert result.tally.published == {"transactions": 1}


def test_dead_letter_keeps_the_raw_record_and_says_why(make_store: MakeStore) -> None:
    record = incoming("component_allocation_change", 9, offset=41, partition=2)
    result = split([record], make_store())
    [out] = result.outgoing
    assert (out.topic, out.key, out.value) == ("deadletter", record.key, record.value)
    assert out.headers[: len(record.headers)] == record.headers
    info = parse_dead_letter(out.headers)
    assert info is not None
    assert (info.reason, info.stage) == ("unknown_subscription", "processor")
    assert info.source_topic == "raw"
    assert (info.source_partition, info.source_offset, info.replay_count) == (2, 41, 0)
    assert result.emitted == {}  # a dead letter gets a fresh chance if sent again
    assert result.tally.dead_letters == {"unknown_subscription": 1}


def test_duplicates_are_dropped_across_and_within_batches(make_store: MakeStore) -> None:
    store = make_store(seen={w(5), t(70_005)})
    batch = [
        incoming("payment_success", 5),  # emitted earlier
        incoming("payment_success", 6, offset=1),
        incoming("payment_success", 6, offset=2),  # again, in the same batch
    ]
    result = split(batch, store)
    assert [o.headers[0] for o in result.outgoing] == [(h.WEBHOOK_ID, b"6")]
    assert result.tally.events[("payment_success", "duplicate")] == 2
    commit(store, result)
    again = split([incoming("payment_success", 6, offset=3)], store)  # a later batch
    assert again.outgoing == [] and again.tally.events[("payment_success", "duplicate")] == 1


def test_one_chargify_event_under_two_webhook_ids_is_emitted_once(make_store: MakeStore) -> None:
    """One event sent to two endpoints: two webhook ids, one event id and transaction id."""
    store = make_store()
    first = incoming("payment_success", 3000000010, event_id=55, transaction_id=8000000001)
    second = incoming("payment_success", 3000000011, event_id=55, transaction_id=8000000001)
    result = split([first, second], store)
    assert [o.headers[0] for o in result.outgoing] == [(h.WEBHOOK_ID, b"3000000010")]
    from chargify_stream.schemas.decisions import decode_decision

    [decided] = (decode_decision(d.value) for d in result.decisions)
    assert decided is not None and (decided.webhook_id, decided.decision) == (
        "3000000011",
        "unchanged",
    )
    commit(store, result)
    # In a later batch, and by the transaction id alone (a replay under a new webhook id).
    later = incoming("payment_success", 3000000012, event_id=56, transaction_id=8000000001)
    assert split([later], store).outgoing == []
    # A subscription event under two webhook ids: its event id.
    signup = incoming("signup_success", 3000000013, event_id=57, offset=1)
    again = incoming("signup_success", 3000000014, event_id=57, offset=2)
    assert len(split([signup, again], store).outgoing) == 1


def test_without_an_id_header_the_body_id_is_used(make_store: MakeStore) -> None:
    batch = [
        incoming("signup_success", 7, with_id_header=False),
        incoming("signup_success", 7, with_id_header=False, offset=1),
    ]
    result = split(batch, make_store(seen={w(8)}))
    assert len(result.outgoing) == 1 and result.emitted == {0: [w(7), e(40_007)]}
    again = split(
        [incoming("signup_success", 8, with_id_header=False, event_id=None)],
        make_store(seen={w(8)}),
    )
    assert again.outgoing == []


def test_a_dead_letter_replay_of_an_emitted_webhook_is_a_duplicate(make_store: MakeStore) -> None:
    """Exactly once on the typed topics holds for replays too (DESIGN.md)."""
    replay = incoming("payment_success", 5, extra_headers=[(h.DLQ_REPLAY_COUNT, b"1")])
    assert split([replay], make_store(seen={w(5), t(70_005)})).outgoing == []
    # A replay of what was dead-lettered (never emitted) goes through.
    assert len(split([replay], make_store()).outgoing) == 1


def test_references_learnt_in_a_batch_resolve_later_records_of_it(make_store: MakeStore) -> None:
    batch = [
        incoming("signup_success", 1, subscription_id=77, reference="cust-77", partition=1),
        incoming("component_allocation_change", 2, subscription_id=77, partition=1, offset=1),
        incoming("signup_success", 3, subscription_id=78, reference="cust-78", offset=2),
    ]
    store = make_store(references={"78": "cust-78"})
    result = split(batch, store)
    assert [o.key for o in result.outgoing] == [b"cust-77", b"cust-77", b"cust-78"]
    change = decode(result.outgoing[1].value)
    assert isinstance(change, SubscriptionChange) and change.event == "component_allocation_change"
    assert result.learned == {(1, "77"): "cust-77"}  # 78 was known already
    assert result.emitted == {1: [w(1), e(40_001), w(2), e(40_002)], 0: [w(3), e(40_003)]}
    assert result.first_offsets == {1: 0, 0: 2}
    commit(store, result)
    later = split(
        [incoming("component_allocation_change", 4, subscription_id=77, partition=1)], store
    )
    assert [o.key for o in later.outgoing] == [b"cust-77"]


def test_references_are_per_raw_partition(make_store: MakeStore) -> None:
    store = make_store(references={"77": "cust-77"}, partition=0)
    alone = split(
        [incoming("component_allocation_change", 4, subscription_id=77, partition=1)], store
    )
    assert alone.outgoing[0].topic == "deadletter"


def test_a_changed_reference_is_learnt_again(make_store: MakeStore) -> None:
    batch = [incoming("payment_success", 1, subscription_id=5, reference="new-ref")]
    result = split(batch, make_store(references={"5": "old-ref"}))
    assert result.learned == {(0, "5"): "new-ref"}


def test_ignored_records_are_counted_not_published(make_store: MakeStore) -> None:
    test_event = Incoming("raw", 0, 0, None, b"id=1&event=test&payload[chargify]=testing", [])
    renewal = incoming("signup_success", 2, reference="c")
    renewal = Incoming(
        "raw",
        0,
        1,
        renewal.key,
        renewal.value.replace(b"event=signup_success", b"event=renewal_success"),
        [],
    )
    panel = incoming("payment_success", 3, subscription_id=0, event_id=None, offset=2)
    result = split([test_event, renewal, panel], make_store())
    assert result.outgoing == []
    assert result.tally.ignored == {"test_event": 1, "unsupported_event": 1, "test_panel": 1}
    assert result.tally.events[("other", "ignored")] == 1  # renewal_success: not a label
    assert result.learned == {(0, "15100141"): "c"}  # the renewal still teaches


def test_a_processing_bug_dead_letters_the_record(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(record: object) -> bytes:
        raise OverflowError("boom")

    monkeypatch.setattr(splitter, "encode", broken)
    record = incoming("payment_success", 1)
    [out] = split([record], make_store()).outgoing
    info = parse_dead_letter(out.headers)
    assert info is not None and info.reason == "malformed_payload"
    assert info.error == "processor error: OverflowError"
    assert out.value == record.value


def test_tally_summary(make_store: MakeStore) -> None:
    batch = [incoming("payment_success", 1), incoming("payment_success", 1, offset=1)]
    result = split(batch, make_store())
    assert result.tally.summary() == "emitted=1 ignored=0 dead_lettered=0 duplicate=1"


def test_a_replayed_record_carries_its_replay_count_onto_the_output(
    make_store: MakeStore,
) -> None:
    record = incoming(
        "payment_success", 1, reference="c", extra_headers=[(h.DLQ_REPLAY_COUNT, b"3")]
    )
    [out] = split([record], make_store()).outgoing
    assert out.topic == "transactions"
    assert dict(out.headers)[h.DLQ_REPLAY_COUNT] == b"3"
    [first] = split([incoming("payment_success", 2, reference="c")], make_store()).outgoing
    assert h.DLQ_REPLAY_COUNT not in dict(first.headers)


def test_a_refused_output_falls_back_to_a_dead_letter_then_a_pointer(
    make_store: MakeStore,
) -> None:
    record = incoming("payment_success", 1, reference="c", offset=41)
    [out] = split([record], make_store()).outgoing
    assert out.source == record

    dead = splitter.fallback(out, "MSG_SIZE_TOO_LARGE (too large)")
    assert dead is not None
    assert (dead.topic, dead.key, dead.value) == ("deadletter", record.key, record.value)
    info = parse_dead_letter(dead.headers)
    assert info is not None and info.reason == "malformed_payload" and not info.pointer
    assert (
        info.error == "its transactions record was refused by Kafka: MSG_SIZE_TOO_LARGE (too large)"
    )
    assert (info.source_topic, info.source_offset) == ("raw", 41)

    pointer = splitter.fallback(dead, "MSG_SIZE_TOO_LARGE (too large)")
    assert pointer is not None and pointer.topic == "deadletter" and pointer.value is None
    info = parse_dead_letter(pointer.headers)
    assert info is not None and info.pointer and info.original_size == len(record.value)
    assert (info.source_topic, info.source_offset) == ("raw", 41)

    assert splitter.fallback(pointer, "MSG_SIZE_TOO_LARGE") is None


def test_a_deeply_nested_body_is_dead_lettered_with_one_log_line(
    caplog: pytest.LogCaptureFixture, make_store: MakeStore
) -> None:
    body = b"id=5&event=payment_success&payload" + b"[0]" * 5000 + b"=1"
    record = Incoming("raw", 0, 0, b"5", body, [(h.WEBHOOK_ID, b"5")])
    with caplog.at_level(logging.INFO):
        [out] = split([record], make_store()).outgoing
    info = parse_dead_letter(out.headers)
    assert info is not None and info.reason == "malformed_payload"
    assert "nested deeper than" in info.error
    [line] = caplog.records
    assert line.exc_info is None and "\n" not in caplog.text.strip()


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_processing_bug_logs_one_line_and_the_traceback_only_at_debug(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    level: int,
    make_store: MakeStore,
) -> None:
    def broken(record: object) -> bytes:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(splitter, "encode", broken)
    with caplog.at_level(level, logger="chargify_stream.processors.splitter"):
        split([incoming("payment_success", 1)], make_store())
    failure = next(r for r in caplog.records if "processing webhook" in r.getMessage())
    assert failure.getMessage() == (
        "processing webhook 1 failed; dead-lettering it: "
        "RecursionError: maximum recursion depth exceeded"
    )
    assert (failure.exc_info is not None) == (level == logging.DEBUG)


def test_ignored_and_duplicate_webhooks_leave_a_decision_record(make_store: MakeStore) -> None:
    from chargify_stream.schemas.decisions import decode_decision

    test_event = Incoming(
        "raw", 0, 4, b"9", b"id=9&event=test&payload[chargify]=testing",
        [(h.WEBHOOK_ID, b"9"), (h.EVENT, b"test"), (h.RECEIVED_AT, b"2026-12-01T09:00:00Z")],
    )  # fmt: skip
    again = incoming("payment_success", 5, offset=5, reference="c", transaction_id=71)
    replayed = incoming(
        "payment_success", 5, offset=6, reference="c", transaction_id=71,
        extra_headers=[(h.DLQ_REPLAY_COUNT, b"1")],
    )  # fmt: skip
    result = split([test_event, again, replayed], make_store(seen={w(5), t(71)}))
    # Webhook 5 was emitted before: a retry and a replay of it are both duplicates.
    assert result.outgoing == []
    assert [(d.topic, d.key, d.headers) for d in result.decisions] == [
        ("decisions", b"9", []),
        ("decisions", b"5", []),
        ("decisions", b"5", []),
    ]
    ignored, duplicate, replay = (decode_decision(d.value) for d in result.decisions)
    assert ignored is not None and duplicate is not None and replay is not None
    assert (ignored.webhook_id, ignored.decision, ignored.reason, ignored.event) == (
        "9", "ignored", "test_event", "test",
    )  # fmt: skip
    assert (ignored.topic, ignored.partition, ignored.offset) == ("raw", 0, 4)
    assert ignored.received_at == "2026-12-01T09:00:00Z"
    assert (duplicate.decision, duplicate.reason, duplicate.offset) == ("duplicate", None, 5)
    assert (replay.decision, replay.offset, replay.replay_count) == ("duplicate", 6, 1)
