"""The Kafka and Postgres clients the sink's background threads share the shape of.

The re-driver, the customer relay and the outcome recorder each take factories for their
clients (so tests hand in their own); the real ones are built here, once: a consumer that
joins its own group and commits by hand, reading only committed records; an idempotent
producer; an autocommit database connection named after the thread. :func:`has_record`
is the one filter of a consumed message (a record, or an error to log).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer

from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings

__all__ = ["connect", "group_consumer", "has_record", "idempotent_producer"]


def group_consumer(settings: Settings, group_id: str) -> Consumer:
    """A consumer in ``group_id`` that starts at the earliest record and commits by hand."""
    return Consumer(
        {
            **librdkafka_config(settings),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "log_level": 3,
        }
    )


def idempotent_producer(settings: Settings, **extra: Any) -> Producer:
    """An idempotent ``acks=all`` producer; ``extra`` adds or overrides librdkafka settings."""
    return Producer(
        {
            **librdkafka_config(settings),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 15_000,
            "log_level": 3,
            **extra,
        }
    )


def connect(settings: Settings, application_name: str) -> psycopg.Connection[Any]:
    """An autocommit connection, named so that ``pg_stat_activity`` tells the threads apart."""
    return psycopg.connect(
        settings.database_dsn(),
        autocommit=True,
        connect_timeout=5,
        application_name=application_name,
    )


def has_record(msg: Message, log: logging.Logger, what: str) -> bool:
    """True when ``msg`` is a record; an error other than the end of a partition is logged."""
    err = msg.error()
    if err is None:
        return True
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("%s consumer error: %s", what, err.str())
    return False
