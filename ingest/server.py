"""``chargify-stream gateway``: the composition root of the gateway process.

:func:`build_app` wires the settings, the publisher and the app; the app's lifespan owns
the producer (created at startup, flushed at shutdown). :func:`run` serves it with
uvicorn (uvloop + httptools), chosen by measurement: see ``bench/gateway``.

On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (each waits at
most the publish bound for its acknowledgement), then the lifespan shutdown flushes the
producer.

Connections have deadlines (headers, body, keep-alive; see ``ingest/connection.py``), so
idle or slow clients are dropped and never count against the requests in flight.

A broker that is down at start does not stop the gateway: it serves, answers webhooks
with 503 (so Chargify retries) and ``/readyz`` with 503, and keeps trying to create the
raw topic in the background until the broker is back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading

import uvicorn
from confluent_kafka import KafkaException

from chargify_stream.base.errors import TransientError
from chargify_stream.base.kafka_admin import check_raw_topic, ensure_pipeline_topics
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.limits import raw_record_max
from chargify_stream.base.retry import RetryStopped, retry
from chargify_stream.base.settings import Settings
from chargify_stream.ingest.app import WEBHOOK_PATH, GatewayApp, Sink
from chargify_stream.ingest.connection import Deadlines, protocol_class, raise_open_files
from chargify_stream.ingest.publisher import Publisher

__all__ = ["build_app", "run"]

log = logging.getLogger(__name__)

# Webhook requests handled at once before the app answers 503 (far above Chargify's
# traffic). Connections that have not sent a whole request yet do not count: they are
# bounded by their deadlines. The bytes those requests hold have their own bound
# (GATEWAY_MAX_INFLIGHT_BYTES).
MAX_IN_FLIGHT = 1000
# Seconds to wait, at shutdown, beyond the publish bound for in-flight requests.
_SHUTDOWN_GRACE_S = 5.0


class _TopicKeeper:
    """Creates the raw topic (or warns if an existing one takes too small records),
    retrying in a daemon thread while the broker is away."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="ensure-topics", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        s = self._settings

        def prepare() -> None:
            ensure_pipeline_topics(s, [s.topic("raw")], timeout=10.0)
            check_raw_topic(s)

        def unreachable(exc: BaseException, _pause: float, _attempt: int) -> None:
            log.warning("cannot reach Kafka to check topic %s yet: %s", s.topic("raw"), exc)

        with contextlib.suppress(RetryStopped):
            retry(
                prepare,
                retry_on=(TransientError, KafkaException),
                first=0.5,
                most=10.0,
                stop=self._stop,
                on_retry=unreachable,
            )


def build_app(settings: Settings, sink: Sink | None = None) -> GatewayApp:
    """The gateway app; without ``sink``, a real :class:`Publisher` owned by the lifespan."""
    publisher: Publisher | None = None
    if sink is None:
        publisher = Publisher(
            settings.kafka_bootstrap_servers,
            timeout_s=settings.gateway_publish_timeout_s,
            **librdkafka_config(settings),  # the connection: TLS, SASL
            max_record_bytes=raw_record_max(settings.gateway_max_body_bytes),
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
        max_inflight_bytes=settings.gateway_max_inflight_bytes,
        max_in_flight=MAX_IN_FLIGHT,
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
    deadlines = Deadlines(
        header_timeout_s=settings.gateway_header_timeout_s,
        body_timeout_s=settings.gateway_body_timeout_s,
        keep_alive_s=settings.gateway_keep_alive_s,
        dropped=app.metrics.connection_dropped,
    )
    return uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        loop="uvloop",
        http=protocol_class(deadlines),
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        # The protocol keeps its own idle deadline; uvicorn's (whole seconds) backs it up.
        timeout_keep_alive=math.ceil(settings.gateway_keep_alive_s),
        timeout_graceful_shutdown=int(settings.gateway_publish_timeout_s + _SHUTDOWN_GRACE_S),
    )


def run(settings: Settings) -> int:
    """Serve the gateway until SIGTERM/SIGINT; return the exit code."""
    app = build_app(settings)
    open_files = raise_open_files()
    log.info(
        "gateway listening on http://%s:%d%s, publishing to %s (open-files limit %d)",
        settings.gateway_host,
        settings.gateway_port,
        WEBHOOK_PATH,
        settings.topic("raw"),
        open_files,
    )
    server = uvicorn.Server(uvicorn_config(settings, app))
    server.run()
    return 0 if server.started else 1
