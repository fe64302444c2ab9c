"""Which way to write a batch: the measurement behind sink/upsert.py's write path.

Writes the same workload (bench/sink/workload.py), in the sink's batches, through each
candidate, database only (no Kafka, no decoding), one database transaction per batch as
the sink does. The candidates are interleaved over several rounds on a fresh table each
time, and each is reported as the median of its rounds, relative to the production path
measured in the same run (the machine is shared, so only ratios travel).

Transactions: ``executemany`` (psycopg runs it in pipeline mode), ``unnest`` of text
arrays, ``unnest`` of binary arrays (production), binary COPY into a temporary staging
table then ``INSERT ... SELECT ... ON CONFLICT``.

Subscriptions: the former per-row path (``SELECT ... FOR UPDATE`` then ``INSERT`` or
``UPDATE``, components merged in Python), and the set-based fold (one row per
subscription) written by ``unnest`` of text arrays, ``unnest`` of binary arrays
(production) or binary COPY into a staging table.

    .venv/bin/python bench/sink/write_paths.py [--records 40000] [--batch 500] [--rounds 3]

Starts its own Postgres (Debian's binaries, temporary folder) unless ``--dsn`` is given;
the database named there is migrated and its sink tables are truncated. Prints one line
and writes the measurements to ``bench/results/sink-write-paths-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import empty_sink_tables, make_workload, seed

from chargify_stream.schemas.records import SubscriptionChange, Transaction
from chargify_stream.sink import upsert
from chargify_stream.sink.migrate import migrate

Cursor = psycopg.Cursor[Any]
RESULTS = Path(__file__).resolve().parent.parent / "results"

# -- transactions -----------------------------------------------------------------------------

_TX_COLUMNS = ", ".join(c for c, _ in upsert.TRANSACTION_COLUMNS)


def tx_executemany(cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
    cur.executemany(
        f"insert into transactions ({_TX_COLUMNS})"
        f" values ({', '.join(['%s'] * len(upsert.TRANSACTION_COLUMNS))})"
        " on conflict (transaction_id) do nothing",
        rows,
    )


def tx_unnest_text(cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
    cur.execute(upsert.INSERT_TRANSACTIONS.replace("%b::", "%s::"), upsert.columns(rows))


def tx_unnest_binary(cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
    cur.execute(upsert.INSERT_TRANSACTIONS, upsert.columns(rows))


_staged: dict[int, set[str]] = {}  # connection -> staging tables made in its session


def _copy_to_staging(
    cur: Cursor, table: str, cols: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]
) -> None:
    """Binary COPY into a temporary table emptied at each commit (made once per session)."""
    made = _staged.setdefault(id(cur.connection), set())
    if table not in made:
        cur.execute(
            f"create temp table {table} ("
            + ", ".join(f"{c} {t}" for c, t in cols)
            + ") on commit delete rows"
        )
        made.add(table)
    names = ", ".join(c for c, _ in cols)
    with cur.copy(f"copy {table} ({names}) from stdin (format binary)") as copy:
        copy.set_types([t for _, t in cols])
        for row in rows:
            copy.write_row(row)


def tx_copy_staging(cur: Cursor, rows: list[tuple[Any, ...]]) -> None:
    _copy_to_staging(cur, "stage_transactions", upsert.TRANSACTION_COLUMNS, rows)
    cur.execute(upsert.insert_transactions_sql("stage_transactions"))


# -- subscriptions ----------------------------------------------------------------------------


def _folded(changes: list[SubscriptionChange]) -> list[tuple[Any, ...]]:
    return [upsert.subscription_row(s) for s in upsert.fold_subscriptions(changes)]


def sub_unnest_text(cur: Cursor, changes: list[SubscriptionChange]) -> None:
    rows = _folded(changes)
    cur.execute("select pg_advisory_xact_lock_shared(%s)", (upsert.PLAN_LINK_LOCK,))
    cur.execute(upsert.UPSERT_SUBSCRIPTIONS.replace("%b::", "%s::"), upsert.columns(rows))


def sub_unnest_binary(cur: Cursor, changes: list[SubscriptionChange]) -> None:
    rows = _folded(changes)
    cur.execute("select pg_advisory_xact_lock_shared(%s)", (upsert.PLAN_LINK_LOCK,))
    cur.execute(upsert.UPSERT_SUBSCRIPTIONS, upsert.columns(rows))


def sub_copy_staging(cur: Cursor, changes: list[SubscriptionChange]) -> None:
    _copy_to_staging(cur, "stage_subscriptions", upsert.SUBSCRIPTION_COLUMNS, _folded(changes))
    cur.execute("select pg_advisory_xact_lock_shared(%s)", (upsert.PLAN_LINK_LOCK,))
    cur.execute(upsert.upsert_subscriptions_sql("stage_subscriptions as s"))


def sub_per_row(cur: Cursor, changes: list[SubscriptionChange]) -> None:
    """The sink's former path: one locked read and one write per change."""
    for s in changes:
        row = cur.execute(
            "select last_event_at, last_webhook_id, components, component_versions"
            " from subscriptions where subscription_id = %s for update",
            (s.subscription_id,),
        ).fetchone()
        if row is None:
            components: dict[str, Any] = {}
            versions: dict[str, Any] = {}
            newer = True
        else:
            components, versions = dict(row[2]), dict(row[3])
            newer = (s.occurred_at, s.webhook_id) > (row[0], row[1])
        stamp = [upsert.version_of(s.occurred_at), s.webhook_id]
        changed = False
        for c in s.components:
            cid = str(c.component_id)
            if cid not in versions or stamp > versions[cid]:
                components[cid] = upsert.quantity(c.new_allocation)
                versions[cid] = stamp
                changed = True
        if row is None:
            cur.execute(
                "insert into subscriptions (subscription_id, customer_key, product_id,"
                " product_handle, plan_key, state, components, component_versions,"
                " last_webhook_id, last_event_at) values (%s, %s, %s, %s,"
                " (select plan_key from plans where plan_key = %s::text), %s, %s, %s, %s, %s)",
                (s.subscription_id, s.customer_reference, s.product_id, s.product_handle,
                 s.product_id, s.state, json.dumps(components), json.dumps(versions),
                 s.webhook_id, s.occurred_at),
            )  # fmt: skip
        elif newer:
            cur.execute(
                "update subscriptions set customer_key = %s,"
                " product_id = coalesce(%s, product_id),"
                " product_handle = coalesce(%s, product_handle),"
                " plan_key = (select plan_key from plans where plan_key ="
                "   coalesce(%s::bigint, product_id)::text),"
                " state = coalesce(%s, state), components = %s, component_versions = %s,"
                " last_webhook_id = %s, last_event_at = %s, updated_at = now()"
                " where subscription_id = %s",
                (s.customer_reference, s.product_id, s.product_handle, s.product_id, s.state,
                 json.dumps(components), json.dumps(versions), s.webhook_id, s.occurred_at,
                 s.subscription_id),
            )  # fmt: skip
        elif changed:
            cur.execute(
                "update subscriptions set components = %s, component_versions = %s,"
                " updated_at = now() where subscription_id = %s",
                (json.dumps(components), json.dumps(versions), s.subscription_id),
            )


