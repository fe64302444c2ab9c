"""Failover: a three-broker cluster loses a broker while payments flow through the pipeline.

    .venv/bin/python bench/failover/run.py [--rate 50] [--seconds 60] [--kill-at 15]
        [--restart-at 35] [--stop] [--session-timeout-ms 9000]

Everything on this one machine: a three-node KRaft cluster (``LocalKafkaCluster``: each
node broker and controller, ``min.insync.replicas=2``), a local Postgres, and the three
stages as ``python -m chargify_stream gateway|processor|sink`` processes, the topics
created by the pipeline itself with ``TOPIC_REPLICATION_FACTOR=3`` (checked: 3 replicas,
``min.insync.replicas=2``).

Signed ``payment_success`` webhooks (``bench/e2e/workload.py``, each its own webhook and
transaction) are POSTed at a steady ``--rate`` for ``--seconds``. A webhook not answered
200 is sent again one second later, as Chargify retries, up to 20 times. At ``--kill-at``
seconds the broker leading partition 0 of the raw topic is SIGKILLed (``--stop``: stopped
with SIGTERM, a controlled shutdown as in a rolling restart); at ``--restart-at`` it is
started again on its data. The controllers fence a silent broker after
``--session-timeout-ms`` (Kafka's default, 9 s, unless told otherwise): until then it is
still in the in-sync replicas of its partitions, and ``acks=all`` writes to them wait.

Checks, after Postgres has caught up:

- every webhook answered 200 has its row in ``transactions``, exactly once;
- ``chargify.transactions``, read with ``read_committed``, holds each of those
  transactions exactly once (duplicates and missing counted);

and reports the gateway's non-200 answers (503s) and the **longest pause**: the longest
time without a 200 answer (the gateway's view), without a processor output (the records'
timestamps) and without a row committed in Postgres (the end-to-end view, from
``track_commit_timestamp``), each after the first webhook and before the last one.
Prints one line, writes the figures to ``bench/results/failover-<time>.json``, and stops
everything it started (also on Ctrl-C). Exit status 1 if a check fails. Takes 2-3
minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO / "bench" / "e2e"), str(REPO)]

import httpx  # noqa: E402
import psycopg  # noqa: E402
import workload as wl  # noqa: E402
from confluent_kafka import Consumer, KafkaException, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, ConfigResource  # noqa: E402

from chargify_stream.base.kafka_admin import ensure_pipeline_topics  # noqa: E402
from chargify_stream.base.kafka_config import librdkafka_config  # noqa: E402
from chargify_stream.base.settings import Settings, load_settings  # noqa: E402
from chargify_stream.ingest.signature import sign  # noqa: E402
from chargify_stream.local.kafka import LocalKafkaCluster  # noqa: E402
from chargify_stream.local.ports import free_port  # noqa: E402
from chargify_stream.local.postgres import LocalPostgres  # noqa: E402
from chargify_stream.sink.admin import add_customer, add_partner  # noqa: E402
from chargify_stream.sink.migrate import migrate  # noqa: E402
from tests.stages import Stage  # noqa: E402

KEY = "bench-failover-shared-key"
PARTITIONS = 3
ATTEMPTS = 20
RETRY_AFTER_S = 1.0


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Webhook:
    """One payment and what became of each attempt to deliver it."""

    body: wl.Body
    raw: bytes
    # (sent at, answered at, status), on this process's monotonic clock
    answers: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def accepted_at(self) -> float | None:
        return next((t for _, t, status in self.answers if status == 200), None)


def payments(count: int) -> list[Webhook]:
    """``count`` distinct payment webhooks (the workload's signups left out)."""
    out: list[Webhook] = []
    index = 0
    while len(out) < count:
        body = wl.body(index)
        if body.event == "payment_success":
            out.append(Webhook(body, wl.render(body)))
        index += 1
    return out


async def deliver(client: httpx.AsyncClient, hook: Webhook) -> None:
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Chargify-Webhook-Signature-Hmac-Sha-256": sign(KEY.encode(), hook.raw),
    }
    for _ in range(ATTEMPTS):
        sent = time.monotonic()
        try:
            response = await client.post("/webhooks/chargify", content=hook.raw, headers=headers)
            status = response.status_code
        except httpx.HTTPError:
            status = 599
        hook.answers.append((sent, time.monotonic(), status))
        if status == 200:
            return
        await asyncio.sleep(RETRY_AFTER_S)


