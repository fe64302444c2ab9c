"""The sink's Prometheus metrics, in their own registry, served on ``SINK_METRICS_PORT``.

The re-driver, customer relay and outcome recorder register theirs in the same registry
(:func:`sink.consumer.run`), so one port serves the whole sink process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sink.upsert import BatchResult

__all__ = ["SinkMetrics"]


class SinkMetrics:
    """The sink's Prometheus metrics, in their own registry (served on SINK_METRICS_PORT)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("sink_records", "Records consumed, by topic", ["topic"], registry=r)
        self.written = Counter(
            "sink_rows_written", "Rows inserted or changed, by table", ["table"], registry=r
        )
        self.unchanged = Counter(
            "sink_rows_unchanged",
            "Rows a batch left as they were (duplicates, replays, older events), by table",
            ["table"],
            registry=r,
        )
        self.dead = Counter(
            "sink_dead_letters", "Records dead-lettered, by reason", ["reason"], registry=r
        )
        self.retries = Counter(
            "sink_transient_retries",
            "Steps retried after a transient fault, by what failed",
            ["target"],
            registry=r,
        )
        self.commit_failures = Counter(
            "sink_commit_failures",
            "Offset commits the broker refused (rebalance); the batch is consumed again",
            registry=r,
        )
        self.batch_size = Histogram(
            "sink_batch_size",
            "Records per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=r,
        )
        self.write_seconds = Histogram(
            "sink_db_write_seconds",
            "Time of one successful database transaction",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.lag = Gauge(
            "sink_consumer_lag",
            "Records behind the partition's end after the last batch (from the last fetch)",
            ["topic", "partition"],
            registry=r,
        )

    def count(self, result: BatchResult) -> None:
        self.written.labels("transactions").inc(result.transactions_written)
        self.written.labels("subscriptions").inc(result.subscriptions_written)
        self.unchanged.labels("transactions").inc(result.transactions_unchanged)
        self.unchanged.labels("subscriptions").inc(result.subscriptions_unchanged)
