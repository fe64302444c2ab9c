"""Benchmark the analysts' reader: transactions/s read to dicts, against a bare consumer.

    .venv/bin/python bench/analytics/run.py [--records 100000] [--rounds 3]

Starts a local Kafka broker (the tests' launcher, a temporary folder) and writes
``--records`` Avro ``Transaction`` values to a 3-partition topic in Kafka transactions, as
the processor does. Then, in alternating rounds, reads all of them:

- **reader**: ``chargify_stream.analytics.read_transactions(from_beginning=True)``, the
  code ``chargify-stream tail`` runs (read_committed, decoded, made into dicts);
- **bare consumer**: a confluent-kafka consumer with the same settings that only counts
  the values (no decoding). This is the ceiling.

Both are timed from the first record to the last, as the median of the rounds. Prints one
line.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from chargify_stream.analytics import read_transactions
from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.records import Transaction

PARTITIONS = 3


def write(settings: Settings, count: int) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"bench-{uuid.uuid4().hex}",
            "linger.ms": 20,
        }
    )
    producer.init_transactions(30)
    topic = settings.topic("transactions")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for first in range(0, count, 10_000):
        producer.begin_transaction()
        for n in range(first, min(first + 10_000, count)):
            record = Transaction(
                transaction_id=n + 1,
                kind="payment",
                amount_cents=100 + n % 5000,
                currency="USD",
                customer_reference=f"cust-{n % 1000}",
                subscription_id=10_000 + n % 3000,
                occurred_at=start + timedelta(seconds=n),
                webhook_id=1_000_000 + n,
                event_id=2_000_000 + n,
                event="payment_success",
                site_id=1,
                site_subdomain="acme",
            )
            producer.produce(topic, key=record.customer_reference.encode(), value=encode(record))
            producer.poll(0)
        producer.commit_transaction(60)


def reader_round(settings: Settings, count: int) -> float:
    seen = 0
    started = 0.0
    for _ in read_transactions(settings, from_beginning=True):
        if seen == 0:
            started = time.perf_counter()
        seen += 1
    elapsed = time.perf_counter() - started
    assert seen == count, (seen, count)
    return (count - 1) / elapsed


def bare_round(settings: Settings, count: int) -> float:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    topic = settings.topic("transactions")
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen, ended, started = 0, 0, 0.0
    try:
        while ended < PARTITIONS:
            for msg in consumer.consume(500, 1.0):
                err = msg.error()
                if err is not None:
                    ended += err.code() == KafkaError._PARTITION_EOF
                    continue
                if seen == 0:
                    started = time.perf_counter()
                seen += len(msg.value() or b"") > 0
    finally:
        consumer.close()
    elapsed = time.perf_counter() - started
    assert seen == count, (seen, count)
    return (count - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kafka = LocalKafka()
    kafka.start()
    try:
        settings = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            kafka_topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
        )
        ensure_topics(
            settings.kafka_bootstrap_servers,
            [settings.topic("transactions")],
            partitions=PARTITIONS,
        )
        write(settings, args.records)
        reader, bare = [], []
        for _ in range(args.rounds):
            reader.append(reader_round(settings, args.records))
            bare.append(bare_round(settings, args.records))
    finally:
        kafka.stop()
        kafka.cleanup()
    r, b = statistics.median(reader), statistics.median(bare)
    print(
        f"analytics reader: {r:,.0f} transactions/s ({args.records:,} records, median of "
        f"{args.rounds}: {min(reader):,.0f}-{max(reader):,.0f}); bare consumer {b:,.0f}/s; "
        f"{r / b:.2f}x"
    )


if __name__ == "__main__":
    main()
