"""Publishing a batch's records, returning only once the broker has every one of them.

The records go out through librdkafka (confluent-kafka), not through Faust's producer:
Faust wraps each send in several Python objects, tasks and callbacks, and aiokafka builds
and sends batches in Python, which together cost more than deciding a webhook does; a
``produce()`` call is a few microseconds of C, and batching, compression and the network
run on librdkafka's own threads. Faust's producer still carries the tables' changelogs,
which are few (one record per batch and partition, plus new subscriptions).

The producer is idempotent with ``acks=all``, so librdkafka's retries neither duplicate
nor reorder. A record the broker still refuses after ``message.timeout.ms`` is sent again
with backoff, never skipped: the batch is acked only after every record was delivered.
The wait polls librdkafka from the event loop every few milliseconds, so the loop stays
free for Faust (heartbeats, commits, the web server) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, Message, Producer

from chargify_stream.settings import Settings
from processors.splitter import Outgoing

__all__ = ["Outputs"]

log = logging.getLogger(__name__)

_Headers = list[tuple[str, str | bytes | None]]
# (topic, key, value, headers) as produced.
_Record = tuple[str, bytes | None, bytes, _Headers]

MESSAGE_TIMEOUT_MS = 30_000
POLL_INTERVAL_S = 0.002


class Outputs:
    """The producer for the transactions, subscriptions, dead-letter and decisions topics."""

    def __init__(
        self, settings: Settings, *, on_retry: Callable[[int], None] | None = None
    ) -> None:
        self.topics = {
            name: settings.topic(name)
            for name in ("transactions", "subscriptions", "deadletter", "decisions")
        }
        self.on_retry = on_retry
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
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
                "log_level": 3,
            }
        )
        self._failed: list[tuple[KafkaError, Message]] = []
        self._closing = False

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        # Called from poll(), for failed records only.
        if err is not None:
            self._failed.append((err, msg))

    def _produce(self, record: _Record) -> None:
        topic, key, value, headers = record
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
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
        """Publish ``records``; return once every one is acknowledged by the broker."""
        pending: list[_Record] = [
            (self.topics[r.topic], r.key, r.value, list(r.headers)) for r in records
        ]
        delay = 0.2
        while pending:
            self._failed = []
            for record in pending:
                self._produce(record)
            await self._delivered()
            failed = self._failed
            if not failed:
                return
            if self.on_retry is not None:
                self.on_retry(len(failed))
            log.warning(
                "%d of %d records not acknowledged (%s); sending them again in %.1fs",
                len(failed),
                len(pending),
                failed[0][0],
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            pending = [_as_record(msg) for _, msg in failed]

    def close(self, timeout: float = 10.0) -> None:
        """Stop any wait for deliveries and give the queue ``timeout`` seconds to drain."""
        self._closing = True
        remaining = self._producer.flush(timeout)
        if remaining:
            log.warning("%d output records undelivered at shutdown; they will be redone", remaining)


def _as_record(msg: Message) -> _Record:
    """A failed message, to produce again."""
    headers = msg.headers() or []
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    return msg.topic() or "", msg.key(), msg.value() or b"", items
