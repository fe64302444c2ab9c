"""What to do with one raw webhook body: emit a record, ignore it, or dead-letter it.

``route`` is pure: it decodes the form body, applies DESIGN.md's rules and returns a
``Decision``; the Kafka agent carries it out. The only outside knowledge it needs is the
subscription id -> customer reference table, passed in as ``lookup_reference``, because
``component_allocation_change`` carries no customer at all (WEBHOOKS.md §4).

Where the customer reference sits (WEBHOOKS.md §4), per supported event:

==============================  ===============================================
``payment_success``,            ``payload[subscription][customer][reference]``
``signup_success``,
``subscription_state_change``,
``subscription_product_change``
``refund_success``              ``payload[customer_reference]`` (flat)
``component_allocation_change`` none: ``lookup_reference(subscription id)``
==============================  ===============================================

The module is a little over 400 lines: the rules of all six events, which read best side
by side. The fields it reads are decoded by :mod:`processors.fields` (a C scan with a Python
fallback), which returns exactly what a full decode of the form would hold at each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeVar

from chargify_stream.processors.fields import Fields, Path, extract_fields
from chargify_stream.schemas import headers
from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.records import ComponentAllocation, SubscriptionChange, Transaction
from chargify_stream.schemas.values import to_float, to_int, to_timestamp

__all__ = [
    "SUPPORTED_EVENTS",
    "TEST_EVENT",
    "TEST_PANEL",
    "UNSUPPORTED_EVENT",
    "DeadLetter",
    "Decision",
    "Emit",
    "Ignore",
    "route",
]

# Ignore reasons: counted and logged, never dead-lettered.
TEST_EVENT: Final = "test_event"
TEST_PANEL: Final = "test_panel"
UNSUPPORTED_EVENT: Final = "unsupported_event"

TRANSACTION_EVENTS: Final = frozenset({"payment_success", "refund_success"})
SUBSCRIPTION_EVENTS: Final = frozenset(
    {
        "signup_success",
        "subscription_state_change",
        "subscription_product_change",
        "component_allocation_change",
    }
)
SUPPORTED_EVENTS: Final = TRANSACTION_EVENTS | SUBSCRIPTION_EVENTS

LookupReference = Callable[[int], str | None]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish ``record`` to the ``transactions`` or ``subscriptions`` topic under ``key``."""

    topic: Literal["transactions", "subscriptions"]
    key: str
    record: Transaction | SubscriptionChange


@dataclass(frozen=True, slots=True)
class Ignore:
    """Drop the webhook (it stays on the raw topic); ``reason`` is one of the ignore codes."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Park the raw record on the dead-letter topic with a reason code from DESIGN.md."""

    reason: str
    error: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one body.

    ``learn`` is a (subscription id, customer reference) pair the body carries, to remember
    for later ``component_allocation_change`` events; it is set whatever the action, except
    for test and test-panel bodies.
    """

    webhook_id: int | None
    event: str | None
    action: Emit | Ignore | DeadLetter
    learn: tuple[int, str] | None = None


def _name(path: tuple[str, ...]) -> str:
    """``("payload", "transaction", "id")`` -> ``payload[transaction][id]``."""
    return path[0] + "".join(f"[{segment}]" for segment in path[1:])


def _not_one_value(path: Path, value: Any) -> MalformedPayload:
    return MalformedPayload(f"{_name(path)}: expected one value, got a {type(value).__name__}")


class _Body:
    """Typed, field-named access to a body's ``FIELDS``; errors name the offending field."""

    __slots__ = ("fields",)

    def __init__(self, fields: Fields) -> None:
        self.fields = fields

    def raw(self, *path: str) -> Any:
        """What a full decode holds at ``path`` (a string, list or dict), or ``None``."""
        return self.fields.get(path)

    def text(self, *path: str) -> str | None:
        """The string at ``path``; ``None`` when absent or empty."""
        value = self.fields.get(path)
        if value is None or type(value) is str:
            return value or None
        raise _not_one_value(path, value)

    def integer(self, *path: str) -> int | None:
        return self._parsed(path, to_int)

    def quantity(self, *path: str) -> float | None:
        return self._parsed(path, to_float)

    def timestamp(self, *path: str) -> datetime | None:
        return self._parsed(path, to_timestamp)

    def _parsed(self, path: Path, parse: Callable[[str], _T]) -> _T | None:
        """``parse`` of the string at ``path``; its error is prefixed with the field's name."""
        value = self.fields.get(path)
        if value is None or value == "":
            return None
        if type(value) is not str:
            raise _not_one_value(path, value)
        try:
            return parse(value)
        except MalformedPayload as exc:
            raise MalformedPayload(f"{_name(path)}: {exc}") from None

    def first_integer(self, *paths: tuple[str, ...]) -> int | None:
        for path in paths:
            value = self.integer(*path)
            if value is not None:
                return value
        return None


