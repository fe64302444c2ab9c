"""``chargify-stream reconcile --every 15m``: reconcile forever, with metrics to alert on.

Prometheus text on ``http://METRICS_HOST:RECONCILE_METRICS_PORT/metrics``:

- ``reconcile_missing``: webhooks Chargify holds that the pipeline had not received at the
  end of the last pass (after ``--wait``, if given; else before the replays arrived);
- ``reconcile_replayed_total``: webhook ids whose replay was requested;
- ``reconcile_events_without_webhook``: events of the last pass that Chargify made no
  webhook for (replay cannot bring them);
- ``reconcile_endpoints_inoperative``: endpoints paused or disabled;
- ``reconcile_failures_total``: passes that failed (Chargify or Kafka unreachable, ...);
- ``reconcile_last_success_timestamp_seconds``: when a pass last completed.

A pass that fails is logged and the next one runs on time. A key Chargify rejects (401)
ends the command: waiting will not fix it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from chargify_stream.base.errors import ChargifyStreamError, ConfigError
from chargify_stream.reconcile_report import Report, print_report

log = logging.getLogger("chargify_stream.reconcile")


class ReconcileMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.missing = Gauge(
            "reconcile_missing", "Webhooks in Chargify's log not received by the pipeline",
            registry=r,
        )  # fmt: skip
        self.replayed = Counter(
            "reconcile_replayed", "Webhook ids whose replay was requested", registry=r
        )
        self.events_without_webhook = Gauge(
            "reconcile_events_without_webhook", "Events Chargify made no webhook for", registry=r
        )
        self.inoperative = Gauge(
            "reconcile_endpoints_inoperative", "Endpoints paused or disabled", registry=r
        )
        self.failures = Counter("reconcile_failures", "Passes that failed", registry=r)
        self.last_success = Gauge(
            "reconcile_last_success_timestamp_seconds", "When a pass last completed", registry=r
        )

    def record(self, report: Report) -> None:
        """The figures of a completed pass."""
        still = report.still_missing
        self.missing.set(len(still) if still is not None else len(report.missing))
        self.replayed.inc(len(report.replayed))
        self.events_without_webhook.set(len(report.events_without_webhook))
        self.inoperative.set(len(report.advice))
        self.last_success.set_to_current_time()


def run_forever(
    one_pass: Callable[[], Report],
    *,
    every: float,
    port: int,
    host: str = "127.0.0.1",
    as_json: bool = False,
    metrics: ReconcileMetrics | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run ``one_pass`` every ``every`` seconds until ``stop`` is set, serving metrics on
    ``host:port`` (port 0: none). A failed pass is counted and logged; a configuration
    error (a key Chargify rejects) ends the loop."""
    metrics = metrics or ReconcileMetrics()
    if port:
        start_http_server(port, host, registry=metrics.registry)
    stop = stop or threading.Event()
    log.info("reconciling every %.0fs; metrics on %s:%s", every, host, port)
    while not stop.is_set():
        started = time.monotonic()
        try:
            report = one_pass()
        except ConfigError:
            raise
        except ChargifyStreamError as exc:
            metrics.failures.inc()
            log.error("reconcile pass failed: %s", exc)
        else:
            metrics.record(report)
            log.info(
                "reconcile pass: checked=%d received=%d missing=%d replayed=%d",
                report.checked,
                report.received,
                len(report.missing),
                len(report.replayed),
            )
            if as_json:
                print(json.dumps(report.as_json(), sort_keys=True))
            else:
                print_report(report)
            sys.stdout.flush()
        stop.wait(max(0.0, every - (time.monotonic() - started)))
    return 0
