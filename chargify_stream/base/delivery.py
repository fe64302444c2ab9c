"""Publish records and wait until the broker has acknowledged every one.

For a batch written at once (the benchmarks' preloads, the tests' fixtures): each record is
produced with a delivery report, and the producer is flushed. What was not acknowledged is
returned as text, so the caller decides whether that is fatal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = ["Record", "publish_and_wait"]

# (key, value, headers) of one record.
Record = tuple[str | bytes | None, bytes | None, Sequence[tuple[str, bytes | None]] | None]


class _Producer(Protocol):
    """The part of ``confluent_kafka.Producer`` used here."""

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def flush(self, timeout: float = ...) -> int: ...


def publish_and_wait(
    producer: _Producer, topic: str, records: Iterable[Record], *, timeout: float = 120.0
) -> list[str]:
    """Produce ``records`` to ``topic``, then wait up to ``timeout`` seconds for their
    acknowledgements; the delivery errors (empty when the broker has every record)."""
    errors: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value, headers in records:
        producer.produce(
            topic, value=value, key=key, headers=list(headers or ()), on_delivery=report
        )
        producer.poll(0)  # serve the reports of earlier records as we go
    remaining = producer.flush(timeout)
    if remaining:
        errors.append(f"{remaining} records not acknowledged after {timeout:.0f}s")
    return errors
