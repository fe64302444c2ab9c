"""Avro single-object encoding: round trips, the wire header, bad input, older writers, and
every schema's values read by both Python Avro libraries (fastavro and Apache's ``avro``)."""

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

from chargify_stream.schemas import codec
from chargify_stream.schemas.errors import UnsupportedSchema
from chargify_stream.schemas.records import (
    ComponentAllocation,
    Customer,
    SubscriptionChange,
    Transaction,
)

AVRO = Path(str(resources.files("chargify_stream.schemas").joinpath("avro")))

TRANSACTION = Transaction(
    transaction_id=161537369,
    kind="payment",
    amount_cents=6400,
    currency="USD",
    customer_reference="cust-1",
    subscription_id=15100141,
    memo="Pookie Test - $10 Basic Plan: Renewal payment",
    occurred_at=datetime(2016, 11, 8, 21, 22, 20, 123456, tzinfo=UTC),
    webhook_id=141765008,
    event_id=347299364,
    event="payment_success",
    site_id=31615,
    site_subdomain="general-goods",
)
REFUND = Transaction(
    transaction_id=2**40,
    kind="refund",
    amount_cents=-(2**62),
    customer_reference="ü-ref",
    refunded_payment_id=161537369,
    occurred_at=datetime(2013, 11, 27, 0, 59, 35, tzinfo=UTC),
    webhook_id=2566279204,
    event="refund_success",
)
CHANGE = SubscriptionChange(
    subscription_id=15100141,
    customer_reference="cust-1",
    state="active",
    product_id=3792003,
    components=(
        ComponentAllocation(component_id=277221, component_name="Users", new_allocation=5.0),
        ComponentAllocation(component_id=1, previous_allocation=0.5, new_allocation=1.5),
    ),
    occurred_at=datetime(2012, 11, 19, 16, 59, 13, tzinfo=UTC),
    webhook_id=177103664,
    event="component_allocation_change",
)
CUSTOMER = Customer(
    customer_key="cust-1",
    partner_key="acme",
    email="ada@example.com",
    name="Ada Lovelace",
    updated_at=datetime(2026, 11, 27, 15, 0, 0, 250000, tzinfo=UTC),
)
ORPHAN = Customer(customer_key="ü-ref", updated_at=datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))
RECORDS = [TRANSACTION, REFUND, CHANGE, CUSTOMER, ORPHAN]
# One record of each schema, by record name.
EXAMPLES: dict[str, Transaction | SubscriptionChange | Customer] = {
    "Transaction": TRANSACTION,
    "SubscriptionChange": CHANGE,
    "Customer": CUSTOMER,
}
SCHEMA_FILES = sorted(AVRO.glob("*.avsc")) + sorted((AVRO / "history").glob("*.avsc"))


def _id(record: object) -> str:
    return str(getattr(record, "event", None) or f"customer-{record.customer_key}")  # type: ignore[attr-defined]


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification's reference code computes it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_crc_reference_matches_the_specification_test_vector() -> None:
    # share/test/data/schema-tests.txt in the Avro repository: "null" -> 7195948357588979594.
    assert _crc64_avro(b'"null"') == 7195948357588979594


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_round_trip(record: Transaction | SubscriptionChange | Customer) -> None:
    decoded = codec.decode_record(codec.encode(record))
    assert decoded == record
    assert type(decoded) is type(record)
    moment = decoded.updated_at if isinstance(decoded, Customer) else decoded.occurred_at
    assert moment.tzinfo is not None


@pytest.mark.parametrize("record", [TRANSACTION, CHANGE], ids=_id)
def test_decode_reads_pipeline_events(record: Transaction | SubscriptionChange) -> None:
    assert codec.decode(codec.encode(record)) == record


def test_decode_refuses_a_customer_where_an_event_belongs() -> None:
    """The sink reads events only: a Customer on its topics is dead-lettered, not written."""
    with pytest.raises(UnsupportedSchema, match="not a pipeline event"):
        codec.decode(codec.encode(CUSTOMER))


