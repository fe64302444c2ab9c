"""The few fields the gateway needs from a body, found without decoding the whole form.

The gateway publishes the body byte for byte; all it needs is the webhook ``id``, the
``event`` and the subscription id (the record key). Those are top-level or shallow keys
whose names Chargify sends literally (brackets are never percent-encoded, WEBHOOKS.md
§1.5), so each is found with one C-level ``bytes.find`` for ``&name=`` and only its value
is decoded. The full form (a few hundred pairs) is decoded once, by the processor.

"Decodable" is checked as cheaply: the body must be UTF-8, every ``%`` must start a
two-digit hex escape, and, only when some escape encodes a non-ASCII byte, the
percent-decoded bytes must be UTF-8 too. That is what ``schemas.form.parse_pairs``
rejects, so a body the gateway accepts is one the processor can read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = ["Frame", "FramingError", "frame"]

# Field names as they appear on the wire, each with the "=" that ends a key.
_ID = b"id="
_EVENT = b"event="
_SUBSCRIPTION_ID = (b"payload[subscription][id]=", b"payload[subscription_id]=")

# The largest Postgres bigint: ids above it are not Chargify ids.
_MAX_ID = 2**63 - 1
_MAX_EVENT_LENGTH = 100

_BROKEN_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_HIGH_ESCAPE = re.compile(rb"%[89A-Fa-f][0-9A-Fa-f]")

TEST_EVENT = "test"


class FramingError(ValueError):
    """The body is not a decodable form with a numeric ``id`` and an ``event``.

    ``reason`` is a short code for metrics (``not_utf8``, ``bad_escape``, ``no_id``,
    ``no_event``); the message says what was wrong without quoting the body.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    """What the gateway reads from a body: enough to key and label the raw record."""

    webhook_id: str | None
    event: str
    subscription_id: str | None

    @property
    def key(self) -> bytes | None:
        """The raw topic's record key: the subscription id, else the webhook id.

        ``None`` only for the 2010-style test body, which has neither.
        """
        chosen = self.subscription_id or self.webhook_id
        return chosen.encode() if chosen is not None else None


def _raw_value(body: bytes, name: bytes) -> bytes | None:
    """The undecoded value of the first ``name`` pair (``name`` ends with ``=``), or None."""
    if body.startswith(name):
        start = len(name)
    else:
        at = body.find(b"&" + name)
        if at < 0:
            return None
        start = at + 1 + len(name)
    end = body.find(b"&", start)
    return body[start:] if end < 0 else body[start:end]


def _decode(raw: bytes) -> str:
    if b"%" in raw or b"+" in raw:
        raw = unquote_to_bytes(raw.replace(b"+", b" "))
    # The whole body was checked to be UTF-8 and its escapes to decode as UTF-8.
    return raw.decode("utf-8", "replace")


def _id(body: bytes, name: bytes) -> str | None:
    """The decimal id in the first ``name`` pair, or None if absent, empty or not an id."""
    raw = _raw_value(body, name)
    if raw is None:
        return None
    value = _decode(raw)
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > _MAX_ID:
        return None
    return value


def _check_decodable(body: bytes) -> None:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FramingError("not_utf8", f"body is not UTF-8 (byte {exc.start})") from None
    broken = _BROKEN_ESCAPE.search(body)
    if broken is not None:
        raise FramingError("bad_escape", f"broken percent-escape at byte {broken.start()}")
    if _HIGH_ESCAPE.search(body) is not None:
        try:
            unquote_to_bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise FramingError("bad_escape", "percent-escapes do not decode as UTF-8") from None


def frame(body: bytes) -> Frame:
    """Check that ``body`` is a decodable form and read its id, event and subscription id.

    Raises :class:`FramingError` when the body is not a decodable form, has no valid
    ``event``, or has no numeric ``id``. The one exception is ``event=test``: Chargify's
    2010-era endpoint test (``event=test&payload[chargify]=testing``) has no id, and the
    endpoint test must succeed, so a test event is framed with ``webhook_id=None``.
    """
    _check_decodable(body)
    raw_event = _raw_value(body, _EVENT)
    event = _decode(raw_event) if raw_event is not None else ""
    if (
        not event
        or len(event) > _MAX_EVENT_LENGTH
        or not (event.isascii() and event.replace("_", "").isalnum())
    ):
        raise FramingError("no_event", "missing or invalid event")
    webhook_id = _id(body, _ID)
    if webhook_id is None and event != TEST_EVENT:
        raise FramingError("no_id", "missing or non-numeric id")
    subscription_id = None
    for name in _SUBSCRIPTION_ID:
        subscription_id = _id(body, name)
        if subscription_id is not None:
            break
    return Frame(webhook_id, event, subscription_id)
