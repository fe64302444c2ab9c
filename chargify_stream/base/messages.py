"""Records as a consumer receives them: their headers, their fields, a topic read to its end.

Shared by the stages and the operator commands, so a consumed record is unpacked, and a
topic read up to the ends taken at start, in one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypedDict

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from chargify_stream.base.errors import TransientError

__all__ = ["ConsumedFields", "Headers", "consumed_fields", "message_headers", "read_to_end"]

Headers = list[tuple[str, bytes]]


def message_headers(msg: Message) -> Headers:
    """A consumed record's headers as (name, bytes) pairs, in order; valueless ones dropped."""
    raw: Any = msg.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in items if v is not None]


class ConsumedFields(TypedDict):
    """What a consumed record carries, as keyword arguments."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: datetime | None  # None: the record has no timestamp


def consumed_fields(msg: Message) -> ConsumedFields:
    kind, millis = msg.timestamp()
    return {
        "topic": msg.topic() or "",
        "partition": msg.partition() or 0,
        "offset": msg.offset() or 0,
        "key": msg.key(),
        "value": msg.value(),
        "headers": message_headers(msg),
        "timestamp": datetime.fromtimestamp(millis / 1000, UTC) if kind and millis > 0 else None,
    }


def read_to_end(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    *,
    timeout: float,
    stalled: Callable[[list[int]], str],
) -> Iterator[list[Message]]:
    """The records of ``topic`` from ``starts`` up to ``ends`` (offsets by partition, the
    ends excluded), as the batches Kafka hands them over; a batch may be empty.

    The consumer must have ``enable.partition.eof`` on: in read_committed the last offsets
    may be transaction markers, which are never delivered, and the end is then reached when
    EOF says so. When Kafka stays silent for ``timeout`` seconds before the end (also when
    a transaction stays open: read_committed cannot pass it), raises
    :class:`TransientError` with the text ``stalled`` gives for the partitions not done.
    """
    pending = {p: ends[p] for p, start in starts.items() if start < ends[p]}
    if not pending:
        return
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in pending])
    heard = time.monotonic()
    while pending:
        msgs = consumer.consume(500, 0.5)
        if msgs:
            heard = time.monotonic()
        elif time.monotonic() - heard > timeout:
            raise TransientError(stalled(sorted(pending)))
        batch = []
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
                batch.append(msg)
            if offset >= pending[partition] - 1:
                pending.pop(partition)
        yield batch
