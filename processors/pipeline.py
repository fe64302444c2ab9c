"""The processor's batch pipeline: read, decide, send, commit, in one Kafka transaction.

One loop, in one thread, on two librdkafka clients:

- a consumer of ``chargify.webhooks.raw`` in the group ``PROCESSOR_APP_ID``
  (``enable.auto.commit=false``: offsets are committed only through the transaction);
- a transactional producer (``transactional.id``: see :func:`transactional_id`).

Per batch (up to ``BATCH_MAX`` records, all that arrived since the last one):

1. **decide**: :func:`processors.splitter.split` against the local state
   (:class:`processors.state.Store`);
2. **send**, in one transaction: the outputs (``chargify.transactions``,
   ``chargify.subscriptions``, ``chargify.deadletter``), the state's changelog records (the
   dedup keys emitted, the references learnt) and the raw offsets after the batch
   (``send_offsets_to_transaction`` with the consumer's group metadata);
3. **commit** the transaction, which returns once the broker has every record: a
   ``read_committed`` reader then sees the batch's outputs, and the group's offsets move
   past the batch, together; a crash before that leaves neither;
4. **apply** the committed state to the local store.

A transaction that fails is aborted, the consumer is sent back to the batch's first
offsets, and the batch is done again (from the start: nothing of it was kept). A failure
the producer cannot recover from (fenced, or a bug) raises, and the worker exits for its
supervisor to start it again.

**Fencing (KIP-447).** A worker that lost its partitions in a rebalance but runs on (a
zombie: stalled, or cut off from the group) must not commit what it did with them. The
group's generation does that: ``send_offsets_to_transaction`` carries the consumer's group
metadata, and the group coordinator refuses offsets from an old generation, so the
zombie's transaction aborts, outputs included. The new owner's first offset fetch waits
for any transaction still open on its partitions (librdkafka asks for stable offsets under
``read_committed``), and it reads the state's changelogs only after that. One gap is
closed on our side: a consumer that knows it left the group (``max.poll.interval.ms``
passed, or the coordinator said it is unknown) resets its metadata to "no generation",
which the coordinator does not check against the group; so the batch is aborted when the
consumer has no member id (or a new one) just before the offsets are sent and again before
the commit. So the ``transactional.id`` need not follow the partitions (the pre-KIP-447 way,
one id per input partition, would mean a producer per partition): it is one per worker,
stable across restarts of the same worker (``<app id>-<host>-<data dir>-<slot>``), so a
restarted worker's ``init_transactions`` aborts at once whatever its killed predecessor
left open.

**Transaction timeout.** ``TRANSACTION_TIMEOUT_MS`` (10 s): a transaction here lives for
one batch (milliseconds), but one left open by a worker that died and is not restarted
holds back every ``read_committed`` reader of the partitions it wrote (their last stable
offset) until the broker aborts it: within this timeout plus the broker's check interval
(``transaction.abort.timed.out.transaction.cleanup.interval.ms``, 10 s by default).

The loop knows nothing of Faust; :mod:`processors.worker` runs it in a thread of the
Faust worker, and tests run it directly.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from chargify_stream.errors import ConfigError
from chargify_stream.kafka_admin import ensure_topics
from chargify_stream.limits import deadletter_record_max
from chargify_stream.settings import Settings
from processors.metrics import ProcessorMetrics
from processors.outputs import Outputs, Unplaceable
from processors.splitter import Incoming, Outgoing, Split, Tally, split
from processors.state import DEDUP, REFERENCES, Store, bucket_seconds, dedup_record, parse_dedup

__all__ = [
    "BATCH_MAX",
    "TRANSACTION_TIMEOUT_MS",
    "Changelogs",
    "Pipeline",
    "changelog_topics",
    "consumer_config",
    "ensure_changelogs",
    "incoming",
    "producer_config",
    "restorer_config",
    "transactional_id",
]

log = logging.getLogger(__name__)

BATCH_MAX = 1000
TRANSACTION_TIMEOUT_MS = 10_000
CALL_TIMEOUT_S = 30.0
REPORT_INTERVAL_S = 60.0
# The consumer knows it is out of the group (max.poll.interval.ms passed, or the
# coordinator said so): its group metadata may no longer fence (see the module docstring).
_LEFT = KafkaError(
    KafkaError._ASSIGNMENT_LOST, "not a member of the group", txn_requires_abort=True
)
EXPIRY_INTERVAL_S = 60.0
UNPLACEABLE_PAUSE_S = 5.0
ATTEMPTS_IN_PLACE = 3


# Clients -------------------------------------------------------------------------------


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The raw topic's consumer: the processor's group, offsets only in transactions."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": settings.processor_app_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # The raw topic is not written in transactions; read_committed also makes the
        # offset fetch after an assignment wait for a previous owner's open transaction.
        "isolation.level": "read_committed",
        # Kafka's long-time default: a crashed worker's partitions move within 10 s.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        "fetch.wait.max.ms": 100,
        "queued.min.messages": 20_000,
        "log_level": 3,
    }


def producer_config(settings: Settings, transactional: str | None) -> dict[str, Any]:
    """The outputs' producer; transactional unless ``transactional`` is ``None``."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        "message.timeout.ms": TRANSACTION_TIMEOUT_MS,
        # The dead letter of any raw record fits (processors.outputs).
        "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
        "delivery.report.only.error": True,
        "log_level": 3,
    }
    if transactional is not None:
        config["transactional.id"] = transactional
        config["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
    return config


def restorer_config(settings: Settings) -> dict[str, Any]:
    """A consumer that reads a changelog partition to its end, outside any group."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"{settings.processor_app_id}-restore",  # never joined, never committed
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "log_level": 3,
    }


def transactional_id(settings: Settings, slot: int) -> str:
    """One per worker, the same after a restart (see the module docstring)."""
    folder = hashlib.sha256(settings.processor_data_dir.encode()).hexdigest()[:8]
    return f"{settings.processor_app_id}-{socket.gethostname()}-{folder}-{slot}"


@dataclass(frozen=True)
class Changelogs:
    """The state's changelog topic names."""

    references: str
    dedup: str

    def of(self, kind: str) -> str:
        return self.references if kind == REFERENCES else self.dedup


def changelog_topics(settings: Settings) -> Changelogs:
    app = settings.processor_app_id
    return Changelogs(f"{app}-references-changelog", f"{app}-dedup-changelog")


def ensure_changelogs(settings: Settings, partitions: int) -> Changelogs:
    """Create the changelogs (partitioned like raw); fail if one exists partitioned unlike it."""
    from confluent_kafka.admin import AdminClient

    topics = changelog_topics(settings)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 0})
    existing = admin.list_topics(timeout=30).topics
    for name in (topics.references, topics.dedup):
        if name in existing and len(existing[name].partitions) != partitions:
            raise ConfigError(
                f"changelog topic {name} has {len(existing[name].partitions)} partitions but "
                f"{settings.topic('raw')} has {partitions}; the state must be partitioned like "
                "the raw topic (use a new PROCESSOR_APP_ID, or recreate the changelog topics)"
            )
    window_ms = settings.processor_dedup_window_s * 1000
    common = {"partitions": partitions, "replication_factor": settings.topic_replication_factor}
    ensure_topics(
        settings.kafka_bootstrap_servers,
        [topics.references],
        config={"cleanup.policy": "compact"},
        **common,
    )
    ensure_topics(
        settings.kafka_bootstrap_servers,
        [topics.dedup],
        config={
            "cleanup.policy": "delete",
            "retention.ms": str(
                window_ms + bucket_seconds(settings.processor_dedup_window_s) * 1000
            ),
        },
        **common,
    )
    return topics


