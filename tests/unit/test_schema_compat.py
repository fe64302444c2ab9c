"""The published Avro schemas evolve only backward-compatibly (DESIGN.md "Topics").

Every frozen schema in ``schemas/avro/history/`` must stay readable by the current schema of
the same record: checked with the reference implementation's compatibility checker, and by
actually resolving a value written with the old schema.
"""

from __future__ import annotations

import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

import avro.compatibility
import avro.schema
import fastavro
import pytest

AVRO = Path(str(resources.files("chargify_stream.schemas").joinpath("avro")))
CURRENT = {json.loads(p.read_text())["name"]: p for p in sorted(AVRO.glob("*.avsc"))}
HISTORY = sorted((AVRO / "history").glob("*.avsc"))


def _compatible(reader_text: str, writer_text: str) -> tuple[bool, str]:
    checker = avro.compatibility.ReaderWriterCompatibilityChecker()
    result = checker.get_compatibility(
        avro.schema.parse(reader_text), avro.schema.parse(writer_text)
    )
    ok = result.compatibility is avro.compatibility.SchemaCompatibilityType.compatible
    return ok, f"{result.messages} at {result.locations}"


def _sample_datum(schema: Any) -> Any:
    """A value for ``schema`` with every field filled (non-null branch of each union)."""
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        return _sample_datum(branches[0]) if branches else None
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "record":
            return {f["name"]: _sample_datum(f["type"]) for f in schema["fields"]}
        if kind == "array":
            return [_sample_datum(schema["items"])]
        if kind == "map":
            return {"k": _sample_datum(schema["values"])}
        if kind == "enum":
            return schema["symbols"][0]
        return _sample_datum(kind)
    return {
        "long": 2**40,
        "int": 7,
        "string": "x",
        "double": 1.5,
        "float": 0.5,
        "boolean": True,
        "bytes": b"b",
        "null": None,
    }[schema]


def test_every_current_schema_has_a_published_history_version() -> None:
    published = {json.loads(p.read_text())["name"] for p in HISTORY}
    assert published == set(CURRENT), "publish a frozen copy in schemas/avro/history/"


def test_history_files_are_named_after_their_version() -> None:
    for path in HISTORY:
        stem, version = path.name.removesuffix(".avsc").rsplit(".v", 1)
        assert version.isdigit(), path.name
        assert (AVRO / f"{stem}.avsc").exists(), path.name


@pytest.mark.parametrize("history", HISTORY, ids=lambda p: p.name)
def test_current_schema_reads_history_version(history: Path) -> None:
    writer_text = history.read_text()
    writer = json.loads(writer_text)
    reader_text = CURRENT[writer["name"]].read_text()
    ok, why = _compatible(reader_text, writer_text)
    assert ok, f"{CURRENT[writer['name']].name} cannot read {history.name}: {why}"

    datum = _sample_datum(writer)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(writer), datum)
    out.seek(0)
    read: Any = fastavro.schemaless_reader(
        out, fastavro.parse_schema(writer), fastavro.parse_schema(json.loads(reader_text))
    )
    key = writer["fields"][0]["name"]  # every record's identity comes first
    assert read[key] == datum[key]


def test_the_checker_catches_an_incompatible_change() -> None:
    """Guard against a checker that passes everything: a new field without default fails."""
    writer_text = CURRENT["Transaction"].read_text()
    reader = json.loads(writer_text)
    reader["fields"].append({"name": "partner_key", "type": "string"})
    ok, _ = _compatible(json.dumps(reader), writer_text)
    assert not ok
    renamed = json.loads(writer_text)
    renamed["fields"][0]["type"] = "string"
    ok, _ = _compatible(json.dumps(renamed), writer_text)
    assert not ok
