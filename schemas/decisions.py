"""Processor decisions that leave no other record: the ``chargify.processor.decisions`` topic.

A webhook the processor emits shows on a typed topic, one it dead-letters on the
dead-letter topic; one it ignores (test event, test-panel payload, unsupported event) or
drops as a duplicate leaves nothing behind. For those the processor publishes one small
JSON record, keyed by webhook id, alongside its outputs (in the same Kafka transaction when
there is one), and the sink's outcome recorder (:mod:`sink.recorder`) writes it to
``webhook_outcomes`` and ``webhook_deliveries``.

The value is a JSON object: ``webhook_id`` (decimal string), ``decision`` (``ignored`` or
``duplicate``), ``reason`` (why ignored; null for a duplicate), ``event``, ``received_at``
(the raw record's ``received-at`` header), ``at`` (when the processor decided, RFC 3339
UTC), and the raw record it decided on: ``topic``, ``partition``, ``offset``,
``replay_count``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["DUPLICATE", "IGNORED", "Decision", "decode_decision", "encode_decision"]

IGNORED: Final = "ignored"
DUPLICATE: Final = "duplicate"


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the processor on one raw record."""

    webhook_id: str
    decision: str
    reason: str | None
    event: str | None
    received_at: str | None
    at: str
    topic: str
    partition: int
    offset: int
    replay_count: int = 0


def now() -> str:
    """The current time as the decision records carry it (RFC 3339, UTC, microseconds)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_decision(decision: Decision) -> bytes:
    return json.dumps(asdict(decision), separators=(",", ":")).encode()


def decode_decision(value: bytes) -> Decision | None:
    """The decision in ``value``, or ``None`` when it is not one (never raises)."""
    try:
        data: Any = json.loads(value)
        return Decision(
            webhook_id=str(data["webhook_id"]),
            decision=str(data["decision"]),
            reason=_text(data.get("reason")),
            event=_text(data.get("event")),
            received_at=_text(data.get("received_at")),
            at=str(data["at"]),
            topic=str(data["topic"]),
            partition=int(data["partition"]),
            offset=int(data["offset"]),
            replay_count=int(data.get("replay_count") or 0),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
