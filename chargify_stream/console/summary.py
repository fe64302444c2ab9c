"""The figures of the operators' console, gathered from Postgres, Kafka and the stages.

:func:`gather` returns one JSON-ready dict (``/api/summary`` serves it as is; the page
renders it): each stage's health (its HTTP endpoint answering), consumer lag per group and
partition (committed offsets against the partitions' ends), throughput (webhooks received
and decided per second over the last minute, five minutes and hour, from
``webhook_outcomes``), the dead-lettered webhooks still unresolved by reason and age (a
replay or re-drive that succeeded moves a webhook out), the parked events waiting for their
customer, recent transactions with their partner, and the matched/unmatched rate of
payments and refunds. Every part is gathered on its own: one source away (a stage down,
the broker unreachable) shows as an error in its part, not a blank page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings

__all__ = ["AGE_BUCKETS", "gather"]

log = logging.getLogger(__name__)

TIMEOUT_S = 3.0
RECENT_TRANSACTIONS = 15
AGE_BUCKETS = ("0-1h", "1h-1d", "1d-7d", "7d+")
_AGE_CASE = (
    "case when age < interval '1 hour' then '0-1h' when age < interval '1 day' then '1h-1d'"
    " when age < interval '7 days' then '1d-7d' else '7d+' end"
)


def _stages(settings: Settings) -> list[dict[str, Any]]:
    """Each stage's health endpoint, as ``console`` reaches it from this host."""
    probes = [
        ("gateway", f"http://{_host(settings.gateway_host)}:{settings.gateway_port}/readyz"),
        (
            "processor",
            f"http://{_host(settings.metrics_host)}:{settings.processor_web_port}/metrics",
        ),
        (
            "sink",
            f"http://{_host(settings.metrics_host)}:{settings.sink_metrics_port}/readyz",
        ),
    ]
    out = []
    for name, url in probes:
        try:
            status = httpx.get(url, timeout=TIMEOUT_S).status_code
            out.append({"stage": name, "url": url, "up": status == 200, "status": status})
        except httpx.HTTPError as exc:
            out.append({"stage": name, "url": url, "up": False, "status": type(exc).__name__})
    return out


def _host(bound: str) -> str:
    """Where to reach a server bound to ``bound``: loopback for a wildcard address."""
    return "127.0.0.1" if bound in ("0.0.0.0", "", "::") else bound


def _groups(settings: Settings) -> list[tuple[str, list[str]]]:
    """The pipeline's consumer groups and the topics each reads."""
    raw, dead = settings.topic("raw"), settings.topic("deadletter")
    typed = [settings.topic("transactions"), settings.topic("subscriptions")]
    return [
        (settings.processor_app_id, [raw]),
        (settings.sink_group_id, typed),
        (f"{settings.sink_group_id}-redrive", [dead]),
        (f"{settings.sink_group_id}-outcomes", [dead, settings.topic("decisions")]),
    ]


