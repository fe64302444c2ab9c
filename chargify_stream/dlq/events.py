"""Dead-letter records and the events they make up, and the filters that select events.

An event is identified by :func:`schemas.deadletter.event_identity` (its webhook id, else
the failed record's source position); a record without ``dlq-*`` headers is an event of
its own, named by its position on the dead-letter topic. Its latest record is the highest
by :func:`schemas.deadletter.recency`.

A scan (:mod:`.scan`) keeps only what the commands show of each record: its ``dlq-*``
headers read into :class:`~schemas.deadletter.DeadLetterInfo`, its key and the small
carried-over headers (webhook id, event, received-at); never its value (``has_value`` says
whether it had one) and never the other records of an event beyond their reason and stage.
So memory grows with the number of events, not with the topic's bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from confluent_kafka import Message

from chargify_stream.base.messages import consumed_fields
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import (
    DeadLetterInfo,
    event_identity,
    format_timestamp,
    parse_dead_letter,
    recency,
)

NO_HEADERS = "(no dlq headers)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_T = TypeVar("_T")
_SUMMARY_HEADERS = frozenset({h.WEBHOOK_ID, h.EVENT})
_SHARED_MAX = 4096
_shared_values: dict[Any, Any] = {}


def _shared(value: _T) -> _T:
    """``value``, or an equal one seen before: repeated texts of a scan are stored once.

    Only the first few thousand distinct values are remembered (error texts can be unique).
    """
    found = _shared_values.get(value)
    if found is not None:
        return cast(_T, found)
    if len(_shared_values) < _SHARED_MAX:
        _shared_values[value] = value
    return value


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of the dead-letter topic, with its ``dlq-*`` headers read.

    ``value`` is ``None`` in a scan's summary even when the record has one (``has_value``);
    :func:`.scan.fill_latest` reads it back by position when a replay needs it.
    """

    topic: str
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    info: DeadLetterInfo | None
    has_value: bool = True

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
        keep_value: bool = True,
    ) -> DeadLetterRecord:
        kept = tuple((name, v) for name, v in headers if v is not None)
        info = parse_dead_letter(kept)
        if not keep_value:
            # A summary: the webhook id and event are all a report shows of the headers
            # (the dlq-* ones are in ``info``); the rest comes back with the value when it
            # is replayed. Texts most dead letters share are stored once.
            kept = tuple(_shared((n, v)) for n, v in kept if n in _SUMMARY_HEADERS)
            if info is not None:
                info = replace(
                    info,
                    reason=_shared(info.reason),
                    stage=_shared(info.stage),
                    error=_shared(info.error),
                    source_topic=_shared(info.source_topic),
                )
        return cls(
            _shared(topic),
            partition,
            offset,
            timestamp,
            key,
            value if keep_value else None,
            kept,
            info,
            value is not None,
        )

    @classmethod
    def from_message(cls, msg: Message, *, keep_value: bool = True) -> DeadLetterRecord:
        return cls.build(**consumed_fields(msg), keep_value=keep_value)

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


def identity(record: DeadLetterRecord) -> str:
    """Which event a dead-letter record belongs to (see the module docstring)."""
    info = record.info
    if info is None:
        return f"record:{record.position}"
    return event_identity(
        record.header(h.WEBHOOK_ID), info.source_topic, info.source_partition, info.source_offset
    )


def _recency(record: DeadLetterRecord) -> tuple[int, datetime, int, int]:
    count = record.info.replay_count if record.info is not None else -1
    return recency(count, record.failed_at, record.partition, record.offset)


@dataclass(frozen=True, slots=True)
class DeadLetterEvent:
    """One dead-lettered event: its latest dead-letter record, and the reason and stage of
    each of its records (``records``: how many there are, for the counts by reason)."""

    identity: str
    latest: DeadLetterRecord
    records: tuple[tuple[str, str], ...]
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
            "key": text(self.latest.key),
            "source_topic": info.source_topic if info else None,
            "source_partition": info.source_partition if info else None,
            "source_offset": info.source_offset if info else None,
            "dead_letter": {
                "topic": self.latest.topic,
                "partition": self.latest.partition,
                "offset": self.latest.offset,
            },
            "first_failed_at": time_text(self.first_failed_at),
            "last_failed_at": time_text(self.last_failed_at),
            "age_seconds": rounded(self.age(now)),
            "pointer": bool(info and info.pointer),
            "original_size": info.original_size if info else None,
        }


class EventGrouper:
    """Groups dead-letter records into events as they are read, one summary per event."""

    def __init__(self) -> None:
        self._latest: dict[str, DeadLetterRecord] = {}
        self._kinds: dict[str, tuple[tuple[str, str], ...]] = {}
        self._first: dict[str, datetime | None] = {}

    def add(self, record: DeadLetterRecord) -> None:
        ident = identity(record)
        info = record.info
        kind = _shared((info.reason, info.stage) if info else (NO_HEADERS, NO_HEADERS))
        moment = record.failed_at
        current = self._latest.get(ident)
        if current is None:
            self._latest[ident] = record
            self._kinds[ident] = _shared((kind,))
            self._first[ident] = moment
            return
        if _recency(record) > _recency(current):
            self._latest[ident] = record
        self._kinds[ident] = (*self._kinds[ident], kind)
        first = self._first[ident]
        if moment is not None and (first is None or moment < first):
            self._first[ident] = moment

    def events(self) -> list[DeadLetterEvent]:
        """The events so far, oldest first."""
        events = [
            DeadLetterEvent(ident, latest, self._kinds[ident], self._first[ident])
            for ident, latest in self._latest.items()
        ]
        events.sort(key=lambda e: (e.first_failed_at or _EPOCH, e.identity))
        return events


def group_events(records: Iterable[DeadLetterRecord]) -> list[DeadLetterEvent]:
    """Group dead-letter records into events, oldest first."""
    grouper = EventGrouper()
    for record in records:
        grouper.add(record)
    return grouper.events()


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


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def time_text(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)
