"""The outcome log: ``webhook_deliveries`` and ``webhook_outcomes``, written in one statement.

Every decision a stage takes on one delivery of a webhook is a :class:`Delivery`. Writing a
batch of them (:func:`write_deliveries`) inserts the ones not yet known (keyed by webhook
id, stage and the record decided on, so reading a topic again after a crash adds nothing)
and folds only those into each webhook's outcome row, in the same statement:

- ``attempts`` grows by the new decisions on deliveries into the pipeline: every raw
  record (Chargify's first delivery, its retries, processor-stage replays) ends in exactly
  one of a typed record (decided by the sink), a processor dead letter or a processor
  decision record, and re-drives and sink-stage replays are decided by the sink again;
- the outcome moves to the newest decision (by the stage's decision time), except that
  ``recorded`` never moves back: a later delivery of a recorded webhook only counts as an
  attempt. ``duplicate`` says nothing about the outcome (a webhook first seen through a
  duplicate is ``received`` until its first delivery's decision arrives).

Each decision carries the raw record it traces back to (``source_*``; typed records carry
it in ``chargify-raw-position``), so the raw topic itself is never read: the outcome log
costs the hot path one statement per sink batch and nothing per raw record.

Who writes: the sink, in the transaction of its upserts (``recorded``, ``unchanged``,
``parked``), so an outcome is never lost nor ahead of the data; and the outcome recorder
(:mod:`sink.recorder`) for the dead-letter topic and the processor's decisions topic. Rows
are locked in webhook id order, as every writer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import psycopg

from chargify_stream.schemas import headers as h

__all__ = [
    "OUTCOMES",
    "RECEIVED",
    "Delivery",
    "Source",
    "parse_int",
    "parse_position",
    "parse_time",
    "source_of",
    "write_deliveries",
]

RECEIVED: Final = "received"
RECORDED: Final = "recorded"
UNCHANGED: Final = "unchanged"
PARKED: Final = "parked"
DEAD_LETTERED: Final = "dead_lettered"
IGNORED: Final = "ignored"
DUPLICATE: Final = "duplicate"
# The decisions that are an outcome (``received`` and ``duplicate`` are not).
OUTCOMES: Final = (RECORDED, UNCHANGED, IGNORED, DEAD_LETTERED, PARKED)


# A named tuple, not a dataclass: one is made per record on the hot path, and its fields
# go to the database as they are.
class Delivery(NamedTuple):
    """One stage's decision on one record of one webhook (a ``webhook_deliveries`` row)."""

    webhook_id: int
    stage: str
    decision: str
    reason: str | None
    topic: str
    partition: int
    offset: int
    replay_count: int
    at: datetime
    event: str | None = None
    received_at: datetime | None = None
    transaction_id: int | None = None
    subscription_id: int | None = None
    customer_key: str | None = None
    # Whether this decision is on a delivery into the pipeline (counted in ``attempts``).
    attempt: bool = False
    # The raw record this traces back to, when known.
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None


class Source(NamedTuple):
    """Where the sink read one record, and the raw record it came from."""

    topic: str
    partition: int
    offset: int
    replay_count: int
    received_at: datetime | None
    raw: tuple[str, int, int] | None = None


_COLUMNS = (
    ("webhook_id", "bigint"),
    ("stage", "text"),
    ("decision", "text"),
    ("reason", "text"),
    ("topic", "text"),
    ('"partition"', "integer"),
    ('"offset"', "bigint"),
    ("replay_count", "integer"),
    ("at", "timestamptz"),
    ("event", "text"),
    ("received_at", "timestamptz"),
    ("transaction_id", "bigint"),
    ("subscription_id", "bigint"),
    ("customer_key", "text"),
    ("attempt", "boolean"),
    ("source_topic", "text"),
    ("source_partition", "integer"),
    ("source_offset", "bigint"),
)
_NAMES = ", ".join(c for c, _ in _COLUMNS)
_OUTCOME_LIST = ", ".join(f"'{o}'" for o in OUTCOMES)
# The decision that becomes the webhook's outcome, among a batch's: recorded first, then
# the newest.
_WINNER = (
    f"order by decision = '{RECORDED}' desc, at desc) filter (where decision in ({_OUTCOME_LIST})"
)
# Whether the batch's outcome replaces the stored one.
_MOVES = (
    f"excluded.outcome <> '{RECEIVED}' and (excluded.outcome = '{RECORDED}'"
    f" or (t.outcome <> '{RECORDED}'"
    f" and (t.outcome = '{RECEIVED}' or excluded.decided_at >= t.decided_at)))"
)

