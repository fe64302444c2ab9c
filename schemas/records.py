"""The records on ``chargify.transactions``, ``chargify.subscriptions``, ``chargify.customers``.

Each dataclass mirrors its ``.avsc`` file in ``schemas/avro/`` field for field, in the same
order and with the same defaults (a unit test checks this). Construction is keyword-only.
``occurred_at`` and ``updated_at`` are timezone-aware UTC datetimes; on the wire they are
Avro ``timestamp-micros``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ComponentAllocation", "Customer", "SubscriptionChange", "Transaction"]


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """One Chargify payment or refund (Avro ``io.chargifystream.Transaction``)."""

    transaction_id: int
    kind: Literal["payment", "refund"]
    amount_cents: int
    currency: str | None = None
    customer_reference: str
    subscription_id: int | None = None
    refunded_payment_id: int | None = None
    memo: str | None = None
    occurred_at: datetime
    webhook_id: int
    event_id: int | None = None
    event: str
    site_id: int | None = None
    site_subdomain: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("payment", "refund"):
            raise ValueError(f"kind must be payment or refund, got {self.kind!r}")
        object.__setattr__(self, "occurred_at", _utc(self.occurred_at, "occurred_at"))

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum (field name -> value) for the current schema."""
        return {
            "transaction_id": self.transaction_id,
            "kind": self.kind,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "customer_reference": self.customer_reference,
            "subscription_id": self.subscription_id,
            "refunded_payment_id": self.refunded_payment_id,
            "memo": self.memo,
            "occurred_at": self.occurred_at,
            "webhook_id": self.webhook_id,
            "event_id": self.event_id,
            "event": self.event,
            "site_id": self.site_id,
            "site_subdomain": self.site_subdomain,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> Transaction:
        """Build from a datum read with the current schema."""
        return cls(
            transaction_id=datum["transaction_id"],
            kind=datum["kind"],
            amount_cents=datum["amount_cents"],
            currency=datum["currency"],
            customer_reference=datum["customer_reference"],
            subscription_id=datum["subscription_id"],
            refunded_payment_id=datum["refunded_payment_id"],
            memo=datum["memo"],
            occurred_at=datum["occurred_at"],
            webhook_id=datum["webhook_id"],
            event_id=datum["event_id"],
            event=datum["event"],
            site_id=datum["site_id"],
            site_subdomain=datum["site_subdomain"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ComponentAllocation:
    """One component's allocation change (Avro ``io.chargifystream.ComponentAllocation``)."""

    component_id: int
    component_name: str | None = None
    previous_allocation: float | None = None
    new_allocation: float

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum for the current schema."""
        return {
            "component_id": self.component_id,
            "component_name": self.component_name,
            "previous_allocation": self.previous_allocation,
            "new_allocation": self.new_allocation,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> ComponentAllocation:
        """Build from a datum read with the current schema."""
        return cls(
            component_id=datum["component_id"],
            component_name=datum["component_name"],
            previous_allocation=datum["previous_allocation"],
            new_allocation=datum["new_allocation"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionChange:
    """One accepted subscription event and the state after it (Avro ``SubscriptionChange``)."""

    subscription_id: int
    customer_reference: str
    state: str | None = None
    previous_state: str | None = None
    product_id: int | None = None
    product_handle: str | None = None
    previous_product_id: int | None = None
    previous_product_handle: str | None = None
    components: tuple[ComponentAllocation, ...] = ()
    occurred_at: datetime
    webhook_id: int
    event_id: int | None = None
    event: str
    site_id: int | None = None
    site_subdomain: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "occurred_at", _utc(self.occurred_at, "occurred_at"))
        object.__setattr__(self, "components", tuple(self.components))

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum (field name -> value) for the current schema."""
        return {
            "subscription_id": self.subscription_id,
            "customer_reference": self.customer_reference,
            "state": self.state,
            "previous_state": self.previous_state,
            "product_id": self.product_id,
            "product_handle": self.product_handle,
            "previous_product_id": self.previous_product_id,
            "previous_product_handle": self.previous_product_handle,
            "components": [component.to_avro() for component in self.components],
            "occurred_at": self.occurred_at,
            "webhook_id": self.webhook_id,
            "event_id": self.event_id,
            "event": self.event,
            "site_id": self.site_id,
            "site_subdomain": self.site_subdomain,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> SubscriptionChange:
        """Build from a datum read with the current schema."""
        return cls(
            subscription_id=datum["subscription_id"],
            customer_reference=datum["customer_reference"],
            state=datum["state"],
            previous_state=datum["previous_state"],
            product_id=datum["product_id"],
            product_handle=datum["product_handle"],
            previous_product_id=datum["previous_product_id"],
            previous_product_handle=datum["previous_product_handle"],
            components=tuple(ComponentAllocation.from_avro(c) for c in datum["components"]),
            occurred_at=datum["occurred_at"],
            webhook_id=datum["webhook_id"],
            event_id=datum["event_id"],
            event=datum["event"],
            site_id=datum["site_id"],
            site_subdomain=datum["site_subdomain"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Customer:
    """A customer as it is after a change (Avro ``io.chargifystream.Customer``).

    The value on ``chargify.customers`` under the key ``customer_key``; a deleted customer
    is a tombstone (a null value), not a record.
    """

    customer_key: str
    partner_key: str | None = None
    email: str | None = None
    name: str | None = None
    updated_at: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "updated_at", _utc(self.updated_at, "updated_at"))

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum (field name -> value) for the current schema."""
        return {
            "customer_key": self.customer_key,
            "partner_key": self.partner_key,
            "email": self.email,
            "name": self.name,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> Customer:
        """Build from a datum read with the current schema."""
        return cls(
            customer_key=datum["customer_key"],
            partner_key=datum["partner_key"],
            email=datum["email"],
            name=datum["name"],
            updated_at=datum["updated_at"],
        )
