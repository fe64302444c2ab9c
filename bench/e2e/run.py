"""End-to-end benchmark: signed webhooks through gateway, processor and sink into Postgres.

    .venv/bin/python bench/e2e/run.py [--rate 2000] [--rate 3000] [--seconds 20]

Everything on this one machine, broker and database included: a local Kafka broker and a
local Postgres (the tests' launchers, temporary folders; Postgres with its durable
defaults plus ``track_commit_timestamp=on``), 3-partition topics, a migrated database
with one partner and 100 customers, and the three stages as ``python -m chargify_stream
gateway|processor|sink`` processes configured by environment, as an operator runs them.
The bodies are real-shape signed Chargify bodies (``workload.py``: 90 % payments, 10 %
signups, every one a distinct webhook), sent by wrk with ``bench/gateway/post.lua``.

**Sustained** (once per ``--rate``): wrk sends at a fixed rate (a wrk2-style schedule)
for ``--seconds``; then the run waits until Postgres holds a row for every accepted
webhook. It reports the accepted count, the end-to-end throughput (rows / time from the
gateway's receipt of the first webhook to the last row's commit: wrk's own start-up,
which took 0.3-1.3 s on a loaded machine, is not the pipeline's), and latency per webhook
from gateway receipt (the
raw record's ``received-at`` header, stamped by the gateway when the request arrived) to
the commit of the database transaction that wrote its row
(``pg_xact_commit_timestamp(xmin)``), split at the processor's output record (its Kafka
timestamp). Also where the CPU went, per process tree.

**Stages against their baselines** (same bodies, same run), each from a backlog so a
stage runs as fast as it can: processor and sink stopped, wrk at saturation loads the
raw topic through the gateway (gateway accepts/s) beside a bare confluent-kafka producer
(acks=all, idempotent, the gateway's linger and compression) writing the same bodies to
a fresh topic; a bare consumer reading that raw backlog beside the processor started on
it (output records/s, from their Kafka timestamps); the sink started on the resulting
backlog (rows/s, from commit timestamps) beside one plain binary COPY of the same rows
into tables of the same shape (columns, indexes, foreign keys).

Prints one line per figure and a summary table, writes everything to
``bench/results/e2e-<time>.json``, and stops every process it started on exit (also on
Ctrl-C). A whole run takes about 3-4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO), str(REPO / "bench" / "gateway")]

import cpu  # noqa: E402
import loadgen  # noqa: E402  # bench/gateway/loadgen.py: wrk
import psycopg  # noqa: E402
import workload as wl  # noqa: E402
from confluent_kafka import Consumer, Message, Producer, TopicPartition  # noqa: E402

from chargify_stream.base.delivery import Record, publish_and_wait  # noqa: E402
from chargify_stream.base.kafka_admin import ensure_topics  # noqa: E402
from chargify_stream.base.settings import Settings, load_settings  # noqa: E402
from chargify_stream.local.kafka import LocalKafka  # noqa: E402
from chargify_stream.local.launch import (  # noqa: E402
    StageProcess,
    http_ok,
    log_tail,
    stage_command,
    wait_ready,
)
from chargify_stream.local.ports import free_port  # noqa: E402
from chargify_stream.local.postgres import LocalPostgres  # noqa: E402
from chargify_stream.schemas import headers as h  # noqa: E402
from chargify_stream.sink.admin import add_customer, add_partner  # noqa: E402
from chargify_stream.sink.migrate import migrate  # noqa: E402

KEY = "bench-e2e-shared-key"
PARTITIONS = 3
RESULTS = REPO / "bench" / "results"
OUTPUT_TOPICS = ("transactions", "subscriptions")
Offsets = dict[tuple[str, int], int]
STALL_S = 15.0  # a stage that writes nothing for this long after it started has stalled


def say(line: str) -> None:
    """One line of progress or results, at once."""
    print(line, flush=True)


# -- processes -------------------------------------------------------------------------


class Stage(StageProcess):
    """One ``python -m chargify_stream <name>`` process with the run's settings."""

    def __init__(self, name: str, settings: Settings, logs: Path) -> None:
        super().__init__(
            name, stage_command(name), logs / f"{name}.log", env=settings.as_env(), cwd=REPO
        )
        self.settings = settings
        self.start()

    def check(self) -> None:
        """Exit the benchmark if the stage died."""
        if not self.running:
            tail = log_tail(self.log_path, 60)
            raise SystemExit(f"{self.name} exited ({self.returncode}); log:\n{tail}")