_INSERT_NEW = (
    "with new as ("
    f" insert into webhook_deliveries ({_NAMES})"
    f" select {_NAMES} from unnest("
    + ", ".join(f"%b::{t}[]" for _, t in _COLUMNS)
    + f") as b ({_NAMES})"
    " on conflict do nothing"
    " returning *)"
)
_UPSERT_OUTCOMES = (
    " insert into webhook_outcomes as t (webhook_id, event, outcome, reason, stage,"
    " transaction_id, subscription_id, customer_key, received_at, decided_at, attempts)"
    " select webhook_id, event, outcome, reason, stage, transaction_id, subscription_id,"
    " customer_key, received_at, decided_at, attempts from {source} order by webhook_id"
    " on conflict (webhook_id) do update set"
    f" outcome = case when {_MOVES} then excluded.outcome else t.outcome end,"
    f" reason = case when {_MOVES} then excluded.reason else t.reason end,"
    f" stage = case when {_MOVES} then excluded.stage else t.stage end,"
    f" decided_at = case when {_MOVES} then excluded.decided_at else t.decided_at end,"
    " event = coalesce(t.event, excluded.event),"
    " transaction_id = coalesce(t.transaction_id, excluded.transaction_id),"
    " subscription_id = coalesce(t.subscription_id, excluded.subscription_id),"
    " customer_key = coalesce(excluded.customer_key, t.customer_key),"
    " received_at = least(t.received_at, excluded.received_at),"
    " attempts = t.attempts + excluded.attempts"
)

# Several deliveries of one webhook in the batch: fold them to one outcome row first (ON
# CONFLICT cannot touch a row twice in one statement).
WRITE_DELIVERIES = (
    _INSERT_NEW + ", agg as ("
    " select webhook_id,"
    "  max(event) as event,"
    f"  coalesce((array_agg(decision {_WINNER}))[1], '{RECEIVED}') as outcome,"
    f"  (array_agg(reason {_WINNER}))[1] as reason,"
    f"  coalesce((array_agg(stage {_WINNER}))[1], min(stage)) as stage,"
    "  max(transaction_id) as transaction_id,"
    "  max(subscription_id) as subscription_id,"
    "  max(customer_key) as customer_key,"
    "  min(received_at) as received_at,"
    f"  coalesce((array_agg(at {_WINNER}))[1], min(at)) as decided_at,"
    "  (count(*) filter (where attempt))::integer as attempts"
    " from new group by webhook_id)" + _UPSERT_OUTCOMES.format(source="agg")
)
# One delivery per webhook (the sink's batches, nearly always): no folding. Measured on a
# 1,000-record batch, the grouping cost about as much as the inserts.
WRITE_UNIQUE_DELIVERIES = (
    _INSERT_NEW + ", one as ("
    " select webhook_id, event,"
    f"  case when decision in ({_OUTCOME_LIST}) then decision else '{RECEIVED}' end as outcome,"
    f"  case when decision in ({_OUTCOME_LIST}) then reason end as reason,"
    "  stage, transaction_id, subscription_id, customer_key, received_at,"
    "  at as decided_at, attempt::integer as attempts"
    " from new)" + _UPSERT_OUTCOMES.format(source="one")
)


def source_of(
    topic: str, partition: int, offset: int, headers: Sequence[tuple[str, bytes | None]]
) -> Source:
    """The :class:`Source` of a record, from its ``received-at``, ``dlq-replay-count`` and
    ``chargify-raw-position`` headers."""
    received_at: datetime | None = None
    replay_count = 0
    raw = None
    for name, value in headers:
        if value is None:
            continue
        if name == h.RECEIVED_AT:
            received_at = parse_time(value)
        elif name == h.DLQ_REPLAY_COUNT:
            replay_count = parse_int(value) or 0
        elif name == h.RAW_POSITION:
            raw = parse_position(value)
    return Source(topic, partition, offset, replay_count, received_at, raw)


def parse_position(value: bytes) -> tuple[str, int, int] | None:
    """``topic/partition/offset`` (a ``chargify-raw-position`` value), or ``None``."""
    parts = value.decode(errors="replace").rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def parse_time(value: bytes | str) -> datetime | None:
    """An RFC 3339 time (as the pipeline's headers carry it), or ``None``."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_int(value: bytes | str) -> int | None:
    """A decimal id that fits a bigint, or ``None``."""
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 <= number < 2**63 else None


def write_deliveries(
    cur: psycopg.Cursor[Any], deliveries: Sequence[Delivery], *, fold: bool | None = None
) -> None:
    """Record ``deliveries`` in the cursor's transaction (the caller commits).

    ``fold`` chooses the statement: by default the folding one only when a webhook has
    several deliveries in the batch (both give the same result; tests run both).
    """
    if not deliveries:
        return
    rows = sorted(deliveries, key=lambda row: row[0])
    if fold is None:
        fold = len({row[0] for row in rows}) < len(rows)
    sql = WRITE_DELIVERIES if fold else WRITE_UNIQUE_DELIVERIES
    cur.execute(sql, [list(col) for col in zip(*rows, strict=True)])
