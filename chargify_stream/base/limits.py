"""One size budget for every record of the pipeline, derived from the gateway's body limit.

A body the gateway accepts must fit everywhere it may go next: on the raw topic with its
headers, and on the dead-letter (or sink retry) topic with the original headers plus the
``dlq-*`` ones. So every limit is computed here from ``GATEWAY_MAX_BODY_BYTES``, with room
for headers at each step, and nothing else in the project names a record size:

=================================  =============================================
limit                              value
=================================  =============================================
gateway body                       ``body`` (``GATEWAY_MAX_BODY_BYTES``; 413 above)
raw record (producer + topic)      ``body + HEADER_ROOM``
dead-letter / retry record         ``body + 2 * HEADER_ROOM``
=================================  =============================================

Typed records (Avro) hold a few fields of the body, never the body, so they are far
below the raw limit. A dead letter that still cannot be written whole (its headers grew
past the room, or the broker refuses it) is written as a pointer with no body: see
``schemas/deadletter.py``.
"""

from __future__ import annotations

__all__ = ["HEADER_ROOM", "deadletter_record_max", "raw_record_max"]

# Room for a record's headers and Kafka's per-record and per-batch overhead. The raw
# record's own headers are a few hundred bytes; dead-letter headers add at most ~2 KB
# (the error text is capped at 500 characters).
HEADER_ROOM = 64 * 1024


def raw_record_max(body_max: int) -> int:
    """The gateway producer's ``message.max.bytes`` and the raw topic's ``max.message.bytes``."""
    return body_max + HEADER_ROOM


def deadletter_record_max(body_max: int) -> int:
    """The producer and topic limit of the dead-letter and sink retry topics."""
    return body_max + 2 * HEADER_ROOM