class Services:
    """Everything the run starts, stopped in reverse order by :meth:`close`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.kafka = LocalKafka(data_dir=work / "kafka")
        self.postgres = LocalPostgres(
            data_dir=work / "postgres", settings={"track_commit_timestamp": "on"}
        )
        self.stages: dict[str, Stage] = {}
        self.settings: Settings | None = None
        self.shortfall = False  # some rows never arrived: keep the logs

    def start(self) -> Settings:
        """Broker, database, topics, schema, customers; returns the stages' settings."""
        self.kafka.start()
        self.postgres.start()
        dsn = self.postgres.create_database("chargify")
        settings = load_settings(
            kafka_bootstrap_servers=self.kafka.bootstrap_servers,
            database_url=dsn,
            chargify_shared_keys=KEY,
            topic_partitions=PARTITIONS,
            processor_data_dir=str(self.work / "processor"),
            gateway_port=free_port(),
        )
        ensure_topics(settings.kafka_bootstrap_servers, settings.all_topics, partitions=PARTITIONS)
        migrate(dsn)
        with psycopg.connect(dsn) as conn:
            add_partner(conn, wl.PARTNER, "End-to-end benchmark partner")
            for key in wl.CUSTOMERS:
                add_customer(conn, key, partner=wl.PARTNER, email=f"{key}@example.com")
        self.settings = settings
        return settings

    def start_stage(self, name: str) -> Stage:
        """Start (or restart) a stage, with fresh HTTP ports (no clash with a late exit)."""
        assert self.settings is not None
        settings = self.settings.model_copy(
            update={"processor_web_port": free_port(), "sink_metrics_port": free_port()}
        )
        stage = self.stages[name] = Stage(name, settings, self.logs)
        return stage

    def stop_stage(self, name: str) -> None:
        self.stages[name].stop(30)

    def check(self) -> None:
        for stage in self.stages.values():
            code = stage.returncode
            if code is not None and code not in (0, -signal.SIGTERM):
                stage.check()

    def roots(self) -> dict[int, str]:
        """Process ids to label CPU time by (see :mod:`cpu`)."""
        roots = {os.getpid(): "bench script"}
        for name, stage in self.stages.items():
            if stage.running:
                roots[stage.pid] = name
        for name, proc in (("kafka", self.kafka._proc), ("postgres", self.postgres._proc)):
            if proc is not None:
                roots[proc.pid] = name
        return roots

    def close(self) -> None:
        """Stop everything, even after an error or Ctrl-C."""
        for stage in reversed(list(self.stages.values())):
            try:
                stage.stop(timeout=15)
            except Exception as exc:
                print(f"stopping {stage.name}: {exc}", file=sys.stderr)
        for service in (self.postgres, self.kafka):
            try:
                service.stop()
            except Exception as exc:
                print(f"stopping {type(service).__name__}: {exc}", file=sys.stderr)


# -- kafka helpers ---------------------------------------------------------------------


