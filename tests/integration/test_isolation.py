"""One record never stops a stage: per-record isolation against the real broker and Postgres.

Records at each size boundary go through a running processor and sink (``tests/stages.py``):
just under, at and just over what a producer or a topic takes with the headers a dead
letter adds, plus output records that Kafka refuses. Every boundary is found by asking
the real broker (or librdkafka) with a probe producer configured like the stage's, not
computed, so the tests follow Kafka's own accounting of headers, batches and compression.
Each stage must keep going: later records still reach Postgres, and each failed record
is on the dead-letter topic, whole or as a pointer to where it still is.
"""

from __future__ import annotations

import base64
import itertools
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.limits import deadletter_record_max, raw_record_max
from chargify_stream.base.settings import Settings
from chargify_stream.processors.splitter import Incoming, split
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.deadletter import dead_letter_headers
from chargify_stream.schemas.errors import RecordError
from chargify_stream.schemas.records import Transaction
from tests.builders import build_body
from tests.conftest import unique
from tests.integration.test_dlq import carried, cli_json
from tests.integration.test_dlq import payment as dlq_payment
from tests.integration.test_processor import Raw, raw, webhook
from tests.integration.test_sink import carried_headers, payment, publish, query, seed
from tests.kafka_tools import alter_topic, consume, headers_of, produce
from tests.pipeline import Pipeline
from tests.stages import Stage, run_cli

pytestmark = pytest.mark.integration

# librdkafka's default message.max.bytes: every producer's limit before the size budget.
OLD_PRODUCER_MAX = 1_000_000
# The max.message.bytes of a topic created without one (by an older release, by hand).
BROKER_DEFAULT_MAX = 1_048_588

_NOISE = random.Random(15).randbytes(1_300_000)
_webhook_ids = itertools.count(9_100_000_001)  # all of one length: same header sizes


def noise(size: int) -> bytes:
    """``size`` incompressible bytes that are no form body (not UTF-8 at byte 0)."""
    return b"\xff" + _NOISE[: size - 1]


def noise_raw(size: int, webhook_id: int = 9_000_000_000) -> Raw:
    """A raw record with a ``size``-byte body the processor dead-letters (malformed)."""
    return raw(noise(size), key=b"15100141", webhook_id=webhook_id, event="payment_success")


