"""Writing one batch of records to Postgres, idempotently, in one database transaction.

- A transaction is inserted once, keyed by ``transaction_id``; a duplicate or replay is a
  no-op (``on conflict do nothing``). Its partner is the customer's partner at recording.
- Subscription changes are folded in Python to one row per subscription (the newest value
  of each field, the newest allocation of each component), then written by one set-based
  ``INSERT ... ON CONFLICT DO UPDATE`` whose SQL holds the ordering guard. Every field
  that an event can leave out (state, product id, product handle) and every component
  allocation carries its own version, (event time, webhook id), and is only replaced by a
  newer one, because Chargify does not guarantee order. The row's newest event
  (``last_event_at``, ``last_webhook_id``) decides the customer. So the stored state is
  the same whatever order and batching the events came in, and a replay changes nothing.
  The plan is the plan whose key is the final product id, when there is one.
- A record whose customer does not exist is not written: its index is returned, to be
  dead-lettered with ``customer_not_found``.
- Given where each record came from (``sources``), each record's outcome (``recorded``,
  ``unchanged``, ``parked``) is written to the outcome log (:mod:`sink.outcomes`) in the
  same transaction, so it is never lost and never ahead of the data.

Database errors leave as project errors, classified by SQLSTATE class (never by message):
:class:`DatabaseUnavailable` (retry the batch) or :class:`RejectedRecord` (something in the
batch is poison: find it and dead-letter it). Anything else is a bug or a schema problem,
and propagates unchanged.

The write path, one statement per table over ``unnest`` of binary array parameters, was
chosen by measurement against ``executemany`` in pipeline mode, text arrays, and binary
COPY into a staging table (``bench/sink/write_paths.py``).

Why one module of about 500 lines: the fold, the SQL that guards the ordering and the
column lists that feed it must agree field by field (a version written by the fold is
compared by the SQL), and the outcome log is written in the same transaction; split, a
field added in one place would be missed in another. The module holds one concept, one
batch's transaction, with no I/O outside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg.types.numeric import Int8BinaryDumper

from chargify_stream.base.errors import TransientError
from chargify_stream.schemas import headers
from chargify_stream.schemas.errors import RecordError
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from chargify_stream.sink.outcomes import (
    PARKED,
    RECORDED,
    UNCHANGED,
    Delivery,
    Source,
    write_deliveries,
)

Record = Transaction | SubscriptionChange

# Serialises plan creation (``plans add``) against sink batches: the sink holds it shared
# while it writes subscriptions, ``plans add`` exclusively while it links them. Without it,
# a subscription inserted while the plan is being created would see neither the plan nor
# be seen by the linking update, and stay unlinked.
PLAN_LINK_LOCK = 0x63686C6B

# SQLSTATE classes (psycopg.errors lists them). A record the database refuses for what it
# holds: 22 data exception (bad value, NUL in text, invalid JSON), 23 integrity constraint.
POISON_CLASSES = frozenset({"22", "23"})
# The database is unwell or busy, not the record: 08 connection exception, 40 transaction
# rollback (serialization failure, deadlock), 53 insufficient resources, 57 operator
# intervention (shutdown, cannot connect now, query canceled), 58 system (I/O) error.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

Version = tuple[int, int]  # (event time in microseconds since the epoch, webhook id)

# The subscription fields an event may leave out (null): each keeps its own version.
VERSIONED_FIELDS = ("state", "product_id", "product_handle")


class DatabaseUnavailable(TransientError):
    """The database cannot take the batch now; retry it. ``sqlstate`` is ``None`` when the
    connection itself failed."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class RejectedRecord(RecordError):
    """The database refused the batch because of a value in one of its records."""

    reason = headers.MALFORMED_PAYLOAD

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def classify(exc: psycopg.Error) -> DatabaseUnavailable | RejectedRecord | None:
    """The project error for a psycopg error; ``None`` for a bug or a schema problem.

    psycopg raises some errors before anything reaches the server, without a SQLSTATE:
    :class:`psycopg.DataError` for a value it cannot send (a NUL in text), and
    :class:`psycopg.OperationalError` or :class:`psycopg.InterfaceError` when the
    connection is gone. Those are told apart by their type.
    """
    state = exc.sqlstate
    name = type(exc).__name__
    first_line = (str(exc).splitlines() or [""])[0]
    if state is None:
        if isinstance(exc, psycopg.DataError):
            return RejectedRecord(f"{name}: {first_line}", None)
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            return DatabaseUnavailable(f"{name}: {first_line}", None)
        return None
    if state[:2] in POISON_CLASSES:
        return RejectedRecord(f"SQLSTATE {state} {name}: {first_line}", state)
    if state[:2] in TRANSIENT_CLASSES:
        return DatabaseUnavailable(f"SQLSTATE {state} {name}: {first_line}", state)
    return None


