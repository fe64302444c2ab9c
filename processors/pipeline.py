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
offsets, and the batch is done again (from the start: nothing of it was kept). A producer
that failed for good (its epoch gone, say after the coordinator aborted a transaction that
outlived its timeout during a broker restart) is replaced by a new one with the same
transactional id, and the batch is read again. Any other failure (a bug) raises, and the
worker exits for its supervisor to start it again.

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

**Transaction timeout.** ``processors.clients.TRANSACTION_TIMEOUT_MS`` (10 s): a
transaction here lives for one batch (milliseconds), but one left open by a worker that
died and is not restarted holds back every ``read_committed`` reader of the partitions it
wrote (their last stable offset) until the broker aborts it: within this timeout plus the
broker's check interval (``transaction.abort.timed.out.transaction.cleanup.interval.ms``,
10 s by default).

The loop knows nothing of Faust; :mod:`processors.worker` runs it in a thread of the
Faust worker, and tests run it directly.

The module is a little under 500 lines, kept whole: a batch's transaction, its retries and
aborts, the rebalance callbacks and the restore all move the same offsets and producer, and
reading them in one place is how their order can be checked.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from chargify_stream.base.retry import RetryStopped, retry
from chargify_stream.base.settings import Settings
from chargify_stream.processors.lifecycle import exit_on_failure
from chargify_stream.processors.metrics import ProcessorMetrics
from chargify_stream.processors.outputs import Outputs, Unplaceable
from chargify_stream.processors.restore import restore
from chargify_stream.processors.splitter import Incoming, Outgoing, Split, Tally, split
from chargify_stream.processors.state import Store, dedup_record

if TYPE_CHECKING:
    from chargify_stream.processors.clients import Changelogs

__all__ = ["BATCH_MAX", "Pipeline", "incoming"]

log = logging.getLogger(__name__)

# A transaction costs a few round trips whatever its size: 2,000 records rather than 1,000
# halved that per record while draining a backlog (bench/processor/run.py: 0.77x of at
# least once at 1,000, 0.87-0.88x at 2,000). A live stream's batches are far smaller.
BATCH_MAX = 2000
# A transaction step that takes longer than the transaction may live is not worth waiting for.
CALL_TIMEOUT_S = 10.0
REPORT_INTERVAL_S = 60.0
# The consumer knows it is out of the group (max.poll.interval.ms passed, or the
# coordinator said so): its group metadata may no longer fence (see the module docstring).
_LEFT = KafkaError(
    KafkaError._ASSIGNMENT_LOST, "not a member of the group", txn_requires_abort=True
)
EXPIRY_INTERVAL_S = 60.0
UNPLACEABLE_PAUSE_S = 5.0
ATTEMPTS_IN_PLACE = 3
STEP_ATTEMPTS = 3
ABORT_DEADLINE_S = 2 * CALL_TIMEOUT_S
# A batch not done after this long (its steps time out well before) is stuck in the client.
STALL_S = 90.0


# The loop ------------------------------------------------------------------------------


@dataclass
class _Totals:
    tally: Tally = field(default_factory=Tally)
    batches: int = 0
    aborted: int = 0