def token(size: int) -> str:
    """``size`` characters of incompressible text that need no form escaping."""
    return base64.urlsafe_b64encode(_NOISE[: size * 3 // 4 + 3]).decode()[:size]


class _NothingKnown:
    def reference(self, partition: int, subscription_id: str) -> str | None:
        return None

    def seen(self, keys: Collection[int]) -> set[int]:
        return set()


def processor_dead_letter(settings: Settings, record: Raw, offset: int = 1) -> Raw:
    """The dead letter the processor writes for raw ``record`` (at ``offset``)."""
    key, body, headers = record
    incoming = Incoming(settings.topic("raw"), 0, offset, key, body, headers)
    [out] = split([incoming], _NothingKnown()).outgoing
    assert out.topic == "deadletter" and out.value is not None
    return out.key, out.value, out.headers


def sink_dead_letter(settings: Settings, value: bytes, offset: int = 1) -> Raw:
    """The dead letter the sink writes for an undecodable ``value`` on the transactions topic."""
    with pytest.raises(RecordError) as failure:
        decode(value)
    headers = dead_letter_headers(
        reason=h.UNSUPPORTED_SCHEMA,
        stage=h.STAGE_SINK,
        error=str(failure.value),
        source_topic=settings.topic("transactions"),
        source_partition=0,
        source_offset=offset,
        original_headers=TYPED_HEADERS,
    )
    return b"c1", value, headers


TYPED_HEADERS = [
    (h.WEBHOOK_ID, b"9200000001"),
    (h.EVENT, b"payment_success"),
    (h.RECEIVED_AT, b"2024-10-11T19:28:32.000Z"),
]


def undecodable(size: int) -> bytes:
    """An Avro single-object value of ``size`` bytes whose schema no one knows."""
    return b"\xc3\x01" + b"\x00" * 8 + _NOISE[: size - 10]


class Probe:
    """A producer configured like a stage's, asking the real broker what it takes."""

    def __init__(self, settings: Settings, topic_limit: int | None, **config: Any) -> None:
        self.topic = unique("probe-")
        ensure_topics(
            settings.kafka_bootstrap_servers,
            [self.topic],
            config={"max.message.bytes": str(topic_limit)} if topic_limit else None,
        )
        self.producer = Producer(
            {"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0, **config}
        )

    def produce(self, record: Raw) -> list[KafkaError | None]:
        key, value, headers = record
        reports: list[KafkaError | None] = []
        self.producer.produce(
            self.topic,
            value=value,
            key=key,
            headers=headers,
            on_delivery=lambda err, _msg: reports.append(err),
        )
        return reports

    def takes(self, record: Raw) -> bool:
        """Whether the record reaches the topic (the producer's limit and the topic's)."""
        try:
            reports = self.produce(record)
        except KafkaException as exc:
            assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
            return False
        assert self.producer.flush(30) == 0
        [report] = reports
        if report is not None:
            assert report.code() == KafkaError.MSG_SIZE_TOO_LARGE, report
        return report is None

    def accepts_locally(self, record: Raw) -> bool:
        """Whether ``produce()`` itself takes the record (its ``message.max.bytes``)."""
        try:
            self.produce(record)
        except KafkaException as exc:
            assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
            return False
        self.producer.purge()
        self.producer.flush(5)
        return True


def largest(takes: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``n`` that ``takes``, given that ``lo`` is taken and ``hi`` is not."""
    assert takes(lo), lo
    assert not takes(hi), hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if takes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def processor_producer(settings: Settings) -> dict[str, Any]:
    """The configuration of the processor's output producer (``processors.outputs``)."""
    return {
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
    }


def sink_producer(settings: Settings) -> dict[str, Any]:
    """The configuration of the sink's dead-letter producer (``sink.consumer``)."""
    return {
        "enable.idempotence": True,
        "acks": "all",
        "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
    }


def legacy_deadletter_topic(settings: Settings) -> None:
    """Give the dead-letter topic the broker's default limit, as one created by an older
    release has: the stages leave an existing topic's configuration as it is."""
    alter_topic(
        settings.kafka_bootstrap_servers,
        settings.topic("deadletter"),
        {"max.message.bytes": str(BROKER_DEFAULT_MAX)},
    )


def dead_letters_by_webhook(settings: Settings, count: int) -> dict[bytes, Message]:
    letters = consume(
        settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=count, settle=1.0
    )
    assert len(letters) == count, [headers_of(m).get(h.WEBHOOK_ID) for m in letters]
    return {headers_of(m)[h.WEBHOOK_ID]: m for m in letters}


def wait_for_transactions(stage: Stage, settings: Settings, ids: Sequence[int]) -> None:
    expected = sorted(ids)

    def landed() -> bool:
        return [r[0] for r in query(settings, "select transaction_id from transactions")] == (
            expected
        )

    stage.wait_until(landed, 90, f"transactions {expected} in Postgres")


def between_two_payments(settings: Settings, stages: Any, records: list[Raw]) -> Stage:
    """Write ``records`` to the raw topic between two good payments (7001 and 7002), start a
    processor and a sink, and wait until both payments are in Postgres: the processor went
    on past every record. Returns the processor."""
    first = webhook("payment_success", webhook_id=1, subscription_id=11, reference="c1",
                    transaction_id=7001)  # fmt: skip
    last = webhook("payment_success", webhook_id=2, subscription_id=11, reference="c1",
                   transaction_id=7002)  # fmt: skip
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("raw"),
        [first, *records, last],
        max_bytes=2 * settings.gateway_max_body_bytes,
    )
    processor = stages("processor", settings)
    sink = stages("sink", settings)
    wait_for_transactions(sink, settings, [7001, 7002])
    return processor


def assert_whole(letter: Message, body: bytes) -> None:
    assert letter.value() == body
    assert h.DLQ_POINTER not in headers_of(letter)


def assert_pointer(letter: Message, body: bytes, offset: int) -> None:
    got = headers_of(letter)
    assert letter.value() is None
    assert got[h.DLQ_POINTER] == b"1"
    assert got[h.DLQ_ORIGINAL_SIZE] == str(len(body)).encode()
    assert got[h.DLQ_SOURCE_OFFSET] == str(offset).encode()
    assert b"MSG_SIZE_TOO_LARGE" in got[h.DLQ_ERROR]


# -- the processor ----------------------------------------------------------------------------


def test_the_processor_dead_letters_any_record_the_raw_topic_takes_and_keeps_going(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    budget = settings.gateway_max_body_bytes
    old = Probe(settings, None)  # librdkafka's defaults, as every producer had them
    old_at = largest(
        lambda n: old.accepts_locally(processor_dead_letter(settings, noise_raw(n))),
        900_000,
        OLD_PRODUCER_MAX,
    )
    raw_probe = Probe(settings, raw_record_max(budget), **{"message.max.bytes": 2 * budget})
    raw_at = largest(lambda n: raw_probe.takes(noise_raw(n)), budget, raw_record_max(budget))
    sizes = {
        "under librdkafka's default limit": old_at - 100,
        "at librdkafka's default limit": old_at,
        "over librdkafka's default limit": old_at + 1,
        "the gateway's largest body": budget,
        "the raw topic's largest record": raw_at,
    }
    print({label: f"{size:,} bytes" for label, size in sizes.items()})
    wids = [next(_webhook_ids) for _ in sizes]
    records = [noise_raw(size, webhook_id=w) for w, size in zip(wids, sizes.values(), strict=True)]
    # Output records Kafka refuses: one over the producer's message.max.bytes (raised by
    # produce()), one under it but over the transactions topic's limit (the broker's answer).
    refused_sync, refused_by_broker = next(_webhook_ids), next(_webhook_ids)
    huge = [
        webhook(
            "payment_success",
            webhook_id=wid,
            subscription_id=11,
            reference=token(size),
            transaction_id=wid,
        )
        for wid, size in ((refused_sync, 700_000), (refused_by_broker, 560_000))
    ]
    processor = between_two_payments(settings, stages, [*records, *huge])

    letters = dead_letters_by_webhook(settings, len(records) + len(huge))
    for wid, (_, body, _) in zip(wids, records, strict=True):
        assert_whole(letters[str(wid).encode()], body)
    for wid, (_, body, _) in zip((refused_sync, refused_by_broker), huge, strict=True):
        letter = letters[str(wid).encode()]
        assert_whole(letter, body)  # the raw record, dead-lettered instead
        got = headers_of(letter)
        assert got[h.DLQ_REASON] == b"malformed_payload"
        assert b"transactions record was refused by Kafka: MSG_SIZE_TOO_LARGE" in got[h.DLQ_ERROR]
    assert processor.running and "stopped after a failed batch" not in processor.log()
    assert processor.log().count("Kafka refused the transactions record") == 2


def test_a_dead_letter_the_topic_cannot_take_whole_becomes_a_pointer(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    legacy_deadletter_topic(settings)
    budget = settings.gateway_max_body_bytes
    probe = Probe(settings, BROKER_DEFAULT_MAX, **processor_producer(settings))
    at = largest(
        lambda n: probe.takes(processor_dead_letter(settings, noise_raw(n))),
        900_000,
        BROKER_DEFAULT_MAX,
    )
    sizes = [at - 100, at, at + 1, budget]
    print(f"largest body whose dead letter a {BROKER_DEFAULT_MAX:,}-byte topic takes: {at:,}")
    wids = [next(_webhook_ids) for _ in sizes]
    records = [noise_raw(size, webhook_id=wid) for size, wid in zip(sizes, wids, strict=True)]
    processor = between_two_payments(settings, stages, records)

    letters = dead_letters_by_webhook(settings, len(records))
    bodies = [body for _, body, _ in records]
    assert_whole(letters[str(wids[0]).encode()], bodies[0])
    assert_whole(letters[str(wids[1]).encode()], bodies[1])
    assert_pointer(letters[str(wids[2]).encode()], bodies[2], offset=3)
    assert_pointer(letters[str(wids[3]).encode()], bodies[3], offset=4)
    assert "larger dead letters are written as pointers" in processor.log()

    # dlq list shows the pointers; dlq replay reads their originals back from the raw topic.
    events = {e["webhook_id"]: e for e in cli_json(settings, "dlq", "list")}
    assert [events[str(w)]["pointer"] for w in wids] == [False, False, True, True]
    assert events[str(wids[2])]["original_size"] == len(bodies[2])
    listing = run_cli(settings, "dlq", "list")
    assert "(pointer)" in listing.stdout and "2 written as pointers" in listing.stdout
    assert cli_json(settings, "dlq", "replay", "--reason", "malformed_payload")["replayed"] == 4
    replays = consume(
        settings.kafka_bootstrap_servers, settings.topic("raw"), count=len(records) + 6
    )[len(records) + 2 :]
    by_webhook = {headers_of(m)[h.WEBHOOK_ID]: m for m in replays}
    for wid, (key, body, original) in zip(wids, records, strict=True):
        replay = by_webhook[str(wid).encode()]
        assert (replay.key(), replay.value()) == (key, body)
        assert headers_of(replay) == {**dict(original), h.DLQ_REPLAY_COUNT: b"1"}

    # Dead-lettered again (still malformed), as a pointer again where it must be.
    again = consume(
        settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=2 * len(records)
    )[len(records) :]
    counts = {headers_of(m)[h.WEBHOOK_ID]: headers_of(m)[h.DLQ_REPLAY_COUNT] for m in again}
    assert counts == {str(w).encode(): b"1" for w in wids}
    assert processor.running
    pointer = headers_of(letters[str(wids[2]).encode()])
    assert pointer[h.DLQ_REASON] == b"malformed_payload"
    assert pointer[h.DLQ_SOURCE_TOPIC] == settings.topic("raw").encode()
    assert pointer[h.EVENT] == b"payment_success"
    assert processor.running and "stopped after a failed batch" not in processor.log()


# -- the sink ---------------------------------------------------------------------------------


def test_the_sink_dead_letters_any_record_its_topics_take_and_keeps_going(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    old = Probe(settings, None)
    old_at = largest(
        lambda n: old.accepts_locally(sink_dead_letter(settings, undecodable(n))),
        900_000,
        OLD_PRODUCER_MAX,
    )
    typed = Probe(settings, None, **{"message.max.bytes": 2 * BROKER_DEFAULT_MAX})
    topic_at = largest(
        lambda n: typed.takes((b"c1", undecodable(n), TYPED_HEADERS)),
        old_at,
        BROKER_DEFAULT_MAX,
    )
    sizes = [old_at - 100, old_at, old_at + 1, topic_at]
    print(f"sink: librdkafka's default takes {old_at:,}; the topic takes {topic_at:,}")
    _check_sink(settings, stages, sizes, pointers=0)


def test_a_sink_dead_letter_the_topic_cannot_take_whole_becomes_a_pointer(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    legacy_deadletter_topic(settings)
    probe = Probe(settings, BROKER_DEFAULT_MAX, **sink_producer(settings))
    at = largest(
        lambda n: probe.takes(sink_dead_letter(settings, undecodable(n))),
        900_000,
        BROKER_DEFAULT_MAX,
    )
    print(
        f"sink: largest value whose dead letter a {BROKER_DEFAULT_MAX:,}-byte topic takes: {at:,}"
    )
    sink = _check_sink(settings, stages, [at - 100, at, at + 1], pointers=1)
    assert "larger dead letters are written as pointers" in sink.log()


def _check_sink(settings: Settings, stages: Any, sizes: list[int], *, pointers: int) -> Stage:
    """Publish a payment, undecodable values of ``sizes``, a payment; the last ``pointers``
    of them must come out as pointers, the others whole."""
    first, last = payment("c1"), payment("c1")
    publish(settings, [first])
    values = [undecodable(size) for size in sizes]
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("transactions"),
        [(b"c1", value, TYPED_HEADERS) for value in values],
        max_bytes=2 * BROKER_DEFAULT_MAX,
    )
    publish(settings, [last])
    assert carried_headers(first)[0][0] == h.WEBHOOK_ID

    sink = stages("sink", settings)
    wait_for_transactions(sink, settings, [first.transaction_id, last.transaction_id])

    letters = consume(
        settings.kafka_bootstrap_servers,
        settings.topic("deadletter"),
        count=len(values),
        settle=1.0,
    )
    assert len(letters) == len(values)
    by_offset = {int(headers_of(m)[h.DLQ_SOURCE_OFFSET]): m for m in letters}
    for index, value in enumerate(values):
        offset = index + 1  # after the first payment
        letter = by_offset[offset]
        assert headers_of(letter)[h.DLQ_REASON] == b"unsupported_schema"
        if index >= len(values) - pointers:
            assert_pointer(letter, value, offset)
            assert letter.key() == b"c1"
        else:
            assert_whole(letter, value)
    assert sink.running
    return sink


def test_a_parked_event_kafka_refuses_does_not_hold_up_the_others(
    settings: Settings, stages: Any
) -> None:
    """The re-driver claims waiting events together; one Kafka refuses (too large for the
    retry topic, though the dead-letter topic took it) used to roll the claim back, so the
    re-driver faulted and re-published the whole claim again, for ever."""
    seed(settings, customers=["cust-r"])
    # A retry topic made with a smaller limit than the dead-letter topic's (by hand, or by
    # an older version): the record the re-driver publishes there is refused.
    alter_topic(
        settings.kafka_bootstrap_servers,
        settings.topic("sink_retry"),
        {"max.message.bytes": str(BROKER_DEFAULT_MAX)},
    )
    big = (b"cust-r", undecodable(1_100_000), carried(4_400_000_001, "payment_success"))
    ordinary = dlq_payment("cust-r")
    letters = []
    for offset, (key, value, original) in enumerate([big, ordinary]):
        headers = dead_letter_headers(
            reason=h.CUSTOMER_NOT_FOUND,
            stage=h.STAGE_SINK,
            error="no customer with customer_key 'cust-r'",
            source_topic=settings.topic("transactions"),
            source_partition=0,
            source_offset=offset,
            original_headers=original,
        )
        letters.append((key, value, headers))
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("deadletter"),
        letters,
        max_bytes=2 * BROKER_DEFAULT_MAX,
    )

    sink = stages("sink", settings)
    expected = decode(ordinary[1])
    assert isinstance(expected, Transaction)
    wait_for_transactions(sink, settings, [expected.transaction_id])
    sink.wait_for_log("Kafka refused the parked event 4400000001 for customer cust-r")
    assert query(settings, "select count(*) from parked_events where redriven_at is null") == [(0,)]


def test_a_signed_body_of_the_gateways_limit_goes_through_the_whole_pipeline(
    settings: Settings, stages: Any
) -> None:
    """The reported case, end to end: the gateway accepts a signed 1 MiB body, the
    processor dead-letters it whole, and the webhooks after it still land."""
    seed(settings)
    budget = settings.gateway_max_body_bytes
    head = b"id=9300000001&event=payment_success&payload[junk]="
    big = head + token(budget - len(head)).encode()  # no transaction: malformed
    assert len(big) == budget
    pipeline = Pipeline(settings, stages)
    try:
        assert pipeline.post(big) == 200
        assert pipeline.post(big + b"x") == 413  # one byte over: refused, never a 503
        after = build_body("payment_success", webhook_id=9300000002, subscription_id=11,
                           reference="c1", transaction_id=7003)  # fmt: skip
        assert pipeline.post(after) == 200
        wait_for_transactions(pipeline.sinks[0], settings, [7003])
    finally:
        pipeline.close()
    [letter] = consume(settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=1)
    assert_whole(letter, big)
    assert headers_of(letter)[h.DLQ_REASON] == b"malformed_payload"
    assert all(p.running for p in pipeline.processors)
