"""Small, blocking Kafka helpers for tests: read what a topic holds, write test records.

Each takes the broker as bootstrap servers (a PLAINTEXT broker) or as the test's
settings (any broker, through :mod:`chargify_stream.base.kafka_config`).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from chargify_stream.base.delivery import publish_and_wait
from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.schemas.codec import decode
from tests.conftest import unique


def connection(kafka: str | Settings) -> dict[str, Any]:
    """The librdkafka connection config of ``kafka``."""
    if isinstance(kafka, Settings):
        return librdkafka_config(kafka)
    return {"bootstrap.servers": kafka}


def topics_only_settings(bootstrap_servers: str) -> Settings:
    """Settings with a test's own topics (the pipeline's and customers, two partitions
    each) and no database, for tests that only write and read topics."""
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap_servers,
        kafka_topic_prefix=f"t{unique('')}.",
        topic_partitions=2,
    )
    ensure_pipeline_topics(settings, [*settings.all_topics, settings.topic("customers")])
    return settings


def consume(
    bootstrap_servers: str | Settings,
    topic: str,
    *,
    count: int,
    timeout: float = 30.0,
    settle: float = 0.0,
) -> list[Message]:
    """Read ``topic`` from the start until ``count`` records arrived (or ``timeout``).

    With ``settle`` > 0, keep reading that long after ``count`` is reached, so a test can
    prove that nothing *more* arrived (a duplicate, say).
    """
    consumer = Consumer(
        {
            **connection(bootstrap_servers),
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if len(out) >= count and settle_until is None:
                if settle <= 0:
                    break
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                continue
            out.append(msg)
    finally:
        consumer.close()
    return out


def transaction_ids(
    settings: Settings, count: int, *, timeout: float = 60.0, settle: float = 3.0
) -> Counter[int]:
    """What a read_committed reader of the transactions topic sees, by transaction id: read
    until ``count`` records arrived, then ``settle`` seconds more to catch a duplicate."""
    out = consume(
        settings.kafka_bootstrap_servers,
        settings.topic("transactions"),
        count=count,
        timeout=timeout,
        settle=settle,
    )
    return Counter(decode(m.value()).transaction_id for m in out)  # type: ignore[union-attr]


def end_offsets(bootstrap_servers: str | Settings, topic: str) -> int:
    """The number of records ever written to ``topic`` (sum of high watermarks)."""
    consumer = Consumer({**connection(bootstrap_servers), "group.id": "watermarks"})
    try:
        # Right after a broker restart a partition may briefly have no leader yet.
        deadline = time.monotonic() + 30
        while True:
            try:
                md = consumer.list_topics(topic, timeout=10)
                total = 0
                for p in md.topics[topic].partitions:
                    tp = TopicPartition(topic, p)
                    _, high = consumer.get_watermark_offsets(tp, timeout=10)
                    total += high
                return total
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        consumer.close()


def produce(
    bootstrap_servers: str | Settings,
    topic: str,
    records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    *,
    max_bytes: int = 1_000_000,
) -> None:
    """Write (key, value, headers) records and wait until the broker has every one.

    ``max_bytes`` is the producer's ``message.max.bytes`` (librdkafka's default unless
    a test writes records as large as the pipeline's budget allows).
    """
    producer = Producer(
        {**connection(bootstrap_servers), "acks": "all", "message.max.bytes": max_bytes}
    )
    errors = publish_and_wait(producer, topic, records, timeout=30)
    assert not errors, errors


def headers_of(msg: Message) -> dict[str, bytes]:
    return {k: v for k, v in (msg.headers() or []) if v is not None}


def alter_topic(bootstrap_servers: str, topic: str, config: dict[str, str]) -> None:
    """Set configuration entries of an existing topic, as an operator would by hand."""
    from confluent_kafka.admin import (
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    resource = ConfigResource(
        ResourceType.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
            for name, value in config.items()
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
