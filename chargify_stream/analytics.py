"""Read the pipeline's topics as plain dicts: the analysts' reader API.

::

    from chargify_stream.analytics import read_transactions

    for t in read_transactions(from_beginning=True):
        print(t["occurred_at"], t["customer"], t["amount_cents"], t["currency"])

Each ``read_*`` function yields one ``dict`` per record, in each partition's order (the
partitions of a topic are interleaved as they arrive). Amounts are integer cents
(negative for refunds), times are RFC 3339 UTC strings with microseconds and ``Z``
(``2026-11-27T15:00:00.000000Z``), and every dict carries the record's Kafka
``partition`` and ``offset``. The keys of each topic's dicts are listed in
docs/analysts.md.

Where to start: ``since`` (the first record written at or after that time, by Kafka's
record timestamps), else ``from_beginning``, else the ``last`` N records of each
partition, else the current end (only records that arrive from now on: use with
``follow``). Without ``follow`` a reader stops at the end as it was when it started; with
``follow`` it waits for new records until the caller stops iterating.

Readers are ``read_committed`` (records of aborted or still-open Kafka transactions are
never seen, so each Chargify transaction appears once on ``chargify.transactions``),
assign partitions by hand, join no consumer group and commit nothing: reading changes
nothing on the broker.

Failures raise :class:`~chargify_stream.base.errors.ChargifyStreamError` subclasses with a
message that says why: ``TransientError`` when Kafka cannot be reached or stops answering,
``TopicNotFound`` for a missing topic, ``UndecodableRecord`` for a value that is not what
the topic's contract says.

Why one module of about 540 lines: it is the analysts' whole public API in one import
(``from chargify_stream.analytics import ...``), and much of its length is the per-topic
conversion to plain dicts, each a few lines, next to the reader that picks it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from chargify_stream.arguments import parse_time
from chargify_stream.base.errors import ChargifyStreamError, TransientError
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.messages import message_headers, read_to_end
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.schemas import form
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode_record
from chargify_stream.schemas.deadletter import parse_dead_letter
from chargify_stream.schemas.errors import RecordError
from chargify_stream.schemas.records import AvroRecord, Customer, SubscriptionChange, Transaction

__all__ = [
    "TOPICS",
    "TopicNotFound",
    "UndecodableRecord",
    "read",
    "read_customers",
    "read_deadletters",
    "read_raw",
    "read_subscriptions",
    "read_transactions",
]

# The topics a reader knows, by the short name `chargify-stream tail` takes.
TOPICS = ("transactions", "subscriptions", "customers", "deadletter", "raw")

_STALL_TIMEOUT_S = 30.0
_R = TypeVar("_R", Transaction, SubscriptionChange, Customer)


class TopicNotFound(ChargifyStreamError):
    """The topic does not exist on the broker (or the topic settings point elsewhere)."""


class UndecodableRecord(ChargifyStreamError):
    """A value that does not decode as its topic's contract says; the message says where."""


# -- the consumer ----------------------------------------------------------------------


def _connection_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's connection settings: brokers, TLS, SASL (see kafka_config)."""
    return librdkafka_config(settings)


def _reader_config(settings: Settings, errors: list[str]) -> dict[str, Any]:
    def on_error(err: KafkaError) -> None:
        errors.append(err.str())

    return {
        **_connection_config(settings),
        # Needed by the client, never joined: partitions are assigned by hand and no offset
        # is committed, so reading changes nothing on the broker.
        "group.id": f"chargify-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        # librdkafka's own log lines would repeat on stderr what the error message says.
        "log_level": 0,
        "error_cb": on_error,
    }


# -- records to dicts ------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    """RFC 3339 UTC with microseconds and ``Z``: one fixed width, for any tool to parse."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", errors="replace") if value is not None else None


def _header_list(msg: Message) -> list[tuple[str, bytes]]:
    """The record's headers as (lower-cased name, bytes) pairs, in order."""
    return [(name.lower(), value) for name, value in message_headers(msg)]


def _headers(msg: Message) -> dict[str, str]:
    """The record's headers as text; the last value of a name wins."""
    return {name: value.decode("utf-8", errors="replace") for name, value in _header_list(msg)}


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


# Names in the plain form that differ from the record's field name.
_PLAIN_NAMES = {"customer_reference": "customer"}


def _plain(record: AvroRecord) -> dict[str, Any]:
    """The record's fields, in its schema's order, as plain values: times as RFC 3339 text
    (:func:`_iso`), nested records as dicts; ``customer_reference`` is ``customer``."""
    return {
        _PLAIN_NAMES.get(name, name): _iso(value) if isinstance(value, datetime) else value
        for name, value in record.to_avro().items()
    }


