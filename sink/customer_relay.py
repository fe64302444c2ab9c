"""The customer relay: the ``customers`` table, mirrored onto the compacted ``chargify.customers``.

Analysts attribute transactions to partners in the stream itself, by joining
``chargify.transactions`` (keyed by customer reference) with ``chargify.customers`` (keyed
by ``customer_key``, the same value). So every change to a customer must reach the topic,
whatever made it, and in order:

1. a trigger on ``customers`` (migration ``0004_customer_changes``) writes each change to the
   ``customer_changes`` outbox in the changing transaction, and notifies
   ``customer_changed``;
2. every sink process runs one :class:`CustomerRelay` thread that **listens** on that
   channel and also **polls** every few seconds (a notification sent while no relay was
   listening is never needed: the rows wait in the table);
3. it **drains** the outbox in ``change_id`` order, in one database transaction per batch:
   it takes an advisory lock (one relay at a time, so two sinks never publish one
   customer's changes out of order), publishes each row (an Avro ``Customer``, or a
   tombstone for a deletion) keyed by ``customer_key``, waits for the broker to
   acknowledge every record, then deletes the rows and commits.

A crash between the acknowledgement and the commit publishes those rows again on restart:
at-least-once, harmless on a compacted topic (same key, same state, in the same order).
Records are partitioned as the processor's are (Kafka's murmur2 partitioner), so with the
same partition count a customer and its transactions share a partition number, as a
co-partitioned stream join expects.

The thread never takes the sink down: a fault (database or broker away, the migration not
run yet) is logged, and the relay starts over after a backoff from what the table holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry, Counter, Gauge

from chargify_stream.base.delivery import publish_and_wait
from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.settings import Settings
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.records import Customer
from chargify_stream.sink.clients import connect, idempotent_producer
from chargify_stream.sink.sessions import SessionThread

__all__ = [
    "NOTIFY_CHANNEL",
    "CustomerRelay",
    "RelayClients",
    "RelayMetrics",
    "start_customer_relay",
]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "customer_changed"
POLL_INTERVAL_S = 5.0
BATCH_LIMIT = 500
# Serialises the relays of every sink process: any constant shared by all of them.
RELAY_LOCK_ID = 0x63757374

_SELECT = (
    "select change_id, customer_key, deleted, partner_key, email, name, changed_at"
    " from customer_changes order by change_id limit %s"
)
_DELETE = "delete from customer_changes where change_id = any(%s)"


class RelayMetrics:
    """Customer records published, and the changes still waiting."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.published = Counter(
            "customer_records_published",
            "Records published to the customers topic, by kind (state or tombstone)",
            ["kind"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "customer_changes_waiting",
            "Customer changes in the outbox, not yet published (every sink reports the same)",
            registry=self.registry,
        )
        self.faults = Counter(
            "customer_relay_faults", "Customer relay restarts after a fault", registry=self.registry
        )


def record_of(row: Sequence[Any]) -> tuple[bytes, bytes | None]:
    """The (key, value) of one ``customer_changes`` row; ``None`` value: a tombstone."""
    _change_id, customer_key, deleted, partner_key, email, name, changed_at = row
    if deleted:
        return customer_key.encode(), None
    value = encode(
        Customer(
            customer_key=customer_key,
            partner_key=partner_key,
            email=email,
            name=name,
            updated_at=changed_at,
        )
    )
    return customer_key.encode(), value


