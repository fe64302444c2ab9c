"""The records on ``chargify.transactions``, ``chargify.subscriptions``, ``chargify.customers``.

The ``.avsc`` files in ``schemas/avro/`` are the one definition of each record: the field
list, its order, which fields are optional and their defaults, and the Avro datum
(:meth:`to_avro`, :meth:`from_avro`) all come from the schema, through :func:`avro_record`.
A class here adds only what Avro cannot say: the Python type of each field (for mypy) and
checks on construction (``__post_init__``); fields that records share are typed once, on
a base class they extend (``_FromWebhook``). A field the class does not declare is added
from its schema, so a field added to a schema reaches the record, the writer in
:mod:`schemas.codec` and the datum without touching this module; declare it here to give it
a type. A declared field the schema does not have, or a default the schema does not give,
fails at import.

Construction is keyword-only. ``occurred_at`` and ``updated_at`` are timezone-aware UTC
datetimes; on the wire they are Avro ``timestamp-micros``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any, ClassVar, Literal, Self, TypeVar, dataclass_transform

__all__ = [
    "AvroRecord",
    "ComponentAllocation",
    "Customer",
    "SubscriptionChange",
    "Transaction",
    "avro_record",
    "record_schemas",
]

_NAMESPACE = "io.chargifystream"

# Turns one field's value from the Python form to the Avro datum form, or back.
_Convert = Callable[[Any], Any]


def _named_records(schema: Any, namespace: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every record type defined in ``schema`` (a parsed ``.avsc``), by full name."""
    if isinstance(schema, list):
        for branch in schema:
            yield from _named_records(branch, namespace)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            namespace = schema.get("namespace", namespace)
            name = schema["name"]
            yield (name if "." in name else f"{namespace}.{name}"), schema
            for field in schema["fields"]:
                yield from _named_records(field["type"], namespace)
        elif schema.get("type") == "array":
            yield from _named_records(schema["items"], namespace)


def record_schemas() -> dict[str, dict[str, Any]]:
    """The record types of the current schemas (``schemas/avro/*.avsc``), by full name.

    Nested records (``ComponentAllocation`` inside ``SubscriptionChange``) are listed too.
    """
    found: dict[str, dict[str, Any]] = {}
    folder = resources.files("chargify_stream.schemas").joinpath("avro")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".avsc"):
            found.update(_named_records(json.loads(entry.read_text(encoding="utf-8")), ""))
    return found


_SCHEMAS = record_schemas()
_CLASSES: dict[str, type[AvroRecord]] = {}  # the record classes built so far, by full name


# Also on the base, so that mypy counts fields declared on an undecorated base of a record
# (``_FromWebhook``) among the record's fields, as :func:`avro_record` does.
@dataclass_transform(kw_only_default=True, frozen_default=True)
class AvroRecord:
    """Base of the records: the Avro datum, both ways, from the schema's field list."""

    __slots__ = ()
    avro_name: ClassVar[str]
    # (field name, to the datum, from the datum); None where the value is the same.
    _avro_fields: ClassVar[tuple[tuple[str, _Convert | None, _Convert | None], ...]]

    def to_avro(self) -> dict[str, Any]:
        """The Avro datum (field name -> value) for the current schema."""
        return {
            name: getattr(self, name) if out is None else out(getattr(self, name))
            for name, out, _ in self._avro_fields
        }

    @classmethod
    def from_avro(cls, datum: dict[str, Any]) -> Self:
        """Build from a datum read with the current schema."""
        return cls(
            **{
                name: datum[name] if into is None else into(datum[name])
                for name, _, into in cls._avro_fields
            }
        )


_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _optional(convert: _Convert | None) -> _Convert | None:
    if convert is None:
        return None
    return lambda value: None if value is None else convert(value)


def _each(convert: _Convert | None, container: _Convert) -> _Convert:
    """An array (a list in the datum, a tuple in the record), item by item."""
    if convert is None:
        return container
    return lambda values: container(convert(value) for value in values)


