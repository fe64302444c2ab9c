"""Parked events: which dead letters the re-driver keeps, and which it re-publishes.

The pure core of :mod:`sink.redrive`, decided without Kafka or Postgres and tested as plain
functions: :func:`parkable` turns one dead-letter record into a ``parked_events`` row (or
refuses it), and :func:`choose_redrives` keeps one record per Chargify event among the rows
claimed for re-drive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chargify_stream.base.messages import ConsumedFields, Headers
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import event_identity, parse_dead_letter, recency

__all__ = ["Claimed", "ParkedEvent", "choose_redrives", "parkable"]


@dataclass(frozen=True, slots=True)
class _Parked:
    """What a parked event and a claimed row both hold: where the dead letter sits, where
    its record was read, the record to re-publish, and how often it was replayed."""

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


@dataclass(frozen=True, slots=True)
class ParkedEvent(_Parked):
    """One ``customer_not_found`` dead letter, as a ``parked_events`` row."""

    event: str | None
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


def parkable(record: ConsumedFields, *, sink_topics: Iterable[str]) -> ParkedEvent | None:
    """The parked event for one dead-letter record, or ``None`` when it is not one to re-drive.

    Only ``customer_not_found`` dead letters written by the sink qualify: their key is the
    customer reference and their source is one of the sink's input topics (the typed topics,
    or the retry topic for a retry that failed again). A record without
    readable ``dlq-*`` headers (written by hand, by another tool) is never replayed blindly.
    """
    key, value, headers = record["key"], record["value"], record["headers"]
    info = parse_dead_letter(headers)
    if info is None or info.reason != h.CUSTOMER_NOT_FOUND or info.stage != h.STAGE_SINK:
        return None
    if info.source_topic not in set(sink_topics) or not key or value is None:
        return None
    try:
        customer = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    found = dict(headers)
    return ParkedEvent(
        dlq_topic=record["topic"],
        dlq_partition=record["partition"],
        dlq_offset=record["offset"],
        customer_key=customer,
        source_topic=info.source_topic,
        source_partition=info.source_partition,
        source_offset=info.source_offset,
        record_key=key,
        value=value,
        headers=list(headers),
        webhook_id=_text(found.get(h.WEBHOOK_ID)),
        event=_text(found.get(h.EVENT)),
        replay_count=info.replay_count,
        failed_at=info.failed_at,
    )


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", errors="replace") if value else None


@dataclass(frozen=True, slots=True)
class Claimed(_Parked):
    """A claimed ``parked_events`` row: what is needed to re-publish it and mark it."""

    @property
    def identity(self) -> str:
        """One Chargify event, as ``dlq`` names it (:func:`schemas.deadletter.event_identity`)."""
        return event_identity(
            self.webhook_id, self.source_topic, self.source_partition, self.source_offset
        )

    @property
    def recency(self) -> tuple[int, datetime, int, int]:
        """Which of an event's rows is its latest failure (:func:`schemas.deadletter.recency`)."""
        return recency(self.replay_count, None, self.dlq_partition, self.dlq_offset)


def choose_redrives(claimed: Sequence[Claimed]) -> list[Claimed]:
    """One record per event: the one replayed most (its latest failure), in claim order.

    The same event can be parked several times (a manual replay that failed again); one
    re-publication is enough, and its ``dlq-replay-count`` must be the highest seen.
    """
    best: dict[str, Claimed] = {}
    for row in claimed:
        current = best.get(row.identity)
        if current is None or row.recency > current.recency:
            best[row.identity] = row
    return list(best.values())
