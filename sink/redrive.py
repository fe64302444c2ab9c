"""The re-driver: parked ``customer_not_found`` events replay themselves once the customer exists.

Chargify often sends a payment before the company has created the customer record. The
sink dead-letters such a record (``customer_not_found``, stage ``sink``, keyed by the
customer reference). Every sink process runs one :class:`Redriver` thread that:

1. **indexes** the dead-letter topic, as its own consumer group
   (``<SINK_GROUP_ID>-redrive``), into the ``parked_events`` table: one row per
   ``customer_not_found`` dead letter, keyed by its dead-letter topic/partition/offset, with
   the bytes, key and headers needed to replay it. Insertion is idempotent and committed
   before the Kafka offsets, so a crash re-reads and re-inserts nothing new;
2. **listens** on ``customer_created``, which a trigger on ``customers`` notifies on every
   insert, whatever created the customer; it also **polls** every few seconds, which covers
   notifications sent while no re-driver was listening and dead letters indexed after
   their customer already existed;
3. **re-drives**: in one database transaction it claims waiting rows whose customer now
   exists (``FOR UPDATE SKIP LOCKED``, so several sinks never claim the same row),
   re-publishes one record per event to the sink's retry topic (``chargify.sink.retry``,
   never the typed topics again: their readers see each record once) with
   ``dlq-replay-count`` + 1, waits for the broker's acknowledgement, and only then marks
   the rows re-driven and commits. A crash between the ack and the commit re-publishes
   once more on restart: harmless, since the sink's writes are idempotent.

All state lives in Kafka (the dead letters, the group's offsets) and Postgres (the index and
what was re-driven), so the re-drive survives restarts and is shared by any number of sink
instances. A row that has already failed ``REDRIVE_MAX_ATTEMPTS`` times is left for an
operator (``chargify-stream dlq``), so a record that keeps failing cannot loop.

The thread never takes the sink down: a fault (database or broker away, the migration not
run yet) is logged, and the re-driver starts over after a backoff from the committed state.

The decisions (which dead letters to park, which claimed row to re-publish) are pure and
live in :mod:`sink.parked`; the restart loop is :func:`sink.sessions.run_sessions`. This
module stays over 400 lines because the three steps, their SQL and the clients they share
(:class:`RedriveClients`) are one thread's work, read together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.kafka_errors import refusal, refused_for_itself
from chargify_stream.base.limits import deadletter_record_max
from chargify_stream.base.messages import consumed_fields
from chargify_stream.base.settings import Settings
from chargify_stream.schemas.deadletter import parse_dead_letter, replay_headers
from chargify_stream.sink.clients import connect, group_consumer, has_record, idempotent_producer
from chargify_stream.sink.parked import Claimed, ParkedEvent, choose_redrives, parkable
from chargify_stream.sink.sessions import SessionThread

__all__ = [
    "AGE_BUCKETS",
    "NOTIFY_CHANNEL",
    "REDRIVE_MAX_ATTEMPTS",
    "ParkedEvent",
    "RedriveClients",
    "RedriveMetrics",
    "Redriver",
    "choose_redrives",
    "parkable",
    "start_redriver",
]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "customer_created"
# Failures after which an event is no longer re-driven automatically (the same default as
# `dlq replay --max-attempts`): attempts = dlq-replay-count + 1.
REDRIVE_MAX_ATTEMPTS = 5
POLL_INTERVAL_S = 5.0
CLAIM_LIMIT = 500
# Upper bound (seconds) of each "parked events waiting" age bucket; None is open-ended.
AGE_BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("0-1m", 60),
    ("1m-1h", 3600),
    ("1h-1d", 86400),
    ("1d-7d", 7 * 86400),
    ("7d+", None),
)


class RedriveMetrics:
    """Dead letters by reason and stage, parked events by age, re-drives done."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.dead_letters = Counter(
            "sink_deadletter_records",
            "Records read from the dead-letter topic by this sink's re-driver (its share of "
            "the partitions), by reason and stage; 'none' when a record has no dlq-* headers",
            ["reason", "stage"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "sink_parked_events_waiting",
            "customer_not_found events waiting for their customer (every sink reports the "
            "same total), by time since dead-lettered",
            ["age"],
            registry=self.registry,
        )
        self.redriven = Counter(
            "sink_parked_events_redriven",
            "Parked events re-published to the sink's retry topic",
            registry=self.registry,
        )
        self.faults = Counter(
            "sink_redrive_faults", "Re-driver restarts after a fault", registry=self.registry
        )
        for bucket, _ in AGE_BUCKETS:
            self.waiting.labels(bucket).set(0)


_INSERT = (
    "insert into parked_events (dlq_topic, dlq_partition, dlq_offset, customer_key,"
    " source_topic, source_partition, source_offset, record_key, value, header_names,"
    " header_values, webhook_id, event, replay_count, failed_at)"
    " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " on conflict do nothing"
)

