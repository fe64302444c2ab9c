"""How fast ``reconcile`` reads what the pipeline received: the raw topic, by webhook id.

Starts a local Kafka broker (the tests' launcher), writes N raw records of a real-sized
payment body (3 partitions, lz4, one ``chargify-webhook-id`` each), then times
``RawTopicReader.read`` from an hour ago, as one ``reconcile`` pass does. Prints one line.

    .venv/bin/python bench/reconcile/raw_read.py --records 200000
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from confluent_kafka import Producer

from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.settings import load_settings
from chargify_stream.received import RawTopicReader
from tests.builders import build_body
from tests.services import start_kafka


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    kafka = start_kafka()
    try:
        settings = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers, kafka_topic_prefix="bench."
        )
        ensure_pipeline_topics(settings, partitions=3)
        producer = Producer(
            {
                "bootstrap.servers": kafka.bootstrap_servers,
                "linger.ms": 50,
                "compression.type": "lz4",
            }
        )
        body = build_body("payment_success", webhook_id=1)
        for i in range(args.records):
            webhook_id = str(5_000_000_000 + i).encode()
            producer.produce(
                settings.topic("raw"), body, key=str(i % 1000),
                headers=[("chargify-webhook-id", webhook_id)],
            )  # fmt: skip
            if i % 10_000 == 0:
                producer.poll(0)
        producer.flush()
        started = time.monotonic()
        with RawTopicReader(settings) as reader:
            ids = reader.read(datetime.now(UTC) - timedelta(hours=1))
        seconds = time.monotonic() - started
        assert len(ids) == args.records, len(ids)
        print(
            f"raw_read records={args.records} body_bytes={len(body)} seconds={seconds:.2f} "
            f"records_per_s={args.records / seconds:,.0f}"
        )
    finally:
        kafka.close()


if __name__ == "__main__":
    main()