def _required(value: _T | None, *paths: tuple[str, ...]) -> _T:
    if value is None:
        names = " or ".join(_name(path) for path in paths)
        raise MalformedPayload(f"{names}: missing or empty")
    return value


_SUBSCRIPTION_ID: Final = (("payload", "subscription", "id"), ("payload", "subscription_id"))
_REFERENCE_PATHS: Final = (
    ("payload", "subscription", "customer", "reference"),
    ("payload", "customer", "reference"),
    ("payload", "customer_reference"),
)
# Ids that are "0" in the canned data of Chargify's Webhook Testing panel (WEBHOOKS.md §3.10).
_TEST_PANEL_IDS: Final = (
    ("payload", "subscription", "id"),
    ("payload", "subscription_id"),
    ("payload", "transaction", "id"),
    ("payload", "customer", "id"),
    ("payload", "subscription", "customer", "id"),
)


class _NoReference(Exception):
    """The customer reference cannot be resolved; carries the dead-letter reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _payload_reference(body: _Body) -> tuple[bool, str | None]:
    """(whether any reference field is present, the first non-blank one)."""
    present = False
    for path in _REFERENCE_PATHS:
        raw = body.raw(*path)
        if type(raw) is not str:
            continue
        present = True
        if raw.strip():
            return True, raw
    return present, None


def _resolve_reference(
    body: _Body, event: str, subscription_id: int | None, lookup: LookupReference
) -> str:
    present, reference = _payload_reference(body)
    if reference is not None:
        return reference
    if present:
        raise _NoReference(
            headers.MISSING_CUSTOMER_REFERENCE,
            f"{event}: the customer reference in the payload is empty",
        )
    found = lookup(subscription_id) if subscription_id is not None else None
    if found:
        return found
    if event == "component_allocation_change":
        raise _NoReference(
            headers.UNKNOWN_SUBSCRIPTION,
            f"{event}: no customer reference known for subscription {subscription_id}",
        )
    raise _NoReference(
        headers.MISSING_CUSTOMER_REFERENCE,
        f"{event}: the payload has no customer reference and subscription "
        f"{subscription_id} is not known",
    )


def _is_test_panel(body: _Body) -> bool:
    if body.raw("payload", "event_id"):
        return False
    return any(body.raw(*path) == "0" for path in _TEST_PANEL_IDS)


def _learnable(body: _Body) -> tuple[int, str] | None:
    try:
        subscription_id = body.first_integer(*_SUBSCRIPTION_ID)
    except MalformedPayload:
        return None
    _, reference = _payload_reference(body)
    if subscription_id is None or subscription_id <= 0 or reference is None:
        return None
    return subscription_id, reference


def _common(body: _Body) -> dict[str, Any]:
    return {
        "event_id": body.integer("payload", "event_id"),
        "site_id": body.integer("payload", "site", "id"),
        "site_subdomain": body.text("payload", "site", "subdomain"),
    }


def _payment(body: _Body, webhook_id: int, event: str, lookup: LookupReference) -> Emit:
    transaction = ("payload", "transaction")
    subscription_id = body.first_integer(
        ("payload", "subscription", "id"), (*transaction, "subscription_id")
    )
    record = Transaction(
        transaction_id=_required(body.integer(*transaction, "id"), (*transaction, "id")),
        kind="payment",
        amount_cents=_required(
            body.integer(*transaction, "amount_in_cents"), (*transaction, "amount_in_cents")
        ),
        currency=body.text("payload", "subscription", "currency"),
        customer_reference=_resolve_reference(body, event, subscription_id, lookup),
        subscription_id=subscription_id,
        memo=body.text(*transaction, "memo"),
        occurred_at=_required(
            body.timestamp(*transaction, "created_at"), (*transaction, "created_at")
        ),
        webhook_id=webhook_id,
        event=event,
        **_common(body),
    )
    return Emit("transactions", record.customer_reference, record)


def _refund(body: _Body, webhook_id: int, event: str, lookup: LookupReference) -> Emit:
    subscription_id = body.first_integer(*_SUBSCRIPTION_ID)
    amount = _required(body.integer("payload", "amount_in_cents"), ("payload", "amount_in_cents"))
    record = Transaction(
        transaction_id=_required(body.integer("payload", "refund_id"), ("payload", "refund_id")),
        kind="refund",
        # Sent as a positive refund amount; stored as money leaving, whatever the sign.
        amount_cents=-abs(amount),
        currency=body.text("payload", "subscription", "currency"),
        customer_reference=_resolve_reference(body, event, subscription_id, lookup),
        subscription_id=subscription_id,
        refunded_payment_id=body.integer("payload", "payment_id"),
        memo=body.text("payload", "memo"),
        occurred_at=_required(body.timestamp("payload", "timestamp"), ("payload", "timestamp")),
        webhook_id=webhook_id,
        event=event,
        **_common(body),
    )
    return Emit("transactions", record.customer_reference, record)


def _subscription(body: _Body, webhook_id: int, event: str, lookup: LookupReference) -> Emit:
    subscription = ("payload", "subscription")
    product = (*subscription, "product")
    subscription_id = _required(body.integer(*subscription, "id"), (*subscription, "id"))
    occurred_at = body.timestamp(*subscription, "updated_at") or body.timestamp(
        "payload", "timestamp"
    )
    product_id = body.integer(*product, "id")
    product_handle = body.text(*product, "handle")
    previous_product_id = previous_product_handle = previous_state = None
    components: tuple[ComponentAllocation, ...] = ()
    if event == "subscription_state_change":
        previous_state = body.text(*subscription, "previous_state")
    elif event == "subscription_product_change":
        previous_product_id = body.integer("payload", "previous_product", "id")
        previous_product_handle = body.text("payload", "previous_product", "handle")
    elif event == "component_allocation_change":
        # The legacy field set has the product only at payload[product].
        if product_id is None:
            product_id = body.integer("payload", "product", "id")
            product_handle = product_handle or body.text("payload", "product", "handle")
        component = ("payload", "component")
        components = (
            ComponentAllocation(
                component_id=_required(body.integer(*component, "id"), (*component, "id")),
                component_name=body.text(*component, "name"),
                previous_allocation=body.quantity("payload", "previous_allocation"),
                new_allocation=_required(
                    body.quantity("payload", "new_allocation"), ("payload", "new_allocation")
                ),
            ),
        )
    record = SubscriptionChange(
        subscription_id=subscription_id,
        customer_reference=_resolve_reference(body, event, subscription_id, lookup),
        state=body.text(*subscription, "state"),
        previous_state=previous_state,
        product_id=product_id,
        product_handle=product_handle,
        previous_product_id=previous_product_id,
        previous_product_handle=previous_product_handle,
        components=components,
        occurred_at=_required(occurred_at, (*subscription, "updated_at"), ("payload", "timestamp")),
        webhook_id=webhook_id,
        event=event,
        **_common(body),
    )
    return Emit("subscriptions", record.customer_reference, record)


_BUILDERS: Final[dict[str, Callable[[_Body, int, str, LookupReference], Emit]]] = {
    "payment_success": _payment,
    "refund_success": _refund,
    "signup_success": _subscription,
    "subscription_state_change": _subscription,
    "subscription_product_change": _subscription,
    "component_allocation_change": _subscription,
}


_MISSING_ID: Final = "id: missing, empty or repeated"
_MISSING_EVENT: Final = "event: missing, empty or repeated"


def _top_level(fields: Fields, name: str) -> str | None:
    value = fields.get((name,))
    return value if type(value) is str and value else None


def route(body: bytes, lookup_reference: LookupReference) -> Decision:
    """Decide what to do with one raw webhook body (see the module docstring).

    Never raises for bad input: an undecodable body, a missing ``id`` or ``event``, or a
    required field that is missing or unreadable becomes ``DeadLetter(malformed_payload)``
    with an error naming the field. ``lookup_reference`` maps a subscription id to the
    customer reference learnt earlier, or ``None``.
    """
    try:
        fields = extract_fields(body)
    except MalformedPayload as exc:
        return Decision(None, None, DeadLetter(headers.MALFORMED_PAYLOAD, str(exc)))
    return _decide(fields, lookup_reference)


def _decide(fields: Fields, lookup_reference: LookupReference) -> Decision:
    parsed = _Body(fields)
    event = _top_level(fields, "event")
    try:
        webhook_id = to_int(_top_level(fields, "id"))
    except MalformedPayload as exc:
        webhook_id = None
        id_error = f"id: {exc}"
    else:
        id_error = _MISSING_ID
    if event == "test":
        # The 2010-era test body has no id at all: "event=test&payload[chargify]=testing".
        return Decision(webhook_id, event, Ignore(TEST_EVENT))
    if webhook_id is None:
        return Decision(None, event, DeadLetter(headers.MALFORMED_PAYLOAD, id_error))
    if event is None:
        return Decision(webhook_id, None, DeadLetter(headers.MALFORMED_PAYLOAD, _MISSING_EVENT))
    if _is_test_panel(parsed):
        return Decision(webhook_id, event, Ignore(TEST_PANEL))
    learn = _learnable(parsed)
    build = _BUILDERS.get(event)
    if build is None:
        return Decision(webhook_id, event, Ignore(UNSUPPORTED_EVENT), learn)
    try:
        action: Emit | DeadLetter = build(parsed, webhook_id, event, lookup_reference)
    except MalformedPayload as exc:
        action = DeadLetter(headers.MALFORMED_PAYLOAD, f"{event}: {exc}")
    except _NoReference as exc:
        action = DeadLetter(exc.reason, str(exc))
    return Decision(webhook_id, event, action, learn)
