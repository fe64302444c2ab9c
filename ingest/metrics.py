"""The gateway's Prometheus metrics, in a registry of its own (one per app instance).

Exposed on ``GET /metrics``:

- ``gateway_requests_total{status}``: webhook requests answered, by HTTP status;
- ``gateway_rejects_total{reason}``: webhook requests refused, by reason code;
- ``gateway_published_total{event}``: webhooks the broker acknowledged, by Chargify event;
- ``gateway_publish_seconds``: histogram, produce to broker acknowledgement (or failure);
- ``gateway_in_flight``: webhook requests being handled now;
- ``gateway_in_flight_bytes``: request body bytes held now (bounded by
  ``GATEWAY_MAX_INFLIGHT_BYTES``);
- ``gateway_connections_dropped_total{reason}``: connections closed by the gateway
  because a deadline passed or a discarded body went on too long.

Label values are bounded: statuses and reasons are fixed sets, and events reach the
``published`` counter only after the signature check, so only Chargify names them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Why a webhook was refused; every refusal is counted under exactly one of these.
REJECT_REASONS = (
    "method",  # 405
    "content_type",  # 415
    "too_large",  # 413
    "disconnected",  # the client went away mid-body
    "no_signature",  # 401, before the body is read
    "bad_signature",  # 401
    "not_utf8",  # 400
    "bad_escape",  # 400
    "no_id",  # 400
    "no_event",  # 400
    "too_many_requests",  # 503: as many webhook requests in flight as allowed
    "inflight_bytes",  # 503: GATEWAY_MAX_INFLIGHT_BYTES of bodies held already
    "broker_unavailable",  # 503
    "internal",  # 500: a bug; Chargify retries
)

_STATUSES = (200, 400, 401, 405, 413, 415, 500, 503)

# Why the gateway closed a connection itself (see ingest/connection.py).
DROP_REASONS = (
    "header_timeout",  # request headers not complete within GATEWAY_HEADER_TIMEOUT_S
    "body_timeout",  # body not complete within GATEWAY_BODY_TIMEOUT_S
    "drain_limit",  # the rest of a body answered early went on too long to discard
)


class GatewayMetrics:
    """The gateway's metrics; children for known label values are created up front, so
    every series shows (as 0) from the first scrape and the hot path skips ``labels()``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Webhook requests answered, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.rejects = Counter(
            "gateway_rejects",
            "Webhook requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.published = Counter(
            "gateway_published",
            "Webhooks acknowledged by the broker, by Chargify event",
            ["event"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gateway_in_flight", "Webhook requests being handled", registry=self.registry
        )
        self.in_flight_bytes = Gauge(
            "gateway_in_flight_bytes", "Request body bytes held now", registry=self.registry
        )
        self.dropped = Counter(
            "gateway_connections_dropped",
            "Connections closed by the gateway, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "gateway_publish_seconds",
            "Time from produce to broker acknowledgement or failure",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self._status = {s: self.requests.labels(str(s)) for s in _STATUSES}
        for reason in REJECT_REASONS:
            self.rejects.labels(reason)
        self._dropped = {r: self.dropped.labels(r) for r in DROP_REASONS}

    def answered(self, status: int) -> None:
        """Count one webhook request answered with ``status``."""
        child = self._status.get(status)
        if child is None:
            child = self._status[status] = self.requests.labels(str(status))
        child.inc()

    def connection_dropped(self, reason: str) -> None:
        """Count one connection closed by the gateway, ``reason`` one of DROP_REASONS."""
        self._dropped[reason].inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