def end_offsets(bootstrap: str, topics: Iterable[str]) -> Offsets:
    """The end offset of every partition of ``topics``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-e2e-offsets"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in topics
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


def read_range(
    bootstrap: str, start: Offsets, end: Offsets, each: Callable[[Message], None]
) -> float:
    """Call ``each`` on every record between ``start`` and ``end``; seconds from first to
    last record read."""
    total = sum(end[tp] - start[tp] for tp in end)
    if total <= 0:
        return 0.0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-e2e-read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    consumer.assign(
        [TopicPartition(t, p, start[t, p]) for (t, p) in end if end[t, p] > start[t, p]]
    )
    read = 0
    first = 0.0
    deadline = time.monotonic() + 300
    try:
        while read < total:
            if time.monotonic() > deadline:
                raise SystemExit(f"read only {read} of {total} records in 300 s")
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                topic, partition = msg.topic() or "", msg.partition() or 0
                if (msg.offset() or 0) >= end[topic, partition]:
                    continue
                if not read:
                    first = time.perf_counter()
                read += 1
                each(msg)
        return time.perf_counter() - first
    finally:
        consumer.close()


def header(msg: Message, name: str) -> bytes | None:
    """The first value of header ``name``."""
    found: Any = msg.headers() or []
    for key, value in found:
        if key == name:
            return value if isinstance(value, bytes) else None
    return None


def received_at(msg: Message) -> float:
    """The gateway's ``received-at`` header, in seconds since the epoch."""
    raw = header(msg, h.RECEIVED_AT)
    assert raw is not None, "raw record without a received-at header"
    return datetime.fromisoformat(raw.decode().replace("Z", "+00:00")).timestamp()


# -- database helpers ------------------------------------------------------------------

ROWS_SQL = """
select webhook_id, extract(epoch from pg_xact_commit_timestamp(xmin))::float8
  from transactions where webhook_id between %(lo)s and %(hi)s
union all
select last_webhook_id, extract(epoch from pg_xact_commit_timestamp(xmin))::float8
  from subscriptions where last_webhook_id between %(lo)s and %(hi)s
"""
COUNT_SQL = """
select (select count(*) from transactions where webhook_id between %(lo)s and %(hi)s)
     + (select count(*) from subscriptions where last_webhook_id between %(lo)s and %(hi)s)
"""


def ids(bodies: range) -> dict[str, int]:
    return {"lo": wl.WEBHOOK_BASE + bodies.start, "hi": wl.WEBHOOK_BASE + bodies.stop - 1}


def db_count(dsn: str, bodies: range) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(COUNT_SQL, ids(bodies)).fetchone()
    return int(row[0]) if row else 0


def db_commits(dsn: str, bodies: range) -> dict[int, float]:
    """Webhook id -> commit time (s since the epoch) of the row it wrote."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {int(w): float(t) for w, t in conn.execute(ROWS_SQL, ids(bodies))}


def wait_rows(services: Services, dsn: str, bodies: range, expected: int, timeout: float) -> int:
    """Poll until Postgres holds ``expected`` rows for ``bodies`` and no more arrive for
    a second; returns the count (fewer, with a warning, after ``timeout`` or when no row
    arrived for ``STALL_S`` seconds)."""
    deadline = time.monotonic() + timeout
    count = last = -1
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        services.check()
        count = db_count(dsn, bodies)
        if count != last:
            last, stable_since = count, time.monotonic()
        elif count >= expected and time.monotonic() - stable_since >= 1.0:
            return count
        elif count > 0 and time.monotonic() - stable_since > STALL_S:
            break
        time.sleep(0.2)
    say(f"warning: only {count} of {expected} rows in Postgres (no more arriving)")
    services.shortfall = True
    return count


# -- statistics ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def spread(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, in milliseconds."""
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000,
    }


def by_second(
    received: dict[int, float],
    emitted: dict[int, float],
    commits: dict[int, float],
    started: float,
) -> list[dict[str, float]]:
    """Per second of receipt since ``started``: webhooks, and the p50/max latency to the
    processor's output and from there to the commit: where in the run a tail came from."""
    seconds: dict[int, list[int]] = {}
    for webhook, at in received.items():
        if webhook in commits and webhook in emitted:
            seconds.setdefault(int(at - started), []).append(webhook)
    out = []
    for second in sorted(seconds):
        webhooks = seconds[second]
        to_output = [emitted[w] - received[w] for w in webhooks]
        to_commit = [commits[w] - emitted[w] for w in webhooks]
        out.append(
            {
                "second": second,
                "webhooks": len(webhooks),
                "to_output_p50_ms": percentile(to_output, 50) * 1000,
                "to_output_max_ms": max(to_output) * 1000,
                "to_commit_p50_ms": percentile(to_commit, 50) * 1000,
                "to_commit_max_ms": max(to_commit) * 1000,
            }
        )
    return out


