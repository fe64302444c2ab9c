"""``chargify-stream gateway``: the composition root of the gateway process.

:func:`build_app` wires the settings, the publisher and the app; the app's lifespan owns
the producer (created at startup, flushed at shutdown). :func:`run` serves it with
uvicorn (uvloop + httptools), chosen by measurement: see ``bench/gateway``.

On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (each waits at
most the publish bound for its acknowledgement), then the lifespan shutdown flushes the
producer.

A broker that is down at start does not stop the gateway: it serves, answers webhooks
with 503 (so Chargify retries) and ``/readyz`` with 503, and keeps trying to create the
raw topic in the background until the broker is back.
"""

from __future__ import annotations

import logging
import threading

import uvicorn
from confluent_kafka import KafkaException

from chargify_stream.errors import TransientError
from chargify_stream.kafka_admin import ensure_pipeline_topics
from chargify_stream.kafka_config import librdkafka_config
from chargify_stream.settings import Settings
from ingest.app import WEBHOOK_PATH, GatewayApp, Sink
from ingest.publisher import Publisher

__all__ = ["build_app", "run"]

log = logging.getLogger(__name__)

# Connections plus requests at once before uvicorn answers 503 itself: a bound on memory
# (each request may buffer up to GATEWAY_MAX_BODY_BYTES) far above Chargify's traffic.
MAX_CONCURRENCY = 1000
# Seconds to wait, at shutdown, beyond the publish bound for in-flight requests.
_SHUTDOWN_GRACE_S = 5.0


class _TopicKeeper:
    """Creates the raw topic, retrying in a daemon thread while the broker is away."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="ensure-topics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        s = self._settings
        delay = 0.5
        while not self._stop.is_set():
            try:
                ensure_pipeline_topics(s, [s.topic("raw")], timeout=10.0)
                return
            except (TransientError, KafkaException) as exc:
                log.warning("cannot reach Kafka to check topic %s yet: %s", s.topic("raw"), exc)
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)


def build_app(settings: Settings, sink: Sink | None = None) -> GatewayApp:
    """The gateway app; without ``sink``, a real :class:`Publisher` owned by the lifespan."""
    publisher: Publisher | None = None
    if sink is None:
        publisher = Publisher(
            settings.kafka_bootstrap_servers,
            timeout_s=settings.gateway_publish_timeout_s,
            **librdkafka_config(settings),  # the connection: TLS, SASL
        )
        sink = publisher
    topics = _TopicKeeper(settings)

    async def startup() -> None:
        _warn_about_keys(settings)
        if publisher is not None:
            publisher.start()
            topics.start()

    async def shutdown() -> None:
        topics.stop()
        if publisher is not None:
            log.info("gateway stopping: flushing the producer")
            await publisher.close()

    return GatewayApp(
        sink=sink,
        topic=settings.topic("raw"),
        shared_keys=settings.shared_keys,
        max_body_bytes=settings.gateway_max_body_bytes,
        allow_unsigned=settings.gateway_allow_unsigned,
        startup=startup,
        shutdown=shutdown,
    )


def _warn_about_keys(settings: Settings) -> None:
    if settings.gateway_allow_unsigned:
        log.warning(
            "GATEWAY_ALLOW_UNSIGNED=true: webhooks with a missing or bad signature are "
            "ACCEPTED. For local development only; never in production."
        )
    elif not settings.shared_keys:
        log.error(
            "CHARGIFY_SHARED_KEYS is empty: every webhook will be refused with 401 "
            "(set the site shared key, or GATEWAY_ALLOW_UNSIGNED=true for local development)"
        )
    else:
        log.info("verifying signatures with %d shared key(s)", len(settings.shared_keys))


def uvicorn_config(settings: Settings, app: GatewayApp) -> uvicorn.Config:
    """How the gateway is served (the benchmark serves its baseline the same way)."""
    return uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        limit_concurrency=MAX_CONCURRENCY,
        timeout_graceful_shutdown=int(settings.gateway_publish_timeout_s + _SHUTDOWN_GRACE_S),
    )


def run(settings: Settings) -> int:
    """Serve the gateway until SIGTERM/SIGINT; return the exit code."""
    app = build_app(settings)
    log.info(
        "gateway listening on http://%s:%d%s, publishing to %s",
        settings.gateway_host,
        settings.gateway_port,
        WEBHOOK_PATH,
        settings.topic("raw"),
    )
    server = uvicorn.Server(uvicorn_config(settings, app))
    server.run()
    return 0 if server.started else 1
