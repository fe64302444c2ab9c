"""The processor's Prometheus metrics, served at ``/metrics`` on Faust's web server.

Counts are added once per batch from the batch's :class:`processors.splitter.Tally`, not
once per record, so the hot loop never touches the client library. The pipeline's thread
writes them; the web server's page reads them (prometheus_client is thread-safe).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chargify_stream.processors.splitter import DUPLICATE, Tally

# The exposition format is UTF-8; aiohttp (under Faust's web server) refuses a charset here.
CONTENT_TYPE = "text/plain; version=0.0.4"


class ProcessorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "processor_events",
            "Raw webhooks processed, by Chargify event and outcome "
            "(emitted, ignored, dead_lettered, duplicate)",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.published = Counter(
            "processor_records_published",
            "Records acknowledged by the broker, by output topic "
            "(transactions, subscriptions, deadletter)",
            ["topic"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "processor_dead_letters",
            "Webhooks dead-lettered, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.ignored = Counter(
            "processor_ignored",
            "Webhooks ignored (kept on the raw topic only), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "processor_duplicates",
            "Exact duplicates (same webhook id) dropped",
            registry=self.registry,
        )
        self.aborted = Counter(
            "processor_transactions_aborted",
            "Batches whose transaction was aborted (their records are processed again)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "processor_batch_size",
            "Raw records per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "processor_batch_seconds",
            "Time to process a batch, from taking it to committing its transaction",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.lag = Gauge(
            "processor_consumer_lag",
            "Raw records behind the end of each partition this worker reads, after its last batch",
            ["partition"],
            registry=self.registry,
        )
        self.seen = Gauge(
            "processor_dedup_keys",
            "Dedup keys (transaction and event ids) stored since the worker started",
            registry=self.registry,
        )

    def record(self, tally: Tally) -> None:
        """Add one batch's counts."""
        for (event, outcome), n in tally.events.items():
            self.events.labels(event, outcome).inc(n)
            if outcome == DUPLICATE:
                self.duplicates.inc(n)
        for topic, n in tally.published.items():
            self.published.labels(topic).inc(n)
        for reason, n in tally.dead_letters.items():
            self.dead_letters.labels(reason).inc(n)
        for reason, n in tally.ignored.items():
            self.ignored.labels(reason).inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
