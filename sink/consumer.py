"""``chargify-stream sink``: consume the two output topics and write Postgres.

It also consumes ``chargify.sink.retry``, its own retries: dead letters of this stage that
were re-driven (:mod:`sink.redrive`) or replayed (``dlq replay``). They hold the same
records, told apart by their Avro fingerprint, and take the same idempotent writes; they
never pass through the typed topics again, whose readers see each record once.

The loop, per batch (up to ``SINK_BATCH_SIZE`` records, or what arrived within
``SINK_BATCH_TIMEOUT_MS``):

1. decode each Avro value; one that cannot be decoded is dead-lettered
   (``unsupported_schema``);
2. write the batch in one database transaction (:mod:`sink.upsert`);
3. publish the dead letters (unknown customer, poison records) and wait for the broker;
4. only then commit the Kafka offsets.

A crash anywhere before 4 replays the batch, and every write is idempotent, so nothing
is lost and nothing is counted twice (a dead letter may be published twice; replaying it
is idempotent too).

Faults are told apart by type, for the database by SQLSTATE class
(:func:`sink.upsert.classify`):

- transient (database restarting, connection lost, serialization failure, deadlock; the
  broker not acknowledging a dead letter): the same step is retried with capped
  exponential backoff, for as long as it takes, and nothing is dead-lettered. A stop
  request (SIGTERM) during the wait ends the process without committing, so the batch is
  consumed again on restart;
- poison (SQLSTATE classes 22 and 23: a value the database refuses): the batch is split
  in halves until the record is alone, which is dead-lettered (``malformed_payload``,
  with the SQLSTATE in ``dlq-error``); the rest of the batch is written;
- a dead letter Kafka refuses for itself (too large for the dead-letter topic, invalid:
  :mod:`chargify_stream.base.kafka_errors`) is written again at once as a pointer to the
  record (``schemas.deadletter``), which stays on its source topic;
- anything else (an unknown table: the schema was not migrated; a bug) stops the sink:
  retrying cannot fix it and dead-lettering would park every record.

Why one module of about 600 lines: the loop's guarantees (offsets committed only after the
database commit and the dead letters' acknowledgement, in batch order, across writer
threads, rebalances and stop requests) are held by :class:`Sink`'s methods together, and
read as one. What stands on its own is elsewhere: the writes (:mod:`sink.upsert`), the
dead-letter publishing (:mod:`sink.deadletters`), the metrics (:mod:`sink.metrics`), and
the background threads beside the loop (:mod:`sink.redrive`, :mod:`sink.customer_relay`,
:mod:`sink.recorder`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from chargify_stream.base.errors import ChargifyStreamError, TransientError
from chargify_stream.base.kafka_admin import check_deadletter_topic, ensure_pipeline_topics
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.limits import deadletter_record_max
from chargify_stream.base.messages import message_headers
from chargify_stream.base.retry import RetryStopped, retry
from chargify_stream.base.settings import Settings
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.errors import RecordError
from chargify_stream.sink.clients import has_record
from chargify_stream.sink.deadletters import (
    DeadLetter,
    DeadLetterUnacknowledged,
    produce_dead_letters,
)
from chargify_stream.sink.health import serve_health
from chargify_stream.sink.metrics import SinkMetrics
from chargify_stream.sink.migrate import pending
from chargify_stream.sink.outcomes import source_of
from chargify_stream.sink.upsert import BatchResult, Record, RejectedRecord, classify, write_batch

__all__ = [
    "DeadLetter",
    "Prepared",
    "SchemaNotReady",
    "Sink",
    "SinkMetrics",
    "Stopping",
    "build_sink",
    "run",
]

# write_batch's shape: a connection, the records, and (with the outcome log) their sources.
WriteBatch = Callable[..., BatchResult]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
SWITCH_INTERVAL_S = 0.0005
WRITERS = 2
GC_YOUNG_THRESHOLD = 50_000


class Stopping(Exception):
    """A stop was requested while a step waited on a transient fault: leave uncommitted."""


class SchemaNotReady(ChargifyStreamError):
    """The database lacks migrations this build needs: run ``chargify-stream migrate``."""


@dataclass(slots=True)
class Prepared:
    """A consumed batch, decoded: what to write, and what could not be decoded."""

    msgs: Sequence[Message]
    items: list[tuple[Message, Record]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


class Sink:
    """One sink instance; several share the topics' partitions as a consumer group.

    The clients are handed in (see :func:`build_sink`); ``connect`` opens a new database
    connection, called again after the previous one failed. The rest defaults to the real
    thing: ``write`` writes one batch in one transaction (:func:`sink.upsert.write_batch`),
    ``pending`` names the migrations a connection's database lacks, ``prepare_topics``
    creates and checks the topics before consuming, and ``backoff_first`` is the first
    pause after a transient fault (seconds).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        producer: Producer,
        connect: Callable[[], psycopg.Connection[Any]],
        metrics: SinkMetrics,
        write: WriteBatch = write_batch,
        pending: Callable[[psycopg.Connection[Any]], list[str]] = pending,
        prepare_topics: Callable[[Settings, list[str]], object] | None = None,
        backoff_first: float = BACKOFF_FIRST_S,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self._write_batch = write
        self._pending = pending
        self._prepare_topics = prepare_topics or _prepare_topics
        self._backoff_first = backoff_first
        self.topics = [
            settings.topic("transactions"),
            settings.topic("subscriptions"),
            settings.topic("sink_retry"),
        ]
        self._connect = connect
        self._local = threading.local()  # each writer thread has its own connection
        self._conns: list[psycopg.Connection[Any]] = []
        self._conns_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._schema_checked = False
        self._stop = threading.Event()
        # Batches handed to the writer threads, oldest first, until their offsets are
        # committed (in the consuming thread: the consumer serves one thread at a time).
        self._in_flight: deque[tuple[Future[None], Prepared]] = deque()
        self._failure: BaseException | None = None  # the first write that failed (a bug)
        self._consuming = False
        self._waiting_on: str | None = None  # what a step is retrying, for /readyz

    def readiness(self) -> str | None:
        """``None`` when consuming and no step waits on a fault; else why not (/readyz)."""
        if self._waiting_on is not None:
            return f"waiting for the {self._waiting_on}"
        return None if self._consuming else "not consuming yet"

    def stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stop.set()

    # -- retrying -------------------------------------------------------------------

    def _retrying(self, target: str, step: Callable[[], _T]) -> _T:
        """Run ``step`` until it does not raise :class:`TransientError`.

        Waits between attempts grow from 0.2 s to 5 s, with jitter so that several sinks
        do not reconnect in step. Raises :class:`Stopping` when asked to stop meanwhile,
        or when ``step`` itself raises :class:`RetryStopped` (a stop while it waited).
        """

        def waiting(exc: BaseException, pause: float, _attempt: int) -> None:
            self._waiting_on = target
            self.metrics.retries.labels(target).inc()
            log.warning("%s unavailable (%s); retrying in %.1fs", target, exc, pause)
            if target == "database":
                self._drop_connection()

        try:
            result = retry(
                step,
                retry_on=TransientError,
                first=self._backoff_first,
                most=BACKOFF_MAX_S,
                jitter=True,
                stop=self._stop,
                on_retry=waiting,
            )
        except RetryStopped as stopped:
            raise Stopping from stopped.__cause__
        self._waiting_on = None
        return result

    # -- database -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """This thread's open connection, or a new one (checked against the schema the first
        time)."""
        current: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if current is not None and not current.closed:
            return current
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._connect()
            if not self._schema_checked:
                missing = self._pending(conn)
                conn.rollback()
                if missing:
                    raise SchemaNotReady(
                        f"the database lacks migrations {', '.join(missing)}:"
                        " run `chargify-stream migrate` first"
                    )
                self._schema_checked = True
        except BaseException as exc:
            if conn is not None:
                conn.close()
            classified = classify(exc) if isinstance(exc, psycopg.Error) else None
            if classified is None:
                raise
            raise classified from exc
        self._local.conn = conn
        with self._conns_lock:
            self._conns = [c for c in self._conns if not c.closed]
            self._conns.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and not conn.closed:
            conn.close()

    def _write(self, items: Sequence[tuple[Message, Record]]) -> list[DeadLetter]:
        """Write ``items``; return the dead letters (unknown customer, poison)."""
        records = [rec for _, rec in items]
        sources = (
            [
                source_of(m.topic() or "", m.partition() or 0, m.offset() or 0, message_headers(m))
                for m, _ in items
            ]
            if self.settings.outcome_log
            else None
        )

        def attempt() -> BatchResult:
            started = time.perf_counter()
            conn = self._connection()
            result = (
                self._write_batch(conn, records)
                if sources is None
                else self._write_batch(conn, records, sources)
            )
            self.metrics.write_seconds.observe(time.perf_counter() - started)
            return result

        try:
            result = self._retrying("database", attempt)
        except RejectedRecord as exc:
            if len(items) == 1:
                return [DeadLetter(items[0][0], exc.reason, str(exc))]
            # Halve until the poison is alone: about log2(batch) transactions per poison
            # record, and every other record is still written.
            half = len(items) // 2
            return self._write(items[:half]) + self._write(items[half:])
        self.metrics.count(result)
        return [
            DeadLetter(
                items[i][0],
                h.CUSTOMER_NOT_FOUND,
                f"no customer with customer_key {records[i].customer_reference!r}",
            )
            for i in result.unknown_customer
        ]

    # -- kafka ----------------------------------------------------------------------

    def _publish_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Publish and wait for every acknowledgement; failed ones are published again.

        One writer at a time: a flush serves the delivery reports of every thread's
        records, and one thread's flush must not return before its own reports ran.
        """
        with self._publish_lock:
            self._publish_dead_letters_now(letters)

    def _publish_dead_letters_now(self, letters: Sequence[DeadLetter]) -> None:
        remaining = list(letters)

        def attempt() -> None:
            while remaining:
                failed, refused = produce_dead_letters(
                    self.producer, self.settings.topic("deadletter"), remaining, stop=self._stop
                )
                # Refused for themselves: written again at once, as pointers.
                remaining[:] = failed + refused
                if failed:
                    raise DeadLetterUnacknowledged(f"{len(failed)} dead letters not acknowledged")

        self._retrying("dead-letter topic", attempt)
        for dl in letters:
            self.metrics.dead.labels(dl.reason).inc()

    def _commit(self, msgs: Sequence[Message]) -> None:
        """Commit the offsets after ``msgs``: the batch is in Postgres and its dead letters
        are acknowledged.

        The commit is asynchronous: waiting for it would cost a broker round trip per batch
        (a sixth of the sink's time in bench/sink), and a lost one costs nothing but a
        replay, which is idempotent. It is sent only after the database commit, so it never
        covers a record that is not written; the next one supersedes a failed one, and
        ``close()`` waits for the last. A refused commit (the partitions went to another
        sink in a rebalance) is reported by the ``on_commit`` callback of
        :func:`build_sink`.
        """
        ends: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic() or "", m.partition() or 0)
            ends[key] = max(ends.get(key, 0), (m.offset() or 0) + 1)
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                asynchronous=True,
            )
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit refused (%s); the batch will be consumed again", exc)
        self._record_lag(ends)

    def _record_lag(self, ends: dict[tuple[str, int], int]) -> None:
        """Lag from the high watermark of the last fetch: no broker round trip."""
        for (topic, partition), end in ends.items():
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue  # not known yet (no fetch response): leave the gauge as it was
            if high >= 0:
                self.metrics.lag.labels(topic, str(partition)).set(max(high - end, 0))

    # -- the loop -------------------------------------------------------------------

    def prepare(self, msgs: Sequence[Message]) -> Prepared:
        """Decode one consumed batch (the consuming thread's share of the work)."""
        prepared = Prepared(msgs)
        per_topic: dict[str, int] = {}
        for msg in msgs:
            topic = msg.topic() or ""
            per_topic[topic] = per_topic.get(topic, 0) + 1
            try:
                prepared.items.append((msg, decode(msg.value() or b"")))
            except RecordError as exc:
                prepared.letters.append(DeadLetter(msg, exc.reason, str(exc)))
        for topic, count in per_topic.items():
            self.metrics.records.labels(topic).inc(count)
        self.metrics.batch_size.observe(len(msgs))
        return prepared

    def store(self, prepared: Prepared) -> None:
        """Write a decoded batch and publish its dead letters (a writer thread's share)."""
        letters = list(prepared.letters)
        if prepared.items:
            letters.extend(self._write(prepared.items))
        if letters:
            self._publish_dead_letters(letters)

    def process(self, msgs: Sequence[Message]) -> None:
        """Handle one consumed batch through to the offset commit, in this thread."""
        prepared = self.prepare(msgs)
        self.store(prepared)
        self._commit(prepared.msgs)

    def run(self) -> None:
        """Consume until :meth:`stop`; then leave the group, offsets as last committed.

        The work is shared between threads: this one consumes and decodes the next batch
        while up to ``WRITERS`` writer threads, each with its own database connection,
        write the batches before it, one database transaction per batch. A writer thread
        mostly waits on Postgres, and while one waits for its statements the other builds
        its own or commits. Each batch's offsets are committed after its database commit
        and after the previous batch's offsets, so a commit never covers a batch that is
        not written; a batch consumed ahead is consumed again if the sink stops first.
        Concurrent batches touching the same rows are safe: every write is idempotent and
        order-independent, subscriptions are locked in id order, and a deadlock between
        replayed transactions is a transient fault (retried).
        """
        self._prepare_topics(self.settings, [*self.topics, self.settings.topic("deadletter")])
        timeout = self.settings.sink_batch_timeout_ms / 1000
        # A writer thread gets the interpreter back soon after each of its database round
        # trips (six a batch) completes, not up to 5 ms later (the default slice of the
        # decoding thread): 6-8 % more rows/s in bench/sink (measured with one writer).
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # A batch allocates tens of thousands of short-lived objects (decoded records,
        # rows, arrays); with the default threshold (700) the collector ran every few
        # dozen records. Less often: 7-12 % more rows/s, and less CPU, in bench/sink.
        gc_threshold = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc_threshold[1:])
        writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="sink-writer")
        try:
            # Connect before consuming: a schema that lacks migrations stops the sink now,
            # not at the first record; a database that is away is waited for.
            self._retrying("database", self._connection)
            self._drop_connection()  # the writer threads open their own
            self.consumer.subscribe(self.topics, on_revoke=self._on_revoke)
            self._consuming = True
            log.info(
                "sink consuming %s as group %s",
                ", ".join(self.topics),
                self.settings.sink_group_id,
            )
            while not self._stop.is_set():
                msgs = self.consumer.consume(self.settings.sink_batch_size, timeout)
                batch = [m for m in msgs if has_record(m, log, "sink")]
                prepared = self.prepare(batch) if batch else None
                # Commit what is written; when every writer is busy, wait for the oldest.
                full = prepared is not None and len(self._in_flight) >= WRITERS
                self._settle(at_least=1 if full else 0)
                if prepared is not None:
                    future = writers.submit(self.store, prepared)
                    future.add_done_callback(self._watch)
                    self._in_flight.append((future, prepared))
            self._settle(at_least=len(self._in_flight))
        except Stopping:
            if self._failure is not None:  # a writer failed while another waited on a fault
                raise self._failure from None
            log.info("stopped while waiting on a fault; the batch was not committed")
        finally:
            log.info("sink stopping")
            self._consuming = False
            # A writer waiting on a fault stops now, rather than when the fault clears.
            self._stop.set()
            writers.shutdown(wait=True)  # the writes in flight end (or stop) first
            self._in_flight.clear()  # uncommitted: consumed again by the next owner
            sys.setswitchinterval(switch_interval)
            gc.set_threshold(*gc_threshold)
            self.close()

    def _watch(self, future: Future[None]) -> None:
        """A write that failed for a reason other than a stop request stops the sink at
        once, even while another writer waits on a fault (or the consuming thread waits
        for that one)."""
        exc = None if future.cancelled() else future.exception()
        if exc is not None and not isinstance(exc, Stopping):
            if self._failure is None:
                self._failure = exc
            self._stop.set()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called in the consuming thread, from consume() or close(). The batches being
        # written are committed (up to the first that failed) while the partitions are
        # still ours, so their next owner does not write them again (harmless, being
        # idempotent, but wasted). A failed write stays at the head of the queue,
        # uncommitted, and is raised by the next settle, not inside librdkafka's callback.
        writing = len(self._in_flight)
        wait([future for future, _ in self._in_flight])
        with contextlib.suppress(Exception):
            self._settle()
        log.info(
            "partitions revoked (%s); %d batches in flight, %d committed",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "none",
            writing,
            writing - len(self._in_flight),
        )

    def _settle(self, at_least: int = 0) -> None:
        """Commit the offsets of the finished writes at the head of the queue, in order,
        after waiting for the oldest ``at_least`` writes. A write that failed raises here,
        and neither it nor any batch after it is committed."""
        in_flight = self._in_flight
        while in_flight and (at_least > 0 or in_flight[0][0].done()):
            future, prepared = in_flight[0]
            future.result()
            in_flight.popleft()
            self._commit(prepared.msgs)
            at_least -= 1

    def close(self) -> None:
        """Leave the group (without committing), flush the producer, close the database."""
        self.consumer.close()
        self.producer.flush(5)
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            if not conn.closed:
                conn.close()


