"""``chargify-stream trace WEBHOOK_ID``: one webhook's journey through the pipeline.

From the outcome log (``webhook_outcomes``, ``webhook_deliveries``), each delivery's
decision in time order, with the record it was about read back from Kafka by its exact
position (the raw request's headers, the typed record, the dead letter's reason and
error), the re-drives of its parked events (``parked_events``), and the Postgres row it
produced. A record gone from its topic (retention) is reported as such; nothing is
scanned, so a trace costs one fetch per delivery whatever the topics' size.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message, TopicPartition

from chargify_stream.base.errors import ChargifyStreamError
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import decode
from chargify_stream.schemas.deadletter import parse_dead_letter

__all__ = ["WebhookNotFound", "build_trace", "render_text", "run"]

FETCH_TIMEOUT_S = 5.0

_DELIVERIES = (
    'select stage, decision, reason, topic, partition, "offset", replay_count, at, event,'
    " received_at, transaction_id, subscription_id, customer_key, attempt, source_topic,"
    " source_partition, source_offset"
    " from webhook_deliveries where webhook_id = %s order by at"
)
_OUTCOME = (
    "select webhook_id, event, outcome, reason, stage, transaction_id, subscription_id,"
    " customer_key, received_at, decided_at, attempts from webhook_outcomes where webhook_id = %s"
)
_REDRIVES = (
    "select dlq_topic, dlq_partition, dlq_offset, parked_at, redriven_at, replay_count"
    " from parked_events where webhook_id = %s order by parked_at"
)


class WebhookNotFound(ChargifyStreamError):
    """No stage has recorded anything about this webhook id."""


def _rows(cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def build_trace(settings: Settings, webhook_id: int) -> dict[str, Any]:
    """Everything known about ``webhook_id``; raises :class:`WebhookNotFound`."""
    with psycopg.connect(settings.database_dsn(), autocommit=True, connect_timeout=5) as conn:
        cur = conn.cursor()
        outcome = _rows(cur.execute(_OUTCOME, (webhook_id,)))
        if not outcome:
            raise WebhookNotFound(
                f"webhook {webhook_id} is unknown: no stage has recorded it (check the id; a "
                "webhook received seconds ago may not be recorded yet)"
            )
        deliveries = _rows(cur.execute(_DELIVERIES, (webhook_id,)))
        redrives = _rows(cur.execute(_REDRIVES, (str(webhook_id),)))
        produced = _produced(cur, webhook_id, outcome[0])
    # Each decision on a delivery names the raw record it was: the deliveries received.
    raw = {
        (d["source_topic"], d["source_partition"], d["source_offset"]): d["received_at"]
        for d in deliveries
        if d["attempt"] and d["source_topic"] is not None
    }
    records = _fetch_all(
        settings, [*raw, *((d["topic"], d["partition"], d["offset"]) for d in deliveries)]
    )
    for d in deliveries:
        d["record"] = records.get((d["topic"], d["partition"], d["offset"]))
    received = [_received(position, at, records.get(position)) for position, at in raw.items()]
    received.sort(key=lambda r: (r["at"] is None, r["at"] or 0, r["offset"]))
    dead_letters = [d for d in deliveries if d["topic"] == settings.topic("deadletter")]
    return {
        "webhook_id": webhook_id,
        "outcome": outcome[0],
        "received": received,
        "decisions": deliveries,
        "dead_letters": dead_letters,
        "replays": [d for d in deliveries if d["replay_count"] > 0],
        "redrives": redrives,
        "postgres": produced,
    }


def _produced(cur: psycopg.Cursor[Any], webhook_id: int, outcome: dict[str, Any]) -> dict[str, Any]:
    """The transactions and subscription rows this webhook wrote or touched."""
    txns = _rows(
        cur.execute(
            "select * from transactions where webhook_id = %s or transaction_id = %s"
            " order by transaction_id",
            (webhook_id, outcome["transaction_id"]),
        )
    )
    subs: list[dict[str, Any]] = []
    if outcome["subscription_id"] is not None and outcome["transaction_id"] is None:
        subs = _rows(
            cur.execute(
                "select subscription_id, customer_key, product_id, product_handle, plan_key,"
                " state, components, last_webhook_id, last_event_at, updated_at"
                " from subscriptions where subscription_id = %s",
                (outcome["subscription_id"],),
            )
        )
    return {"transactions": txns, "subscriptions": subs}


def _received(
    position: tuple[str, int, int], at: datetime | None, record: dict[str, Any] | None
) -> dict[str, Any]:
    """One delivery into the pipeline: the raw record's receipt time and replay count
    (from its headers; from the decision when the record is gone)."""
    headers = record["headers"] if record is not None else {}
    received_at = headers.get(h.RECEIVED_AT)
    return {
        "at": received_at or (at.isoformat() if at is not None else None),
        "topic": position[0],
        "partition": position[1],
        "offset": position[2],
        "replay_count": int(headers.get(h.DLQ_REPLAY_COUNT) or 0),
        "source_ip": headers.get(h.SOURCE_IP),
        "on_topic": record is not None,
    }


def _fetch_all(
    settings: Settings, positions: Sequence[tuple[str, int, int]]
) -> dict[tuple[str, int, int], dict[str, Any] | None]:
    """The record at each position, read exactly there (``None`` when gone)."""
    wanted = set(positions)
    if not wanted:
        return {}
    consumer = Consumer(
        {
            **librdkafka_config(settings),
            "group.id": f"chargify-trace-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "log_level": 3,
        }
    )
    found: dict[tuple[str, int, int], dict[str, Any] | None] = {}
    try:
        for topic, partition, offset in sorted(wanted):
            found[topic, partition, offset] = _fetch(consumer, topic, partition, offset)
    finally:
        consumer.close()
    return found


def _fetch(consumer: Consumer, topic: str, partition: int, offset: int) -> dict[str, Any] | None:
    consumer.assign([TopicPartition(topic, partition, offset)])
    msg = consumer.poll(FETCH_TIMEOUT_S)
    if (
        msg is None
        or msg.error() is not None
        or (msg.topic(), msg.partition(), msg.offset()) != (topic, partition, offset)
    ):
        return None  # gone (retention), or not there
    return _describe(msg)


def _describe(msg: Message) -> dict[str, Any]:
    raw: Any = msg.headers() or []
    headers = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in raw]
    shown = {k: v.decode(errors="replace") for k, v in headers if k != h.DLQ_ERROR}
    out: dict[str, Any] = {
        "key": (msg.key() or b"").decode(errors="replace"),
        "headers": shown,
        "bytes": len(msg.value() or b""),
    }
    info = parse_dead_letter(headers)
    if info is not None:
        out["dead_letter"] = {
            "reason": info.reason,
            "stage": info.stage,
            "error": info.error,
            "source": f"{info.source_topic}[{info.source_partition}]@{info.source_offset}",
            "failed_at": info.failed_at,
            "replay_count": info.replay_count,
        }
    elif (msg.value() or b"")[:2] == b"\xc3\x01":
        try:
            out["value"] = decode(msg.value() or b"").to_avro()
        except Exception:  # a record the sink dead-lettered as unsupported: show no value
            out["value"] = None
    return out


def plain(value: Any) -> Any:
    """JSON for the values ``json`` cannot write (times, durations, bytes): a trace's
    ``default``, here and in the console."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode(errors="replace")
    return str(value)


