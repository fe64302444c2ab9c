"""Folding a batch's subscription changes to one row per subscription (sink/upsert.py).

The fold must not depend on the order the changes arrived in: Chargify does not guarantee
order, and the database side (per-field and per-component versions) relies on the batch's
row carrying, for each field, the newest value and its version.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chargify_stream.schemas.records import ComponentAllocation, SubscriptionChange
from chargify_stream.sink.upsert import SubscriptionRow, fold_subscriptions, quantity, version_of

T0 = datetime(2024, 10, 11, 19, 28, 31, tzinfo=UTC)


def change(
    webhook_id: int,
    minutes: float,
    *,
    subscription_id: int = 1,
    customer: str = "c1",
    state: str | None = None,
    product_id: int | None = None,
    product_handle: str | None = None,
    components: dict[int, float] | None = None,
) -> SubscriptionChange:
    return SubscriptionChange(
        subscription_id=subscription_id,
        customer_reference=customer,
        state=state,
        product_id=product_id,
        product_handle=product_handle,
        components=tuple(
            ComponentAllocation(component_id=cid, new_allocation=qty)
            for cid, qty in (components or {}).items()
        ),
        occurred_at=T0 + timedelta(minutes=minutes),
        webhook_id=webhook_id,
        event="subscription_state_change",
    )


def reference(changes: list[SubscriptionChange]) -> dict[int, dict[str, Any]]:
    """The documented meaning, written the slow obvious way: apply in (time, webhook id)
    order; each change overwrites the fields and components it carries."""
    out: dict[int, dict[str, Any]] = {}
    for c in sorted(changes, key=lambda c: (c.occurred_at, c.webhook_id)):
        row = out.setdefault(c.subscription_id, {"components": {}})
        row["customer_key"] = c.customer_reference
        row["webhook_id"] = c.webhook_id
        for name in ("state", "product_id", "product_handle"):
            if getattr(c, name) is not None:
                row[name] = getattr(c, name)
        for a in c.components:
            row["components"][str(a.component_id)] = quantity(a.new_allocation)
    return out


def as_dict(rows: list[SubscriptionRow]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        row: dict[str, Any] = {
            "customer_key": r.customer_key,
            "webhook_id": r.webhook_id,
            "components": r.components,
        }
        for name in ("state", "product_id", "product_handle"):
            if getattr(r, name) is not None:
                row[name] = getattr(r, name)
        out[r.subscription_id] = row
    return out


changes_strategy = st.lists(
    st.builds(
        change,
        webhook_id=st.integers(1, 40),
        minutes=st.integers(0, 5),  # few distinct times: ties decided by webhook id
        subscription_id=st.integers(1, 3),
        customer=st.sampled_from(["c1", "c2"]),
        state=st.none() | st.sampled_from(["active", "past_due", "canceled"]),
        product_id=st.none() | st.sampled_from([10, 20, 2**40]),
        product_handle=st.none() | st.sampled_from(["basic", "pro"]),
        components=st.dictionaries(st.sampled_from([1, 2]), st.sampled_from([0, 1.5, 5])),
    ),
    max_size=12,
    # One webhook is one event: the same webhook id never carries two different states.
    unique_by=lambda c: c.webhook_id,
)


@settings(max_examples=300, deadline=None)
@given(changes_strategy, st.randoms(use_true_random=False))
def test_fold_is_independent_of_arrival_order(
    changes: list[SubscriptionChange], rnd: random.Random
) -> None:
    shuffled = list(changes)
    rnd.shuffle(shuffled)
    assert fold_subscriptions(shuffled) == fold_subscriptions(changes)


@settings(max_examples=300, deadline=None)
@given(changes_strategy)
def test_fold_matches_applying_changes_in_time_order(changes: list[SubscriptionChange]) -> None:
    assert as_dict(fold_subscriptions(changes)) == reference(changes)


def test_a_field_the_newest_change_leaves_out_keeps_the_older_value_and_its_version() -> None:
    signup = change(1, 0, state="active", product_id=10, product_handle="basic")
    allocation = change(2, 5, state="active", product_id=10, components={7: 3})
    [row] = fold_subscriptions([allocation, signup])
    assert (row.state, row.product_id, row.product_handle) == ("active", 10, "basic")
    assert row.webhook_id == 2
    assert row.field_versions["product_handle"] == (version_of(signup.occurred_at), 1)
    assert row.field_versions["state"] == (version_of(allocation.occurred_at), 2)
    assert row.components == {"7": 3}


def test_components_merge_per_component_by_their_own_version() -> None:
    newer = change(5, 10, components={1: 8})
    older = change(4, 5, components={1: 2, 2: 4})
    [row] = fold_subscriptions([newer, older])
    assert row.components == {"1": 8, "2": 4}
    assert row.component_versions == {
        "1": (version_of(newer.occurred_at), 5),
        "2": (version_of(older.occurred_at), 4),
    }


def test_same_time_is_ordered_by_webhook_id() -> None:
    [row] = fold_subscriptions([change(9, 0, state="canceled"), change(3, 0, state="active")])
    assert row.state == "canceled"


def test_rows_come_out_in_subscription_id_order() -> None:
    rows = fold_subscriptions([change(i, 0, subscription_id=s) for i, s in enumerate([3, 1, 2])])
    assert [r.subscription_id for r in rows] == [1, 2, 3]


def test_version_is_exact_microseconds_since_the_epoch() -> None:
    moment = datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC)  # floats lose this
    assert version_of(moment) == 9_223_372_036_854_775
    assert version_of(datetime(1970, 1, 1, tzinfo=UTC)) == 0


def test_quantity_drops_a_zero_fraction_only() -> None:
    assert quantity(5.0) == 5 and isinstance(quantity(5.0), int)
    assert quantity(2.5) == 2.5