def build_sink(settings: Settings, metrics: SinkMetrics | None = None) -> Sink:
    """The composition root: the sink's Kafka clients and database connection factory."""
    metrics = metrics or SinkMetrics()

    def on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [tp for tp in partitions if tp.error is not None]
        if err is not None or failed:
            # Not an error for the data: the records are written, and are consumed (and
            # written, idempotently) again by whoever owns the partitions next.
            metrics.commit_failures.inc()
            reason = err.str() if err is not None else str(failed[0].error)
            log.warning("offset commit refused (%s); those records will be consumed again", reason)

    consumer = Consumer(
        {
            **librdkafka_config(settings),
            "group.id": settings.sink_group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            # A Postgres outage holds one batch for as long as it lasts; past this the
            # group hands the partitions to another sink (the commit is then refused).
            "max.poll.interval.ms": 600_000,
            # Heartbeats come from librdkafka's own thread, so a long batch does not count
            # here; only a dead process does, and its partitions wait this long for a new
            # owner (the default is 45 s).
            "session.timeout.ms": 10_000,
            "on_commit": on_commit,
            "log_level": 3,
        }
    )
    producer = Producer(
        {
            **librdkafka_config(settings),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
            "log_level": 3,
        }
    )

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            settings.database_dsn(), connect_timeout=5, application_name="chargify-sink"
        )

    return Sink(
        settings,
        consumer=consumer,
        producer=producer,
        connect=connect,
        metrics=metrics,
    )


def _prepare_topics(settings: Settings, topics: list[str]) -> None:
    """Create the sink's topics when missing; check the dead-letter topic's size limit."""
    ensure_pipeline_topics(settings, topics)
    check_deadletter_topic(settings)


def run(settings: Settings) -> int:
    sink = build_sink(settings)
    if settings.sink_metrics_port:
        serve_health(
            settings.metrics_host, settings.sink_metrics_port, sink.metrics.registry, sink.readiness
        )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sink.stop())
    from chargify_stream.sink.customer_relay import start_customer_relay
    from chargify_stream.sink.recorder import start_recorder
    from chargify_stream.sink.redrive import start_redriver

    redriver = start_redriver(settings, sink.metrics.registry)
    relay = start_customer_relay(settings, sink.metrics.registry)
    recorder = start_recorder(settings, sink.metrics.registry) if settings.outcome_log else None
    try:
        sink.run()
    finally:
        redriver.stop()
        relay.stop()
        if recorder is not None:
            recorder.stop()
    return 0