# -- harness ----------------------------------------------------------------------------------

TX_PATHS: dict[str, Callable[[Cursor, list[tuple[Any, ...]]], None]] = {
    "executemany (pipeline)": tx_executemany,
    "unnest, text arrays": tx_unnest_text,
    "unnest, binary arrays": tx_unnest_binary,
    "COPY to staging, INSERT": tx_copy_staging,
}
SUB_PATHS: dict[str, Callable[[Cursor, list[SubscriptionChange]], None]] = {
    "per row, SELECT FOR UPDATE": sub_per_row,
    "fold, unnest text arrays": sub_unnest_text,
    "fold, unnest binary arrays": sub_unnest_binary,
    "fold, COPY to staging": sub_copy_staging,
}
PRODUCTION = {
    "transactions": "unnest, binary arrays",
    "subscriptions": "fold, unnest binary arrays",
}


def run_path(dsn: str, batches: Sequence[Sequence[Any]], table: str, name: str) -> float:
    """Seconds to write every batch through one candidate, from empty tables."""
    empty_sink_tables(dsn)
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        for batch in batches:
            with conn.transaction(), conn.cursor() as cur:
                cur.adapters.register_dumper(int, Int8BinaryDumper)
                cur.adapters.register_dumper(int, Int8Dumper)  # text arrays: int8[] too
                partners = upsert.lookup_customers(cur, (r.customer_reference for r in batch))
                if table == "transactions":
                    rows = [
                        upsert.transaction_row(t, partners[t.customer_reference]) for t in batch
                    ]
                    TX_PATHS[name](cur, rows)
                else:
                    SUB_PATHS[name](cur, list(batch))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", help="an existing database (default: start a local Postgres)")
    args = parser.parse_args()

    postgres = None
    dsn = args.dsn
    if dsn is None:
        from chargify_stream.local.postgres import LocalPostgres

        postgres = LocalPostgres(settings={"fsync": "off", "full_page_writes": "off"})
        postgres.start()
        dsn = postgres.create_database(f"bench_{uuid.uuid4().hex[:8]}")
    try:
        migrate(dsn)
        work = make_workload(args.records)
        with psycopg.connect(dsn) as conn:
            seed(conn, work)
        by_table: dict[str, list[Any]] = {
            "transactions": [r for r in work.records if isinstance(r, Transaction)],
            "subscriptions": [r for r in work.records if isinstance(r, SubscriptionChange)],
        }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for table, paths in (("transactions", TX_PATHS), ("subscriptions", SUB_PATHS)):
                records = by_table[table]
                batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
                for name in paths:
                    seconds = run_path(dsn, batches, table, name)
                    results.setdefault((table, name), []).append(len(records) / seconds)
        parts = []
        for table in ("transactions", "subscriptions"):
            base = statistics.median(results[(table, PRODUCTION[table])])
            for (t, name), rates in results.items():
                if t == table:
                    rate = statistics.median(rates)
                    parts.append(f"{table} {name}: {rate:,.0f} rows/s ({rate / base:.2f}x)")
        print(
            f"write paths, {args.records} records, batch {args.batch}, median of {args.rounds}: "
            + "; ".join(parts)
        )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"sink-write-paths-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(
            json.dumps(
                {
                    "records": args.records,
                    "batch": args.batch,
                    "rows_per_s": {f"{t}: {n}": rates for (t, n), rates in results.items()},
                    "load_average": os.getloadavg(),
                },
                indent=2,
            )
        )
    finally:
        if postgres is not None:
            postgres.cleanup()


if __name__ == "__main__":
    main()
