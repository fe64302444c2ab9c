"""The benchmarks' workload: a realistic mix of decoded transactions and subscription changes.

60 % payments and refunds, 40 % subscription changes (each subscription gets a signup, a
state change, a product change and a component allocation), spread over 1,000 customers
and 20 products (10 with a plan), in time order with a tenth of each subscription's events
swapped (Chargify does not guarantee order). Ids are above 2**31, like Chargify's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from chargify_stream.schemas.records import ComponentAllocation, SubscriptionChange, Transaction
from chargify_stream.sink.upsert import Record

T0 = datetime(2024, 10, 1, tzinfo=UTC)
CUSTOMERS = 1000
PRODUCTS = [3_790_000 + i for i in range(20)]
PLANS = PRODUCTS[:10]


@dataclass(frozen=True)
class Workload:
    records: list[Record]
    customers: list[tuple[str, str | None]]  # (customer_key, partner_key)
    partners: list[str]
    plans: list[str]

    @property
    def transactions(self) -> int:
        return sum(isinstance(r, Transaction) for r in self.records)

    @property
    def changes(self) -> int:
        return len(self.records) - self.transactions


def make_workload(n: int, seed: int = 7) -> Workload:
    """``n`` records in arrival order."""
    rnd = random.Random(seed)
    ids = iter(range(3_000_000_001, 3_000_000_001 + 10 * n))
    partners = [f"partner-{i}" for i in range(20)]
    customers = [
        (f"cust-{i}", partners[i % len(partners)] if i % 10 else None) for i in range(CUSTOMERS)
    ]
    timed: list[tuple[float, Record]] = []
    n_changes = (int(n * 0.4) // 4) * 4
    for s in range(n_changes // 4):
        customer = customers[rnd.randrange(CUSTOMERS)][0]
        sub_id = 60_000_000 + s
        start = rnd.uniform(0, 30 * 24 * 60)
        product, new_product = rnd.sample(PRODUCTS, 2)
        events = [
            ("signup_success", dict(state="active", product_id=product, product_handle="p")),
            ("subscription_state_change", dict(state="past_due", product_id=product)),
            (
                "subscription_product_change",
                dict(state="past_due", product_id=new_product, product_handle="q"),
            ),
            (
                "component_allocation_change",
                dict(
                    state="past_due",
                    product_id=new_product,
                    components=(
                        ComponentAllocation(component_id=277221, new_allocation=rnd.randint(1, 9)),
                    ),
                ),
            ),
        ]
        for k, (event, fields) in enumerate(events):
            minute = start + k * rnd.uniform(1, 600)
            change = SubscriptionChange(
                subscription_id=sub_id,
                customer_reference=customer,
                occurred_at=T0 + timedelta(minutes=minute),
                webhook_id=next(ids),
                event=event,
                **fields,  # type: ignore[arg-type]
            )
            # A tenth arrive late, behind the next event.
            arrival = minute + (700 if rnd.random() < 0.1 else 0)
            timed.append((arrival, change))
    payments: list[int] = []
    for _ in range(n - n_changes):
        customer = customers[rnd.randrange(CUSTOMERS)][0]
        minute = rnd.uniform(0, 30 * 24 * 60)
        refund = bool(payments) and rnd.random() < 0.1
        tid = next(ids)
        amount = rnd.randint(100, 50_000)
        txn = Transaction(
            transaction_id=tid,
            kind="refund" if refund else "payment",
            amount_cents=-amount if refund else amount,
            currency="USD",
            customer_reference=customer,
            subscription_id=60_000_000 + rnd.randrange(max(n_changes // 4, 1)),
            refunded_payment_id=rnd.choice(payments) if refund else None,
            occurred_at=T0 + timedelta(minutes=minute),
            webhook_id=next(ids),
            event="refund_success" if refund else "payment_success",
        )
        payments.append(tid)
        timed.append((minute, txn))
    timed.sort(key=lambda pair: pair[0])
    return Workload(
        records=[r for _, r in timed],
        customers=customers,
        partners=partners,
        plans=[str(p) for p in PLANS],
    )


def seed(conn: psycopg.Connection[Any], workload: Workload) -> None:
    """Partners, customers and plans the workload's records refer to; empty sink tables."""
    with conn.transaction():
        conn.execute("truncate transactions, subscriptions, customers, partners, plans")
        with conn.cursor() as cur:
            cur.executemany("insert into partners (partner_key) values (%s)",
                            [(p,) for p in workload.partners])  # fmt: skip
            cur.executemany(
                "insert into customers (customer_key, partner_key) values (%s, %s)",
                workload.customers,
            )
            cur.executemany(
                "insert into plans (plan_key, name) values (%s, %s)",
                [(p, f"Plan {p}") for p in workload.plans],
            )


def empty_sink_tables(dsn: str) -> None:
    """Truncate what a run wrote and refresh statistics, so every run starts alike."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("truncate transactions, subscriptions")
        conn.execute("vacuum analyze transactions, subscriptions, customers, plans")
