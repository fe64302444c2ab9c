"""Signed webhook bodies for the end-to-end benchmark, and the customers they name.

Every body is a real-shape Chargify form body from ``tests/builders.py`` (about 4.3 kB
for a payment, 3.5 kB for a signup). Building one with ``build_body`` takes about 1 ms,
too slow for the 150,000 a run needs, so each event type is built once with sentinel ids
and the sentinels are replaced per body; :func:`check_templates` compares the result
with ``build_body`` for a few bodies, so the shortcut cannot drift from the builder.

The mix: 90 % ``payment_success`` on 500 subscriptions of 100 customers (one
``transactions`` row each), 10 % ``signup_success`` of a new subscription (one
``subscriptions`` row each). Every body has its own webhook id, so body ``i`` of the run
is webhook ``WEBHOOK_BASE + i``, and its row in Postgres can be found by that id alone
(``transactions.webhook_id``, ``subscriptions.last_webhook_id``).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tests.builders import DEFAULT_OCCURRED_AT, build_body

PARTNER = "e2e-partner"
CUSTOMERS = [f"e2e-cust-{n:03d}" for n in range(100)]
SUBSCRIPTIONS = 500  # the payments' subscriptions, each of customer (index % 100)
SIGNUP_EVERY = 10  # body i is a signup when i % SIGNUP_EVERY == SIGNUP_EVERY - 1

WEBHOOK_BASE = 6_000_000_000
EVENT_BASE = 6_500_000_000
TRANSACTION_BASE = 7_000_000_000
PAYMENT_SUBSCRIPTION_BASE = 40_000_000
SIGNUP_SUBSCRIPTION_BASE = 50_000_000
PRODUCT_ID = 3792003
PRODUCT_HANDLE = "basic"
OCCURRED_AT: datetime = DEFAULT_OCCURRED_AT

# Sentinels: each appears in the built template only where its field's value goes.
_WEBHOOK = 9101010101010101
_EVENT = 9202020202020202
_TRANSACTION = 9303030303030303
_SUBSCRIPTION = 9404040404040404
_REFERENCE = "zzrefzz"
_AMOUNT = 9505050505


@dataclass(frozen=True, slots=True)
class Body:
    """One webhook: its ids and what the pipeline should write for it."""

    index: int
    event: str
    webhook_id: int
    subscription_id: int
    reference: str
    transaction_id: int | None
    amount_cents: int

    def fields(self) -> dict[str, object]:
        """``build_body`` keyword arguments that make this body."""
        fields: dict[str, object] = {
            "webhook_id": self.webhook_id,
            "event_id": EVENT_BASE + self.index,
            "subscription_id": self.subscription_id,
            "reference": self.reference,
        }
        if self.event == "payment_success":
            fields |= {"transaction_id": self.transaction_id, "amount_cents": self.amount_cents}
        return fields


def body(index: int) -> Body:
    """Body ``index`` of the run (the same index always gives the same body)."""
    webhook_id = WEBHOOK_BASE + index
    if index % SIGNUP_EVERY == SIGNUP_EVERY - 1:
        return Body(
            index,
            "signup_success",
            webhook_id,
            SIGNUP_SUBSCRIPTION_BASE + index,
            CUSTOMERS[(index * 7) % len(CUSTOMERS)],
            None,
            0,
        )
    sub = index % SUBSCRIPTIONS
    return Body(
        index,
        "payment_success",
        webhook_id,
        PAYMENT_SUBSCRIPTION_BASE + sub,
        CUSTOMERS[sub % len(CUSTOMERS)],
        TRANSACTION_BASE + index,
        100 + index % 9900,
    )


def _template(event: str) -> list[bytes | str]:
    """The event's body split at the sentinels: literal bytes and field names in turn."""
    raw = build_body(
        event,
        webhook_id=_WEBHOOK,
        event_id=_EVENT,
        transaction_id=_TRANSACTION,
        subscription_id=_SUBSCRIPTION,
        reference=_REFERENCE,
        amount_cents=_AMOUNT,
        product_id=PRODUCT_ID,
        product_handle=PRODUCT_HANDLE,
        occurred_at=OCCURRED_AT,
    )
    parts: list[bytes | str] = [raw]
    for name, sentinel in (
        ("webhook", str(_WEBHOOK)),
        ("event", str(_EVENT)),
        ("transaction", str(_TRANSACTION)),
        ("subscription", str(_SUBSCRIPTION)),
        ("reference", _REFERENCE),
        ("amount", str(_AMOUNT)),
    ):
        out: list[bytes | str] = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            pieces = part.split(sentinel.encode())
            for i, piece in enumerate(pieces):
                if i:
                    out.append(name)
                out.append(piece)
        parts = out
    return parts


_TEMPLATES = {event: _template(event) for event in ("payment_success", "signup_success")}


def render(b: Body) -> bytes:
    """The form body of ``b``, byte for byte what ``build_body(b.event, **b.fields())`` is."""
    values = {
        "webhook": str(b.webhook_id).encode(),
        "event": str(EVENT_BASE + b.index).encode(),
        "transaction": str(b.transaction_id or 0).encode(),
        "subscription": str(b.subscription_id).encode(),
        "reference": b.reference.encode(),
        "amount": str(b.amount_cents).encode(),
    }
    return b"".join(values[p] if isinstance(p, str) else p for p in _TEMPLATES[b.event])


def check_templates() -> None:
    """Fail loudly if the template shortcut differs from ``build_body`` for any event."""
    for index in (0, 1, SIGNUP_EVERY - 1, 12345):
        b = body(index)
        expected = build_body(
            b.event,
            **b.fields(),
            product_id=PRODUCT_ID,
            product_handle=PRODUCT_HANDLE,
            occurred_at=OCCURRED_AT,
        )
        if render(b) != expected:
            raise SystemExit(f"body template differs from tests.builders for {b.event}")


def write_bodies(path: Path, start: int, count: int, key: str) -> range:
    """Write bodies ``start .. start+count-1`` as wrk's ``signature<TAB>body`` lines.

    Returns the range of body indexes written.
    """
    secret = key.encode()
    with path.open("wb") as out:
        for index in range(start, start + count):
            raw = render(body(index))
            sig = hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()
            out.write(sig + b"\t" + raw + b"\n")
    return range(start, start + count)


def read_bodies(path: Path, limit: int) -> list[bytes]:
    """The first ``limit`` bodies of a file written by :func:`write_bodies`, cycling."""
    lines = [line.split(b"\t", 1)[1].rstrip(b"\n") for line in path.open("rb")]
    return [lines[i % len(lines)] for i in range(limit)]


def transaction_copy_row(b: Body) -> tuple[object, ...]:
    """The ``transactions`` row the sink writes for payment ``b`` (for the COPY baseline)."""
    return (
        b.transaction_id,
        b.reference,
        PARTNER,
        b.subscription_id,
        "payment",
        b.amount_cents,
        "USD",
        None,
        OCCURRED_AT.astimezone(UTC),
        b.webhook_id,
    )


def subscription_copy_row(b: Body) -> tuple[object, ...]:
    """The main ``subscriptions`` columns the sink writes for signup ``b``."""
    return (
        b.subscription_id,
        b.reference,
        PRODUCT_ID,
        PRODUCT_HANDLE,
        "active",
        b.webhook_id,
        OCCURRED_AT.astimezone(UTC),
    )