# Rows whose customer exists now. SKIP LOCKED: a row another sink is re-driving is not
# waited for, and not claimed twice.
_CLAIM = (
    "select p.dlq_topic, p.dlq_partition, p.dlq_offset, p.customer_key, p.source_topic,"
    " p.source_partition, p.source_offset, p.record_key, p.value, p.header_names,"
    " p.header_values, p.webhook_id, p.replay_count"
    " from parked_events p"
    " where p.redriven_at is null and p.replay_count + 1 < %s"
    " and exists (select 1 from customers c where c.customer_key = p.customer_key)"
    " order by p.parked_at, p.dlq_partition, p.dlq_offset"
    " limit %s for update of p skip locked"
)

_MARK = (
    "update parked_events set redriven_at = now()"
    " where (dlq_topic, dlq_partition, dlq_offset) in"
    " (select * from unnest(%s::text[], %s::integer[], %s::bigint[]))"
)

# One count per event (webhook id, else source position) in each age bucket.
_WAITING = """
select bucket, count(distinct ident) from (
    select case
        when age < interval '1 minute' then '0-1m'
        when age < interval '1 hour' then '1m-1h'
        when age < interval '1 day' then '1h-1d'
        when age < interval '7 days' then '1d-7d'
        else '7d+' end as bucket,
      coalesce(webhook_id, source_topic || '/' || source_partition || '/' || source_offset)
        as ident
    from (select *, now() - coalesce(failed_at, parked_at) as age from parked_events
          where redriven_at is null and replay_count + 1 < %s) waiting
) bucketed group by bucket
"""


