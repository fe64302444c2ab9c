"""Writing one batch of records to Postgres, idempotently, in one transaction.

- A transaction is inserted once, keyed by ``transaction_id``; a duplicate or replay is a
  no-op (``on conflict do nothing``). Its partner is the customer's partner at recording.
- A subscription change is applied only when it is newer than the stored state, by
  (event time, webhook id): Chargify does not guarantee order. Component allocations are
  merged per component, each guarded by its own (event time, webhook id), so an old
  allocation arriving late neither regresses a newer one nor is lost behind a newer state
  change.
- A record whose customer does not exist is not written: it is returned, to be
  dead-lettered with ``customer_not_found``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from schemas.records import SubscriptionChange, Transaction

Record = Transaction | SubscriptionChange


@dataclass
class BatchResult:
    written: int = 0
    unchanged: int = 0
    unknown_customer: list[int] = field(default_factory=list)  # indexes into the batch


def _customers(cur: psycopg.Cursor[Any], refs: set[str]) -> dict[str, str | None]:
    rows = cur.execute(
        "select customer_key, partner_key from customers where customer_key = any(%s)",
        (list(refs),),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def write_batch(conn: psycopg.Connection[Any], records: Sequence[Record]) -> BatchResult:
    """Apply ``records`` in one database transaction; the caller commits Kafka after."""
    result = BatchResult()
    with conn.transaction(), conn.cursor() as cur:
        customers = _customers(cur, {r.customer_reference for r in records})
        txns: list[tuple[Any, ...]] = []
        subs: list[SubscriptionChange] = []
        for i, rec in enumerate(records):
            if rec.customer_reference not in customers:
                result.unknown_customer.append(i)
            elif isinstance(rec, Transaction):
                txns.append(_transaction_row(rec, customers[rec.customer_reference]))
            else:
                subs.append(rec)
        if txns:
            cur.executemany(
                "insert into transactions (transaction_id, customer_key, partner_key,"
                " subscription_id, kind, amount_cents, currency, refunded_payment_id,"
                " occurred_at, webhook_id)"
                " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " on conflict (transaction_id) do nothing",
                txns,
                returning=False,
            )
            inserted = max(cur.rowcount, 0)
            result.written += inserted
            result.unchanged += len(txns) - inserted
        for sub in subs:
            if _apply_subscription(cur, sub):
                result.written += 1
            else:
                result.unchanged += 1
    return result


def _transaction_row(t: Transaction, partner: str | None) -> tuple[Any, ...]:
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


def _apply_subscription(cur: psycopg.Cursor[Any], s: SubscriptionChange) -> bool:
    """Upsert one subscription change; True when anything changed."""
    row = cur.execute(
        "select last_event_at, last_webhook_id, components, component_versions"
        " from subscriptions where subscription_id = %s for update",
        (s.subscription_id,),
    ).fetchone()
    components_changed = False
    if row is None:
        components, versions = {}, {}
        newer = True
    else:
        components, versions = dict(row[2]), dict(row[3])
        newer = (s.occurred_at, s.webhook_id) > (row[0], row[1])
    stamp = [s.occurred_at.isoformat(), s.webhook_id]
    for c in s.components:
        cid = str(c.component_id)
        seen = versions.get(cid)
        if seen is None or (stamp[0], stamp[1]) > (seen[0], seen[1]):
            components[cid] = _quantity(c.new_allocation)
            versions[cid] = stamp
            components_changed = True
    if row is None:
        cur.execute(
            "insert into subscriptions (subscription_id, customer_key, product_id,"
            " product_handle, plan_key, state, components, component_versions,"
            " last_webhook_id, last_event_at, updated_at)"
            " values (%s, %s, %s, %s, (select plan_key from plans where plan_key = %s::text),"
            " %s, %s, %s, %s, %s, now())",
            (
                s.subscription_id,
                s.customer_reference,
                s.product_id,
                s.product_handle,
                s.product_id,
                s.state,
                json.dumps(components),
                json.dumps(versions),
                s.webhook_id,
                s.occurred_at,
            ),
        )
        return True
    if newer:
        # Fields the event does not carry (null) keep their stored value.
        cur.execute(
            "update subscriptions set customer_key = %s,"
            " product_id = coalesce(%s, product_id),"
            " product_handle = coalesce(%s, product_handle),"
            " plan_key = coalesce((select plan_key from plans where plan_key = %s::text),"
            "   case when %s::bigint is null then plan_key end),"
            " state = coalesce(%s, state), components = %s, component_versions = %s,"
            " last_webhook_id = %s, last_event_at = %s, updated_at = now()"
            " where subscription_id = %s",
            (
                s.customer_reference,
                s.product_id,
                s.product_handle,
                s.product_id,
                s.product_id,
                s.state,
                json.dumps(components),
                json.dumps(versions),
                s.webhook_id,
                s.occurred_at,
                s.subscription_id,
            ),
        )
        return True
    if components_changed:
        cur.execute(
            "update subscriptions set components = %s, component_versions = %s,"
            " updated_at = now() where subscription_id = %s",
            (json.dumps(components), json.dumps(versions), s.subscription_id),
        )
        return True
    return False


def _quantity(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