async def send(
    base: str,
    hooks: list[Webhook],
    rate: float,
    faults: list[tuple[float, str, Any]],
) -> float:
    """POST ``hooks`` at ``rate``/s (each retried until 200); run ``faults`` on schedule.

    Returns the monotonic start time.
    """
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        start = time.monotonic()
        fault_tasks = [asyncio.create_task(_at(start + at, what, act)) for at, what, act in faults]
        tasks = []
        for i, hook in enumerate(hooks):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(deliver(client, hook)))
        await asyncio.gather(*tasks, *fault_tasks)
    return start


async def _at(when: float, what: str, act: Any) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    began = time.monotonic()
    await asyncio.to_thread(act)
    say(f"  {what} ({time.monotonic() - began:.1f}s)")


def leader_of(settings: Settings, topic: str, partition: int) -> int:
    admin = AdminClient(librdkafka_config(settings))
    return int(admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader)


def check_topics(settings: Settings) -> None:
    """The pipeline made its topics with 3 replicas and min.insync.replicas=2."""
    admin = AdminClient(librdkafka_config(settings))
    deadline = time.monotonic() + 30
    metadata = admin.list_topics(timeout=10).topics
    # Each broker learns of new topics on its own: ask until the one asked knows all.
    while set(settings.all_topics) - set(metadata) and time.monotonic() < deadline:
        time.sleep(0.5)
        metadata = admin.list_topics(timeout=10).topics
    for name in settings.all_topics:
        replicas = {len(p.replicas) for p in metadata[name].partitions.values()}
        resource = ConfigResource("topic", name)
        while True:
            try:
                found = admin.describe_configs([resource])[resource].result()
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        isr = found["min.insync.replicas"].value
        if replicas != {3} or isr != "2":
            raise SystemExit(f"{name}: replicas {replicas}, min.insync.replicas {isr}")


def under_replicated(settings: Settings) -> int:
    admin = AdminClient(librdkafka_config(settings))
    metadata = admin.list_topics(timeout=10).topics
    return sum(
        len(p.isrs) < len(p.replicas)
        for name in settings.all_topics
        for p in metadata[name].partitions.values()
    )


