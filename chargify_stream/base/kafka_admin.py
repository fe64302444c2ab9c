"""Topic administration shared by the stages, the operator commands and the tests.

Faust does not create the topics its agents read, and an agent subscribed to a missing
topic consumes nothing until it restarts; the gateway's producer must not auto-create
topics either (the broker forbids it). So every process that needs a topic calls
:func:`ensure_topics` at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_config import describe, librdkafka_config
from chargify_stream.base.limits import deadletter_record_max, raw_record_max
from chargify_stream.base.settings import Settings

log = logging.getLogger(__name__)


def ensure_topics(
    kafka: Settings | Mapping[str, Any] | str,
    names: Iterable[str],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    timeout: float = 30.0,
    config: Mapping[str, str] | None = None,
) -> None:
    """Create each missing topic; topics that already exist are left as they are.

    ``kafka`` is the settings (their connection: see :mod:`chargify_stream.base.kafka_config`),
    a librdkafka connection dict, or bare bootstrap servers of a PLAINTEXT broker.
    ``config`` is added to the new topics' configuration. Returns once every topic it
    created shows a leader for each partition in the broker's metadata (at most
    ``timeout`` seconds, then a warning): a client that asks for a topic the moment it
    is created can otherwise be told it does not exist.
    """
    admin = AdminClient(_admin_config(kafka))
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise TransientError(f"{_where(kafka)} is unreachable: {exc}") from exc
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return
    # min.insync.replicas follows the replication factor (at most 2) so acks=all means
    # "on every in-sync replica" wherever there is more than one broker.
    topic_config = {"min.insync.replicas": str(min(replication_factor, 2)), **(config or {})}
    futures = admin.create_topics(
        [NewTopic(n, partitions, replication_factor, config=topic_config) for n in wanted],
        operation_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s (%d partitions)", name, partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_leaders(admin, wanted, timeout)


def pipeline_topic_config(settings: Settings, name: str) -> dict[str, str]:
    """The configuration the pipeline gives its topic ``name`` (a full topic name).

    The raw and dead-letter topics take records up to the size budget of
    :mod:`chargify_stream.base.limits`; dead letters are kept until dealt with
    (``DEADLETTER_RETENTION_MS``, unlimited by default) instead of the broker's 7 days. The
    sink's retry topic carries dead letters back to the sink, so it is configured alike.
    The customers topic is compacted: the latest record of each customer is kept for good.
    """
    body_max = settings.gateway_max_body_bytes
    if name == settings.topic("raw"):
        return {"max.message.bytes": str(raw_record_max(body_max))}
    if name == settings.topic("customers"):
        return {"cleanup.policy": "compact"}
    if name in (settings.topic("deadletter"), settings.topic("sink_retry")):
        return {
            "max.message.bytes": str(deadletter_record_max(body_max)),
            "retention.ms": str(settings.deadletter_retention_ms),
            "retention.bytes": "-1",
        }
    return {}


def ensure_pipeline_topics(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    partitions: int | None = None,
    timeout: float = 30.0,
) -> None:
    """:func:`ensure_topics` for the pipeline's own topics (all of them by default),
    each created with :func:`pipeline_topic_config`."""
    by_config: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for name in dict.fromkeys(settings.all_topics if names is None else names):
        config = tuple(sorted(pipeline_topic_config(settings, name).items()))
        by_config.setdefault(config, []).append(name)
    for config, group in by_config.items():
        ensure_topics(
            settings,
            group,
            partitions=settings.topic_partitions if partitions is None else partitions,
            replication_factor=settings.topic_replication_factor,
            timeout=timeout,
            config=dict(config),
        )


def _admin_config(kafka: Settings | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(kafka, Settings):
        return librdkafka_config(kafka, log_level=0)
    if isinstance(kafka, str):
        return {"bootstrap.servers": kafka, "log_level": 0}
    return {"log_level": 0, **kafka}


def _where(kafka: Settings | Mapping[str, Any] | str) -> str:
    if isinstance(kafka, Settings):
        return describe(kafka)
    if isinstance(kafka, str):
        return f"Kafka at {kafka}"
    return f"Kafka at {kafka.get('bootstrap.servers')}"


def check_deadletter_topic(settings: Settings, *, timeout: float = 10.0) -> list[str]:
    """Warn if the existing dead-letter topic can lose dead letters or refuse whole ones.

    :func:`ensure_topics` leaves an existing topic's configuration as it is, so a topic
    created by hand or by an older release may still delete records after the broker's
    7 days (``retention.ms``) or take smaller records than the size budget plans for
    (``max.message.bytes``; larger dead letters are then written as pointers). Each
    problem is logged as a warning and returned; a broker that does not answer is
    logged and skipped (the stage starts anyway).
    """
    name = settings.topic("deadletter")
    keys = ("retention.ms", "retention.bytes", "max.message.bytes")
    config = _topic_numbers(settings, name, keys, timeout)
    if config is None:
        return []
    retention_ms = config["retention.ms"]
    retention_bytes = config["retention.bytes"]
    limit = config["max.message.bytes"]
    problems = []
    if retention_ms >= 0:
        problems.append(
            f"dead-letter topic {name} deletes records after {retention_ms / 86_400_000:g} "
            f"days (retention.ms={retention_ms}): a dead letter not dealt with by then is "
            "lost; set retention.ms=-1 to keep dead letters until they are replayed"
        )
    if retention_bytes >= 0:
        problems.append(
            f"dead-letter topic {name} deletes its oldest records beyond "
            f"{retention_bytes:,} bytes a partition (retention.bytes={retention_bytes}); "
            "set retention.bytes=-1 to keep dead letters until they are replayed"
        )
    planned = deadletter_record_max(settings.gateway_max_body_bytes)
    if limit < planned:
        problems.append(
            f"dead-letter topic {name} takes records up to {limit:,} bytes "
            f"(max.message.bytes), less than the {planned:,} the size budget plans for: "
            "larger dead letters are written as pointers to their source record; set "
            f"max.message.bytes={planned} to keep them whole"
        )
    for problem in problems:
        log.warning("%s", problem)
    return problems


def check_raw_topic(settings: Settings, *, timeout: float = 10.0) -> list[str]:
    """Warn if the existing raw topic takes smaller records than the gateway accepts.

    A raw topic created by hand or by an older release may keep the broker's default
    ``max.message.bytes`` (1 MiB + 12 bytes): a body near ``GATEWAY_MAX_BODY_BYTES`` is
    then refused by the broker on every retry (503 for ever). The problem is logged as a
    warning and returned; a broker that does not answer is logged and skipped.
    """
    name = settings.topic("raw")
    config = _topic_numbers(settings, name, ("max.message.bytes",), timeout)
    if config is None:
        return []
    limit = config["max.message.bytes"]
    planned = raw_record_max(settings.gateway_max_body_bytes)
    if limit >= planned:
        return []
    problem = (
        f"raw topic {name} takes records up to {limit:,} bytes (max.message.bytes), less "
        f"than the {planned:,} the gateway's body limit needs (GATEWAY_MAX_BODY_BYTES="
        f"{settings.gateway_max_body_bytes}): larger webhooks get 503 on every retry; set "
        f"max.message.bytes={planned} on the topic"
    )
    log.warning("%s", problem)
    return [problem]


def _topic_numbers(
    settings: Settings, name: str, keys: tuple[str, ...], timeout: float
) -> dict[str, int] | None:
    """The numeric settings ``keys`` of topic ``name`` as the broker has them; ``None``
    (logged as a warning) when it does not answer or a value is missing or not a number."""
    admin = AdminClient(librdkafka_config(settings, log_level=0))
    resource = ConfigResource(ResourceType.TOPIC, name)
    try:
        config = admin.describe_configs([resource], request_timeout=timeout)[resource].result(
            timeout=timeout
        )
        return {key: int(config[key].value) for key in keys}
    except (KafkaException, TimeoutError, KeyError, ValueError, TypeError) as exc:
        log.warning("could not read the configuration of topic %s: %s", name, exc)
        return None


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Wait until the broker's metadata shows a leader for every partition of ``names``."""
    deadline = time.monotonic() + timeout
    waiting = list(names)
    while waiting:
        try:
            topics = admin.list_topics(timeout=max(1.0, deadline - time.monotonic())).topics
        except KafkaException:
            topics = {}
        waiting = [
            name
            for name in waiting
            if name not in topics
            or topics[name].error is not None
            or not topics[name].partitions
            or any(p.leader < 0 for p in topics[name].partitions.values())
        ]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            log.warning(
                "topics %s created but not yet led by a broker after %.0fs", waiting, timeout
            )
            return
        time.sleep(0.1)