@dataclass
class BatchResult:
    """What one batch did, in rows per table: written (inserted or changed) and unchanged
    (a duplicate, a replay, or only older news), and the indexes of the records whose
    customer is unknown. Subscription rows are counted after folding the batch's changes."""

    transactions_written: int = 0
    transactions_unchanged: int = 0
    subscriptions_written: int = 0
    subscriptions_unchanged: int = 0
    unknown_customer: list[int] = field(default_factory=list)
    # Each record's outcome, in order (only when the batch's sources were given).
    outcomes: list[str] = field(default_factory=list)

    @property
    def written(self) -> int:
        return self.transactions_written + self.subscriptions_written

    @property
    def unchanged(self) -> int:
        return self.transactions_unchanged + self.subscriptions_unchanged


@dataclass
class SubscriptionRow:
    """The net effect of a batch's changes to one subscription.

    ``state``, ``product_id`` and ``product_handle`` are the values of the newest change
    that carried them, versioned in ``field_versions``; ``components`` holds the newest
    allocation of each component, versioned in ``component_versions``. ``occurred_at``
    and ``webhook_id`` are those of the newest change, whose customer is ``customer_key``.
    """

    subscription_id: int
    customer_key: str
    occurred_at: datetime
    webhook_id: int
    state: str | None = None
    product_id: int | None = None
    product_handle: str | None = None
    field_versions: dict[str, Version] = field(default_factory=dict)
    components: dict[str, int | float] = field(default_factory=dict)
    component_versions: dict[str, Version] = field(default_factory=dict)

    @property
    def version(self) -> Version:
        return (version_of(self.occurred_at), self.webhook_id)


def version_of(moment: datetime) -> int:
    """Microseconds since the Unix epoch, exactly (a float timestamp would round)."""
    return (moment - _EPOCH) // _MICROSECOND


def fold_subscriptions(changes: Iterable[SubscriptionChange]) -> list[SubscriptionRow]:
    """One row per subscription, ordered by id (a fixed lock order across sinks).

    The result does not depend on the order of ``changes``: each field and component is
    taken from the newest change that carries it, by (event time, webhook id).
    """
    rows: dict[int, SubscriptionRow] = {}
    for change in changes:
        version = (version_of(change.occurred_at), change.webhook_id)
        row = rows.get(change.subscription_id)
        if row is None:
            row = rows[change.subscription_id] = SubscriptionRow(
                change.subscription_id,
                change.customer_reference,
                change.occurred_at,
                change.webhook_id,
            )
        elif version > row.version:
            row.customer_key = change.customer_reference
            row.occurred_at = change.occurred_at
            row.webhook_id = change.webhook_id
        for name in VERSIONED_FIELDS:
            value = getattr(change, name)
            seen = row.field_versions.get(name)
            if value is not None and (seen is None or version > seen):
                setattr(row, name, value)
                row.field_versions[name] = version
        for component in change.components:
            key = str(component.component_id)
            seen = row.component_versions.get(key)
            if seen is None or version > seen:
                row.components[key] = quantity(component.new_allocation)
                row.component_versions[key] = version
    return [rows[key] for key in sorted(rows)]


def quantity(value: float) -> int | float:
    """An allocation as JSON shows it best: ``5``, not ``5.0``; fractions stay floats."""
    return int(value) if float(value).is_integer() else value


