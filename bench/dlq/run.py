"""Benchmark the dead-letter tools: peak memory and time of ``dlq stats`` and ``dlq list``.

    .venv/bin/python bench/dlq/run.py [--records 100000] [--size 8000] [--partitions 3]

Starts a local Kafka broker (the tests' launcher, a temporary folder), writes ``--records``
sink dead letters of ``--size`` bytes of value each (one webhook each, with the ``dlq-*``
headers the sink writes) to a dead-letter topic, then runs ``chargify-stream dlq stats``
and ``chargify-stream dlq list --json`` as subprocesses, one after the other. For each it
reports the wall time and the peak resident memory of the command's process (``ru_maxrss``
of the waited-for child, from ``os.wait4``). ``DATABASE_URL`` points at a closed port, so
the resolved-events lookup fails at once (a note on stderr) and only the scan is measured.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from confluent_kafka import Producer

from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.local.ports import free_port
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import dead_letter_headers


def fill(settings: Settings, count: int, size: int) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "none",
            "queue.buffering.max.kbytes": 512 * 1024,
        }
    )
    topic = settings.topic("deadletter")
    start = datetime(2026, 12, 1, tzinfo=UTC)
    value = os.urandom(size)
    for n in range(count):
        original = [
            (h.WEBHOOK_ID, str(1_000_000 + n).encode()),
            (h.EVENT, b"payment_success"),
            ("received-at", b"2026-12-01T00:00:00.000Z"),
        ]
        headers = dead_letter_headers(
            reason=h.CUSTOMER_NOT_FOUND,
            stage=h.STAGE_SINK,
            error="no customer with this customer_key",
            source_topic=settings.topic("transactions"),
            source_partition=n % 3,
            source_offset=n,
            original_headers=original,
            failed_at=start + timedelta(seconds=n),
        )
        while True:
            try:
                producer.produce(
                    topic, key=f"cust-{n % 5000}".encode(), value=value, headers=headers
                )
                break
            except BufferError:
                producer.poll(0.5)
        producer.poll(0)
    assert producer.flush(120) == 0


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Seconds, peak RSS in MB and bytes of stdout of one ``chargify-stream`` command."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chargify_stream", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=sink,
        )
        assert proc.stdout is not None
        out = 0
        while chunk := proc.stdout.read(1 << 16):
            out += len(chunk)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}")
    return elapsed, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    kafka = LocalKafka()
    kafka.start()
    try:
        prefix = f"bench{uuid.uuid4().hex[:8]}."
        settings = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers, kafka_topic_prefix=prefix
        )
        ensure_pipeline_topics(
            settings, [settings.topic("deadletter")], partitions=args.partitions, timeout=30
        )
        started = time.perf_counter()
        fill(settings, args.records, args.size)
        print(
            f"wrote {args.records:,} dead letters of {args.size:,} B in "
            f"{time.perf_counter() - started:.1f}s",
            file=sys.stderr,
        )
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "KAFKA_TOPIC_PREFIX": prefix,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/none",
        }
        for command in (["dlq", "stats"], ["dlq", "list", "--json"]):
            seconds, rss, out = measure([*command, "--timeout", "30"], env)
            print(
                f"chargify-stream {' '.join(command)}: {seconds:.1f}s, peak RSS {rss:,.0f} MB "
                f"({args.records:,} dead letters of {args.size:,} B; {out:,} B of output)"
            )
    finally:
        kafka.stop()
        kafka.cleanup()


if __name__ == "__main__":
    main()
