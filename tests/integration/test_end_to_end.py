"""The whole pipeline against a scripted stream: exact final Postgres and dead-letter state.

Gateway, processor and sink run as separate processes, started the way the README starts
them; every webhook is signed and POSTed like Chargify does. The stream covers every
supported event, the real captured bodies (references rewritten to customers the test
creates), retries of the same webhook id, duplicates, out-of-order state changes, both
refund shapes, test traffic, and each dead-letter reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.sink.admin import add_customer, add_partner, add_plan, connect
from tests.builders import build_body
from tests.kafka_tools import consume, headers_of
from tests.pipeline import Pipeline
from tests.samples import raw_form_samples

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SUB = 7_000_000_001  # above 2**31, like real ids
REFERENCE_FIELD = re.compile(rb"(\[reference\]|\[customer_reference\])=[^&]*")


@pytest.fixture
def pipeline(settings: Settings, stages: Callable[..., Any]) -> Iterator[Pipeline]:
    p = Pipeline(settings, stages)
    yield p
    p.close()


def seed(settings: Settings) -> None:
    with connect(settings) as conn:
        add_partner(conn, "p1", "Partner One")
        add_customer(conn, "c1", partner="p1", email="c1@example.com")
        add_customer(conn, "c2")
        add_plan(conn, "3792003", "Basic")


def test_scripted_stream_reaches_the_exact_final_state(
    settings: Settings, pipeline: Pipeline
) -> None:
    seed(settings)
    sub = {"subscription_id": SUB, "reference": "c1"}
    signup = build_body("signup_success", webhook_id=101, occurred_at=T0, **sub)
    payment = build_body(
        "payment_success", webhook_id=102, transaction_id=5001, amount_cents=6400,
        occurred_at=T0 + timedelta(minutes=1), **sub,
    )  # fmt: skip
    stream: list[bytes] = [
        signup,
        payment,
        payment,  # Chargify's retry of the same webhook: counted once
        build_body(  # a later state change ...
            "subscription_state_change", webhook_id=103, state="past_due",
            previous_state="active", occurred_at=T0 + timedelta(hours=2), **sub,
        ),
        build_body(  # ... and an older one arriving after it: must not win
            "subscription_state_change", webhook_id=104, state="canceled",
            previous_state="active", occurred_at=T0 + timedelta(hours=1), **sub,
        ),
        build_body(  # no customer in the body: resolved through the processor's table
            "component_allocation_change", webhook_id=105, subscription_id=SUB,
            component_id=277221, previous_allocation="2", new_allocation="5",
            occurred_at=T0 + timedelta(hours=3),
        ),
        build_body(  # an older allocation of the same component, late
            "component_allocation_change", webhook_id=106, subscription_id=SUB,
            component_id=277221, previous_allocation="0", new_allocation="2",
            occurred_at=T0 + timedelta(minutes=30),
        ),
        build_body(
            "subscription_product_change", webhook_id=107, state="past_due",
            product_id=3792004, product_handle="pro", previous_product_id=3792003,
            occurred_at=T0 + timedelta(hours=4), **sub,
        ),
        build_body(
            "refund_success", webhook_id=108, refund_id=6001, payment_id=5001,
            amount_cents=1000, occurred_at=T0 + timedelta(hours=5), **sub,
        ),
        build_body(
            "refund_success", webhook_id=109, refund_id=6002, payment_id=5001,
            amount_cents=500, refund_shape="2023", occurred_at=T0 + timedelta(hours=6), **sub,
        ),
        # A second webhook for an already recorded transaction: still one row.
        build_body(
            "payment_success", webhook_id=110, transaction_id=5001, amount_cents=6400,
            occurred_at=T0 + timedelta(minutes=1), **sub,
        ),
        # Dead letters, one per reason the pipeline can decide on its own.
        build_body(
            "payment_success", webhook_id=201, transaction_id=5201, subscription_id=SUB + 1,
            reference="nobody",
        ),
        build_body(
            "component_allocation_change", webhook_id=202, subscription_id=SUB + 2,
        ),
        build_body(
            "payment_success", webhook_id=203, subscription_id=SUB + 3, reference="",
        ),
        build_body(
            "payment_success", webhook_id=204, subscription_id=SUB + 4, reference="c1",
            drop=["payload[transaction][amount_in_cents]"],
        ),
        # Ignored: the endpoint test and an event we do not act on.
        b"id=123456&event=test&payload[chargify]=testing",
    ]  # fmt: skip
    samples = raw_form_samples()
    stream += [REFERENCE_FIELD.sub(rb"\1=c2", body) for body in samples.values()]

    statuses = [pipeline.post(body) for body in stream]
    assert statuses == [200] * len(stream)

    pipeline.wait_for(
        "select transaction_id, customer_key, partner_key, subscription_id, kind,"
        " amount_cents, currency, refunded_payment_id, webhook_id"
        " from transactions order by transaction_id",
        [
            (5001, "c1", "p1", SUB, "payment", 6400, "USD", None, 102),
            (6001, "c1", "p1", SUB, "refund", -1000, None, 5001, 108),
            (6002, "c1", "p1", SUB, "refund", -500, None, 5001, 109),
            # The real 2016 body from Maxio's docs, reference rewritten to c2.
            (161537369, "c2", None, 15100141, "payment", 6400, None, None, 141765008),
        ],
    )
    pipeline.wait_for(
        "select subscription_id, customer_key, product_id, product_handle, plan_key, state,"
        " components, last_webhook_id from subscriptions",
        [(SUB, "c1", 3792004, "pro", None, "past_due", {"277221": 5}, 107)],
    )
    [(occurred_at,)] = pipeline.query(
        "select occurred_at from transactions where transaction_id = 5001"
    )
    assert occurred_at == T0 + timedelta(minutes=1)

    letters = consume(
        settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=4, settle=3.0
    )
    found = sorted(
        (
            headers_of(m)["chargify-webhook-id"].decode(),
            headers_of(m)["dlq-reason"].decode(),
            headers_of(m)["dlq-stage"].decode(),
        )
        for m in letters
    )
    assert found == [
        ("201", "customer_not_found", "sink"),
        ("202", "unknown_subscription", "processor"),
        ("203", "missing_customer_reference", "processor"),
        ("204", "malformed_payload", "processor"),
    ]
    by_id = {headers_of(m)["chargify-webhook-id"]: m for m in letters}
    # A processor dead letter keeps the raw body byte for byte.
    assert by_id[b"203"].value() == stream[13]

    # Analysts' records keyed by customer reference, one per Chargify transaction id: the
    # retry of webhook 102 and webhook 110 (another webhook for transaction 5001) are
    # dropped by the processor.
    records = consume(
        settings.kafka_bootstrap_servers, settings.topic("transactions"), count=5, settle=2.0
    )
    assert sorted(m.key() for m in records) == [b"c1"] * 3 + [b"c2", b"nobody"]
    assert sorted(headers_of(m)["chargify-webhook-id"] for m in records if m.key() == b"c1") == [
        b"102",
        b"108",
        b"109",
    ]
