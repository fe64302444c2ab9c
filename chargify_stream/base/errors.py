"""The project's exceptions.

::

    ChargifyStreamError            base of everything raised on purpose
     +-- ConfigError               a bad environment variable or option (exit 2)
     +-- ServiceError              a local Kafka/Postgres could not be fetched, started or reached
     +-- TransientError            broker or database unavailable: retry with backoff,
                                   never dead-letter

What one record raises when it cannot be processed (``RecordError`` and its kinds, each
carrying a dead-letter reason) belongs to the contracts: :mod:`chargify_stream.schemas.errors`.
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
