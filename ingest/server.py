"""``chargify-stream gateway``: the composition root of the gateway process.

Builds the publisher and the app from the settings and serves them with uvicorn. On
SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish, then the lifespan
shutdown flushes the producer.
"""

from __future__ import annotations

import logging

import uvicorn

from chargify_stream.kafka_admin import ensure_topics
from chargify_stream.settings import Settings
from ingest.app import WEBHOOK_PATH, GatewayApp
from ingest.publisher import Publisher

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> GatewayApp:
    """The gateway app with a real publisher; its lifespan owns the producer."""
    holder: dict[str, Publisher] = {}

    def startup() -> None:
        ensure_topics(
            settings.kafka_bootstrap_servers,
            [settings.topic("raw")],
            partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication_factor,
        )

    def shutdown() -> None:
        log.info("gateway stopping: flushing the producer")
        holder["publisher"].close()

    publisher = Publisher(
        settings.kafka_bootstrap_servers, timeout_s=settings.gateway_publish_timeout_s
    )
    holder["publisher"] = publisher
    if not settings.shared_keys and not settings.gateway_allow_unsigned:
        log.error(
            "CHARGIFY_SHARED_KEYS is empty: every webhook will be refused with 401 "
            "(set the site shared key, or GATEWAY_ALLOW_UNSIGNED=true for local development)"
        )
    if settings.gateway_allow_unsigned:
        log.warning("GATEWAY_ALLOW_UNSIGNED=true: webhooks with bad signatures are ACCEPTED")
    return GatewayApp(
        publisher=publisher,
        topic=settings.topic("raw"),
        shared_keys=settings.shared_keys,
        max_body_bytes=settings.gateway_max_body_bytes,
        allow_unsigned=settings.gateway_allow_unsigned,
        on_startup=startup,
        on_shutdown=shutdown,
    )


def run(settings: Settings) -> int:
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=15,
        server_header=False,
    )
    log.info(
        "gateway listening on http://%s:%d%s, publishing to %s",
        settings.gateway_host,
        settings.gateway_port,
        WEBHOOK_PATH,
        settings.topic("raw"),
    )
    uvicorn.Server(config).run()
    return 0
