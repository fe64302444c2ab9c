"""The records are built from the ``.avsc`` files: a field added to a schema reaches the
record, its Avro datum and the fast writer without a change to ``schemas/records.py``."""

from __future__ import annotations

import copy
import io
import json
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import pytest

from chargify_stream import analytics
from chargify_stream.schemas import codec
from chargify_stream.schemas.records import AvroRecord, avro_record

AVRO = Path(str(resources.files("chargify_stream.schemas").joinpath("avro")))


def _transaction_schema_with(field: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((AVRO / "transaction.avsc").read_text())
    schema["fields"].append(field)
    return schema


def test_a_field_added_to_a_schema_reaches_the_record() -> None:
    schema = _transaction_schema_with(
        {"name": "gateway_note", "type": ["null", "string"], "default": None}
    )

    @avro_record(copy.deepcopy(schema))
    class Transaction(AvroRecord):
        transaction_id: int

    fields: dict[str, Any] = {
        "transaction_id": 7,
        "kind": "payment",
        "amount_cents": 100,
        "customer_reference": "cust-1",
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "webhook_id": 9,
        "event": "payment_success",
    }
    plain = Transaction(**fields)
    assert plain.gateway_note is None  # type: ignore[attr-defined]  # the schema's default
    noted = Transaction(**fields, gateway_note="by hand")  # type: ignore[call-arg]
    assert noted.to_avro()["gateway_note"] == "by hand"
    assert list(noted.to_avro()) == [f["name"] for f in schema["fields"]]
    assert Transaction.from_avro(noted.to_avro()) == noted
    # ... and the plain form that ``tail`` prints and the analytics readers return.
    assert analytics.transaction_dict(noted)["gateway_note"] == "by hand"  # type: ignore[arg-type]

    # The fast writer, built from the changed schema, writes the new field as fastavro does.
    parsed = fastavro.parse_schema(schema)
    write = codec._compile(parsed)
    assert write is not None
    ours = bytearray()
    write(noted, ours)
    theirs = io.BytesIO()
    fastavro.schemaless_writer(theirs, parsed, noted.to_avro())
    assert bytes(ours) == theirs.getvalue()


def test_a_record_cannot_declare_what_its_schema_lacks() -> None:
    schema = json.loads((AVRO / "customer.avsc").read_text())
    with pytest.raises(TypeError, match="not in schema"):

        @avro_record(schema)
        class Customer(AvroRecord):
            customer_key: str
            loyalty_points: int


def test_a_record_cannot_change_a_default_of_its_schema() -> None:
    schema = json.loads((AVRO / "customer.avsc").read_text())
    with pytest.raises(TypeError, match="default differs"):

        @avro_record(schema)
        class Customer(AvroRecord):
            customer_key: str = "anonymous"
