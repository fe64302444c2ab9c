"""The outcome recorder: what the dead-letter and decisions topics say about each webhook.

Every sink process runs one :class:`Recorder` thread, consuming as its own group
(``<SINK_GROUP_ID>-outcomes``):

- the dead-letter topic: ``dead_lettered`` (or ``parked`` for ``customer_not_found``) with
  the reason, from either stage; a processor dead letter is the decision on one raw record
  (``dlq-source-*``), so it counts an attempt;
- the processor's decisions topic (:mod:`schemas.decisions`): ``ignored`` with its reason,
  and ``duplicate``, each the decision on one raw record.

The raw topic is not read: every raw record ends in a typed record (which the sink decides
and records itself), a dead letter or a decision record, and each of those names the raw
record it came from. Reading every webhook body again only to note its arrival cost more
than the whole outcome log does now.

One batch is one statement (:func:`sink.outcomes.write_deliveries`) in one database
transaction, committed before the Kafka offsets: a crash reads the batch again, and the
deliveries' keys make that a no-op. The sink's own decisions are not read here: the sink
records them in the transaction of its upserts. So every decision is recorded once it is
durable in Kafka or Postgres, and the hot path pays one statement per sink batch.

Like the re-driver, the thread never takes the sink down: a fault is logged and the
recorder starts over from the committed state after a backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.messages import consumed_fields
from chargify_stream.base.settings import Settings
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import parse_dead_letter
from chargify_stream.schemas.decisions import decode_decision
from chargify_stream.sink.clients import connect, group_consumer, has_record
from chargify_stream.sink.outcomes import (
    DEAD_LETTERED,
    PARKED,
    Delivery,
    parse_int,
    parse_position,
    parse_time,
    write_deliveries,
)
from chargify_stream.sink.sessions import SessionThread

__all__ = ["Recorder", "RecorderClients", "RecorderMetrics", "delivery_of", "start_recorder"]

log = logging.getLogger(__name__)

BATCH_SIZE = 2000
BATCH_TIMEOUT_S = 0.2


class RecorderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "sink_outcome_deliveries",
            "Decisions read by the outcome recorder, by decision",
            ["decision"],
            registry=self.registry,
        )
        self.faults = Counter(
            "sink_outcome_recorder_faults",
            "Outcome recorder restarts after a fault",
            registry=self.registry,
        )
        self.lag = Gauge(
            "sink_outcome_recorder_lag",
            "Records the outcome recorder is behind the partition's end",
            ["topic", "partition"],
            registry=self.registry,
        )


def delivery_of(
    settings: Settings,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    timestamp: datetime | None,
) -> Delivery | None:
    """The decision one record of the dead-letter or decisions topic stands for; ``None``
    for a record without a usable webhook id (nothing to key its outcome on). A record
    without a ``timestamp`` stands for now."""
    if timestamp is None:
        timestamp = datetime.now(UTC)
    if topic == settings.topic("decisions"):
        decision = decode_decision(value or b"")
        if decision is None:
            return None
        webhook_id = parse_int(decision.webhook_id)
        if webhook_id is None:
            return None
        return Delivery(
            webhook_id=webhook_id,
            stage=h.STAGE_PROCESSOR,
            decision=decision.decision,
            reason=decision.reason,
            topic=decision.topic,
            partition=decision.partition,
            offset=decision.offset,
            replay_count=decision.replay_count,
            at=parse_time(decision.at) or timestamp,
            event=decision.event,
            received_at=parse_time(decision.received_at) if decision.received_at else None,
            attempt=True,
            source_topic=decision.topic,
            source_partition=decision.partition,
            source_offset=decision.offset,
        )
    wanted = (h.WEBHOOK_ID, h.EVENT, h.RECEIVED_AT, h.RAW_POSITION)
    found = {name: v for name, v in headers if name in wanted}
    webhook_id = parse_int(found.get(h.WEBHOOK_ID, b""))
    if webhook_id is None:
        return None
    event = found[h.EVENT].decode(errors="replace") if h.EVENT in found else None
    received_at = parse_time(found[h.RECEIVED_AT]) if h.RECEIVED_AT in found else None
    info = parse_dead_letter(headers)
    if info is None:
        return None
    parked = info.reason == h.CUSTOMER_NOT_FOUND
    by_processor = info.stage == h.STAGE_PROCESSOR
    # A processor dead letter's source is the raw record; a sink dead letter's is the typed
    # record, which names its raw record in turn.
    raw = (
        (info.source_topic, info.source_partition, info.source_offset)
        if by_processor
        else parse_position(found[h.RAW_POSITION])
        if h.RAW_POSITION in found
        else None
    )
    return Delivery(
        webhook_id=webhook_id,
        stage=info.stage,
        decision=PARKED if parked else DEAD_LETTERED,
        reason=info.reason,
        topic=topic,
        partition=partition,
        offset=offset,
        replay_count=info.replay_count,
        at=info.failed_at or timestamp,
        event=event,
        received_at=received_at,
        # The key of a sink dead letter is the customer reference.
        customer_key=None if by_processor else (key or b"").decode(errors="replace") or None,
        attempt=by_processor,
        source_topic=raw[0] if raw else None,
        source_partition=raw[1] if raw else None,
        source_offset=raw[2] if raw else None,
    )


class Recorder(SessionThread):
    """The background outcome recorder of one sink process; see the module docstring.

    Its clients are handed in as factories, called afresh for every session (a session
    ends on a fault): ``consumer`` reads the topics as the recorder's group, ``connect``
    opens an autocommit database connection, ``prepare_topics`` creates the topics. Each
    defaults to the real one built from ``settings`` (:class:`RecorderClients`).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: RecorderMetrics | None = None,
        *,
        consumer: Callable[[], Consumer] | None = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        prepare_topics: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or RecorderMetrics()
        super().__init__(
            thread_name="outcome-recorder",
            name="outcome recorder",
            missing="tables missing",
            faults=self.metrics.faults,
            log=log,
        )
        self.group_id = f"{settings.sink_group_id}-outcomes"
        self.topics = [settings.topic(n) for n in ("deadletter", "decisions")]
        real = RecorderClients(settings, self.group_id)
        self._new_consumer = consumer or real.consumer
        self._connect = connect or real.connect
        self._prepare_topics = prepare_topics or real.prepare_topics

    def _session(self) -> None:
        self._prepare_topics()
        consumer = self._new_consumer()
        try:
            with self._connect() as conn:
                consumer.subscribe(self.topics)
                log.info(
                    "outcome recorder reading %s as group %s", ", ".join(self.topics), self.group_id
                )
                while not self._stop.is_set():
                    msgs = [
                        m
                        for m in consumer.consume(BATCH_SIZE, BATCH_TIMEOUT_S)
                        if has_record(m, log, "outcome recorder")
                    ]
                    if msgs:
                        self._record(conn, msgs)
                        # Offsets only after the rows are committed: a crash re-reads.
                        consumer.commit(asynchronous=False)
                        self._measure(consumer, msgs)
        finally:
            consumer.close()

    def _record(self, conn: psycopg.Connection[Any], msgs: Sequence[Message]) -> None:
        deliveries = []
        for msg in msgs:
            delivery = delivery_of(self.settings, **consumed_fields(msg))
            if delivery is not None:
                deliveries.append(delivery)
                self.metrics.deliveries.labels(delivery.decision).inc()
        with conn.transaction(), conn.cursor() as cur:
            write_deliveries(cur, deliveries)

    def _measure(self, consumer: Consumer, msgs: Sequence[Message]) -> None:
        ends: dict[tuple[str, int], int] = {}
        for m in msgs:
            ends[m.topic() or "", m.partition() or 0] = (m.offset() or 0) + 1
        for (topic, partition), end in ends.items():
            try:
                _, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except Exception:
                continue
            if high >= 0:
                self.metrics.lag.labels(topic, str(partition)).set(max(high - end, 0))


class RecorderClients:
    """The real clients of an outcome recorder, built from the settings."""

    def __init__(self, settings: Settings, group_id: str) -> None:
        self.settings = settings
        self.group_id = group_id

    def prepare_topics(self) -> None:
        ensure_pipeline_topics(
            self.settings, [self.settings.topic(n) for n in ("deadletter", "decisions")]
        )

    def consumer(self) -> Consumer:
        return group_consumer(self.settings, self.group_id)

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.settings, "chargify-sink-outcomes")


def start_recorder(settings: Settings, registry: CollectorRegistry | None = None) -> Recorder:
    """Start the recorder thread of a sink process; ``.stop()`` the result to end it.

    The composition root of the recorder: its real clients.
    """
    clients = RecorderClients(settings, f"{settings.sink_group_id}-outcomes")
    return Recorder(
        settings,
        RecorderMetrics(registry),
        consumer=clients.consumer,
        connect=clients.connect,
        prepare_topics=clients.prepare_topics,
    ).start()
