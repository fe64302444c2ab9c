"""``chargify-stream dlq list|stats|replay``: what is parked on the dead-letter topic, and replay.

Every command reads the whole dead-letter topic as it is when the command starts (up to
each partition's high watermark; no consumer group, nothing committed) and groups its
records into **events**, shown once each however often they failed.

Identity of an event:

- its ``chargify-webhook-id`` header, when present. Every record of the pipeline carries
  it, one webhook yields at most one record per topic, and it survives replays. The
  ``dlq-source-*`` position does not: a replay re-publishes to the source topic at a new
  offset, so a record that fails again names a new source offset, and an event that failed
  at the processor, was replayed, and then failed at the sink names a new source topic too.
  The webhook id ties all of those into one event, shown with its latest failure;
- else the failed record's ``dlq-source-topic``/partition/offset;
- else (a record without ``dlq-*`` headers, written by hand or another tool) the
  dead-letter record's own position. Such a record is shown but never replayed blindly.

The latest failure of an event is its record with the highest ``dlq-replay-count``, then
the latest ``dlq-failed-at``. ``attempts`` is that count + 1: how often the event failed.
Filters apply to events: ``--reason``, ``--event``, ``--customer`` (the record key of a sink
dead letter; processor dead letters are keyed by subscription id and carry no resolved
customer), ``--since``/``--until`` (on the latest ``dlq-failed-at``; inclusive/exclusive).

``replay`` re-publishes each selected event's latest record (value, key and original
headers, with ``dlq-replay-count`` + 1) and reports what the broker acknowledged. Where to:
a ``dlq-stage=processor`` record back to its ``dlq-source-topic`` and source partition (the
raw topic); a ``dlq-stage=sink`` record to the sink's retry topic (``chargify.sink.retry``),
partitioned by key, never to the typed topics again (their readers see each record once).
A sink dead letter whose source is the retry topic (a retry that failed again) is the same
event as its first failure and goes back there too. It refuses records without ``dlq-*``
headers, records whose source is not an input topic of this pipeline, and events that
already failed ``--max-attempts`` times. Every stage is idempotent, so replaying twice never
double-counts.

A **pointer** (a dead letter Kafka could not take whole: ``schemas.deadletter``) has no
value; ``list`` marks it, and ``replay`` reads its original back from its source topic,
partition and offset (:func:`read_originals`) and replays that, with the pointer's count
+ 1. A pointer whose original is gone (deleted by the source topic's retention) is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TextIO, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from chargify_stream.errors import ChargifyStreamError, ConfigError, TransientError
from chargify_stream.kafka_admin import ensure_pipeline_topics
from chargify_stream.kafka_config import describe, librdkafka_config
from chargify_stream.limits import deadletter_record_max
from chargify_stream.resolved import Resolution, resolutions
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import (
    DeadLetterInfo,
    format_timestamp,
    parse_dead_letter,
    replay_headers,
)
from chargify_stream.settings import Settings

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DeadLetterEvent",
    "DeadLetterRecord",
    "Filters",
    "ReplayPlan",
    "add_arguments",
    "group_events",
    "parse_time",
    "plan_replay",
    "replay_destination",
    "run",
    "send_replays",
]

DEFAULT_MAX_ATTEMPTS = 5
NO_HEADERS = "(no dlq headers)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ERROR_COLUMN = 60


class ReplayError(ChargifyStreamError):
    """A replay did not complete; what was and was not published has been printed."""


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of the dead-letter topic, with its ``dlq-*`` headers read."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    info: DeadLetterInfo | None

    @classmethod
    def build(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes | None]],
        timestamp: datetime | None = None,
    ) -> DeadLetterRecord:
        kept = tuple((name, v) for name, v in headers if v is not None)
        return cls(topic, partition, offset, timestamp, key, value, kept, parse_dead_letter(kept))

    @classmethod
    def from_message(cls, msg: Message) -> DeadLetterRecord:
        kind, millis = msg.timestamp()
        return cls.build(
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            key=msg.key(),
            value=msg.value(),
            headers=message_headers(msg),
            timestamp=datetime.fromtimestamp(millis / 1000, UTC) if kind and millis > 0 else None,
        )

    def header(self, name: str) -> str | None:
        """The last value of header ``name``, as text."""
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value.decode("utf-8", errors="replace")
        return found or None

    @property
    def failed_at(self) -> datetime | None:
        """``dlq-failed-at``, else the Kafka timestamp (a record without dlq headers)."""
        if self.info is not None and self.info.failed_at is not None:
            return self.info.failed_at
        return self.timestamp

    @property
    def customer(self) -> str | None:
        """The customer reference: the key of a sink dead letter (outputs are keyed by it)."""
        if self.info is None or self.info.stage != h.STAGE_SINK or not self.key:
            return None
        return self.key.decode("utf-8", errors="replace")

    @property
    def position(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def message_headers(msg: Message) -> list[tuple[str, bytes]]:
    """A consumed record's headers as (name, bytes) pairs, in order; valueless ones dropped."""
    raw: Any = msg.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items if v is not None]


