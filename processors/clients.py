"""The processor's Kafka clients and topics: every configuration in one place.

The connection part (bootstrap servers, security protocol, SASL, TLS) of every client is
:func:`chargify_stream.base.kafka_config.librdkafka_config`; this module adds what each client
of the processor needs on top.

- the raw topic's consumer (group ``PROCESSOR_APP_ID``, offsets only through transactions,
  ``read_committed``);
- the outputs' producer, transactional (see :func:`transactional_id`) or, for the
  benchmark's comparison only, not;
- the consumer that reads a changelog partition to its end (:mod:`processors.restore`);
- the state's changelog topics, created partitioned like the raw topic.

:func:`build` is the processor's composition root: the pipeline and its clients.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer

from chargify_stream.base.errors import ConfigError
from chargify_stream.base.kafka_admin import ensure_topics
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.limits import deadletter_record_max
from chargify_stream.base.settings import Settings
from chargify_stream.processors.metrics import ProcessorMetrics
from chargify_stream.processors.pipeline import Pipeline
from chargify_stream.processors.state import REFERENCES, Store, bucket_seconds

__all__ = [
    "TRANSACTION_TIMEOUT_MS",
    "Changelogs",
    "build",
    "changelog_topics",
    "consumer_config",
    "ensure_changelogs",
    "producer_config",
    "restorer_config",
    "transactional_id",
]

# See processors.pipeline ("Transaction timeout"): how long a transaction left open by a
# worker that died holds back read_committed readers, at most (plus the broker's check).
TRANSACTION_TIMEOUT_MS = 10_000


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The raw topic's consumer: the processor's group, offsets only in transactions."""
    return {
        **librdkafka_config(settings),
        "group.id": settings.processor_app_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # The raw topic is not written in transactions; read_committed also makes the
        # offset fetch after an assignment wait for a previous owner's open transaction.
        "isolation.level": "read_committed",
        # Kafka's long-time default: a crashed worker's partitions move within 10 s.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 3_000,
        "fetch.wait.max.ms": 100,
        "queued.min.messages": 20_000,
        "log_level": 3,
    }


def producer_config(settings: Settings, transactional: str | None) -> dict[str, Any]:
    """The outputs' producer; transactional unless ``transactional`` is ``None``."""
    config: dict[str, Any] = {
        **librdkafka_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        "message.timeout.ms": TRANSACTION_TIMEOUT_MS,
        # The dead letter of any raw record fits (processors.outputs).
        "message.max.bytes": deadletter_record_max(settings.gateway_max_body_bytes),
        "delivery.report.only.error": True,
        "log_level": 3,
    }
    if transactional is not None:
        config["transactional.id"] = transactional
        config["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
    return config


def restorer_config(settings: Settings) -> dict[str, Any]:
    """A consumer that reads a changelog partition to its end, outside any group."""
    return {
        **librdkafka_config(settings),
        "group.id": f"{settings.processor_app_id}-restore",  # never joined, never committed
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "log_level": 3,
    }


def transactional_id(settings: Settings, slot: int) -> str:
    """One per worker, the same after a restart (see the module docstring)."""
    folder = hashlib.sha256(settings.processor_data_dir.encode()).hexdigest()[:8]
    return f"{settings.processor_app_id}-{socket.gethostname()}-{folder}-{slot}"


@dataclass(frozen=True)
class Changelogs:
    """The state's changelog topic names."""

    references: str
    dedup: str

    def of(self, kind: str) -> str:
        return self.references if kind == REFERENCES else self.dedup


def changelog_topics(settings: Settings) -> Changelogs:
    app = settings.processor_app_id
    return Changelogs(f"{app}-references-changelog", f"{app}-dedup-changelog")


def ensure_changelogs(settings: Settings, partitions: int) -> Changelogs:
    """Create the changelogs (partitioned like raw); fail if one exists partitioned unlike it."""
    from confluent_kafka.admin import AdminClient

    topics = changelog_topics(settings)
    admin = AdminClient(librdkafka_config(settings, log_level=0))
    existing = admin.list_topics(timeout=30).topics
    for name in (topics.references, topics.dedup):
        if name in existing and len(existing[name].partitions) != partitions:
            raise ConfigError(
                f"changelog topic {name} has {len(existing[name].partitions)} partitions but "
                f"{settings.topic('raw')} has {partitions}; the state must be partitioned like "
                "the raw topic (use a new PROCESSOR_APP_ID, or recreate the changelog topics)"
            )
    window_ms = settings.processor_dedup_window_s * 1000
    common = {"partitions": partitions, "replication_factor": settings.topic_replication_factor}
    ensure_topics(
        settings,
        [topics.references],
        config={"cleanup.policy": "compact"},
        **common,
    )
    ensure_topics(
        settings,
        [topics.dedup],
        config={
            "cleanup.policy": "delete",
            "retention.ms": str(
                window_ms + bucket_seconds(settings.processor_dedup_window_s) * 1000
            ),
        },
        **common,
    )
    return topics


def build(
    settings: Settings,
    *,
    store: Store,
    slot: int,
    changelogs: Changelogs,
    metrics: ProcessorMetrics,
    transactional: bool = True,
) -> Pipeline:
    """The pipeline and its clients (the processor's composition root)."""

    return Pipeline(
        settings,
        consumer=Consumer(consumer_config(settings)),
        make_producer=lambda: Producer(
            producer_config(settings, transactional_id(settings, slot) if transactional else None)
        ),
        make_restorer=lambda: Consumer(restorer_config(settings)),
        store=store,
        changelogs=changelogs,
        metrics=metrics,
        transactional=transactional,
    )