def _lag(settings: Settings) -> list[dict[str, Any]]:
    """Per group and partition: committed offset, end offset, lag (end - committed)."""
    admin = AdminClient(librdkafka_config(settings, log_level=3))
    groups = _groups(settings)
    requests = [ConsumerGroupTopicPartitions(g) for g, _ in groups]
    committed: dict[tuple[str, str, int], int] = {}
    for request in requests:  # the API takes one group per call
        future = admin.list_consumer_group_offsets([request], request_timeout=TIMEOUT_S)
        result = future[request.group_id].result(timeout=TIMEOUT_S)
        for tp in result.topic_partitions or []:
            committed[request.group_id, tp.topic, tp.partition] = tp.offset
    metadata = admin.list_topics(timeout=TIMEOUT_S)
    probe = Consumer(
        {
            **librdkafka_config(settings),
            "group.id": "chargify-console",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    rows = []
    try:
        for group, topics in groups:
            for topic in topics:
                meta = metadata.topics.get(topic)
                if meta is None or meta.error is not None:
                    continue
                for partition in sorted(meta.partitions):
                    low, high = probe.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=TIMEOUT_S
                    )
                    done = committed.get((group, topic, partition), -1)
                    start = done if done >= 0 else low
                    rows.append(
                        {
                            "group": group,
                            "topic": topic,
                            "partition": partition,
                            "committed": done if done >= 0 else None,
                            "end": high,
                            "lag": max(high - start, 0),
                        }
                    )
    finally:
        probe.close()
    return rows


def _database(settings: Settings) -> dict[str, Any]:
    with psycopg.connect(settings.database_dsn(), autocommit=True, connect_timeout=5) as conn:
        # Received: the gateway's receipt time; decided: any outcome reached meanwhile.
        windows = {"1m": 60, "5m": 300, "1h": 3600}
        throughput = {}
        for name, seconds in windows.items():
            row = conn.execute(
                "select count(*) filter (where received_at > now() - make_interval(secs => %s)),"
                " count(*) filter (where decided_at > now() - make_interval(secs => %s)"
                "   and outcome <> 'received')"
                " from webhook_outcomes"
                " where received_at > now() - make_interval(secs => %s)"
                "    or decided_at > now() - make_interval(secs => %s)",
                (seconds, seconds, seconds, seconds),
            ).fetchone()
            received, decided = row if row else (0, 0)
            throughput[name] = {
                "received_per_s": round(received / seconds, 3),
                "decided_per_s": round(decided / seconds, 3),
            }
        outcomes: dict[str, int] = dict(
            conn.execute("select outcome, count(*) from webhook_outcomes group by 1").fetchall()
        )
        dead = conn.execute(
            f"select outcome, reason, {_AGE_CASE}, count(*), max(age)"
            " from (select *, now() - decided_at as age from webhook_outcomes"
            "       where outcome in ('dead_lettered', 'parked')) d"
            " group by 1, 2, 3 order by 1, 2"
        ).fetchall()
        by_reason: dict[str, dict[str, Any]] = {}
        for outcome, reason, bucket, count, oldest in dead:
            entry = by_reason.setdefault(
                reason or "none",
                {
                    "outcome": outcome,
                    "total": 0,
                    "oldest_s": 0,
                    "ages": dict.fromkeys(AGE_BUCKETS, 0),
                },
            )
            entry["total"] += count
            entry["ages"][bucket] += count
            entry["oldest_s"] = max(entry["oldest_s"], int(oldest.total_seconds()))
        parked = conn.execute(
            "select count(distinct coalesce(webhook_id, dlq_topic || dlq_offset)),"
            " extract(epoch from now() - min(coalesce(failed_at, parked_at)))"
            " from parked_events where redriven_at is null"
        ).fetchone()
        # The newest by Chargify's time (the indexed column): a replayed old event is
        # not "recent".
        recent = conn.execute(
            "select transaction_id, webhook_id, kind, amount_cents, currency, customer_key,"
            " partner_key, occurred_at, recorded_at from transactions"
            " order by occurred_at desc limit %s",
            (RECENT_TRANSACTIONS,),
        ).fetchall()
        matched_row = conn.execute(
            "select count(*) filter (where outcome in ('recorded', 'unchanged')),"
            " count(*) filter (where outcome = 'parked')"
            " from webhook_outcomes where event in ('payment_success', 'refund_success')"
            " and decided_at > now() - interval '1 day'"
        ).fetchone()
    matched, unmatched = matched_row if matched_row else (0, 0)
    names = ("transaction_id", "webhook_id", "kind", "amount_cents", "currency",
             "customer_key", "partner_key", "occurred_at", "recorded_at")  # fmt: skip
    return {
        "throughput": throughput,
        "outcomes": outcomes,
        "dead_letters": by_reason,
        "parked": {
            "waiting": parked[0] if parked else 0,
            "oldest_s": int(parked[1]) if parked and parked[1] is not None else None,
        },
        "recent_transactions": [dict(zip(names, row, strict=True)) for row in recent],
        "matching": {
            "window": "24h",
            "matched": matched,
            "unmatched": unmatched,
            "matched_rate": round(matched / (matched + unmatched), 4)
            if matched + unmatched
            else None,
        },
    }


def _part(name: str, fetch: Callable[[], Any], errors: dict[str, str]) -> Any:
    try:
        return fetch()
    except Exception as exc:  # a source away: say so in its part, show the rest
        log.warning("console: %s unavailable: %s", name, exc)
        errors[name] = f"{type(exc).__name__}: {exc}"
        return None


def gather(settings: Settings) -> dict[str, Any]:
    """Every figure of the console, JSON-ready except for datetimes (see ``page.plain``)."""
    errors: dict[str, str] = {}
    stages = _part("stages", lambda: _stages(settings), errors)
    lag = _part("kafka", lambda: _lag(settings), errors)
    database = _part("postgres", lambda: _database(settings), errors) or {}
    return {
        "generated_at": datetime.now(UTC),
        "stages": stages or [],
        "consumer_lag": lag or [],
        **database,
        "errors": errors,
    }
