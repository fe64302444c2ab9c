"""Publishing a batch's records, returning only once the broker has every one of them.

The records go out through librdkafka (confluent-kafka), not through Faust's producer:
Faust wraps each send in several Python objects, tasks and callbacks, and aiokafka builds
and sends batches in Python, which together cost more than deciding a webhook does; a
``produce()`` call is a few microseconds of C, and batching, compression and the network
run on librdkafka's own threads. Faust's producer still carries the tables' changelogs,
which are few (one record per batch and partition, plus new subscriptions).

The producer is idempotent with ``acks=all``, so librdkafka's retries neither duplicate
nor reorder. Its ``message.max.bytes`` is the dead-letter record limit of
:mod:`chargify_stream.limits`, so the dead letter of any raw record fits. The batch is
acked only after every record was delivered or replaced:

- a record Kafka refuses for itself (:mod:`chargify_stream.kafka_errors`: too large, invalid;
  raised by ``produce()`` or in the delivery report) is replaced by its
  :func:`processors.splitter.fallback`: an output record by the dead letter of its raw
  record, a dead letter by a pointer to it. One record can never stop the processor;
- a record the broker did not take for any other reason (timeout, no leader) is sent
  again with backoff, never skipped: that is the broker, not the record.

The wait polls librdkafka from the event loop every few milliseconds, so the loop stays
free for Faust (heartbeats, commits, the web server) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.kafka_config import librdkafka_config
from chargify_stream.kafka_errors import refusal, refused_for_itself
from chargify_stream.limits import deadletter_record_max
from chargify_stream.settings import Settings
from processors.splitter import Outgoing, fallback
from schemas.deadletter import parse_dead_letter

__all__ = ["Outputs"]

log = logging.getLogger(__name__)

_Headers = list[tuple[str, str | bytes | None]]

MESSAGE_TIMEOUT_MS = 30_000
POLL_INTERVAL_S = 0.002


class Outputs:
    """The producer for the transactions, subscriptions and dead-letter topics."""

    def __init__(
        self, settings: Settings, *, on_retry: Callable[[int], None] | None = None
    ) -> None:
        self.topics = {
            name: settings.topic(name) for name in ("transactions", "subscriptions", "deadletter")
        }
        self.on_retry = on_retry
        self._producer = Producer(
            {
                **librdkafka_config(settings),
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.timeout.ms": MESSAGE_TIMEOUT_MS,
                "queue.buffering.max.messages": 200_000,
                # Successes need no callback (len() falls as the broker acknowledges), and
                # each Python callback would have to win the GIL back from the consumer's
                # thread: with one per record, waiting for a batch took ~100 ms.
                "delivery.report.only.error": True,
                "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
                "log_level": 3,
            }
        )
        self._failed: list[tuple[KafkaError, Outgoing]] = []
        self._closing = False

    def _on_delivery(self, record: Outgoing, err: KafkaError | None, _msg: Message) -> None:
        # Called from poll(), for failed records only.
        if err is not None:
            self._failed.append((err, record))

    def _produce(self, record: Outgoing) -> None:
        """Hand ``record`` to librdkafka; raises ``KafkaException`` if it refuses it at once."""
        while True:
            try:
                self._producer.produce(
                    self.topics[record.topic],
                    value=record.value,
                    key=record.key,
                    headers=list(record.headers),
                    on_delivery=partial(self._on_delivery, record),
                )
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)

    async def _delivered(self) -> None:
        """Return once nothing is queued or in flight (each record acknowledged or failed)."""
        while len(self._producer):
            if self._closing:
                raise asyncio.CancelledError("the processor is stopping")
            self._producer.poll(0)
            await asyncio.sleep(POLL_INTERVAL_S)
        self._producer.poll(0)  # the last failures' callbacks

    async def send(self, records: Sequence[Outgoing]) -> None:
        """Publish ``records``; return once each one, or what replaced it, is acknowledged."""
        pending = list(records)
        delay = 0.2
        while pending:
            self._failed = []
            refused: list[tuple[Outgoing, str]] = []
            for record in pending:
                try:
                    self._produce(record)
                except KafkaException as exc:
                    if not refused_for_itself(exc):
                        raise
                    refused.append((record, refusal(exc)))
            await self._delivered()
            again: list[Outgoing] = []
            first = str(self._failed[0][0]) if self._failed else "a pointer was refused"
            for err, record in self._failed:
                if refused_for_itself(err):
                    refused.append((record, refusal(err)))
                else:
                    again.append(record)
            for record, why in refused:
                again.extend(await self._replace(record, why))
            if not again:
                return
            if self.on_retry is not None:
                self.on_retry(len(again))
            log.warning(
                "%d of %d records not acknowledged (%s); sending them again in %.1fs",
                len(again),
                len(pending),
                first,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            pending = again

    async def _replace(self, record: Outgoing, why: str) -> list[Outgoing]:
        """Publish what replaces ``record``, refused for itself, and its own replacements.

        Returns what is left to send again (the broker did not take it, for a reason not
        tied to the record), which is empty once a replacement was acknowledged.
        """
        while True:
            replacement = fallback(record, why)
            _log_refusal(record, replacement, why)
            if replacement is None:  # even a pointer: the topic, not the record
                return [record]
            record = replacement
            self._failed = []
            try:
                self._produce(record)
            except KafkaException as exc:
                if not refused_for_itself(exc):
                    raise
                why = refusal(exc)
                continue
            await self._delivered()
            if not self._failed:
                return []
            err = self._failed[0][0]
            if not refused_for_itself(err):
                return [record]
            why = refusal(err)

    def close(self, timeout: float = 10.0) -> None:
        """Stop any wait for deliveries and give the queue ``timeout`` seconds to drain."""
        self._closing = True
        remaining = self._producer.flush(timeout)
        if remaining:
            log.warning("%d output records undelivered at shutdown; they will be redone", remaining)


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
