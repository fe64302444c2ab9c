"""Publishing to Kafka from asyncio, answering only once the broker has the record.

confluent-kafka reports deliveries through callbacks that run inside ``poll()``. A
daemon thread polls; each callback resolves an asyncio future on the event loop with
``call_soon_threadsafe``, so the loop never blocks on the broker.

The producer is idempotent with ``acks=all``: a record counts as written only once every
in-sync replica has it, and librdkafka's own retries never duplicate it.
``message.timeout.ms`` equals the gateway's publish bound, so a record the broker did not
take in time is failed by librdkafka too, rather than written late behind a 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.errors import TransientError

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


class PublishError(TransientError):
    """The broker did not take the record; the webhook must be answered with 503."""


class Publisher:
    """An idempotent producer whose :meth:`publish` is awaitable."""

    def __init__(self, bootstrap_servers: str, *, timeout_s: float, **config: object) -> None:
        self.timeout_s = timeout_s
        conf: dict[str, object] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "compression.type": "lz4",
            "message.timeout.ms": int(timeout_s * 1000),
            "socket.keepalive.enable": True,
            "log_level": 3,
        }
        conf.update(config)
        self._producer = Producer(conf)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def publish(self, topic: str, key: bytes, value: bytes, headers: Headers) -> None:
        """Write one record; return once the broker acknowledged it, else raise PublishError."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            loop.call_soon_threadsafe(_resolve, done, err)

        try:
            self._producer.produce(
                topic, value=value, key=key, headers=list(headers), on_delivery=on_delivery
            )
        except BufferError as exc:
            raise PublishError("the producer queue is full") from exc
        except KafkaException as exc:
            raise PublishError(str(exc)) from exc
        try:
            # librdkafka fails the record at message.timeout.ms; the extra second only
            # covers the callback's trip back to this loop.
            await asyncio.wait_for(asyncio.shield(done), self.timeout_s + 1.0)
        except TimeoutError as exc:
            raise PublishError(f"no broker acknowledgement within {self.timeout_s}s") from exc

    def ping(self, topic: str, timeout: float = 2.0) -> bool:
        """True when the broker answers a metadata request that names ``topic``."""
        try:
            md = self._producer.list_topics(topic, timeout=timeout)
        except KafkaException:
            return False
        t = md.topics.get(topic)
        return bool(md.brokers) and t is not None and t.error is None

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (bounded), then stop the delivery thread."""
        remaining = self._producer.flush(timeout)
        if remaining:
            log.error("closing with %d records the broker never acknowledged", remaining)
        self._stop.set()
        self._thread.join(timeout=2)


def _resolve(done: asyncio.Future[None], err: KafkaError | None) -> None:
    if done.done():
        return
    if err is None:
        done.set_result(None)
    else:
        done.set_exception(PublishError(f"delivery failed: {err.str()}"))
