"""Field extraction: the few dozen form fields the routing rules read, decoded alone.

The rules (:mod:`processors.routing`) read a few dozen fields of a body of a few hundred
(``FIELDS``), so decoding the whole form was most of the cost of a decision.
:func:`extract_fields` decodes only those values, and returns exactly what a full decode
would give for each of them (a unit test holds it to that): the structure of a form
(which keys nest, repeat, or conflict) depends on its keys alone, so it is worked out once
per *key sequence*, by decoding the key sequence with a placeholder value per key, and
cached. Chargify sends the same few key sequences again and again. Anything unusual on the
way (a broken or non-ASCII escape anywhere, a pair with an empty key, a field that decodes
to a list, a key conflict, a key sequence too new for the cache to hold) takes the full
decoder instead.

The scan itself (find the key sequence, pick and percent-decode the values) is done in C
by ``processors._formscan``, built when the project is installed; it was about four fifths
of ``extract_fields``'s time in Python. Where it was not built (no C compiler), the same
scan runs in Python, and a unit test holds the two to the same result.
"""

from __future__ import annotations

import re
from binascii import a2b_qp
from typing import Any, Final

from chargify_stream.schemas.errors import MalformedPayload
from chargify_stream.schemas.form import decode_form, get

try:
    from chargify_stream.processors._formscan import extract as _extract_native
except ImportError:  # not built: the Python scan below gives the same fields
    _extract_native = None  # type: ignore[assignment]

__all__ = ["FIELDS", "NATIVE_SCAN", "Fields", "Path", "extract_fields"]

# Whether extract_fields runs its scan in C (the processor logs it at start).
NATIVE_SCAN: Final = _extract_native is not None

Path = tuple[str, ...]
Fields = dict[Path, Any]

# Every path the routing rules read; ``extract_fields`` decodes these values and no others.
FIELDS: Final[tuple[Path, ...]] = (
    ("id",),
    ("event",),
    ("payload", "event_id"),
    ("payload", "site", "id"),
    ("payload", "site", "subdomain"),
    ("payload", "customer_reference"),
    ("payload", "customer", "id"),
    ("payload", "customer", "reference"),
    ("payload", "subscription_id"),
    ("payload", "subscription", "id"),
    ("payload", "subscription", "state"),
    ("payload", "subscription", "previous_state"),
    ("payload", "subscription", "updated_at"),
    ("payload", "subscription", "currency"),
    ("payload", "subscription", "customer", "id"),
    ("payload", "subscription", "customer", "reference"),
    ("payload", "subscription", "product", "id"),
    ("payload", "subscription", "product", "handle"),
    ("payload", "transaction", "id"),
    ("payload", "transaction", "subscription_id"),
    ("payload", "transaction", "amount_in_cents"),
    ("payload", "transaction", "memo"),
    ("payload", "transaction", "created_at"),
    ("payload", "refund_id"),
    ("payload", "payment_id"),
    ("payload", "amount_in_cents"),
    ("payload", "memo"),
    ("payload", "timestamp"),
    ("payload", "previous_product", "id"),
    ("payload", "previous_product", "handle"),
    ("payload", "product", "id"),
    ("payload", "product", "handle"),
    ("payload", "component", "id"),
    ("payload", "component", "name"),
    ("payload", "previous_allocation"),
    ("payload", "new_allocation"),
)

# A "%" that does not start the escape of an ASCII character: either a broken escape,
# which schemas.form.parse_pairs rejects, or a non-ASCII byte, which only the full decoder
# checks for valid UTF-8. One search over the whole text, at C speed.
_NOT_ASCII_ESCAPE: Final = re.compile(r"%(?![0-7][0-9A-Fa-f])")
# From each pair's first "=" to the next "&": what is left is the key sequence.
# (Possessive: nothing to backtrack into, and measurably faster.)
_VALUES: Final = re.compile(r"=[^&]*+")

# For one key sequence: (path, index of its pair in the body split at "&") for each field
# that holds a string, or None when the body needs the full decoder.
_Layout = tuple[tuple[Path, int], ...]
_LAYOUTS: dict[str, _Layout | None] = {}
_LAYOUTS_MAX: Final = 512


def _fields_from_tree(data: dict[str, Any]) -> Fields:
    """The ``FIELDS`` of a fully decoded body."""
    fields: Fields = {}
    for path in FIELDS:
        value = get(data, *path)
        if value is not None:
            fields[path] = value
    return fields


def _layout(key_sequence: str) -> _Layout | None:
    """Decode the keys with each pair's index as its value, and see where each field is.

    Values never change a form's shape (``decode_form`` looks at keys and types only), so
    this holds for every body with these keys.
    """
    keys = key_sequence.split("&")
    placeholder = "&".join(f"{key}={index}" for index, key in enumerate(keys) if key)
    try:
        fields = _fields_from_tree(decode_form(placeholder.encode()))
    except MalformedPayload:
        return None
    layout = []
    for path, index in fields.items():
        if type(index) is not str:
            return None
        layout.append((path, int(index)))
    return tuple(layout)


def _unquote_ascii(value: str) -> str:
    """Percent-decode ``value``, whose escapes are known to be valid and ASCII.

    Done in C by ``binascii.a2b_qp``, whose ``=XX`` escapes are ours with ``=`` for ``%``
    (a literal ``=`` is escaped first). A ``%`` followed by a line break, which quoted-
    printable would read as a soft line break, never gets here: it is not a valid escape.
    """
    return a2b_qp(value.replace("=", "=3D").replace("%", "=").encode()).decode()


def _layout_of(key_sequence: str) -> _Layout | None:
    """The cached layout of ``key_sequence``, worked out on a miss."""
    try:
        return _LAYOUTS[key_sequence]
    except KeyError:
        pass
    layout = _layout(key_sequence)
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()  # a flood of one-off shapes must not pin the cache
    _LAYOUTS[key_sequence] = layout
    return layout


def _extract_fast(body: bytes) -> Fields | None:
    """``FIELDS`` decoded alone, or ``None`` when the body needs the full decoder."""
    if _extract_native is not None:
        fields: Fields | None = _extract_native(body, _LAYOUTS, _layout_of)
        if fields is not NotImplemented:  # a byte above 0x7F: the Python scan checks UTF-8
            return fields
    return _extract_python(body)


def _extract_python(body: bytes) -> Fields | None:
    """``_extract_fast`` without the C scan."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    if "+" in text:
        text = text.replace("+", " ")
    if "%" in text and _NOT_ASCII_ESCAPE.search(text):
        return None
    if text.startswith("=") or "&=" in text:
        # A pair with an empty key and a value: decode_form keeps it, and it breaks up
        # repeated groups; the key sequence cannot tell it from an empty piece ("&&").
        return None
    layout = _layout_of(_VALUES.sub("", text))
    if layout is None:
        return None
    pairs = text.split("&")
    fields: Fields = {}
    for path, index in layout:
        value = pairs[index].partition("=")[2]
        fields[path] = _unquote_ascii(value) if "%" in value else value
    return fields


def extract_fields(body: bytes) -> Fields:
    """What a full ``decode_form`` of ``body`` holds at each of ``FIELDS`` (absent: no entry).

    Raises ``MalformedPayload`` exactly when ``decode_form`` does, with its message.
    """
    fields = _extract_fast(body)
    if fields is None:
        fields = _fields_from_tree(decode_form(body))
    return fields
