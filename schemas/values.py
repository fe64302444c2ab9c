"""Typed projections of Chargify's string values (WEBHOOKS.md §1.5, §7.4).

Every form value is a string and an empty one means null, so every function here maps
``None`` and ``""`` to ``None`` and raises ``MalformedPayload`` for anything it cannot read.
Callers that need a value check for ``None`` themselves and name the missing field.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

from chargify_stream.schemas.errors import MalformedPayload

__all__ = [
    "none_if_empty",
    "to_bool",
    "to_decimal_quantity",
    "to_float",
    "to_int",
    "to_timestamp",
]

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _show(text: str) -> str:
    """A short, safe rendering of a bad value for an error message."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def none_if_empty(text: str | None) -> str | None:
    """``""`` (Chargify's null) -> ``None``; anything else unchanged."""
    return text or None


def to_bool(text: str | None) -> bool | None:
    """``"true"``/``"false"`` -> ``bool``; empty -> ``None``."""
    if not text:
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    raise MalformedPayload(f"not a boolean: {_show(text)}")


def _is_decimal_integer(text: str) -> bool:
    digits = text[1:] if text[0] in "+-" else text
    # isdigit alone accepts non-ASCII digits; int() alone accepts "1_000" and spaces.
    return digits.isascii() and digits.isdigit()


def to_int(text: str | None) -> int | None:
    """A decimal integer that fits a signed 64-bit ``BIGINT``/Avro ``long``; empty -> ``None``."""
    if not text:
        return None
    if len(text) < 19 and text.isdigit() and text.isascii():
        return int(text)  # the usual case: fewer than 19 digits always fit
    if not _is_decimal_integer(text):
        raise MalformedPayload(f"not an integer: {_show(text)}")
    value = int(text)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise MalformedPayload(f"integer out of 64-bit range: {_show(text)}")
    return value


def to_decimal_quantity(text: str | None) -> Decimal | None:
    """A plain decimal number (``"3"``, ``"2.5"``, ``"-1"``), as sent for allocations."""
    if not text:
        return None
    whole, dot, fraction = text.partition(".")
    if not whole or not _is_decimal_integer(whole):
        raise MalformedPayload(f"not a decimal quantity: {_show(text)}")
    if dot and not (fraction.isascii() and fraction.isdigit()):
        raise MalformedPayload(f"not a decimal quantity: {_show(text)}")
    return Decimal(text)


def to_float(text: str | None) -> float | None:
    """A plain decimal number as a finite ``float`` (the Avro ``double`` of allocations)."""
    quantity = to_decimal_quantity(text)
    if quantity is None:
        return None
    value = float(quantity)
    if not math.isfinite(value):
        raise MalformedPayload(f"quantity out of range: {_show(text or '')}")
    return value


def to_timestamp(text: str | None) -> datetime | None:
    """Any of Chargify's timestamp formats -> a timezone-aware UTC ``datetime``.

    Accepted: ``2016-11-08 16:22:20 -0500`` (the usual webhook format, also with ``-0000``),
    ISO-8601 with ``Z`` or an offset (``2012-11-19T16:59:13Z``), and
    ``2013-11-27 00:59:35 UTC``. A timestamp without a zone is rejected: guessing one would
    shift the event by hours.
    """
    if not text:
        return None
    iso = text
    if len(text) == 25 and text[19] == " " and text[20] in "+-":
        # "YYYY-MM-DD HH:MM:SS -0500" -> "YYYY-MM-DD HH:MM:SS-05:00"
        iso = f"{text[:19]}{text[20:23]}:{text[23:]}"
    elif text.endswith(" UTC"):
        iso = text[:-4] + "+00:00"
    try:
        value = datetime.fromisoformat(iso)
    except ValueError:
        raise MalformedPayload(f"not a timestamp: {_show(text)}") from None
    if value.tzinfo is None:
        raise MalformedPayload(f"timestamp without a time zone: {_show(text)}")
    return value.astimezone(UTC)
