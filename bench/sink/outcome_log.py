"""What the outcome log adds to one sink batch: write_batch with and without it, alternating.

    .venv/bin/python bench/sink/outcome_log.py [--batches 30] [--batch 1000]

A local Postgres (the tests' launcher, a temporary folder), a migrated database with one
partner and 100 customers, then ``--batches`` rounds of two batches of distinct payments
(``--batch`` each): one written by ``sink.upsert.write_batch`` with the records' sources
(the outcome log: a delivery and an outcome row per record, in the same transaction), one
without. Alternating keeps the machine's load the same for both. Prints one line: the
median time per batch of each, the first five rounds left out (prepared statements,
caches).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from chargify_stream.schemas.records import Transaction  # noqa: E402
from chargify_stream.sink.migrate import migrate  # noqa: E402
from chargify_stream.sink.outcomes import Source  # noqa: E402
from chargify_stream.sink.upsert import write_batch  # noqa: E402
from tests.services import start_postgres  # noqa: E402

CUSTOMERS = 100
WARM_UP = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    postgres = start_postgres()
    try:
        dsn = postgres.create_database(f"bench_{uuid.uuid4().hex[:8]}")
        migrate(dsn)
        with psycopg.connect(dsn) as conn:
            with conn.transaction():
                conn.execute("insert into partners (partner_key, name) values ('p', 'p')")
                for i in range(CUSTOMERS):
                    conn.execute(
                        "insert into customers (customer_key, partner_key, email, name)"
                        " values (%s, 'p', '', '')",
                        (f"c{i}",),
                    )
            ids = itertools.count(10**12)
            now = datetime.now(UTC)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.batches):
                for logged in (True, False):
                    records, sources = [], []
                    for j in range(args.batch):
                        n = next(ids)
                        records.append(
                            Transaction(
                                transaction_id=n,
                                kind="payment",
                                amount_cents=6400,
                                currency="USD",
                                customer_reference=f"c{j % CUSTOMERS}",
                                subscription_id=j,
                                occurred_at=now,
                                webhook_id=n,
                                event="payment_success",
                            )
                        )
                        sources.append(
                            Source("chargify.transactions", j % 3, n, 0, now,
                                   ("chargify.webhooks.raw", j % 3, n))
                        )  # fmt: skip
                    started = time.perf_counter()
                    write_batch(conn, records, sources if logged else None)
                    times[logged].append(time.perf_counter() - started)
        with_log = statistics.median(times[True][WARM_UP:]) * 1000
        without = statistics.median(times[False][WARM_UP:]) * 1000
        print(
            f"sink batch of {args.batch} payments: {without:.1f} ms without the outcome log,"
            f" {with_log:.1f} ms with it (+{(with_log - without) / args.batch * 1000:.0f} us a"
            f" record, x{with_log / without:.2f}); median of {args.batches - WARM_UP} alternating"
            " rounds"
        )
    finally:
        postgres.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
