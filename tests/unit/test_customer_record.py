"""The ``Customer`` record of ``chargify.customers``: schema, dataclass and encoding."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import avro.io
import avro.schema
import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.records import Customer
from sink.customer_relay import record_of
from tests.unit.test_codec import CUSTOMER, _crc64_avro

AVRO = Path(str(resources.files("schemas").joinpath("avro")))
SCHEMA = json.loads((AVRO / "customer.avsc").read_text())


def test_fields_are_those_of_the_design_and_mirror_the_dataclass() -> None:
    assert SCHEMA["name"] == "Customer" and SCHEMA["namespace"] == "io.chargifystream"
    assert [f["name"] for f in SCHEMA["fields"]] == [
        "customer_key",
        "partner_key",
        "email",
        "name",
        "updated_at",
    ]
    fields = dataclasses.fields(Customer)
    assert [f.name for f in fields] == [f["name"] for f in SCHEMA["fields"]]
    for field, avro_field in zip(fields, SCHEMA["fields"], strict=True):
        has_default = field.default is not dataclasses.MISSING
        assert has_default == ("default" in avro_field), field.name
    assert SCHEMA["fields"][1]["type"] == ["null", "string"]  # partner_key is nullable
    assert SCHEMA["fields"][4]["type"] == {"type": "long", "logicalType": "timestamp-micros"}


def test_round_trip_and_wire_header() -> None:
    data = codec.encode(CUSTOMER)
    assert codec.decode(data) == CUSTOMER
    assert data[:2] == b"\xc3\x01"
    canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(SCHEMA))
    assert '"logicalType"' not in canonical
    assert data[2:10] == codec.fingerprint("Customer")
    assert data[2:10] == _crc64_avro(canonical.encode()).to_bytes(8, "little")


def test_the_body_reads_with_the_reference_implementation() -> None:
    data = codec.encode(dataclasses.replace(CUSTOMER, partner_key=None))
    reader = avro.io.DatumReader(avro.schema.parse(json.dumps(SCHEMA)))
    datum: Any = reader.read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
    assert datum["customer_key"] == "cust-1" and datum["partner_key"] is None
    assert datum["updated_at"] == CUSTOMER.updated_at


def test_times_are_utc_and_must_be_aware() -> None:
    tokyo = datetime(2026, 11, 28, 0, 0, tzinfo=timezone(timedelta(hours=9)))
    decoded = codec.decode(codec.encode(dataclasses.replace(CUSTOMER, updated_at=tokyo)))
    assert isinstance(decoded, Customer)
    assert decoded.updated_at == tokyo and decoded.updated_at.tzinfo is UTC
    with pytest.raises(ValueError):
        dataclasses.replace(CUSTOMER, updated_at=datetime(2026, 1, 1))


_optional_texts = st.none() | st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        Customer,
        customer_key=st.text(max_size=40),
        partner_key=_optional_texts,
        email=_optional_texts,
        name=_optional_texts,
        updated_at=st.datetimes(
            min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
        ),
    )
)
def test_the_built_writer_writes_exactly_what_fastavro_writes(record: Customer) -> None:
    schema = codec._registry().current["io.chargifystream.Customer"]
    assert schema.write is not None
    data = codec.encode(record)
    assert data == codec._encode_with_fastavro(schema, record)
    assert codec.decode(data) == record


def test_an_outbox_row_is_a_keyed_customer_or_a_tombstone() -> None:
    changed = CUSTOMER.updated_at
    key, value = record_of((7, "cust-1", False, "partner-a", "ada@example.com", "Ada", changed))
    assert key == b"cust-1" and value is not None
    assert codec.decode(value) == CUSTOMER
    assert record_of((8, "cust-1", True, None, None, None, changed)) == (b"cust-1", None)
