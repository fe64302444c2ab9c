"""Typed projections of Chargify's string values."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.values import (
    none_if_empty,
    to_bool,
    to_decimal_quantity,
    to_float,
    to_int,
    to_timestamp,
)


@pytest.mark.parametrize("function", [to_bool, to_int, to_decimal_quantity, to_float, to_timestamp])
@pytest.mark.parametrize("empty", ["", None])
def test_empty_is_none(function: object, empty: str | None) -> None:
    assert function(empty) is None  # type: ignore[operator]


def test_none_if_empty() -> None:
    assert none_if_empty("") is None
    assert none_if_empty(None) is None
    assert none_if_empty(" ") == " "
    assert none_if_empty("USD") == "USD"


def test_to_bool() -> None:
    assert to_bool("true") is True
    assert to_bool("false") is False
    for bad in ("True", "1", "yes", "false "):
        with pytest.raises(MalformedPayload):
            to_bool(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("6400", 6400),
        ("-100", -100),
        ("+7", 7),
        ("2566279204", 2566279204),
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
    ],
)
def test_to_int(text: str, expected: int) -> None:
    assert to_int(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9223372036854775808",
        "-9223372036854775809",
        "1_000",
        " 1",
        "1 ",
        "1.0",
        "1e3",
        "abc",
        "-",
        "٣",
        "0x10",
    ],
)
def test_to_int_rejects(text: str) -> None:
    with pytest.raises(MalformedPayload):
        to_int(text)


def test_to_decimal_quantity_and_float() -> None:
    assert to_decimal_quantity("3") == Decimal(3)
    assert to_decimal_quantity("2.50") == Decimal("2.50")
    assert to_decimal_quantity("-1") == Decimal(-1)
    assert to_float("2.5") == 2.5
    assert to_float("0") == 0.0


@pytest.mark.parametrize("text", ["NaN", "Infinity", "1e3", "1.", ".5", "1.2.3", "abc", "1,5", "-"])
def test_quantity_rejects(text: str) -> None:
    with pytest.raises(MalformedPayload):
        to_decimal_quantity(text)
    with pytest.raises(MalformedPayload):
        to_float(text)


def test_to_float_rejects_overflow() -> None:
    with pytest.raises(MalformedPayload):
        to_float("9" * 400)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2016-11-08 16:22:20 -0500", datetime(2016, 11, 8, 21, 22, 20, tzinfo=UTC)),
        ("2016-11-04 17:06:43 -0400", datetime(2016, 11, 4, 21, 6, 43, tzinfo=UTC)),
        ("2016-12-20 18:55:55 -0000", datetime(2016, 12, 20, 18, 55, 55, tzinfo=UTC)),
        ("2016-12-20 18:55:55 +0530", datetime(2016, 12, 20, 13, 25, 55, tzinfo=UTC)),
        ("2012-11-19T16:59:13Z", datetime(2012, 11, 19, 16, 59, 13, tzinfo=UTC)),
        ("2015-01-24T12:16:46-05:00", datetime(2015, 1, 24, 17, 16, 46, tzinfo=UTC)),
        ("2015-01-24T12:16:46.123456+00:00", datetime(2015, 1, 24, 12, 16, 46, 123456, tzinfo=UTC)),
        ("2013-11-27 00:59:35 UTC", datetime(2013, 11, 27, 0, 59, 35, tzinfo=UTC)),
    ],
)
def test_to_timestamp_formats(text: str, expected: datetime) -> None:
    value = to_timestamp(text)
    assert value == expected
    assert value is not None and value.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2016-11-08 16:22:20",
        "2016-11-08",
        "yesterday",
        "2016-13-08 16:22:20 -0500",
        "2016-11-08 16:22:20 EST",
        "16:22:20 -0500",
    ],
)
def test_to_timestamp_rejects(text: str) -> None:
    with pytest.raises(MalformedPayload):
        to_timestamp(text)