class Pipeline:
    """The loop of the module docstring. ``run`` until ``stop`` is set.

    ``consumer`` is not yet subscribed; ``make_restorer`` makes a group-less consumer for
    reading a changelog; ``make_producer`` makes the producer (again after a fatal error),
    transactional (``transactional=False``: an at-least-once pipeline for the benchmark's
    comparison, committing offsets after the outputs are acknowledged).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: Consumer,
        make_producer: Callable[[], Producer],
        make_restorer: Callable[[], Consumer],
        store: Store,
        changelogs: Changelogs,
        metrics: ProcessorMetrics,
        transactional: bool = True,
    ) -> None:
        self.raw = settings.topic("raw")
        self.topics = {
            name: settings.topic(name)
            for name in ("transactions", "subscriptions", "deadletter", "decisions")
        }
        self.consumer = consumer
        self.make_producer = make_producer
        self.producer = make_producer()
        self.make_restorer = make_restorer
        self.store = store
        self.changelogs = changelogs
        self.metrics = metrics
        self.transactional = transactional
        self.totals = _Totals()
        self.assigned: set[int] = set()
        self.outputs = Outputs(self.producer, self.topics)
        self._written: dict[tuple[str, int], int] = {}  # changelog records in the transaction
        self._busy_since: float | None = None  # when the batch in hand was taken
        self._closed = threading.Event()  # ends the stall watchdog
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
        the group; waits while the broker is away (until ``stop``). A batch that takes more
        than ``STALL_S`` (seen after a broker restart: a call of the client that did not
        return, whatever its timeout) exits the process, for its supervisor to start it
        again; nothing uncommitted counts."""
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()
        if self.transactional:
            self._retry("init_transactions", self.producer.init_transactions, stop)
        self.consumer.subscribe(
            [self.raw],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )

    def _watch(self) -> None:
        while not self._closed.wait(5.0):
            since = self._busy_since
            if since is not None and time.monotonic() - since > STALL_S:
                exit_on_failure(RuntimeError(f"a batch has not finished in {STALL_S:.0f}s"))

    def close(self) -> None:
        """Leave the group (its partitions move at once), close the store and end the
        watchdog (which holds the pipeline, and so its producer, while it runs)."""
        self._closed.set()
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
        self._busy_since = time.monotonic()
        try:
            return self._process(batch)
        finally:
            self._busy_since = None

    def _process(self, batch: Sequence[Incoming]) -> bool:
        started = time.perf_counter()
        result = split(batch, self.store)
        ends: dict[int, int] = {}
        for record in batch:
            ends[record.partition] = record.offset + 1
        now = time.time()
        outgoing: list[Outgoing] | None = [*result.outgoing, *result.decisions]
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
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not (self.transactional and error.fatal()):
                raise
            # E.g. the coordinator aborted the transaction on its timeout while the broker
            # restarted, and the producer's epoch is gone: a new producer with the same
            # transactional id takes over (fencing the old one) and the batch is redone.
            log.warning("the producer failed for good (%s); starting a new one", error)
            self._renew_producer()
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
        self._observe_lag(ends)
        return True

    def _observe_lag(self, ends: dict[int, int]) -> None:
        """``processor_consumer_lag`` of the batch's partitions, from the watermarks the
        consumer's last fetch brought (no broker round trip)."""
        for partition, position in ends.items():
            try:
                _, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.raw, partition), cached=True
                )
            except KafkaException:
                continue
            if high >= 0:
                self.metrics.lag.labels(str(partition)).set(max(high - position, 0))

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
            self._abort()
            raise
        self._abort()
        return False

    def _abort(self) -> None:
        """Abort the open transaction. Seen once after a broker restart: the call did not
        return, whatever its timeout; after ``ABORT_DEADLINE_S`` the process exits (its
        supervisor starts it again, and its new producer's ``init_transactions`` aborts
        the transaction on the coordinator)."""
        done = threading.Event()

        def watch() -> None:
            if not done.wait(ABORT_DEADLINE_S):
                exit_on_failure(RuntimeError(f"aborting a transaction took {ABORT_DEADLINE_S}s"))

        threading.Thread(target=watch, name="abort-watchdog", daemon=True).start()
        try:
            self._call(lambda: self.producer.abort_transaction(CALL_TIMEOUT_S), abortable=False)
        finally:
            done.set()

    def _call(self, call: Callable[[], None], *, abortable: bool = True) -> None:
        """Call a transaction step, again while it fails retriably: ``STEP_ATTEMPTS`` times
        for a step of the transaction (then the error goes up, and the transaction is
        aborted), for ever for the abort itself."""

        def give_up(exc: BaseException, attempt: int) -> bool:
            error: KafkaError = exc.args[0]
            if error.fatal() or (abortable and error.txn_requires_abort()):
                return True
            return not error.retriable() or (abortable and attempt >= STEP_ATTEMPTS)

        def again(exc: BaseException, pause: float, attempt: int) -> None:
            log.warning(
                "transaction step failed (attempt %d: %s); retrying in %.1fs",
                attempt,
                exc.args[0],
                pause,
            )

        retry(call, retry_on=KafkaException, first=0.1, most=2.0, give_up=give_up, on_retry=again)

    def _at_least_once(
        self, outgoing: Sequence[Outgoing], result: Split, ends: dict[int, int], now: float
    ) -> None:
        """The benchmark's comparison: send, wait for every ack, then commit the offsets."""
        self._produce_all(outgoing, result, now)
        while self.producer.flush(CALL_TIMEOUT_S):
            log.warning("outputs not acknowledged within %.0fs; waiting on", CALL_TIMEOUT_S)
        offsets = [TopicPartition(self.raw, p, offset) for p, offset in ends.items()]
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def _renew_producer(self) -> None:
        """Replace a producer that failed fatally by a new one with the same id."""
        with contextlib.suppress(Exception):
            self.producer.purge()
        self.producer = self.make_producer()
        self.outputs = Outputs(self.producer, self.topics)
        self._retry("init_transactions", self.producer.init_transactions, None)

    def _rewind(self, first_offsets: dict[int, int]) -> None:
        """Send the consumer back to the batch's first records (the batch was not committed)."""
        for partition, offset in first_offsets.items():
            try:
                self.consumer.seek(TopicPartition(self.raw, partition, offset))
            except KafkaException as exc:  # revoked meanwhile: its next owner reads it
                log.info("not rewinding %s[%d]: %s", self.raw, partition, exc)

    def _retry(self, what: str, call: Callable[[], None], stop: threading.Event | None) -> None:
        """``call()``, again while it fails retriably; until ``stop`` is set."""
        if stop is not None and stop.is_set():
            return

        def give_up(exc: BaseException, _attempt: int) -> bool:
            error: KafkaError = exc.args[0]
            return error.fatal() or not error.retriable()

        def again(exc: BaseException, pause: float, _attempt: int) -> None:
            log.warning("%s failed (%s); retrying in %.1fs", what, exc.args[0], pause)

        with contextlib.suppress(RetryStopped):
            retry(
                call,
                retry_on=KafkaException,
                first=0.5,
                most=5.0,
                stop=stop,
                give_up=give_up,
                on_retry=again,
            )

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