def lookup_customers(cur: psycopg.Cursor[Any], keys: Iterable[str]) -> dict[str, str | None]:
    """customer_key -> partner_key for every key that names an existing customer."""
    rows = cur.execute(
        "select customer_key, partner_key from customers where customer_key = any(%b::text[])",
        (list(set(keys)),),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def transaction_row(t: Transaction, partner: str | None) -> tuple[Any, ...]:
    """The TRANSACTION_COLUMNS of one transaction, in order."""
    return (
        t.transaction_id,
        t.customer_reference,
        partner,
        t.subscription_id,
        t.kind,
        t.amount_cents,
        t.currency,
        t.refunded_payment_id,
        t.occurred_at,
        t.webhook_id,
    )


def subscription_row(s: SubscriptionRow) -> tuple[Any, ...]:
    """The SUBSCRIPTION_COLUMNS of one folded row, in order."""
    return (
        s.subscription_id,
        s.customer_key,
        s.state,
        s.product_id,
        s.product_handle,
        Jsonb(s.components),
        Jsonb(s.component_versions),  # tuples become JSON arrays
        Jsonb(s.field_versions),
        s.webhook_id,
        s.occurred_at,
    )


# (column, type) of the arrays each statement unnests, in the order of transaction_row and
# subscription_row.
TRANSACTION_COLUMNS = (
    ("transaction_id", "bigint"),
    ("customer_key", "text"),
    ("partner_key", "text"),
    ("subscription_id", "bigint"),
    ("kind", "text"),
    ("amount_cents", "bigint"),
    ("currency", "text"),
    ("refunded_payment_id", "bigint"),
    ("occurred_at", "timestamptz"),
    ("webhook_id", "bigint"),
)
SUBSCRIPTION_COLUMNS = (
    ("subscription_id", "bigint"),
    ("customer_key", "text"),
    ("state", "text"),
    ("product_id", "bigint"),
    ("product_handle", "text"),
    ("components", "jsonb"),
    ("component_versions", "jsonb"),
    ("field_versions", "jsonb"),
    ("webhook_id", "bigint"),
    ("occurred_at", "timestamptz"),
)


def _unnest(cols: Sequence[tuple[str, str]], alias: str) -> str:
    """``unnest(%b::t1[], ...) as alias (c1, ...)``: binary arrays, one per column."""
    arrays = ", ".join(f"%b::{t}[]" for _, t in cols)
    return f"unnest({arrays}) as {alias} ({', '.join(c for c, _ in cols)})"


def insert_transactions_sql(source: str) -> str:
    """Insert the transactions of ``source`` (a FROM item with TRANSACTION_COLUMNS)."""
    names = ", ".join(c for c, _ in TRANSACTION_COLUMNS)
    return (
        f"insert into transactions ({names}) select {names} from {source}"
        " on conflict (transaction_id) do nothing"
    )


def _newer(name: str) -> str:
    """SQL: the batch's value of field ``name`` is newer than the stored one."""
    return f"excluded.field_versions -> '{name}' > coalesce(t.field_versions -> '{name}', '[]')"


def _pick(name: str) -> str:
    return f"case when {_newer(name)} then excluded.{name} else t.{name} end"


_ROW_NEWER = (
    "(excluded.last_event_at, excluded.last_webhook_id) > (t.last_event_at, t.last_webhook_id)"
)
# Most changes carry no allocation: skip the (not inlinable) merge functions for them.
_HAS_COMPONENTS = "excluded.component_versions <> '{}'"


def upsert_subscriptions_sql(source: str) -> str:
    """Upsert the folded subscription rows of ``source`` (aliased ``s``, with
    SUBSCRIPTION_COLUMNS): one row per subscription id, as ON CONFLICT DO UPDATE needs.

    A new subscription is inserted as folded, with the plan of its product. An existing
    one takes each field and component only where the batch's version is newer, and the
    customer only from a newer event; ``excluded`` is the batch's row, ``t`` the stored one
    as it was before. A row with nothing newer is not rewritten (the WHERE clause), so a
    replay leaves even ``updated_at`` alone. Being one statement, it is also right when
    another sink inserts the same subscription concurrently (after a rebalance).

    The three fields are spelled out rather than merged by a function: this statement is
    most of the sink's database time, and a SQL function call per row costs more than the
    expression.
    """
    newer_fields = " or ".join(_newer(f) for f in VERSIONED_FIELDS)
    field_versions = ", ".join(
        f"'{f}', case when {_newer(f)} then excluded.field_versions -> '{f}' end"
        for f in VERSIONED_FIELDS
    )
    return (
        "insert into subscriptions as t (subscription_id, customer_key, state, product_id,"
        " product_handle, plan_key, components, component_versions, field_versions,"
        " last_webhook_id, last_event_at)"
        " select s.subscription_id, s.customer_key, s.state, s.product_id, s.product_handle,"
        " p.plan_key, s.components, s.component_versions, s.field_versions, s.webhook_id,"
        " s.occurred_at"
        f" from {source}"
        " left join plans p on p.plan_key = s.product_id::text"
        # Rows are locked in the order they are inserted; without this the join may
        # reorder them, and two writers would deadlock on subscriptions both touch.
        " order by s.subscription_id"
        " on conflict (subscription_id) do update set"
        f" customer_key = case when {_ROW_NEWER}"
        " then excluded.customer_key else t.customer_key end,"
        + "".join(f" {f} = {_pick(f)}," for f in VERSIONED_FIELDS)
        + " plan_key = (select p.plan_key from plans p"
        f"   where p.plan_key = ({_pick('product_id')})::text),"
        f" components = case when {_HAS_COMPONENTS} then sink_merge_values("
        "   t.components, t.component_versions, excluded.components,"
        "   excluded.component_versions) else t.components end,"
        f" component_versions = case when {_HAS_COMPONENTS} then sink_merge_versions("
        "   t.component_versions, excluded.component_versions) else t.component_versions end,"
        # The newer versions laid over the stored ones (jsonb_strip_nulls drops the rest).
        f" field_versions = t.field_versions || jsonb_strip_nulls(jsonb_build_object("
        f"{field_versions})),"
        f" last_webhook_id = case when {_ROW_NEWER}"
        " then excluded.last_webhook_id else t.last_webhook_id end,"
        f" last_event_at = case when {_ROW_NEWER}"
        " then excluded.last_event_at else t.last_event_at end,"
        " updated_at = now()"
        f" where {_ROW_NEWER} or {newer_fields}"
        f" or ({_HAS_COMPONENTS}"
        " and sink_has_newer(t.component_versions, excluded.component_versions))"
    )


INSERT_TRANSACTIONS = insert_transactions_sql(_unnest(TRANSACTION_COLUMNS, "t"))
UPSERT_SUBSCRIPTIONS = upsert_subscriptions_sql(_unnest(SUBSCRIPTION_COLUMNS, "s"))


def columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows (at least one) to one list per column: the arrays ``unnest`` takes."""
    return [list(column) for column in zip(*rows, strict=True)]


def write_batch(
    conn: psycopg.Connection[Any],
    records: Sequence[Record],
    sources: Sequence[Source] | None = None,
) -> BatchResult:
    """Apply ``records`` in one database transaction; the caller commits Kafka after.

    With ``sources`` (where each record was read), each record's outcome is recorded in
    the outcome log within the same transaction.

    Raises :class:`DatabaseUnavailable` or :class:`RejectedRecord` (the transaction is
    rolled back either way); other errors propagate as psycopg raised them.
    """
    try:
        return _write_batch(conn, records, sources)
    except psycopg.Error as exc:
        classified = classify(exc)
        if classified is None:
            raise
        raise classified from exc


def _write_batch(
    conn: psycopg.Connection[Any], records: Sequence[Record], sources: Sequence[Source] | None
) -> BatchResult:
    result = BatchResult()
    inserted: set[int] = set()  # transaction ids this batch inserted
    written: set[int] = set()  # subscription ids this batch changed
    folded: list[SubscriptionRow] = []
    logged = sources is not None  # the outcome log needs the ids each statement changed
    with conn.transaction(), conn.cursor() as cur:
        # Every int is sent as int8, so the statements keep one parameter signature and
        # psycopg can prepare them once per connection.
        cur.adapters.register_dumper(int, Int8BinaryDumper)
        customers = lookup_customers(cur, (r.customer_reference for r in records))
        txns: list[tuple[Any, ...]] = []
        changes: list[SubscriptionChange] = []
        for i, rec in enumerate(records):
            if rec.customer_reference not in customers:
                result.unknown_customer.append(i)
            elif isinstance(rec, Transaction):
                txns.append(transaction_row(rec, customers[rec.customer_reference]))
            else:
                changes.append(rec)
        if txns:
            # In id order, as every writer does: duplicates in two concurrent batches
            # (replays) then wait for each other instead of deadlocking.
            txns.sort(key=lambda row: row[0])
            count, inserted = _apply(
                cur, INSERT_TRANSACTIONS, INSERT_TRANSACTIONS_RETURNING, txns, ids=logged
            )
            result.transactions_written = count
            result.transactions_unchanged = len(txns) - count
        if changes:
            folded = fold_subscriptions(changes)
            rows = [subscription_row(s) for s in folded]
            cur.execute("select pg_advisory_xact_lock_shared(%s)", (PLAN_LINK_LOCK,))
            count, written = _apply(
                cur, UPSERT_SUBSCRIPTIONS, UPSERT_SUBSCRIPTIONS_RETURNING, rows, ids=logged
            )
            result.subscriptions_written = count
            result.subscriptions_unchanged = len(rows) - count
        if sources is not None:
            now = datetime.now(UTC)
            result.outcomes = record_outcomes(records, customers, inserted, written, folded)
            write_deliveries(
                cur,
                [
                    sink_delivery(rec, outcome, source, now)
                    for rec, outcome, source in zip(records, result.outcomes, sources, strict=True)
                ],
            )
    return result


INSERT_TRANSACTIONS_RETURNING = INSERT_TRANSACTIONS + " returning transaction_id"
UPSERT_SUBSCRIPTIONS_RETURNING = UPSERT_SUBSCRIPTIONS + " returning t.subscription_id"


def _apply(
    cur: psycopg.Cursor[Any],
    plain: str,
    returning: str,
    rows: Sequence[tuple[Any, ...]],
    *,
    ids: bool,
) -> tuple[int, set[int]]:
    """Run an unnest statement over ``rows``: how many rows it changed and, with ``ids``
    (for the outcome log), which ones, by its ``returning`` form; else no ids."""
    if not ids:
        cur.execute(plain, columns(rows))
        return cur.rowcount, set()
    cur.execute(returning, columns(rows))
    changed = {row[0] for row in cur.fetchall()}
    return len(changed), changed


def record_outcomes(
    records: Sequence[Record],
    customers: dict[str, str | None],
    inserted: set[int],
    written: set[int],
    folded: Sequence[SubscriptionRow],
) -> list[str]:
    """Each record's outcome: ``parked`` (unknown customer), ``recorded`` (it wrote its
    transaction, or a subscription change that the stored row now carries), else
    ``unchanged`` (a duplicate or replay, or older than what is stored)."""
    rows = {row.subscription_id: row for row in folded}
    first: set[int] = set()  # transaction ids already recorded by an earlier record
    outcomes: list[str] = []
    for rec in records:
        if rec.customer_reference not in customers:
            outcomes.append(PARKED)
        elif isinstance(rec, Transaction):
            new = rec.transaction_id in inserted and rec.transaction_id not in first
            first.add(rec.transaction_id)
            outcomes.append(RECORDED if new else UNCHANGED)
        else:
            row = rows.get(rec.subscription_id)
            version = (version_of(rec.occurred_at), rec.webhook_id)
            carried = row is not None and (
                version == row.version
                or version in row.field_versions.values()
                or version in row.component_versions.values()
            )
            outcomes.append(RECORDED if carried and rec.subscription_id in written else UNCHANGED)
    return outcomes


def sink_delivery(rec: Record, outcome: str, source: Source, at: datetime) -> Delivery:
    """The outcome log's row for the sink's decision on one record."""
    return Delivery(
        webhook_id=rec.webhook_id,
        stage=headers.STAGE_SINK,
        decision=outcome,
        reason=headers.CUSTOMER_NOT_FOUND if outcome == PARKED else None,
        topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        replay_count=source.replay_count,
        at=at,
        event=rec.event,
        received_at=source.received_at,
        transaction_id=rec.transaction_id if isinstance(rec, Transaction) else None,
        subscription_id=rec.subscription_id,
        customer_key=rec.customer_reference,
        # Each record is one delivery decided: a raw record split by the processor, or a
        # re-drive or sink-stage replay.
        attempt=True,
        source_topic=source.raw[0] if source.raw else None,
        source_partition=source.raw[1] if source.raw else None,
        source_offset=source.raw[2] if source.raw else None,
    )