def _converters(avro_type: Any, namespace: str) -> tuple[_Convert | None, _Convert | None]:
    """How a value of ``avro_type`` goes to the datum and back; None: unchanged."""
    if isinstance(avro_type, list):  # ["null", T]
        inner = [t for t in avro_type if t != "null"]
        if len(inner) != 1:
            return None, None
        out, into = _converters(inner[0], namespace)
        return _optional(out), _optional(into)
    if isinstance(avro_type, dict) and avro_type.get("type") == "array":
        out, into = _converters(avro_type["items"], namespace)
        return _each(out, list), _each(into, tuple)
    if isinstance(avro_type, dict) and avro_type.get("type") == "record":
        name = avro_type["name"]
        avro_type = name if "." in name else f"{avro_type.get('namespace', namespace)}.{name}"
    if isinstance(avro_type, str) and avro_type not in _PRIMITIVES:  # a named record
        full_name = avro_type if "." in avro_type else f"{namespace}.{avro_type}"
        nested = _CLASSES.get(full_name)
        if nested is None:
            raise TypeError(f"record {full_name} must be defined before the records using it")
        return (lambda v: v.to_avro()), nested.from_avro
    return None, None


def _default(avro_field: dict[str, Any]) -> Any:
    default = avro_field["default"]
    return tuple(default) if isinstance(default, list) else default


_R = TypeVar("_R", bound=type)


@dataclass_transform(kw_only_default=True, frozen_default=True)
def avro_record(schema: str | dict[str, Any]) -> Callable[[_R], _R]:
    """Make a class the frozen, keyword-only dataclass of an Avro record schema.

    ``schema`` is a record's full name in the current schemas, or a parsed record schema
    (as tests pass a changed copy). The fields are the schema's, in its order; the class's
    annotations type them, and a field it does not annotate is added as ``Any`` with the
    schema's default.
    """
    spec = _SCHEMAS[schema] if isinstance(schema, str) else schema
    namespace = spec.get("namespace", _NAMESPACE)
    full_name = spec["name"] if "." in spec["name"] else f"{namespace}.{spec['name']}"

    def build(cls: _R) -> _R:
        # The class's declarations and those it inherits from its bases (``_FromWebhook``).
        declaring = [c for c in reversed(cls.__mro__) if c not in (object, AvroRecord)]
        declared: dict[str, Any] = {}
        for base in declaring:
            declared.update(inspect.get_annotations(base))
        avro_fields = {f["name"]: f for f in spec["fields"]}
        unknown = [name for name in declared if name not in avro_fields]
        if unknown:
            raise TypeError(f"{cls.__name__} declares {unknown}, not in schema {full_name}")
        annotations: dict[str, Any] = {}
        plan = []
        for name, avro_field in avro_fields.items():
            annotations[name] = declared.get(name, "Any")
            has_default = any(name in c.__dict__ for c in declaring)
            if name not in declared and "default" in avro_field:
                setattr(cls, name, _default(avro_field))
            elif has_default != ("default" in avro_field) or (
                has_default and getattr(cls, name) != _default(avro_field)
            ):
                raise TypeError(f"{cls.__name__}.{name}: default differs from schema {full_name}")
            plan.append((name, *_converters(avro_field["type"], namespace)))
        cls.__annotations__ = annotations
        record: Any = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
        record.avro_name = full_name
        record._avro_fields = tuple(plan)
        _CLASSES[full_name] = record
        return record

    return build


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is UTC:
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")
    return value.astimezone(UTC)


class _FromWebhook(AvroRecord):
    """The fields that end each record cut from one webhook: when it happened, and which
    webhook, event and site it came from. Their types only; the schemas list the fields."""

    __slots__ = ()

    occurred_at: datetime
    webhook_id: int
    event_id: int | None = None
    event: str
    site_id: int | None = None
    site_subdomain: str | None = None


@avro_record("io.chargifystream.Transaction")
class Transaction(_FromWebhook):
    """One Chargify payment or refund (Avro ``io.chargifystream.Transaction``)."""

    transaction_id: int
    kind: Literal["payment", "refund"]
    amount_cents: int
    currency: str | None = None
    customer_reference: str
    subscription_id: int | None = None
    refunded_payment_id: int | None = None
    memo: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("payment", "refund"):
            raise ValueError(f"kind must be payment or refund, got {self.kind!r}")
        object.__setattr__(self, "occurred_at", _utc(self.occurred_at, "occurred_at"))


@avro_record("io.chargifystream.ComponentAllocation")
class ComponentAllocation(AvroRecord):
    """One component's allocation change (Avro ``io.chargifystream.ComponentAllocation``)."""

    component_id: int
    component_name: str | None = None
    previous_allocation: float | None = None
    new_allocation: float


@avro_record("io.chargifystream.SubscriptionChange")
class SubscriptionChange(_FromWebhook):
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "occurred_at", _utc(self.occurred_at, "occurred_at"))
        object.__setattr__(self, "components", tuple(self.components))


@avro_record("io.chargifystream.Customer")
class Customer(AvroRecord):
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