def transaction_dict(record: Transaction) -> dict[str, Any]:
    """A ``Transaction`` as plain values (``customer`` is the customer reference)."""
    return _plain(record)


def subscription_dict(record: SubscriptionChange) -> dict[str, Any]:
    """A ``SubscriptionChange`` as plain values; ``components`` a list of dicts."""
    return _plain(record)


def customer_dict(key: str, record: Customer | None) -> dict[str, Any]:
    """A ``Customer`` as plain values; a tombstone (``None``) as ``deleted: True``."""
    if record is None:
        empty = {field.name: None for field in dataclasses.fields(Customer)}
        return {**empty, "customer_key": key, "deleted": True}
    return {**_plain(record), "deleted": False}


def _record_dict(value: bytes) -> dict[str, Any] | None:
    """An Avro value of the typed topics as a dict; ``None`` when it is not one."""
    try:
        record = decode_record(value)
    except RecordError:
        return None
    if isinstance(record, Transaction):
        return transaction_dict(record)
    if isinstance(record, SubscriptionChange):
        return subscription_dict(record)
    return customer_dict(record.customer_key, record)


# Where a webhook body names its customer (WEBHOOKS.md §4): payments and most
# subscription events, the signup of a new customer, refunds.
_REFERENCE_PATHS = (
    ("payload", "subscription", "customer", "reference"),
    ("payload", "customer", "reference"),
    ("payload", "customer_reference"),
)


def body_reference(body: bytes) -> str | None:
    """The customer reference a raw webhook body names, if any (``None`` if undecodable)."""
    try:
        decoded = form.decode_form(body)
    except RecordError:
        return None
    for path in _REFERENCE_PATHS:
        value = form.get(decoded, *path)
        if isinstance(value, str) and value.strip():
            return value
    return None


# -- one reader per topic --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Topic:
    """How to read one of the pipeline's topics."""

    name: str  # the short name, as `tail` takes it
    to_dict: Callable[[Message], dict[str, Any]]
    customer_of: Callable[[dict[str, Any]], str | None]


def _position(msg: Message) -> dict[str, Any]:
    return {"partition": msg.partition(), "offset": msg.offset()}


def _decode_as(msg: Message, kind: type[_R]) -> _R:
    """The message's value as a ``kind``, or :class:`UndecodableRecord`."""
    try:
        record = decode_record(msg.value() or b"")
    except RecordError as exc:
        raise _undecodable(msg, str(exc)) from None
    if not isinstance(record, kind):
        raise _undecodable(msg, f"a {type(record).__name__} value, not a {kind.__name__}")
    return record


def _transaction(msg: Message) -> dict[str, Any]:
    out = transaction_dict(_decode_as(msg, Transaction))
    return {**out, "received_at": _headers(msg).get(h.RECEIVED_AT), **_position(msg)}


def _subscription(msg: Message) -> dict[str, Any]:
    out = subscription_dict(_decode_as(msg, SubscriptionChange))
    return {**out, "received_at": _headers(msg).get(h.RECEIVED_AT), **_position(msg)}


def _customer(msg: Message) -> dict[str, Any]:
    # A null value is a tombstone: the customer under this key was deleted.
    record = _decode_as(msg, Customer) if msg.value() is not None else None
    return {**customer_dict(_text(msg.key()) or "", record), **_position(msg)}


def _deadletter(msg: Message) -> dict[str, Any]:
    headers = _headers(msg)
    info = parse_dead_letter(_header_list(msg))
    value = msg.value()
    # A pointer carries no value: the original is still on its source topic.
    record = _record_dict(value) if value is not None and value[:2] == b"\xc3\x01" else None
    body = _text(value) if value is not None and record is None else None
    stage = info.stage if info else headers.get(h.DLQ_STAGE)
    if record is not None:
        customer = record.get("customer") or record.get("customer_key")
    elif value is not None:
        customer = body_reference(value)
    else:
        customer = None
    if customer is None and stage == h.STAGE_SINK:
        customer = _text(msg.key())  # the sink's inputs are keyed by customer reference
    return {
        "reason": info.reason if info else headers.get(h.DLQ_REASON),
        "stage": stage,
        "error": info.error if info else headers.get(h.DLQ_ERROR),
        "source_topic": info.source_topic if info else headers.get(h.DLQ_SOURCE_TOPIC),
        "source_partition": info.source_partition if info else None,
        "source_offset": info.source_offset if info else None,
        "failed_at": _iso(info.failed_at) if info else headers.get(h.DLQ_FAILED_AT),
        "replay_count": info.replay_count if info else 0,
        "pointer": info.pointer if info else False,
        "original_size": info.original_size if info else None,
        "webhook_id": _int_or_none(headers.get(h.WEBHOOK_ID)),
        "event": headers.get(h.EVENT),
        "customer": customer,
        "key": _text(msg.key()),
        "record": record,
        "body": body,
        **_position(msg),
    }