def identity(record: DeadLetterRecord) -> str:
    """Which event a dead-letter record belongs to (see the module docstring)."""
    if record.info is None:
        return f"record:{record.position}"
    webhook_id = record.header(h.WEBHOOK_ID)
    if webhook_id:
        return f"webhook:{webhook_id}"
    info = record.info
    return f"source:{info.source_topic}[{info.source_partition}]@{info.source_offset}"


def _recency(record: DeadLetterRecord) -> tuple[int, datetime, int, int]:
    count = record.info.replay_count if record.info is not None else -1
    return (count, record.failed_at or _EPOCH, record.partition, record.offset)


@dataclass(frozen=True, slots=True)
class DeadLetterEvent:
    """One dead-lettered event: its latest dead-letter record and how many there are."""

    identity: str
    latest: DeadLetterRecord
    records: tuple[DeadLetterRecord, ...]
    first_failed_at: datetime | None

    @property
    def info(self) -> DeadLetterInfo | None:
        return self.latest.info

    @property
    def reason(self) -> str | None:
        return self.info.reason if self.info else None

    @property
    def stage(self) -> str | None:
        return self.info.stage if self.info else None

    @property
    def attempts(self) -> int:
        """How often the event failed: the latest ``dlq-replay-count`` + 1."""
        return self.info.replay_count + 1 if self.info else len(self.records)

    @property
    def last_failed_at(self) -> datetime | None:
        return self.latest.failed_at

    @property
    def event(self) -> str | None:
        return self.latest.header(h.EVENT)

    @property
    def webhook_id(self) -> str | None:
        return self.latest.header(h.WEBHOOK_ID)

    @property
    def customer(self) -> str | None:
        return self.latest.customer

    def age(self, now: datetime) -> float | None:
        """Seconds since the event was first dead-lettered."""
        if self.first_failed_at is None:
            return None
        return max(0.0, (now - self.first_failed_at).total_seconds())

    def as_json(self, now: datetime) -> dict[str, Any]:
        info = self.info
        return {
            "identity": self.identity,
            "reason": self.reason,
            "stage": self.stage,
            "error": info.error if info else None,
            "attempts": self.attempts,
            "replay_count": info.replay_count if info else None,
            "records": len(self.records),
            "event": self.event,
            "customer": self.customer,
            "webhook_id": self.webhook_id,
            "key": _text(self.latest.key),
            "source_topic": info.source_topic if info else None,
            "source_partition": info.source_partition if info else None,
            "source_offset": info.source_offset if info else None,
            "dead_letter": {
                "topic": self.latest.topic,
                "partition": self.latest.partition,
                "offset": self.latest.offset,
            },
            "first_failed_at": _time(self.first_failed_at),
            "last_failed_at": _time(self.last_failed_at),
            "age_seconds": _round(self.age(now)),
            "pointer": bool(info and info.pointer),
            "original_size": info.original_size if info else None,
        }


def group_events(records: Iterable[DeadLetterRecord]) -> list[DeadLetterEvent]:
    """Group dead-letter records into events, oldest first."""
    grouped: dict[str, list[DeadLetterRecord]] = {}
    for record in records:
        grouped.setdefault(identity(record), []).append(record)
    events = []
    for ident, members in grouped.items():
        times = [r.failed_at for r in members if r.failed_at is not None]
        events.append(
            DeadLetterEvent(
                identity=ident,
                latest=max(members, key=_recency),
                records=tuple(members),
                first_failed_at=min(times) if times else None,
            )
        )
    events.sort(key=lambda e: (e.first_failed_at or _EPOCH, e.identity))
    return events