# The loop ------------------------------------------------------------------------------


@dataclass
class _Totals:
    tally: Tally = field(default_factory=Tally)
    batches: int = 0
    aborted: int = 0


class Pipeline:
    """The loop of the module docstring. ``run`` until ``stop`` is set.

    ``consumer`` is not yet subscribed; ``make_restorer`` makes a group-less consumer for
    reading a changelog; ``producer`` is transactional (``transactional=False``: an
    at-least-once pipeline for the benchmark's comparison, committing offsets after the
    outputs are acknowledged).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        producer: Producer,
        make_restorer: Callable[[], Consumer],
        store: Store,
        changelogs: Changelogs,
        metrics: ProcessorMetrics,
        transactional: bool = True,
    ) -> None:
        self.raw = settings.topic("raw")
        self.topics = {
            name: settings.topic(name) for name in ("transactions", "subscriptions", "deadletter")
        }
        self.consumer = consumer
        self.producer = producer
        self.make_restorer = make_restorer
        self.store = store
        self.changelogs = changelogs
        self.metrics = metrics
        self.transactional = transactional
        self.totals = _Totals()
        self.assigned: set[int] = set()
        self.outputs = Outputs(producer, self.topics)
        self._written: dict[tuple[str, int], int] = {}  # changelog records in the transaction
        self._positions: dict[tuple[str, int], int] = {}  # where the changelogs end
        self._next_report = time.monotonic() + REPORT_INTERVAL_S
        self._next_expiry = time.monotonic() + EXPIRY_INTERVAL_S

    # Running ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; then leave the group."""
        self.open(stop)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()

    def open(self, stop: threading.Event | None = None) -> None:
        """Register the transactional id (aborting what a predecessor left open) and join
        the group; waits while the broker is away (until ``stop``)."""
        if self.transactional:
            self._retry("init_transactions", self.producer.init_transactions, stop)
        self.consumer.subscribe(
            [self.raw],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def close(self) -> None:
        """Leave the group (its partitions move at once) and close the store."""
        try:
            self.consumer.close()
        finally:
            self.store.close()

    def step(self, timeout: float = 0.1) -> int:
        """Take one batch (waiting up to ``timeout``) and process it; its size."""
        batch: list[Incoming] = []
        for message in self.consumer.consume(BATCH_MAX, timeout):
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("reading %s: %s", self.raw, error)
                continue
            batch.append(incoming(message))
        if batch:
            self.process(batch)
        self._housekeeping()
        return len(batch)

    def process(self, batch: Sequence[Incoming]) -> bool:
        """Decide, send and commit one batch; False if it was aborted (to be read again)."""
        started = time.perf_counter()
        result = split(batch, self.store)
        ends: dict[int, int] = {}
        for record in batch:
            ends[record.partition] = record.offset + 1
        now = time.time()
        outgoing: list[Outgoing] | None = result.outgoing
        attempts = 0
        try:
            while outgoing is not None:
                if not self.transactional:
                    self._at_least_once(outgoing, result, ends, now)
                    break
                if self._transact(outgoing, result, ends, now):
                    break
                # Aborted: again at once with the records Kafka refused for themselves
                # replaced, or as it was (the producer's state after an abort, the broker
                # away a moment) a few times, or else from the batch's first records.
                outgoing, refused = self.outputs.replaced(outgoing)
                if not refused:
                    attempts += 1
                    if attempts >= ATTEMPTS_IN_PLACE:
                        outgoing = None
                    else:
                        time.sleep(0.1 * attempts)
        except Unplaceable as exc:
            log.error("%s; the batch is done again in %.0fs", exc, UNPLACEABLE_PAUSE_S)
            time.sleep(UNPLACEABLE_PAUSE_S)
            outgoing = None
        if outgoing is None:
            self._rewind(result.first_offsets)
            self.totals.aborted += 1
            self.metrics.aborted.inc()
            return False
        positions = {
            key: self._positions.get(key, 0) + count + (1 if self.transactional else 0)
            for key, count in self._written.items()
        }
        self._positions.update(positions)
        self.store.apply(
            references=result.learned,
            seen=[(now, keys) for keys in result.emitted.values()],
            positions=positions,
        )
        self.totals.batches += 1
        self.totals.tally.add(result.tally)
        self.metrics.record(result.tally)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return True

    # Sending ---------------------------------------------------------------------------

    def _produce_all(self, outgoing: Sequence[Outgoing], result: Split, now: float) -> None:
        """The outputs, then the state's changelog records (counted, for the positions:
        each committed transaction adds its records and one marker to a partition)."""
        self.outputs.produce(outgoing)
        written: dict[tuple[str, int], int] = {}
        dedup, references = self.changelogs.dedup, self.changelogs.references
        for partition, keys in result.emitted.items():
            key = str(result.first_offsets[partition]).encode()
            self._produce(dedup, partition, key, dedup_record(now, keys))
            written[dedup, partition] = written.get((dedup, partition), 0) + 1
        for (partition, subscription_id), reference in result.learned.items():
            self._produce(references, partition, subscription_id.encode(), reference.encode())
            written[references, partition] = written.get((references, partition), 0) + 1
        self._written = written

    def _produce(self, topic: str, partition: int, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, partition=partition)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)

    def _transact(
        self, outgoing: Sequence[Outgoing], result: Split, ends: dict[int, int], now: float
    ) -> bool:
        """One transaction for the batch; False if it was aborted."""
        producer = self.producer
        try:
            producer.begin_transaction()
            self._produce_all(outgoing, result, now)
            offsets = [TopicPartition(self.raw, p, offset) for p, offset in ends.items()]
            member = self.consumer.memberid()
            group = self.consumer.consumer_group_metadata()
            if not member or self.consumer.memberid() != member:
                raise KafkaException(_LEFT)
            self._call(lambda: producer.send_offsets_to_transaction(offsets, group, CALL_TIMEOUT_S))
            if self.consumer.memberid() != member:
                raise KafkaException(_LEFT)
            self._call(lambda: producer.commit_transaction(CALL_TIMEOUT_S))
            return True
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal() or not (error.txn_requires_abort() or error.retriable()):
                raise
            log.warning("aborting the batch's transaction: %s", error)
        except Unplaceable:
            self._call(lambda: producer.abort_transaction(CALL_TIMEOUT_S), abortable=False)
            raise
        self._call(lambda: producer.abort_transaction(CALL_TIMEOUT_S), abortable=False)
        return False

    def _call(self, call: Callable[[], None], *, abortable: bool = True) -> None:
        """Call a transaction step, again while it fails retriably."""
        delay = 0.1
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or (abortable and error.txn_requires_abort()):
                    raise
                if not error.retriable():
                    raise
                log.warning("transaction step failed (%s); retrying in %.1fs", error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _at_least_once(
        self, outgoing: Sequence[Outgoing], result: Split, ends: dict[int, int], now: float
    ) -> None:
        """The benchmark's comparison: send, wait for every ack, then commit the offsets."""
        self._produce_all(outgoing, result, now)
        while self.producer.flush(CALL_TIMEOUT_S):
            log.warning("outputs not acknowledged within %.0fs; waiting on", CALL_TIMEOUT_S)
        offsets = [TopicPartition(self.raw, p, offset) for p, offset in ends.items()]
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def _rewind(self, first_offsets: dict[int, int]) -> None:
        """Send the consumer back to the batch's first records (the batch was not committed)."""
        for partition, offset in first_offsets.items():
            try:
                self.consumer.seek(TopicPartition(self.raw, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its next owner reads it
                log.info("not rewinding %s[%d]: %s", self.raw, partition, exc)

    def _retry(self, what: str, call: Callable[[], None], stop: threading.Event | None) -> None:
        delay = 0.5
        while stop is None or not stop.is_set():
            try:
                call()
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or not error.retriable():
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # Rebalances ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside consume(), between batches: no transaction is open.
        numbers = sorted(tp.partition for tp in partitions)
        started = time.monotonic()
        # Wait until any transaction a previous owner left open is done (librdkafka asks
        # for stable offsets under read_committed), so the changelogs read next hold it.
        while True:
            try:
                consumer.committed(partitions, timeout=CALL_TIMEOUT_S)
                break
            except KafkaException as exc:
                log.warning("fetching the committed offsets failed (%s); retrying", exc)
                time.sleep(0.5)
        restored = self.restore(numbers)
        self.assigned.update(numbers)
        log.info(
            "assigned %s partitions %s; state restored in %.1fs (%d changelog records)",
            self.raw,
            numbers,
            time.monotonic() - started,
            restored,
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = {tp.partition for tp in partitions}
        self.assigned -= numbers
        log.info("revoked %s partitions %s", self.raw, sorted(numbers))

    def restore(self, partitions: Sequence[int]) -> int:
        """Bring the local state of ``partitions`` up to their changelogs' ends."""
        count = restore(self.make_restorer, self.store, self.changelogs, partitions)
        for topic in (self.changelogs.references, self.changelogs.dedup):
            for p in partitions:
                self._positions[topic, p] = self.store.position(topic, p) or 0
        return count

    # Housekeeping ----------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_INTERVAL_S
            dropped = self.store.expire()
            if dropped:
                log.info("dropped %d dedup buckets older than the window", dropped)
        if now >= self._next_report:
            self._next_report = now + REPORT_INTERVAL_S
            log.info(
                "processor totals: %s; %d batches committed, %d aborted",
                self.totals.tally.summary(),
                self.totals.batches,
                self.totals.aborted,
            )
        self.metrics.seen.set(self.store.added)


def restore(
    make_restorer: Callable[[], Consumer],
    store: Store,
    changelogs: Changelogs,
    partitions: Sequence[int],
) -> int:
    """Read the changelogs of ``partitions`` from the local copy's positions to their
    ends, and apply them; how many records were read."""
    wanted: list[TopicPartition] = []
    restorer = make_restorer()
    try:
        for kind in (REFERENCES, DEDUP):
            topic = changelogs.of(kind)
            for p in partitions:
                start = store.position(topic, p)
                tp = TopicPartition(topic, p)
                low, high = _watermarks(restorer, tp)
                if start is not None and start >= high:
                    continue
                tp.offset = OFFSET_BEGINNING if start is None or start < low else start
                wanted.append(tp)
        if not wanted:
            return 0
        restorer.assign(wanted)
        return _read_to_end(restorer, wanted, store, changelogs)
    finally:
        restorer.close()


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    """The partition's low and high watermarks, asked again while the broker cannot say
    (a topic just created has no leader for a moment)."""
    delay = 0.1
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=CALL_TIMEOUT_S)
            return low, high
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.fatal() or not (error.retriable() or _no_leader(error)):
                raise
            log.info("asking for %s[%d]'s offsets: %s; again", tp.topic, tp.partition, error)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _no_leader(error: KafkaError) -> bool:
    return error.code() in (
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    )


def _read_to_end(
    restorer: Consumer, wanted: list[TopicPartition], store: Store, changelogs: Changelogs
) -> int:
    """Apply every committed changelog record of ``wanted`` up to the end (EOF)."""
    pending = {(tp.topic, tp.partition) for tp in wanted}
    count = 0
    while pending:
        references: dict[tuple[int, str], str] = {}
        seen: list[tuple[float, Iterable[int]]] = []
        positions: dict[tuple[str, int], int] = {}
        for message in restorer.consume(10_000, 1.0):
            error = message.error()
            topic, partition = message.topic() or "", message.partition() or 0
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard((topic, partition))
                    positions[topic, partition] = message.offset() or 0  # the end
                elif error.fatal():
                    raise KafkaException(error)
                continue
            count += 1
            positions[topic, partition] = (message.offset() or 0) + 1
            value = message.value()
            if value is None:
                continue
            if topic == changelogs.references:
                references[partition, (message.key() or b"").decode()] = value.decode()
            else:
                seen.append(parse_dedup(value))
        store.apply(references=references, seen=seen, positions=positions)
    return count


def incoming(message: Message) -> Incoming:
    """The splitter's record of a raw message."""
    headers: Any = message.headers()  # a list of (name, value) pairs, as produced
    return Incoming(
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        message.key(),
        message.value() or b"",
        [(k, v) for k, v in headers if v is not None] if headers else [],
    )


def build(
    settings: Settings,
    *,
    store: Store,
    slot: int,
    changelogs: Changelogs,
    metrics: ProcessorMetrics,
    transactional: bool = True,
) -> Pipeline:
    """The pipeline and its clients (the processor's composition root)."""

    return Pipeline(
        settings,
        consumer=Consumer(consumer_config(settings)),
        producer=Producer(
            producer_config(settings, transactional_id(settings, slot) if transactional else None)
        ),
        make_restorer=lambda: Consumer(restorer_config(settings)),
        store=store,
        changelogs=changelogs,
        metrics=metrics,
        transactional=transactional,
    )
