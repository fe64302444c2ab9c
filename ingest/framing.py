"""The few fields the gateway needs from a body, found without decoding the whole form.

The gateway publishes the body byte for byte; it only needs the webhook ``id``, the
``event`` and the subscription id (the record key). Those are top-level or shallow keys,
so a scan of the ``&``-separated pairs that decodes only the matching values is enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_WANTED = {
    b"id": "webhook_id",
    b"event": "event",
    b"payload[subscription][id]": "subscription_id",
    b"payload[subscription_id]": "subscription_id",
}


class FramingError(ValueError):
    """The body is not a form with a numeric ``id`` and an ``event``."""


@dataclass(frozen=True, slots=True)
class Frame:
    webhook_id: str
    event: str
    subscription_id: str | None

    @property
    def key(self) -> bytes:
        """The raw topic's record key: the subscription id, else the webhook id."""
        return (self.subscription_id or self.webhook_id).encode()


def _value(raw: bytes) -> str:
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FramingError("a value is not UTF-8") from exc


def frame(body: bytes) -> Frame:
    """Find ``id``, ``event`` and the subscription id; raise :class:`FramingError`."""
    found: dict[str, str] = {}
    for pair in body.split(b"&"):
        name, _, raw = pair.partition(b"=")
        field = _WANTED.get(name)
        if field is None or field in found:
            continue
        found[field] = _value(raw)
        if len(found) == 3:
            break
    webhook_id = found.get("webhook_id", "")
    event = found.get("event", "")
    if not webhook_id.isdigit() or len(webhook_id) > 19:
        raise FramingError("missing or non-numeric id")
    if not event or len(event) > 100 or not event.replace("_", "").isalnum():
        raise FramingError("missing or invalid event")
    sub = found.get("subscription_id") or None
    if sub is not None and (not sub.isdigit() or len(sub) > 19):
        sub = None
    return Frame(webhook_id, event, sub)
