"""Handing a batch's records to the producer, replacing those Kafka refuses for themselves.

The records go out through librdkafka (confluent-kafka): a ``produce()`` call is a few
microseconds of C, and batching, compression and the network run on librdkafka's own
threads. The pipeline (:mod:`processors.pipeline`) opens the transaction, hands the
batch's records here, and commits; the producer's ``message.max.bytes`` is the dead-letter
record limit of :mod:`chargify_stream.base.limits`, so the dead letter of any raw record fits.

One record can never stop the processor. A record Kafka refuses for itself
(:mod:`chargify_stream.base.kafka_errors`: too large, invalid) is replaced by its
:func:`processors.splitter.fallback` (an output record by the dead letter of its raw
record, a dead letter by a pointer to it):

- refused at once by ``produce()``: replaced at once, in the same transaction;
- refused by the broker (in the delivery report): the transaction cannot commit; the
  pipeline aborts it and sends the batch again with :meth:`Outputs.replaced` records.

A record the broker did not take for any other reason (timeout, no leader) is the broker,
not the record: the transaction is aborted and the batch done again, never skipped.
Delivery reports are asked for failures only (``delivery.report.only.error``): a Python
callback per record would cost more than the rest of its sending.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.base.kafka_errors import refusal, refused_for_itself
from chargify_stream.processors.splitter import Outgoing, fallback
from chargify_stream.schemas.deadletter import parse_dead_letter

__all__ = ["Outputs", "Unplaceable"]

log = logging.getLogger(__name__)


class Unplaceable(Exception):
    """Kafka refused even the pointer to a dead letter: the dead-letter topic's limits are
    wrong, which no record can fix (the batch is retried, with backoff)."""


class Outputs:
    """The batch's records, handed to ``producer`` in the open transaction."""

    def __init__(self, producer: Producer, topics: dict[str, str]) -> None:
        self.producer = producer
        self.topics = topics
        self._refused: list[tuple[Outgoing, str]] = []
        self._substitutes: dict[int, Outgoing] = {}  # id(record) -> what was sent instead

    def produce(self, records: Sequence[Outgoing]) -> None:
        """Hand every record to librdkafka; one it refuses at once is replaced at once."""
        self._refused = []
        self._substitutes = {}
        for record in records:
            self._produce(record)

    def _produce(self, original: Outgoing) -> None:
        produce = self.producer.produce
        record = original
        while True:
            headers: Any = record.headers  # (name, bytes) pairs, as librdkafka takes them
            try:
                produce(
                    self.topics[record.topic],
                    value=record.value,
                    key=record.key,
                    headers=headers,
                    on_delivery=partial(self._on_delivery, record),
                )
                if record is not original:
                    self._substitutes[id(original)] = record
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as exc:
                if not refused_for_itself(exc):
                    raise
                record = _replacement(record, refusal(exc))

    def _on_delivery(self, record: Outgoing, err: KafkaError | None, _msg: Message) -> None:
        # Called from poll(), flush() or commit_transaction(), for failed records only.
        if err is not None and refused_for_itself(err):
            self._refused.append((record, refusal(err)))

    def replaced(self, records: Sequence[Outgoing]) -> tuple[list[Outgoing], bool]:
        """``records`` as they are to be sent again, with what was refused replaced; and
        whether the broker refused any (so the transaction failed for that alone)."""
        substitutes = dict(self._substitutes)
        for record, why in self._refused:
            substitutes[id(record)] = _replacement(record, why)
        sent = [self._substitutes.get(id(record), record) for record in records]
        return [substitutes.get(id(r), r) for r in sent], bool(self._refused)


def _replacement(record: Outgoing, why: str) -> Outgoing:
    replacement = fallback(record, why)
    _log_refusal(record, replacement, why)
    if replacement is None:
        raise Unplaceable(f"the {record.topic} topic refused even a pointer: {why}")
    return replacement


def _log_refusal(record: Outgoing, replacement: Outgoing | None, why: str) -> None:
    """One line per refused record: which, why, and what is written instead."""
    source = record.source
    if source is not None:
        where = f"from {source.topic}[{source.partition}]@{source.offset}"
    else:
        info = parse_dead_letter(record.headers)
        where = (
            f"for {info.source_topic}[{info.source_partition}]@{info.source_offset}"
            if info is not None
            else ""
        )
    size = len(record.value or b"") + len(record.key or b"")
    if replacement is None:
        log.error(
            "Kafka refused the %s record %s (%d bytes) even as a pointer: %s; the "
            "dead-letter topic must take small records (check its max.message.bytes)",
            record.topic,
            where,
            size,
            why,
        )
    else:
        log.warning(
            "Kafka refused the %s record %s (%d bytes): %s; writing %s instead",
            record.topic,
            where,
            size,
            why,
            "a pointer to it" if replacement.value is None else "the raw record's dead letter",
        )