def _raw(msg: Message) -> dict[str, Any]:
    headers = _headers(msg)
    value = msg.value() or b""
    return {
        "webhook_id": _int_or_none(headers.get(h.WEBHOOK_ID)),
        "event": headers.get(h.EVENT),
        "received_at": headers.get(h.RECEIVED_AT),
        "source_ip": headers.get(h.SOURCE_IP),
        "key": _text(msg.key()),
        "customer": body_reference(value),
        "body": _text(value),
        **_position(msg),
    }


def _undecodable(msg: Message, why: str) -> UndecodableRecord:
    return UndecodableRecord(
        f"{msg.topic()}[{msg.partition()}]@{msg.offset()} does not decode: {why}"
    )


_TOPICS: dict[str, _Topic] = {
    "transactions": _Topic("transactions", _transaction, lambda d: d["customer"]),
    "subscriptions": _Topic("subscriptions", _subscription, lambda d: d["customer"]),
    "customers": _Topic("customers", _customer, lambda d: d["customer_key"]),
    "deadletter": _Topic("deadletter", _deadletter, lambda d: d["customer"]),
    "raw": _Topic("raw", _raw, lambda d: d["customer"]),
}


# -- reading ---------------------------------------------------------------------------


def read(
    topic: str,
    settings: Settings | None = None,
    *,
    bootstrap: str | None = None,
    from_beginning: bool = False,
    since: datetime | str | None = None,
    last: int | None = None,
    customer: str | None = None,
    follow: bool = False,
    timeout: float = _STALL_TIMEOUT_S,
) -> Iterator[dict[str, Any]]:
    """Yield the records of ``topic`` (one of :data:`TOPICS`) as dicts.

    ``settings`` defaults to the environment's (:func:`load_settings`); ``bootstrap``
    overrides its ``KAFKA_BOOTSTRAP_SERVERS``. ``since`` is an aware ``datetime`` or text:
    RFC 3339, a date (UTC midnight) or an age (``90s``, ``2h``, ``7d``). ``customer`` keeps
    only that customer's
    records (the customer reference; ``customer_key`` on ``customers``). ``timeout`` bounds
    how long Kafka may stay silent before :class:`TransientError`.
    """
    if topic not in _TOPICS:
        raise ValueError(f"unknown topic {topic!r}: expected one of {', '.join(TOPICS)}")
    if last is not None and last < 1:
        raise ValueError(f"last must be at least 1, not {last}")
    if isinstance(since, str):
        since = parse_time(since, datetime.now(UTC))
    elif since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    if settings is None:
        settings = load_settings()
    if bootstrap is not None:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap})
    spec = _TOPICS[topic]
    name = settings.topic(topic)
    errors: list[str] = []
    consumer = Consumer(_reader_config(settings, errors))
    try:
        starts, ends = _positions(
            consumer, settings, name, errors, timeout, from_beginning, since, last
        )
        msgs = (
            _follow(consumer, name, starts, timeout)
            if follow
            else _to_end(consumer, name, starts, ends, timeout)
        )
        for msg in msgs:
            out = spec.to_dict(msg)
            if customer is None or spec.customer_of(out) == customer:
                yield out
    finally:
        consumer.close()


