"""Avro single-object encoding of the values on the typed topics and ``chargify.customers``.

Wire format (Avro specification, "Single-object encoding")::

    C3 01 | CRC-64-AVRO fingerprint of the writer schema, 8 bytes little-endian | Avro binary

The fingerprint is taken over the schema's Parsing Canonical Form as the specification
defines it: [STRIP] keeps only ``type``, ``name``, ``fields``, ``symbols``, ``items``,
``values`` and ``size``, and [PRIMITIVES] writes a primitive as its name, so a
``{"type": "long", "logicalType": "timestamp-micros"}`` field is plain ``"long"``. Java's
``SchemaNormalization``, fastavro's ``to_parsing_canonical_form`` and the Rust library agree.
The ``avro`` package (1.12) does not: its ``Schema.canonical_form`` keeps ``{"type":"long"}``
for a logical type, so its ``Schema.fingerprint()`` differs from ours for every schema with
a timestamp. Ours is the specification's; the canonical form therefore comes from fastavro,
and ``avro`` (the reference implementation) is used to validate the schema files. A reader
using ``avro`` computes the fingerprint of the schema with its ``logicalType`` attributes
removed (:func:`parsing_fingerprint` in the tests; docs/analysts.md shows it), and decodes
the body with ``avro.io.DatumReader``: the bytes are the same.

Values are written with the current schema (``schemas/avro/*.avsc``), by a writer built
from the schema once (:func:`_compile`): fastavro's ``schemaless_writer`` spends about
10 µs a record on per-call set-up, which was a sixth of the processor's work per
webhook. The writer covers the types our schemas use (``long``, ``string``, ``double``,
``timestamp-micros``, ``["null", T]``, arrays and records) and a unit test holds it
byte for byte to fastavro; a schema with anything else is written by fastavro.
Reading also accepts
any schema in ``schemas/avro/history/`` and resolves it to the current schema of the same
record name, so records already on a topic stay readable after a compatible change.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import avro.schema
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint as _crc64_hex
from fastavro.schema import to_parsing_canonical_form

from chargify_stream.schemas.errors import UnsupportedSchema
from chargify_stream.schemas.records import Customer, SubscriptionChange, Transaction

__all__ = ["MARKER", "Event", "Record", "decode", "decode_record", "encode", "fingerprint"]

# A pipeline event: what the processor emits and the sink writes.
Event = Transaction | SubscriptionChange
# Any value this codec writes and reads.
Record = Transaction | SubscriptionChange | Customer

MARKER = b"\xc3\x01"
_HEADER_LENGTH = len(MARKER) + 8

_RECORD_TYPES: dict[str, Callable[[dict[str, Any]], Record]] = {
    "io.chargifystream.Transaction": Transaction.from_avro,
    "io.chargifystream.SubscriptionChange": SubscriptionChange.from_avro,
    "io.chargifystream.Customer": Customer.from_avro,
}


# Appends the Avro binary encoding of a value to a buffer.
_Write = Callable[[Any, bytearray], None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_pack_double = struct.Struct("<d").pack


def _write_long(value: int, out: bytearray) -> None:
    """Zig-zag, then base-128 varint, least significant group first (Avro ``long``)."""
    n = (value << 1) ^ (value >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_string(value: str, out: bytearray) -> None:
    data = value.encode()
    _write_long(len(data), out)
    out += data


def _write_double(value: float, out: bytearray) -> None:
    out += _pack_double(value)


def _write_timestamp_micros(value: datetime, out: bytearray) -> None:
    # Integer arithmetic, as fastavro does: a float of the seconds would lose microseconds.
    delta = value - _EPOCH
    _write_long((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds, out)


_PRIMITIVES: dict[str, _Write] = {
    "long": _write_long,
    "string": _write_string,
    "double": _write_double,
}


def _compile(schema: Any) -> _Write | None:
    """A writer for ``schema`` (fastavro's parsed form), or None if it uses other types.

    Records are read by attribute: the writer of a record schema takes the dataclass of
    :mod:`schemas.records` whose fields mirror it.
    """
    if isinstance(schema, str):
        return _PRIMITIVES.get(schema)
    if isinstance(schema, list):
        if len(schema) != 2 or schema[0] != "null":
            return None
        inner = _compile(schema[1])
        if inner is None:
            return None

        def optional(value: Any, out: bytearray, inner: _Write = inner) -> None:
            if value is None:
                out.append(0)  # branch 0, "null"
            else:
                out.append(2)  # branch 1, zig-zag encoded
                inner(value, out)

        return optional
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if kind == "long" and logical == "timestamp-micros":
        return _write_timestamp_micros
    if logical is not None:
        return None
    if kind == "array":
        item = _compile(schema["items"])
        if item is None:
            return None

        def array(value: Any, out: bytearray, item: _Write = item) -> None:
            if value:
                _write_long(len(value), out)  # one block, then the empty block
                for element in value:
                    item(element, out)
            out.append(0)

        return array
    if kind == "record":
        fields = []
        for spec in schema["fields"]:
            write = _compile(spec["type"])
            if write is None:
                return None
            fields.append((spec["name"], write))
        plan = tuple(fields)

        def record(value: Any, out: bytearray, plan: tuple[tuple[str, _Write], ...] = plan) -> None:
            for name, write in plan:
                write(getattr(value, name), out)

        return record
    return _compile(kind) if isinstance(kind, str) else None


@dataclass(frozen=True, slots=True)
class _Schema:
    full_name: str
    fingerprint: bytes
    parsed: Any  # fastavro's parsed form
    write: _Write | None  # None: written by fastavro


@dataclass(frozen=True, slots=True)
class _Reader:
    writer: Any
    reader: Any  # None when the writer schema is the current one: nothing to resolve
    build: Callable[[dict[str, Any]], Record]


@dataclass(frozen=True, slots=True)
class _Registry:
    current: dict[str, _Schema]  # by full name
    readers: dict[bytes, _Reader]  # by fingerprint


def _load(text: str, origin: str) -> _Schema:
    avro.schema.parse(text)  # raises on a schema the reference implementation rejects
    parsed: Any = parse_schema(json.loads(text))
    full_name: str = parsed["name"]
    if full_name not in _RECORD_TYPES:
        raise RuntimeError(f"{origin}: no record type for schema {full_name}")
    canonical = to_parsing_canonical_form(parsed)
    fingerprint = bytes.fromhex(_crc64_hex(canonical, "CRC-64-AVRO"))
    return _Schema(full_name, fingerprint, parsed, _compile(parsed))


def _load_registry(folder: Traversable) -> _Registry:
    """Current schemas from ``folder``, readers for them and for ``folder/history``."""
    current: dict[str, _Schema] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".avsc"):
            schema = _load(entry.read_text(encoding="utf-8"), entry.name)
            current[schema.full_name] = schema
    readers: dict[bytes, _Reader] = {}
    for entry in sorted(folder.joinpath("history").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".avsc"):
            old = _load(entry.read_text(encoding="utf-8"), f"history/{entry.name}")
            if old.full_name not in current:
                raise RuntimeError(f"history/{entry.name}: {old.full_name} has no current schema")
            readers[old.fingerprint] = _Reader(
                old.parsed, current[old.full_name].parsed, _RECORD_TYPES[old.full_name]
            )
    for schema in current.values():
        readers[schema.fingerprint] = _Reader(schema.parsed, None, _RECORD_TYPES[schema.full_name])
    return _Registry(current, readers)


@functools.cache
def _registry() -> _Registry:
    return _load_registry(resources.files("chargify_stream.schemas").joinpath("avro"))


def fingerprint(name: str) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint (as on the wire) of the current schema ``name``.

    ``name`` is the record name, short (``Transaction``) or full
    (``io.chargifystream.Transaction``).
    """
    current = _registry().current
    full_name = name if "." in name else f"io.chargifystream.{name}"
    try:
        return current[full_name].fingerprint
    except KeyError:
        raise KeyError(f"no current Avro schema named {name!r}") from None


def encode(record: Record) -> bytes:
    """Single-object encode ``record`` with its current schema."""
    schema = _registry().current[f"io.chargifystream.{type(record).__name__}"]
    if schema.write is not None:
        buffer = bytearray(MARKER)
        buffer += schema.fingerprint
        schema.write(record, buffer)
        return bytes(buffer)
    return _encode_with_fastavro(schema, record)


def _encode_with_fastavro(schema: _Schema, record: Record) -> bytes:
    out = io.BytesIO()
    out.write(MARKER)
    out.write(schema.fingerprint)
    schemaless_writer(out, schema.parsed, record.to_avro())
    return out.getvalue()


def decode(data: bytes) -> Event:
    """Decode a pipeline event (a ``Transaction`` or ``SubscriptionChange``).

    As :func:`decode_record`, and a value of any other record (a ``Customer``) is
    ``UnsupportedSchema`` too: it has no place on the topics the sink reads.
    """
    record = decode_record(data)
    if isinstance(record, Customer):
        raise UnsupportedSchema("a Customer value is not a pipeline event")
    return record


def decode_record(data: bytes) -> Record:
    """Decode a single-object encoded value written with a current or historical schema.

    Raises ``UnsupportedSchema`` when the marker or fingerprint is unknown, or the body is
    truncated, corrupt or followed by extra bytes.
    """
    if len(data) < _HEADER_LENGTH or data[:2] != MARKER:
        raise UnsupportedSchema("value is not Avro single-object encoded (no C3 01 header)")
    found = bytes(data[2:_HEADER_LENGTH])
    reader = _registry().readers.get(found)
    if reader is None:
        raise UnsupportedSchema(f"unknown Avro schema fingerprint {found.hex()}")
    buffer = io.BytesIO(data)
    buffer.seek(_HEADER_LENGTH)
    try:
        datum = schemaless_reader(buffer, reader.writer, reader.reader)
        record = reader.build(datum)  # type: ignore[arg-type]
    # Corrupt bytes surface as whatever the decoder trips on (EOFError, ValueError,
    # UnicodeDecodeError, OverflowError, ...); all of them mean the same thing here.
    except Exception as exc:
        raise UnsupportedSchema(
            f"Avro body does not decode with schema {found.hex()}: {type(exc).__name__}"
        ) from exc
    if buffer.tell() != len(data):
        raise UnsupportedSchema(f"{len(data) - buffer.tell()} unexpected bytes after Avro body")
    return record
