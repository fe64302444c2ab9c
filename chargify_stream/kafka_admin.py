"""Topic administration shared by the stages, the operator commands and the tests.

Faust does not create the topics its agents read, and an agent subscribed to a missing
topic consumes nothing until it restarts; the gateway's producer must not auto-create
topics either (the broker forbids it). So every process that needs a topic calls
:func:`ensure_topics` at start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from chargify_stream.errors import TransientError

log = logging.getLogger(__name__)


def ensure_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create each missing topic; topics that already exist are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise TransientError(f"Kafka at {bootstrap_servers} is unreachable: {exc}") from exc
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return
    # min.insync.replicas follows the replication factor (at most 2) so acks=all means
    # "on every in-sync replica" wherever there is more than one broker.
    config = {"min.insync.replicas": str(min(replication_factor, 2))}
    futures = admin.create_topics(
        [NewTopic(n, partitions, replication_factor, config=config) for n in wanted],
        operation_timeout=timeout,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            log.info("created topic %s (%d partitions)", name, partitions)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
