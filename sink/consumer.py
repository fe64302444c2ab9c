"""``chargify-stream sink``: consume the two output topics and write Postgres.

The loop, per batch (up to ``SINK_BATCH_SIZE`` records or ``SINK_BATCH_TIMEOUT_MS``):

1. decode each Avro value; one that cannot be decoded is dead-lettered
   (``unsupported_schema``);
2. write the batch in one database transaction (:mod:`sink.upsert`);
3. publish the dead letters (unknown customer, poison records) and wait for the broker;
4. only then commit the Kafka offsets.

A crash anywhere before 4 replays the batch, and every write is idempotent, so nothing
is lost and nothing is counted twice. Transient faults (database restarting, connection
lost, serialization failure, deadlock) are retried with backoff and never dead-lettered;
a record the database refuses for what it is (SQLSTATE classes 22 and 23) is isolated
and dead-lettered with its SQLSTATE, and the rest of the batch is still written.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from chargify_stream.errors import RecordError
from chargify_stream.kafka_admin import ensure_topics
from chargify_stream.settings import Settings
from schemas import headers as h
from schemas.codec import decode
from schemas.deadletter import dead_letter_headers
from sink.upsert import Record, write_batch

log = logging.getLogger(__name__)

# SQLSTATE classes that say "this record is wrong", not "the database is unwell".
POISON_CLASSES = ("22", "23")


@dataclass(frozen=True)
class DeadLetter:
    msg: Message
    reason: str
    error: str


class SinkMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.records = Counter(
            "sink_records", "Records consumed, by topic", ["topic"], registry=self.registry
        )
        self.written = Counter("sink_rows_written", "Rows changed", registry=self.registry)
        self.dead = Counter(
            "sink_dead_letters",
            "Records dead-lettered, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.retries = Counter(
            "sink_transient_retries",
            "Batches retried after a transient fault",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "sink_batch_size",
            "Records per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
            registry=self.registry,
        )
        self.write_seconds = Histogram(
            "sink_db_write_seconds", "Database time per batch", registry=self.registry
        )


class Sink:
    """One sink instance; several share the topics' partitions as a consumer group."""

    def __init__(self, settings: Settings, metrics: SinkMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or SinkMetrics()
        self.topics = [settings.topic("transactions"), settings.topic("subscriptions")]
        self._stop = threading.Event()
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "group.id": settings.sink_group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "max.poll.interval.ms": 600_000,
                "log_level": 3,
            }
        )
        self.producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "log_level": 3,
            }
        )
        self.conn: psycopg.Connection[Any] | None = None

    def stop(self) -> None:
        self._stop.set()

    # -- database -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = psycopg.connect(self.settings.database_dsn(), connect_timeout=5)
        return self.conn

    def _write(self, records: Sequence[Record]) -> list[int]:
        """Write with retries on transient faults; return indexes of unknown customers."""
        delay = 0.2
        while True:
            try:
                started = time.perf_counter()
                result = write_batch(self._connection(), records)
                self.metrics.write_seconds.observe(time.perf_counter() - started)
                self.metrics.written.inc(result.written)
                return result.unknown_customer
            except psycopg.Error as exc:
                state = getattr(exc, "sqlstate", None) or ""
                if state[:2] in POISON_CLASSES:
                    raise
                self.metrics.retries.inc()
                log.warning(
                    "database unavailable (%s %s); retrying the batch in %.1fs",
                    state or type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                    delay,
                )
                if self.conn is not None and not self.conn.closed:
                    self.conn.close()
                self.conn = None
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    def _write_isolating_poison(
        self, msgs: Sequence[Message], records: Sequence[Record]
    ) -> list[DeadLetter]:
        try:
            unknown = self._write(records)
            return [
                DeadLetter(msgs[i], h.CUSTOMER_NOT_FOUND, "no customer with this customer_key")
                for i in unknown
            ]
        except psycopg.Error as exc:
            if len(records) == 1:
                return [DeadLetter(msgs[0], h.MALFORMED_PAYLOAD, f"SQLSTATE {exc.sqlstate}")]
        # Poison somewhere in the batch: write one at a time to find it.
        out: list[DeadLetter] = []
        for msg, rec in zip(msgs, records, strict=True):
            out.extend(self._write_isolating_poison([msg], [rec]))
        return out

    # -- kafka ----------------------------------------------------------------------

    def _dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        errors: list[str] = []

        def report(err: KafkaError | None, _m: Message) -> None:
            if err is not None:
                errors.append(err.str())

        for dl in letters:
            self.metrics.dead.labels(dl.reason).inc()
            log.warning(
                "dead-lettering %s[%d]@%d: %s",
                dl.msg.topic(),
                dl.msg.partition(),
                dl.msg.offset(),
                dl.reason,
            )
            headers = dead_letter_headers(
                reason=dl.reason,
                stage=h.STAGE_SINK,
                error=dl.error,
                source_topic=dl.msg.topic() or "",
                source_partition=dl.msg.partition() or 0,
                source_offset=dl.msg.offset() or 0,
                original_headers=_headers(dl.msg),
            )
            self.producer.produce(
                self.settings.topic("deadletter"),
                value=dl.msg.value(),
                key=dl.msg.key(),
                headers=cast(list[tuple[str, str | bytes | None]], headers),
                on_delivery=report,
            )
        while self.producer.flush(10) > 0:
            log.warning("dead-letter topic not acknowledging yet; waiting")
        if errors:
            # Nothing is committed: the batch is consumed again and dead-lettered again.
            raise KafkaException(f"dead-letter publish failed: {errors[0]}")

    def process(self, msgs: Sequence[Message]) -> None:
        """Handle one batch through to the offset commit."""
        records: list[Record] = []
        kept: list[Message] = []
        letters: list[DeadLetter] = []
        for msg in msgs:
            self.metrics.records.labels(msg.topic() or "").inc()
            try:
                records.append(decode(msg.value() or b""))
                kept.append(msg)
            except RecordError as exc:
                letters.append(DeadLetter(msg, exc.reason, str(exc)))
        if records:
            letters.extend(self._write_isolating_poison(kept, records))
        if letters:
            self._dead_letter(letters)
        self.consumer.commit(asynchronous=False)

    def run(self) -> None:
        ensure_topics(
            self.settings.kafka_bootstrap_servers,
            [*self.topics, self.settings.topic("deadletter")],
            partitions=self.settings.topic_partitions,
            replication_factor=self.settings.topic_replication_factor,
        )
        self.consumer.subscribe(self.topics)
        log.info(
            "sink consuming %s as group %s", ", ".join(self.topics), self.settings.sink_group_id
        )
        timeout = self.settings.sink_batch_timeout_ms / 1000
        try:
            while not self._stop.is_set():
                msgs = self.consumer.consume(self.settings.sink_batch_size, timeout)
                batch = [m for m in msgs if not _skip(m)]
                if not batch:
                    continue
                self.metrics.batch_size.observe(len(batch))
                try:
                    self.process(batch)
                except psycopg.Error:
                    if self._stop.is_set():
                        break  # stopping mid-retry: uncommitted, so replayed on restart
                    raise
        finally:
            log.info("sink stopping")
            self.consumer.close()
            self.producer.flush(10)
            if self.conn is not None:
                self.conn.close()


def _headers(msg: Message) -> list[tuple[str, bytes]]:
    raw: Any = msg.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items if v is not None]


def _skip(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer error: %s", err.str())
    return True


def run(settings: Settings) -> int:
    sink = Sink(settings)
    if settings.sink_metrics_port:
        start_http_server(settings.sink_metrics_port, "127.0.0.1", registry=sink.metrics.registry)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sink.stop())
    sink.run()
    return 0
