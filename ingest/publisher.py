"""Publishing to Kafka from asyncio, answering only once the broker has the record.

confluent-kafka reports deliveries through callbacks that run inside ``poll()``. One
daemon thread polls; its callbacks only collect ``(future, error)`` pairs, and after each
``poll()`` the whole batch is handed to the event loop with a single
``call_soon_threadsafe``. So the loop never blocks on the broker, and under load one loop
wake-up settles many requests instead of one each.

The producer is idempotent with ``acks=all``: a record counts as written only once every
in-sync replica has it, and librdkafka's own retries never duplicate it.
``message.timeout.ms`` equals the gateway's publish bound, so a record the broker did not
take in time is failed by librdkafka too, rather than written late behind a 503 (a late
write after a 503 is still possible when an acknowledgement is lost; Chargify's retry is
then a duplicate, which the processor drops by webhook id). A per-record timer one second
past the bound answers even if no report ever arrives.

An idempotent producer that hits a fatal error (for example an out-of-order sequence
after a broker lost data) refuses every later record; the poll thread then replaces it
with a fresh producer, so the gateway recovers without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.base.errors import TransientError

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]

# How much later than librdkafka's own message timeout a request gives up waiting: the
# delivery report's trip through the poll thread and the event loop.
_REPORT_GRACE_S = 1.0


class PublishError(TransientError):
    """The broker did not take the record; the webhook must be answered with 503."""


class Publisher:
    """An idempotent producer whose :meth:`publish` is awaitable.

    ``start()`` must be called from the event loop that will ``publish``; ``close()``
    flushes what is queued and stops the poll thread.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        timeout_s: float,
        max_record_bytes: int | None = None,
        **config: Any,
    ) -> None:
        self.timeout_s = timeout_s
        self._conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            # A short linger batches concurrent webhooks into one request per partition
            # at high rates, for at most this many milliseconds of added latency.
            "linger.ms": 2,
            "compression.type": "lz4",
            # Kafka's own (Java) partitioner, which aiokafka under Faust also uses: a
            # subscription's webhooks land where any other client would put them.
            "partitioner": "murmur2_random",
            "message.timeout.ms": int(timeout_s * 1000),
            "socket.keepalive.enable": True,
            "error_cb": self._on_error,
            "log_level": 3,
        }
        if max_record_bytes is not None:
            # librdkafka refuses a record (value, key and headers) over message.max.bytes
            # (1,000,000 by default) before sending it, and never sends a batch larger:
            # the gateway passes the raw topic's own limit (chargify_stream.base.limits), so
            # every body it accepts fits, and so does every batch of them.
            self._conf["message.max.bytes"] = max_record_bytes
        self._conf.update(config)
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._reports_lock = threading.Lock()
        self._fatal = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Create the producer and the poll thread; bind to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._producer = Producer(self._conf)
        self._thread = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False between a fatal producer error and the replacement producer."""
        return self._producer is not None and not self._fatal.is_set()

    # -- the poll thread ---------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        # Called from poll(): connection errors are transient and librdkafka retries them
        # on its own; only a fatal error needs us.
        if err.fatal():
            log.critical("Kafka producer fatal error, replacing the producer: %s", err.str())
            self._fatal.set()
        else:
            log.warning("Kafka producer: %s", err.str())

    def _delivered(self, future: asyncio.Future[None], err: KafkaError | None, _: Message) -> None:
        with self._reports_lock:
            self._reports.append((future, err))

    def _hand_over(self) -> None:
        with self._reports_lock:
            if not self._reports:
                return
            batch, self._reports = self._reports, []
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_settle, batch)
        except RuntimeError:
            # The loop has closed (process exit): nobody is waiting for these answers.
            log.warning("dropping %d delivery reports after the event loop closed", len(batch))

    def _poll(self) -> None:
        while not self._stop.is_set():
            producer = self._producer
            assert producer is not None
            try:
                producer.poll(0.1)
                self._hand_over()
                if self._fatal.is_set():
                    self._replace(producer)
            except Exception:
                # This thread must outlive any surprise: without it no request is answered
                # before its timer (503), and none is ever answered 200 again.
                log.exception("error in the Kafka delivery thread")
                self._stop.wait(0.1)

    def _replace(self, broken: Producer) -> None:
        self._producer = Producer(self._conf)
        # Fail what the broken producer still holds; those requests answer 503 and
        # Chargify retries them through the new producer.
        try:
            broken.purge()
            broken.flush(0)
        except KafkaException as exc:
            log.warning("purging the failed producer: %s", exc)
        self._hand_over()
        self._fatal.clear()
        log.warning("Kafka producer replaced after a fatal error")

    # -- the event loop ----------------------------------------------------------------

    async def publish(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> None:
        """Write one record; return once the broker acknowledged it, else raise PublishError."""
        producer = self._producer
        loop = self._loop
        if producer is None or loop is None:
            raise PublishError("the publisher is not started")
        done: asyncio.Future[None] = loop.create_future()
        try:
            producer.produce(
                topic,
                value=value,
                key=key,
                headers=list(headers),
                on_delivery=partial(self._delivered, done),
            )
        except BufferError as exc:
            raise PublishError("the producer queue is full") from exc
        except KafkaException as exc:
            raise PublishError(str(exc)) from exc
        timer = loop.call_later(self.timeout_s + _REPORT_GRACE_S, _expire, done, self.timeout_s)
        try:
            await done
        finally:
            timer.cancel()

    async def ready(self, topic: str, timeout: float = 2.0) -> bool:
        """True when the broker answers a metadata request naming ``topic``, and it exists."""
        return self.healthy and await asyncio.to_thread(self._ping, topic, timeout)

    def _ping(self, topic: str, timeout: float) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            md = producer.list_topics(topic, timeout=timeout)
        except KafkaException:
            return False
        found = md.topics.get(topic)
        return bool(md.brokers) and found is not None and found.error is None

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (bounded), then stop the poll thread.

        The flush runs in a worker thread while the poll thread keeps handing reports to
        the loop, so requests still waiting for their acknowledgement get their answer.
        """
        producer = self._producer
        if producer is not None:
            remaining = await asyncio.to_thread(producer.flush, timeout)
            if remaining:
                log.error("closing with %d records the broker never acknowledged", remaining)
        if self._thread is not None:
            self._stop.set()
            await asyncio.to_thread(self._thread.join, 2)
        self._hand_over()


def _settle(batch: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, err in batch:
        if future.done():  # the request already gave up (timer) or was cancelled
            continue
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(PublishError(f"delivery failed: {err.str()}"))


def _expire(future: asyncio.Future[None], timeout_s: float) -> None:
    if not future.done():
        future.set_exception(PublishError(f"no broker acknowledgement within {timeout_s}s"))
