"""The gateway's Prometheus metrics, in a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
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
        self.publish_seconds = Histogram(
            "gateway_publish_seconds",
            "Time from produce to broker acknowledgement",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
