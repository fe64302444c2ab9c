"""The raw records of the processor benchmark: real-size bodies, a realistic mix.

Bodies come from ``tests.builders`` (the field sets and sizes of the real captures:
payment_success about 4.3 kB, subscription events 3.5-4.1 kB, refunds and allocations
0.7 kB), keyed by subscription id and with the headers the gateway writes. The mix:

=====================================  =====  ==========================================
payment_success                         45 %  transactions
subscription_state_change               15 %  subscriptions
signup_success                          10 %  subscriptions
component_allocation_change             10 %  subscriptions, resolved through the table
refund_success                           5 %  transactions
subscription_product_change              5 %  subscriptions
renewal_success                          5 %  ignored (an event we do not act on)
component change, unknown subscription   1 %  dead letter (unknown_subscription)
exact duplicate of an earlier webhook    4 %  dropped
=====================================  =====  ==========================================

Allocation changes name a subscription that an earlier record introduced, so the table
resolves them; ``expected`` counts what each output topic must receive.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from chargify_stream.schemas import headers as h
from tests.builders import build_body

Raw = tuple[bytes, bytes, list[tuple[str, bytes]]]

MIX = (
    ("payment_success", 45),
    ("subscription_state_change", 15),
    ("signup_success", 10),
    ("component_allocation_change", 10),
    ("refund_success", 5),
    ("subscription_product_change", 5),
    ("renewal_success", 5),
    ("unknown_allocation", 1),
    ("duplicate", 4),
)
TOPIC_OF = {
    "payment_success": "transactions",
    "refund_success": "transactions",
    "signup_success": "subscriptions",
    "subscription_state_change": "subscriptions",
    "subscription_product_change": "subscriptions",
    "component_allocation_change": "subscriptions",
    "unknown_allocation": "deadletter",
}


@dataclass
class Workload:
    records: list[Raw] = field(default_factory=list)
    expected: Counter[str] = field(default_factory=Counter)  # output topic -> records
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def mean_body_bytes(self) -> float:
        return sum(len(v) for _, v, _ in self.records) / len(self.records)


def _record(event: str, body: bytes, key: int, webhook_id: int) -> Raw:
    return (
        str(key).encode(),
        body,
        [
            (h.WEBHOOK_ID, str(webhook_id).encode()),
            (h.EVENT, event.encode()),
            (h.RECEIVED_AT, b"2024-10-11T19:28:31.000Z"),
            (h.CONTENT_TYPE, b"application/x-www-form-urlencoded"),
            (h.SOURCE_IP, b"127.0.0.1"),
        ],
    )


def make_workload(count: int, *, subscriptions: int = 5000, seed: int = 7) -> Workload:
    rng = random.Random(seed)
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    work = Workload()
    known: list[int] = []  # subscriptions some record has introduced with a reference
    emitted: list[Raw] = []
    webhook_id = 4_000_000_000
    while len(work.records) < count:
        kind = rng.choices(kinds, weights)[0]
        if kind == "duplicate" and emitted:
            work.records.append(rng.choice(emitted))
            work.kinds[kind] += 1
            continue
        if kind == "duplicate" or (kind == "component_allocation_change" and not known):
            kind = "payment_success"
        webhook_id += 1
        if kind == "unknown_allocation":
            sid = 900_000_000 + webhook_id
            body = build_body("component_allocation_change", webhook_id=webhook_id,
                              subscription_id=sid)  # fmt: skip
            event = "component_allocation_change"
        elif kind == "component_allocation_change":
            sid = rng.choice(known)
            body = build_body(kind, webhook_id=webhook_id, subscription_id=sid,
                              new_allocation=str(rng.randint(1, 50)))  # fmt: skip
            event = kind
        else:
            sid = 10_000_000 + rng.randrange(subscriptions)
            event = "signup_success" if kind == "renewal_success" else kind
            body = build_body(event, webhook_id=webhook_id, subscription_id=sid,
                              reference=f"cust-{sid}")  # fmt: skip
            if kind == "renewal_success":
                body = body.replace(b"&event=signup_success&", b"&event=renewal_success&", 1)
                event = kind
            known.append(sid)
        record = _record(event, body, sid, webhook_id)
        work.records.append(record)
        work.kinds[kind] += 1
        if kind in TOPIC_OF:
            work.expected[TOPIC_OF[kind]] += 1
            if kind != "unknown_allocation":
                emitted.append(record)
    return work
