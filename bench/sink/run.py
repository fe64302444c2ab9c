"""Benchmark the sink: rows/s from pre-loaded topics, against plain COPY in the same run.

    .venv/bin/python bench/sink/run.py [--records 100000] [--batch 1000] [--rounds 3]

Starts a local Kafka broker and Postgres (the tests' launchers, temporary folders), makes
a migrated database with the workload's partners, customers and plans
(``bench/sink/workload.py``: 60 % payments and refunds, 40 % subscription changes, some
out of order), and writes the records to 3-partition input topics as the processor does
(Avro values keyed by customer reference, with the carried-over headers). Then, in
alternating rounds, each from empty tables:

- **sink**: the ``Sink`` that ``chargify-stream sink`` runs (``build_sink``, same
  settings, a fresh consumer group reading from the start), timed from the start of its
  first batch to the end of its last (written in Postgres, dead letters acknowledged),
  so process start and group join are left out;
- **plain COPY**: the same rows, already decoded and in memory, in one binary COPY per
  table in one transaction: every transaction row, and one row per subscription (its
  final state: COPY cannot apply a change to a row). This is the ceiling.

Both are reported in rows/s of the *records* they stand for (so the ratio is the ratio of
the times), as the median of the rounds. The sink's result is checked against the
workload (every transaction once; each subscription in its newest state). Prints one line
and writes the measurements to ``bench/results/sink-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Message, Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import Workload, empty_sink_tables, make_workload, seed

from chargify_stream.base.delivery import publish_and_wait
from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from chargify_stream.sink import upsert
from chargify_stream.sink.consumer import Prepared, build_sink
from chargify_stream.sink.migrate import migrate

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
PARTITIONS = 3


def preload(settings: Settings, work: Workload) -> None:
    """Write every record to its input topic and wait for the acks."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "linger.ms": 50,
            "acks": "all",
            "enable.idempotence": True,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    errors: list[str] = []
    for topic, kind in (("transactions", Transaction), ("subscriptions", SubscriptionChange)):
        records = [
            (
                r.customer_reference.encode(),
                encode(r),
                [
                    (h.WEBHOOK_ID, str(r.webhook_id).encode()),
                    (h.EVENT, r.event.encode()),
                    (h.RECEIVED_AT, b"2024-10-11T19:28:32.000Z"),
                ],
            )
            for r in work.records
            if isinstance(r, kind)
        ]
        errors += publish_and_wait(producer, settings.topic(topic), records)
    if errors:
        raise SystemExit(f"the broker did not acknowledge every benchmark record: {errors[:3]}")


def copy_rows(work: Workload) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows plain COPY writes: one per transaction, one per subscription (folded)."""
    partners = dict(work.customers)
    txns = [
        upsert.transaction_row(r, partners[r.customer_reference])
        for r in work.records
        if isinstance(r, Transaction)
    ]
    changes = [r for r in work.records if isinstance(r, SubscriptionChange)]
    subs = [upsert.subscription_row(s) for s in upsert.fold_subscriptions(changes)]
    return txns, subs


def run_copy(dsn: str, txns: list[tuple[Any, ...]], subs: list[tuple[Any, ...]]) -> float:
    """Seconds for one binary COPY per table, in one transaction."""
    empty_sink_tables(dsn)
    tx_cols = upsert.TRANSACTION_COLUMNS
    sub_cols = [
        ({"webhook_id": "last_webhook_id", "occurred_at": "last_event_at"}.get(c, c), t)
        for c, t in upsert.SUBSCRIPTION_COLUMNS
    ]
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for table, cols, rows in (
                ("transactions", tx_cols, txns),
                ("subscriptions", sub_cols, subs),
            ):
                names = ", ".join(c for c, _ in cols)
                with cur.copy(f"copy {table} ({names}) from stdin (format binary)") as copy:
                    copy.set_types([t for _, t in cols])
                    for row in rows:
                        copy.write_row(row)
        return time.perf_counter() - started


def run_sink(settings: Settings, work: Workload) -> float:
    """Seconds from the start of the sink's first batch to the end of its last."""
    empty_sink_tables(settings.database_dsn())
    fresh = settings.model_copy(update={"sink_group_id": f"bench-sink-{uuid.uuid4().hex[:8]}"})
    sink = build_sink(fresh)
    done = 0
    first: float | None = None
    last = 0.0
    prepare, store = sink.prepare, sink.store
    lock = threading.Lock()  # store() runs in the sink's writer threads

    def timed_prepare(msgs: Sequence[Message]) -> Prepared:
        nonlocal first
        if first is None:
            first = time.perf_counter()
        return prepare(msgs)

    def timed_store(prepared: Prepared) -> None:
        nonlocal done, last
        store(prepared)
        with lock:
            last = time.perf_counter()
            done += len(prepared.msgs)
            if done >= len(work.records):
                sink.stop()

    sink.prepare = timed_prepare  # type: ignore[method-assign]
    sink.store = timed_store  # type: ignore[method-assign]
    sink.run()
    assert first is not None and done == len(work.records), (done, len(work.records))
    return last - first