def rate_from_stamps(stamps: list[float]) -> float:
    """Items/s from per-item completion times: the items after the first completion
    moment, over the time from it to the last (the first batch's own work is unseen)."""
    if len(stamps) < 2:
        return float("nan")
    first, last = min(stamps), max(stamps)
    after_first = sum(1 for s in stamps if s > first)
    return after_first / (last - first) if last > first else float("nan")


# -- phases ----------------------------------------------------------------------------


def sustained(
    args: argparse.Namespace,
    services: Services,
    settings: Settings,
    wrk_bin: str,
    rate: int,
    bodies: range,
) -> dict[str, Any]:
    """wrk at ``rate``/s for ``args.seconds``; wait for every row; latency per webhook."""
    work, dsn, bootstrap = services.work, settings.database_dsn(), settings.kafka_bootstrap_servers
    path = work / f"rate-{rate}.txt"
    wl.write_bodies(path, bodies.start, len(bodies), KEY)
    raw_topic = settings.topic("raw")
    outputs = [settings.topic(t) for t in OUTPUT_TOPICS]
    raw_before = end_offsets(bootstrap, [raw_topic])
    out_before = end_offsets(bootstrap, outputs)
    url = f"http://127.0.0.1:{settings.gateway_port}"

    cpu_before, wrk_cpu_before = cpu.snapshot(), cpu.children_seconds()
    started = time.time()
    result = loadgen.wrk(
        wrk_bin, url, path, seconds=args.seconds, connections=args.connections, rate=rate
    )
    sent_for = time.time() - started
    accepted = result["ok"]
    if accepted > len(bodies):
        raise SystemExit(f"wrk sent {accepted} bodies of {len(bodies)}: some twice")
    rows = wait_rows(services, dsn, bodies, accepted, timeout=args.drain_timeout)
    drained = time.time()
    cpu_use = cpu.usage(
        cpu_before,
        cpu.snapshot(),
        services.roots(),
        drained - started,
        {"wrk": cpu.children_seconds() - wrk_cpu_before},
    )

    commits = db_commits(dsn, bodies)
    received: dict[int, float] = {}
    emitted: dict[int, float] = {}

    def on_raw(msg: Message) -> None:
        webhook = header(msg, h.WEBHOOK_ID)
        if webhook is not None:
            received[int(webhook)] = received_at(msg)

    def on_output(msg: Message) -> None:
        webhook = header(msg, h.WEBHOOK_ID)
        if webhook is not None:
            emitted[int(webhook)] = msg.timestamp()[1] / 1000

    read_range(bootstrap, raw_before, end_offsets(bootstrap, [raw_topic]), on_raw)
    read_range(bootstrap, out_before, end_offsets(bootstrap, outputs), on_output)
    joined = [w for w in commits if w in received]
    end_to_end = [commits[w] - received[w] for w in joined]
    to_output = [emitted[w] - received[w] for w in joined if w in emitted]
    output_to_db = [commits[w] - emitted[w] for w in joined if w in emitted]
    last_commit = max(commits.values()) if commits else drained
    first_receipt = min(received.values()) if received else started
    throughput = rows / (last_commit - first_receipt) if rows else 0.0
    out = {
        "rate": rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "sent": result["requests"],
        "accepted": accepted,
        "rejected": result["status_errors"],
        "socket_errors": result["errors"],
        "accepted_per_s": result["ok_per_s"],
        "gateway_http": {
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "max_ms": result["max_us"] / 1000,
        },
        "rows": rows,
        "rows_without_raw_record": len(commits) - len(joined),
        "raw_records_without_row": sorted(set(received) - set(commits))[:100],
        "send_seconds": sent_for,
        "first_send_to_last_commit_s": last_commit - started,
        "first_receipt_to_last_commit_s": last_commit - first_receipt,
        "throughput_per_s": throughput,
        "latency": spread(end_to_end),
        "latency_receipt_to_processor_output": spread(to_output),
        "latency_processor_output_to_commit": spread(output_to_db),
        "cpu_cores": cpu_use,
        "by_second": by_second(received, emitted, commits, started),
    }
    if out["raw_records_without_row"]:
        services.shortfall = True
        say(f"warning: webhooks on the raw topic with no row: {out['raw_records_without_row']}")
    lat = out["latency"]
    to_output_p50 = out["latency_receipt_to_processor_output"]["p50_ms"]
    output_to_db_p50 = out["latency_processor_output_to_commit"]["p50_ms"]
    say(
        f"sustained {rate}/s for {args.seconds} s: {accepted} accepted "
        f"({result['ok_per_s']:,.0f}/s, {result['status_errors']} non-200, "
        f"{result['errors']} socket errors), {rows} rows; end to end {throughput:,.0f}/s "
        f"over {last_commit - first_receipt:.1f} s from the first receipt "
        f"(wrk ran {sent_for:.1f} s); latency p50 {lat['p50_ms']:,.0f} ms "
        f"p99 {lat['p99_ms']:,.0f} ms max {lat['max_ms']:,.0f} ms "
        f"(receipt->processor output p50 {to_output_p50:,.0f} ms, "
        f"output->commit p50 {output_to_db_p50:,.0f} ms)"
    )
    say(
        "  cpu (cores): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu_use.items(), key=lambda kv: -kv[1]))
    )
    return out