def test_round_trip_normalises_offsets_to_utc() -> None:
    eastern = datetime(2016, 11, 8, 16, 22, 20, tzinfo=timezone(timedelta(hours=-5)))
    decoded = codec.decode(codec.encode(dataclasses.replace(TRANSACTION, occurred_at=eastern)))
    assert decoded.occurred_at == eastern
    assert decoded.occurred_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("record", "name", "file"),
    [
        (TRANSACTION, "Transaction", "transaction.avsc"),
        (CHANGE, "SubscriptionChange", "subscription_change.avsc"),
        (CUSTOMER, "Customer", "customer.avsc"),
    ],
)
def test_header_is_marker_then_spec_fingerprint(
    record: Transaction | SubscriptionChange | Customer, name: str, file: str
) -> None:
    data = codec.encode(record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codec.fingerprint(name) == codec.fingerprint(f"io.chargifystream.{name}")
    canonical = fastavro.schema.to_parsing_canonical_form(
        fastavro.parse_schema(json.loads((AVRO / file).read_text()))
    )
    # Logical types are stripped from the canonical form, as in Java's SchemaNormalization.
    assert '"logicalType"' not in canonical and '"type":{"type":"long"}' not in canonical
    assert data[2:10] == _crc64_avro(canonical.encode()).to_bytes(8, "little")


def test_body_is_plain_avro_binary() -> None:
    data = codec.encode(TRANSACTION)
    schema = fastavro.parse_schema(json.loads((AVRO / "transaction.avsc").read_text()))
    datum: Any = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
    assert datum["transaction_id"] == 161537369
    assert datum["occurred_at"] == TRANSACTION.occurred_at


def test_fingerprint_of_unknown_name() -> None:
    with pytest.raises(KeyError):
        codec.fingerprint("Nope")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3", b"\xc3\x01", b"\x00\x01" + bytes(8) + b"\x02", b"\xc3\x02" + bytes(10)],
)
def test_bad_marker_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedSchema):
        codec.decode(data)


def test_unknown_fingerprint_is_unsupported() -> None:
    data = bytearray(codec.encode(TRANSACTION))
    data[2] ^= 0xFF
    with pytest.raises(UnsupportedSchema, match="fingerprint"):
        codec.decode(bytes(data))


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_every_truncation_is_unsupported(
    record: Transaction | SubscriptionChange | Customer,
) -> None:
    data = codec.encode(record)
    for end in range(len(data)):
        with pytest.raises(UnsupportedSchema):
            codec.decode_record(data[:end])


def test_trailing_bytes_are_unsupported() -> None:
    with pytest.raises(UnsupportedSchema):
        codec.decode(codec.encode(TRANSACTION) + b"\x00")


def test_unsupported_schema_carries_its_reason() -> None:
    with pytest.raises(UnsupportedSchema) as caught:
        codec.decode(b"not avro")
    assert caught.value.reason == "unsupported_schema"


def _single_object(schema_json: dict[str, object], datum: dict[str, object]) -> bytes:
    parsed = fastavro.parse_schema(schema_json)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    out = io.BytesIO()
    out.write(b"\xc3\x01" + _crc64_avro(canonical.encode()).to_bytes(8, "little"))
    fastavro.schemaless_writer(out, parsed, datum)
    return out.getvalue()


@pytest.mark.parametrize("path", sorted((AVRO / "history").glob("*.avsc")), ids=lambda p: p.name)
def test_values_written_with_each_history_schema_decode(path: Path) -> None:
    schema = json.loads(path.read_text())
    record = EXAMPLES[schema["name"]]
    fields = {field["name"] for field in schema["fields"]}
    datum = {k: v for k, v in record.to_avro().items() if k in fields}
    decoded = codec.decode_record(_single_object(schema, datum))
    assert type(decoded) is type(record)
    assert {k: v for k, v in decoded.to_avro().items() if k in fields} == datum


