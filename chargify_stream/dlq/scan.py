"""Reading the dead-letter topic: one pass that summarises it, and reading back by position.

:func:`scan` reads every record up to the high watermarks taken at start (no consumer
group, nothing committed) and groups them into events as they come
(:class:`.events.EventGrouper`), keeping no values. :func:`fill_latest` reads back, by
partition and offset, the whole latest records of the events a replay sends, and
:func:`read_originals` the originals of pointers from their source topics.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from chargify_stream.base.errors import ChargifyStreamError, TransientError
from chargify_stream.base.kafka_config import describe, librdkafka_config
from chargify_stream.base.messages import message_headers, read_to_end
from chargify_stream.base.settings import Settings
from chargify_stream.dlq.events import (
    DeadLetterEvent,
    DeadLetterRecord,
    EventGrouper,
)
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import DeadLetterInfo

# How much librdkafka may prefetch per partition: enough to keep a scan busy, little
# enough that the prefetch, not the topic, bounds the reader's memory.
_PREFETCH_KB = 4 * 1024


class Progress:
    """``scanned N of M records`` on stderr, for scans that take a while.

    On a terminal, one line rewritten in place five times a second; otherwise (a pipe, a
    cron job's log) a plain line every ``every`` seconds, so a long scan shows it is alive
    without flooding the log. Nothing for the first ``delay`` seconds: short scans print
    nothing.
    """

    def __init__(
        self, label: str, stream: TextIO | None = None, *, delay: float = 1.0, every: float = 10.0
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.interval = 0.2 if self.terminal else every
        self.started = time.monotonic()
        self.delay = delay
        self.last = 0.0
        self.shown = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.started < self.delay or now - self.last < self.interval:
            return
        self.last = now
        percent = 100 * done // total if total else 100
        line = f"{self.label}: {done:,} of {total:,} records ({percent}%)"
        self.stream.write(f"\r{line}" if self.terminal else f"{line}\n")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown and self.terminal:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def kafka_config(settings: Settings, errors: list[str]) -> dict[str, Any]:
    def on_error(err: KafkaError) -> None:
        errors.append(err.str())

    # librdkafka's own log lines would repeat on stderr what the error message says.
    return {
        **librdkafka_config(settings),
        "log_level": 0,
        "error_cb": on_error,
    }


def _reader(settings: Settings, errors: list[str], **extra: Any) -> Consumer:
    return Consumer(
        {
            **kafka_config(settings, errors),
            # Needed by the client, never joined: partitions are assigned by hand and no
            # offset is committed, so reading changes nothing on the broker.
            "group.id": f"chargify-dlq-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "queued.max.messages.kbytes": _PREFETCH_KB,
            # With so small a queue, librdkafka's default 1 s pause when it is full would
            # leave the reader idle most of the time.
            "fetch.queue.backoff.ms": 5,
            **extra,
        }
    )


@dataclass(frozen=True, slots=True)
class Scan:
    """What one read of the dead-letter topic found: its events, without values."""

    topic: str
    events: list[DeadLetterEvent]
    records_read: int
    existing_topics: set[str]


def scan(settings: Settings, *, timeout: float, progress: Progress | None = None) -> Scan:
    """Read every record of the dead-letter topic up to the high watermarks taken at start."""
    topic = settings.topic("deadletter")
    errors: list[str] = []
    consumer = _reader(
        settings, errors, **{"enable.partition.eof": True, "isolation.level": "read_committed"}
    )
    try:
        try:
            metadata = consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise _unreachable(settings, exc, errors) from None
        if topic not in metadata.topics:
            raise ChargifyStreamError(
                f"dead-letter topic {topic} does not exist (nothing was ever dead-lettered, "
                "or TOPIC_DEADLETTER / KAFKA_TOPIC_PREFIX point elsewhere)"
            )
        ends: dict[int, tuple[int, int]] = {}
        for partition in sorted(metadata.topics[topic].partitions):
            try:
                ends[partition] = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout
                )
            except KafkaException as exc:
                raise _unreachable(settings, exc, errors) from None
        grouper = EventGrouper()
        read = _read(consumer, topic, ends, grouper, timeout=timeout, progress=progress)
    finally:
        if progress is not None:
            progress.finish()
        consumer.close()
    return Scan(topic, grouper.events(), read, set(metadata.topics))


def _read(
    consumer: Consumer,
    topic: str,
    ends: dict[int, tuple[int, int]],
    grouper: EventGrouper,
    *,
    timeout: float,
    progress: Progress | None,
) -> int:
    total = sum(high - low for low, high in ends.values())
    read = 0

    def stalled(_pending: list[int]) -> str:
        return (
            f"reading {topic} stalled after {read} of {total} records "
            f"(no answer from Kafka for {timeout:.0f}s); nothing was changed"
        )

    starts = {p: low for p, (low, _high) in ends.items()}
    highs = {p: high for p, (_low, high) in ends.items()}
    for batch in read_to_end(consumer, topic, starts, highs, timeout=timeout, stalled=stalled):
        for msg in batch:
            grouper.add(DeadLetterRecord.from_message(msg, keep_value=False))
        read += len(batch)
        if progress is not None:
            progress.update(read, total)
    return read


def _unreachable(settings: Settings, exc: KafkaException, errors: Sequence[str]) -> TransientError:
    detail = errors[-1] if errors else str(exc.args[0].str() if exc.args else exc)
    return TransientError(
        f"{describe(settings)} is unreachable ({detail}); nothing was read or changed"
    )


def fill_latest(
    settings: Settings, events: Sequence[DeadLetterEvent], *, timeout: float
) -> list[DeadLetterEvent]:
    """``events`` with each latest record read back whole (value and all its headers).

    A second pass over the dead-letter topic, only from the lowest to the highest wanted
    offset of each partition, keeping only the wanted records. An event whose record is no
    longer there (deleted by retention since the scan) keeps its summary, without a value,
    and :func:`.replay.plan_replay` refuses it.
    """
    wanted: dict[tuple[str, int], set[int]] = {}
    for event in events:
        latest = event.latest
        if latest.value is None:  # a summary (or a pointer, read whole for its headers)
            wanted.setdefault((latest.topic, latest.partition), set()).add(latest.offset)
    if not wanted:
        return list(events)
    errors: list[str] = []
    consumer = _reader(
        settings,
        errors,
        **{"enable.partition.eof": True, "isolation.level": "read_committed"},
        # An offset the topic no longer holds is an error, not a jump elsewhere.
        **{"auto.offset.reset": "error"},
    )
    found: dict[tuple[str, int, int], DeadLetterRecord] = {}
    try:
        for (topic, partition), offsets in sorted(wanted.items()):
            last = max(offsets)
            consumer.assign([TopicPartition(topic, partition, min(offsets))])
            stalled_since = time.monotonic()
            done = False
            while not done and time.monotonic() - stalled_since <= timeout:
                for msg in consumer.consume(500, 0.5):
                    stalled_since = time.monotonic()
                    err = msg.error()
                    offset = msg.offset() or 0
                    if err is not None:
                        done = True  # the end of the partition, or the offsets are gone
                        break
                    if offset in offsets:
                        found[(topic, partition, offset)] = DeadLetterRecord.from_message(msg)
                    if offset >= last:
                        done = True
                        break
            consumer.unassign()
    finally:
        consumer.close()
    return [
        replace(
            e, latest=found.get((e.latest.topic, e.latest.partition, e.latest.offset), e.latest)
        )
        for e in events
    ]


def read_originals(
    settings: Settings, events: Sequence[DeadLetterEvent], *, timeout: float
) -> list[DeadLetterEvent]:
    """``events`` with each pointer's latest record filled in from its source topic.

    A pointer (``schemas.deadletter``) has no value: the original is read back from
    ``dlq-source-topic`` at its partition and offset, and replayed with its own key,
    value and headers plus the pointer's ``dlq-*`` headers (so the replay count goes
    on). A pointer whose original is gone (deleted by retention) or is another webhook
    stays as it is, and :func:`plan_replay` refuses it.
    """
    pointers = [e for e in events if e.info is not None and e.info.pointer]
    if not pointers:
        return list(events)
    errors: list[str] = []
    # An offset the topic no longer holds is an error, not a jump elsewhere.
    consumer = _reader(settings, errors, **{"auto.offset.reset": "error"})
    filled: dict[int, DeadLetterRecord] = {}
    try:
        for event in pointers:
            original = _read_one(consumer, cast(DeadLetterInfo, event.info), timeout)
            if original is None:
                continue
            wanted, found = event.webhook_id, _header(message_headers(original), h.WEBHOOK_ID)
            if wanted and found and wanted != found:
                continue  # the topic was recreated: another record sits there now
            own = [(n, v) for n, v in message_headers(original) if not n.lower().startswith("dlq-")]
            dlq = [(n, v) for n, v in event.latest.headers if n.lower().startswith("dlq-")]
            filled[id(event)] = replace(
                event.latest,
                key=original.key(),
                value=original.value(),
                headers=(*own, *dlq),
                has_value=original.value() is not None,
            )
    finally:
        consumer.close()
    return [replace(e, latest=filled[id(e)]) if id(e) in filled else e for e in events]


def _read_one(consumer: Consumer, info: DeadLetterInfo, timeout: float) -> Message | None:
    """The record at the pointer's source position, or ``None`` if it is not there."""
    consumer.assign([TopicPartition(info.source_topic, info.source_partition, info.source_offset)])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                return None  # e.g. the offset is out of range: deleted by retention
            return msg if msg.offset() == info.source_offset else None
        return None
    finally:
        consumer.unassign()


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    found = None
    for key, value in headers:
        if key.lower() == name:
            found = value.decode("utf-8", errors="replace")
    return found