def wait_emitted(
    services: Services,
    bootstrap: str,
    outputs: list[str],
    before: Offsets,
    expected: int,
    timeout: float,
) -> int:
    """Records the processor has written to ``outputs`` since ``before``: wait until
    ``expected``, or until none came for ``STALL_S`` seconds after the first."""
    deadline = time.monotonic() + timeout
    count = last = 0
    changed = time.monotonic()
    while count < expected and time.monotonic() < deadline:
        services.check()
        count = sum(end_offsets(bootstrap, outputs).values()) - sum(before.values())
        if count != last:
            last, changed = count, time.monotonic()
        elif count and time.monotonic() - changed > STALL_S:
            break
        time.sleep(0.25)
    return count


def raw_producer(bootstrap: str, bodies: list[bytes]) -> float:
    """Messages/s of a bare producer writing ``bodies`` (acks=all, idempotent, the
    gateway's linger and compression, its key and headers) to a fresh topic."""
    topic = f"bench.e2e.producer-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], partitions=PARTITIONS)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
        }
    )

    def record(raw: bytes) -> Record:
        webhook = _field(raw, b"id=")
        headers = [
            (h.WEBHOOK_ID, webhook),
            (h.EVENT, _field(raw, b"&event=")),
            (h.RECEIVED_AT, b"2026-11-27T19:00:00.000Z"),
            ("content-type", b"application/x-www-form-urlencoded"),
            ("source-ip", b"127.0.0.1"),
        ]
        return _field(raw, b"&payload[subscription][id]=") or webhook, raw, headers

    started = time.perf_counter()
    if publish_and_wait(producer, topic, map(record, bodies)):
        raise SystemExit("the raw producer baseline was not acknowledged")
    return len(bodies) / (time.perf_counter() - started)


def _field(raw: bytes, name: bytes) -> bytes:
    """The raw value of the first ``name`` (``&key=``, or ``id=`` at the start) in a body."""
    at = 0 if raw.startswith(name) else raw.find(name)
    if at < 0:
        return b""
    start = at + len(name)
    end = raw.find(b"&", start)
    return raw[start:] if end < 0 else raw[start:end]