def test_an_older_writer_is_resolved_to_the_current_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer schema that lacks a defaulted field decodes with the default filled in."""
    (tmp_path / "history").mkdir()
    for file in ("transaction.avsc", "subscription_change.avsc"):
        (tmp_path / file).write_text((AVRO / file).read_text())
    older = json.loads((AVRO / "transaction.avsc").read_text())
    older["fields"] = [f for f in older["fields"] if f["name"] not in ("site_id", "site_subdomain")]
    (tmp_path / "history" / "transaction.v0.avsc").write_text(json.dumps(older))
    registry = codec._load_registry(tmp_path)
    monkeypatch.setattr(codec, "_registry", lambda: registry)

    datum = {
        k: v for k, v in TRANSACTION.to_avro().items() if k not in ("site_id", "site_subdomain")
    }
    decoded = codec.decode(_single_object(older, datum))
    assert decoded == dataclasses.replace(TRANSACTION, site_id=None, site_subdomain=None)
    # Without the history file the same bytes are refused.
    (tmp_path / "history" / "transaction.v0.avsc").unlink()
    monkeypatch.setattr(codec, "_registry", lambda: codec._load_registry(tmp_path))
    with pytest.raises(UnsupportedSchema, match="fingerprint"):
        codec.decode(_single_object(older, datum))


def test_record_fields_mirror_the_schemas() -> None:
    for cls, file in (
        (Transaction, "transaction.avsc"),
        (SubscriptionChange, "subscription_change.avsc"),
        (Customer, "customer.avsc"),
    ):
        schema = json.loads((AVRO / file).read_text())
        fields = dataclasses.fields(cls)
        assert [f.name for f in fields] == [f["name"] for f in schema["fields"]]
        for field, avro_field in zip(fields, schema["fields"], strict=True):
            has_default = field.default is not dataclasses.MISSING
            assert has_default == ("default" in avro_field), field.name
    items = json.loads((AVRO / "subscription_change.avsc").read_text())["fields"][8]["type"][
        "items"
    ]
    fields = dataclasses.fields(ComponentAllocation)
    assert [f.name for f in fields] == [f["name"] for f in items["fields"]]


def test_records_reject_naive_times_and_bad_kinds() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(TRANSACTION, occurred_at=datetime(2016, 1, 1))
    with pytest.raises(ValueError):
        dataclasses.replace(TRANSACTION, kind="charge")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dataclasses.replace(CUSTOMER, updated_at=datetime(2026, 1, 1))


# -- the writer built from the schema, against fastavro --------------------------------

_longs = st.integers(-(2**63), 2**63 - 1)
_optional_longs = st.none() | _longs
_texts = st.text(max_size=40)
_optional_texts = st.none() | _texts
_times = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))]),
)
_doubles = st.floats(allow_nan=False)

# The fields every record carries about the webhook it came from.
_event_fields: dict[str, Any] = {
    "occurred_at": _times,
    "webhook_id": _longs,
    "event_id": _optional_longs,
    "event": _texts,
    "site_id": _optional_longs,
    "site_subdomain": _optional_texts,
}
_transactions = st.builds(
    Transaction,
    transaction_id=_longs,
    kind=st.sampled_from(["payment", "refund"]),
    amount_cents=_longs,
    currency=_optional_texts,
    customer_reference=_texts,
    subscription_id=_optional_longs,
    refunded_payment_id=_optional_longs,
    memo=_optional_texts,
    **_event_fields,
)
_components = st.builds(
    ComponentAllocation,
    component_id=_longs,
    component_name=_optional_texts,
    previous_allocation=st.none() | _doubles,
    new_allocation=_doubles,
)
_changes = st.builds(
    SubscriptionChange,
    subscription_id=_longs,
    customer_reference=_texts,
    state=_optional_texts,
    previous_state=_optional_texts,
    product_id=_optional_longs,
    product_handle=_optional_texts,
    previous_product_id=_optional_longs,
    previous_product_handle=_optional_texts,
    components=st.lists(_components, max_size=3).map(tuple),
    **_event_fields,
)


_customers = st.builds(
    Customer,
    customer_key=_texts,
    partner_key=_optional_texts,
    email=_optional_texts,
    name=_optional_texts,
    updated_at=_times,
)


def _fastavro_bytes(record: Transaction | SubscriptionChange | Customer) -> bytes:
    schema = codec._registry().current[f"io.chargifystream.{type(record).__name__}"]
    return codec._encode_with_fastavro(schema, record)


def test_every_current_schema_has_a_built_writer() -> None:
    # Otherwise encode falls back to fastavro and is several times slower.
    assert all(s.write is not None for s in codec._registry().current.values())


@settings(max_examples=300, deadline=None)
@given(st.one_of(_transactions, _changes, _customers))
def test_the_built_writer_writes_exactly_what_fastavro_writes(
    record: Transaction | SubscriptionChange | Customer,
) -> None:
    data = codec.encode(record)
    assert data == _fastavro_bytes(record)
    assert codec.decode_record(data) == record


def test_a_schema_with_other_types_is_left_to_fastavro() -> None:
    assert (
        codec._compile(
            {"type": "record", "name": "X", "fields": [{"name": "flag", "type": "boolean"}]}
        )
        is None
    )
    assert codec._compile(["null", "string", "long"]) is None
    assert codec._compile({"type": "int", "logicalType": "date"}) is None


# -- other readers: fastavro and Apache's avro, each used the way docs/analysts.md shows ---


def _strip_logical_types(schema: Any) -> Any:
    """The schema without ``logicalType`` attributes: what Parsing Canonical Form keeps."""
    if isinstance(schema, dict):
        return {k: _strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_strip_logical_types(v) for v in schema]
    return schema


def parsing_fingerprint(schema_json: dict[str, Any]) -> bytes:
    """The specification's CRC-64-AVRO fingerprint, computed with Apache's ``avro`` only.

    ``avro``'s ``Schema.fingerprint()`` keeps ``{"type":"long"}`` for a logical type; with
    the logical types removed first it writes the Parsing Canonical Form.
    """
    return avro.schema.parse(json.dumps(_strip_logical_types(schema_json))).fingerprint()


def _records_written_with(path: Path) -> tuple[dict[str, Any], bytes]:
    """A schema file and a single-object value written with it (every field filled)."""
    schema = json.loads(path.read_text())
    record = EXAMPLES[schema["name"]]
    fields = {field["name"] for field in schema["fields"]}
    datum = {k: v for k, v in record.to_avro().items() if k in fields}
    # A current schema's value comes from the codec's own writer, as the pipeline writes it.
    current = path.parent == AVRO
    return schema, codec.encode(record) if current else _single_object(schema, datum)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_apache_avro_reads_every_schemas_values(path: Path) -> None:
    schema_json, data = _records_written_with(path)
    writers = {parsing_fingerprint(json.loads(p.read_text())): p for p in SCHEMA_FILES}
    assert data[:2] == b"\xc3\x01"
    assert writers[data[2:10]].read_text() == path.read_text()
    writer = avro.schema.parse(path.read_text())
    current = AVRO / path.name.split(".")[0]
    reader = avro.schema.parse(current.with_suffix(".avsc").read_text())
    buffer = io.BytesIO(data[10:])
    datum = avro.io.DatumReader(writer, reader).read(avro.io.BinaryDecoder(buffer))
    assert buffer.tell() == len(data) - 10
    expected = EXAMPLES[schema_json["name"]].to_avro()
    assert {k: datum[k] for k in expected if k in datum} == {
        k: v for k, v in expected.items() if k in datum
    }


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_fastavro_reads_every_schemas_values(path: Path) -> None:
    schema_json, data = _records_written_with(path)
    parsed = fastavro.parse_schema(schema_json)
    found = fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(parsed), "CRC-64-AVRO"
    )
    assert data[2:10].hex() == found
    datum: Any = fastavro.schemaless_reader(io.BytesIO(data[10:]), parsed, None)
    expected = EXAMPLES[schema_json["name"]].to_avro()
    assert datum == {k: v for k, v in expected.items() if k in datum}


_FILES = {
    "Transaction": "transaction.avsc",
    "SubscriptionChange": "subscription_change.avsc",
    "Customer": "customer.avsc",
}


@pytest.mark.parametrize("record", RECORDS, ids=_id)
def test_apache_avro_writes_the_same_body(
    record: Transaction | SubscriptionChange | Customer,
) -> None:
    schema = avro.schema.parse((AVRO / _FILES[type(record).__name__]).read_text())
    out = io.BytesIO()
    avro.io.DatumWriter(schema).write(record.to_avro(), avro.io.BinaryEncoder(out))
    assert codec.encode(record)[10:] == out.getvalue()


@pytest.mark.parametrize("name", sorted(_FILES))
def test_apache_avros_own_fingerprint_is_not_the_specifications(name: str) -> None:
    """Pins the ``avro`` package's deviation that docs/analysts.md works around: its
    canonical form keeps ``{"type":"long"}`` for ``timestamp-micros``, where the
    specification ([PRIMITIVES], [STRIP]) and Java's SchemaNormalization write ``"long"``.
    Should a release fix it, this fails and the docs' workaround can go."""
    schema = avro.schema.parse((AVRO / _FILES[name]).read_text())
    assert '"type":{"type":"long"}' in schema.canonical_form
    assert schema.fingerprint() != codec.fingerprint(name)
    assert parsing_fingerprint(json.loads((AVRO / _FILES[name]).read_text())) == (
        codec.fingerprint(name)
    )


def test_parsing_canonical_form_of_a_logical_type_is_its_primitive() -> None:
    # The specification's transformations applied by hand to one timestamp field.
    schema = {
        "type": "record",
        "name": "T",
        "namespace": "n",
        "doc": "dropped",
        "fields": [{"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}}],
    }
    expected = '{"name":"n.T","type":"record","fields":[{"name":"at","type":"long"}]}'
    assert fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(schema)) == expected
    assert avro.schema.parse(json.dumps(_strip_logical_types(schema))).canonical_form == expected