@dataclass(frozen=True, slots=True)
class Filters:
    """Which events a command applies to; an empty set means "any"."""

    reasons: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    customers: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, event: DeadLetterEvent) -> bool:
        if self.reasons and event.reason not in self.reasons:
            return False
        if self.events and event.event not in self.events:
            return False
        if self.customers and event.customer not in self.customers:
            return False
        moment = event.last_failed_at
        if self.since is not None and (moment is None or moment < self.since):
            return False
        return self.until is None or (moment is not None and moment < self.until)

    @property
    def active(self) -> bool:
        return bool(self.reasons or self.events or self.customers or self.since or self.until)


def parse_time(text: str, now: datetime) -> datetime:
    """An RFC 3339 time, a date (UTC midnight), or an age before ``now`` (``90s``, ``2h``, ``7d``).

    A time without an offset is taken as UTC. Raise ``ValueError`` with the accepted forms.
    """
    age = _AGE.match(text)
    if age is not None:
        return now - timedelta(seconds=float(age.group(1)) * _UNITS[age.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-27T10:00:00Z), "
            "a date (2026-11-27) or an age (90s, 15m, 2h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


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


def _kafka_config(settings: Settings, errors: list[str]) -> dict[str, Any]:
    def on_error(err: KafkaError) -> None:
        errors.append(err.str())

    # librdkafka's own log lines would repeat on stderr what the error message says.
    return {
        **librdkafka_config(settings),
        "log_level": 0,
        "error_cb": on_error,
    }


def scan(settings: Settings, *, timeout: float, progress: Progress | None = None) -> Scan:
    """Read every record of the dead-letter topic up to the high watermarks taken at start."""
    topic = settings.topic("deadletter")
    errors: list[str] = []
    consumer = Consumer(
        {
            **_kafka_config(settings, errors),
            # Needed by the client, never joined: partitions are assigned by hand and no
            # offset is committed, so reading changes nothing on the broker.
            "group.id": f"chargify-dlq-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
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
        records = _read(consumer, topic, ends, timeout=timeout, progress=progress)
    finally:
        if progress is not None:
            progress.finish()
        consumer.close()
    return Scan(topic, records, set(metadata.topics))


def _read(
    consumer: Consumer,
    topic: str,
    ends: dict[int, tuple[int, int]],
    *,
    timeout: float,
    progress: Progress | None,
) -> list[DeadLetterRecord]:
    total = sum(high - low for low, high in ends.values())
    pending = {p: high for p, (low, high) in ends.items() if high > low}
    consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in pending])
    records: list[DeadLetterRecord] = []
    stalled_since = time.monotonic()
    while pending:
        msgs = consumer.consume(500, 0.5)
        if msgs:
            stalled_since = time.monotonic()
        elif time.monotonic() - stalled_since > timeout:
            raise TransientError(
                f"reading {topic} stalled after {len(records)} of {total} records "
                f"(no answer from Kafka for {timeout:.0f}s); nothing was changed"
            )
        for msg in msgs:
            partition = msg.partition() or 0
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if (msg.offset() or 0) >= pending.get(partition, 0):
                        pending.pop(partition, None)
                    continue
                raise TransientError(f"reading {topic}: {err.str()}")
            if partition not in pending:
                continue
            offset = msg.offset() or 0
            if offset < pending[partition]:
                records.append(DeadLetterRecord.from_message(msg))
            if offset >= pending[partition] - 1:
                pending.pop(partition)
        if progress is not None:
            progress.update(len(records), total)
    return records


def _unreachable(settings: Settings, exc: KafkaException, errors: Sequence[str]) -> TransientError:
    detail = errors[-1] if errors else str(exc.args[0].str() if exc.args else exc)
    return TransientError(
        f"{describe(settings)} is unreachable ({detail}); nothing was read or changed"
    )


@dataclass(frozen=True, slots=True)
class Scan:
    """What one read of the dead-letter topic found."""

    topic: str
    records: list[DeadLetterRecord]
    existing_topics: set[str]


# -- replay ----------------------------------------------------------------------------


def replay_destination(info: DeadLetterInfo, sink_retry_topic: str) -> tuple[str, int | None]:
    """The topic and partition a replay of this dead letter goes to (``None``: by key).

    A sink dead letter goes to the sink's retry topic, whatever topic it was read from; a
    processor dead letter back where it was read (the raw topic), on the same partition.
    """
    if info.stage == h.STAGE_SINK:
        return sink_retry_topic, None
    return info.source_topic, info.source_partition


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """The selected events, split into those to replay and those refused (with why)."""

    replay: list[DeadLetterEvent]
    refused: list[tuple[DeadLetterEvent, str]]


def plan_replay(
    events: Iterable[DeadLetterEvent],
    *,
    max_attempts: int,
    input_topics: Iterable[str],
    sink_retry_topic: str,
    existing_topics: Iterable[str] | None = None,
    resolved: Mapping[str, Resolution] | None = None,
) -> ReplayPlan:
    """Decide, for each selected event, whether it may be replayed (pure).

    ``input_topics`` are the topics a dead letter may have been read from;
    ``existing_topics`` (when given) those a replay may go to; ``resolved`` the webhooks a
    later delivery already took to a good outcome (:mod:`chargify_stream.resolved`).
    """
    inputs = set(input_topics)
    existing = None if existing_topics is None else set(existing_topics)
    replay: list[DeadLetterEvent] = []
    refused: list[tuple[DeadLetterEvent, str]] = []
    for event in events:
        info = event.info
        if info is None:
            refused.append(
                (event, "no dlq-* headers (not written by this pipeline): never replayed blindly")
            )
        elif resolved and (done := resolved.get(event.webhook_id or "")):
            outcome, at = done
            refused.append(
                (event, f"resolved: {outcome} at {_time(at)} (--include-resolved to replay it)")
            )
        elif event.latest.value is None and info.pointer:
            refused.append(
                (
                    event,
                    f"a pointer, and its original at {info.source_topic}"
                    f"[{info.source_partition}]@{info.source_offset} is no longer there",
                )
            )
        elif event.latest.value is None:
            refused.append((event, "the dead letter has no value"))
        elif event.attempts >= max_attempts:
            refused.append(
                (event, f"failed {event.attempts} times (--max-attempts {max_attempts})")
            )
        elif info.source_topic not in inputs:
            refused.append(
                (event, f"source topic {info.source_topic} is not an input of this pipeline")
            )
        elif (
            existing is not None
            and (target := replay_destination(info, sink_retry_topic)[0]) not in existing
        ):
            refused.append((event, f"topic {target} does not exist"))
        else:
            replay.append(event)
    return ReplayPlan(replay, refused)


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
    consumer = Consumer(
        {
            **_kafka_config(settings, errors),
            "group.id": f"chargify-dlq-reader-{uuid.uuid4().hex}",  # never joined
            "enable.auto.commit": False,
            # An offset the topic no longer holds is an error, not a jump elsewhere.
            "auto.offset.reset": "error",
        }
    )
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


class ProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` a replay uses."""

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float = ..., /) -> int: ...
    def flush(self, timeout: float = ..., /) -> int: ...


@dataclass
class ReplayOutcome:
    """What the broker acknowledged; ``failed`` were refused or never acknowledged."""

    acked: list[DeadLetterEvent] = field(default_factory=list)
    failed: list[tuple[DeadLetterEvent, str]] = field(default_factory=list)
    not_sent: list[DeadLetterEvent] = field(default_factory=list)
    interrupted: bool = False


def send_replays(
    events: Sequence[DeadLetterEvent],
    producer: ProducerLike,
    *,
    sink_retry_topic: str,
    rate: float | None = None,
    flush_timeout: float = 45.0,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayOutcome:
    """Re-publish each event's latest dead letter (to :func:`replay_destination`); wait for
    the broker.

    At most ``rate`` records per second. Ctrl-C stops sending; what was already handed to
    the producer is still flushed, and the outcome says which records were never sent.
    """
    outcome = ReplayOutcome()
    reports: dict[int, str | None] = {}

    def report_for(index: int) -> Callable[[KafkaError | None, Message], None]:
        def report(err: KafkaError | None, _msg: Message) -> None:
            reports[index] = None if err is None else err.str()

        return report

    started = clock()
    sent = 0
    try:
        for index, event in enumerate(events):
            if rate:
                # Pace by serving delivery reports until this record's slot comes.
                slot = started + index / rate
                while (wait := slot - clock()) > 0:
                    producer.poll(wait)
            topic, partition = replay_destination(
                cast(DeadLetterInfo, event.info), sink_retry_topic
            )
            placement = {} if partition is None else {"partition": partition}
            producer.produce(
                topic,
                value=event.latest.value,
                key=event.latest.key,
                headers=replay_headers(event.latest.headers),
                on_delivery=report_for(index),
                **placement,
            )
            sent = index + 1
            producer.poll(0)
    except KeyboardInterrupt:
        outcome.interrupted = True
    remaining = producer.flush(flush_timeout)
    for index, event in enumerate(events[:sent]):
        error = reports.get(index, "no acknowledgement from the broker")
        if error is None:
            outcome.acked.append(event)
        else:
            outcome.failed.append((event, error))
    outcome.not_sent = list(events[sent:])
    if remaining and not outcome.failed:  # pragma: no cover - flush() and reports disagree
        outcome.failed.append((events[sent - 1], "no acknowledgement from the broker"))
    return outcome


# -- the commands ----------------------------------------------------------------------


def _reasons(text: str) -> list[str]:
    codes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in codes if c not in h.REASONS]
    if unknown or not codes:
        raise argparse.ArgumentTypeError(
            f"unknown reason code {', '.join(unknown) or repr(text)}; "
            f"expected one of {', '.join(h.REASONS)}"
        )
    return codes


def _time_arg(text: str) -> datetime:
    try:
        return parse_time(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    """The filters every ``dlq`` command takes, plus ``replay``'s own options."""
    parser.add_argument(
        "--reason",
        type=_reasons,
        action="append",
        default=[],
        metavar="CODE",
        help=f"only this reason (repeat or comma-separate): {', '.join(h.REASONS)}",
    )
    parser.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="TYPE",
        help="only this Chargify event type, e.g. payment_success (repeatable)",
    )
    parser.add_argument(
        "--customer",
        action="append",
        default=[],
        metavar="REFERENCE",
        help="only this customer reference (repeatable)",
    )
    parser.add_argument(
        "--since",
        type=_time_arg,
        metavar="TIME",
        help="last dead-lettered at or after TIME: RFC 3339, a date, or an age (2h, 7d)",
    )
    parser.add_argument(
        "--until", type=_time_arg, metavar="TIME", help="last dead-lettered before TIME"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for Kafka before giving up (default 10)",
    )
    if action == "replay":
        parser.epilog = (
            "Exit status: 0 every selected event was replayed (with --dry-run: would be); "
            "1 some were not acknowledged by the broker or not sent; 3 some were refused "
            "(resolved, failed too often, no dlq headers, ...) or none matched; 2 a usage "
            "error. A cron job can alert on anything but 0."
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="print what would be replayed; change nothing"
        )
        parser.add_argument(
            "--include-resolved",
            action="store_true",
            help="replay events whose webhook a later delivery already recorded, found "
            "unchanged or ignored (webhook_outcomes); skipped by default",
        )
        parser.add_argument(
            "--rate", type=_positive_float, metavar="N", help="at most N records per second"
        )
        parser.add_argument(
            "--max-attempts",
            type=_positive_int,
            default=DEFAULT_MAX_ATTEMPTS,
            metavar="N",
            help="refuse events that already failed N times "
            f"(default {DEFAULT_MAX_ATTEMPTS}), so a poison record cannot loop",
        )


def filters_from(args: argparse.Namespace) -> Filters:
    """The :class:`Filters` of parsed arguments; ``ConfigError`` (exit 2) if contradictory."""
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise ConfigError(
            f"--since ({format_timestamp(args.since)}) must be before "
            f"--until ({format_timestamp(args.until)})"
        )
    return Filters(
        reasons=frozenset(code for codes in args.reason for code in codes),
        events=frozenset(args.event),
        customers=frozenset(args.customer),
        since=args.since,
        until=args.until,
    )


def run(action: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run ``dlq list``, ``dlq stats`` or ``dlq replay``; return the exit code."""
    selection = filters_from(args)
    now = datetime.now(UTC)
    found = scan(
        settings,
        timeout=args.timeout,
        progress=Progress(f"reading {settings.topic('deadletter')}"),
    )
    events = group_events(found.records)
    chosen = [e for e in events if selection.matches(e)]
    resolved = _resolved(settings, chosen)
    if action == "list":
        _print_list(found, events, chosen, selection, now, resolved, as_json=args.json)
        return 0
    if action == "stats":
        _print_stats(found, events, chosen, now, resolved, as_json=args.json)
        return 0
    return _replay(settings, args, found, chosen, {} if args.include_resolved else resolved)


def _resolved(settings: Settings, chosen: Sequence[DeadLetterEvent]) -> dict[str, Resolution]:
    """The resolved ones among ``chosen`` (by webhook id); a note on stderr when unknown."""
    found = resolutions(
        settings, [(e.webhook_id, e.last_failed_at) for e in chosen if e.webhook_id]
    )
    if found is None:
        print(
            "chargify-stream: webhook_outcomes cannot be read: resolved events are not told "
            "apart (they are listed, and replayed, like the others)",
            file=sys.stderr,
        )
        return {}
    return found


def _replay(
    settings: Settings,
    args: argparse.Namespace,
    found: Scan,
    chosen: list[DeadLetterEvent],
    resolved: Mapping[str, Resolution],
) -> int:
    retry_topic = settings.topic("sink_retry")
    plan = plan_replay(
        read_originals(settings, chosen, timeout=args.timeout),
        max_attempts=args.max_attempts,
        input_topics=[
            settings.topic(n) for n in ("raw", "transactions", "subscriptions", "sink_retry")
        ],
        sink_retry_topic=retry_topic,
        # The retry topic is created below when missing (no sink has run since it exists).
        existing_topics=found.existing_topics | {retry_topic},
        resolved=resolved,
    )
    if args.dry_run or not plan.replay:
        outcome = ReplayOutcome(acked=list(plan.replay))
    else:
        if retry_topic not in found.existing_topics:
            ensure_pipeline_topics(settings, [retry_topic], timeout=args.timeout)
        errors: list[str] = []
        producer = Producer(
            {
                **_kafka_config(settings, errors),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                # A record the broker has not taken by then is reported failed, so the
                # summary below is final when flush() returns.
                "message.timeout.ms": int(max(args.timeout, 5) * 3000),
                "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
            }
        )
        outcome = send_replays(
            plan.replay,
            producer,
            sink_retry_topic=retry_topic,
            rate=args.rate,
            flush_timeout=max(args.timeout, 5) * 3 + 15,
        )
    summary = _replay_summary(plan, outcome, retry_topic, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_replay(summary)
    if outcome.failed or outcome.not_sent:
        print(
            f"chargify-stream: replay incomplete: {len(outcome.acked)} replayed, "
            f"{len(outcome.failed)} not acknowledged by the broker (they may or may not have "
            f"been published), {len(outcome.not_sent)} not sent. Replaying the same "
            "selection again is safe: every stage is idempotent.",
            file=sys.stderr,
        )
        return 130 if outcome.interrupted else 1
    if plan.refused or not plan.replay:
        return 3  # something refused, or nothing matched: see --help
    return 0


# -- output ----------------------------------------------------------------------------


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def format_age(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h 4m``, ``2d 5h``: precise enough to read at a glance."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    aligned = set(right)
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i in aligned else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_list(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    selection: Filters,
    now: datetime,
    resolved: Mapping[str, Resolution],
    *,
    as_json: bool,
) -> None:
    if as_json:
        print(json.dumps([_with_resolution(e, now, resolved) for e in chosen], indent=2))
        return
    rows = []
    for e in chosen:
        info = e.info
        rows.append(
            [
                format_age(e.age(now)),
                _time(e.last_failed_at) or "-",
                e.reason or NO_HEADERS,
                e.stage or "-",
                str(e.attempts),
                e.event or "-",
                e.customer or "-",
                e.webhook_id or "-",
                f"{info.source_topic}[{info.source_partition}]@{info.source_offset}"
                + (" (pointer)" if info.pointer else "")
                if info
                else e.latest.position,
                _short(info.error if info else "", _ERROR_COLUMN) or "-",
                resolved.get(e.webhook_id or "", ("-",))[0],
            ]
        )
    if rows:
        print(
            _table(
                [
                    "AGE",
                    "LAST FAILED",
                    "REASON",
                    "STAGE",
                    "ATTEMPTS",
                    "EVENT",
                    "CUSTOMER",
                    "WEBHOOK",
                    "SOURCE",
                    "ERROR",
                    "RESOLVED",
                ],
                rows,
                right=[4],
            )
        )
    bare = sum(1 for e in chosen if e.info is None)
    matched = f"{len(chosen)} of {len(events)}" if selection.active else f"{len(chosen)}"
    note = f"; {bare} without dlq-* headers, never replayed" if bare else ""
    done = sum(1 for e in chosen if e.webhook_id in resolved)
    if done:
        note += f"; {done} resolved by a later delivery, not replayed unless asked"
    pointers = sum(1 for e in chosen if e.info is not None and e.info.pointer)
    if pointers:
        note += (
            f"; {pointers} written as pointers: their bodies stay on their source topic,"
            " where replay reads them"
        )
    print(
        f"({matched} dead-lettered events; {len(found.records)} records read from "
        f"{found.topic}{note})"
    )


def _stats(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    now: datetime,
    resolved: Mapping[str, Resolution],
) -> dict[str, Any]:
    by_reason: dict[str, dict[str, int]] = {}
    by_stage: dict[str, dict[str, int]] = {}
    for e in chosen:
        by_reason.setdefault(e.reason or NO_HEADERS, {"events": 0, "records": 0})["events"] += 1
        by_stage.setdefault(e.stage or NO_HEADERS, {"events": 0, "records": 0})["events"] += 1
        for r in e.records:
            reason = r.info.reason if r.info else NO_HEADERS
            stage = r.info.stage if r.info else NO_HEADERS
            by_reason.setdefault(reason, {"events": 0, "records": 0})["records"] += 1
            by_stage.setdefault(stage, {"events": 0, "records": 0})["records"] += 1
    oldest = min(
        (e for e in chosen if e.first_failed_at is not None),
        key=lambda e: cast(datetime, e.first_failed_at),
        default=None,
    )
    return {
        "topic": found.topic,
        "records_read": len(found.records),
        "events_total": len(events),
        "events": len(chosen),
        "records": sum(len(e.records) for e in chosen),
        "without_dlq_headers": sum(1 for e in chosen if e.info is None),
        "resolved": sum(1 for e in chosen if e.webhook_id in resolved),
        "pointers": sum(1 for e in chosen if e.info is not None and e.info.pointer),
        "by_reason": dict(sorted(by_reason.items())),
        "by_stage": dict(sorted(by_stage.items())),
        "oldest_failed_at": _time(oldest.first_failed_at) if oldest else None,
        "oldest_age_seconds": _round(oldest.age(now)) if oldest else None,
    }


def _with_resolution(
    event: DeadLetterEvent, now: datetime, resolved: Mapping[str, Resolution]
) -> dict[str, Any]:
    out = event.as_json(now)
    found = resolved.get(event.webhook_id or "")
    out["resolved"] = {"outcome": found[0], "at": _time(found[1])} if found else None
    return out


def _print_stats(
    found: Scan,
    events: list[DeadLetterEvent],
    chosen: list[DeadLetterEvent],
    now: datetime,
    resolved: Mapping[str, Resolution],
    *,
    as_json: bool,
) -> None:
    stats = _stats(found, events, chosen, now, resolved)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    scope = (
        f"{stats['events']} of {stats['events_total']}"
        if stats["events"] != stats["events_total"]
        else str(stats["events"])
    )
    print(
        f"{found.topic}: {scope} dead-lettered events, {stats['records']} records "
        f"({stats['records_read']} read; {stats['without_dlq_headers']} without dlq-* headers;"
        f" {stats['resolved']} resolved by a later delivery)"
    )
    if stats["oldest_failed_at"]:
        print(
            f"oldest: {format_age(stats['oldest_age_seconds'])} "
            f"(first dead-lettered {stats['oldest_failed_at']})"
        )
    for title, counts in (("REASON", stats["by_reason"]), ("STAGE", stats["by_stage"])):
        if counts:
            print()
            rows = [[k, str(v["events"]), str(v["records"])] for k, v in counts.items()]
            print(_table([title, "EVENTS", "RECORDS"], rows, right=[1, 2]))


def _replay_summary(
    plan: ReplayPlan, outcome: ReplayOutcome, retry_topic: str, *, dry_run: bool
) -> dict[str, Any]:
    lines: list[dict[str, Any]] = []
    failed = dict((id(e), why) for e, why in outcome.failed)
    not_sent = {id(e) for e in outcome.not_sent}
    for e in plan.replay:
        if id(e) in failed:
            action, why = "failed", failed[id(e)]
        elif id(e) in not_sent:
            action, why = "not_sent", "interrupted before sending"
        else:
            action, why = ("would_replay" if dry_run else "replayed"), None
        lines.append(_replay_line(e, action, why, retry_topic))
    lines.extend(_replay_line(e, "refused", why, retry_topic) for e, why in plan.refused)
    per_reason: dict[str, Counter[str]] = {}
    for line in lines:
        per_reason.setdefault(line["reason"] or NO_HEADERS, Counter())[line["action"]] += 1
    return {
        "dry_run": dry_run,
        "selected": len(lines),
        "replayed": 0 if dry_run else len(outcome.acked),
        "would_replay": len(plan.replay) if dry_run else 0,
        "refused": len(plan.refused),
        "failed": len(outcome.failed),
        "not_sent": len(outcome.not_sent),
        "by_reason": {
            reason: {
                "selected": sum(c.values()),
                "replayed": c["replayed"],
                "would_replay": c["would_replay"],
                "refused": c["refused"],
                "failed": c["failed"] + c["not_sent"],
            }
            for reason, c in sorted(per_reason.items())
        },
        "records": lines,
    }


def _replay_line(
    event: DeadLetterEvent, action: str, why: str | None, retry_topic: str
) -> dict[str, Any]:
    info = event.info
    to_topic, to_partition = replay_destination(info, retry_topic) if info else (None, None)
    return {
        "action": action,
        "why": why,
        "identity": event.identity,
        "reason": event.reason,
        "event": event.event,
        "customer": event.customer,
        "webhook_id": event.webhook_id,
        "key": _text(event.latest.key),
        "dead_letter": event.latest.position,
        "to_topic": to_topic,
        "to_partition": to_partition,
        "replay_count": info.replay_count if info else None,
        "new_replay_count": info.replay_count + 1 if info else None,
    }


def _print_replay(summary: dict[str, Any]) -> None:
    verbs = {
        "would_replay": "would replay",
        "replayed": "replayed",
        "refused": "REFUSED",
        "failed": "FAILED",
        "not_sent": "NOT SENT",
    }
    for line in summary["records"]:
        what = (
            f"{line['identity']} ({line['reason'] or NO_HEADERS}, {line['event'] or '-'}, "
            f"customer {line['customer'] or '-'}) from {line['dead_letter']}"
        )
        if line["action"] in ("would_replay", "replayed"):
            partition = "" if line["to_partition"] is None else f"[{line['to_partition']}]"
            what += (
                f" -> {line['to_topic']}{partition} key {line['key']!r}"
                f" dlq-replay-count {line['new_replay_count']}"
            )
        if line["why"]:
            what += f": {line['why']}"
        print(f"{verbs[line['action']]:<12}  {what}")
    if summary["records"]:
        print()
    done = "would replay" if summary["dry_run"] else "replayed"
    count = summary["would_replay"] if summary["dry_run"] else summary["replayed"]
    head = f"selected {summary['selected']}, {done} {count}, refused {summary['refused']}"
    if summary["failed"] or summary["not_sent"]:
        head += f", failed {summary['failed'] + summary['not_sent']}"
    if summary["dry_run"]:
        head += " (dry run: nothing was published)"
    print(head)
    if summary["by_reason"]:
        key = "would_replay" if summary["dry_run"] else "replayed"
        rows = [
            [r, str(v["selected"]), str(v[key]), str(v["refused"]), str(v["failed"])]
            for r, v in summary["by_reason"].items()
        ]
        print(
            _table(
                ["REASON", "SELECTED", done.upper(), "REFUSED", "FAILED"], rows, right=[1, 2, 3, 4]
            )
        )