def _where(d: dict[str, Any]) -> str:
    return f"{d['topic']}[{d['partition']}]@{d['offset']}"


def render_text(trace: dict[str, Any]) -> str:
    """The trace as a report for a terminal."""
    o = trace["outcome"]
    lines = [
        f"webhook {trace['webhook_id']} ({o['event'] or 'event unknown'})",
        f"  outcome   {o['outcome']}"
        + (f" ({o['reason']})" if o["reason"] else "")
        + f" by {o['stage']} at {plain(o['decided_at'])}; {o['attempts']} attempt(s)",
        f"  received  {plain(o['received_at']) if o['received_at'] else 'not on the raw topic'}",
    ]
    for r in trace["received"]:
        replay = f", replay {r['replay_count']}" if r["replay_count"] else ""
        gone = "" if r["on_topic"] else " (no longer on the topic)"
        lines.append(f"            {r['at']} at {_where(r)}{replay}{gone}")
    lines.append("  journey")
    for d in trace["decisions"]:
        reason = f" ({d['reason']})" if d["reason"] else ""
        replay = f" [replay {d['replay_count']}]" if d["replay_count"] else ""
        record = d.get("record")
        gone = "" if record is not None else "  (record no longer on the topic)"
        lines.append(
            f"    {plain(d['at'])}  {d['stage']:<9} {d['decision']}{reason}{replay}"
            f"  {_where(d)}{gone}"
        )
        if record is not None and record.get("dead_letter"):
            lines.append(f"        error: {record['dead_letter']['error']}")
        if record is not None and record.get("value"):
            value = record["value"]
            keys = ("transaction_id", "subscription_id", "customer_reference", "amount_cents")
            shown = ", ".join(f"{k}={value[k]}" for k in keys if value.get(k) is not None)
            lines.append(f"        record: {shown}")
    for r in trace["redrives"]:
        lines.append(
            f"  parked    {plain(r['parked_at'])}; "
            + (f"re-driven {plain(r['redriven_at'])}" if r["redriven_at"] else "waiting")
        )
    rows = trace["postgres"]
    if not rows["transactions"] and not rows["subscriptions"]:
        lines.append("  postgres  no row")
    for t in rows["transactions"]:
        lines.append(
            f"  postgres  transactions {t['transaction_id']}: {t['kind']} {t['amount_cents']}"
            f" {t['currency'] or ''} customer {t['customer_key']} partner {t['partner_key']}"
            f" (webhook {t['webhook_id']})"
        )
    for s in rows["subscriptions"]:
        lines.append(
            f"  postgres  subscriptions {s['subscription_id']}: {s['state']} product"
            f" {s['product_id']} customer {s['customer_key']} (last webhook {s['last_webhook_id']})"
        )
    return "\n".join(lines)


def run(webhook_id: str, settings: Settings, *, as_json: bool) -> int:
    try:
        number = int(webhook_id)
    except ValueError:
        print(f"chargify-stream: {webhook_id!r} is not a webhook id (a number)", file=sys.stderr)
        return 2
    trace = build_trace(settings, number)
    if as_json:
        print(json.dumps(trace, default=plain, indent=2))
    else:
        print(render_text(trace))
    return 0