def topic_counts(settings: Settings) -> tuple[Counter[bytes], list[float]]:
    """Records per webhook id on the transactions topic, read_committed, to its end; and
    each record's timestamp (when the processor produced it, seconds since the epoch)."""
    topic = settings.topic("transactions")
    consumer = Consumer(
        librdkafka_config(
            settings,
            **{
                "group.id": "bench-failover-reader",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    counts: Counter[bytes] = Counter()
    stamps: list[float] = []
    try:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(PARTITIONS)
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in ends if ends[p] > 0])
        pending = {p for p in ends if ends[p] > 0}
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                partition, offset = msg.partition() or 0, msg.offset() or 0
                webhook = dict(msg.headers() or []).get("chargify-webhook-id")
                if isinstance(webhook, bytes):
                    counts[webhook] += 1
                    stamps.append(msg.timestamp()[1] / 1000)
                if offset >= ends[partition] - 1:
                    pending.discard(partition)
        if pending:
            raise SystemExit(f"could not read {topic} to its end (partitions {pending})")
    finally:
        consumer.close()
    return counts, stamps


def wait_rows(dsn: str, ids: list[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "select count(*) from transactions where webhook_id = any(%s)", (ids,)
            ).fetchone()
        found = int(row[0]) if row else 0
        if found >= len(ids):
            return found
        time.sleep(1.0)
    return found


def longest_gap(times: list[float], first: float, last: float) -> float:
    """The longest time between two consecutive ``times`` within [first, last]."""
    points = sorted(t for t in times if first <= t <= last)
    if not points:
        return last - first
    gaps = [b - a for a, b in zip([first, *points], [*points, last], strict=True)]
    return max(gaps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="webhooks per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send")
    parser.add_argument("--kill-at", type=float, default=15.0, help="SIGKILL a broker then")
    parser.add_argument("--restart-at", type=float, default=35.0, help="restart it then")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data folder")
    parser.add_argument(
        "--stop", action="store_true", help="SIGTERM the broker (controlled shutdown), not SIGKILL"
    )
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=9000,
        help="the brokers' broker.session.timeout.ms: how long the controllers wait before "
        "fencing a broker that went silent (Kafka's default 9000; the tests' launcher 3000)",
    )
    args = parser.parse_args()
    wl.check_templates()
    work = Path(tempfile.mkdtemp(prefix="chargify-failover-"))
    (work / "logs").mkdir()
    cluster = LocalKafkaCluster(
        3,
        data_dir=work / "kafka",
        extra_properties={"broker.session.timeout.ms": str(args.session_timeout_ms)},
    )
    postgres = LocalPostgres(data_dir=work / "postgres", settings={"track_commit_timestamp": "on"})
    stages: list[Stage] = []
    ok = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        say(f"starting a three-broker cluster and Postgres in {work} ...")
        cluster.start()
        postgres.start()
        dsn = postgres.create_database("chargify")
        settings = load_settings(
            kafka_bootstrap_servers=cluster.bootstrap_servers,
            database_url=dsn,
            chargify_shared_keys=KEY,
            topic_partitions=PARTITIONS,
            topic_replication_factor=3,
            processor_data_dir=str(work / "processor"),
            gateway_port=free_port(),
            processor_web_port=free_port(),
            sink_metrics_port=free_port(),
        )
        ensure_pipeline_topics(settings)
        check_topics(settings)
        migrate(dsn)
        with psycopg.connect(dsn) as conn:
            add_partner(conn, wl.PARTNER, "Failover benchmark partner")
            for key in wl.CUSTOMERS:
                add_customer(conn, key, partner=wl.PARTNER)
        for name in ("gateway", "processor", "sink"):
            stages.append(Stage(name, settings, work / "logs").start())
        base = f"http://127.0.0.1:{settings.gateway_port}"
        stages[0].wait_http_ready(f"{base}/readyz", timeout=60)

        warm = payments(20)
        hooks = payments(20 + int(args.rate * args.seconds))[20:]
        asyncio.run(send(base, warm, 20.0, []))
        if wait_rows(dsn, [h.body.webhook_id for h in warm], 120) < len(warm):
            raise SystemExit("the pipeline did not carry the warm-up webhooks")

        victim = cluster.node(leader_of(settings, settings.topic("raw"), 0))
        killed: dict[str, float] = {}

        how = "stopped (SIGTERM)" if args.stop else "SIGKILLed"

        def kill() -> None:
            killed["at"] = time.monotonic()
            if args.stop:
                victim.stop()  # a controlled shutdown, as in a rolling restart
            else:
                victim.kill()

        def restart() -> None:
            killed["restart"] = time.monotonic()
            victim.start()
            killed["ready"] = time.monotonic()

        say(
            f"sending {len(hooks)} payments at {args.rate:g}/s for {args.seconds:g}s; "
            f"broker {victim.node_id} {how} at {args.kill_at:g}s, restarted at "
            f"{args.restart_at:g}s"
        )
        faults = [
            (args.kill_at, f"{how} broker {victim.node_id}", kill),
            (args.restart_at, f"broker {victim.node_id} restarted and ready", restart),
        ]
        start = asyncio.run(send(base, hooks, args.rate, faults))
        sent_for = time.monotonic() - start
        accepted = [h for h in hooks if h.accepted_at is not None]
        ids = [h.body.webhook_id for h in accepted]
        in_postgres = wait_rows(dsn, ids, 300)
        caught_up = time.monotonic()
        isr_wait = time.monotonic() + 120
        while under_replicated(settings) and time.monotonic() < isr_wait:
            time.sleep(1.0)
        for stage in stages:
            if not stage.running:
                raise SystemExit(f"{stage.name} exited:\n{stage.log()[-3000:]}")

        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "select webhook_id, count(*),"
                " extract(epoch from max(pg_xact_commit_timestamp(xmin)))"
                " from transactions where webhook_id = any(%s) group by webhook_id",
                ([h.body.webhook_id for h in hooks],),
            ).fetchall()
            now_db, now_mono = (
                conn.execute("select extract(epoch from now())").fetchone()[0],  # type: ignore[index]
                time.monotonic(),
            )
        per_webhook = {int(w): int(n) for w, n, _ in rows}
        # Commit times, moved onto this process's monotonic clock.
        commits = [float(t) - float(now_db) + now_mono for _, _, t in rows]
        counts, stamps = topic_counts(settings)
        produced = [t - time.time() + time.monotonic() for t in stamps]

        statuses = Counter(status for h in hooks for _, _, status in h.answers)
        latencies = sorted(t - sent for h in hooks for sent, t, status in h.answers)
        per_second = Counter(
            int(t - start) for h in hooks for _, t, status in h.answers if status == 200
        )
        accepted_times = [h.accepted_at for h in accepted if h.accepted_at is not None]
        # The machine is shared: under load the sender itself falls behind its schedule,
        # so the window and the rate are those of the first POSTs as actually sent.
        last_sent = max(h.answers[0][0] for h in hooks)
        missing_pg = [w for w in ids if per_webhook.get(w, 0) == 0]
        duplicated_pg = [w for w in ids if per_webhook.get(w, 0) > 1]
        topic_missing = [w for w in ids if counts[str(w).encode()] == 0]
        topic_duplicated = {w: counts[str(w).encode()] for w in ids if counts[str(w).encode()] > 1}
        result: dict[str, Any] = {
            "when": datetime.now().isoformat(timespec="seconds"),
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),
            "rate": args.rate,
            "seconds": args.seconds,
            "sent_for_s": round(sent_for, 1),
            "sent_rate": round(len(hooks) / max(last_sent - start, 1e-9), 1),
            "killed_broker": victim.node_id,
            "kill_at_s": args.kill_at,
            "restart_at_s": args.restart_at,
            "broker_session_timeout_ms": args.session_timeout_ms,
            "stopped_with": "SIGTERM" if args.stop else "SIGKILL",
            "restart_ready_s": round(killed["ready"] - killed["restart"], 1),
            "webhooks": len(hooks),
            "accepted": len(accepted),
            "never_accepted": len(hooks) - len(accepted),
            "answers": {str(k): v for k, v in sorted(statuses.items())},
            "answers_503": statuses.get(503, 0),
            "retried_webhooks": sum(len(h.answers) > 1 for h in hooks),
            "longest_pause_200_s": round(longest_gap(accepted_times, start, last_sent), 2),
            "longest_pause_postgres_s": round(longest_gap(commits, start, last_sent), 2),
            # Between the two: the longest time the processor wrote no output.
            "longest_pause_processor_s": round(longest_gap(produced, start, last_sent), 2),
            "answer_p50_s": round(latencies[len(latencies) // 2], 3),
            "answer_p99_s": round(latencies[int(len(latencies) * 0.99)], 3),
            "answer_max_s": round(latencies[-1], 3),
            # From a webhook's first POST to its 200 (retries included).
            "slowest_webhook_s": round(
                max((h.accepted_at or 0) - h.answers[0][0] for h in accepted), 2
            ),
            "sender_lag_max_s": round(
                max(h.answers[0][0] - (start + i / args.rate) for i, h in enumerate(hooks)), 2
            ),
            "accepted_per_second": [per_second.get(i, 0) for i in range(int(sent_for) + 1)],
            "postgres_rows": in_postgres,
            "postgres_missing": len(missing_pg),
            "postgres_duplicated": len(duplicated_pg),
            "topic_missing": len(topic_missing),
            "topic_duplicated": len(topic_duplicated),
            "caught_up_after_s": round(caught_up - (start + sent_for), 1),
            "under_replicated_at_end": under_replicated(settings),
        }
        ok = not (missing_pg or duplicated_pg or topic_missing or topic_duplicated)
        result["exactly_once"] = ok
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"failover-{datetime.now():%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        say(
            f"failover: {len(hooks)} payments at {result['sent_rate']:g}/s, "
            f"broker {victim.node_id} {how} at {args.kill_at:g}s, back at "
            f"{args.restart_at:g}s: "
            f"{len(accepted)} accepted, {statuses.get(503, 0)} answers 503 "
            f"({result['retried_webhooks']} webhooks retried), longest pause "
            f"{result['longest_pause_200_s']}s without a 200, "
            f"{result['longest_pause_processor_s']}s without a processor output and "
            f"{result['longest_pause_postgres_s']}s without a row; Postgres "
            f"{in_postgres}/{len(accepted)} (missing {len(missing_pg)}, duplicated "
            f"{len(duplicated_pg)}), topic missing {len(topic_missing)}, duplicated "
            f"{len(topic_duplicated)}: {'exactly once' if ok else 'CHECK FAILED'} ({path.name})"
        )
        return 0 if ok else 1
    finally:
        for stage in reversed(stages):
            try:
                stage.stop(timeout=20)
            except AssertionError as exc:
                print(f"stopping {stage.name}: {str(exc)[:2000]}", file=sys.stderr)
        postgres.stop()
        cluster.kill()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"logs kept in {work / 'logs'}")


if __name__ == "__main__":
    sys.exit(main())