def copy_baseline(dsn: str, backlog: list[wl.Body]) -> float:
    """Rows/s of one binary COPY of the backlog's rows, in one transaction, into copies
    of ``transactions`` and ``subscriptions`` (columns, defaults, indexes, foreign keys)."""
    payments = [wl.transaction_copy_row(b) for b in backlog if b.event == "payment_success"]
    signups = [wl.subscription_copy_row(b) for b in backlog if b.event == "signup_success"]
    tx_cols = (
        "transaction_id bigint, customer_key text, partner_key text, subscription_id bigint,"
        " kind text, amount_cents bigint, currency text, refunded_payment_id bigint,"
        " occurred_at timestamptz, webhook_id bigint"
    )
    sub_cols = (
        "subscription_id bigint, customer_key text, product_id bigint, product_handle text,"
        " state text, last_webhook_id bigint, last_event_at timestamptz"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("transactions", "subscriptions"):
            conn.execute(f"drop table if exists bench_copy_{table}")
            conn.execute(f"create table bench_copy_{table} (like {table} including all)")
        conn.execute(
            "alter table bench_copy_transactions"
            " add foreign key (customer_key) references customers (customer_key),"
            " add foreign key (partner_key) references partners (partner_key)"
        )
        conn.execute(
            "alter table bench_copy_subscriptions"
            " add foreign key (customer_key) references customers (customer_key),"
            " add foreign key (plan_key) references plans (plan_key)"
        )
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            for table, cols, rows in (
                ("transactions", tx_cols, payments),
                ("subscriptions", sub_cols, signups),
            ):
                pairs = [c.split() for c in cols.split(",")]
                names = ", ".join(n for n, _ in pairs)
                sql = f"copy bench_copy_{table} ({names}) from stdin (format binary)"
                with cur.copy(sql) as cp:
                    cp.set_types([t for _, t in pairs])
                    for row in rows:
                        cp.write_row(row)
        seconds = time.perf_counter() - started
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ("transactions", "subscriptions"):
            conn.execute(f"drop table bench_copy_{table}")
    return len(backlog) / seconds


def stages_vs_baselines(
    args: argparse.Namespace,
    services: Services,
    settings: Settings,
    wrk_bin: str,
    bodies: range,
) -> dict[str, Any]:
    """Backlogs through each stage alone, beside its bare baseline."""
    dsn, bootstrap = settings.database_dsn(), settings.kafka_bootstrap_servers
    raw_topic = settings.topic("raw")
    outputs = [settings.topic(t) for t in OUTPUT_TOPICS]
    path = services.work / "saturation.txt"
    wl.write_bodies(path, bodies.start, len(bodies), KEY)
    services.stop_stage("processor")
    services.stop_stage("sink")

    # Gateway at saturation (it loads the raw backlog) vs a bare producer.
    raw_before = end_offsets(bootstrap, [raw_topic])
    url = f"http://127.0.0.1:{settings.gateway_port}"
    sat = loadgen.wrk(
        wrk_bin, url, path, seconds=args.saturation_seconds, connections=args.sat_connections
    )
    raw_after = end_offsets(bootstrap, [raw_topic])
    backlog = sum(raw_after.values()) - sum(raw_before.values())
    if backlog < sat["ok"]:
        raise SystemExit(f"only {backlog} raw records for {sat['ok']} accepted")
    gateway_rate = sat["ok_per_s"]
    say(
        f"gateway at saturation ({args.sat_connections} connections, "
        f"{args.saturation_seconds} s): {gateway_rate:,.0f} accepted/s "
        f"(p50 {sat['p50_us'] / 1000:.1f} ms, p99 {sat['p99_us'] / 1000:.1f} ms), "
        f"{backlog} raw records"
    )
    producer_rate = raw_producer(bootstrap, wl.read_bodies(path, backlog))
    say(
        f"bare producer (acks=all, idempotent, lz4, linger 2 ms), same {backlog} bodies: "
        f"{producer_rate:,.0f} msgs/s"
    )

    # Bare consumer over the raw backlog vs the processor draining it.
    webhooks: set[int] = set()

    def touch(msg: Message) -> None:
        value = msg.value() or b""
        webhook = header(msg, h.WEBHOOK_ID)
        if value and webhook is not None:
            webhooks.add(int(webhook))

    seconds = read_range(bootstrap, raw_before, raw_after, touch)
    consumer_rate = (backlog - 1) / seconds if seconds > 0 else float("nan")
    distinct = len(webhooks)
    say(f"bare consumer, same {backlog} raw records: {consumer_rate:,.0f} msgs/s")

    out_before = end_offsets(bootstrap, outputs)
    services.start_stage("processor")
    emitted = wait_emitted(services, bootstrap, outputs, out_before, distinct, args.drain_timeout)
    if emitted < distinct:
        services.shortfall = True
        say(
            f"warning: the processor emitted {emitted} records for {distinct} distinct "
            f"webhooks and then nothing for {STALL_S:.0f} s"
        )
    stamps: list[float] = []
    read_range(
        bootstrap,
        out_before,
        end_offsets(bootstrap, outputs),
        lambda m: stamps.append(m.timestamp()[1] / 1000),
    )
    processor_rate = rate_from_stamps(stamps)
    say(
        f"processor draining {distinct} webhooks: {processor_rate:,.0f} events/s "
        f"(output records' Kafka timestamps)"
    )

    # The sink draining the output backlog vs plain COPY of the same rows.
    services.start_stage("sink")
    rows = wait_rows(services, dsn, bodies, emitted, timeout=args.drain_timeout)
    sink_rate = rate_from_stamps(list(db_commits(dsn, bodies).values()))
    say(f"sink draining {rows} rows: {sink_rate:,.0f} rows/s (commit timestamps)")
    backlog_bodies = [wl.body(w - wl.WEBHOOK_BASE) for w in sorted(webhooks)]
    copy_rate = copy_baseline(dsn, backlog_bodies)
    say(f"plain binary COPY of the same {len(backlog_bodies)} rows: {copy_rate:,.0f} rows/s")
    return {
        "backlog": backlog,
        "distinct_webhooks": distinct,
        "gateway": {
            "stage": gateway_rate,
            "baseline": producer_rate,
            "unit": "accepted/s vs msgs/s",
            "p50_ms": sat["p50_us"] / 1000,
            "p99_ms": sat["p99_us"] / 1000,
        },
        "processor": {
            "stage": processor_rate,
            "baseline": consumer_rate,
            "unit": "events/s",
            "emitted": emitted,
        },
        "sink": {"stage": sink_rate, "baseline": copy_rate, "unit": "rows/s", "rows": rows},
    }


def warm_up(services: Services, settings: Settings, wrk_bin: str, bodies: range) -> None:
    """A few hundred webhooks end to end: every stage joined, connected and warm."""
    path = services.work / "warm-up.txt"
    wl.write_bodies(path, bodies.start, len(bodies), KEY)
    url = f"http://127.0.0.1:{settings.gateway_port}"
    result = loadgen.wrk(wrk_bin, url, path, seconds=3, connections=8, rate=200)
    expected = min(result["ok"], len(bodies))
    rows = wait_rows(services, settings.database_dsn(), bodies, expected, timeout=90)
    say(f"warm-up: {result['ok']} webhooks accepted, {rows} rows in Postgres")
    if rows < expected:
        services.shortfall = True
        raise SystemExit(f"the pipeline did not deliver the warm-up; see {services.logs}")


def summary_table(result: dict[str, Any]) -> str:
    """The README table of this run's figures."""
    lines = [
        "| figure | pipeline | baseline | ratio |",
        "|---|---|---|---|",
    ]
    for s in result["sustained"]:
        lat = s["latency"]
        met = s["throughput_per_s"] >= 0.95 * 2000 and lat["p99_ms"] < 2000
        lines.append(
            f"| end to end, offered {s['rate']:,}/s for {s['seconds']} s "
            f"| {s['throughput_per_s']:,.0f} webhooks/s ({s['rows']:,} rows), "
            f"latency p50 {lat['p50_ms']:,.0f} ms, p99 {lat['p99_ms']:,.0f} ms "
            f"| offered {s['rate']:,}/s (target: 2,000/s, p99 < 2,000 ms: "
            f"{'met' if met else 'not met'}) "
            f"| {s['throughput_per_s'] / s['rate']:.2f}x offered |"
        )
    st = result["stages"]
    for name, label, stage_unit, base_label in (
        ("gateway", "gateway at saturation", "accepted/s", "bare producer"),
        ("processor", "processor draining a backlog", "events/s", "bare consumer"),
        ("sink", "sink draining a backlog", "rows/s", "plain binary COPY"),
    ):
        fig = st[name]
        base_unit = {"gateway": "msgs/s", "processor": "msgs/s", "sink": "rows/s"}[name]
        lines.append(
            f"| {label} | {fig['stage']:,.0f} {stage_unit} "
            f"| {base_label} {fig['baseline']:,.0f} {base_unit} "
            f"| {fig['stage'] / fig['baseline']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="End-to-end benchmark: signed webhooks through gateway, processor and "
        "sink into Postgres, with each stage beside its baseline.",
    )
    parser.add_argument(
        "--rate",
        type=int,
        action="append",
        help="fixed total request rate (webhooks/s) of a sustained phase; repeat to try "
        "several (default: 2000, the target, then 1500)",
    )
    parser.add_argument("--seconds", type=int, default=20, help="length of a sustained phase")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections at a rate")
    parser.add_argument(
        "--saturation-seconds", type=int, default=8, help="wrk at saturation (loads the backlog)"
    )
    parser.add_argument("--sat-connections", type=int, default=64)
    parser.add_argument(
        "--saturation-bodies",
        type=int,
        default=60_000,
        help="bodies for the saturation phase (more than the gateway can take in its time)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=150, help="seconds to wait for the rows"
    )
    parser.add_argument(
        "--skip-stages", action="store_true", help="only the sustained phase(s), no baselines"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, data)")
    args = parser.parse_args()
    rates: list[int] = args.rate or [2000, 1500]

    wl.check_templates()
    wrk_bin = loadgen.ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    # SIGTERM as Ctrl-C: the finally block below stops everything either way.
    signal.signal(signal.SIGTERM, _interrupt)
    services = Services(work)
    started = time.time()
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpu_model": _cpu_model(),
        },
        "args": vars(args),
    }
    ok = False
    try:
        settings = services.start()
        say(
            f"Kafka on {settings.kafka_bootstrap_servers}, Postgres on "
            f"127.0.0.1:{services.postgres.port}; logs in {services.logs}"
        )
        for name in ("gateway", "processor", "sink"):
            services.start_stage(name)
        _wait_ready(services, f"http://127.0.0.1:{settings.gateway_port}/readyz")
        next_body = 0
        warm = range(next_body, next_body + 1000)
        warm_up(services, settings, wrk_bin, warm)
        next_body = warm.stop
        result["sustained"] = []
        for rate in rates:
            count = int(rate * args.seconds * 1.1) + 1000
            bodies = range(next_body, next_body + count)
            next_body = bodies.stop
            result["sustained"].append(sustained(args, services, settings, wrk_bin, rate, bodies))
        if not args.skip_stages:
            bodies = range(next_body, next_body + args.saturation_bodies)
            next_body = bodies.stop
            result["stages"] = stages_vs_baselines(args, services, settings, wrk_bin, bodies)
        ok = True
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        services.close()
        if ok and not args.keep and not services.shortfall:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}", file=sys.stderr)

    result["seconds"] = time.time() - started
    result["load_average_before"] = load_before
    result["load_average_after"] = os.getloadavg()
    out = RESULTS / f"e2e-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    if "stages" in result:
        say("")
        say(summary_table(result))
    say(
        f"\n(whole run {result['seconds']:.0f} s; load average before "
        f"{load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}; "
        f"details in {out.relative_to(REPO)})"
    )
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _wait_ready(services: Services, url: str, timeout: float = 60) -> None:
    """Wait until the gateway answers ``/readyz``, while every stage still runs."""

    def ready() -> bool:
        services.check()
        return http_ok(url)()

    gateway = services.stages["gateway"]
    wait_ready(
        gateway.proc, ready, name="gateway", what=url, log_path=gateway.log_path, timeout=timeout
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
