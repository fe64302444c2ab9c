"""What a record that breaks the contracts raises.

::

    RecordError                one record cannot be processed: it is dead-lettered
     +-- MalformedPayload      undecodable body or a required field missing/invalid
     +-- UnsupportedSchema     an Avro value whose schema this build does not know

``RecordError`` carries the dead-letter reason code from DESIGN.md. These live with the
contracts, which import nothing of ours; the rest of the project's exceptions (settings,
services, transient failures) are in :mod:`chargify_stream.base.errors`.
"""

from __future__ import annotations


class RecordError(Exception):
    """One record cannot be processed; it goes to the dead-letter topic with ``reason``."""

    reason = "malformed_payload"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedPayload(RecordError):
    reason = "malformed_payload"


class UnsupportedSchema(RecordError):
    reason = "unsupported_schema"
