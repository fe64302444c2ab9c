"""The project's exceptions.

::

    ChargifyStreamError            base of everything raised on purpose
     +-- ConfigError               a bad environment variable or option (exit 2)
     +-- ServiceError              a local Kafka/Postgres could not be fetched, started or reached
     +-- RecordError               one record cannot be processed: it is dead-lettered
     |    +-- MalformedPayload     undecodable body or a required field missing/invalid
     |    +-- UnsupportedSchema    an Avro value whose schema this build does not know
     +-- TransientError            broker or database unavailable: retry with backoff,
                                   never dead-letter

``RecordError`` carries the dead-letter reason code from DESIGN.md.
"""

from __future__ import annotations


class ChargifyStreamError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(ChargifyStreamError):
    """A bad setting; the message names the environment variable or option."""


class ServiceError(ChargifyStreamError):
    """A local service (Kafka, Postgres) could not be fetched, started or reached."""


class TransientError(ChargifyStreamError):
    """The broker or database is unavailable for now; retry, never dead-letter."""


class RecordError(ChargifyStreamError):
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