def check(dsn: str, work: Workload) -> None:
    """The sink's tables hold the workload: every transaction once, subscriptions newest."""
    changes = [r for r in work.records if isinstance(r, SubscriptionChange)]
    expected = {
        s.subscription_id: (s.state, s.product_id, s.product_handle, s.components)
        for s in upsert.fold_subscriptions(changes)
    }
    with psycopg.connect(dsn) as conn:
        [(count, distinct)] = conn.execute(
            "select count(*), count(distinct transaction_id) from transactions"
        ).fetchall()
        stored = {
            row[0]: row[1:]
            for row in conn.execute(
                "select subscription_id, state, product_id, product_handle, components"
                " from subscriptions"
            )
        }
    assert count == distinct == work.transactions, (count, distinct, work.transactions)
    assert stored == expected, "subscriptions differ from the workload's newest state"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="SINK_BATCH_SIZE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from chargify_stream.local.kafka import LocalKafka
    from chargify_stream.local.postgres import LocalPostgres

    kafka = LocalKafka()
    postgres = LocalPostgres(settings={"fsync": "off", "full_page_writes": "off"})
    try:
        kafka.start()
        postgres.start()
        dsn = postgres.create_database("bench")
        tag = uuid.uuid4().hex[:8]
        settings = load_settings(
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            database_url=dsn,
            kafka_topic_prefix=f"bench{tag}.",
            topic_partitions=PARTITIONS,
            sink_batch_size=args.batch,
            sink_metrics_port=0,
        )
        ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, partitions=PARTITIONS)
        migrate(dsn)
        work = make_workload(args.records)
        with psycopg.connect(dsn) as conn:
            seed(conn, work)
        preload(settings, work)
        txns, subs = copy_rows(work)

        sink_s: list[float] = []
        copy_s: list[float] = []
        for _ in range(args.rounds):
            copy_s.append(run_copy(dsn, txns, subs))
            sink_s.append(run_sink(settings, work))
            check(dsn, work)
        n = len(work.records)
        sink_rate = n / statistics.median(sink_s)
        copy_rate = n / statistics.median(copy_s)
        load = os.getloadavg()[0]
        print(
            f"sink: {n:,} records ({work.transactions:,} transactions,"
            f" {work.changes:,} subscription changes) at {sink_rate:,.0f} rows/s;"
            f" plain COPY of the same rows ({len(txns):,} + {len(subs):,} folded) at"
            f" {copy_rate:,.0f} rows/s; sink/COPY {sink_rate / copy_rate:.2f}"
            f" (batch {args.batch}, {PARTITIONS} partitions, median of {args.rounds},"
            f" load {load:.1f}, {os.cpu_count()} cpus)"
        )
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"sink-{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(
            json.dumps(
                {
                    "records": n,
                    "transactions": work.transactions,
                    "subscription_changes": work.changes,
                    "folded_subscriptions": len(subs),
                    "batch": args.batch,
                    "partitions": PARTITIONS,
                    "sink_seconds": sink_s,
                    "copy_seconds": copy_s,
                    "sink_rows_per_s": sink_rate,
                    "copy_rows_per_s": copy_rate,
                    "load_average": os.getloadavg(),
                },
                indent=2,
            )
        )
    finally:
        postgres.cleanup()
        kafka.cleanup()


if __name__ == "__main__":
    main()