class CustomerRelay(SessionThread):
    """The background relay of one sink process; see the module docstring.

    Its clients are handed in as factories, called afresh for every session (a session
    ends on a fault): ``producer`` publishes, ``connect`` opens an autocommit database
    connection (two a session: one listens), ``prepare_topics`` creates the customers
    topic. Each defaults to the real one built from ``settings`` (:class:`RelayClients`).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: RelayMetrics | None = None,
        *,
        poll_interval: float = POLL_INTERVAL_S,
        batch_limit: int = BATCH_LIMIT,
        producer: Callable[[], Producer] | None = None,
        connect: Callable[[], psycopg.Connection[Any]] | None = None,
        prepare_topics: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or RelayMetrics()
        super().__init__(
            thread_name="customer-relay",
            name="customer relay",
            missing="table customer_changes is missing",
            faults=self.metrics.faults,
            log=log,
        )
        self.poll_interval = poll_interval
        self.batch_limit = batch_limit
        self.topic = settings.topic("customers")
        real = RelayClients(settings)
        self._new_producer = producer or real.producer
        self._connect = connect or real.connect
        self._prepare_topics = prepare_topics or real.prepare_topics

    def _session(self) -> None:
        self._prepare_topics()
        producer = self._new_producer()
        try:
            with self._connect() as listener, self._connect() as conn:
                # Listen before the first drain, so a change made in between is seen.
                listener.execute(f"listen {NOTIFY_CHANNEL}")
                log.info("customer relay publishing to %s", self.topic)
                self._loop(producer, listener, conn)
        finally:
            producer.flush(5)

    def _loop(
        self, producer: Producer, listener: psycopg.Connection[Any], conn: psycopg.Connection[Any]
    ) -> None:
        next_poll = 0.0
        wake = True
        while not self._stop.is_set():
            now = time.monotonic()
            if wake or now >= next_poll:
                while self.drain(conn, producer) == self.batch_limit:
                    if self._stop.is_set():
                        return
            if now >= next_poll:
                waiting = conn.execute("select count(*) from customer_changes").fetchone()
                self.metrics.waiting.set(waiting[0] if waiting else 0)
                next_poll = now + self.poll_interval
            wake = False
            for _ in listener.notifies(timeout=0.5, stop_after=1):
                wake = True

    # -- the step -------------------------------------------------------------------

    def drain(self, conn: psycopg.Connection[Any], producer: Producer) -> int:
        """Publish and delete one batch of changes; return how many there were."""
        with conn.transaction():
            # Waits while another sink's relay drains: it may hold this customer's
            # earlier changes, which must reach the topic first.
            conn.execute("select pg_advisory_xact_lock(%s)", (RELAY_LOCK_ID,))
            rows = conn.execute(_SELECT, (self.batch_limit,)).fetchall()
            if rows:
                self._publish(producer, rows)
                conn.execute(_DELETE, ([row[0] for row in rows],))
        tombstones = sum(1 for row in rows if row[2])
        self.metrics.published.labels("tombstone").inc(tombstones)
        self.metrics.published.labels("state").inc(len(rows) - tombstones)
        return len(rows)

    def _publish(self, producer: Producer, rows: Sequence[Sequence[Any]]) -> None:
        """Produce ``rows`` in order; return once the broker acknowledged every one."""
        # value None: a tombstone.
        records = ((*record_of(row), None) for row in rows)
        errors = publish_and_wait(producer, self.topic, records, timeout=20)
        if errors:
            # Raising rolls back: the rows stay in the outbox and are published again.
            raise TransientError(f"customer records not acknowledged: {errors[0]}")


class RelayClients:
    """The real clients of a customer relay, built from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def prepare_topics(self) -> None:
        ensure_pipeline_topics(self.settings, [self.settings.topic("customers")])

    def producer(self) -> Producer:
        # Kafka's own (Java) partitioner, as the processor's outputs use: a customer and
        # its transactions land on the same partition number.
        return idempotent_producer(self.settings, partitioner="murmur2_random")

    def connect(self) -> psycopg.Connection[Any]:
        return connect(self.settings, "chargify-relay")


def start_customer_relay(
    settings: Settings, registry: CollectorRegistry | None = None
) -> CustomerRelay:
    """Start the customer relay thread of a sink process; call ``.stop()`` on the result.

    ``registry`` is the sink's Prometheus registry, so the relay's metrics are served on the
    sink's metrics port. The composition root of the relay: its real clients.
    """
    clients = RelayClients(settings)
    return CustomerRelay(
        settings,
        RelayMetrics(registry),
        producer=clients.producer,
        connect=clients.connect,
        prepare_topics=clients.prepare_topics,
    ).start()
