"""Which Kafka produce errors are about one record, and which about the broker.

A stage that cannot write a record must tell the two apart, by error code, never by
message text:

- **refused for itself** (:func:`refused_for_itself`): the broker or the producer will never
  take this record as it is (too large for the producer's ``message.max.bytes`` or the
  topic's ``max.message.bytes``, or invalid). Sending it again fails again for ever, so the
  stage dead-letters it (or writes a pointer to it) and moves on;
- anything else (timeouts, no leader, not enough replicas, the broker away): sending it
  again will work once the broker is back, so the stage retries and never dead-letters.

librdkafka reports the first kind either at once, raised by ``produce()``
(``MSG_SIZE_TOO_LARGE`` against ``message.max.bytes``), or later in the delivery report
(the broker's answer). Its ``batch.size`` (1,000,000 bytes) is below every topic's limit,
so a batch the broker refuses as too large holds that one record only.
"""

from __future__ import annotations

from typing import Final

from confluent_kafka import KafkaError, KafkaException

__all__ = ["RECORD_ERRORS", "refusal", "refused_for_itself"]

RECORD_ERRORS: Final = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
    }
)


def refused_for_itself(err: KafkaError | KafkaException | None) -> bool:
    """Whether ``err`` (a delivery report's, or raised by ``produce()``) is about the record."""
    if isinstance(err, KafkaException):
        err = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else None
    return err is not None and err.code() in RECORD_ERRORS


def refusal(err: KafkaError | KafkaException) -> str:
    """``MSG_SIZE_TOO_LARGE (Broker: Message size too large)``: the code and its text."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    if isinstance(err, KafkaError):
        return f"{err.name()} ({err.str()})"
    return str(err)
