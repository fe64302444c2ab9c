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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry, Counter, Gauge

from chargify_stream.errors import TransientError
from chargify_stream.kafka_admin import ensure_pipeline_topics
from chargify_stream.kafka_config import librdkafka_config
from chargify_stream.kafka_errors import refusal, refused_for_itself
from chargify_stream.limits import deadletter_record_max
from chargify_stream.settings import Settings
from schemas import headers as h
from schemas.deadletter import event_identity, parse_dead_letter, recency, replay_headers

__all__ = [
    "AGE_BUCKETS",
    "NOTIFY_CHANNEL",
    "REDRIVE_MAX_ATTEMPTS",
    "ParkedEvent",
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
_BACKOFF_MAX_S = 30.0

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """One ``customer_not_found`` dead letter, as a ``parked_events`` row."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    customer_key: str
    source_topic: str
    source_partition: int
    source_offset: int
    record_key: bytes
    value: bytes
    headers: Headers
    webhook_id: str | None
    event: str | None
    replay_count: int
    failed_at: datetime | None

    def row(self) -> tuple[Any, ...]:
        return (
            self.dlq_topic,
            self.dlq_partition,
            self.dlq_offset,
            self.customer_key,
            self.source_topic,
            self.source_partition,
            self.source_offset,
            self.record_key,
            self.value,
            [name for name, _ in self.headers],
            [value for _, value in self.headers],
            self.webhook_id,
            self.event,
            self.replay_count,
            self.failed_at,
        )


def parkable(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    sink_topics: Iterable[str],
) -> ParkedEvent | None:
    """The parked event for one dead-letter record, or ``None`` when it is not one to re-drive.

    Only ``customer_not_found`` dead letters written by the sink qualify: their key is the
    customer reference and their source is one of the sink's input topics (the typed topics,
    or the retry topic for a retry that failed again). A record without
    readable ``dlq-*`` headers (written by hand, by another tool) is never replayed blindly.
    """
    info = parse_dead_letter(headers)
    if info is None or info.reason != h.CUSTOMER_NOT_FOUND or info.stage != h.STAGE_SINK:
        return None
    if info.source_topic not in set(sink_topics) or not key or value is None:
        return None
    try:
        customer = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    kept: Headers = [(name, v) for name, v in headers if v is not None]
    found = dict(kept)
    return ParkedEvent(
        dlq_topic=topic,
        dlq_partition=partition,
        dlq_offset=offset,
        customer_key=customer,
        source_topic=info.source_topic,
        source_partition=info.source_partition,
        source_offset=info.source_offset,
        record_key=key,
        value=value,
        headers=kept,
        webhook_id=_text(found.get(h.WEBHOOK_ID)),
        event=_text(found.get(h.EVENT)),
        replay_count=info.replay_count,
        failed_at=info.failed_at,
    )


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", errors="replace") if value else None


@dataclass(frozen=True, slots=True)
class _Claimed:
    """A claimed ``parked_events`` row: what is needed to re-publish it and mark it."""

    dlq_topic: str
    dlq_partition: int
    dlq_offset: int
    customer_key: str
    source_topic: str
    source_partition: int
    source_offset: int
    record_key: bytes
    value: bytes
    headers: Headers
    webhook_id: str | None
    replay_count: int

    @property
    def identity(self) -> str:
        """One Chargify event, as ``dlq`` names it (:func:`schemas.deadletter.event_identity`)."""
        return event_identity(
            self.webhook_id, self.source_topic, self.source_partition, self.source_offset
        )

    @property
    def recency(self) -> tuple[int, datetime, int, int]:
        return recency(self.replay_count, None, self.dlq_partition, self.dlq_offset)


def choose_redrives(claimed: Sequence[_Claimed]) -> list[_Claimed]:
    """One record per event: the one replayed most (its latest failure), in claim order.

    The same event can be parked several times (a manual replay that failed again); one
    re-publication is enough, and its ``dlq-replay-count`` must be the highest seen.
    """
    best: dict[str, _Claimed] = {}
    for row in claimed:
        current = best.get(row.identity)
        if current is None or row.recency > current.recency:
            best[row.identity] = row
    return list(best.values())


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


class Redriver:
    """The background re-driver of one sink process; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: RedriveMetrics | None = None,
        *,
        poll_interval: float = POLL_INTERVAL_S,
        max_attempts: int = REDRIVE_MAX_ATTEMPTS,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or RedriveMetrics()
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redriver", daemon=True)

    def start(self) -> Redriver:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Ask the thread to finish its current step, and wait for it (bounded)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- lifecycle ------------------------------------------------------------------

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except psycopg.errors.UndefinedTable:
                self.metrics.faults.inc()
                log.error(
                    "re-driver: table parked_events is missing; run `chargify-stream migrate`"
                )
                delay = _BACKOFF_MAX_S
            except Exception as exc:
                # Whatever went wrong, the sink keeps running: start over from the committed
                # state (Postgres rows, Kafka offsets) after a backoff.
                self.metrics.faults.inc()
                log.warning("re-driver fault (%s: %s); restarting", type(exc).__name__, exc)
                if time.monotonic() - started > 60:
                    delay = 1.0
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _session(self) -> None:
        ensure_pipeline_topics(self.settings, [self.deadletter_topic, self.retry_topic])
        dsn = self.settings.database_dsn()
        consumer = Consumer(
            {
                **librdkafka_config(self.settings),
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "log_level": 3,
            }
        )
        producer = Producer(
            {
                **librdkafka_config(self.settings),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": 15_000,
                "message.max.bytes": deadletter_record_max(self.settings.gateway_max_body_bytes),
                "log_level": 3,
            }
        )
        try:
            with (
                psycopg.connect(dsn, autocommit=True, connect_timeout=5) as listener,
                psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn,
            ):
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
            msgs = [m for m in consumer.consume(500, 0.2) if not _failed(m)]
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
            headers = _headers(msg)
            info = parse_dead_letter(headers)
            labels.append((info.reason, info.stage) if info else ("none", "none"))
            parked = parkable(
                topic=msg.topic() or "",
                partition=msg.partition() or 0,
                offset=msg.offset() or 0,
                key=msg.key(),
                value=msg.value(),
                headers=headers,
                sink_topics=self.sink_topics,
            )
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

    def _publish(self, producer: Producer, chosen: Sequence[_Claimed]) -> int:
        """Re-publish each record; return once the broker acknowledged every one, with the
        number Kafka refused.

        A record Kafka refuses for itself (:mod:`chargify_stream.kafka_errors`) is logged
        and left for an operator, not retried: raising would roll back every claim, and
        the same record would be claimed first, and refused, for ever.
        """
        errors: list[str] = []
        refused: list[tuple[_Claimed, str]] = []

        for row in chosen:

            def report(err: KafkaError | None, _msg: Message, row: _Claimed = row) -> None:
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


def _claimed(row: Sequence[Any]) -> _Claimed:
    return _Claimed(
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


def _headers(msg: Message) -> Headers:
    raw: Any = msg.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items if v is not None]


def _failed(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("re-driver consumer error: %s", err.str())
    return True


def start_redriver(settings: Settings, registry: CollectorRegistry | None = None) -> Redriver:
    """Start the re-driver thread of a sink process; call ``.stop()`` on the result to end it.

    ``registry`` is the sink's Prometheus registry, so the re-driver's metrics are served on
    the sink's metrics port.
    """
    return Redriver(settings, RedriveMetrics(registry)).start()
