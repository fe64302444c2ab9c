"""Realistic Chargify webhook bodies for tests, in the documented wire format.

``build_body("payment_success", subscription_id=..., reference="cust-1", ...)`` returns the
bytes Chargify would POST: keys in Chargify's order, brackets literal, values escaped like
``encodeURIComponent``, ``payload[event_id]`` last, and the repeated non-indexed
``public_signup_pages`` keys of the real payment_success capture. Field sets follow the
captures and docs in ``shared/chargify`` (WEBHOOKS.md §5). ``signature(body, key)`` gives the
``X-Chargify-Webhook-Signature-Hmac-Sha-256`` value.

Ids default to fresh values from a per-process counter, so two bodies built in one test run
never share a webhook, event, transaction or refund id unless asked to.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from chargify_stream.schemas.form import encode_pairs

__all__ = [
    "DEFAULT_OCCURRED_AT",
    "EVENTS",
    "build_body",
    "build_pairs",
    "chargify_time",
    "signature",
]

EVENTS = (
    "payment_success",
    "refund_success",
    "signup_success",
    "subscription_state_change",
    "subscription_product_change",
    "component_allocation_change",
)

Pairs = list[tuple[str, str]]
Auto = Literal["auto"]

DEFAULT_OCCURRED_AT = datetime(2024, 10, 11, 19, 28, 31, tzinfo=UTC)
_EASTERN_DAYLIGHT = timezone(timedelta(hours=-4))

_ids = itertools.count(3_000_000_001)  # above 2**31, like real webhook and event ids


def _fresh() -> int:
    return next(_ids)


def chargify_time(moment: datetime) -> str:
    """``2024-10-11 15:28:31 -0400``: the usual webhook timestamp (Chargify sends US Eastern)."""
    return moment.astimezone(_EASTERN_DAYLIGHT).strftime("%Y-%m-%d %H:%M:%S %z")


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_suffix(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def signature(body: bytes, key: str) -> str:
    """Lowercase hex HMAC-SHA256 of the raw body with the site shared key."""
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def _site(site_id: int, subdomain: str) -> Pairs:
    return [("payload[site][id]", str(site_id)), ("payload[site][subdomain]", subdomain)]


def _product(prefix: str, product_id: int, handle: str, *, signup_pages: bool) -> Pairs:
    pairs = [
        (f"{prefix}[id]", str(product_id)),
        (f"{prefix}[name]", f"${handle.title()} Plan"),
        (f"{prefix}[handle]", handle),
        (f"{prefix}[description]", "lorem ipsum"),
        (f"{prefix}[accounting_code]", handle),
        (f"{prefix}[price_in_cents]", "1000"),
        (f"{prefix}[interval]", "1"),
        (f"{prefix}[interval_unit]", "month"),
        (f"{prefix}[version_number]", "7"),
        (f"{prefix}[product_family][id]", "527890"),
        (f"{prefix}[product_family][name]", "Acme Projects"),
        (f"{prefix}[product_family][handle]", "billing-plans"),
    ]
    if signup_pages:
        # Repeated, non-indexed keys, exactly as in the real payment_success capture.
        for page_id, token in ((281054, "kqvmfrbgd89q"), (281240, "dkffht5dxfd8")):
            pages = f"{prefix}[public_signup_pages]"
            pairs += [
                (f"{pages}[id]", str(page_id)),
                (f"{pages}[return_url]", "http://www.example.com?successfulsignup"),
                (f"{pages}[return_params]", ""),
                (f"{pages}[url]", f"https://general-goods.chargify.com/subscribe/{token}/{handle}"),
            ]
    return pairs


def _subscription(
    *,
    subscription_id: int,
    state: str,
    previous_state: str,
    updated_at: str,
    currency: str | None,
    customer_id: int,
    reference: str | None,
    product_id: int,
    product_handle: str,
) -> Pairs:
    s = "payload[subscription]"
    created = "2024-10-01 09:00:00 -0400"
    pairs = [
        (f"{s}[id]", str(subscription_id)),
        (f"{s}[state]", state),
        (f"{s}[trial_started_at]", ""),
        (f"{s}[trial_ended_at]", ""),
        (f"{s}[activated_at]", created),
        (f"{s}[created_at]", created),
        (f"{s}[updated_at]", updated_at),
        (f"{s}[expires_at]", ""),
        (f"{s}[balance_in_cents]", "0"),
        (f"{s}[current_period_ends_at]", "2024-11-01 09:00:00 -0400"),
        (f"{s}[next_assessment_at]", "2024-11-01 09:00:00 -0400"),
        (f"{s}[canceled_at]", ""),
        (f"{s}[cancel_at_end_of_period]", "false"),
        (f"{s}[payment_collection_method]", "automatic"),
        (f"{s}[current_period_started_at]", created),
        (f"{s}[previous_state]", previous_state),
        (f"{s}[signup_payment_id]", "161034048"),
        (f"{s}[signup_revenue]", "64.00"),
        (f"{s}[total_revenue_in_cents]", "32000"),
        (f"{s}[product_price_in_cents]", "1000"),
        (f"{s}[payment_type]", "credit_card"),
        # The subscription's own reference: not the customer's, and usually empty.
        (f"{s}[reference]", ""),
    ]
    if currency is not None:
        pairs.append((f"{s}[currency]", currency))
    c = f"{s}[customer]"
    pairs += [
        (f"{c}[id]", str(customer_id)),
        (f"{c}[first_name]", "Pookie"),
        (f"{c}[last_name]", "Test"),
        (f"{c}[organization]", "Acme, Inc."),
        (f"{c}[email]", "pookie999@example.com"),
        (f"{c}[created_at]", created),
        (f"{c}[updated_at]", created),
    ]
    if reference is not None:
        pairs.append((f"{c}[reference]", reference))
    pairs += [(f"{c}[address]", ""), (f"{c}[address_2]", ""), (f"{c}[verified]", "false")]
    pairs += _product(f"{s}[product]", product_id, product_handle, signup_pages=True)
    pairs += [
        (f"{s}[credit_card][id]", "10102821"),
        (f"{s}[credit_card][masked_card_number]", "XXXX-XXXX-XXXX-1"),
        (f"{s}[credit_card][card_type]", "bogus"),
    ]
    return pairs


def build_pairs(
    event: str,
    *,
    webhook_id: int | None = None,
    event_id: int | Auto | None = "auto",
    subscription_id: int = 15100141,
    reference: str | None = "cust-1",
    customer_id: int = 14585695,
    occurred_at: datetime | str = DEFAULT_OCCURRED_AT,
    site_id: int = 31615,
    subdomain: str = "general-goods",
    currency: str | None = "USD",
    memo: str = "Pookie Test - $10 Basic Plan: Renewal payment (10/11/2024)",
    transaction_id: int | None = None,
    amount_cents: int = 6400,
    refund_id: int | None = None,
    payment_id: int = 161537369,
    refund_shape: Literal["legacy", "2023"] = "legacy",
    state: str = "active",
    previous_state: str = "active",
    product_id: int = 3792003,
    product_handle: str = "basic",
    previous_product_id: int = 3792002,
    previous_product_handle: str = "starter",
    component_id: int = 277221,
    component_name: str = "Timesheet Users",
    previous_allocation: str = "2",
    new_allocation: str = "5",
    overrides: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
) -> Pairs:
    """The decoded ``(key, value)`` pairs of a webhook body, in Chargify's order.

    ``webhook_id``, ``event_id``, ``transaction_id`` and ``refund_id`` default to fresh ids;
    ``event_id=None`` leaves ``payload[event_id]`` out (as in old and test-panel bodies).
    ``reference=None`` leaves the customer reference field out, ``""`` sends it empty.
    ``occurred_at`` sets the event's own timestamp (``transaction[created_at]``,
    ``subscription[updated_at]`` or ``payload[timestamp]``), in that field's usual format;
    a string is sent as is. ``refund_shape="2023"`` sends ``payload[subscription][id]``
    instead of ``payload[subscription_id]``. ``overrides`` sets keys (replacing every
    occurrence, or adding the key before ``payload[event_id]``); ``drop`` removes keys.
    """
    if event not in EVENTS:
        raise ValueError(f"no builder for {event!r}; known: {EVENTS}")
    webhook_id = _fresh() if webhook_id is None else webhook_id
    if event_id == "auto":
        event_id = _fresh()

    def stamp(style: Literal["chargify", "iso", "utc"]) -> str:
        if isinstance(occurred_at, str):
            return occurred_at
        return {"chargify": chargify_time, "iso": _iso_utc, "utc": _utc_suffix}[style](occurred_at)

    def subscription(updated_at: str) -> Pairs:
        return _subscription(
            subscription_id=subscription_id,
            state=state,
            previous_state=previous_state,
            updated_at=updated_at,
            currency=currency,
            customer_id=customer_id,
            reference=reference,
            product_id=product_id,
            product_handle=product_handle,
        )

    pairs: Pairs = [("id", str(webhook_id)), ("event", event), *_site(site_id, subdomain)]
    if event == "payment_success":
        pairs += subscription(chargify_time(DEFAULT_OCCURRED_AT))
        tid = _fresh() if transaction_id is None else transaction_id
        t = "payload[transaction]"
        pairs += [
            (f"{t}[id]", str(tid)),
            (f"{t}[subscription_id]", str(subscription_id)),
            (f"{t}[type]", "Payment"),
            (f"{t}[kind]", ""),
            (f"{t}[transaction_type]", "payment"),
            (f"{t}[success]", "true"),
            (f"{t}[amount_in_cents]", str(amount_cents)),
            (f"{t}[memo]", memo),
            (f"{t}[created_at]", stamp("chargify")),
            (f"{t}[starting_balance_in_cents]", str(amount_cents)),
            (f"{t}[ending_balance_in_cents]", "0"),
            (f"{t}[gateway_used]", "bogus"),
            (f"{t}[payment_id]", ""),
            (f"{t}[product_id]", str(product_id)),
            (f"{t}[customer_id]", str(customer_id)),
            (f"{t}[card_expiration]", "10/2030"),
            (f"{t}[refunded_amount_in_cents]", "0"),
        ]
    elif event == "refund_success":
        pairs = [("id", str(webhook_id)), ("event", event)]
        pairs += [
            ("payload[refund_id]", str(_fresh() if refund_id is None else refund_id)),
            ("payload[amount_in_cents]", str(amount_cents)),
            ("payload[customer_id]", str(customer_id)),
            ("payload[customer_email]", "pookie999@example.com"),
            ("payload[customer_name]", "Pookie Test"),
        ]
        if reference is not None:
            pairs.append(("payload[customer_reference]", reference))
        pairs += [
            ("payload[gateway_transaction_id]", "53433"),
            ("payload[gateway_order_id]", ""),
            ("payload[gateway_used]", "bogus"),
            ("payload[masked_card_number]", "XXXX-XXXX-XXXX-1111"),
            ("payload[memo]", memo),
            ("payload[payment_amount_in_cents]", "9900"),
            ("payload[payment_id]", str(payment_id)),
            *_site(site_id, subdomain),
        ]
        if refund_shape == "2023":
            pairs.append(("payload[subscription][id]", str(subscription_id)))
        else:
            pairs.append(("payload[subscription_id]", str(subscription_id)))
        pairs.append(("payload[timestamp]", stamp("utc")))
    elif event == "component_allocation_change":
        pairs = [("id", str(webhook_id)), ("event", event)]
        pairs += [
            ("payload[subscription][id]", str(subscription_id)),
            ("payload[subscription][name]", "Pookie Test"),
            ("payload[subscription][state]", state),
            ("payload[product][id]", str(product_id)),
            ("payload[product][name]", f"${product_handle.title()} Plan"),
            ("payload[component][kind]", "quantity_based_component"),
            ("payload[component][id]", str(component_id)),
            ("payload[component][name]", component_name),
            ("payload[component][unit_name]", "user"),
            ("payload[new_allocation]", new_allocation),
            ("payload[previous_allocation]", previous_allocation),
            ("payload[memo]", memo),
            ("payload[timestamp]", stamp("iso")),
            *_site(site_id, subdomain),
        ]
    else:
        pairs += subscription(stamp("chargify"))
        if event == "subscription_product_change":
            pairs += _product(
                "payload[previous_product]",
                previous_product_id,
                previous_product_handle,
                signup_pages=False,
            )
    if event_id is not None:
        pairs.append(("payload[event_id]", str(event_id)))
    return _adjust(pairs, overrides or {}, set(drop))


def _adjust(pairs: Pairs, overrides: Mapping[str, str], drop: set[str]) -> Pairs:
    out = [(key, overrides.get(key, value)) for key, value in pairs if key not in drop]
    present = {key for key, _ in out}
    extra = [(key, value) for key, value in overrides.items() if key not in present]
    if extra:
        at = next((i for i, (key, _) in enumerate(out) if key == "payload[event_id]"), len(out))
        out[at:at] = extra
    return out


def build_body(event: str, **fields: Any) -> bytes:
    """The form body bytes for ``event``; keyword arguments as for ``build_pairs``."""
    return encode_pairs(build_pairs(event, **fields))
