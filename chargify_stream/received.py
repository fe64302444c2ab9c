"""Which Chargify webhooks the pipeline has accepted, by webhook id.

A webhook is accepted once the gateway has written it to the raw topic
(``chargify.webhooks.raw``, header ``chargify-webhook-id``): that is when it answers
Chargify 200. What happened to it afterwards (recorded, ignored, dead-lettered) is the
pipeline's business, not Chargify's, so a dead-lettered webhook counts as received.

:class:`RawTopicReader` reads the raw topic from the offsets of a start time
(``offsets_for_times``) up to its end as it was when reading started, read_committed,
with partitions assigned by hand: no consumer group joins and nothing is committed, so
reading changes nothing. :meth:`RawTopicReader.follow` then keeps reading new records,
to see replayed webhooks arrive.

When Postgres has the ``webhook_outcomes`` table (one row per webhook the pipeline
decided on), :func:`outcome_ids` adds the ids found there: they cover webhooks older than
the raw topic's retention.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from chargify_stream.base.errors import ChargifyStreamError, TransientError
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings
from chargify_stream.schemas import headers as h

__all__ = ["RawTopicReader", "outcome_ids"]

_EVENT_ID = b"payload[event_id]="
_DIGITS = re.compile(rb"\d+")


class RawTopicReader:
    """Webhook ids on the raw topic since a moment; see the module docstring."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        self.settings = settings
        self.topic = settings.topic("raw")
        self.timeout = timeout
        self.errors: list[str] = []
        self.ids: set[int] = set()
        self.event_ids: set[int] = set()  # the bodies' payload[event_id]
        self.records = 0
        self.oldest: datetime | None = None  # the first record read
        # True when retention has already deleted records that `since` asks for.
        self.truncated = False
        self._consumer: Consumer | None = None

    def __enter__(self) -> RawTopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def read(self, since: datetime) -> set[int]:
        """Every webhook id received from ``since`` up to the topic's current end."""
        consumer = self._open()
        try:
            metadata = consumer.list_topics(self.topic, timeout=self.timeout)
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            raise ChargifyStreamError(
                f"raw topic {self.topic} does not exist: the gateway never ran against "
                f"this Kafka ({self.settings.kafka_bootstrap_servers}), or TOPIC_RAW / "
                "KAFKA_TOPIC_PREFIX point elsewhere; nothing was compared or replayed"
            )
        millis = int(since.timestamp() * 1000)
        wanted = [TopicPartition(self.topic, p, millis) for p in sorted(topic.partitions)]
        try:
            starts = consumer.offsets_for_times(wanted, timeout=self.timeout)
            marks = {
                tp.partition: consumer.get_watermark_offsets(tp, timeout=self.timeout)
                for tp in wanted
            }
        except KafkaException as exc:
            raise self._unreachable(exc) from None
        ends = {p: high for p, (_low, high) in marks.items()}
        self.truncated = any(
            tp.offset == marks[tp.partition][0] > 0 for tp in starts if tp.offset >= 0
        )
        # No record at or after `since`: start at the end (offset -1 means just that).
        start = {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in starts}
        consumer.assign([TopicPartition(self.topic, p, o) for p, o in start.items()])
        pending = {p: end for p, end in ends.items() if end > start[p]}
        self._consume(consumer, pending, stop_when=None, deadline=None)
        return self.ids

    def follow(self, wanted: Collection[int], timeout: float) -> set[int]:
        """Keep reading new records until every id of ``wanted`` was seen, or ``timeout``
        seconds passed; return the ids still not seen."""
        consumer = self._open()
        missing = set(wanted) - self.ids
        if missing:
            self._consume(
                consumer, None, stop_when=set(missing), deadline=time.monotonic() + timeout
            )
        return set(wanted) - self.ids

    def _open(self) -> Consumer:
        if self._consumer is None:

            def on_error(err: KafkaError) -> None:
                self.errors.append(err.str())

            self._consumer = Consumer(
                {
                    **librdkafka_config(self.settings),
                    "log_level": 0,
                    "error_cb": on_error,
                    # Required by the client, never joined: partitions are assigned by hand.
                    "group.id": f"chargify-reconcile-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "isolation.level": "read_committed",
                }
            )
        return self._consumer

    def _consume(
        self,
        consumer: Consumer,
        pending: dict[int, int] | None,
        *,
        stop_when: set[int] | None,
        deadline: float | None,
    ) -> None:
        """Read until every partition of ``pending`` reached its end offset, or (when
        following) until ``stop_when`` is empty or the deadline passed."""
        stalled_since = time.monotonic()
        while True:
            if pending is not None and not pending:
                return
            if stop_when is not None and not stop_when:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            msgs = consumer.consume(500, 0.5)
            if msgs:
                stalled_since = time.monotonic()
            elif pending is not None and time.monotonic() - stalled_since > self.timeout:
                raise TransientError(
                    f"reading {self.topic} stalled after {self.records} records (no answer "
                    f"from Kafka for {self.timeout:.0f}s); nothing was compared or replayed"
                )
            for msg in msgs:
                err = msg.error()
                partition = msg.partition() or 0
                offset = msg.offset() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if pending is not None and offset >= pending.get(partition, 0):
                            pending.pop(partition, None)
                        continue
                    raise TransientError(f"reading {self.topic}: {err.str()}")
                webhook_id = self._take(msg)
                if stop_when is not None and webhook_id is not None:
                    stop_when.discard(webhook_id)
                if pending is not None and offset >= pending.get(partition, 0) - 1:
                    pending.pop(partition, None)

    def _take(self, msg: Message) -> int | None:
        """Note one record; return its webhook id, if it has one."""
        self.records += 1
        if self.oldest is None:
            kind, millis = msg.timestamp()
            if kind and millis > 0:
                self.oldest = datetime.fromtimestamp(millis / 1000, UTC)
        body = msg.value() or b""
        at = body.rfind(_EVENT_ID)  # last in real bodies (WEBHOOKS.md §1.4)
        if at >= 0 and (at == 0 or body[at - 1 : at] == b"&"):
            digits = _DIGITS.match(body, at + len(_EVENT_ID))
            if digits:
                self.event_ids.add(int(digits.group()))
        raw: Any = msg.headers() or []
        for name, value in raw:
            if name == h.WEBHOOK_ID and value:
                try:
                    webhook_id = int(value)
                except ValueError:
                    return None
                self.ids.add(webhook_id)
                return webhook_id
        return None

    def _unreachable(self, exc: KafkaException) -> TransientError:
        detail = self.errors[-1] if self.errors else str(exc)
        return TransientError(
            f"Kafka at {self.settings.kafka_bootstrap_servers} is unreachable ({detail}); "
            "nothing was compared or replayed"
        )


def outcome_ids(settings: Settings, ids: Iterable[int]) -> tuple[set[int], str | None]:
    """The ids of ``ids`` that ``webhook_outcomes`` knows, and a note when the table could
    not be used (absent, or the database unreachable): then only the raw topic counts."""
    wanted = sorted(set(ids))
    if not wanted:
        return set(), None
    try:
        with psycopg.connect(settings.database_dsn(), connect_timeout=10) as conn:
            row = conn.execute("select to_regclass('webhook_outcomes') is not null").fetchone()
            if not row or not row[0]:
                return set(), None
            rows = conn.execute(
                "select webhook_id from webhook_outcomes where webhook_id = any(%s)", (wanted,)
            ).fetchall()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return set(), f"webhook_outcomes not consulted (database: {first}); raw topic only"
    return {int(r[0]) for r in rows}, None
