"""Publishing the sink's dead letters, and waiting for the broker to take them.

A consumed record the sink cannot write (undecodable, poison, unknown customer) is
published to the dead-letter topic with the ``dlq-*`` headers of
:mod:`schemas.deadletter`, keyed and valued as it was consumed. A record Kafka refuses for
itself (too large for the dead-letter topic, invalid: :mod:`chargify_stream.base.kafka_errors`)
is written again at once as a pointer to the record, which stays on its source topic, so
that one record never stops the sink. What the broker does not acknowledge is returned to
the caller, :class:`sink.consumer.Sink`, which publishes it again after a backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_errors import refusal, refused_for_itself
from chargify_stream.base.logs import fields
from chargify_stream.base.messages import message_headers
from chargify_stream.base.retry import RetryStopped
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import dead_letter_headers, pointer

__all__ = [
    "DeadLetter",
    "DeadLetterUnacknowledged",
    "produce_dead_letters",
]

# The sink's own logger: dead-letter lines keep the logger name they always had.
log = logging.getLogger("chargify_stream.sink.consumer")


class DeadLetterUnacknowledged(TransientError):
    """The broker did not acknowledge a dead letter; publish it again."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A consumed record to dead-letter; ``refusal`` set: Kafka refused it whole, so it is
    written as a pointer (why Kafka refused it)."""

    msg: Message
    reason: str
    error: str
    refusal: str | None = None


def produce_dead_letters(
    producer: Producer, topic: str, letters: Sequence[DeadLetter], *, stop: threading.Event
) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Publish ``letters`` to ``topic`` and wait for the broker.

    Returns the letters the broker did not take (to send again after a backoff) and
    those Kafka refused for themselves (too large, invalid), marked to be written again
    as pointers (see ``schemas.deadletter``), so that one record never stops the sink.
    Raises :class:`~chargify_stream.base.retry.RetryStopped` when ``stop`` is set while
    waiting for acknowledgements.
    """
    failed: list[DeadLetter] = []
    refused: list[DeadLetter] = []
    for dl in letters:
        headers = dead_letter_headers(
            reason=dl.reason,
            stage=h.STAGE_SINK,
            error=dl.error,
            source_topic=dl.msg.topic() or "",
            source_partition=dl.msg.partition() or 0,
            source_offset=dl.msg.offset() or 0,
            original_headers=message_headers(dl.msg),
        )
        key, value = dl.msg.key(), dl.msg.value()
        if dl.refusal is not None:
            key, headers = pointer(key, len(value or b""), headers, refusal=dl.refusal)
            value = None
        log.warning(
            "dead-lettering %s[%d]@%d%s: %s: %s",
            dl.msg.topic(),
            dl.msg.partition(),
            dl.msg.offset(),
            " as a pointer" if dl.refusal is not None else "",
            dl.reason,
            dl.error,
            extra=_log_fields(dl),
        )

        def report(err: KafkaError | None, _m: Message, dl: DeadLetter = dl) -> None:
            if err is None:
                return
            if refused_for_itself(err) and dl.refusal is None:
                _log_refused(dl, refusal(err))
                refused.append(replace(dl, refusal=refusal(err)))
            else:
                log.warning("dead letter not acknowledged: %s", err.str())
                failed.append(dl)

        try:
            producer.produce(
                topic,
                value=value,
                key=key,
                headers=cast(list[tuple[str, str | bytes | None]], headers),
                on_delivery=report,
            )
        except KafkaException as exc:
            if not refused_for_itself(exc):
                raise
            if dl.refusal is None:
                _log_refused(dl, refusal(exc))
                refused.append(replace(dl, refusal=refusal(exc)))
            else:  # even a pointer: the topic, not the record
                log.error(
                    "the dead-letter topic refused even a pointer (%s); check its "
                    "max.message.bytes",
                    refusal(exc),
                )
                failed.append(dl)
    # The producer retries on its own until delivery.timeout.ms; wait for every ack,
    # but let a stop request through.
    while producer.flush(1.0) > 0:
        if stop.is_set():
            raise RetryStopped("stopped while waiting for dead-letter acknowledgements")
    return failed, refused


def _log_fields(dl: DeadLetter) -> dict[str, str]:
    """The stable log keys of a dead letter (webhook id and event from its headers)."""
    found = {k: v for k, v in message_headers(dl.msg) if k in (h.WEBHOOK_ID, h.EVENT)}
    outcome = "parked" if dl.reason == h.CUSTOMER_NOT_FOUND else "dead_lettered"
    return fields(
        found.get(h.WEBHOOK_ID, b"").decode(errors="replace") or None,
        found.get(h.EVENT, b"").decode(errors="replace") or None,
        outcome,
        dl.reason,
    )


def _log_refused(dl: DeadLetter, why: str) -> None:
    size = len(dl.msg.value() or b"") + len(dl.msg.key() or b"")
    log.warning(
        "Kafka refused the dead letter of %s[%d]@%d (%d bytes): %s; writing a pointer to it",
        dl.msg.topic(),
        dl.msg.partition(),
        dl.msg.offset(),
        size,
        why,
    )