def _positions(
    consumer: Consumer,
    settings: Settings,
    topic: str,
    errors: list[str],
    timeout: float,
    from_beginning: bool,
    since: datetime | None,
    last: int | None,
) -> tuple[dict[int, int], dict[int, int]]:
    """Where to start in each partition, and where each one ends now."""
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise _unreachable(settings, exc, errors) from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise TopicNotFound(
            f"topic {topic} does not exist (nothing was written to it yet, or the TOPIC_* / "
            "KAFKA_TOPIC_PREFIX settings point elsewhere)"
        )
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    try:
        for partition in sorted(found.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            ends[partition] = high
            if from_beginning:
                starts[partition] = low
            elif last is not None:
                starts[partition] = max(low, high - last)
            else:
                starts[partition] = high
        if since is not None:
            millis = int(since.timestamp() * 1000)
            wanted = [TopicPartition(topic, p, millis) for p in sorted(found.partitions)]
            for tp in consumer.offsets_for_times(wanted, timeout=timeout):
                # -1: no record at or after that time; start at the end.
                starts[tp.partition] = tp.offset if tp.offset >= 0 else ends[tp.partition]
    except KafkaException as exc:
        raise _unreachable(settings, exc, errors) from None
    return starts, ends


def _to_end(
    consumer: Consumer,
    topic: str,
    starts: dict[int, int],
    ends: dict[int, int],
    timeout: float,
) -> Iterator[Message]:
    """The records from ``starts`` up to ``ends`` (the high watermarks taken at start)."""

    def stalled(pending: list[int]) -> str:
        return (
            f"reading {topic} stalled: no answer from Kafka for {timeout:.0f}s "
            f"before the end of partitions {pending}"
        )

    for batch in read_to_end(consumer, topic, starts, ends, timeout=timeout, stalled=stalled):
        yield from batch


def _follow(
    consumer: Consumer, topic: str, starts: dict[int, int], timeout: float
) -> Iterator[Message]:
    """The records from ``starts`` on, waiting for new ones until the caller stops."""
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
    while True:
        for msg in consumer.consume(500, 1.0):
            err = msg.error()
            if err is None:
                yield msg
            # The end of a partition is no error when following; a broker that went away
            # is retried by the client, as a long-running reader should.
            elif err.code() != KafkaError._PARTITION_EOF and (err.fatal() or not err.retriable()):
                raise TransientError(f"reading {topic}: {err.str()}")


def _unreachable(settings: Settings, exc: KafkaException, errors: Sequence[str]) -> TransientError:
    detail = errors[-1] if errors else str(exc.args[0].str() if exc.args else exc)
    return TransientError(f"Kafka at {settings.kafka_bootstrap_servers} is unreachable ({detail})")


# -- the public readers ----------------------------------------------------------------


def read_transactions(settings: Settings | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Payments and refunds on ``chargify.transactions``, once each.

    Keys: ``transaction_id``, ``kind`` (``payment``/``refund``), ``amount_cents`` (negative
    for refunds), ``currency``, ``customer``, ``subscription_id``, ``refunded_payment_id``,
    ``memo``, ``occurred_at``, ``webhook_id``, ``event_id``, ``event``, ``site_id``,
    ``site_subdomain``, ``received_at``, ``partition``, ``offset``. ``options`` as
    :func:`read`.
    """
    return read("transactions", settings, **options)


def read_subscriptions(
    settings: Settings | None = None, **options: Any
) -> Iterator[dict[str, Any]]:
    """Accepted subscription events on ``chargify.subscriptions``, with the state after each.

    Keys: ``subscription_id``, ``customer``, ``state``, ``previous_state``, ``product_id``,
    ``product_handle``, ``previous_product_id``, ``previous_product_handle``,
    ``components`` (list of ``component_id``, ``component_name``, ``previous_allocation``,
    ``new_allocation``), ``occurred_at``, ``webhook_id``, ``event_id``, ``event``,
    ``site_id``, ``site_subdomain``, ``received_at``, ``partition``, ``offset``.
    """
    return read("subscriptions", settings, **options)


def read_customers(settings: Settings | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Customer versions on ``chargify.customers`` (the last one per key is current).

    Keys: ``customer_key``, ``partner_key``, ``email``, ``name``, ``updated_at``,
    ``deleted`` (a tombstone: the customer was deleted; the other fields are ``None``),
    ``partition``, ``offset``.
    """
    return read("customers", settings, **options)


def read_deadletters(settings: Settings | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Failed records on ``chargify.deadletter``, with why they failed.

    Keys: ``reason``, ``stage``, ``error``, ``source_topic``, ``source_partition``,
    ``source_offset``, ``failed_at``, ``replay_count``, ``webhook_id``, ``event``,
    ``pointer`` (written without its value, which is still on the source topic; see
    ``schemas/deadletter.py``), ``original_size``, ``customer``, ``key``, ``record`` (the
    decoded Avro value of a sink dead letter, as the typed readers yield it), ``body`` (the
    webhook body of a processor dead letter), ``partition``, ``offset``.
    """
    return read("deadletter", settings, **options)


def read_raw(settings: Settings | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Webhooks as the gateway received them, on ``chargify.webhooks.raw``.

    Keys: ``webhook_id``, ``event``, ``received_at``, ``source_ip``, ``key`` (the
    subscription id), ``customer`` (the reference the body names, if any), ``body``,
    ``partition``, ``offset``.
    """
    return read("raw", settings, **options)
