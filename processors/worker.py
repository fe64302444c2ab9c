"""``chargify-stream processor``: the Faust app that splits raw webhooks by type.

One agent reads ``chargify.webhooks.raw`` (keyed by subscription id, so every event of a
subscription, and every retry of a webhook, reaches the same partition) and hands each
batch to :func:`processors.splitter.split`, which decides every record: an Avro record
keyed by customer reference, a dead letter, or nothing (ignored). Several workers share
the raw topic's partitions as one consumer group (``PROCESSOR_APP_ID``).

Two tables, partitioned like the raw topic and kept in memory, rebuilt from their
changelog topics when a worker starts or partitions move (:mod:`processors.state`):
``subscription-references`` (subscription id -> customer reference) and
``seen-webhooks`` (webhook ids emitted within ``PROCESSOR_DEDUP_WINDOW_S``).

Delivery is at-least-once. The fetch loop hands the agent the raw records in batches of
up to ``BATCH_MAX`` (:func:`processors.drain.deliver_in_batches`: all that arrived while
the last batch was being worked on), past Faust's per-record stream path; the batch's
outputs are sent (through librdkafka, :mod:`processors.outputs`) and awaited until the
broker acknowledged every one (a failed send is retried, never skipped); only then are
the tables written and the batch done. While one batch's outputs are on their way, the
next batch is split (against the tables plus what the first will write to them), so the
agent does not sit idle waiting for the broker. What is processed, and so what is
committed, is decided by :mod:`processors.positions`, not by Faust's ack bookkeeping
(which can skip records after a rebalance): each partition is processed in offset order
from the group's committed offset, a record past a hole sends the consumer back to read
the hole again, and the commit is the offset after the last record whose outputs were
acknowledged. Faust commits those offsets on its
interval and on stop, after flushing its own producer (which carries the table
changelogs). A worker killed at any point reads the unfinished records again; the
duplicates that can produce are dropped by the seen-webhooks table or, failing that,
absorbed by the idempotent sink. Agent concurrency is 1. Faust's ``exactly_once``
guarantee is not used.

SIGTERM is graceful: Faust stops fetching, waits for its streams (its
``stream_wait_empty``, which here also finishes the batch in hand, its outputs
acknowledged; for at most ``processors.drain.FINISH_TIMEOUT_S``), commits, and the
process exits 0. A stop that is not done ``STOP_TIMEOUT_S`` after the signal is cut
short: the process prints every thread's stack and exits 1, and what it had not
committed is read again by the group. (Seen under heavy load: a worker stopped just
after a rebalance waited for ever in Faust's flush of its producer before the commit.)
A batch that fails for a reason other than its records (a bug, not bad input, which is
dead-lettered) exits the process at once with status 1, uncommitted.

Faust's web server listens on ``127.0.0.1:PROCESSOR_WEB_PORT`` only, and serves the
Prometheus metrics at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import faulthandler
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import faust
from confluent_kafka import KafkaException
from faust.web import Request, Response, View
from mode.utils.times import want_seconds

from chargify_stream.errors import ConfigError, TransientError
from chargify_stream.kafka_admin import (
    check_deadletter_topic,
    ensure_pipeline_topics,
    ensure_topics,
)
from chargify_stream.kafka_config import faust_credentials, librdkafka_config
from chargify_stream.logs import log_failure
from chargify_stream.settings import Settings
from processors.drain import Feed, deliver_in_batches, shorten_fetch_wait
from processors.metrics import CONTENT_TYPE, ProcessorMetrics
from processors.outputs import Outputs
from processors.positions import (
    TP,
    Admission,
    Positions,
    commit_positions_only,
    deliver_every_record,
)
from processors.routing import NATIVE_SCAN
from processors.splitter import Incoming, Pending, Split, Tally, split
from processors.state import References, SeenWebhooks, Tables

__all__ = ["build_app", "run"]

log = logging.getLogger(__name__)

BATCH_MAX = 1000
GC_YOUNG_THRESHOLD = 50_000
REFERENCES_TABLE = "subscription-references"
_T = TypeVar("_T")
SEEN_TABLE = "seen-webhooks"


class _Fetched(NamedTuple):
    """A raw record as the fetch hands it to the agent (``drain.deliver_in_batches``)."""

    incoming: Incoming
    tp: TP
    generation_id: int  # the consumer generation it was fetched in; -1 never matches


def _fetched(tp: TP, record: Any, generation_id: int | None) -> _Fetched:
    """The fed record of one aiokafka ``ConsumerRecord``."""
    headers = record.headers
    return _Fetched(
        Incoming(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value or b"",
            [(k, v) for k, v in headers if v is not None] if headers else [],
        ),
        tp,
        -1 if generation_id is None else generation_id,
    )


@dataclass
class _Sent:
    """A batch whose outputs are on their way to the broker."""

    admission: Admission
    result: Split
    sending: asyncio.Future[None]
    started: float
    rereads: int


class _KafkaPositions:
    """The :class:`processors.positions.Broker` of a worker: admin queries, Faust seeks.

    Admin requests run in a thread and are retried until the broker answers (while it
    is away the worker could not read anyway).
    """

    def __init__(self, app: faust.App, settings: Settings) -> None:
        from confluent_kafka.admin import AdminClient

        self._app = app
        self._settings = settings
        self._group = settings.processor_app_id
        self._admin = AdminClient(librdkafka_config(settings, log_level=0))

    async def committed(self, tps: Collection[TP]) -> dict[TP, int | None]:
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        request = ConsumerGroupTopicPartitions(
            self._group, [TopicPartition(tp.topic, tp.partition) for tp in tps]
        )

        def ask() -> dict[TP, int | None]:
            futures = self._admin.list_consumer_group_offsets([request], request_timeout=10)
            answer = futures[self._group].result(timeout=15)
            for t in answer.topic_partitions:
                if t.error is not None:  # not "nothing committed" (-1001): ask again
                    raise KafkaException(t.error)
            found = {(t.topic, t.partition): t.offset for t in answer.topic_partitions}
            offsets = {tp: found.get((tp.topic, tp.partition), -1) for tp in tps}
            return {tp: (offset if offset >= 0 else None) for tp, offset in offsets.items()}

        return await self._retrying("committed offsets", ask)

    async def earliest(self, tps: Collection[TP]) -> dict[TP, int]:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import OffsetSpec

        def ask() -> dict[TP, int]:
            futures = self._admin.list_offsets(
                {TopicPartition(tp.topic, tp.partition): OffsetSpec.earliest() for tp in tps},
                request_timeout=10,
            )
            found = {(k.topic, k.partition): f.result(timeout=15) for k, f in futures.items()}
            return {tp: found[(tp.topic, tp.partition)].offset for tp in tps}

        return await self._retrying("earliest offsets", ask)

    async def seek(self, tp: TP, offset: int) -> None:
        try:
            await self._app.consumer.seek_wait({tp: offset})
        except Exception as exc:  # e.g. the partition was revoked meanwhile
            # Nothing is lost: the position stands, and the hole is found again by the
            # next record past it or by the unstick timer.
            log.warning("seeking %s[%d] to %d failed: %r", tp.topic, tp.partition, offset, exc)

    async def first_offset(self, tp: TP, offset: int) -> int | None:
        from confluent_kafka import Consumer, TopicPartition

        def ask() -> int | None:
            consumer = Consumer(
                {
                    **librdkafka_config(self._settings),
                    "group.id": f"{self._group}-probe",  # never joined, never committed
                    "enable.auto.commit": False,
                    "isolation.level": "read_uncommitted",  # as Faust reads
                    "log_level": 0,
                }
            )
            try:
                consumer.assign([TopicPartition(tp.topic, tp.partition, offset)])
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    message = consumer.poll(0.5)
                    if message is not None and message.error() is None:
                        return message.offset()
                return None
            finally:
                consumer.close()

        return await self._retrying("the first record of a hole", ask)

    async def _retrying(self, what: str, ask: Callable[[], _T]) -> _T:
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(ask)
            except (KafkaException, concurrent.futures.TimeoutError) as exc:  # broker away
                log.warning(
                    "asking the broker for %s failed (%s); retrying in %.1fs", what, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)


def build_app(
    settings: Settings,
    *,
    partitions: int,
    outputs: Outputs,
    metrics: ProcessorMetrics,
    on_failure: Callable[[BaseException], None],
) -> faust.App:
    """The Faust app with its source topic, tables, agent, timers and metrics page.

    ``partitions`` is the raw topic's partition count; both tables use it. ``outputs``
    publishes what the agent decides (see :mod:`processors.outputs`). ``on_failure`` is
    called if a batch fails for a reason other than its records (the agent then stops).
    """
    app = faust.App(
        settings.processor_app_id,
        broker=[f"kafka://{s}" for s in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),
        store="memory://",
        datadir=settings.processor_data_dir,
        topic_partitions=partitions,
        topic_replication_factor=settings.topic_replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # Faust's 60 s default leaves a crashed worker's partitions idle for a minute
        # before the group moves them; 10 s is Kafka's long-time default.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=settings.processor_web_port,
        # The table pages would show customer references; the graph is for debugging.
        web_tables_enabled=False,
        web_graph_enabled=False,
    )
    raw_topic = settings.topic("raw")
    raw = app.topic(
        raw_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    window_ms = settings.processor_dedup_window_s * 1000
    references = References(
        app.Table(REFERENCES_TABLE, partitions=partitions, key_type=str, value_type=str)
    )
    seen = SeenWebhooks(
        app.Table(
            SEEN_TABLE,
            partitions=partitions,
            key_type=str,
            # Tombstones from the expiry timer keep it small; retention is the backstop
            # for entries of partitions no worker owned when they expired.
            extra_topic_configs={
                "cleanup.policy": "compact,delete",
                "retention.ms": str(2 * window_ms),
                "segment.ms": str(max(60_000, window_ms // 4)),
            },
        ),
        settings.processor_dedup_window_s,
    )
    tables = Tables(references, seen)
    totals = Tally()
    positions = Positions(_KafkaPositions(app, settings))
    # Before the consumer starts: see processors.positions for why.
    deliver_every_record(app.consumer, raw_topic)
    feed = Feed(BATCH_MAX)
    deliver_in_batches(app.consumer, raw_topic, feed, make=_fetched)
    shorten_fetch_wait(app.consumer)
    commit_positions_only(app.consumer, positions, lambda: app.consumer_generation_id)

    @seen.table.on_recover
    async def rebuild_index() -> None:
        seen.rebuild()

    @app.agent(raw, concurrency=1)
    async def split_raw(stream: faust.StreamT[bytes]) -> None:
        # Faust subscribes this agent to the raw topic and runs it; the records come in
        # batches through ``feed`` (processors.drain), not one by one through ``stream``.
        # While a batch's outputs are on their way to the broker, the next batch is
        # split (see _start); the feed is done once nothing is on its way.
        ahead: _Sent | None = None
        try:
            while True:
                if ahead is not None and not len(feed):
                    finished = await _finish(ahead)
                    ahead = None
                    feed.done()
                    if not finished:
                        return
                    continue
                batch = await feed.take()
                ahead = await _start(batch, ahead)
                if ahead is None:  # failed; on_failure has been called
                    feed.done()
                    return
        finally:
            if ahead is not None:
                ahead.sending.cancel()  # stopping: the batch is not done, and is read again

    async def _start(messages: list[_Fetched], ahead: _Sent | None) -> _Sent | None:
        """Split a batch, finish ``ahead`` meanwhile, then send the batch's outputs.

        The split runs while ``ahead``'s outputs are being acknowledged, so it sees the
        tables plus what ``ahead`` will write to them (:class:`Pending`). Only then is
        the batch admitted (after ``ahead`` moved the positions on): when a record is
        not admitted, the batch is split again without it.
        """
        started = time.perf_counter()
        try:
            incoming = [m.incoming for m in messages]
            result = split(incoming, tables if ahead is None else Pending(tables, ahead.result))
            if ahead is not None and not await _finish(ahead):
                return None
            rereads = positions.rereads
            admission = await positions.admit(
                [(m.tp, m.incoming.offset, m.generation_id) for m in messages],
                app.consumer_generation_id,
            )
            if len(admission.admitted) != len(messages):
                result = split([incoming[i] for i in admission.admitted], tables)
        except asyncio.CancelledError:
            raise  # the batch is not done, and is read again
        except Exception as exc:
            _failed(exc)
            return None
        sending = asyncio.ensure_future(outputs.send(result.outgoing))
        return _Sent(admission, result, sending, started, positions.rereads - rereads)

    async def _finish(sent: _Sent) -> bool:
        """Wait for a batch's outputs, then write the tables and move the positions on.

        False if it failed (``on_failure`` has been called).
        """
        try:
            await sent.sending
            # Only now: a seen entry for an output that never reached the broker would
            # drop the record's redelivery as a duplicate.
            references.learn(sent.result.learned)
            seen.remember(sent.result.emitted, sent.result.first_offsets)
            positions.done(sent.admission)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _failed(exc)
            return False
        metrics.repeated.inc(sent.admission.repeated)
        metrics.rereads.inc(sent.rereads)
        totals.add(sent.result.tally)
        metrics.record(sent.result.tally)
        metrics.batch_size.observe(len(sent.admission.admitted))
        metrics.batch_seconds.observe(time.perf_counter() - sent.started)
        return True

    def _failed(exc: Exception) -> None:
        # Not a bad record (split dead-letters those): stop the worker rather than run
        # on past a batch that is never done, which would stall commits.
        log.exception("processor batch failed; stopping the worker")
        on_failure(exc)

    expiry_interval = min(300.0, settings.processor_dedup_window_s / 4)

    @app.timer(interval=expiry_interval)
    async def expire_seen() -> None:
        # Housekeeping: a failure here is logged, not allowed to crash the worker (an
        # exception from a Faust timer stops the whole app).
        try:
            actives = app.assignor.assigned_actives()
            forgotten = seen.expire({tp.partition for tp in actives if tp.topic == raw_topic})
        except Exception as exc:
            log_failure(log, "expiring the dedup table failed; trying again next time", exc=exc)
            return
        if forgotten:
            log.info("forgot %d batches of webhook ids older than the dedup window", forgotten)

    @app.timer(interval=1.0)
    async def unstick() -> None:
        consumer = app.consumer
        try:
            actives = [tp for tp in app.assignor.assigned_actives() if tp.topic == raw_topic]
            highwaters = {tp: consumer.highwater(tp) for tp in actives}
            await positions.unstick(highwaters, app.consumer_generation_id)
        except Exception as exc:
            log_failure(log, "checking the raw partitions' progress failed; trying again", exc=exc)

    @app.timer(interval=60.0)
    async def report() -> None:
        log.info(
            "processor totals: %s; %d subscriptions known, %d webhook ids in the dedup window",
            totals.summary(),
            len(references),
            len(seen),
        )

    @app.page("/metrics")
    async def metrics_page(self: View, request: Request) -> Response:
        metrics.references.set(len(references))
        metrics.seen.set(len(seen))
        return self.bytes(metrics.render(), content_type=CONTENT_TYPE)

    return app


def _partition_counts(settings: Settings, topics: Iterable[str]) -> dict[str, int]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(librdkafka_config(settings, log_level=0))
    metadata = admin.list_topics(timeout=30).topics
    return {t: len(metadata[t].partitions) for t in topics if t in metadata}


def _check_changelogs(app: faust.App, settings: Settings, partitions: int) -> None:
    """Fail at start if a table's changelog has a different partition count than raw.

    The tables must be co-partitioned with the raw topic; Faust would otherwise recover
    entries into the wrong partitions without a word.
    """
    names = [table.changelog_topic.get_topic_name() for table in app.tables.values()]
    for name, count in _partition_counts(settings, names).items():
        if count != partitions:
            raise ConfigError(
                f"changelog topic {name} has {count} partitions but {settings.topic('raw')} "
                f"has {partitions}; the tables must be partitioned like the raw topic "
                "(use a new PROCESSOR_APP_ID, or recreate the changelog topics)"
            )


def _create_changelogs(app: faust.App, settings: Settings) -> None:
    """Create the tables' changelog topics before Faust starts, as Faust would declare them.

    Faust declares them itself as it starts, while its consumer already asks for them:
    two workers starting together then both create them at that moment, and a consumer
    told that a changelog does not exist yet ("not found in cluster metadata") was seen
    in every stop that hung in Faust's producer flush (see ``STOP_TIMEOUT_S``). Created
    here, and awaited until each partition has a leader, they exist before anything asks.
    """
    transport: Any = app.transport
    for table in app.tables.values():
        topic: Any = table.changelog_topic
        retention = int(want_seconds(topic.retention) * 1000) if topic.retention else None
        config = transport._topic_config(retention, topic.compacting, topic.deleting)
        config.update(topic.config or {})
        ensure_topics(
            settings,
            [topic.get_topic_name()],
            partitions=topic.partitions,
            replication_factor=settings.topic_replication_factor,
            config={key: str(value) for key, value in config.items()},
        )


STOP_TIMEOUT_S = 15.0


# After the watchdog's own deadline: if even it cannot run (the main thread stuck in C
# with the GIL held, or blocked writing to stderr under the logging lock), faulthandler's
# C thread dumps the stacks and exits.
_BACKSTOP_S = 5.0


def _exit_if_still_running(after: float, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """From a signal on: exit the process ``after`` seconds later, if it is still there.

    Returns the function that calls it off (the worker calls it once its stop is done).

    A thread, so that it fires even if the event loop is stuck. Before exiting it prints
    what each asyncio task of ``loop`` awaits (if the loop still runs callbacks) and every
    thread's stack. Nothing is lost by it: offsets are committed only after the outputs
    and the tables' changelog records are acknowledged, so the next owner of each
    partition reads again what was not.
    """

    def print_tasks(printed: threading.Event) -> None:
        try:
            for task in asyncio.all_tasks():
                print(f"task {task.get_name()}:", file=sys.stderr)
                task.print_stack(limit=12, file=sys.stderr)
        finally:
            printed.set()

    def cut_short() -> None:
        try:
            log.error(
                "the processor did not stop within %gs of the signal; exiting without "
                "finishing (records not committed will be read again by the group); "
                "the stacks of its tasks and threads follow",
                after,
            )
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(ValueError, OSError):
                    handler.flush()
            printed = threading.Event()
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(print_tasks, printed)
                printed.wait(2.0)
            faulthandler.dump_traceback(all_threads=True)
            logging.shutdown()
        finally:
            os._exit(1)

    timer = threading.Timer(after, cut_short)
    timer.daemon = True
    timer.start()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr is no file
        faulthandler.dump_traceback_later(after + _BACKSTOP_S, exit=True)

    def call_off() -> None:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    return call_off


def run(settings: Settings) -> int:
    """Pre-create the topics (Faust does not create source topics), then run a worker."""
    from faust.worker import Worker

    # A young-generation collection every 50,000 allocations instead of 700: each
    # webhook allocates a few dozen short-lived objects, and the collections also walk the
    # app's long-lived ones. +11 % events/s in two alternating pairs of benchmark runs.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        ensure_pipeline_topics(settings)
        check_deadletter_topic(settings)
        partitions = _partition_counts(settings, [settings.topic("raw")])[settings.topic("raw")]
    except (TransientError, KafkaException) as exc:
        return _broker_away_at_start(exc)
    Path(settings.processor_data_dir).mkdir(parents=True, exist_ok=True)
    metrics = ProcessorMetrics()
    outputs = Outputs(settings, on_retry=metrics.send_retries.inc)

    def stop_on_failure(exc: BaseException) -> None:
        # Exit at once, non-zero, for the supervisor to restart the worker. A graceful
        # stop would wait for the failed batch to be acked, which it never will be; its
        # records, and any acked since the last commit, are read again on restart.
        log.critical("processor stopped after a failed batch: %r", exc)
        logging.shutdown()
        os._exit(1)

    app = build_app(
        settings,
        partitions=partitions,
        outputs=outputs,
        metrics=metrics,
        on_failure=stop_on_failure,
    )
    try:
        _check_changelogs(app, settings, partitions)
        _create_changelogs(app, settings)
    except (TransientError, KafkaException) as exc:
        outputs.close()
        return _broker_away_at_start(exc)
    log.info(
        "processor %s reading %s (%d partitions); metrics on http://127.0.0.1:%d/metrics",
        settings.processor_app_id,
        settings.topic("raw"),
        partitions,
        settings.processor_web_port,
    )
    if not NATIVE_SCAN:
        log.warning(
            "processors._formscan is not built (no C compiler at install): "
            "field extraction runs in Python, about 20 us more per webhook"
        )

    class StartAwareWorker(Worker):
        started = False
        signalled = False
        call_off_watchdog: Callable[[], None] | None = None

        async def on_startup_finished(self) -> None:
            self.started = True
            await super().on_startup_finished()

        async def _stop_on_signal(self, signal: Any) -> None:
            self.signalled = True
            self.call_off_watchdog = _exit_if_still_running(
                STOP_TIMEOUT_S, asyncio.get_running_loop()
            )
            await super()._stop_on_signal(signal)

    worker = StartAwareWorker(
        app, loglevel=settings.log_level.lower(), quiet=True, override_logging=False
    )
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as done:  # how mode's worker always ends
        code = done.code if isinstance(done.code, int) else 1
    finally:
        if worker.call_off_watchdog is not None:  # the stop is done (outputs.close is bounded)
            worker.call_off_watchdog()
        outputs.close()
    if code != 0 and not worker.started and not worker.signalled:
        _start_again()
    return code


def _broker_away_at_start(exc: Exception) -> int:
    """A broker call before Faust starts failed: start again, as after a failed Faust start."""
    log.error("preparing the topics failed: %s", exc)
    _start_again()
    return 1


START_ATTEMPTS = 6
_ATTEMPT_VARIABLE = "CHARGIFY_PROCESSOR_START_ATTEMPT"


def _start_again() -> None:
    """Run the processor again in this process, after a start that failed.

    Faust's start-up talks to the broker at several steps (creating the tables'
    changelog topics, starting its producer) and gives up at the first failure, so a
    broker that is away for a moment while a worker starts would leave no worker; Faust
    cannot be started twice in one process, so the command is executed again, up to
    ``START_ATTEMPTS`` times with a growing pause. Returns if the attempts are used up.
    """
    attempt = int(os.environ.get(_ATTEMPT_VARIABLE, "1"))
    if attempt >= START_ATTEMPTS:
        log.critical("the processor failed to start %d times; giving up", attempt)
        return
    pause = min(2.0**attempt, 15.0)
    log.error(
        "the processor failed to start (attempt %d of %d; see the error above: most often "
        "Kafka was unreachable); starting again in %.0fs",
        attempt,
        START_ATTEMPTS,
        pause,
    )
    for handler in logging.getLogger().handlers:  # exec discards unwritten buffers
        with contextlib.suppress(ValueError, OSError):  # a stream already closed
            handler.flush()
    time.sleep(pause)
    os.environ[_ATTEMPT_VARIABLE] = str(attempt + 1)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
