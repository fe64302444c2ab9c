"""Benchmark the processor's state with a full dedup window: restore, lookups, expiry, memory.

    .venv/bin/python bench/processor/state.py [--keys 10000000] [--partitions 3]

Starts a local Kafka broker and fills the dedup changelog as a worker would have written
it over the default 7-day window: ``--keys`` dedup keys (webhook, event and transaction
ids, packed as the worker packs them), in records of 1,000 keys (one per raw partition
and batch) with times spread over the window, and 100,000 subscription references.
Then, in this process:

- **cold restore**: a worker with no local copy (a partition it never owned) restores
  every partition from the changelogs: seconds until it could process new records;
- **warm restart**: the same worker restarted (its local copy is up to date, 1,000 new
  changelog records arrived meanwhile): seconds until it could process new records;
- **lookups**: 200 batches of 3,000 keys (a batch of 1,000 webhooks), a third of them
  present: median and worst milliseconds per batch;
- **expiry**: the clock moves on a bucket and the oldest bucket is deleted: milliseconds
  the pass blocks the loop;
- the process's peak RSS (``ru_maxrss``) after all of it.

Prints one line and writes ``bench/results/state-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer

from chargify_stream.base.settings import load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.processors.clients import ensure_changelogs, restorer_config
from chargify_stream.processors.restore import restore
from chargify_stream.processors.state import Store, dedup_record

RESULTS = Path(__file__).resolve().parent.parent / "results"
KEYS_PER_RECORD = 1000
REFERENCES = 100_000


def fill(bootstrap: str, dedup: str, references: str, keys: int, partitions: int, window: int):
    """Write the changelogs; return the keys written, for the lookups."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "compression.type": "lz4",
            "queue.buffering.max.kbytes": 1_000_000,
        }
    )
    now = time.time()
    records = keys // KEYS_PER_RECORD
    sample: list[int] = []
    for n in range(records):
        partition = n % partitions
        at = now - window * (1 - n / records) + 60  # oldest first, all inside the window
        base = 4_000_000_000 + n * 400
        batch = []
        for i in range(KEYS_PER_RECORD // 3 + 1):
            batch += [4 * (base + i) + 1, 4 * (base + i) + 2, 4 * (base + i) + 3]
        batch = batch[:KEYS_PER_RECORD]
        if n % 97 == 0:
            sample += batch[:50]
        while True:
            try:
                producer.produce(
                    dedup, key=str(n).encode(), value=dedup_record(at, batch), partition=partition
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    for i in range(REFERENCES):
        producer.produce(
            references,
            key=str(5_000_000 + i).encode(),
            value=f"cust-{i}".encode(),
            partition=i % partitions,
        )
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(300) == 0
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    kafka = LocalKafka()
    kafka.start()
    result: dict[str, object] = {"keys": args.keys, "partitions": args.partitions}
    try:
        settings = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers, processor_app_id="bench-state"
        )
        window = settings.processor_dedup_window_s
        changelogs = ensure_changelogs(settings, args.partitions)
        started = time.perf_counter()
        sample = fill(
            settings.kafka_bootstrap_servers,
            changelogs.dedup,
            changelogs.references,
            args.keys,
            args.partitions,
            window,
        )
        result["fill_seconds"] = time.perf_counter() - started
        print(f"  filled in {result['fill_seconds']:.0f}s", file=sys.stderr)

        def make_restorer() -> Consumer:
            return Consumer(restorer_config(settings))

        partitions = list(range(args.partitions))
        with tempfile.TemporaryDirectory(prefix="bench-state-") as folder:
            store = Store(Path(folder), window)
            started = time.perf_counter()
            records = restore(make_restorer, store, changelogs, partitions)
            result["cold_restore_seconds"] = time.perf_counter() - started
            result["cold_restore_records"] = records
            result["keys_stored"] = store.added
            print(f"  cold restore {result['cold_restore_seconds']:.1f}s", file=sys.stderr)

            probes = sample + [4 * (9_000_000_000 + i) + 1 for i in range(2000)]
            timings = []
            for _ in range(200):
                batch = set(random.choices(probes, k=3000))
                started = time.perf_counter()
                found = store.seen(batch)
                timings.append(time.perf_counter() - started)
            assert found, "the sampled keys are in the store"
            result["lookup_ms_median"] = 1000 * statistics.median(timings)
            result["lookup_ms_max"] = 1000 * max(timings)

            store.close()
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
            for n in range(1000):
                producer.produce(
                    changelogs.dedup,
                    key=b"tail",
                    value=dedup_record(time.time(), [4 * (8_000_000_000 + n) + 1]),
                    partition=n % args.partitions,
                )
            assert producer.flush(60) == 0
            store = Store(Path(folder), window)
            started = time.perf_counter()
            result["warm_restore_records"] = restore(make_restorer, store, changelogs, partitions)
            result["warm_restore_seconds"] = time.perf_counter() - started

            clock_at = time.time() + store.bucket_s + 120
            store.clock = lambda: clock_at
            started = time.perf_counter()
            result["expired_buckets"] = store.expire()
            result["expiry_ms"] = 1000 * (time.perf_counter() - started)
            store.close()
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        kafka.cleanup()
    result["load_average"] = list(os.getloadavg())
    out = RESULTS / f"state-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"state with {args.keys:,} dedup keys: cold restore "
        f"{result['cold_restore_seconds']:.1f} s, "
        f"warm restart {result['warm_restore_seconds']:.2f} s "
        f"({result['warm_restore_records']} tail records), lookup of 3,000 keys "
        f"{result['lookup_ms_median']:.1f} ms (worst {result['lookup_ms_max']:.1f}), expiry of "
        f"{result['expired_buckets']} bucket {result['expiry_ms']:.1f} ms, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB (load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