class Redriver(SessionThread):
    """The background re-driver of one sink process; see the module docstring.

    Its clients are handed in as factories, called afresh for every session (a session
    ends on a fault): ``consumer`` reads the dead-letter topic as the re-driver's group,
    ``producer`` re-publishes, ``connect`` opens an autocommit database connection (two a
    session: one listens), ``prepare_topics`` creates the topics it uses. Each defaults to
    the real one built from ``settings`` (:func:`redrive_clients`).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: RedriveMetrics | None = None,
        *,
        poll_interval: float = POLL_INTERVAL_S,
        max_attempts: int = REDRIVE_MAX_ATTEMPTS,
        consumer: Callable[[], Consumer] | None = None,
        producer: Callable[[], Producer] | None = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        prepare_topics: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or RedriveMetrics()
        super().__init__(
            thread_name="redriver",
            name="re-driver",
            missing="table parked_events is missing",
            faults=self.metrics.faults,
            log=log,
        )
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.group_id = f"{settings.sink_group_id}-redrive"
        self.deadletter_topic = settings.topic("deadletter")
        self.retry_topic = settings.topic("sink_retry")
        self.sink_topics = (
            settings.topic("transactions"),
            settings.topic("subscriptions"),
            self.retry_topic,
        )
        real = RedriveClients(settings, self.group_id)
        self._new_consumer = consumer or real.consumer
        self._new_producer = producer or real.producer
        self._connect = connect or real.connect
        self._prepare_topics = prepare_topics or real.prepare_topics

    def _session(self) -> None:
        self._prepare_topics()
        consumer = self._new_consumer()
        producer = self._new_producer()
        try:
            with self._connect() as listener, self._connect() as conn:
                # Listen before the first claim, so a customer created in between is seen.
                listener.execute(f"listen {NOTIFY_CHANNEL}")
                consumer.subscribe([self.deadletter_topic])
                log.info("re-driver indexing %s as group %s", self.deadletter_topic, self.group_id)
                self._loop(consumer, producer, listener, conn)
        finally:
            consumer.close()
            producer.flush(5)

    def _loop(
        self,
        consumer: Consumer,
        producer: Producer,
        listener: psycopg.Connection[Any],
        conn: psycopg.Connection[Any],
    ) -> None:
        next_poll = 0.0
        while not self._stop.is_set():
            msgs = [m for m in consumer.consume(500, 0.2) if has_record(m, log, "re-driver")]
            wake = False
            if msgs:
                wake = self._index(conn, msgs) > 0
                # Offsets only after the rows are committed: a crash re-indexes, never skips.
                consumer.commit(asynchronous=False)
            for note in listener.notifies(timeout=0.05):
                log.debug("customer %s created", note.payload)
                wake = True
            now = time.monotonic()
            if wake or now >= next_poll:
                while self._redrive(conn, producer) == CLAIM_LIMIT and not self._stop.is_set():
                    pass
            if now >= next_poll:
                self._measure(conn)
                next_poll = now + self.poll_interval

    # -- steps ----------------------------------------------------------------------

    def _index(self, conn: psycopg.Connection[Any], msgs: Sequence[Message]) -> int:
        """Insert the parkable records of ``msgs``; return how many there were."""
        rows = []
        labels: list[tuple[str, str]] = []
        for msg in msgs:
            record = consumed_fields(msg)
            info = parse_dead_letter(record["headers"])
            labels.append((info.reason, info.stage) if info else ("none", "none"))
            parked = parkable(record, sink_topics=self.sink_topics)
            if parked is not None:
                rows.append(parked.row())
        if rows:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_INSERT, rows)
        for reason, stage in labels:
            self.metrics.dead_letters.labels(reason, stage).inc()
        return len(rows)

    def _redrive(self, conn: psycopg.Connection[Any], producer: Producer) -> int:
        """Claim, re-publish and mark one batch; return how many rows were claimed."""
        with conn.transaction():
            claimed = [_claimed(r) for r in conn.execute(_CLAIM, (self.max_attempts, CLAIM_LIMIT))]
            if not claimed:
                return 0
            chosen = choose_redrives(claimed)
            refused = self._publish(producer, chosen)
            conn.execute(
                _MARK,
                (
                    [c.dlq_topic for c in claimed],
                    [c.dlq_partition for c in claimed],
                    [c.dlq_offset for c in claimed],
                ),
            )
        self.metrics.redriven.inc(len(chosen) - refused)
        customers = sorted({c.customer_key for c in chosen})
        log.info(
            "re-drove %d parked events (%d dead letters) for customers %s",
            len(chosen),
            len(claimed),
            ", ".join(customers[:10]) + (" ..." if len(customers) > 10 else ""),
        )
        return len(claimed)

    def _publish(self, producer: Producer, chosen: Sequence[Claimed]) -> int:
        """Re-publish each record; return once the broker acknowledged every one, with the
        number Kafka refused.

        A record Kafka refuses for itself (:mod:`chargify_stream.base.kafka_errors`) is logged
        and left for an operator, not retried: raising would roll back every claim, and
        the same record would be claimed first, and refused, for ever.
        """
        errors: list[str] = []
        refused: list[tuple[Claimed, str]] = []

        for row in chosen:

            def report(err: KafkaError | None, _msg: Message, row: Claimed = row) -> None:
                if err is None:
                    return
                if refused_for_itself(err):
                    refused.append((row, refusal(err)))
                else:
                    errors.append(err.str())

            try:
                # Partitioned by key, as `dlq replay` does: one customer's retries stay in
                # order.
                producer.produce(
                    self.retry_topic,
                    value=row.value,
                    key=row.record_key,
                    headers=cast(list[tuple[str, str | bytes | None]], replay_headers(row.headers)),
                    on_delivery=report,
                )
            except KafkaException as exc:
                if not refused_for_itself(exc):
                    raise
                refused.append((row, refusal(exc)))
        remaining = producer.flush(20)
        if errors or remaining:
            # Raising rolls back the claim: the rows stay waiting and are re-driven later.
            raise TransientError(
                f"re-publish not acknowledged ({remaining} pending): "
                + (errors[0] if errors else "timed out")
            )
        for row, why in refused:
            log.error(
                "re-driver: Kafka refused the parked event %s for customer %s (%s); it is "
                "not re-driven again: replay it with `chargify-stream dlq` once fixed",
                row.webhook_id or f"{row.source_topic}[{row.source_partition}]@{row.source_offset}",
                row.customer_key,
                why,
            )
        return len(refused)

    def _measure(self, conn: psycopg.Connection[Any]) -> None:
        counts = dict(conn.execute(_WAITING, (self.max_attempts,)).fetchall())
        for bucket, _ in AGE_BUCKETS:
            self.metrics.waiting.labels(bucket).set(counts.get(bucket, 0))


def _claimed(row: Sequence[Any]) -> Claimed:
    return Claimed(
        dlq_topic=row[0],
        dlq_partition=row[1],
        dlq_offset=row[2],
        customer_key=row[3],
        source_topic=row[4],
        source_partition=row[5],
        source_offset=row[6],
        record_key=bytes(row[7]),
        value=bytes(row[8]),
        headers=[(n, bytes(v)) for n, v in zip(row[9], row[10], strict=True)],
        webhook_id=row[11],
        replay_count=row[12],
    )


class RedriveClients:
    """The real clients of a re-driver, built from the settings (one factory per client)."""

    def __init__(self, settings: Settings, group_id: str) -> None:
        self.settings = settings
        self.group_id = group_id

    def prepare_topics(self) -> None:
        ensure_pipeline_topics(
            self.settings, [self.settings.topic("deadletter"), self.settings.topic("sink_retry")]
        )

    def consumer(self) -> Consumer:
        return group_consumer(self.settings, self.group_id)

    def producer(self) -> Producer:
        return idempotent_producer(
            self.settings,
            **{"message.max.bytes": deadletter_record_max(self.settings.gateway_max_body_bytes)},
        )

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.settings, "chargify-sink-redrive")


def start_redriver(settings: Settings, registry: CollectorRegistry | None = None) -> Redriver:
    """Start the re-driver thread of a sink process; call ``.stop()`` on the result to end it.

    ``registry`` is the sink's Prometheus registry, so the re-driver's metrics are served on
    the sink's metrics port. The composition root of the re-driver: its real clients.
    """
    metrics = RedriveMetrics(registry)
    clients = RedriveClients(settings, f"{settings.sink_group_id}-redrive")
    return Redriver(
        settings,
        metrics,
        consumer=clients.consumer,
        producer=clients.producer,
        connect=clients.connect,
        prepare_topics=clients.prepare_topics,
    ).start()
